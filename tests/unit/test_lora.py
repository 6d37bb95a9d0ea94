"""LoRA adapters on a resident model (tiny SD, CPU, fp32; the adapters are tiny ones made with peft):
each stage call gives what diffusers gives called directly with the same adapters and weights
(load_lora_weights + set_adapters). Each adapter is loaded once, a set is switched to only when it
changes, the base model is never loaded again, and an adapter that cannot load fails its stage alone."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForText2Image, StableDiffusionImg2ImgPipeline
from safetensors.torch import save_file

from kits.helpers import local_model, stage_plan
from schemas.errors import StageError
from schemas.job import ResolvedParams
from schemas.messages import StagePlan
from schemas.registry import LoraRef, ResolvedModel
from tests.img2imgkit import ATOL, run_direct, run_ours
from workers.events import EngineEvents, subscribed
from workers.models import LoadedModel
from workers.stages.common import StageBatch
from workers.stages.text2img import run_text2img
from workers.tiny_models import write_tiny_lora, write_tiny_sd_x2_latent_upscaler

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loras(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    # b adapts the text encoder too, as many published adapters do.
    return {
        "a": write_tiny_lora(root / "a", tiny_sd_dir, seed=1),
        "b": write_tiny_lora(root / "b", tiny_sd_dir, seed=2, text_encoder=True),
    }


def img2img_plan(model: ResolvedModel, adapters: list[tuple[Path, float]]) -> StagePlan:
    own = [{"source": str(path), "weight": weight} for path, weight in adapters]
    return stage_plan({"type": "img2img", "loras": own}, model)


def ours(loaded: LoadedModel, plan: StagePlan) -> np.ndarray:
    images = run_ours(loaded, plan).images
    assert images is not None
    return images


def direct_pipeline(folder: Path, adapters: list[tuple[Path, float]]) -> Any:
    """diffusers as its documentation shows it: the base pipeline, each adapter loaded by name, then
    set_adapters with the weights."""
    pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    for index, (path, _) in enumerate(adapters):
        pipeline.load_lora_weights(path, adapter_name=f"direct{index}")
    if adapters:
        pipeline.set_adapters([f"direct{i}" for i in range(len(adapters))], [w for _, w in adapters])
    return pipeline


def direct(folder: Path, adapters: list[tuple[Path, float]]) -> np.ndarray:
    return run_direct(direct_pipeline(folder, adapters))


class AdapterEvents(EngineEvents):
    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.switched: list[Sequence[str]] = []

    def adapter_loaded(self, model: str, source: str, seconds: float) -> None:
        self.loaded.append(source)

    def adapters_switched(self, model: str, active: Sequence[str], seconds: float) -> None:
        self.switched.append(active)


def test_switching_adapter_sets_gives_what_diffusers_gives_and_loads_each_once(
    tiny_sd_dir: Path, loras: dict[str, Path]
) -> None:
    model = local_model("tiny-sd", tiny_sd_dir)
    loaded = LoadedModel("tiny-sd", model.entry)
    pipeline, unet = loaded.pipeline, loaded.pipeline.unet
    sets: list[list[tuple[Path, float]]] = [
        [(loras["a"], 0.7)],
        [(loras["a"], 0.5), (loras["b"], 1.0)],
        [],
        [(loras["a"], 0.7)],
    ]
    outputs = []
    with subscribed(AdapterEvents()) as seen:
        for adapters in sets:
            outputs.append(ours(loaded, img2img_plan(model, adapters)))
            np.testing.assert_allclose(outputs[-1], direct(tiny_sd_dir, adapters), atol=ATOL, rtol=0)
    assert np.abs(outputs[0] - outputs[2]).max() > 1e-2, (
        "an adapter must change the images for this to mean much"
    )
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-2
    np.testing.assert_array_equal(outputs[0], outputs[3])
    # Two adapters loaded once each, four switches, the same pipeline and UNet throughout.
    assert sorted(seen.loaded) == sorted([str(loras["a"]), str(loras["b"])])
    assert loaded.adapter_switches == len(seen.switched) == 4
    assert loaded.pipeline is pipeline and loaded.pipeline.unet is unet


def test_the_set_already_active_is_not_switched_to_again(tiny_sd_dir: Path, loras: dict[str, Path]) -> None:
    model = local_model("tiny-sd", tiny_sd_dir)
    loaded = LoadedModel("tiny-sd", model.entry)
    plan = img2img_plan(model, [(loras["a"], 0.7)])
    ours(loaded, plan)
    ours(loaded, plan)
    loaded.use_adapters(plan.loras)
    assert loaded.adapter_switches == 1
    loaded.use_adapters(())
    loaded.use_adapters(())
    assert loaded.adapter_switches == 2


def test_the_model_s_own_adapters_apply_to_every_stage_and_to_derived_pipelines(
    tiny_sd_dir: Path, loras: dict[str, Path]
) -> None:
    model = local_model("styled", tiny_sd_dir, loras=[{"source": str(loras["a"]), "weight": 0.8}])
    loaded = LoadedModel("styled", model.entry)
    assert loaded.adapter_switches == 1  # loaded with the model, before any stage
    np.testing.assert_allclose(
        ours(loaded, stage_plan({"type": "img2img"}, model)),
        direct(tiny_sd_dir, [(loras["a"], 0.8)]),
        atol=ATOL,
    )
    # A stage adds its own: the model's adapter, then the stage's.
    plan = img2img_plan(model, [(loras["b"], 1.0)])
    expected = direct(tiny_sd_dir, [(loras["a"], 0.8), (loras["b"], 1.0)])
    np.testing.assert_allclose(ours(loaded, plan), expected, atol=ATOL, rtol=0)
    # text2img comes from from_pipe, sharing the UNet that the adapters are in.
    text_plan = stage_plan({"type": "text2img"}, model)
    params = ResolvedParams(guidance_scale=7.5, steps=3, size=(32, 32))
    batch = StageBatch(prompts=["a cat"], negative_prompts=[None], seeds=[5])
    generated = run_text2img(loaded, text_plan, params, batch).images
    reference = AutoPipelineForText2Image.from_pipe(direct_pipeline(tiny_sd_dir, [(loras["a"], 0.8)]))
    reference.set_progress_bar_config(disable=True)
    expected_text = reference(
        prompt="a cat",
        guidance_scale=7.5,
        num_inference_steps=3,
        width=32,
        height=32,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).images
    np.testing.assert_allclose(generated, expected_text, atol=ATOL, rtol=0)


def test_an_adapter_that_cannot_load_fails_its_stage_and_leaves_the_model_as_it_was(
    tiny_sd_dir: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    model = local_model("tiny-sd", tiny_sd_dir)
    loaded = LoadedModel("tiny-sd", model.entry)
    wider = tmp_path / "wider.safetensors"
    to_q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file(
        {f"{to_q}.lora_A.weight": torch.ones(4, 128), f"{to_q}.lora_B.weight": torch.ones(128, 4)}, wider
    )
    good = ours(loaded, img2img_plan(model, [(loras["a"], 0.7)]))
    for bad in (wider, tmp_path / "missing.safetensors"):
        with pytest.raises(StageError, match=f"model tiny-sd: cannot load LoRA {bad}: "):
            ours(loaded, img2img_plan(model, [(loras["a"], 0.7), (bad, 1.0)]))
    np.testing.assert_array_equal(ours(loaded, img2img_plan(model, [(loras["a"], 0.7)])), good)
    np.testing.assert_allclose(
        ours(loaded, img2img_plan(model, [])), direct(tiny_sd_dir, []), atol=ATOL, rtol=0
    )


def test_models_that_cannot_switch_adapters_say_so(
    tiny_sd_dir: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    lora = LoraRef(source=str(loras["a"]))
    x2_folder = write_tiny_sd_x2_latent_upscaler(tmp_path / "x2", vae_from=tiny_sd_dir)
    x2 = LoadedModel("x2", local_model("x2", x2_folder).entry)
    with pytest.raises(StageError, match=r"model x2 \(StableDiffusionLatentUpscalePipeline\) takes no LoRA"):
        x2.use_adapters((lora,))
    x2.use_adapters(())  # no adapters is always fine
    fused = LoadedModel("fused", local_model("fused", tiny_sd_dir, fuse_qkv=True).entry)
    with pytest.raises(StageError, match="model fused has fuse_qkv"):
        fused.use_adapters((lora,))


def test_the_switch_benchmark_runs() -> None:
    """bench/lora_switch.py, at its smallest: what it reports is there."""
    done = subprocess.run(
        [sys.executable, "bench/lora_switch.py", "--repeats", "2", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["adapted_layers"] for row in report["rows"]] == [32, 128]  # SD 1.5's 16 blocks x 2 x 4
    assert all(set(row["switch_ms"]) == {"none -> A", "A -> A+B", "A+B -> none"} for row in report["rows"])

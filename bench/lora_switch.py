"""What a LoRA adapter switch costs a worker, on the CPU, against a pipeline call.

A worker keeps its model resident and switches between adapter sets per chunk (LoadedModel.use_adapters:
set_adapters, or disable_lora for none); each adapter is loaded once, on first use. This measures,
through the worker's own code on random-weight models:

- load: an adapter's first use (load_lora_weights), once per adapter per worker;
- switch: from one set to another (one adapter, two adapters, none), the median of --repeats;
- same set: asking for the set already active (what a chunk of the same set as the last one pays);
- call: one img2img pipeline call (--steps steps at --size, batch 1), with and without an adapter.

Two UNet layouts: `tiny` (the test fixtures' tiny-sd) and `sd15`, Stable Diffusion 1.5's block layout
(four levels, two resnets and transformer blocks per level, 16 transformer blocks) at a small width.
set_adapters walks the UNet's modules and sets each adapted layer's scale, so its cost follows the
number of modules and adapted layers, which `sd15` has as SD 1.5 has them, not their width; the
pipeline call of either says nothing of a real one (seconds per image on a GPU).

    python bench/lora_switch.py [--repeats 30] [--steps 4] [--size 32] [--threads 1]

Prints a markdown table, and one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import StableDiffusionImg2ImgPipeline, UNet2DConditionModel  # noqa: E402

from schemas.job import ResolvedParams  # noqa: E402
from schemas.messages import StagePlan  # noqa: E402
from schemas.registry import LoraRef, ModelEntry, ResolvedModel  # noqa: E402
from workers.models import LoadedModel  # noqa: E402
from workers.stages.common import StageBatch  # noqa: E402
from workers.stages.img2img import run_img2img  # noqa: E402
from workers.tiny_models import (  # noqa: E402
    TEXT_DIM,
    scratch_clip_tokenizer,
    sd_scheduler,
    tiny_clip_text_encoder,
    tiny_sd_vae,
    write_tiny_lora,
    write_tiny_sd,
)


def sd15_layout_unet() -> UNet2DConditionModel:
    """SD 1.5's UNet layout (its block types, two layers per block, 8 heads) at a width of 32 to 64."""
    return UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
    )


def write_model(folder: Path, layout: str) -> Path:
    if layout == "tiny":
        return write_tiny_sd(folder)
    torch.manual_seed(0)
    tokenizer = scratch_clip_tokenizer()
    StableDiffusionImg2ImgPipeline(
        vae=tiny_sd_vae(),
        text_encoder=tiny_clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=sd15_layout_unet(),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def measure(layout: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    model_folder = write_model(folder / layout, layout)
    first = LoraRef(source=str(write_tiny_lora(folder / f"{layout}-a", model_folder, seed=1)), weight=0.8)
    second = LoraRef(source=str(write_tiny_lora(folder / f"{layout}-b", model_folder, seed=2)), weight=0.5)
    resolved = ResolvedModel(name=layout, entry=ModelEntry(source=str(model_folder), dtype="float32"))
    model = LoadedModel(layout, resolved.entry)
    load_s = [timed(lambda: model.use_adapters((first,))), timed(lambda: model.use_adapters((first, second)))]
    adapted = sum(1 for module in model.pipeline.unet.modules() if hasattr(module, "lora_A"))
    # In turn: none -> A, A -> A + B, A + B -> none (each switch is from the set before it).
    sets = {"none -> A": (first,), "A -> A+B": (first, second), "A+B -> none": ()}
    switches: dict[str, list[float]] = {name: [] for name in sets}
    model.use_adapters(())
    for _ in range(args.repeats):
        for name, chosen in sets.items():
            switches[name].append(timed(functools.partial(model.use_adapters, chosen)))
    same = [timed(lambda: model.use_adapters(())) for _ in range(args.repeats)]

    size = (args.size, args.size)
    params = ResolvedParams(strength=0.75, guidance_scale=7.5, steps=args.steps, size=size)
    image = Image.fromarray((np.random.default_rng(0).random((*size, 3)) * 255).astype("uint8"))
    batch = StageBatch(prompts=["a cat"], negative_prompts=[None], seeds=[1], images=[image])

    def call(loras: tuple[LoraRef, ...]) -> float:
        plan = StagePlan.model_validate(
            {
                "index": 0,
                "name": "s0-img2img",
                "spec": {"type": "img2img", "model": layout, "loras": [lora.model_dump() for lora in loras]},
                "model": resolved,
                "handover": "none",
                "save": ("image",),
            }
        )
        model.use_adapters(plan.loras)  # switched outside the timing: the call alone
        return timed(lambda: run_img2img(model, plan, params, batch))

    call(())  # warm-up
    plain = [call(()) for _ in range(max(3, args.repeats // 6))]
    with_adapter = [call((first,)) for _ in range(max(3, args.repeats // 6))]
    return {
        "layout": layout,
        "unet_modules": sum(1 for _ in model.pipeline.unet.modules()),
        "adapted_layers": adapted,
        "load_ms": [round(seconds * 1000, 1) for seconds in load_s],
        "switch_ms": {name: median_ms(samples) for name, samples in switches.items()},
        "same_set_us": round(statistics.median(same) * 1e6, 2),
        "call_ms": {"no adapter": median_ms(plain), "one adapter": median_ms(with_adapter)},
        "call": f"img2img batch 1, {args.size}x{args.size}, {args.steps} steps x strength 0.75",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="imgjobs-lora-bench-") as scratch:
        rows = [measure(layout, Path(scratch), args) for layout in ("tiny", "sd15")]
    print(
        "| layout | UNet modules | adapted layers | first loads, A / B (ms) | switch none->A / A->A+B / "
        "A+B->none (ms) | same set (µs) | call, no adapter / A (ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        switch, calls = row["switch_ms"], row["call_ms"]
        print(
            f"| {row['layout']} | {row['unet_modules']} | {row['adapted_layers']} | "
            f"{' / '.join(str(ms) for ms in row['load_ms'])} | "
            f"{' / '.join(str(ms) for ms in switch.values())} | {row['same_set_us']} | "
            f"{calls['no adapter']} / {calls['one adapter']} |"
        )
    print(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()

"""A one-minute device check of the GPU-only paths of README's "Feeding the GPU", which a CPU never
runs: pinned uint8 inputs copied without blocking and looked up on the device, one encode of the
batch, outputs copied back without blocking behind an event, and the UNet clock's CUDA events.

On tiny random-weight models in fp32, for SD 1.x img2img, ControlNet img2img, the SDXL refiner and SD
text2img, it compares each stage's batched output, read after the writer's wait(), with diffusers
called for each item alone on the same device. GPU kernels are not batch-invariant either (and cuDNN
may use TF32 for fp32 convolutions), so the comparison is at --atol. Exact checks: the lookup against
diffusers' preprocessing on the device, the non-blocking copy against a blocking one.

    python bench/gpu_feeding_check.py [--device cuda] [--atol 2e-3]

Prints one line per check and, last, one JSON object; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas.job import ResolvedParams  # noqa: E402
from schemas.messages import StagePlan  # noqa: E402
from schemas.registry import ModelEntry, ResolvedModel  # noqa: E402
from workers.imageio import image_tensor  # noqa: E402
from workers.models import LoadedModel  # noqa: E402
from workers.stages.common import StageBatch, to_host  # noqa: E402
from workers.stages.img2img import run_img2img  # noqa: E402
from workers.stages.inputs import device_images  # noqa: E402
from workers.stages.text2img import run_text2img  # noqa: E402
from workers.tiny_models import write_tiny_controlnet_depth, write_tiny_sd, write_tiny_sdxl_refiner  # noqa: E402
from workers.unet_clock import UnetClock  # noqa: E402

PROMPTS = ["a cat wizard", "astronaut in a jungle", ""]
NEGATIVES: list[str | None] = ["ugly", None, "blurry"]
SEEDS = [7, 123, 2**40]
PARAMS = ResolvedParams(strength=0.75, guidance_scale=7.5, steps=6, size=(32, 32))


def images(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in PROMPTS]


def plan(stage: dict[str, Any], model: ResolvedModel, controlnet: ResolvedModel | None = None) -> StagePlan:
    return StagePlan.model_validate(
        {
            "index": 0,
            "name": f"s0-{stage['type']}",
            "spec": {"model": model.name, **stage},
            "model": model,
            "handover": "none",
            "save": ("image",),
            "controlnet": controlnet,
        }
    )


class Checks:
    def __init__(self, device: str, atol: float) -> None:
        self.device, self.atol = device, atol
        self.results: dict[str, Any] = {}

    def record(self, name: str, passed: bool, **details: Any) -> None:
        self.results[name] = {"passed": passed, **details}
        print(json.dumps({"check": name, "passed": passed, **details}), flush=True)

    def exact_paths(self) -> None:
        batch = images(0)
        pinned = self.device.startswith("cuda")
        pixels = [image_tensor(image, pinned=pinned) for image in batch]
        looked_up = device_images(pixels, torch.device(self.device), torch.float32, normalize=True)
        expected = VaeImageProcessor(vae_scale_factor=8).preprocess(batch).to(self.device)
        self.record("lookup_equals_preprocess", torch.equal(looked_up, expected), pinned=pinned)
        images_on_device = torch.rand(3, 3, 64, 64, device=self.device)
        latents_on_device = torch.randn(3, 4, 8, 8, device=self.device)
        output = to_host(images_on_device, latents_on_device, None)
        waited = output.copying is not None
        output = output.wait()
        assert output.images is not None and output.latents is not None
        same = np.array_equal(output.images, images_on_device.cpu().permute(0, 2, 3, 1).numpy()) and bool(
            torch.equal(output.latents, latents_on_device.cpu())
        )
        self.record("non_blocking_copy_equals_blocking", same, had_event=waited)

    def stage(self, name: str, ours: Any, direct: Any) -> None:
        assert ours.images is not None
        worst = max(float(np.abs(ours.images[i] - direct(i)).max()) for i in range(len(PROMPTS)))
        self.record(name, worst <= self.atol, max_abs_diff=worst)

    def families(self, folder: Path) -> None:
        sd_dir, sdxl_dir = write_tiny_sd(folder / "sd"), write_tiny_sdxl_refiner(folder / "sdxl")
        control_dir = write_tiny_controlnet_depth(folder / "controlnet")
        entry = {"dtype": "float32", "device": self.device}
        sd = ResolvedModel(name="tiny-sd", entry=ModelEntry.model_validate({"source": str(sd_dir), **entry}))
        sdxl = ResolvedModel(
            name="tiny-sdxl", entry=ModelEntry.model_validate({"source": str(sdxl_dir), **entry})
        )
        control = ResolvedModel(
            name="tiny-controlnet", entry=ModelEntry.model_validate({"source": str(control_dir), **entry})
        )
        inputs, controls = images(1), images(2)

        def seeded(index: int) -> torch.Generator:
            return torch.Generator().manual_seed(SEEDS[index])

        def batch(**extra: Any) -> StageBatch:
            return StageBatch(prompts=PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, **extra)

        common = {"strength": 0.75, "guidance_scale": 7.5, "num_inference_steps": 6, "output_type": "np"}
        model = LoadedModel(sd.name, sd.entry)
        with UnetClock(model.pipeline, cuda=self.device.startswith("cuda")) as clock:
            ours = run_img2img(
                model,
                plan({"type": "img2img"}, sd),
                PARAMS,
                batch(images=inputs),
            ).wait()
        self.record(
            "unet_clock", clock.calls > 0 and clock.seconds() > 0, calls=clock.calls, s=clock.seconds()
        )
        direct = StableDiffusionImg2ImgPipeline.from_pretrained(sd_dir).to(self.device)
        direct.set_progress_bar_config(disable=True)
        self.stage(
            "sd_img2img",
            ours,
            lambda i: direct(
                prompt=PROMPTS[i],
                negative_prompt=NEGATIVES[i],
                image=inputs[i],
                generator=seeded(i),
                **common,
            ).images[0],
        )
        ours = run_img2img(
            model,
            plan(
                {"type": "img2img", "controlnet": control.name, "controlnet_conditioning_scale": 0.7},
                sd,
                control,
            ),
            PARAMS,
            batch(images=inputs, control_images=controls),
        ).wait()
        controlnet = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
            sd_dir, controlnet=ControlNetModel.from_pretrained(control_dir)
        ).to(self.device)
        controlnet.set_progress_bar_config(disable=True)
        self.stage(
            "controlnet_img2img",
            ours,
            lambda i: controlnet(
                prompt=PROMPTS[i],
                negative_prompt=NEGATIVES[i],
                image=inputs[i],
                control_image=controls[i],
                controlnet_conditioning_scale=0.7,
                generator=seeded(i),
                **common,
            ).images[0],
        )
        text = ResolvedParams(guidance_scale=7.5, steps=6, size=(32, 32))
        ours = run_text2img(model, plan({"type": "text2img"}, sd), text, batch()).wait()
        text2img = StableDiffusionPipeline.from_pretrained(sd_dir).to(self.device)
        text2img.set_progress_bar_config(disable=True)
        self.stage(
            "sd_text2img",
            ours,
            lambda i: text2img(
                prompt=PROMPTS[i],
                negative_prompt=NEGATIVES[i],
                width=32,
                height=32,
                guidance_scale=7.5,
                num_inference_steps=6,
                generator=seeded(i),
                output_type="np",
            ).images[0],
        )
        refiner = LoadedModel(sdxl.name, sdxl.entry)
        ours = run_img2img(
            refiner,
            plan({"type": "img2img"}, sdxl),
            PARAMS,
            batch(images=inputs),
        ).wait()
        direct_xl = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_dir).to(self.device)
        direct_xl.set_progress_bar_config(disable=True)
        self.stage(
            "sdxl_refiner_img2img",
            ours,
            lambda i: direct_xl(
                prompt=PROMPTS[i],
                negative_prompt=NEGATIVES[i],
                image=inputs[i],
                generator=seeded(i),
                **common,
            ).images[0],
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--atol", type=float, default=2e-3)
    args = parser.parse_args()
    started = time.perf_counter()
    checks = Checks(args.device, args.atol)
    checks.exact_paths()
    with tempfile.TemporaryDirectory(prefix="imgjobs-feeding-") as folder:
        checks.families(Path(folder))
    passed = all(result["passed"] for result in checks.results.values())
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(json.dumps({"passed": passed, "device": device, "s": round(time.perf_counter() - started, 1)}))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()

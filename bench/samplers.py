"""What a sampler or a few-step preset costs an image, against the 50-step default, on the CPU.

Runs one img2img (strength 0.8) and one text2img stage call per configuration through the worker's
own code (LoadedModel, run_img2img / run_text2img) on the tiny random-weight SD model, whose own
scheduler is made PNDM with Stable Diffusion 1.5's config, as SD 1.5 ships it. For each: the UNet
evaluations an image (counted at the UNet, and checked against what the results row records) and
the wall time an image (median of --repeats calls of --batch items), each as a ratio to the
default: the checkpoint's own scheduler at 50 steps and guidance 7.5.

Presets take their LoRA as a tiny random one (the published ones are on the hub; an adapter's cost
does not depend on its weights). Wall time follows the evaluations, but for what a call spends once
an image (the text encoder, the VAE, the adapter's layers), which shows at one or two evaluations.

    python bench/samplers.py [--repeats 5] [--batch 4] [--size 64] [--threads 1]

Prints a markdown table per mode, and one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import PNDMScheduler  # noqa: E402

from schemas.job import Defaults, Item, resolve_params  # noqa: E402
from schemas.messages import StagePlan  # noqa: E402
from schemas.registry import ModelEntry, ResolvedModel  # noqa: E402
from workers.models import LoadedModel  # noqa: E402
from workers.stages.common import StageBatch  # noqa: E402
from workers.stages.img2img import run_img2img  # noqa: E402
from workers.stages.text2img import run_text2img  # noqa: E402
from workers.tiny_models import sd_img2img_pipeline, tiny_sd_vae, write_tiny_lora  # noqa: E402

MODEL = "tiny-sd-pndm"
STRENGTH = 0.8
# (label, the stage's own fields); presets take the bench's LoRA.
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("default: the checkpoint's own (pndm), 50 steps", {}),
    ("DPM++ 2M Karras, 20 steps", {"sampler": "DPM++ 2M Karras", "steps": 20}),
    ("preset lcm", {"preset": "lcm"}),
    ("preset tcd", {"preset": "tcd"}),
    ("preset hyper-2", {"preset": "hyper-2"}),
    ("preset hyper-4", {"preset": "hyper-4"}),
    ("preset hyper-8", {"preset": "hyper-8"}),
    ("preset turbo", {"preset": "turbo"}),
]


def write_model(folder: Path) -> Path:
    """tiny-sd with Stable Diffusion 1.5's own scheduler: PLMS (PNDM without its Runge-Kutta steps)."""
    torch.manual_seed(0)
    pipeline = sd_img2img_pipeline(tiny_sd_vae())
    pipeline.scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline.save_pretrained(folder)
    return folder


class Rows:
    """The rows the UNet evaluates while the block runs."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.count = 0

    def __enter__(self) -> Rows:
        def count(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.count += (args[0] if args else kwargs["sample"]).shape[0]

        self.handle = self.unet.register_forward_pre_hook(count, with_kwargs=True)
        return self

    def __exit__(self, *_: object) -> None:
        self.handle.remove()


def measure(
    model: LoadedModel,
    resolved: ResolvedModel,
    lora: Path,
    mode: str,
    fields: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": mode, "model": MODEL, **fields}
    if "preset" in fields:
        spec |= {
            "preset_lora": False,
            "loras": [] if fields["preset"] == "turbo" else [{"source": str(lora)}],
        }
    if mode == "img2img":
        spec["strength"] = STRENGTH
    plan = StagePlan.model_validate(
        {
            "index": 0,
            "name": f"s0-{mode}",
            "spec": spec,
            "model": resolved,
            "handover": "none",
            "save": ("image",),
        }
    )
    params = resolve_params(Item(id="bench"), plan.spec, Defaults(size=(args.size, args.size)))
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray((rng.random((args.size, args.size, 3)) * 255).astype("uint8"))
        for _ in range(args.batch)
    ]
    batch = StageBatch(
        prompts=["astronaut in a jungle"] * args.batch,
        negative_prompts=[None] * args.batch,
        seeds=list(range(args.batch)),
        images=images if mode == "img2img" else None,
    )
    run = run_img2img if mode == "img2img" else run_text2img

    def call() -> float:
        started = time.perf_counter()
        run(model, plan, params, batch)
        return time.perf_counter() - started

    call()  # loads the adapter, builds the scheduler
    with Rows(model.pipeline.unet) as rows:
        seconds = [call() for _ in range(args.repeats)]
    evaluations = rows.count / (args.repeats * args.batch)
    recorded = model.ran(params)
    assert evaluations == recorded.unet_evaluations, (mode, fields, evaluations, recorded)
    return {
        "sampler": f"{recorded.sampler}{f' {recorded.schedule}' if recorded.schedule else ''}",
        "steps": params.steps,
        "steps_run": recorded.steps_run,
        "guidance_scale": params.guidance_scale,
        "unet_evaluations": recorded.unet_evaluations,
        "ms_per_image": round(statistics.median(seconds) / args.batch * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="imgjobs-sampler-bench-") as scratch:
        folder = write_model(Path(scratch) / MODEL)
        lora = write_tiny_lora(Path(scratch) / "lora", folder, seed=3)
        resolved = ResolvedModel(name=MODEL, entry=ModelEntry(source=str(folder), dtype="float32"))
        model = LoadedModel(MODEL, resolved.entry)
        for mode in ("img2img", "text2img"):
            rows = results[mode] = []
            for label, fields in CONFIGS:
                rows.append({"config": label, **measure(model, resolved, lora, mode, fields, args)})
            default = rows[0]
            for row in rows:
                row["evaluations_ratio"] = round(row["unet_evaluations"] / default["unet_evaluations"], 3)
                row["time_ratio"] = round(row["ms_per_image"] / default["ms_per_image"], 3)
    for mode, rows in results.items():
        what = f"img2img, strength {STRENGTH}" if mode == "img2img" else "text2img"
        print(f"\n{what}, {args.size}x{args.size}, batch {args.batch}, {args.threads} thread(s)\n")
        print(
            "| configuration | sampler | steps (run) | guidance | UNet evaluations an image | vs default | "
            "ms an image | vs default |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(
                f"| {row['config']} | {row['sampler']} | {row['steps']} ({row['steps_run']}) | "
                f"{row['guidance_scale']:g} | {row['unet_evaluations']} | {row['evaluations_ratio']:.2f} | "
                f"{row['ms_per_image']} | {row['time_ratio']:.2f} |"
            )
    print(
        json.dumps(
            {
                "threads": args.threads,
                "size": args.size,
                "batch": args.batch,
                "torch": torch.__version__,
                **results,
            }
        )
    )


if __name__ == "__main__":
    main()

"""`imgjobs demo`: self-contained jobs on tiny random-weight models, runnable without a hub or GPU.

It writes every family of the diffusers image-to-image guide as a tiny checkpoint, a models.yaml
naming them, sample inputs, the main job (job.yaml: an img2img -> style img2img chain with latent
handover) and one job per guide example under examples/. Run as `python -m workers.demo DIR`; the
CLI calls it that way so the producer never imports torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from workers.tiny_models import write_all_tiny_models, write_tiny_lora

DEMO_ITEMS = 12
DEMO_SIZE = 64
DEMO_LORA = "loras/tiny-lcm-lora"  # stands in for LCM-LoRA in the few-step example
PROMPTS = ["astronaut in a jungle, cold color palette", "a cat wizard, detailed", "a red fox in snow, 8k"]

# VAE families: models that share one can hand latents to each other.
MODELS = {
    "tiny-sd": ("tiny-sd", "SD 1.x layout"),
    "tiny-sd-style": ("tiny-sd", "SD 1.x style model sharing tiny-sd's VAE ('charliebo artstyle')"),
    "tiny-sdxl-refiner": ("tiny-sdxl", "SDXL refiner layout"),
    "tiny-kandinsky22": ("tiny-movq", "Kandinsky 2.2 prior + decoder"),
    "tiny-sd-x2-latent-upscaler": ("tiny-sd", "x2 latent upscaler on tiny-sd's latent space"),
    "tiny-sd-x4-upscaler": ("tiny-x4", "x4 upscaler"),
    "tiny-controlnet-depth": (None, "ControlNet (depth) for tiny-sd"),
    "tiny-depth-estimator": (None, "transformers depth estimation, for control: depth"),
    "tiny-clip": (None, "CLIP (text and image towers), for a stage's score:"),
}

EXAMPLES: dict[str, dict[str, Any]] = {
    "sd15-img2img": {"stages": [{"type": "img2img", "model": "tiny-sd", "strength": 0.8, "steps": 8}]},
    "sdxl-refiner-img2img": {
        "stages": [
            {
                "type": "img2img",
                "model": "tiny-sdxl-refiner",
                "strength": 0.5,
                "steps": 8,
                "aesthetic_score": 6.0,
            }
        ]
    },
    "kandinsky22-img2img": {
        "stages": [{"type": "img2img", "model": "tiny-kandinsky22", "strength": 0.8, "steps": 8}]
    },
    "text-image-image": {
        "items": "items-text.jsonl",
        "stages": [
            {"type": "text2img", "model": "tiny-sd", "steps": 8, "save": ["image"]},
            {"type": "img2img", "model": "tiny-kandinsky22", "strength": 0.6, "steps": 8},
        ],
    },
    "image-image-image": {
        "stages": [
            {"type": "img2img", "model": "tiny-sd", "steps": 8, "save": ["latent"]},
            {
                "type": "img2img",
                "model": "tiny-sd-style",
                "prompt_template": "{prompt}, charliebo artstyle",
                "steps": 8,
                "save": ["image"],
            },
            {"type": "img2img", "model": "tiny-sd", "prompt_template": "{prompt}, pixelartstyle", "steps": 8},
        ]
    },
    "upscale-x2-x4": {
        "defaults": {"size": [32, 32]},
        "stages": [
            {"type": "img2img", "model": "tiny-sd", "steps": 8},
            {
                "type": "upscale",
                "model": "tiny-sd-x2-latent-upscaler",
                "steps": 4,
                "guidance_scale": 0.0,
                "save": ["image"],
            },
            {"type": "upscale", "model": "tiny-sd-x4-upscaler", "steps": 4, "noise_level": 20},
        ],
    },
    "controlnet-depth-then-style": {
        "stages": [
            {
                "type": "img2img",
                "model": "tiny-sd",
                "controlnet": "tiny-controlnet-depth",
                "control": "depth",
                "depth_model": "tiny-depth-estimator",
                "controlnet_conditioning_scale": 0.8,
                "steps": 8,
                "save": ["image"],
            },
            {
                "type": "img2img",
                "model": "tiny-sd-style",
                "prompt_template": "{prompt}, charliebo artstyle",
                "steps": 8,
            },
        ]
    },
    "compel-weighted": {
        "items": "items-compel.jsonl",
        "stages": [{"type": "img2img", "model": "tiny-sd", "prompt_syntax": "compel", "steps": 8}],
    },
    # Samplers and few-step presets (README): DPM++ 2M Karras at 20 steps, the usual stand-in for 50
    # of the checkpoint's own; and LCM in 4 steps without guidance. LCM-LoRA itself is on the hub: the
    # demo's stand-in is a tiny random LoRA for tiny-sd, given as the preset's adapter.
    "fast-sampler": {
        "stages": [{"type": "img2img", "model": "tiny-sd", "sampler": "DPM++ 2M Karras", "steps": 20}]
    },
    "few-step-lcm": {
        "stages": [
            {
                "type": "img2img",
                "model": "tiny-sd",
                "preset": "lcm",
                "preset_lora": {"source": f"../{DEMO_LORA}"},
            }
        ]
    },
    # Each output scored on the worker that made it; one below the CLIP-score gate runs again with its
    # next seeds, at most twice, and the best is kept (flagged if none passes). The report shows the
    # scores' histograms, the lowest first and the near-duplicates.
    "scored-and-gated": {
        "items": "items-scored.jsonl",
        "stages": [
            {
                "type": "img2img",
                "model": "tiny-sd",
                "strength": 0.8,
                "steps": 8,
                "score": {"model": "tiny-clip", "min_clip_score": 15, "on_low_score": {"reroll": 2}},
            }
        ],
    },
}


def sample_image(index: int, size: int) -> Image.Image:
    """A gradient with a few shapes, different for each index."""
    image = Image.new("RGB", (size, size))
    pixels = [
        ((x * 4 + index * 20) % 256, (y * 4) % 256, (index * 37) % 256)
        for y in range(size)
        for x in range(size)
    ]
    image.putdata(pixels)
    draw = ImageDraw.Draw(image)
    offset = (index * 7) % (size // 2)
    draw.ellipse((offset, offset, offset + size // 3, offset + size // 3), fill=(240, 240, 240))
    draw.rectangle((size - offset - size // 4, offset, size - offset, offset + size // 4), fill=(20, 20, 20))
    return image


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _job(name: str, items: str, stages: list[dict[str, object]], defaults: dict[str, object]) -> str:
    spec = {
        "version": 1,
        "name": name,
        "output": "out",
        "items": items,
        "defaults": defaults,
        "stages": stages,
    }
    return json.dumps(spec, indent=2) + "\n"


def write_demo(folder: Path) -> Path:
    """Writes models/, loras/, models.yaml, inputs/, items files, job.yaml and examples/*.json; returns
    job.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    models = folder / "models"
    if not all((models / name).is_dir() for name in MODELS):
        write_all_tiny_models(models)
    if not (folder / DEMO_LORA).is_dir():
        write_tiny_lora(folder / DEMO_LORA, models / "tiny-sd", seed=3)
    registry = ["models:"]
    for name, (family, description) in MODELS.items():
        registry += [f"  {name}:", f"    source: models/{name}", "    dtype: float32"]
        registry += [f"    vae_family: {family}"] if family else []
        registry += [f"    description: {json.dumps(description)}"]
    (folder / "models.yaml").write_text("\n".join(registry) + "\n", encoding="utf-8")

    inputs = folder / "inputs"
    inputs.mkdir(exist_ok=True)
    rows: list[dict[str, object]] = []
    for index in range(DEMO_ITEMS):
        name = f"{index:04d}"
        sample_image(index, DEMO_SIZE).save(inputs / f"{name}.png")
        rows.append(
            {
                "id": name,
                "image": f"inputs/{name}.png",
                "prompt": PROMPTS[index % len(PROMPTS)],
                "seed": index,
            }
        )
    _write_jsonl(folder / "items.jsonl", rows)
    _write_jsonl(
        folder / "items-text.jsonl", [{k: v for k, v in row.items() if k != "image"} for row in rows[:4]]
    )
    _write_jsonl(
        folder / "items-compel.jsonl",
        [
            {**rows[0], "prompt": "a (cat)1.3 wizard, jungle--"},
            {**rows[1], "prompt": "astronaut in a (jungle)0.8, (cold color palette)1.2"},
        ],
    )

    # The items again, with two repeated under other ids: their outputs are alike, and the report's
    # near-duplicate groups find them.
    _write_jsonl(
        folder / "items-scored.jsonl",
        [*rows, {**rows[0], "id": "0000-again"}, {**rows[5], "id": "0005-again"}],
    )

    defaults = {"negative_prompt": "ugly, blurry", "size": [DEMO_SIZE, DEMO_SIZE]}
    examples = folder / "examples"
    examples.mkdir(exist_ok=True)
    for name, example in EXAMPLES.items():
        items = f"../{example.get('items', 'items.jsonl')}"
        merged_defaults = {**defaults, **example.get("defaults", {})}
        (examples / f"{name}.json").write_text(_job(name, items, example["stages"], merged_defaults))

    job = folder / "job.yaml"
    job.write_text(
        "version: 1\n"
        "name: demo-restyle\n"
        "output: out\n"
        "items: items.jsonl\n"
        f"defaults: {{negative_prompt: 'ugly, blurry', size: [{DEMO_SIZE}, {DEMO_SIZE}]}}\n"
        "stages:\n"
        "  - {type: img2img, model: tiny-sd, strength: 0.75, guidance_scale: 7.5, steps: 8, save: [image]}\n"
        "  - {type: img2img, model: tiny-sd-style, prompt_template: '{prompt}, charliebo artstyle',\n"
        "     strength: 0.5, steps: 8}\n",
        encoding="utf-8",
    )
    return job


if __name__ == "__main__":
    print(write_demo(Path(sys.argv[1])))

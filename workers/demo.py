"""`imgjobs demo`: a self-contained job on tiny random-weight models, runnable without a hub or GPU.

Run as `python -m workers.demo DIR`; the CLI calls it that way so the producer never imports torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from workers.tiny_models import write_tiny_sd

DEMO_ITEMS = 12
DEMO_SIZE = 64
PROMPTS = ["astronaut in a jungle, cold color palette", "a cat wizard, detailed", "a red fox in snow, 8k"]


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


def write_demo(folder: Path) -> Path:
    """Writes models/tiny-sd, inputs/*.png, items.jsonl, models.yaml and job.yaml; returns job.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    models = folder / "models"
    if not (models / "tiny-sd" / "model_index.json").is_file():
        write_tiny_sd(models / "tiny-sd")
    inputs = folder / "inputs"
    inputs.mkdir(exist_ok=True)
    with (folder / "items.jsonl").open("w", encoding="utf-8") as items:
        for index in range(DEMO_ITEMS):
            name = f"{index:04d}"
            sample_image(index, DEMO_SIZE).save(inputs / f"{name}.png")
            row = {
                "id": name,
                "image": f"inputs/{name}.png",
                "prompt": PROMPTS[index % len(PROMPTS)],
                "seed": index,
            }
            items.write(json.dumps(row) + "\n")
    (folder / "models.yaml").write_text(
        "models:\n"
        "  tiny-sd:\n"
        "    source: models/tiny-sd\n"
        "    dtype: float32\n"
        "    vae_family: tiny-sd\n"
        "    description: tiny random-weight SD 1.x layout (demo and tests)\n",
        encoding="utf-8",
    )
    job = folder / "job.yaml"
    job.write_text(
        "version: 1\n"
        "name: demo-restyle\n"
        "output: out\n"
        "items: items.jsonl\n"
        f"defaults: {{negative_prompt: 'ugly, blurry', size: [{DEMO_SIZE}, {DEMO_SIZE}]}}\n"
        "stages:\n"
        "  - {type: img2img, model: tiny-sd, strength: 0.75, guidance_scale: 7.5, steps: 8}\n",
        encoding="utf-8",
    )
    return job


if __name__ == "__main__":
    print(write_demo(Path(sys.argv[1])))

"""Host work to turn a batch of decoded images into the pipeline's input tensor, two ways side by side
in one run, on the CPU: on the thread that drives the GPU (`before`, diffusers' way) and off it
(`after`, the worker engine's way).

  before: diffusers' own preprocessing, VaeImageProcessor.preprocess on the PIL images (PIL to numpy,
          float32, channels first, [-1, 1]), on the pipeline's thread, while the GPU waits for it;
  after:  workers.imageio.image_tensor on each image (the uint8 tensor, on the I/O threads, which
          run while the GPU works; summed here as one thread would do it), then
          workers.stages.inputs.device_images (a copy and a table lookup: on a GPU, kernels, launched
          in microseconds; here on the CPU, timed as what the CPU does in their place).

Both give the same tensor, bit for bit (checked). Model time is not part of it: the VAE's encode of the
batch is GPU work either way (one encode of the batch instead of one per item; bench/gpu_throughput.py
measures the whole call on a GPU).

    python bench/host_prep.py [--batch 16] [--sizes 32,512] [--repeats 15]

Prints a markdown table, then one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.imageio import image_tensor  # noqa: E402
from workers.stages.inputs import device_images  # noqa: E402


def photo(size: int, seed: int) -> Image.Image:
    """A smooth gradient with noise, as bench/gpu_throughput.py's inputs."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    base = np.stack(
        [ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 128.0)], -1
    )
    return Image.fromarray(np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype("uint8"))


def median_s(work: Callable[[], Any], repeats: int) -> float:
    work()  # allocations, caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(size: int, batch: int, repeats: int) -> dict[str, Any]:
    images = [photo(size, seed) for seed in range(batch)]
    processor = VaeImageProcessor(vae_scale_factor=8)  # Stable Diffusion img2img's
    cpu = torch.device("cpu")
    pixels = [image_tensor(image) for image in images]
    same = torch.equal(
        processor.preprocess(images), device_images(pixels, cpu, torch.float32, normalize=True)
    )
    before = median_s(lambda: processor.preprocess(images), repeats)
    io_threads = median_s(lambda: [image_tensor(image) for image in images], repeats)
    lookup = median_s(lambda: device_images(pixels, cpu, torch.float32, normalize=True), repeats)
    return {
        "size": size,
        "batch": batch,
        "before_main_thread_ms": round(1000 * before, 3),
        "after_io_threads_ms": round(1000 * io_threads, 3),
        "after_lookup_on_cpu_ms": round(1000 * lookup, 3),
        "main_thread_ratio_if_lookup_on_cpu": round(before / lookup, 2),
        "same_tensor": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sizes", default="32,512")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: its own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(int(size), args.batch, args.repeats) for size in args.sizes.split(",")]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[column]) for column in columns) + " |")
    print(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}), flush=True)


if __name__ == "__main__":
    main()

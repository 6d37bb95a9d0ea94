"""What scoring an output costs (a stage's `score:`), against what the stage that made it costs.

Scoring, per call of --batch items, is what the engine runs after the call, on the thread that
waits for the accelerator (ScoreGate.apply with nothing to re-roll): ClipScorer.targets (the
prompts' and the inputs' embeddings) and ClipScorer.scores (the outputs made 8-bit and prepared,
their embeddings, the CLIP score and the input similarity), through workers/scoring.py, the workers'
own code; `ratio` compares it with the stage. Done beside the call, on I/O threads, and timed apart:
the inputs' preparation (as they are read) and the outputs' dHash (as they are written);
`ratio_with_io_thread_work` counts them too. Re-rolls are not scoring: each is one more call of the
stage for the items below the gate.

--shapes tiny (default): the test fixtures' tiny SD and tiny CLIP, an img2img call at --batch items
  of --size pixels through the workers' run_img2img, and scoring of its outputs. On the CPU, in
  seconds; their ratio says little of real models, whose costs are in other proportions.
--shapes real: Stable Diffusion 1.5's and CLIP ViT-L/14's architectures (random weights: nothing
  to download; the compute is the real checkpoints') at 512 x 512, 50 steps x strength 0.8, CFG.
  With --full-call (the default on a GPU) the stage is one img2img pipeline call at --batch; without
  (the default on the CPU, where a call takes many minutes) it is composed from one UNet evaluation
  (a CFG pair) times the denoising steps, plus the VAE's encode and decode, each timed at --batch.
  Both sides are also counted in FLOPs (torch's FlopCounterMode), which do not depend on the machine;
  scoring's PIL preprocessing and hashing are CPU work that FLOPs do not see, and are timed apart.

The two sides are measured alternately, --reps times, and the medians compared, so that a machine
whose speed drifts moves both alike. Absolute times only mean something on a GPU.

--end-items N (instead): what scores add to a job's end, which runs on a CPU worker: the report's
first pass over N results lines (about 1 KB each, as a one-stage img2img job writes them) with the
scores gathered and without, side by side, and the near-duplicate groups of their N hashes.

--compile (real shapes on a GPU): the UNet torch.compiled, as the GPU recipe runs it: a faster
stage, so the harder comparison.

--check-torchmetrics (instead): where torchmetrics is installed, each item's CLIP score from the
workers' ClipScorer against torchmetrics' clip_score of that image and prompt alone, on the tiny CLIP.

    python bench/scoring.py [--shapes tiny|real] [--device cpu|cuda] [--batch 8] [--reps 5]
                            [--threads N] [--full-call | --no-full-call] [--compile]
    python bench/scoring.py --end-items 1000000
    python bench/scoring.py --check-torchmetrics

Prints a markdown table, and one JSON object as its last line.
"""

from __future__ import annotations

import argparse
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

from kits.benches import print_measures  # noqa: E402
from kits.real_models import sd15  # noqa: E402
from schemas.job import ResolvedParams  # noqa: E402
from schemas.messages import StagePlan  # noqa: E402
from schemas.registry import ModelEntry, ResolvedModel  # noqa: E402
from workers.models import LoadedModel  # noqa: E402
from workers.scoring import ClipScorer, dhash  # noqa: E402
from workers.stages.common import StageBatch, to_pil  # noqa: E402
from workers.stages.img2img import run_img2img  # noqa: E402
from workers.tiny_models import scratch_clip_tokenizer, write_tiny_clip, write_tiny_sd  # noqa: E402

PROMPT = "astronaut in a jungle, cold color palette, highly detailed, 8k"
NEGATIVE = "ugly, blurry"
REAL_SIZE, REAL_STEPS, REAL_STRENGTH, REAL_GUIDANCE = 512, 50, 0.8, 7.5


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def inputs(count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(count)]


def timed(run: Callable[[], Any], device: str) -> float:
    sync(device)
    started = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - started


def flops(run: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


class Scoring:
    """One call's scoring, as the engine runs it, in its parts: the gate's work on the call's thread
    (__call__), and what I/O threads do beside the call (the inputs' preparation, where they are
    read; the hashes, where the outputs are written)."""

    def __init__(self, scorer: ClipScorer, outputs: np.ndarray, sources: list[Image.Image]) -> None:
        self.scorer = scorer
        self.outputs = outputs  # float in [0, 1], as a pipeline returns them
        self.sources = sources
        self.prompts: list[str | None] = [PROMPT] * len(sources)
        self.inputs: list[torch.Tensor | None] = list(scorer.pixels(sources))

    def __call__(self) -> None:
        """What the call's thread waits for: the prompts' and inputs' embeddings, the outputs'
        preparation and embeddings, the scores (ScoreGate.apply with nothing to re-roll)."""
        self.scorer.scores(list(self.outputs), self.scorer.targets(self.prompts, self.inputs))

    def preprocess(self) -> None:
        """The outputs' preparation alone (CPU work, side by side on a GPU host): part of __call__."""
        self.scorer.pixels(list(self.outputs))

    def prepare_inputs(self) -> None:
        """The inputs' preparation, on the I/O threads as they are read."""
        self.scorer.pixels(self.sources)

    def hashes(self) -> None:
        """The outputs' hashes, on the I/O threads as they are written."""
        for image in self.outputs:
            dhash(to_pil(image))

    def model_work(self) -> None:
        """The CLIP towers alone, on prepared pixels and tokens: what FLOPs count."""
        pixels = self.scorer.pixels([*self.outputs, *self.sources])
        tokens = self.scorer.processor.tokenizer(
            self.prompts, padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        model, device = self.scorer.model, self.scorer.device
        with torch.inference_mode():
            model.get_image_features(pixel_values=pixels.to(device, self.scorer.dtype))
            # Without the padding mask, which the meta device cannot build; it adds no matrix work.
            model.get_text_features(input_ids=tokens["input_ids"].to(device))


# -- tiny: the test fixtures, through the workers' own stage code


def tiny_sides(args: argparse.Namespace, folder: Path) -> tuple[Callable[[], Any], Scoring, dict[str, Any]]:
    sd = write_tiny_sd(folder / "tiny-sd")
    clip = write_tiny_clip(folder / "tiny-clip")
    entry = ModelEntry(source=str(sd), dtype="float32", device=args.device)
    model = LoadedModel("tiny-sd", entry)
    plan = StagePlan.model_validate(
        {
            "index": 0,
            "name": "s0-img2img",
            "spec": {"type": "img2img", "model": "tiny-sd"},
            "model": ResolvedModel(name="tiny-sd", entry=entry),
            "handover": "none",
            "save": ("image",),
        }
    )
    params = ResolvedParams(size=(args.size, args.size), strength=0.8, guidance_scale=7.5, steps=args.steps)
    sources = inputs(args.batch, args.size)
    batch = StageBatch(
        prompts=[PROMPT] * args.batch,
        negative_prompts=[NEGATIVE] * args.batch,
        seeds=list(range(args.batch)),
        images=sources,
    )

    def stage() -> Any:
        return run_img2img(model, plan, params, batch)

    outputs = stage().images
    scorer = ClipScorer.load(str(clip), args.device, torch.float32)
    shape = {
        "stage": f"tiny-sd img2img {args.size}x{args.size}, {args.steps} steps x 0.8",
        "scorer": "tiny-clip",
    }
    return stage, Scoring(scorer, outputs, sources), shape


# -- real: SD 1.5's and CLIP ViT-L/14's architectures, random weights


def clip_vit_l14(device: str, dtype: torch.dtype) -> ClipScorer:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = scratch_clip_tokenizer()  # one token a character: the real BPE needs the hub
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "max_position_embeddings": 77,
            "projection_dim": 768,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "image_size": 224,
            "patch_size": 14,
            "projection_dim": 768,
        },
        projection_dim=768,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).to(device, dtype).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
        ),
        tokenizer=tokenizer,
    )
    return ClipScorer(model, processor, device, dtype)


def sd15_pipeline(device: str, dtype: torch.dtype) -> Any:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        pipeline = sd15(Path(scratch))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device, dtype)


def real_parts(device: str, dtype: torch.dtype, batch: int) -> tuple[dict[str, Callable[[], Any]], Scoring]:
    """SD 1.5's parts at --batch (a UNet evaluation of a CFG pair, VAE encode, decode, a whole call)
    and the scoring of --batch outputs, on `device`: "meta" to count FLOPs without computing."""
    size = REAL_SIZE
    pipeline = sd15_pipeline(device, dtype)
    sources = inputs(batch, size)
    unet, vae = pipeline.unet, pipeline.vae
    latents = torch.randn(2 * batch, 4, size // 8, size // 8, device=device, dtype=dtype)
    context = torch.randn(2 * batch, 77, 768, device=device, dtype=dtype)
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)

    def unet_eval() -> None:
        with torch.inference_mode():
            pipeline.unet(latents, 500, context)

    def encode() -> None:
        with torch.inference_mode():
            vae.encode(pixels)

    def decode() -> None:
        with torch.inference_mode():
            vae.decode(latents[:batch])

    def full_call() -> Any:
        return pipeline(
            prompt=[PROMPT] * batch,
            negative_prompt=[NEGATIVE] * batch,
            image=sources,
            strength=REAL_STRENGTH,
            num_inference_steps=REAL_STEPS,
            guidance_scale=REAL_GUIDANCE,
            generator=[torch.Generator().manual_seed(seed) for seed in range(batch)],
            output_type="np",
        ).images

    def compile_unet() -> None:
        pipeline.unet = torch.compile(unet)

    outputs = np.random.default_rng(1).random((batch, size, size, 3)).astype(np.float32)
    scoring = Scoring(clip_vit_l14(device, dtype), outputs, sources)
    parts = {
        "unet_eval": unet_eval,
        "encode": encode,
        "decode": decode,
        "full_call": full_call,
        "compile_unet": compile_unet,
    }
    return parts, scoring


def real_sides(args: argparse.Namespace) -> tuple[Callable[[], Any], Scoring, dict[str, Any], dict[str, int]]:
    device, batch = args.device, args.batch
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    effective = int(REAL_STEPS * REAL_STRENGTH)
    # FLOPs on the meta device: shapes only, nothing computed (at 512 a CPU takes minutes a call).
    with torch.device("meta"):
        counting, counted_scoring = real_parts("meta", dtype, batch)
    counted = {
        "unet_eval": flops(counting["unet_eval"]),
        "vae_encode": flops(counting["encode"]),
        "vae_decode": flops(counting["decode"]),
        "clip": flops(counted_scoring.model_work),
    }
    counted["stage"] = counted["unet_eval"] * effective + counted["vae_encode"] + counted["vae_decode"]
    progress(counted=counted)
    parts, scoring = real_parts(device, dtype, batch)
    if args.compile:
        parts["compile_unet"]()
    shape = {
        "stage": f"SD 1.5 img2img {REAL_SIZE}², {REAL_STEPS} steps x {REAL_STRENGTH}, CFG, {dtype}",
        "scorer": f"CLIP ViT-L/14, {dtype}",
        "effective_steps": effective,
        "stage_timed_as": "one pipeline call"
        if args.full_call
        else "1 UNet eval x steps + VAE encode + decode",
        "compiled_unet": args.compile,
        "unet_eval": parts["unet_eval"],
        "encode": parts["encode"],
        "decode": parts["decode"],
    }
    return parts["full_call"], scoring, shape, counted


def progress(**measured: Any) -> None:
    """A line on stderr as each measurement ends: a long run shows how far it got."""
    print(json.dumps(measured, default=str), file=sys.stderr, flush=True)


def end_cost(count: int) -> dict[str, Any]:
    """The report's first pass over `count` scored results lines, with and without the scores, and
    the near-duplicate search over their hashes."""
    from kits.reports import PARAMS, succeeded
    from schemas.messages import QualityRecord, StageRecord
    from workers.report import summarize

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=count, dtype=np.uint64)
    scores = rng.normal(27, 3, size=count)
    lines = []
    for index in range(count):
        quality = QualityRecord(
            stage="s0-img2img",
            model="clip-vit-large-patch14",
            clip_score=round(float(scores[index]), 4),
            input_similarity=0.8123,
            phash=f"{int(hashes[index]):016x}",
            low_score=bool(scores[index] < 22),
            seed=index,
        )
        record = StageRecord(
            name="s0-img2img", model="sd15", params=PARAMS, timings={"infer_s": 0.31}, quality=quality
        )
        outputs = {"s0-img2img": f"s3://bucket/out/job/i{index:07d}/s0-img2img.png"}
        row = succeeded(f"i{index:07d}", outputs, image=f"s3://bucket/in/i{index:07d}.png", stages=[record])
        lines.append(row.model_copy(update={"quality": quality}).model_dump_json())
    passes: dict[str, list[float]] = {"plain": [], "scored": []}
    for _ in range(2):  # alternately, the faster of two each
        for scored in (False, True):
            started = time.perf_counter()
            summary = summarize(lines, scored=scored)
            passes["scored" if scored else "plain"].append(time.perf_counter() - started)
    assert summary.quality is not None
    started = time.perf_counter()
    groups = summary.quality.groups()
    grouping = time.perf_counter() - started
    plain, scored_s = min(passes["plain"]), min(passes["scored"])
    return {
        "end_items": count,
        "line_bytes": round(sum(map(len, lines)) / count),
        "first_pass_s": round(plain, 3),
        "first_pass_scored_s": round(scored_s, 3),
        "scores_add_s": round(scored_s - plain, 3),
        "near_duplicate_groups_s": round(grouping, 3),
        "groups": len(groups),
        "complete": summary.quality.complete,
    }


def torchmetrics_check(device: str) -> dict[str, Any]:
    """Per item, the workers' CLIP score against torchmetrics' functional clip_score of the same image
    (as uint8 CHW, what torchmetrics' processor call expects) and prompt, on the tiny CLIP."""
    import torchmetrics  # type: ignore[import-not-found]  # not a dependency: the GPU image has it
    from torchmetrics.functional.multimodal import clip_score  # type: ignore[import-not-found]

    prompts = ["a cat wizard", "astronaut in a jungle", "a red fox in snow", "a lighthouse at dusk"]
    with tempfile.TemporaryDirectory(prefix="imgjobs-bench-tm-") as scratch:
        folder = write_tiny_clip(Path(scratch) / "tiny-clip")
        scorer = ClipScorer.load(str(folder), device, torch.float32)
        pictures = inputs(len(prompts), 64)
        ours = scorer.scores(pictures, scorer.targets(prompts, [None] * len(prompts)))

        class Tensors:
            """The model as torchmetrics 1.9 expects it: get_*_features returning the projected
            embeddings, as transformers 4 did (5 returns an output holding them as pooler_output)."""

            def __init__(self, model: Any) -> None:
                self.model, self.config = model, model.config

            def to(self, target: Any) -> Tensors:
                self.model.to(target)
                return self

            def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
                found = self.model.get_image_features(*args, **kwargs)
                return found if isinstance(found, torch.Tensor) else found.pooler_output

            def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
                found = self.model.get_text_features(*args, **kwargs)
                return found if isinstance(found, torch.Tensor) else found.pooler_output

        def load() -> tuple[Any, Any]:
            # torchmetrics takes hub names from its own list, or a callable giving model and processor.
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
            return Tensors(model), CLIPProcessor.from_pretrained(folder, backend="pil")

        theirs = [
            float(clip_score(torch.from_numpy(np.asarray(picture)).permute(2, 0, 1).to(device), prompt, load))
            for picture, prompt in zip(pictures, prompts, strict=True)
        ]
    differences = [abs((mine.clip_score or 0.0) - other) for mine, other in zip(ours, theirs, strict=True)]
    return {
        "torchmetrics": torchmetrics.__version__,
        "ours": [mine.clip_score for mine in ours],
        "torchmetrics_scores": [round(other, 4) for other in theirs],
        "max_abs_difference": round(max(differences), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="items a call (default 8; real on cuda 16)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="tiny shapes: pixels a side")
    parser.add_argument("--steps", type=int, default=8, help="tiny shapes: steps (x strength 0.8)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--full-call", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile", action="store_true", help="real shapes: torch.compile the UNet")
    parser.add_argument("--end-items", type=int, default=0, help="measure the job's end instead")
    parser.add_argument("--check-torchmetrics", action="store_true")
    args = parser.parse_args()
    if args.check_torchmetrics:
        print(json.dumps(torchmetrics_check(args.device)))
        return
    if args.end_items:
        found = end_cost(args.end_items)
        print_measures(found)
        return
    on_gpu = args.device.startswith("cuda")
    args.batch = args.batch or (16 if on_gpu and args.shapes == "real" else 8)
    args.full_call = on_gpu if args.full_call is None else args.full_call
    if args.threads:
        torch.set_num_threads(args.threads)
    counted: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="imgjobs-bench-scoring-") as scratch:
        if args.shapes == "tiny":
            stage, scoring, shape = tiny_sides(args, Path(scratch))
        else:
            stage, scoring, shape, counted = real_sides(args)
        parts = {key: shape.pop(key) for key in ("unet_eval", "encode", "decode") if key in shape}
        composed = bool(parts) and not args.full_call
        # Warm-up: the first call of each allocates and picks kernels.
        timed(scoring, args.device)
        if not composed:
            timed(stage, args.device)
        stage_s, scoring_s, preprocess_s, inputs_s, hash_s = [], [], [], [], []
        for _ in range(args.reps):
            if composed:
                # One UNet evaluation (a CFG pair) stands for each of the denoising steps.
                evaluation = timed(parts["unet_eval"], args.device)
                coding = timed(parts["encode"], args.device) + timed(parts["decode"], args.device)
                stage_s.append(evaluation * shape["effective_steps"] + coding)
            else:
                stage_s.append(timed(stage, args.device))
            scoring_s.append(timed(scoring, args.device))
            preprocess_s.append(timed(scoring.preprocess, args.device))
            inputs_s.append(timed(scoring.prepare_inputs, args.device))
            hash_s.append(timed(scoring.hashes, args.device))
            progress(stage_s=stage_s[-1], scoring_s=scoring_s[-1], preprocess_s=preprocess_s[-1])
    batch = args.batch
    stage_item = statistics.median(stage_s) / batch
    scoring_item = statistics.median(scoring_s) / batch
    beside_item = (statistics.median(inputs_s) + statistics.median(hash_s)) / batch
    result: dict[str, Any] = {
        "shapes": args.shapes,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch_threads": torch.get_num_threads(),
        "batch": batch,
        "reps": args.reps,
        **shape,
        "stage_s_per_item": round(stage_item, 6),
        "scoring_s_per_item": round(scoring_item, 6),
        "ratio": round(scoring_item / stage_item, 5),
        "preprocess_s_per_item": round(statistics.median(preprocess_s) / batch, 6),
        "inputs_prepare_s_per_item": round(statistics.median(inputs_s) / batch, 6),
        "dhash_s_per_item": round(statistics.median(hash_s) / batch, 6),
        "ratio_with_io_thread_work": round((scoring_item + beside_item) / stage_item, 5),
    }
    if counted:
        result["stage_gflop_per_item"] = round(counted["stage"] / batch / 1e9, 1)
        result["scoring_gflop_per_item"] = round(counted["clip"] / batch / 1e9, 2)
        result["flop_ratio"] = round(counted["clip"] / counted["stage"], 5)
    print_measures(result)


if __name__ == "__main__":
    main()

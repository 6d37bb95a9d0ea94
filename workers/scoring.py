"""Quality scores of an output, computed on the worker that made it: how well it matches its prompt
(CLIP score), how close it stays to its input (input similarity), and a perceptual hash for finding
near-duplicates in the job.

The choices, and why:

- CLIP score: transformers' CLIPModel and CLIPProcessor, with the formula of torchmetrics' CLIPScore,
  100 x max(cos(E_image, E_text), 0). Not torchmetrics itself: 1.9 (the GPU image's) fails against
  transformers 5, whose get_image_features returns an output object where it expects a tensor; it
  takes hub names from a list of its own (anything else through a loader callable), returns a
  batch's mean (per-item scores are a private function away), keeps a long prompt's first 77 tokens
  without the end token that CLIP's text tower pools from, and would be a new dependency for one
  line of arithmetic. Through a shim for the first point, `bench/scoring.py --check-torchmetrics`
  finds its per-item scores equal to these. The image embeddings serve the input similarity too.
- Input similarity: the cosine of the CLIP image embeddings of output and input ("CLIP-I"), not CLIP
  directional similarity. The directional one asks whether the change from input to output follows
  the change from a caption of the input to the prompt: items have no caption of their input, and it
  is unstable (a difference of two nearly equal embeddings) where the output stays close to its
  input, which is what a low-strength stage is for. "Is it still the input's scene" is the cosine.
- Preprocessing: the processor's PIL backend, always. Where torchvision is installed transformers
  picks its torchvision backend, which resizes slightly differently; a job's scores must compare
  across its workers, whatever each has installed.
- What is scored: the output as written, 8-bit with diffusers' rounding, so that a score can be
  recomputed from the file.
- Perceptual hash: a 64-bit difference hash (dHash, Krawetz), the bits imagehash's `dhash` gives,
  in a few lines of Pillow and numpy. imagehash would bring scipy and PyWavelets into every worker
  (it imports both when loaded) for this one function, and PyWavelets is not in the GPU image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from workers.stages.common import to_pil

log = logging.getLogger(__name__)

HASH_SIDE = 8  # a dHash of 8 x 8 = 64 bits
DECIMALS = 4  # of a recorded score: far below what separates two images
PREPARE_THREADS = 4

# An image to score: a PIL image, or a pipeline's output row (float in [0, 1], or 8-bit).
Picture = Image.Image | np.ndarray


@dataclass(frozen=True)
class Scores:
    clip_score: float | None = None  # None: the item has no prompt
    input_similarity: float | None = None  # None: the item has no input image


def clip_score_of(cosine: float) -> float:
    """torchmetrics' CLIPScore of one image and caption: 100 x max(cosine, 0)."""
    return round(100.0 * max(cosine, 0.0), DECIMALS)


def similarity_of(cosine: float) -> float:
    return round(cosine, DECIMALS)


def dhash(image: Image.Image) -> str:
    """The 64-bit difference hash of the image, as 16 hex digits (first bit most significant): the
    grey image shrunk to 9 x 8 (Lanczos), a bit per pixel that is brighter than its left neighbour."""
    grey = image.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey)
    bits = pixels[:, 1:] > pixels[:, :-1]
    return np.packbits(bits.flatten()).tobytes().hex()


def _embeddings(features: Any) -> torch.Tensor:
    """The projected embeddings of get_image_features or get_text_features, as unit vectors: a
    tensor in older transformers, an output with the projection as its pooler_output in 5.x."""
    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    tensor = tensor.float()
    return tensor / tensor.norm(p=2, dim=-1, keepdim=True)


@dataclass(frozen=True)
class Targets:
    """What a call's outputs are compared with, per item: its prompt's and its input image's unit
    embeddings (None where it has none). Made once per call; re-rolls compare with the same."""

    texts: list[torch.Tensor | None]
    inputs: list[torch.Tensor | None]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: Sequence[int]) -> Targets:
        return Targets([self.texts[row] for row in rows], [self.inputs[row] for row in rows])


class ClipScorer:
    """A CLIP checkpoint, loaded once per worker, that scores images against prompts and inputs.

    Preparing an image (the processor's resize, crop and normalization, a few milliseconds at 512 x
    512) is CPU work on the thread that waits for the accelerator: on a GPU host the images of a call
    are prepared side by side on PREPARE_THREADS threads (PIL resizes without the interpreter lock),
    and the engine prepares the inputs while it reads them, before the call."""

    def __init__(
        self, model: Any, processor: Any, device: str, dtype: torch.dtype, threads: int | None = None
    ) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.max_tokens = int(model.config.text_config.max_position_embeddings)
        if threads is None:
            threads = 0 if device == "cpu" else PREPARE_THREADS  # on the CPU the model needs the cores
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="imgjobs-score") if threads else None

    @classmethod
    def load(cls, path: str, device: str, dtype: torch.dtype) -> ClipScorer:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(path, dtype=dtype).to(device).eval()
        processor = CLIPProcessor.from_pretrained(path, backend="pil")
        return cls(model, processor, device, dtype)

    def pixels(self, images: Sequence[Picture]) -> torch.Tensor:
        """The images as the model takes them, (count, 3, side, side); a pipeline's float output is
        first made 8-bit, as it is written."""
        if self._pool is not None and len(images) > 1:
            return torch.stack(list(self._pool.map(self._prepared, images)))
        return torch.stack([self._prepared(image) for image in images])

    def _prepared(self, image: Picture) -> torch.Tensor:
        picture = image if isinstance(image, Image.Image) else to_pil(image)
        prepared: torch.Tensor = self.processor(images=[picture], return_tensors="pt")["pixel_values"][0]
        return prepared

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return _embeddings(features)

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        # Truncated as the tokenizer truncates, keeping the end token that the text tower pools from.
        tokens = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        with torch.inference_mode():
            features = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
        return _embeddings(features)

    def targets(self, prompts: Sequence[str | None], inputs: Sequence[torch.Tensor | None]) -> Targets:
        """The items' prompt and input embeddings, each kind in one batch; `inputs` are the input
        images as `pixels` prepared them."""
        texts: list[torch.Tensor | None] = [None] * len(prompts)
        with_text = [row for row, prompt in enumerate(prompts) if prompt]
        if with_text:
            embedded = self.text_embeddings([prompts[row] or "" for row in with_text])
            for index, row in enumerate(with_text):
                texts[row] = embedded[index]
        images: list[torch.Tensor | None] = [None] * len(inputs)
        given = [(row, pixels) for row, pixels in enumerate(inputs) if pixels is not None]
        if given:
            embedded = self.image_embeddings(torch.stack([pixels for _, pixels in given]))
            for index, (row, _) in enumerate(given):
                images[row] = embedded[index]
        return Targets(texts, images)

    def scores(self, outputs: Sequence[Picture], targets: Targets) -> list[Scores]:
        """Each output's scores against its item's targets (row for row), in one batch."""
        embedded = self.image_embeddings(self.pixels(outputs))
        found = []
        for row in range(len(outputs)):
            text, source = targets.texts[row], targets.inputs[row]
            found.append(
                Scores(
                    clip_score=None if text is None else clip_score_of(float(embedded[row] @ text)),
                    input_similarity=None if source is None else similarity_of(float(embedded[row] @ source)),
                )
            )
        return found

"""Kandinsky 2.2 runs in two steps: the prior turns prompts into image embeddings, then the decoder
(img2img or text2img) denoises with them. Both models live in one combined pipeline, so one worker.

The stages call the two steps themselves, because the combined pipeline passes one generator list to
both: the prior doubles its batch when given negative prompts (positive and negative embeddings are
sampled together), and a per-item list cannot be the right length for both. Each item's generator
is used by the prior, then by the decoder, the order the combined pipeline uses, so a batched
result equals what the combined pipeline gives for that item alone.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.stages.common import StageBatch


def is_kandinsky(pipeline: Any) -> bool:
    return hasattr(pipeline, "prior_pipe") and hasattr(pipeline, "decoder_pipe")


def image_embeddings(pipeline: Any, batch: StageBatch, generators: list[torch.Generator]) -> dict[str, Any]:
    """image_embeds and negative_image_embeds for the decoder, one row per item in batch order.
    Items without a negative prompt get the prior's zero embedding, as diffusers gives them."""
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with_negative = [i for i, text in enumerate(batch.negative_prompts) if text is not None]
    without_negative = [i for i, text in enumerate(batch.negative_prompts) if text is None]
    for indices, negative in ((with_negative, True), (without_negative, False)):
        if not indices:
            continue
        own = [generators[i] for i in indices]
        with torch.inference_mode():
            embeds, negative_embeds = pipeline.prior_pipe(
                prompt=[batch.prompts[i] for i in indices],
                negative_prompt=[batch.negative_prompts[i] for i in indices] if negative else None,
                # With negatives the prior samples 2 x batch rows: positives, then negatives.
                generator=own + own if negative else own,
                output_type="pt",
                return_dict=False,
            )
        for row, index in enumerate(indices):
            rows[index] = (embeds[row], negative_embeds[row])
    ordered = [rows[index] for index in range(len(batch))]
    return {
        "image_embeds": torch.stack([positive for positive, _ in ordered]),
        "negative_image_embeds": torch.stack([negative for _, negative in ordered]),
    }

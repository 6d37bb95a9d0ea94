"""Prompts for a batched pipeline call: plain strings, or Compel-weighted embeddings
(`a (cat)1.3 wizard`, `jungle--`) turned into prompt_embeds per item."""

from __future__ import annotations

from typing import Any

from schemas.errors import StageError


def prompt_arguments(
    pipeline: Any, prompts: list[str], negatives: list[str | None], syntax: str
) -> dict[str, Any]:
    # diffusers reads a missing negative prompt as the empty string; a list must be all strings.
    negative = [text or "" for text in negatives]
    if syntax == "plain":
        return {"prompt": prompts, "negative_prompt": negative}
    # Imported only for weighted prompts: compel pulls in transformers, seconds at every worker start.
    from compel import Compel, CompelForSD, CompelForSDXL, ReturnedEmbeddingsType

    encoder = getattr(pipeline, "text_encoder", None)
    encoder_2 = getattr(pipeline, "text_encoder_2", None)
    if encoder is not None and encoder_2 is not None:
        sdxl = CompelForSDXL(pipeline, device=pipeline.device)(prompts, negative_prompt=negative)
        return {
            "prompt_embeds": sdxl.embeds,
            "pooled_prompt_embeds": sdxl.pooled_embeds,
            "negative_prompt_embeds": sdxl.negative_embeds,
            "negative_pooled_prompt_embeds": sdxl.negative_pooled_embeds,
        }
    if encoder_2 is not None:
        # The SDXL refiner has only the second text encoder, which also gives the pooled embedding.
        compel = Compel(
            tokenizer=pipeline.tokenizer_2,
            text_encoder=encoder_2,
            requires_pooled=True,
            truncate_long_prompts=False,
            returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
            device=pipeline.device,
        )
        embeds, pooled = compel(prompts)
        negative_embeds, negative_pooled = compel(negative)
        embeds, negative_embeds = compel.pad_conditioning_tensors_to_same_length([embeds, negative_embeds])
        return {
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative_embeds,
            "negative_pooled_prompt_embeds": negative_pooled,
        }
    if encoder is not None and getattr(pipeline, "tokenizer", None) is not None:
        sd = CompelForSD(pipeline, device=pipeline.device)(prompts, negative_prompt=negative)
        return {"prompt_embeds": sd.embeds, "negative_prompt_embeds": sd.negative_embeds}
    raise StageError(
        f"prompt_syntax: compel works with SD 1.x and SDXL pipelines, not {type(pipeline).__name__}"
    )

"""Tiny random-weight pipelines for tests and the demo, written with save_pretrained so that
workers load them back through the same from_pretrained path as a real checkpoint.

No hub is needed: the CLIP tokenizer is built from a byte-level vocabulary with no merges, which
tokenizes any text (one token per character) and is all a random text encoder can use anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TEXT_DIM = 32
MAX_TOKENS = 77


def tiny_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    printable = [chr(code) for code in range(33, 127)]
    vocab = {char: index for index, char in enumerate(printable)}
    vocab |= {f"{char}</w>": len(printable) + index for index, char in enumerate(printable)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)


def tiny_clip_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def tiny_sd_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=32,
    )


def tiny_sd_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
    )


def sd_scheduler() -> DDIMScheduler:
    # Stable Diffusion 1.x's own scheduler settings.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def write_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """`tiny-sd`: the Stable Diffusion 1.x layout (CLIP text encoder, UNet, KL VAE), random weights."""
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(folder / "_tokenizer_src")
    pipeline = StableDiffusionImg2ImgPipeline(
        vae=tiny_sd_vae(),
        text_encoder=tiny_clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=tiny_sd_unet(),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    for leftover in (folder / "_tokenizer_src").iterdir():
        leftover.unlink()
    (folder / "_tokenizer_src").rmdir()
    return folder

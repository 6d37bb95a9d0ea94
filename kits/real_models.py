"""Stable Diffusion 1.5, the SDXL refiner and the x4 upscaler at their real shapes, with random weights,
and SD 1.5's safety checker: what the GPU benchmarks run where no checkpoint can be downloaded
(`bench/gpu_throughput.py`, `bench/scoring.py`). Each builder takes a scratch folder for its
tokenizer's files; the tokenizer is workers/tiny_models.py's (its vocabulary changes no shape but the
embedding table's). The tiny architectures the tests use are workers/tiny_models.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
)

from workers.tiny_models import (
    MAX_TOKENS,
    TEXT_DIM,
    scratch_clip_tokenizer,
    sd_scheduler,
    tiny_clip_text_config,
    tiny_clip_tokenizer,
    tiny_clip_vision_config,
)


def text_config(tokenizer: CLIPTokenizer, **real: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=1,
        **real,
    )


def sd_vae(blocks: int = 4, sample_size: int = 512) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[128, 256, 512, 512][:blocks],
        layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=4,
        sample_size=sample_size,
    )


def sd15(scratch: Path) -> Any:
    tokenizer = tiny_clip_tokenizer(scratch / "tokenizer")
    # Stable Diffusion 1.5's shapes (the UNet's defaults are SD 1.x's)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    encoder = CLIPTextModel(
        text_config(
            tokenizer,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            hidden_act="quick_gelu",
        )
    )
    with torch.device("cpu"):
        scheduler = sd_scheduler()
    return StableDiffusionImg2ImgPipeline(
        vae=sd_vae(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_refiner(scratch: Path) -> Any:
    tokenizer = tiny_clip_tokenizer(scratch / "tokenizer_2")
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(384, 768, 1536, 1536),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(6, 12, 24, 24),
        transformer_layers_per_block=4,
        cross_attention_dim=1280,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560,
    )
    encoder = CLIPTextModelWithProjection(
        text_config(
            tokenizer,
            hidden_size=1280,
            intermediate_size=5120,
            num_attention_heads=20,
            num_hidden_layers=32,
            projection_dim=1280,
            hidden_act="gelu",
        )
    )
    with torch.device("cpu"):
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        )
    return StableDiffusionXLImg2ImgPipeline(
        vae=sd_vae(sample_size=1024),
        text_encoder=None,
        text_encoder_2=encoder,
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def x4_upscaler(scratch: Path) -> Any:
    tokenizer = tiny_clip_tokenizer(scratch / "tokenizer")
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=7,
        out_channels=4,
        down_block_types=(
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
        ),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(256, 512, 512, 1024),
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=8,
        num_class_embeds=1000,
        use_linear_projection=True,
        only_cross_attention=(True, True, True, False),
    )
    encoder = CLIPTextModel(
        text_config(
            tokenizer,
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            hidden_act="gelu",
        )
    )
    with torch.device("cpu"):
        low_res_scheduler, scheduler = DDPMScheduler(), DDIMScheduler()
    return StableDiffusionUpscalePipeline(
        vae=sd_vae(blocks=3, sample_size=256),
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=low_res_scheduler,
        scheduler=scheduler,
        max_noise_level=350,
    )


def add_safety_checker(pipeline: Any, tiny: bool) -> None:
    """SD 1.5's safety checker (CLIP ViT-L/14 at 224², random weights; --tiny: the tests' tiny CLIP) and
    its image processor, in the pipeline's device and dtype: the pipeline then runs it after every
    decode, on the images it returns, as a default deployment (`safety_checker: true`) does."""
    if tiny:
        vision = tiny_clip_vision_config()
        config = CLIPConfig(
            text_config=tiny_clip_text_config(scratch_clip_tokenizer()).to_dict(),
            vision_config=vision.to_dict(),
            projection_dim=TEXT_DIM,
        )
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=24,
            patch_size=14,
            image_size=224,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
        config = CLIPConfig(vision_config=vision.to_dict(), projection_dim=768)
        processor = CLIPImageProcessor()  # 224², as SD 1.5's feature_extractor
    unet = pipeline.unet
    checker = StableDiffusionSafetyChecker(config).to(unet.device, unet.dtype).eval()
    pipeline.register_modules(safety_checker=checker, feature_extractor=processor)

"""Tiny random-weight pipelines for tests and the demo, written with save_pretrained so that
workers load them back through the same from_pretrained path as a real checkpoint.

No hub is needed: the CLIP tokenizer is built from a byte-level vocabulary with no merges, which
tokenizes any text (one token per character) and is all a random text encoder can use anyway.

One writer per family of the diffusers image-to-image guide. Each keeps its real checkpoint's layout
(component names, scheduler classes, conditioning sizes) at the smallest width that still runs, so a
worker that loads a fixture loads the real model the same way.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    KandinskyV22Img2ImgCombinedPipeline,
    PriorTransformer,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLImg2ImgPipeline,
    UnCLIPScheduler,
    UNet2DConditionModel,
    VQModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessorPil,
)

TEXT_DIM = 32
MAX_TOKENS = 77
SDXL_TIME_EMBED_DIM = 8
# The x2 latent upscaler conditions on a 128-wide noise-level embedding followed by the pooled text embedding.
LATENT_UPSCALER_NOISE_EMBED_DIM = 128
X4_MAX_NOISE_LEVEL = 350


def tiny_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    printable = [chr(code) for code in range(33, 127)]
    vocab = {char: index for index, char in enumerate(printable)}
    vocab |= {f"{char}</w>": len(printable) + index for index, char in enumerate(printable)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)


def scratch_clip_tokenizer() -> CLIPTokenizer:
    """The tiny tokenizer built in a throwaway folder: it holds its vocabulary in memory, and the
    pipeline's save_pretrained writes it where it belongs."""
    with tempfile.TemporaryDirectory() as scratch:
        return tiny_clip_tokenizer(Path(scratch))


def tiny_clip_vision_config() -> CLIPVisionConfig:
    """The tiny CLIP image encoder: Kandinsky's prior reads images with it, the safety checker too."""
    return CLIPVisionConfig(
        hidden_size=TEXT_DIM,
        projection_dim=TEXT_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=16,
    )


def tiny_clip_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=1,
    )


def tiny_clip_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(tiny_clip_text_config(tokenizer))


def tiny_clip_text_encoder_with_projection(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder and Kandinsky's prior encoder: a pooled, projected text embedding too."""
    return CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer))


def tiny_sd_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=scaling_factor,
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


def shared_vae(vae_from: Path) -> AutoencoderKL:
    """`vae_from`'s VAE, weights and config, rebuilt from its config file: the one from_pretrained
    returns records `vae_from`'s path in its config, which would end up in the folder written."""
    loaded = AutoencoderKL.from_pretrained(vae_from / "vae")
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(vae_from / "vae"))
    vae.load_state_dict(loaded.state_dict())
    return vae


def sd_img2img_pipeline(vae: AutoencoderKL) -> StableDiffusionImg2ImgPipeline:
    tokenizer = scratch_clip_tokenizer()
    return StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=tiny_clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=tiny_sd_unet(),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """`tiny-sd`: the Stable Diffusion 1.x layout (CLIP text encoder, UNet, KL VAE), random weights."""
    torch.manual_seed(seed)
    sd_img2img_pipeline(tiny_sd_vae()).save_pretrained(folder)
    return folder


def write_tiny_sd_style(folder: Path, vae_from: Path, seed: int = 1) -> Path:
    """`tiny-sd-style`: a second SD 1.x model, as a fine-tune would be: its own UNet and text encoder,
    but `vae_from`'s VAE, so latents from one are valid `image=` input to the other."""
    vae = shared_vae(vae_from)
    torch.manual_seed(seed)
    sd_img2img_pipeline(vae).save_pretrained(folder)
    return folder


def write_tiny_sdxl_refiner(folder: Path, seed: int = 0) -> Path:
    """`tiny-sdxl-refiner`: the SDXL refiner layout. Only the second (projected) text encoder, and a
    UNet whose added time embedding takes 5 time ids (original size, crop, aesthetic score) plus the
    pooled text embedding, which is what `requires_aesthetics_score=True` feeds it."""
    torch.manual_seed(seed)
    tokenizer = scratch_clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=5 * SDXL_TIME_EMBED_DIM + TEXT_DIM,
        cross_attention_dim=TEXT_DIM,
    )
    pipeline = StableDiffusionXLImg2ImgPipeline(
        vae=tiny_sd_vae(scaling_factor=0.13025),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=tiny_clip_text_encoder_with_projection(tokenizer),
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    pipeline.save_pretrained(folder)
    return folder


def write_tiny_kandinsky22(folder: Path, seed: int = 0) -> Path:
    """`tiny-kandinsky22`: the Kandinsky 2.2 decoder and its prior in one combined img2img folder: what
    `AutoPipelineForImage2Image` builds from the real decoder checkpoint and its connected prior, saved
    as one so that loading it needs no hub.

    The prior's `clip_std` is set to ones: left at its initial zeros, every image embedding it
    produces would be the same constant, whatever the prompt."""
    torch.manual_seed(seed)
    tokenizer = scratch_clip_tokenizer()
    prior = PriorTransformer(
        num_attention_heads=2, attention_head_dim=12, embedding_dim=TEXT_DIM, num_layers=1
    )
    with torch.no_grad():
        prior.clip_std.fill_(1.0)
    image_encoder = CLIPVisionModelWithProjection(tiny_clip_vision_config())
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=8,
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=TEXT_DIM,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    movq = VQModel(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    pipeline = KandinskyV22Img2ImgCombinedPipeline(
        unet=unet,
        scheduler=DDPMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="linear",
            clip_sample=False,
            steps_offset=1,
        ),
        movq=movq,
        prior_prior=prior,
        prior_image_encoder=image_encoder,
        prior_text_encoder=tiny_clip_text_encoder_with_projection(tokenizer),
        prior_tokenizer=tokenizer,
        prior_scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log",
            prediction_type="sample",
            clip_sample=True,
            clip_sample_range=10.0,
        ),
        prior_image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
    )
    pipeline.save_pretrained(folder)
    return folder


def write_tiny_sd_x2_latent_upscaler(folder: Path, vae_from: Path, seed: int = 0) -> Path:
    """`tiny-sd-x2-latent-upscaler`: the sd-x2-latent-upscaler layout on `vae_from`'s (tiny-sd's) VAE,
    so it works in tiny-sd's latent space, as the real one works in SD 1.x's.

    `image=` is either latents or pixels. A 4-channel tensor (B, 4, h, w) is taken as latents as it is:
    the `output_type="latent"` result of an SD (img2img) call, which is already multiplied by
    `vae.config.scaling_factor`, goes in unchanged. Anything else (PIL images, numpy, a 3-channel tensor
    in [-1, 1]) is encoded with its VAE and multiplied by the scaling factor. The batch must match the
    prompt list. There is no `strength`: it denoises fresh noise of twice the size, conditioned on the
    input (default guidance_scale 9.0; guidance_scale=0 drops the prompt, as the real one is usually run).

    `output_type="latent"` returns a (B, 4, 2h, 2w) tensor in the same scaled convention, so
    `vae.decode(latents / vae.config.scaling_factor)` decodes it; other output types are those decoded
    pixels, twice the size of the image the input latents stand for (tiny-sd: 16x16 latents of a 32x32
    image give 64x64).

    The UNet predicts one extra (variance) channel, which the pipeline drops, and takes the pooled text
    embedding in `timestep_cond`. Its K-blocks need at least three levels, the last two equally wide."""
    vae = shared_vae(vae_from)
    torch.manual_seed(seed)
    tokenizer = scratch_clip_tokenizer()
    unet = UNet2DConditionModel(
        act_fn="gelu",
        attention_head_dim=8,
        norm_num_groups=None,
        block_out_channels=(32, 64, 64),
        time_cond_proj_dim=LATENT_UPSCALER_NOISE_EMBED_DIM + TEXT_DIM,
        conv_in_kernel=1,
        conv_out_kernel=1,
        cross_attention_dim=TEXT_DIM,
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
        up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
        in_channels=8,
        out_channels=5,
        mid_block_type=None,
        only_cross_attention=False,
        resnet_time_scale_shift="scale_shift",
        time_embedding_type="fourier",
        timestep_post_act="gelu",
    )
    pipeline = StableDiffusionLatentUpscalePipeline(
        vae=vae,
        text_encoder=tiny_clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="sample"
        ),
    )
    pipeline.save_pretrained(folder)
    return folder


def write_tiny_sd_x4_upscaler(folder: Path, seed: int = 0) -> Path:
    """`tiny-sd-x4-upscaler`: the stable-diffusion-x4-upscaler layout. Its VAE has three levels, so it
    decodes latents of the input image's own size to four times that size, with the real one's scaling
    factor 0.08333; the UNet takes those latents next to the noised low-res image (4 + 3 channels) and
    the `noise_level` (0..max_noise_level) as its class label.

    Everything here runs at the full input size (64x64 for a 64-pixel image), so it is narrower than the
    other fixtures, has attention only at its lowest level, and its VAE has no mid-block attention: over
    64x64 latents that alone would take most of a call's time."""
    torch.manual_seed(seed)
    tokenizer = scratch_clip_tokenizer()
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 16],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        norm_num_groups=8,
        mid_block_add_attention=False,
        scaling_factor=0.08333,
    )
    unet = UNet2DConditionModel(
        block_out_channels=(16, 16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        use_linear_projection=True,
        num_class_embeds=X4_MAX_NOISE_LEVEL + 1,
    )
    pipeline = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=tiny_clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"),
        scheduler=DDIMScheduler(
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="scaled_linear",
            prediction_type="v_prediction",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        max_noise_level=X4_MAX_NOISE_LEVEL,
    )
    pipeline.save_pretrained(folder)
    return folder


def write_tiny_controlnet_depth(folder: Path, seed: int = 0) -> Path:
    """`tiny-controlnet-depth`: a ControlNet with tiny-sd's UNet configuration (so it plugs into tiny-sd
    with `from_pipe(..., controlnet=...)`), its condition embedding halving the control image's size as
    tiny-sd's VAE does (real SD's divides by 8). A new ControlNet's zero convolutions output nothing;
    here they get small random weights, as a trained one's are, so the control image changes the result."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(tiny_sd_unet(), conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():
        for zero_conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            zero_conv.weight.normal_(std=0.02)
    controlnet.save_pretrained(folder)
    return folder


def write_tiny_depth_estimator(folder: Path, seed: int = 0) -> Path:
    """`tiny-depth-estimator`: a DPT depth model (the transformers "depth-estimation" pipeline's
    default family) with its PIL-backend image processor, so it needs no torchvision."""
    torch.manual_seed(seed)
    model = DPTForDepthEstimation(
        DPTConfig(
            hidden_size=TEXT_DIM,
            num_hidden_layers=4,
            backbone_out_indices=(0, 1, 2, 3),
            num_attention_heads=4,
            intermediate_size=37,
            image_size=32,
            patch_size=16,
            neck_hidden_sizes=(16, 16, 32, 32),
            fusion_hidden_size=16,
        )
    )
    model.save_pretrained(folder)
    DPTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def write_tiny_sd_with_safety_checker(folder: Path, seed: int = 0) -> Path:
    """`tiny-sd`'s layout with a safety checker (SD 1.5's CLIP-based one, tiny) that flags every image:
    its concept thresholds are below any cosine similarity, so each output comes back black and
    flagged, as a real checker's flagged ones do."""
    torch.manual_seed(seed)
    vision = tiny_clip_vision_config()
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config=tiny_clip_text_config(scratch_clip_tokenizer()).to_dict(),
            vision_config=vision.to_dict(),
            projection_dim=TEXT_DIM,
        )
    )
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # cosine similarity - (-2) > 0: every concept matches
    tokenizer = scratch_clip_tokenizer()
    pipeline = StableDiffusionImg2ImgPipeline(
        vae=tiny_sd_vae(),
        text_encoder=tiny_clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=tiny_sd_unet(),
        scheduler=sd_scheduler(),
        safety_checker=checker,
        feature_extractor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        requires_safety_checker=True,
    )
    pipeline.save_pretrained(folder)
    return folder


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """`tiny-clip`: a CLIPModel (text and image towers, projected to one space) with its tokenizer and
    PIL-backend image processor, for a stage's `score:`; random weights, so its scores mean nothing but
    are computed exactly as a real checkpoint's."""
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(folder)
    model = CLIPModel(
        CLIPConfig(
            text_config=tiny_clip_text_config(tokenizer).to_dict(),
            vision_config=tiny_clip_vision_config().to_dict(),
            projection_dim=TEXT_DIM,
        )
    )
    model.save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder


def write_tiny_vae(folder: Path, seed: int = 5) -> Path:
    """A VAE of its own (tiny-sd's shape, other weights), as sd-vae-ft-mse is to SD 1.5's: for `vae:`."""
    torch.manual_seed(seed)
    tiny_sd_vae().save_pretrained(folder)
    return folder


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def write_tiny_lora(
    folder: Path, model: Path, seed: int = 0, rank: int = 4, text_encoder: bool = False
) -> Path:
    """A LoRA for the SD 1.x folder `model` (its UNet's attention, and with `text_encoder` its text
    encoder's too), made with peft and written with diffusers' save_lora_weights as a trained one is
    (`pytorch_lora_weights.safetensors`). Its up weights are random too (peft would start them at
    zero), so it changes what the model makes."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    layers: dict[str, Any] = {}
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    )
    layers["unet_lora_layers"] = get_peft_model_state_dict(unet)
    if text_encoder:
        encoder = CLIPTextModel.from_pretrained(model / "text_encoder")
        # peft's own injection: transformers' add_adapter asks for a newer peft than is released.
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=list(TEXT_LORA_TARGETS), init_lora_weights=False
        )
        inject_adapter_in_model(config, encoder)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(encoder)
    StableDiffusionImg2ImgPipeline.save_lora_weights(folder, **layers)
    return folder


def _renamed(key: str, prefixes: list[tuple[str, str]]) -> str | None:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _ldm_unet(weights: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers UNet's weights under the original Stable Diffusion (LDM) names that single-file
    checkpoints use: the inverse of diffusers' convert_ldm_unet_checkpoint for SD 1.x's block layout
    (each down block: layers_per_block resnets (+ attentions) then a downsampler; each up block: one
    more, then an upsampler)."""
    per_block = config["layers_per_block"] + 1
    prefixes = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for block, kind in enumerate(config["up_block_types"]):
        for layer in range(per_block - 1):
            ldm = f"input_blocks.{per_block * block + layer + 1}"
            prefixes += [(f"down_blocks.{block}.resnets.{layer}.", f"{ldm}.0.")]
            prefixes += [(f"down_blocks.{block}.attentions.{layer}.", f"{ldm}.1.")]
        prefixes += [
            (f"down_blocks.{block}.downsamplers.0.conv.", f"input_blocks.{per_block * (block + 1)}.0.op.")
        ]
        for layer in range(per_block):
            ldm = f"output_blocks.{per_block * block + layer}"
            prefixes += [(f"up_blocks.{block}.resnets.{layer}.", f"{ldm}.0.")]
            prefixes += [(f"up_blocks.{block}.attentions.{layer}.", f"{ldm}.1.")]
        upsampler = f"output_blocks.{per_block * block + per_block - 1}.{2 if 'CrossAttn' in kind else 1}."
        prefixes += [(f"up_blocks.{block}.upsamplers.0.", upsampler)]
    resnet_names = [
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("time_emb_proj", "emb_layers.1"),
        ("conv_shortcut", "skip_connection"),
    ]
    converted = {}
    for key, tensor in weights.items():
        name = _renamed(key, prefixes)
        if name is None:
            raise ValueError(f"no LDM name for the UNet's {key}")
        if ".resnets." in key:
            for diffusers_name, ldm_name in resnet_names:
                name = name.replace(f".{diffusers_name}.", f".{ldm_name}.")
        converted[f"model.diffusion_model.{name}"] = tensor
    return converted


def _ldm_vae(weights: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's weights under the LDM names (the inverse of diffusers'
    convert_ldm_vae_checkpoint): decoder blocks count up from the bottom in LDM, attention q/k/v/out
    are 1x1 convolutions."""
    blocks, per_block = len(config["down_block_types"]), config["layers_per_block"]
    prefixes = []
    for block in range(blocks):
        for layer in range(per_block):
            prefixes += [
                (f"encoder.down_blocks.{block}.resnets.{layer}.", f"encoder.down.{block}.block.{layer}.")
            ]
        prefixes += [(f"encoder.down_blocks.{block}.downsamplers.0.", f"encoder.down.{block}.downsample.")]
        up = blocks - 1 - block
        for layer in range(per_block + 1):
            prefixes += [(f"decoder.up_blocks.{block}.resnets.{layer}.", f"decoder.up.{up}.block.{layer}.")]
        prefixes += [(f"decoder.up_blocks.{block}.upsamplers.0.", f"decoder.up.{up}.upsample.")]
    for part in ("encoder", "decoder"):
        prefixes += [
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."),
            (f"{part}.conv_norm_out.", f"{part}.norm_out."),
        ]
    attention_names = [
        ("group_norm.", "norm."),
        ("to_q.", "q."),
        ("to_k.", "k."),
        ("to_v.", "v."),
        ("to_out.0.", "proj_out."),
    ]
    converted = {}
    for key, tensor in weights.items():
        name = _renamed(key, prefixes) or key  # conv_in, conv_out, quant_conv, post_quant_conv keep theirs
        if ".attentions." in key:
            head, _, tail = name.partition(".attn_1.")
            tail = _renamed(tail, attention_names) or tail
            name = f"{head}.attn_1.{tail}"
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        converted[f"first_stage_model.{name.replace('conv_shortcut', 'nin_shortcut')}"] = tensor
    return converted


def write_tiny_single_file(model: Path, path: Path) -> Path:
    """The SD 1.x folder `model` as one checkpoint file, laid out as those on model-sharing sites are
    (UNet, VAE and CLIP text encoder under their original LDM names): `.safetensors`, or a `.ckpt`
    (a pickled {"state_dict": ...}). diffusers' from_single_file, given `model` as its config, loads
    back the same weights."""
    from safetensors.torch import load_file, save_file

    checkpoint: dict[str, torch.Tensor] = {}
    for component, convert in (("unet", _ldm_unet), ("vae", _ldm_vae)):
        config = json.loads((model / component / "config.json").read_text(encoding="utf-8"))
        checkpoint |= convert(load_file(model / component / "diffusion_pytorch_model.safetensors"), config)
    for key, tensor in load_file(model / "text_encoder" / "model.safetensors").items():
        # transformers 5 saves CLIPTextModel's weights without the text_model. prefix they have in SD.
        inner = key if key.startswith("text_model.") else f"text_model.{key}"
        checkpoint[f"cond_stage_model.transformer.{inner}"] = tensor
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.contiguous() for key, tensor in checkpoint.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": tensors}, path)
    else:
        save_file(tensors, path)
    return path


def write_all_tiny_models(root: Path) -> dict[str, Path]:
    """Every tiny model under `root`, by the folder name the registry and tests use."""
    sd = write_tiny_sd(root / "tiny-sd")
    return {
        "tiny-sd": sd,
        "tiny-sd-style": write_tiny_sd_style(root / "tiny-sd-style", vae_from=sd),
        "tiny-sdxl-refiner": write_tiny_sdxl_refiner(root / "tiny-sdxl-refiner"),
        "tiny-kandinsky22": write_tiny_kandinsky22(root / "tiny-kandinsky22"),
        "tiny-sd-x2-latent-upscaler": write_tiny_sd_x2_latent_upscaler(
            root / "tiny-sd-x2-latent-upscaler", vae_from=sd
        ),
        "tiny-sd-x4-upscaler": write_tiny_sd_x4_upscaler(root / "tiny-sd-x4-upscaler"),
        "tiny-controlnet-depth": write_tiny_controlnet_depth(root / "tiny-controlnet-depth"),
        "tiny-depth-estimator": write_tiny_depth_estimator(root / "tiny-depth-estimator"),
        "tiny-clip": write_tiny_clip(root / "tiny-clip"),
    }

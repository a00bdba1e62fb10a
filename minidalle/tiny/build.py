"""Builds the tiny models that ship inside the package (`minidalle.embedded` finds them).

`python -m minidalle.tiny.build --out DIR` rebuilds the random-weight tiny model from a seed. It uses exactly the
classes SD 1.5 uses (CLIPTextModel, UNet2DConditionModel, AutoencoderKL, a diffusers scheduler) plus the prior, only
smaller, and is saved with `save_pretrained`, so it loads through the same `MiniDallePipeline.from_pretrained` as a
real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import minidalle._quiet  # noqa: F401  (first: quiets diffusers' first import)
from minidalle.prior import Prior
from minidalle.tiny.tokenizer import build_tokenizer

# words the tiny tokenizer knows as whole tokens; anything else still tokenizes byte by byte
TINY_WORDS = (
    "a an the of on in with and photo picture painting drawing image small large big tiny "
    "red orange yellow green cyan blue purple magenta pink white black gray grey brown "
    "circle square triangle star cross ring diamond heart shape background "
    "cat dog house tree car person face landscape mountain sky sea city flower"
).split()


def sd15_scheduler_config() -> dict:
    """The noise schedule SD 1.5 uses (scaled-linear betas, ε-prediction), as a DDIM config."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def build_tiny_components(seed: int = 0, *, text_width: int = 32, resolution: int = 32) -> dict:
    """Random tiny components: 32×32 images, 8×8×4 latents (VAE factor 4), 77-token CLIP text encoder."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(TINY_WORDS)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=text_width,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=resolution,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=text_width, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    scheduler = DDIMScheduler(**sd15_scheduler_config())
    prior = Prior(in_dim=text_width, out_dim=text_width, hidden_dim=text_width)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior, unet=unet, vae=vae, scheduler=scheduler)


def write_tiny_random(out: Path, seed: int = 0) -> Path:
    from minidalle.pipeline import MiniDallePipeline

    pipe = MiniDallePipeline(**build_tiny_components(seed))
    pipe.save_pretrained(out)
    return out

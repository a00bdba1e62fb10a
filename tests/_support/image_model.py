"""A model folder with an image side for tests: the embedded random tiny model plus a random CLIP image encoder,
IP-Adapter and diffusion prior (weights moved away from their init, so that image tokens change images)."""

from __future__ import annotations

from pathlib import Path

import torch


def build_image_model(out: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from minidalle import MiniDallePipeline
    from minidalle import image_conditioning as ic
    from minidalle.diffusion_prior import new_tiny
    from minidalle.embedded import TINY_RANDOM

    torch.manual_seed(0)
    base = MiniDallePipeline.from_pretrained(TINY_RANDOM, device="cpu")
    width = base.text_encoder.config.hidden_size  # the prior's embedding width = the text width (32 here)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=width))
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.2 * torch.randn(v.shape, generator=g)
             for k, v in ic.new_ip_adapter_state(base.unet, width, generator=g).items()}
    prior = new_tiny(width, num_layers=1, heads=2, head_dim=16)
    with torch.no_grad():
        for p in prior.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    pipe = MiniDallePipeline(**base.components, image_encoder=encoder, feature_extractor=ic.new_image_processor(32),
                             diffusion_prior=prior, model_id="image-model")
    pipe.load_ip_adapter(state)
    return pipe.save_pretrained(out)

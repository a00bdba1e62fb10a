"""What the API needs to know about the model, read from its config and tokenizer files (no torch).

The worker is the judge of record (`MiniDallePipeline.check_inputs`); these checks answer early with a 422 so a bad
request never reaches the queue, from the same torch-free rules (`minidalle.params`).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from minidalle.embedded import default_model
from minidalle.params import min_steps_for


def resolve_model(model: str) -> str:
    return model or default_model()


def _config(model: str, filename: str) -> dict:
    if os.path.isdir(model):
        return json.loads((Path(model) / filename).read_text())
    from huggingface_hub import hf_hub_download  # hub id: same files, from the local cache or the hub

    return json.loads(Path(hf_hub_download(model, filename)).read_text())


class ModelInfo:
    """Default resolution and prompt token counting for one model."""

    def __init__(self, model: str):
        from transformers import CLIPTokenizer  # the tokenizer class only: no torch

        self.model = model
        unet = _config(model, "unet/config.json")
        vae = _config(model, "vae/config.json")
        # the same arithmetic as diffusers' pipelines: latent size × 2^(VAE down blocks - 1)
        self.vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        self.default_size = int(unet["sample_size"]) * self.vae_factor
        self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        # the encoder adds start and end tokens to what the prompt uses
        self.max_prompt_tokens = int(self.tokenizer.model_max_length) - 2
        self.scheduler_config = _config(model, "scheduler/scheduler_config.json")
        # the image side (a folder says; a hub repo is not asked: the worker is the judge there)
        self.has_diffusion_prior = _has(model, "diffusion_prior/config.json")
        self.has_image_encoder = _has(model, "image_encoder/config.json")
        self.has_ip_adapter = _has(model, "ip_adapter/ip-adapter.safetensors")

    def min_steps(self, scheduler: str | None) -> int:
        """Fewest denoising steps `scheduler` (None: the model's own) runs with on this model."""
        return min_steps_for(scheduler, self.scheduler_config)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)


def _has(model: str, filename: str) -> bool:
    return (Path(model) / filename).is_file() if os.path.isdir(model) else True


@lru_cache(maxsize=4)
def get_model_info(model: str) -> ModelInfo:
    return ModelInfo(resolve_model(model))

"""Synthetic adapter folders for tests (core tests and the service's ownership tests)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def build_adapter(out_dir: str | os.PathLike, *, unet_config, prior_config=None, seed: int = 0, rank: int = 4,
                  alpha: float = 8.0, magnitude: float = 0.3, meta: dict | None = None) -> Path:
    """Write an adapter folder with random, non-zero LoRA (+ prior MLP when `prior_config` is given).

    The LoRA is made the way the trainer makes it (peft `add_adapter` on a UNet, `get_peft_model_state_dict`), on a
    UNet built from `unet_config` alone, so no pipeline's state is touched.
    """
    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    from minidalle.adapters import LoraSettings, save_adapter
    from minidalle.prior import PriorMLP

    gen = torch.Generator().manual_seed(seed)
    settings = LoraSettings(rank=rank, alpha=alpha, dropout=0.0)
    unet = UNet2DConditionModel.from_config(unet_config)
    unet.add_adapter(settings.peft_config())
    lora = {k: v.clone() for k, v in get_peft_model_state_dict(unet).items()}
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    for k, v in lora.items():  # peft starts lora_B at zero (a no-op adapter); ours must change images
        lora[k] = torch.randn(v.shape, generator=gen) * magnitude
    prior = None
    if prior_config is not None:
        mlp = PriorMLP(prior_config["in_dim"], prior_config["hidden_dim"], prior_config["out_dim"])
        prior = {k: torch.randn(v.shape, generator=gen) * magnitude for k, v in mlp.state_dict().items()}
    return save_adapter(out_dir, lora=lora, prior=prior, settings=settings,
                        meta={"base_model": "test", "steps": 0, **(meta or {})})

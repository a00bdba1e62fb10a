"""Schedulers by name. Each is a diffusers scheduler built from the model's own scheduler config."""

from __future__ import annotations

import minidalle._quiet  # noqa: F401  (first: quiets diffusers' first import)
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

# name -> (class, extra config); names follow the usual community spellings (A1111 / ComfyUI)
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpmpp_2s": (DPMSolverSinglestepScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def scheduler_names() -> list[str]:
    return sorted(SCHEDULERS)


def check_scheduler_name(name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: unknown scheduler {name!r}; choose one of {', '.join(scheduler_names())}")


def min_inference_steps(scheduler) -> int:
    """Fewest denoising steps a scheduler can run: PNDM with its Runge-Kutta warm-up (`skip_prk_steps` off, as a
    DDIM-style config leaves it) needs 4; SD 1.5's own PNDM config skips it, and the others run with 1."""
    if isinstance(scheduler, PNDMScheduler) and not scheduler.config.get("skip_prk_steps", False):
        return 4
    return 1


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler of kind `name` configured like the model's own (betas, prediction type, timesteps)."""
    check_scheduler_name(name)
    cls, extra = SCHEDULERS[name]
    return cls.from_config({**base_config, **extra})

"""Schedulers by name. Each is a diffusers scheduler built from the model's own scheduler config."""

from __future__ import annotations

import minidalle._quiet  # noqa: F401  (first: quiets diffusers' first import)
from typing import Any

import diffusers

from minidalle.errors import InvalidInput
from minidalle.params import SCHEDULER_NAMES
from minidalle.params import SCHEDULERS as _BY_NAME
from minidalle.params import min_inference_steps as _min_steps

# name -> (diffusers class, extra config), from the torch-free table in minidalle.params
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    name: (getattr(diffusers, cls), extra) for name, (cls, extra) in _BY_NAME.items()
}


def scheduler_names() -> list[str]:
    return list(SCHEDULER_NAMES)


def check_scheduler_name(name: str) -> None:
    if name not in SCHEDULERS:
        raise InvalidInput("scheduler", f"unknown scheduler {name!r}; choose one of {', '.join(scheduler_names())}")


def min_inference_steps(scheduler) -> int:
    """Fewest denoising steps this scheduler can run (see `minidalle.params.min_inference_steps`)."""
    return _min_steps(type(scheduler).__name__, dict(scheduler.config))


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler of kind `name` configured like the model's own (betas, prediction type, timesteps)."""
    check_scheduler_name(name)
    cls, extra = SCHEDULERS[name]
    return cls.from_config({**base_config, **extra})

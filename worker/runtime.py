"""The per-process resident pipeline and adapter activation. Imports torch (through minidalle) lazily."""

from __future__ import annotations

import logging
import threading

from jobs.volume import Volume
from minidalle.errors import InvalidInput
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)
_lock = threading.Lock()
_pipe = None


def get_pipeline(settings: WorkerSettings):
    """Build the pipeline once per process (base + prior) and keep it resident."""
    global _pipe
    with _lock:
        if _pipe is None:
            import torch

            from minidalle import MiniDallePipeline

            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            log.info("loading model %s", settings.model or "(embedded default)")
            _pipe = MiniDallePipeline.from_pretrained(settings.model or None, torch_dtype=settings.torch_dtype or None,
                                                      device=settings.device or None,
                                                      max_loaded_adapters=settings.adapter_cache_size)
            log.info("model loaded on %s (%s)", _pipe.device, _pipe.dtype)
        return _pipe


def pipeline_loaded() -> bool:
    return _pipe is not None


def activate_adapter(pipe, volume: Volume, name: str) -> str:
    """Make adapter `name` resident (LRU-cached by the pipeline; reloaded only when its files changed)."""
    if not volume.adapter_exists(name):
        raise InvalidInput("adapters", f"adapter {name!r} not found")
    return pipe.load_adapter(volume.adapter(name), name=name)

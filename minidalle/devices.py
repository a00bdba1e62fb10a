"""Which device and dtype a pipeline (or a fine-tune) runs on: one rule for the library, the CLI and the worker."""

from __future__ import annotations

import torch

from minidalle.errors import InvalidInput
from minidalle.params import DTYPE_ALIASES

DTYPE_NAMES = {name: getattr(torch, torch_name) for name, torch_name in DTYPE_ALIASES.items()}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`: CUDA when present, else the CPU. A named device must exist on this machine (else InvalidInput,
    rather than an error from deep inside `.to()`)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidInput("device", f"{device!r} is not a device name (cpu, cuda, cuda:1, mps, …)") from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= n:
            raise InvalidInput("device", f"{device} is not available (this machine has {n} CUDA device(s))")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInput("device", f"{device} is not available on this machine")
    return dev


def resolve_dtype(torch_dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A dtype or its name; `None`: half precision on a GPU (the SD 1.5 norm), fp32 elsewhere (CPUs have no fast
    fp16 matmul)."""
    if isinstance(torch_dtype, str):
        if torch_dtype not in DTYPE_NAMES:
            raise InvalidInput("torch_dtype", f"unknown dtype {torch_dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
        torch_dtype = DTYPE_NAMES[torch_dtype]
    if torch_dtype is not None:
        return torch_dtype
    return torch.float16 if device.type == "cuda" else torch.float32


def training_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The weights' dtype when the trainer loads the model itself: what mixed precision asks for ("fp16", "bf16";
    "no": fp32), else ("auto") the device's default (`resolve_dtype`)."""
    if mixed_precision == "no":
        return torch.float32
    return resolve_dtype(mixed_precision if mixed_precision in DTYPE_NAMES else None, device)

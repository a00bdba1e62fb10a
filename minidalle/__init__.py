"""minidalle: CLIP → diffusion prior → LoRA-UNet text-to-image, with LoRA fine-tuning.

Names are imported lazily: `import minidalle` (and a CLI error message) doesn't pay for torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from minidalle.errors import Cancelled

__version__ = "0.1.0"

_LAZY = {
    "MiniDallePipeline": "minidalle.pipeline",
    "GenerationOutput": "minidalle.pipeline",
    "Prior": "minidalle.prior",
    "default_model": "minidalle.embedded",
}

if TYPE_CHECKING:
    from minidalle.embedded import default_model
    from minidalle.pipeline import GenerationOutput, MiniDallePipeline
    from minidalle.prior import Prior


def __getattr__(name: str) -> Any:
    if name == "DEFAULT_MODEL":
        return importlib.import_module("minidalle.embedded").default_model()
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minidalle' has no attribute {name!r}")


__all__ = ["Cancelled", "DEFAULT_MODEL", "GenerationOutput", "MiniDallePipeline", "Prior", "__version__",
           "default_model"]

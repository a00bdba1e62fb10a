"""The models that ship inside the package, found without importing torch (the API uses this too).

`tiny-shapes` (trained by `minidalle train-base`) is the default; `tiny-random` (random weights, rebuilt by
`python -m minidalle.tiny.build`) is what the core tests run on. Both are in the Stable Diffusion 1.5 folder layout
plus `prior/`, so they load through the ordinary `MiniDallePipeline.from_pretrained`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

MODELS_DIR = Path(str(resources.files("minidalle") / "models"))
TINY_SHAPES = MODELS_DIR / "tiny-shapes"
TINY_RANDOM = MODELS_DIR / "tiny-random"


def default_model() -> str:
    """The model used when none is named: the best embedded model that is present in the package."""
    for folder in (TINY_SHAPES, TINY_RANDOM):
        if (folder / "model_index.json").is_file():
            return str(folder)
    return str(TINY_RANDOM)

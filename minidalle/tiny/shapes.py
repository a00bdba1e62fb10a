"""Procedural "shapes" dataset: one coloured shape on a coloured background, with a caption.

"a red circle on a blue background" — 8 colours x 4 shapes x 7 backgrounds (the shape colour is never the
background colour) = 224 combinations. A fixed 15 % of them is held out: never drawn for training, used by
`minidalle.tiny.evaluate` to measure whether the model composes words it has only seen apart.

Shapes have integer sizes and positions so that the judge (`minidalle.tiny.judge`) can match real images exactly.
Everything is seeded and deterministic (numpy Generator, no global state).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from minidalle.errors import InvalidInput

# Colours far apart in RGB (min pairwise distance ~80) so the nearest-palette rule is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 225, 40),
    "purple": (140, 45, 185),
    "orange": (250, 135, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUNDS: tuple[str, ...] = COLORS  # 7 usable per shape colour, since shape colour != background colour

HELDOUT_FRACTION = 0.15
_HELDOUT_SEED = 20240  # fixed forever: changing it silently moves combinations between train and held-out
SIZE_RANGE = (0.38, 0.72)  # shape side as a fraction of the image side: large enough to read at 32 px
MARGIN = 0.07  # fraction of the side kept as pure background around the shape: the judge reads it
COLOR_JITTER = 6  # +- per channel, per image: real-looking variation that never crosses palette boundaries
SUPERSAMPLE = 4  # anti-aliasing factor for rendering shape coverage

WORDS: tuple[str, ...] = ("a", "an", "on", "background", *COLORS, *SHAPES)


@dataclass(frozen=True)
class Combo:
    shape_color: str
    shape: str
    background_color: str

    @property
    def caption(self) -> str:
        return caption(self.shape_color, self.shape, self.background_color)


@dataclass(frozen=True)
class Concept:
    """An invented word bound to a shape and colour, for the LoRA-teaching test."""

    word: str = "zorb"
    shape_color: str = "orange"
    shape: str = "cross"

    def caption(self, background_color: str) -> str:
        return f"{article(self.word)} {self.word} on {article(background_color)} {background_color} background"


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def caption(shape_color: str, shape: str, background_color: str) -> str:
    """ "a red circle on an orange background" """
    return f"{article(shape_color)} {shape_color} {shape} on {article(background_color)} {background_color} background"


def all_combos() -> list[Combo]:
    return [
        Combo(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS if b != c
    ]


@lru_cache(maxsize=1)
def _split() -> tuple[tuple[Combo, ...], tuple[Combo, ...]]:
    combos = all_combos()
    rng = np.random.default_rng(_HELDOUT_SEED)
    order = rng.permutation(len(combos))
    n_held = round(HELDOUT_FRACTION * len(combos))
    held = sorted(order[:n_held].tolist())
    held_set = set(held)
    train = tuple(combos[i] for i in range(len(combos)) if i not in held_set)
    return train, tuple(combos[i] for i in held)


def train_combos() -> tuple[Combo, ...]:
    return _split()[0]


def heldout_combos() -> tuple[Combo, ...]:
    return _split()[1]


def _check_resolution(resolution: int) -> None:
    if not isinstance(resolution, int) or resolution < 16:
        raise InvalidInput("resolution", f"must be an int >= 16, got {resolution!r}")


def size_range(resolution: int) -> tuple[int, int]:
    """Inclusive range of shape sides (pixels) the dataset draws at this resolution."""
    _check_resolution(resolution)
    return round(SIZE_RANGE[0] * resolution), round(SIZE_RANGE[1] * resolution)


def margin(resolution: int) -> int:
    return max(1, round(MARGIN * resolution))


@lru_cache(maxsize=512)
def coverage(shape: str, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of `shape` drawn in a size x size box. (size, size) float32."""
    if shape not in SHAPES:
        raise InvalidInput("shape", f"must be one of {SHAPES}, got {shape!r}")
    n = size * SUPERSAMPLE
    # sample centres in box coordinates [0, 1]
    t = (np.arange(n) + 0.5) / n
    y, x = np.meshgrid(t, t, indexing="ij")
    if shape == "circle":
        inside = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    elif shape == "square":
        inside = np.ones((n, n), dtype=bool)
    elif shape == "triangle":  # apex at top centre, base along the bottom edge
        inside = np.abs(x - 0.5) <= 0.5 * y
    else:  # cross: a plus sign with arms one third of the side thick
        inside = (np.abs(x - 0.5) <= 1 / 6) | (np.abs(y - 0.5) <= 1 / 6)
    cov = inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    cov.setflags(write=False)
    return cov.astype(np.float32)


def template(shape: str, size: int) -> np.ndarray:
    """Binary mask of the shape (coverage >= 0.5) in its size x size box; what the judge compares against."""
    return coverage(shape, size) >= 0.5


def render(
    shape_color: str,
    shape: str,
    background_color: str,
    *,
    size: int,
    x: int,
    y: int,
    resolution: int,
    jitter: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """One image as uint8 (resolution, resolution, 3); (x, y) is the top-left corner of the shape's box."""
    _check_resolution(resolution)
    for name, value in (("shape_color", shape_color), ("background_color", background_color)):
        if value not in PALETTE:
            raise InvalidInput(name, f"must be one of {COLORS}, got {value!r}")
    if not (0 <= x and 0 <= y and x + size <= resolution and y + size <= resolution and size > 0):
        raise ValueError(f"shape box (x={x}, y={y}, size={size}) does not fit in {resolution} px")
    fg = np.array(PALETTE[shape_color], dtype=np.float32)
    bg = np.array(PALETTE[background_color], dtype=np.float32)
    if jitter is not None:
        fg, bg = fg + jitter[0], bg + jitter[1]
    img = np.empty((resolution, resolution, 3), dtype=np.float32)
    img[:] = bg
    a = coverage(shape, size)[..., None]  # (size, size, 1)
    img[y : y + size, x : x + size] = bg * (1 - a) + fg * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sample(combo: Combo, rng: np.random.Generator, resolution: int) -> np.ndarray:
    """Draw size, position and colour jitter for `combo` and render it."""
    lo, hi = size_range(resolution)
    m = margin(resolution)
    size = int(rng.integers(lo, hi + 1))
    x, y = (int(v) for v in rng.integers(m, resolution - m - size + 1, size=2))
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=(2, 3)).astype(np.float32)
    return render(
        combo.shape_color, combo.shape, combo.background_color,
        size=size, x=x, y=y, resolution=resolution, jitter=(jitter[0], jitter[1]),
    )


def _combos_for(split: str) -> tuple[Combo, ...]:
    if split == "train":
        return train_combos()
    if split == "heldout":
        return heldout_combos()
    raise InvalidInput("split", f"must be 'train' or 'heldout', got {split!r}")


def make_dataset(
    n: int, *, seed: int, split: str = "train", resolution: int = 32, progress: bool = False
) -> tuple[np.ndarray, list[Combo]]:
    """`n` images (n, resolution, resolution, 3) uint8 and their combos, drawn uniformly over the split."""
    if not isinstance(n, int) or n < 0:
        raise InvalidInput("n", f"must be a non-negative int, got {n!r}")
    combos = _combos_for(split)
    _check_resolution(resolution)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(combos), size=n)
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    chosen = []
    for i in tqdm(range(n), desc=f"shapes[{split}]", disable=not progress, leave=False):
        combo = combos[picks[i]]
        images[i] = sample(combo, rng, resolution)
        chosen.append(combo)
    return images, chosen


def _write(out_dir: str | Path, items: list[tuple[np.ndarray, str]]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(items))))
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, (img, text) in enumerate(items):
            name = f"{i:0{width}d}.png"
            Image.fromarray(img).save(out / name)
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return out


def write_imagefolder(
    out_dir: str | Path, n: int, *, seed: int, split: str = "train", resolution: int = 32
) -> Path:
    """Write `n` PNGs plus `metadata.jsonl` ({"file_name", "text"}: the HF imagefolder layout)."""
    images, combos = make_dataset(n, seed=seed, split=split, resolution=resolution, progress=True)
    return _write(out_dir, [(img, c.caption) for img, c in zip(images, combos, strict=True)])


def concept_dataset(
    n: int, *, seed: int, concept: Concept = Concept(), resolution: int = 32
) -> tuple[np.ndarray, list[str]]:
    """`n` images of the concept on varied backgrounds, captioned with the invented word."""
    if not isinstance(n, int) or n < 1:
        raise InvalidInput("n", f"must be a positive int, got {n!r}")
    if concept.shape not in SHAPES:
        raise InvalidInput("concept.shape", f"must be one of {SHAPES}, got {concept.shape!r}")
    if concept.shape_color not in PALETTE:
        raise InvalidInput("concept.shape_color", f"must be one of {COLORS}, got {concept.shape_color!r}")
    rng = np.random.default_rng(seed)
    backgrounds = [b for b in BACKGROUNDS if b != concept.shape_color]
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        bg = backgrounds[i % len(backgrounds)]  # cycle so every background appears
        images[i] = sample(Combo(concept.shape_color, concept.shape, bg), rng, resolution)
        captions.append(concept.caption(bg))
    return images, captions


def write_concept_imagefolder(
    out_dir: str | Path, n: int = 12, *, seed: int = 0, concept: Concept = Concept(), resolution: int = 32,
    n_regular: int = 0,
) -> Path:
    """`n` concept images, plus `n_regular` ordinary training images (DreamBooth-style prior preservation:
    they keep the fine-tune from teaching "everything is orange" along with the new word)."""
    images, captions = concept_dataset(n, seed=seed, concept=concept, resolution=resolution)
    items = list(zip(images, captions, strict=True))
    if n_regular:
        reg, combos = make_dataset(n_regular, seed=seed + 1, split="train", resolution=resolution)
        items += [(img, c.caption) for img, c in zip(reg, combos, strict=True)]
    return _write(out_dir, items)

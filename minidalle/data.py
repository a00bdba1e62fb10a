"""Fine-tuning datasets from a folder: HF imagefolder (`metadata.jsonl`) or kohya style (`img.png` + `img.txt`).

Every file is checked before training starts; a broken, missing, non-image or over-large file is a ValueError that
names it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from minidalle.errors import InvalidInput

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MAX_FILE_BYTES = 32 * 1024 * 1024  # a single training image above this is almost surely a mistake (or an attack)
MAX_PIXELS = 40_000_000  # ~ 6300×6300: far above any training resolution, well below a decompression bomb


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


def scan_dataset(folder: str | os.PathLike, *, max_file_bytes: int = MAX_FILE_BYTES,
                 max_pixels: int = MAX_PIXELS) -> list[Example]:
    """List and validate (image, caption) pairs. Raises InvalidInput naming the offending file."""
    root = Path(folder)
    if not root.is_dir():
        raise InvalidInput("dataset_dir", f"{folder} is not a folder")
    meta = root / "metadata.jsonl"
    examples = _scan_imagefolder(root, meta) if meta.is_file() else _scan_kohya(root)
    if not examples:
        raise InvalidInput("dataset_dir", f"{folder} holds no images (expected metadata.jsonl or img.png + img.txt "
                           "pairs)")
    for ex in examples:
        _check_image(ex.path, max_file_bytes, max_pixels)
    return examples


def _scan_imagefolder(root: Path, meta: Path) -> list[Example]:
    examples = []
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInput("dataset_dir", f"metadata.jsonl line {lineno}: not JSON ({e.msg})") from e
        except RecursionError as e:
            raise InvalidInput("dataset_dir", f"metadata.jsonl line {lineno}: nested too deeply") from e
        ok = isinstance(rec, dict) and isinstance(rec.get("file_name"), str) and isinstance(rec.get("text"), str)
        if not ok:
            raise InvalidInput("dataset_dir", f"metadata.jsonl line {lineno}: needs string fields 'file_name' and "
                               "'text'")
        path = (root / rec["file_name"]).resolve()
        if root.resolve() not in path.parents:
            raise InvalidInput("dataset_dir", f"metadata.jsonl line {lineno}: file_name {rec['file_name']!r} points "
                               "outside the dataset")
        if not path.is_file():
            raise InvalidInput("dataset_dir", f"{rec['file_name']}: listed in metadata.jsonl line {lineno} but missing")
        examples.append(Example(path, rec["text"].strip()))
    return examples


def _scan_kohya(root: Path) -> list[Example]:
    examples = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
        cap = path.with_suffix(".txt")
        if not cap.is_file():
            raise InvalidInput("dataset_dir", f"{path.relative_to(root)}: no caption file {cap.name}")
        examples.append(Example(path, cap.read_text(encoding="utf-8").strip()))
    return examples


def _check_image(path: Path, max_file_bytes: int, max_pixels: int, field: str = "dataset_dir") -> None:
    if not path.is_file():
        raise InvalidInput(field, f"{path} is not a file")
    size = path.stat().st_size
    if size > max_file_bytes:
        raise InvalidInput(field, f"{path.name}: {size} bytes, above the {max_file_bytes}-byte limit")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise InvalidInput(field, f"{path.name}: {w}x{h} pixels, above the {max_pixels}-pixel limit")
            im.verify()
        with Image.open(path) as im:
            im.load()  # verify() misses truncated pixel data
    except ValueError:
        raise
    except Exception as e:  # PIL raises many types for broken files
        raise InvalidInput(field, f"{path.name}: not a readable image ({type(e).__name__}: {e})") from e


def read_image(path: str | os.PathLike, *, field: str = "image", max_file_bytes: int = MAX_FILE_BYTES,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """One image file, checked as a dataset's images are (size, pixels, a whole decode), as an RGB PIL image."""
    path = Path(path)
    _check_image(path, max_file_bytes, max_pixels, field)
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def dataset_hash(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.caption.encode())
        h.update(hashlib.sha256(ex.path.read_bytes()).digest())
    return h.hexdigest()[:16]


def load_image(path: Path, resolution: int, flip: bool = False) -> torch.Tensor:
    """RGB, shorter side resized to `resolution`, centre-cropped, in [-1, 1]: (3, R, R)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.Resampling.BICUBIC)
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        if flip:
            im = ImageOps.mirror(im)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

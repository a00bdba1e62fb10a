"""A deterministic judge of one generated shapes image: which colours, which shape, and how well it fits.

1. background colour: nearest palette colour to the median of the border pixels (the dataset keeps a margin);
2. shape mask: pixels whose distance from that median is more than half the shape's contrast (the 98th
   percentile distance: the smallest shape covers > 5 % of the image), i.e. closer to the shape colour than to
   the background; no mask when nothing stands out;
3. shape colour: nearest palette colour to the median of the mask pixels;
4. shape: the template (any shape, any size in the dataset's range +- 2 px, any position near the mask's
   centroid) with the best IoU against the mask. Strict rule: the shape is named only when that IoU >= 0.7,
   otherwise it is None — a blob that merely has the right colour does not count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from minidalle.errors import InvalidInput
from minidalle.tiny.shapes import COLORS, PALETTE, SHAPES, size_range, template

IOU_THRESHOLD = 0.7
MIN_CONTRAST = 40.0  # RGB distance below which nothing "stands out" from the background: no shape drawn
_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # (8, 3)
_SEARCH = 2  # +- pixels around the centroid-aligned position, and +- sizes around the dataset range


@dataclass(frozen=True)
class Verdict:
    shape_color: str | None
    background_color: str
    shape: str | None  # None unless the best template has IoU >= IOU_THRESHOLD
    iou: float
    best_template: str | None  # the best-fitting shape regardless of IoU (for diagnostics)

    def as_dict(self) -> dict:
        return asdict(self)


def nearest_color(rgb: np.ndarray) -> str:
    d = ((_PALETTE - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=1)
    return COLORS[int(np.argmin(d))]


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] != arr.shape[1]:
        raise InvalidInput("image", f"must be a square RGB image (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise InvalidInput("image", f"must be uint8 RGB, got dtype {arr.dtype}")
    return arr.astype(np.float32)


def _border(arr: np.ndarray) -> np.ndarray:
    return np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])  # (4R-4, 3)


@lru_cache(maxsize=8)
def _templates(resolution: int) -> list[tuple[str, int, np.ndarray, float, float]]:
    """(shape, size, mask, centroid_y, centroid_x) for every shape and size the judge tries."""
    lo, hi = size_range(resolution)
    out = []
    for shape in SHAPES:
        for size in range(max(3, lo - _SEARCH), min(resolution, hi + _SEARCH) + 1):
            m = template(shape, size)
            ys, xs = np.nonzero(m)
            out.append((shape, size, m, float(ys.mean()), float(xs.mean())))
    return out


def best_template(mask: np.ndarray) -> tuple[str | None, float]:
    """Best-IoU template for a boolean mask: (shape, iou); (None, 0.0) for an empty mask."""
    area = int(mask.sum())
    if area == 0:
        return None, 0.0
    res = mask.shape[0]
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    best_shape, best_iou = None, -1.0
    for shape, size, tmpl, ty, tx in _templates(res):
        t_area = int(tmpl.sum())
        y0c, x0c = int(round(cy - ty)), int(round(cx - tx))
        for y0 in range(y0c - _SEARCH, y0c + _SEARCH + 1):
            for x0 in range(x0c - _SEARCH, x0c + _SEARCH + 1):
                # intersection of the template placed at (y0, x0) with the mask, clipped to the image
                ya, yb = max(0, y0), min(res, y0 + size)
                xa, xb = max(0, x0), min(res, x0 + size)
                if ya >= yb or xa >= xb:
                    continue
                inter = int((mask[ya:yb, xa:xb] & tmpl[ya - y0 : yb - y0, xa - x0 : xb - x0]).sum())
                iou = inter / (area + t_area - inter)  # template pixels outside the image count as misses
                if iou > best_iou:
                    best_shape, best_iou = shape, iou
    return best_shape, best_iou


def shape_mask(image) -> tuple[np.ndarray, np.ndarray]:
    """(mask (R, R) bool, background median RGB (3,)) for an image."""
    arr = _to_array(image)
    bg = np.median(_border(arr), axis=0)
    dist = np.sqrt(((arr - bg) ** 2).sum(axis=-1))  # (R, R)
    peak = float(np.percentile(dist, 98))  # the shape's own contrast; a few stray pixels cannot raise the bar
    if peak < MIN_CONTRAST:
        return np.zeros(dist.shape, dtype=bool), bg
    return dist > 0.5 * peak, bg


def judge(image) -> Verdict:
    """Judge a PIL image or a uint8 (R, R, 3) array."""
    arr = _to_array(image)
    mask, bg = shape_mask(arr.astype(np.uint8))
    background = nearest_color(bg)
    if not mask.any():
        return Verdict(None, background, None, 0.0, None)
    shape_color = nearest_color(np.median(arr[mask], axis=0))
    shape, iou = best_template(mask)
    return Verdict(shape_color, background, shape if iou >= IOU_THRESHOLD else None, float(iou), shape)

"""PNG files that carry their generation parameters (A1111 `parameters` text chunk + full JSON)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from minidalle._fs import chmod_like_new
from minidalle.a1111 import infotext


def format_parameters(meta: dict[str, Any]) -> str:
    """The A1111 'parameters' text (`minidalle.a1111.infotext`): what A1111-style readers parse."""
    from minidalle import __version__

    return infotext(meta, version=f"minidalle {__version__}")


def save_png(image: Image.Image, path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename): a reader sees the whole PNG or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", format_parameters(meta))
    info.add_text("minidalle", json.dumps(meta, sort_keys=True))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        chmod_like_new(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata written by save_png (empty dict for other PNGs)."""
    with Image.open(path) as im:
        text = im.text.get("minidalle") if hasattr(im, "text") else None
    return json.loads(text) if text else {}

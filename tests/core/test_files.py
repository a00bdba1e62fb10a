"""Atomic writes keep normal permissions (temp files are private until renamed into place)."""

from __future__ import annotations

import os
import stat

from PIL import Image

from minidalle.png import read_parameters, save_png


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_png_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a" / "0.png", {"prompt": "p", "seed": 3})
    finally:
        os.umask(old)
    assert mode(path) == 0o644
    assert read_parameters(path) == {"prompt": "p", "seed": 3}
    assert Image.open(path).text["parameters"].startswith("p\n")
    assert [p.name for p in path.parent.iterdir()] == ["0.png"]  # no temp file left behind


def test_adapter_folder_mode_follows_umask(tmp_path, make_adapter):
    old = os.umask(0o022)
    try:
        folder = make_adapter("modes")
    finally:
        os.umask(old)
    assert mode(folder) == 0o755
    assert all(mode(f) == 0o644 for f in folder.iterdir())

"""Dataset folders: both caption conventions, and every bad file named before training starts."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from minidalle.data import dataset_hash, load_image, scan_dataset


def png(path, size=(20, 10), color=(255, 0, 0)):
    Image.new("RGB", size, color).save(path)
    return path


def test_imagefolder(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    png(tmp_path / "sub" / "b.png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": " a red thing "}) + "\n\n"
        + json.dumps({"file_name": "sub/b.png", "text": "another"}) + "\n")
    ex = scan_dataset(tmp_path)
    assert [(e.path.name, e.caption) for e in ex] == [("a.png", "a red thing"), ("b.png", "another")]


def test_kohya(tmp_path):
    png(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("caption x\n")
    png(tmp_path / "y.jpg")
    (tmp_path / "y.txt").write_text("caption y")
    assert [e.caption for e in scan_dataset(tmp_path)] == ["caption x", "caption y"]


@pytest.mark.parametrize("case,match", [
    ("missing_caption", "x.png: no caption"),
    ("not_image", "x.png: not a readable image"),
    ("truncated", "x.png: not a readable image"),
    ("too_big", "x.png: .* bytes, above"),
    ("too_many_pixels", "x.png: 200x200 pixels, above"),
    ("outside", "points outside the dataset"),
    ("missing_file", "gone.png: listed in metadata.jsonl line 1 but missing"),
    ("bad_json", "metadata.jsonl line 1: not JSON"),
    ("no_fields", "metadata.jsonl line 1: needs string fields"),
    ("empty", "holds no images"),
])
def test_bad_files_are_named(tmp_path, case, match):
    kw = {}
    if case != "empty" and case not in ("outside", "missing_file", "bad_json", "no_fields"):
        path = png(tmp_path / "x.png", size=(200, 200))
        if case != "missing_caption":
            (tmp_path / "x.txt").write_text("c")
        if case == "not_image":
            path.write_bytes(b"hello")
        if case == "truncated":
            path.write_bytes(path.read_bytes()[:60])
        if case == "too_big":
            kw["max_file_bytes"] = 10
        if case == "too_many_pixels":
            kw["max_pixels"] = 100 * 100
    meta = {"outside": {"file_name": "../x.png", "text": "t"}, "missing_file": {"file_name": "gone.png", "text": "t"},
            "no_fields": {"file": "x.png"}}
    if case in meta:
        (tmp_path / "metadata.jsonl").write_text(json.dumps(meta[case]) + "\n")
    if case == "bad_json":
        (tmp_path / "metadata.jsonl").write_text("{nope\n")
    with pytest.raises(ValueError, match=match):
        scan_dataset(tmp_path, **kw)


def test_load_image_resizes_and_centre_crops(tmp_path):
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 6, 10))  # white left strip: cropped away by a centre crop
    img.save(tmp_path / "w.png")
    t = load_image(tmp_path / "w.png", 8)
    assert t.shape == (3, 8, 8) and t.min() >= -1 and t.max() <= 1
    assert torch.allclose(t, torch.full_like(t, -1.0), atol=0.05)  # only the black centre is left
    flipped = load_image(tmp_path / "w.png", 8, flip=True)
    assert torch.equal(flipped, torch.flip(t, dims=[2]))


def test_dataset_hash_tracks_content(tmp_path):
    png(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("one")
    h1 = dataset_hash(scan_dataset(tmp_path))
    (tmp_path / "x.txt").write_text("two")
    assert dataset_hash(scan_dataset(tmp_path)) != h1

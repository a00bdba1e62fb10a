"""Safe extraction and validation of dataset zips (service.datasets; no servers needed)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from _support.fixtures import make_zip, png_bytes
from PIL import Image

from service.datasets import Limits, UploadRejected, extract_dataset

LIMITS = Limits(max_members=50, max_uncompressed_bytes=5_000_000, max_image_pixels=256 * 256)
ID = "0" * 32


def _extract(tmp_path: Path, data: bytes, limits: Limits = LIMITS):
    return extract_dataset(io.BytesIO(data), tmp_path / "datasets", ID, limits)


def _rejected(tmp_path: Path, data: bytes, limits: Limits = LIMITS) -> str:
    with pytest.raises(UploadRejected) as e:
        _extract(tmp_path, data, limits)
    assert e.value.status == 422 and e.value.field == "file"
    assert str(e.value).startswith("file: ")
    # a rejected upload leaves nothing behind, and nothing was written outside the datasets folder
    assert not (tmp_path / "datasets" / ID).exists()
    if (tmp_path / "datasets").exists():
        assert list((tmp_path / "datasets").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["datasets"])
    return str(e.value)


def test_kohya_pairs_extracted_with_warnings(tmp_path):
    data = make_zip({"a.png": png_bytes(), "a.txt": b"a red square", "b.jpg": _jpeg(), "b.txt": b" ",
                     "orphan.txt": b"no image", "__MACOSX/._a.png": b"junk", ".DS_Store": b"junk"})
    ds = _extract(tmp_path, data)
    assert ds.images == 2
    assert (tmp_path / "datasets" / ID / "a.png").read_bytes() == png_bytes()
    assert any("orphan.txt" in w for w in ds.warnings)
    assert any("'b.jpg' has an empty caption" in w for w in ds.warnings)
    assert any("ignored 2 hidden" in w for w in ds.warnings)
    assert not (tmp_path / "datasets" / ID / "__MACOSX").exists()
    assert json.loads((tmp_path / "datasets" / ID / "dataset.json").read_text())["images"] == 2


def test_metadata_jsonl_and_single_top_folder_is_stripped(tmp_path):
    meta = "\n".join(json.dumps({"file_name": f, "text": f"caption {f}"}) for f in ("x.png", "sub/y.png"))
    data = make_zip({"set/metadata.jsonl": meta.encode(), "set/x.png": png_bytes(), "set/sub/y.png": png_bytes(),
                     "set/unlisted.png": png_bytes()})
    ds = _extract(tmp_path, data)
    assert ds.images == 2
    assert (tmp_path / "datasets" / ID / "metadata.jsonl").is_file()
    assert (tmp_path / "datasets" / ID / "sub" / "y.png").is_file()
    assert any("unlisted.png" in w for w in ds.warnings)


def test_extracted_dataset_passes_the_libraries_scan(tmp_path):
    from minidalle.data import scan_dataset

    _extract(tmp_path, make_zip({"d/a.png": png_bytes(), "d/a.txt": b"a red square"}))
    examples = scan_dataset(tmp_path / "datasets" / ID)
    assert [(e.path.name, e.caption) for e in examples] == [("a.png", "a red square")]


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "ok/../../../etc/x.txt"])
def test_dotdot_member_rejected(tmp_path, name):
    msg = _rejected(tmp_path, make_zip({"a.png": png_bytes(), "a.txt": b"x", name: png_bytes()}))
    assert repr(name) in msg and ".." in msg
    assert not (tmp_path / "evil.png").exists()


@pytest.mark.parametrize("name", ["/etc/evil.png", "C:/evil.png", "\\\\server\\evil.png"])
def test_absolute_member_rejected(tmp_path, name):
    msg = _rejected(tmp_path, make_zip({"a.png": png_bytes(), "a.txt": b"x", name: png_bytes()}))
    assert "absolute path" in msg


def test_symlink_member_rejected(tmp_path):
    msg = _rejected(tmp_path, make_zip({"a.png": png_bytes(), "a.txt": b"x"}, symlinks={"link.png": "/etc/passwd"}))
    assert "'link.png' is a symbolic link" in msg


def test_too_many_members_rejected(tmp_path):
    entries = {f"{i}.txt": b"x" for i in range(51)}
    assert "51 members; at most 50" in _rejected(tmp_path, make_zip(entries))


def test_too_many_uncompressed_bytes_rejected(tmp_path):
    data = make_zip({"a.png": png_bytes(), "a.txt": b"x" * 6_000_000})  # compresses to a few KB
    assert "expands to" in _rejected(tmp_path, data)


def test_member_lying_about_its_size_rejected(tmp_path):
    data = make_zip({"a.png": png_bytes(), "a.txt": b"y" * 100_000})
    patched = _patch_declared_size(data, "a.txt", 10)
    msg = _rejected(tmp_path, patched)
    assert "'a.txt'" in msg and ("beyond its declared size" in msg or "Bad CRC-32" in msg)


def test_not_an_image_rejected(tmp_path):
    msg = _rejected(tmp_path, make_zip({"a.png": b"this is not a png", "a.txt": b"x"}))
    assert "'a.png' is not a valid image" in msg


def test_unknown_file_type_rejected(tmp_path):
    msg = _rejected(tmp_path, make_zip({"a.png": png_bytes(), "a.txt": b"x", "run.sh": b"#!/bin/sh"}))
    assert "'run.sh' is not an image" in msg


def test_decompression_bomb_rejected(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, "PNG")  # 16 Mpx of zeros: a ~16 KB file
    msg = _rejected(tmp_path, make_zip({"bomb.png": buf.getvalue(), "bomb.txt": b"x"}))
    assert "'bomb.png' is 4000x4000" in msg and "decompression bomb" in msg


def test_missing_caption_rejected(tmp_path):
    msg = _rejected(tmp_path, make_zip({"a.png": png_bytes(), "a.txt": b"x", "b.png": png_bytes()}))
    assert "'b.png' has no caption" in msg


def test_bad_metadata_line_rejected(tmp_path):
    msg = _rejected(tmp_path, make_zip({"metadata.jsonl": b'{"file_name": "a.png", "text": "x"}\n{oops',
                                        "a.png": png_bytes()}))
    assert "line 2: invalid JSON" in msg
    msg = _rejected(tmp_path, make_zip({"metadata.jsonl": b'{"file_name": "zz.png", "text": "x"}',
                                        "a.png": png_bytes()}))
    assert "'zz.png' is not an image in the archive" in msg


def test_not_a_zip_and_empty_zip_rejected(tmp_path):
    assert "not a zip archive" in _rejected(tmp_path, b"plain text")
    assert "contains no images" in _rejected(tmp_path, make_zip({"a.txt": b"x"}))


def test_duplicate_member_rejected(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, pytest.warns(UserWarning):
        zf.writestr("a.png", png_bytes())
        zf.writestr("a.png", png_bytes((0, 0, 255)))
        zf.writestr("a.txt", b"x")
    assert "appears twice" in _rejected(tmp_path, buf.getvalue())


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 128, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _patch_declared_size(data: bytes, name: str, size: int) -> bytes:
    """Rewrite `name`'s uncompressed size in both its local header and central directory entry."""
    out = bytearray(data)
    encoded = name.encode()
    pos = 0
    while (pos := out.find(b"PK\x03\x04", pos)) != -1:  # local file headers: size at +22, name at +30
        n = int.from_bytes(out[pos + 26:pos + 28], "little")
        if out[pos + 30:pos + 30 + n] == encoded:
            out[pos + 22:pos + 26] = size.to_bytes(4, "little")
        pos += 4
    pos = 0
    while (pos := out.find(b"PK\x01\x02", pos)) != -1:  # central directory: size at +24, name at +46
        n = int.from_bytes(out[pos + 28:pos + 30], "little")
        if out[pos + 46:pos + 46 + n] == encoded:
            out[pos + 24:pos + 28] = size.to_bytes(4, "little")
        pos += 4
    return bytes(out)

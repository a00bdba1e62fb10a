"""Safe extraction and validation of an uploaded dataset zip (Pillow only; no torch).

Nothing is written outside the dataset's own folder: member names are checked (no `..`, no absolute paths, no links,
no device files), files are created exclusively under a fresh temporary folder, and byte counts are enforced while
copying (a member's header may lie about its size). The folder is renamed into `datasets/{id}/` only when everything
passed, so a rejected upload leaves nothing behind.

Layouts (the same rules as `minidalle.data.scan_dataset`, which the worker runs again): a `metadata.jsonl` at the
top (lines `{"file_name": ..., "text": ...}`; then only the images it lists are used), else kohya-style `img.png` +
`img.txt` pairs, in folders or not. A zip whose members all sit in one top folder is read as if that folder were the
top (zipping a folder does that).
"""

from __future__ import annotations

import json
import shutil
import stat
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image

from jobs.volume import DATASET_INFO
from minidalle.errors import InvalidInput

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "MPO"}
CAPTION_EXT = ".txt"
METADATA_FILE = "metadata.jsonl"
INFO_FILE = DATASET_INFO
CHUNK = 1 << 20
MAX_NAME_BYTES = 200  # a file system's limit is 255 bytes a name; leave room for our temporary suffixes
MAX_DEPTH = 16


class UploadRejected(InvalidInput):
    """A bad upload (a 422 for the upload's field, `file`); the message names the offending member."""

    status = 422

    def __init__(self, message: str, *, field: str = "file"):
        super().__init__(field, message)


@dataclass
class Limits:
    max_members: int
    max_uncompressed_bytes: int
    max_image_pixels: int  # one image
    max_total_pixels: int = 2**62  # all images together: decoding them is the cost of an upload


@dataclass
class Extracted:
    dataset_id: str
    path: Path
    images: int
    warnings: list[str] = field(default_factory=list)


def _member_path(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The member's safe relative path, None for a directory entry; raises for anything unsafe."""
    name = info.filename
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        raise UploadRejected(f"member {name!r} is a symbolic link; links are not allowed")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UploadRejected(f"member {name!r} is not a regular file")
    if "\x00" in name:
        raise UploadRejected(f"member {name!r} has a NUL byte in its name")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise UploadRejected(f"member {name!r} has an absolute path")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UploadRejected(f"member {name!r} points outside the archive ('..')")
    if any(len(p.encode("utf-8", "replace")) > MAX_NAME_BYTES for p in parts) or len(parts) > MAX_DEPTH:
        raise UploadRejected(f"member {name[:80]!r}…: names are at most {MAX_NAME_BYTES} bytes a part and "
                             f"{MAX_DEPTH} folders deep")
    if info.is_dir() or kind == stat.S_IFDIR or not parts:
        return None
    return PurePosixPath(*parts)


def _ignored(rel: PurePosixPath) -> bool:
    # macOS resource forks and hidden files (.DS_Store) come with zips made in a file manager
    return rel.parts[0] == "__MACOSX" or any(p.startswith(".") for p in rel.parts)


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int) -> int:
    """Copy one member, counting real bytes; returns the bytes written."""
    written = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        out = open(target, "xb")  # exclusive: a duplicate member name can't overwrite
    except FileExistsError as e:
        raise UploadRejected(f"member {info.filename!r} appears twice in the archive") from e
    try:
        with out, zf.open(info) as src:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                if written > info.file_size or written > budget:
                    raise UploadRejected(f"member {info.filename!r} expands beyond its declared size "
                                         "or the archive's size limit")
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
        # a lying size header ends in a CRC error here; encrypted or exotic compression: not for us either
        raise UploadRejected(f"member {info.filename!r} is corrupt or unsupported ({e})") from e
    return written


def check_image(path: Path, name: str, max_pixels: int, budget: int) -> int:
    """The image's pixel count; raises unless it is a whole image of an accepted format and size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise UploadRejected(f"member {name!r} is {w}x{h} = {w * h} pixels; at most "
                                         f"{max_pixels} are allowed (decompression bomb?)")
                if w * h > budget:
                    raise UploadRejected(f"member {name!r}: the upload's images exceed the pixel budget of one "
                                         "upload; split the dataset or use smaller images")
                if im.format not in IMAGE_FORMATS:
                    raise UploadRejected(f"member {name!r} is a {im.format} image; use PNG, JPEG, WEBP or BMP")
                im.load()  # decode it all: truncated or corrupt data fails here, not in the trainer
                return w * h
    except UploadRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UploadRejected(f"member {name!r} is a decompression bomb ({e})") from e
    except Exception as e:  # any decoder error means "not a valid image"
        reason = str(e).replace(str(path), name)  # Pillow names the file: the member, not our temp path
        raise UploadRejected(f"member {name!r} is not a valid image ({type(e).__name__}: {reason})") from e


def _read_metadata(path: Path, rel: PurePosixPath, images: set[PurePosixPath]) -> dict[PurePosixPath, str]:
    captions: dict[PurePosixPath, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UploadRejected(f"member {str(rel)!r} is not UTF-8 text") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UploadRejected(f"member {str(rel)!r} line {n}: invalid JSON ({e.msg})") from e
        except RecursionError as e:  # the parser recurses: a deeply nested line would crash the request
            raise UploadRejected(f"member {str(rel)!r} line {n}: nested too deeply") from e
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(
                row.get("text"), str):
            raise UploadRejected(f"member {str(rel)!r} line {n}: needs string fields 'file_name' and 'text'")
        img = rel.parent / PurePosixPath(row["file_name"].replace("\\", "/"))
        if img not in images:
            raise UploadRejected(f"member {str(rel)!r} line {n}: file_name {row['file_name']!r} is not an "
                                 "image in the archive")
        captions[img] = row["text"]
    return captions


def extract_dataset(upload: BinaryIO, datasets_dir: Path, dataset_id: str, limits: Limits,
                    owner: str | None = None) -> Extracted:
    """Validate and extract into `datasets_dir/dataset_id`, atomically; raises UploadRejected."""
    try:
        zf = zipfile.ZipFile(upload)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UploadRejected(f"not a zip archive ({e})") from e
    datasets_dir.mkdir(parents=True, exist_ok=True)
    tmp = datasets_dir / f".incoming-{dataset_id}"
    try:
        with zf:
            result = _extract(zf, tmp, dataset_id, limits)
        info = json.loads((tmp / INFO_FILE).read_text())
        (tmp / INFO_FILE).write_text(json.dumps({**info, "owner": owner}, indent=2))  # who may use it (jobs.keys)
        final = datasets_dir / dataset_id
        tmp.rename(final)
        result.path = final
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(zf: zipfile.ZipFile, tmp: Path, dataset_id: str, limits: Limits) -> Extracted:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise UploadRejected(f"the archive has {len(infos)} members; at most {limits.max_members} are allowed")
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_uncompressed_bytes:
        raise UploadRejected(f"the archive expands to {declared} bytes; at most "
                             f"{limits.max_uncompressed_bytes} are allowed")
    members, notes = _classify(infos)
    # 1. copy, counting real bytes
    tmp.mkdir(parents=True)
    root = tmp.resolve()
    budget = limits.max_uncompressed_bytes
    for info, rel, _ in members:
        target = tmp.joinpath(*rel.parts)
        if not target.resolve().is_relative_to(root):  # belt and braces on top of the name checks
            raise UploadRejected(f"member {info.filename!r} points outside the dataset folder")
        budget -= _copy_member(zf, info, target, budget)
    # 2. every image decodes
    images = {rel for _, rel, kind in members if kind == "image"}
    if not images:
        raise UploadRejected("the archive contains no images")
    pixels = 0
    for info, rel, kind in members:
        if kind == "image":
            # the size is in the header: check the budget before decoding the next one
            pixels += check_image(tmp.joinpath(*rel.parts), info.filename, limits.max_image_pixels,
                                   limits.max_total_pixels - pixels)
    # 3. captions, by the same rules as minidalle.data.scan_dataset
    metadata = [rel for _, rel, kind in members if kind == "metadata"]
    if metadata:
        return _finish_imagefolder(tmp, dataset_id, metadata[0], images, notes)
    return _finish_kohya(tmp, dataset_id, members, images, notes)


def _classify(infos: list[zipfile.ZipInfo]) -> tuple[list[tuple[zipfile.ZipInfo, PurePosixPath, str]], list[str]]:
    """Safe relative paths and kinds (image | caption | metadata) of the members to extract, and notes."""
    members, ignored = [], 0
    for info in infos:
        rel = _member_path(info)
        if rel is None:
            continue
        if _ignored(rel):
            ignored += 1
            continue
        suffix = rel.suffix.lower()
        if rel.name == METADATA_FILE:
            kind = "metadata" if len(rel.parts) == 1 else "nested-metadata"
        elif suffix in IMAGE_EXTS:
            kind = "image"
        elif suffix == CAPTION_EXT:
            kind = "caption"
        else:
            raise UploadRejected(f"member {info.filename!r} is not an image ({', '.join(sorted(IMAGE_EXTS))}), "
                                 f"a caption (.txt) or {METADATA_FILE}")
        members.append((info, rel, kind))
    members = _strip_common_folder(members)
    for info, _rel, kind in members:
        if kind == "nested-metadata":
            raise UploadRejected(f"member {info.filename!r}: {METADATA_FILE} must be at the top of the "
                                 "archive (next to the images it lists)")
    return members, [f"ignored {ignored} hidden or __MACOSX member(s)"] if ignored else []


def _finish_kohya(tmp: Path, dataset_id: str, members: list, images: set[PurePosixPath],
                  notes: list[str]) -> Extracted:
    """img.png + img.txt: every image needs its caption file; a caption without an image is ignored."""
    captions = {rel: info.filename for info, rel, kind in members if kind == "caption"}
    for img in sorted(images):
        cap = img.with_suffix(CAPTION_EXT)
        if cap not in captions:
            raise UploadRejected(f"member {str(img)!r} has no caption; add {str(cap)!r} or a line in "
                                 f"{METADATA_FILE}")
        try:
            text = tmp.joinpath(*cap.parts).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UploadRejected(f"member {captions[cap]!r} is not UTF-8 text") from e
        if not text.strip():
            notes.append(f"image {str(img)!r} has an empty caption")
    used = {img.with_suffix(CAPTION_EXT) for img in images}
    notes += [f"caption {name!r} has no image; ignored" for rel, name in sorted(captions.items()) if rel not in used]
    return _write_info(tmp, dataset_id, len(images), notes)


def _finish_imagefolder(tmp: Path, dataset_id: str, meta: PurePosixPath, images: set[PurePosixPath],
                        notes: list[str]) -> Extracted:
    captions = _read_metadata(tmp.joinpath(*meta.parts), meta, images)
    unlisted = images - set(captions)
    if unlisted:
        notes.append(f"{len(unlisted)} image(s) not listed in {METADATA_FILE} are not used, e.g. "
                     f"{str(sorted(unlisted)[0])!r}")
    notes += [f"image {str(img)!r} has an empty caption" for img, text in sorted(captions.items()) if not text.strip()]
    return _write_info(tmp, dataset_id, len(captions), notes)


def _write_info(tmp: Path, dataset_id: str, n_images: int, notes: list[str]) -> Extracted:
    info = {"dataset_id": dataset_id, "images": n_images, "warnings": notes, "created_at": time.time()}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    return Extracted(dataset_id=dataset_id, path=tmp, images=n_images, warnings=notes)


def _strip_common_folder(members: list) -> list:
    """[(info, 'top/a.png', kind), …] -> [(info, 'a.png', kind), …] when every member is inside 'top/'."""
    tops = {rel.parts[0] for _, rel, _ in members}
    if len(tops) != 1 or any(len(rel.parts) < 2 for _, rel, _ in members):
        return members
    out = []
    for info, rel, kind in members:
        rel = PurePosixPath(*rel.parts[1:])
        if kind == "nested-metadata" and len(rel.parts) == 1:
            kind = "metadata"  # it was under the single top folder: at the top after all
        out.append((info, rel, kind))
    return out

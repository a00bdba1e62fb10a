"""A LoRA file uploaded to `POST /adapters`: its safetensors framing checked (torch-free: the header is read as
JSON, no tensor is loaded and nothing is unpickled) and the file stored on the data volume for the import job.

The framing is safetensors' own: 8 bytes (little-endian u64) giving the header's length, the JSON header (every
tensor's dtype, shape and byte range, plus an optional `__metadata__` of strings), then the tensors' bytes. What
the LoRA holds (key families, shapes against the base model) is the worker's check (`minidalle.lora_formats`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

from fastapi import HTTPException

from minidalle.errors import InvalidInput

CHUNK = 1 << 20
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
PICKLE_HINTS = (b"\x80", b"PK\x03\x04")  # a pickle (protocol 2+), a torch.save zip: .pt / .ckpt / .bin files
NOT_SAFETENSORS = "only safetensors LoRA files are accepted (nothing uploaded is ever unpickled)"


def _refuse(filename: str, why: str) -> InvalidInput:
    return InvalidInput("file", f"{filename} is not a safetensors file ({why}); {NOT_SAFETENSORS}")


def check_safetensors(f: BinaryIO, size: int, filename: str) -> int:
    """Raise InvalidInput("file") unless `f` (read from its start) is framed as a safetensors file of `size` bytes
    holding at least one tensor; returns how many it holds."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise _refuse(filename, f"{size} bytes, shorter than a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        hint = "it looks like a pickle or a PyTorch checkpoint" if head.startswith(PICKLE_HINTS) else \
            f"its header would be {n} bytes of a {size}-byte file"
        raise _refuse(filename, hint)
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _refuse(filename, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _refuse(filename, "its header is not a JSON object")
    data_bytes = size - 8 - n
    tensors = 0
    for key, entry in header.items():
        if key == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise _refuse(filename, "its __metadata__ is not a table of strings")
            continue
        if not _tensor_entry(entry, data_bytes):
            raise _refuse(filename, f"the entry of {key[:80]!r} is not a tensor within the file")
        tensors += 1
    if not tensors:
        raise InvalidInput("file", f"{filename} holds no tensors")
    return tensors


def _tensor_entry(entry, data_bytes: int) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return False
    return (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes)


def store_upload(f: BinaryIO, dest: Path, *, cap: int, filename: str) -> int:
    """Check `f` and copy it to `dest` (created exclusively under a temporary name, then renamed), counting bytes
    as they are copied (a multipart part's size is what was received; this is belt and braces). Returns bytes."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size > cap:
        raise HTTPException(413, f"file: the upload is {size} bytes; at most {cap}")
    check_safetensors(f, size, filename)
    dest.parent.mkdir(parents=True, exist_ok=False)  # a fresh id's folder: never someone else's
    part = dest.with_name(f".{dest.name}.part")
    written = 0
    try:
        f.seek(0)
        with open(part, "xb") as out:
            while chunk := f.read(CHUNK):
                written += len(chunk)
                if written > cap:
                    raise HTTPException(413, f"file: the upload is above {cap} bytes")
                out.write(chunk)
        os.replace(part, dest)
    except BaseException:
        shutil.rmtree(dest.parent, ignore_errors=True)
        raise
    return written

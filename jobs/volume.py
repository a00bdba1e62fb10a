"""The data volume (`MINIDALLE_DATA_DIR`) and the URLs of what is on it: the one place its layout is spelled.

    datasets/{dataset_id}/        an uploaded dataset, extracted and validated (dataset.json: what it holds)
    adapters/{name}/              a published adapter (adapter.json, adapter.safetensors, ...)
    jobs/{job_id}/images/{i}.png  a generate job's images
    jobs/{job_id}/checkpoints/    a fine-tune's checkpoints (until it publishes)
    jobs/{job_id}/validation/     a fine-tune's validation images, {tag}/{i}.png
    jobs/{job_id}/adapter/        a fine-tune's (or an import's) adapter before it is renamed into adapters/{name}
    uploads/{upload_id}/lora.safetensors   a LoRA file uploaded to POST /adapters, until its import job ends
    uploads/{upload_id}/image.png          the image of a POST /variations job (decoded, re-encoded), while it runs

Ids (jobs, datasets, uploads) are 32 lowercase hex digits; adapter names follow `minidalle.params.ADAPTER_NAME_PATTERN`.
A path is only built from a valid id or name, so nothing a client sends can point outside its folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from minidalle.errors import InvalidInput
from minidalle.params import ADAPTER_NAME_PATTERN, ADAPTER_NAME_RE

ID_PATTERN = r"^[0-9a-f]{32}$"
ID_RE = re.compile(ID_PATTERN)
DATASET_INFO = "dataset.json"
ADAPTER_META = "adapter.json"
ADAPTER_ACCESS = "access.json"  # {"owner": key id, "visibility": "private" | "public"}; not part of downloads
VISIBILITIES = ("private", "public")
ADAPTER_FILES = ("adapter.safetensors", "pytorch_lora_weights.safetensors", ADAPTER_META)
UPLOAD_LORA = "lora.safetensors"
UPLOAD_IMAGE = "image.png"
VALIDATION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.png$")

__all__ = ["ADAPTER_NAME_PATTERN", "Volume", "adapter_url", "image_url", "is_adapter_name", "is_id", "new_id"]


def new_id() -> str:
    return uuid.uuid4().hex


def is_id(text: str) -> bool:
    return bool(ID_RE.match(text))


def is_adapter_name(text: str) -> bool:
    return bool(ADAPTER_NAME_RE.match(text))


# -- URLs (relative to the API's root) ---------------------------------------------------------------------------
def job_links(job_id: str) -> dict[str, str]:
    return {"self": f"/jobs/{job_id}", "events": f"/jobs/{job_id}/events", "cancel": f"/jobs/{job_id}/cancel"}


def image_url(job_id: str, index: int) -> str:
    return f"/images/{job_id}/{index}.png"


def validation_url(job_id: str, relative: str) -> str:
    return f"/jobs/{job_id}/validation/{relative}"


def adapter_url(name: str) -> str:
    return f"/adapters/{name}"


def adapter_links(name: str) -> dict[str, str]:
    return {"name": name, "url": adapter_url(name), "download_url": adapter_url(name) + "/download"}


# -- paths ---------------------------------------------------------------------------------------------------------
class Volume:
    """Paths on the data volume. Methods that take an id or a name check it first (InvalidInput when malformed)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    def upload(self, upload_id: str) -> Path:
        """uploads/{upload_id}/: one uploaded file (`upload_file`), kept until the job that reads it ends."""
        return self.uploads / _checked(upload_id, is_id, "upload_id")

    def upload_file(self, upload_id: str) -> Path:
        return self.upload(upload_id) / UPLOAD_LORA

    def upload_image(self, upload_id: str) -> Path:
        return self.upload(upload_id) / UPLOAD_IMAGE

    def dataset(self, dataset_id: str) -> Path:
        return self.datasets / _checked(dataset_id, is_id, "dataset_id")

    def dataset_exists(self, dataset_id: str) -> bool:
        return is_id(dataset_id) and (self.datasets / dataset_id / DATASET_INFO).is_file()

    def adapter(self, name: str) -> Path:
        return self.adapters / _checked(name, is_adapter_name, "name")

    def adapter_exists(self, name: str) -> bool:
        """A published adapter (its adapter.json is written last, so a half-written one does not count)."""
        return is_adapter_name(name) and (self.adapters / name / ADAPTER_META).is_file()

    def adapter_taken(self, name: str) -> bool:
        """Anything at adapters/{name}, published or not: a fine-tune must not publish over it."""
        return (self.adapters / _checked(name, is_adapter_name, "name")).exists()

    def job(self, job_id: str) -> Path:
        return self.jobs / _checked(job_id, is_id, "job_id")

    def checkpoints(self, job_id: str) -> Path:
        """Where a fine-tune's trainer (work_dir = the job's folder) keeps its checkpoints."""
        return self.job(job_id) / "checkpoints"

    def validation(self, job_id: str) -> Path:
        return self.job(job_id) / "validation"

    def unpublished_adapter(self, job_id: str) -> Path:
        """A fine-tune's adapter as the trainer writes it (an import's as it is converted), before it is renamed
        into adapters/{name}."""
        return self.job(job_id) / "adapter"

    def image(self, job_id: str, index: int) -> Path:
        if index < 0:
            raise InvalidInput("index", f"must be >= 0, got {index}")
        return self.job(job_id) / "images" / f"{index}.png"

    def validation_image(self, job_id: str, tag: str, filename: str) -> Path | None:
        """jobs/{id}/validation/{tag}/{filename}, or None when a part is not a name a fine-tune writes."""
        if not (is_id(job_id) and VALIDATION_NAME_RE.match(tag + ".png") and VALIDATION_NAME_RE.match(filename)):
            return None
        return self.jobs / job_id / "validation" / tag / filename


def _checked(text: str, ok, what: str) -> str:
    if not isinstance(text, str) or not ok(text):
        raise InvalidInput(what, f"{text!r} is not a valid {what}")
    return text


# -- ownership -------------------------------------------------------------------------------------------------
def read_access(adapter_dir: Path) -> dict:
    """Who owns an adapter and who may read it. An adapter with no access.json (put there by the operator) has no
    owner: only admins see it until one makes it public."""
    try:
        access = json.loads((adapter_dir / ADAPTER_ACCESS).read_text())
    except (OSError, ValueError):
        return {"owner": None, "visibility": "private"}
    return {"owner": access.get("owner"), "visibility": access.get("visibility", "private")}


def write_access(adapter_dir: Path, *, owner: str | None, visibility: str) -> None:
    """Written into the adapter's folder before it is published (renamed into place), or replaced atomically."""
    if visibility not in VISIBILITIES:
        raise InvalidInput("visibility", f"must be one of: {', '.join(VISIBILITIES)}")
    tmp = adapter_dir / f".{ADAPTER_ACCESS}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({"owner": owner, "visibility": visibility}))
    os.replace(tmp, adapter_dir / ADAPTER_ACCESS)


def dataset_owner(dataset_dir: Path) -> str | None:
    try:
        return json.loads((dataset_dir / DATASET_INFO).read_text()).get("owner")
    except (OSError, ValueError):
        return None


def subdirs(path: Path) -> list[Path]:
    """The folders in `path` (not links), sorted; none if it does not exist."""
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return []


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


# -- housekeeping ------------------------------------------------------------------------------------------------
def mark_used(dataset_dir: Path) -> None:
    """A fine-tune is queued or starts on this dataset: the janitor's unused-for clock restarts."""
    try:
        os.utime(dataset_dir)
    except OSError:
        pass


def remove_tree(path: Path, prefix: str = ".deleting-") -> None:
    """Rename aside, then delete: readers see the folder whole or not at all."""
    doomed = path.with_name(f"{prefix}{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)

"""Small file-system helpers for atomic writes that still honour the umask."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it (os.umask would, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def chmod_like_new(path: str | os.PathLike, *, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the mode a plain open()/mkdir() would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())

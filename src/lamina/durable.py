"""Files that must survive a power loss once written: keys, tokens, the cluster layout.

A new file is written, fsynced, and its directory fsynced (the name is durable only then);
a replaced file is written beside its name, fsynced, renamed over it, and the directory
fsynced, so after a crash the name holds the old content or the new, whole.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the names created, renamed or removed in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` (never over an existing file: FileExistsError) holding ``data``,
    durably."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def replace(path: Path, data: bytes) -> None:
    """Replace ``path``'s content with ``data`` atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)

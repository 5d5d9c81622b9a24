"""The file operations the page store uses, behind one small interface.

:class:`Files` is what :class:`lamina.storage.diskstore.DiskPageStore` calls for every byte
it reads or writes and every name it creates, renames or removes; the production
implementation is the plain ``os`` calls.  Directory listings and ``stat`` go to the real
directory directly: an implementation keeps the real directory's names equal to what a
running process sees.

Keeping the calls behind one interface lets a test put a disk that can lose power
(:class:`lamina.storage.powerloss.PowerLossFiles`) under the real store.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Release the blocks of a byte range of a real file (reads return zeros); best effort."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            log.warning("punch hole failed: %s", os.strerror(err))


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class Files:
    """File operations of the page store: the ``os`` calls themselves.

    Handles are integers.  ``pwrite`` writes every byte or raises.  ``fdatasync`` and
    ``fsync`` make a file's data durable; ``fsync_dir`` makes the names created, renamed
    or removed in a directory durable.
    """

    def open(self, path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        pwrite_all(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def allocate(self, fd: int, offset: int, length: int) -> None:
        """Reserve the blocks of a range (``posix_fallocate``); may raise ENOSPC."""
        os.posix_fallocate(fd, offset, length)

    def punch(self, fd: int, offset: int, length: int) -> None:
        """Give back the blocks of a range; it reads as zeros afterwards.  Best effort."""
        punch_hole(fd, offset, length)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def replace(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        os.replace(src, dst)

    def unlink(self, path: str | os.PathLike[str]) -> None:
        """Remove a name; a name that does not exist is not an error."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def fsync_dir(self, path: str | os.PathLike[str]) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- built on the calls above -----------------------------------------------------------

    def read_file(self, path: str | os.PathLike[str]) -> bytes:
        """The whole content of a file."""
        fd = self.open(path, os.O_RDONLY)
        try:
            size = self.size(fd)
            return self.pread(fd, size, 0) if size else b""
        finally:
            self.close(fd)

    def write_file(self, path: str | os.PathLike[str], data: bytes, durable: bool) -> None:
        """Create or replace ``path`` with ``data`` (fsynced first if ``durable``)."""
        fd = self.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            self.pwrite(fd, data, 0)
            if durable:
                self.fsync(fd)
        finally:
            self.close(fd)

    def replace_durably(self, path: Path, data: bytes) -> None:
        """Write ``path.tmp``, fsync it, rename it over ``path``, fsync the directory."""
        tmp = path.with_name(path.name + ".tmp")
        self.write_file(tmp, data, durable=True)
        self.replace(tmp, path)
        self.fsync_dir(path.parent)


OS_FILES = Files()

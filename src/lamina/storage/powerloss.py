"""TEST ONLY: a disk that can lose power, under the real page store.

Never used in production: a storage server routes its files through it only when started
with ``LAMINA_TEST_POWERCUT=1`` (see :mod:`lamina.storage.server`), and tests build it
directly.

Theory of operation
-------------------
:class:`PowerLossFiles` is a :class:`~lamina.storage.files.Files` that behaves like the
kernel's page cache in front of a disk, the way FoundationDB's ``AsyncFileNonDurable`` and
SQLite's crash-test VFS do.  The real files in the directory hold only what is *durable*:

* Every write lands in a per-file cache of 4 KiB blocks (a punched block is cached as a
  hole) and reaches the real file only when that file is fdatasynced or fsynced.  Reads see
  the cache over the real file, as a process reads its page cache.
* Names created (``open`` with ``O_CREAT`` of a missing file), renamed over, or removed
  are changed in the real directory at once (so a listing sees them), but each change is
  remembered, with what it replaced kept aside in a trash directory, until that
  directory is fsynced.

:meth:`PowerLossFiles.power_cut` is the power failure.  With a seeded random generator it
keeps an arbitrary subset of the cached blocks (each 4 KiB block on its own: a write
that spans blocks may be torn at a block boundary, never inside one) and drops the rest;
and for each directory it keeps a prefix of the name changes not yet covered by an fsync
of that directory and undoes the rest, newest first (a journalling file system commits
name changes in order).  Afterwards every call fails with EIO: the process is dead, and
whatever it still tries cannot reach the files.  A new store opened on the directory (with
a fresh ``PowerLossFiles`` or the plain ``Files``) then sees what a machine sees after a
power loss.

Simplifications, all in the safe direction for the store: ``posix_fallocate`` and
``O_TRUNC`` reach the real file at once, and directories are created durably.

``fail_syncs`` makes every later fdatasync / fsync fail with EIO and, as Linux does, drop
the cached blocks of that file ("fsyncgate"): a failing disk for fault tests.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lamina.storage.files import Files, punch_hole, pwrite_all

BLOCK = 4096

#: Marks a block punched while cached: it reads as zeros and is punched when synced.
_HOLE = None


@dataclass(slots=True)
class _Inode:
    """One real file: a descriptor of our own, its size as the process sees it, the cache."""

    fd: int
    size: int
    handles: int = 0
    blocks: dict[int, bytearray | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _NameChange:
    """A change of a directory not yet covered by an fsync of it, and how to undo it."""

    kind: str  # "create" | "rename" | "unlink"
    path: Path  # created / renamed-to / removed name
    src: Path | None = None  # rename: the old name
    kept: Path | None = None  # trash file holding what was replaced or removed


class PowerLossFiles(Files):
    """Files whose unsynced writes and name changes are lost at :meth:`power_cut`.  TEST ONLY."""

    def __init__(self, trash: str | os.PathLike[str]) -> None:
        self.trash = Path(trash)
        self.trash.mkdir(parents=True, exist_ok=True)
        self.fail_syncs = False
        self.dead = False
        self._lock = threading.RLock()
        self._inodes: dict[tuple[int, int], _Inode] = {}
        self._handles: dict[int, tuple[int, int]] = {}
        self._changes: dict[Path, list[_NameChange]] = {}
        self._names = itertools.count()

    # -- helpers ---------------------------------------------------------------------------

    def _alive(self) -> None:
        if self.dead:
            raise OSError(errno.EIO, "the power is off")

    def _inode(self, fd: int) -> _Inode:
        self._alive()
        try:
            return self._inodes[self._handles[fd]]
        except KeyError:
            raise OSError(errno.EBADF, "not a file of this disk") from None

    def _keep_aside(self, path: Path) -> Path:
        kept = self.trash / f"{next(self._names)}-{path.name}"
        os.rename(path, kept)
        return kept

    def _note(self, change: _NameChange) -> None:
        self._changes.setdefault(change.path.parent.resolve(), []).append(change)

    def _block(self, ino: _Inode, b: int) -> bytearray:
        """The cached block ``b``, read from the real file the first time."""
        if b in ino.blocks:
            blk = ino.blocks[b]
            if blk is not _HOLE:
                return blk
            fresh = bytearray(BLOCK)
        else:
            fresh = bytearray(os.pread(ino.fd, BLOCK, b * BLOCK).ljust(BLOCK, b"\0"))
        ino.blocks[b] = fresh
        return fresh

    def _write_back(self, ino: _Inode, blocks: list[int]) -> None:
        real = os.fstat(ino.fd).st_size
        for b in blocks:
            blk = ino.blocks.pop(b)
            start = b * BLOCK
            if blk is _HOLE:
                punch_hole(ino.fd, start, BLOCK)
            elif start < ino.size:
                pwrite_all(ino.fd, memoryview(blk)[: min(BLOCK, ino.size - start)], start)
        if ino.size < real:  # never: sizes only shrink through O_TRUNC, which is immediate
            os.ftruncate(ino.fd, ino.size)

    # -- Files -----------------------------------------------------------------------------

    def open(self, path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> int:
        with self._lock:
            self._alive()
            p = Path(path)
            existed = p.exists()
            fd = os.open(p, flags & ~os.O_TRUNC, mode)
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            ino = self._inodes.get(key)
            if ino is None:
                # our own descriptor, open for reading and writing back whatever ``flags`` say;
                # held while the file is cached, so its inode number cannot be reused
                own = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
                ino = self._inodes[key] = _Inode(own, st.st_size)
            if flags & os.O_TRUNC:
                ino.blocks.clear()
                os.ftruncate(ino.fd, 0)
                ino.size = 0
            ino.handles += 1
            self._handles[fd] = key
            if not existed:
                self._note(_NameChange("create", p))
            return fd

    def close(self, fd: int) -> None:
        with self._lock:
            if self.dead:
                return  # everything was closed when the power went
            key = self._handles.pop(fd, None)
            os.close(fd)
            if key is None:
                return
            ino = self._inodes[key]
            ino.handles -= 1
            if ino.handles == 0 and not ino.blocks:
                os.close(ino.fd)
                del self._inodes[key]

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        with self._lock:
            ino = self._inode(fd)
            end = min(offset + length, ino.size)
            if end <= offset:
                return b""
            if not ino.blocks:
                return os.pread(ino.fd, end - offset, offset)
            out = bytearray(os.pread(ino.fd, end - offset, offset).ljust(end - offset, b"\0"))
            for b in range(offset // BLOCK, -(-end // BLOCK)):
                if b not in ino.blocks:
                    continue
                blk = ino.blocks[b]
                lo, hi = max(b * BLOCK, offset), min((b + 1) * BLOCK, end)
                out[lo - offset : hi - offset] = (
                    bytes(hi - lo) if blk is _HOLE else blk[lo - b * BLOCK : hi - b * BLOCK]
                )
            return bytes(out)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        with self._lock:
            ino = self._inode(fd)
            view = memoryview(data).cast("B")
            pos = offset
            while view:
                b, skip = divmod(pos, BLOCK)
                n = min(BLOCK - skip, len(view))
                self._block(ino, b)[skip : skip + n] = view[:n]
                view = view[n:]
                pos += n
            ino.size = max(ino.size, pos)

    def fdatasync(self, fd: int) -> None:
        with self._lock:
            ino = self._inode(fd)
            if self.fail_syncs:
                ino.blocks.clear()  # what Linux does with the pages of a failed writeback
                raise OSError(errno.EIO, "injected: the disk failed to write")
            self._write_back(ino, sorted(ino.blocks))
            os.fdatasync(ino.fd)

    def fsync(self, fd: int) -> None:
        self.fdatasync(fd)

    def allocate(self, fd: int, offset: int, length: int) -> None:
        with self._lock:
            ino = self._inode(fd)
            os.posix_fallocate(ino.fd, offset, length)
            ino.size = max(ino.size, offset + length)

    def punch(self, fd: int, offset: int, length: int) -> None:
        with self._lock:
            ino = self._inode(fd)
            end = offset + length
            for b in range(offset // BLOCK, -(-end // BLOCK)):
                lo, hi = max(b * BLOCK, offset), min((b + 1) * BLOCK, end)
                if hi - lo == BLOCK:
                    ino.blocks[b] = _HOLE
                else:
                    self._block(ino, b)[lo - b * BLOCK : hi - b * BLOCK] = bytes(hi - lo)

    def size(self, fd: int) -> int:
        with self._lock:
            return self._inode(fd).size

    def replace(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        with self._lock:
            self._alive()
            s, d = Path(src), Path(dst)
            if not s.exists():
                raise FileNotFoundError(errno.ENOENT, "no such file", str(s))
            kept = self._keep_aside(d) if d.exists() else None
            os.rename(s, d)
            self._note(_NameChange("rename", d, s, kept))

    def unlink(self, path: str | os.PathLike[str]) -> None:
        with self._lock:
            self._alive()
            p = Path(path)
            if p.exists():
                self._note(_NameChange("unlink", p, None, self._keep_aside(p)))

    def fsync_dir(self, path: str | os.PathLike[str]) -> None:
        with self._lock:
            self._alive()
            if self.fail_syncs:
                raise OSError(errno.EIO, "injected: the disk failed to write")
            for change in self._changes.pop(Path(path).resolve(), []):
                if change.kept is not None:
                    change.kept.unlink(missing_ok=True)
            super().fsync_dir(path)

    # -- the power failure -------------------------------------------------------------------

    def unsynced_blocks(self) -> int:
        """How many cached blocks a power cut would now decide on."""
        with self._lock:
            return sum(len(ino.blocks) for ino in self._inodes.values())

    def power_cut(self, seed: int) -> None:
        """Lose what is not durable, as a power failure would: keep a seeded arbitrary subset
        of the unsynced 4 KiB blocks and a prefix of each directory's unsynced name changes."""
        with self._lock:
            self._alive()
            rng = random.Random(seed)
            keep = share_kept(rng)
            for ino in self._inodes.values():
                kept = [b for b in sorted(ino.blocks) if rng.random() < keep]
                self._write_back(ino, kept)
                ino.blocks.clear()
            for changes in self._changes.values():
                durable = rng.randint(0, len(changes))
                for change in changes[:durable]:
                    if change.kept is not None:
                        change.kept.unlink(missing_ok=True)
                for change in reversed(changes[durable:]):
                    _undo(change)
            self._changes.clear()
            for fd in [*self._handles, *(ino.fd for ino in self._inodes.values())]:
                os.close(fd)
            self._handles.clear()
            self._inodes.clear()
            self.dead = True


def share_kept(rng: random.Random) -> float:
    """The share of the unsynced blocks a cut keeps: none, all, or some (drawn first)."""
    return rng.choice([0.0, 1.0, rng.random()])


def seed_keeping(low: float, high: float) -> int:
    """The first seed whose power cut keeps a share of the unsynced blocks in [low, high]."""
    return next(s for s in itertools.count() if low <= share_kept(random.Random(s)) <= high)


def _undo(change: _NameChange) -> None:
    if change.kind == "create":
        change.path.unlink(missing_ok=True)
    elif change.kind == "rename":
        assert change.src is not None
        os.rename(change.path, change.src)
        if change.kept is not None:
            os.rename(change.kept, change.path)
    else:
        assert change.kept is not None
        os.rename(change.kept, change.path)

"""TEST ONLY: a manager that loses power.

Never used in production: a manager builds it only when started with
``LAMINA_TEST_POWERCUT=1`` (:func:`lamina.daemon.powercut_enabled`, see
:mod:`lamina.mgmt.server`).

Theory of operation
-------------------
What a manager must not lose is its Raft state: the journal (``raft.journal``), the meta
file (term, vote, commit index) and the snapshot after log compaction
(:mod:`lamina.mgmt.raft`, docs/raft.md).  The meta file and the snapshot are replaced
durably when they are written (a temporary file fsynced, renamed, the directory fsynced),
so what a power cut can take from them is at most the newest replacement, which nothing
depended on yet.  The journal is the file whose writes wait for a sync: PySyncObj writes
it through a memory map, and lamina fdatasyncs it before any Raft message leaves and at
the end of every tick.

:class:`RaftPowerCut` (a :class:`lamina.mgmt.raft.SyncObserver`) is told of every
completed journal sync (:meth:`RaftPowerCut.journal_synced`) and keeps a copy of the file
as it was then: what the disk holds.  Before the first, a journal holds what it held when
it was opened (:meth:`RaftPowerCut.journal_opened`), or, when this process created it,
nothing: not even its name survives a power cut before its first sync.  SIGUSR2 only sets a flag
(:meth:`RaftPowerCut.request`); the Raft thread looks at it between two ticks, before the
end-of-tick sync (:meth:`RaftPowerCut.between_ticks`), so entries appended in that tick
and not yet acknowledged to anyone are still unsynced.  The cut writes every journal back
as it was at its last sync, cut to that length, and ends the process at once with status
:data:`lamina.daemon.POWERCUT_EXIT`: no message leaves after it, no handler runs.

Every byte not covered by a sync is dropped, none kept: PySyncObj's journal has no record
checksums, so a torn record (a part of its bytes on disk) would be read back as a
different command rather than rejected.  A real disk can tear it; lamina does not claim
to survive that, and this test disk does not model it (docs/raft.md, "Durability").
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import NoReturn

from lamina import daemon

__all__ = ["RaftPowerCut"]

log = logging.getLogger(__name__)


class RaftPowerCut:
    """The durable image of each journal, and the power cut that brings it back.  TEST ONLY."""

    def __init__(self) -> None:
        self._images: dict[str, bytes | None] = {}
        self._requested = threading.Event()
        self._lock = threading.Lock()

    # -- SyncObserver ------------------------------------------------------------------

    def journal_opened(self, path: str) -> None:
        """The journal ``path`` is about to be opened: its bytes now (none if it does not
        exist) are what the disk holds.  Called on the Raft thread."""
        try:
            image: bytes | None = Path(path).read_bytes()
        except FileNotFoundError:
            image = None
        with self._lock:
            self._images[path] = image

    def journal_synced(self, path: str, fd: int) -> None:
        """The journal ``path`` (open as ``fd``) was just fdatasynced: its bytes now are
        what the disk holds.  Called on the Raft thread."""
        size = os.fstat(fd).st_size
        image = os.pread(fd, size, 0)
        with self._lock:
            self._images[path] = image

    def between_ticks(self) -> None:
        """Called on the Raft thread between two ticks: cut the power if asked to."""
        if self._requested.is_set():
            self.cut()

    # -- the power failure -------------------------------------------------------------

    def request(self) -> None:
        """Ask for a power cut at the next tick boundary (safe from a signal handler)."""
        self._requested.set()

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def images(self) -> dict[str, bytes | None]:
        """The journals as the disk holds them: path -> bytes, or None for a journal
        whose creation is not durable yet (for tests)."""
        with self._lock:
            return dict(self._images)

    def restore(self) -> int:
        """Put every journal back as it was at its last sync; how many of them held
        changes not synced.  The process must not write a journal afterwards
        (:meth:`cut`)."""
        changed = 0
        for path, image in self.images().items():
            if image is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    changed += 1
                continue
            fd = os.open(path, os.O_RDWR)
            try:
                if os.pread(fd, os.fstat(fd).st_size, 0) != image:
                    changed += 1
                os.pwrite(fd, image, 0)
                os.ftruncate(fd, len(image))
            finally:
                os.close(fd)
        return changed

    def cut(self) -> NoReturn:
        """The power failure: the journals as their last sync left them, then exit."""
        changed = self.restore()
        log.warning("TEST ONLY: power cut (%d journal(s) lost changes not synced)", changed)
        daemon.flush_logs()
        os._exit(daemon.POWERCUT_EXIT)

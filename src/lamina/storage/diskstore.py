"""The on-disk page store.

Theory of operation
-------------------
Layout of a data directory (documented in ``docs/ondisk.md``)::

    FORMAT             "lamina-pagestore 1" and the owning server id
    BOOT               incarnation counter, bumped (fsync) at every start
    meta.snap          checkpoint of all page metadata (atomic rename)
    log.<seq>          metadata log since that checkpoint (preallocated, pwrite)
    layers/<id>.data   one sparse file per layer; page p at p * page_size
    quarantine/        copies of pages that failed their checksums

Page data lives in the layer file; everything else (state, mask, generation, crc32c per
4 KiB block) lives in memory, in the log and in the checkpoint.  Every change appends one
self-checking record (length, crc32c, msgpack body) to the log.

The durable-write order (the crash model):

1. A mask *decrease* (a sync-mask clear) is appended to the log and the write waits until
   a group commit fdatasyncs the log: one fdatasync covers every clear queued meanwhile,
   on a single background thread, so the event loop never blocks on it.  A page whose
   on-disk mask already has those bits cleared needs no commit at all: restores are
   persisted lazily, so a hot page keeps its cleared mask on disk while it is written.
2. The record carrying a write's new block checksums is appended *before* its data is
   written; both happen in one synchronous step of the event loop.  A group commit of
   another page's mask clear may make that record durable before its data.
3. After each fdatasync of the data files a SYNCED record marks the log position up to
   which every data record's data is durable.  Recovery (``_resolve_doubts``) checks the
   pages of records after the last marker against every version they had since, per 4
   KiB block, and keeps whichever the data matches: after a power loss a page reads old
   or new bytes, never CORRUPT.
4. A mask *increase* (restore, mark-clean) is persisted only after the data files were
   fdatasynced, so no copy can look clean on disk while its data may be older.
5. A tombstone's hole is punched, and a dropped layer's file unlinked, only once the
   record is durable.
6. FLUSH (and a FUA write) fdatasyncs the data files, appends SYNCED, then the log.
7. A checkpoint switches to a new log, then (on the same thread, in order) fsyncs the old
   log, fdatasyncs the data files, writes ``meta.snap.tmp``, fsyncs it, renames it over
   ``meta.snap``, fsyncs the directory and deletes the old logs.

Every file call goes through ``self.files`` (:mod:`lamina.storage.files`), so tests can
put a disk that loses power under the store (:mod:`lamina.storage.powerloss`).

Space: a page's whole extent is allocated (posix_fallocate) when it first gets data, so an
overwrite never needs new blocks; the log is preallocated in extents, and when no new
extent can be had the store refuses new allocations (NO_SPACE) but keeps a reserve for
overwrites and metadata.  Stored pages stay readable.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import time
from array import array
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c
import msgpack

from lamina.errors import (
    BadRequest,
    Corrupt,
    LaminaError,
    LocalError,
    NoSpace,
    NotFound,
    StorageIOError,
)
from lamina.storage.checksums import BLOCK, ZERO_BLOCK_CRC, block_crcs, zero_crcs
from lamina.storage.files import OS_FILES, Files
from lamina.storage.pagestore import (
    ABSENT_INFO,
    PageInfo,
    PageStore,
    StoreStats,
    check_layer,
    enumerate_pages,
)
from lamina.storage.syncmask import FULL
from lamina.wire.messages import EnumerateWhat, PageState

log = logging.getLogger(__name__)

FORMAT_NAME = "lamina-pagestore"
FORMAT_VERSION = 1
SNAP_MAGIC = b"LMSNAP01"
SNAP_HEAD = struct.Struct(">8sQI")
REC_HEAD = struct.Struct(">II")
MAX_RECORD = 1 << 20
GEN_SHIFT = 40

R_LAYER, R_PAGE, R_CRC, R_MASK, R_DROP, R_DROP_PAGE, R_SYNCED = 1, 2, 3, 4, 5, 6, 7
R_ACTIVE, R_AGE = 8, 9
#: seconds an activity generation lasts at least (see _sync_data): a page pays one group
#: commit for its R_ACTIVE record per generation it is written in
ACTIVE_PERIOD = 10.0
R_LINEAGE = 10  # [10, layer id, lineage token]: the cluster map's token of that layer id

LOG_EXTENT = 8 << 20
LOG_RESERVE = 1 << 20
BALLAST = 4 << 20
DEFAULT_CHECKPOINT_BYTES = 64 << 20


class StoreFormatError(LocalError):
    pass


# --- in-memory metadata ----------------------------------------------------------------


@dataclass(slots=True)
class _Page:
    state: PageState
    mask: int
    generation: int
    crcs: array[int] | None = None  # per block, when the page has allocated data
    disk_mask: int = FULL  # mask of the last record appended for this page
    disk_lsn: int = 0  # log position after that record
    data_seq: int = 0  # write sequence number of the last data change
    active: int = -1  # the activity generation of its last durable R_ACTIVE record


def _copy_page(p: _Page | None) -> _Page | None:
    if p is None:
        return None
    return _Page(p.state, p.mask, p.generation, None if p.crcs is None else array("I", p.crcs))


@dataclass(slots=True)
class _Doubt:
    """Recovery only: a page with data records after the last durable sync marker.

    ``before`` holds the page as it was before each of those records (None: absent), oldest
    first; ``before[0]`` is the page as of the last sync marker, which is durable."""

    before: list[tuple[tuple[int, int], _Page | None]] = field(default_factory=list)


@dataclass(slots=True)
class _Layer:
    volume_id: int
    page_size: int
    fd: int = -1
    pages: dict[int, _Page] = field(default_factory=dict)


@dataclass(slots=True)
class _Log:
    seq: int
    fd: int
    offset: int = 0
    allocated: int = 0


def _encode_record(body: list[Any]) -> bytes:
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return REC_HEAD.pack(len(data), crc32c.crc32c(data)) + data


def _crc_bytes(crcs: array[int]) -> bytes:
    return crcs.tobytes()


def _crc_array(raw: bytes) -> array[int]:
    a = array("I")
    a.frombytes(raw)
    return a


class DiskPageStore(PageStore):
    def __init__(
        self,
        root: str | os.PathLike[str],
        server_id: str,
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
        files: Files = OS_FILES,
    ) -> None:
        self.root = Path(root)
        self.files = files  # every read, write, sync and name change goes through it
        self.server_id = server_id
        self.checkpoint_bytes = checkpoint_bytes
        self.incarnation = 0
        self._layers: dict[int, _Layer] = {}
        self._lineages: dict[int, int] = {}  # layer id -> lineage token (R_LINEAGE)
        self._log: _Log | None = None
        self._gen = 0
        self._lsn = 0
        self._synced_lsn = 0
        self._write_seq = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._commit_running = False
        # Two I/O threads, each FIFO: log commits must never queue behind a long data sync.
        self._commit_exec = ThreadPoolExecutor(1, thread_name_prefix="lamina-commit")
        self._data_exec = ThreadPoolExecutor(1, thread_name_prefix="lamina-datasync")
        self._dirty_fds: set[int] = set()
        self._new_layer_files = False  # layers/ holds a name not yet fsynced
        self._marked_seq = 0  # write sequence number covered by the last SYNCED record
        # activity generations (see _resolve_doubts): a page is written only after a durable
        # R_ACTIVE record of it in the current generation; a new generation starts (R_AGE,
        # or a new log) only once a data sync that began in the current one has completed
        self._generation = 0
        self._switch_id = 0  # generation switches made
        self._synced_switch = 0  # the switches a completed data sync began after
        self._generation_started = time.monotonic()
        self._activating: dict[tuple[int, int], int] = {}  # page -> lsn of its R_ACTIVE
        self._replay_generations: list[set[tuple[int, int]]] = [set()]  # recovery only
        self._dropping: dict[int, int] = {}  # layer -> lsn of its DROP, file not yet unlinked
        self._after: list[tuple[int, Callable[[], None]]] = []  # see _after_durable
        self._unlinked: set[int] = set()  # layer files unlinked, layers/ maybe not fsynced
        self._lazy: set[tuple[int, int]] = set()
        self._low_space = False
        self._failed: str | None = None
        self._checkpointing = False
        self._doubts: dict[tuple[int, int], _Doubt] = {}  # recovery only, see _resolve_doubts
        self._pos = (0, 0)  # recovery only: (log seq, offset) of the record being replayed
        #: after open(): the pages written since the last durable sync marker, whose data
        #: a power loss may have taken back (to old bytes, or to an older state)
        self.unsynced_pages: set[tuple[int, int]] = set()
        self.commits = 0  # group commits (log fdatasyncs) done, for tests and statistics
        self._pages = 0  # page entries, any state
        self._used = 0  # bytes of pages holding data

    # -- start-up and recovery ---------------------------------------------------------------

    def open(self) -> None:
        """Check the format, bump the incarnation, recover metadata, start a fresh log."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "layers").mkdir(exist_ok=True)
        (self.root / "quarantine").mkdir(exist_ok=True)
        self._check_format()
        self.incarnation = self._bump_boot()
        self._gen = self.incarnation << GEN_SHIFT
        next_seq = self._load_snapshot()
        seqs = sorted(
            int(p.name.split(".", 1)[1])
            for p in self.root.glob("log.*")
            if p.name.split(".", 1)[1].isdigit()
        )
        for seq in seqs:
            if seq >= next_seq:
                self._replay(seq)
        for layer_id, layer in self._layers.items():
            layer.fd = self.files.open(self._layer_path(layer_id), os.O_RDWR | os.O_CREAT)
        self._remove_orphans()
        self._resolve_doubts()
        self._pages = sum(len(layer.pages) for layer in self._layers.values())
        self._used = sum(
            layer.page_size
            for layer in self._layers.values()
            for p in layer.pages.values()
            if p.crcs is not None
        )
        new_seq = max([next_seq, *[s + 1 for s in seqs]])
        # Fold the recovered state into a checkpoint first: that frees the old logs, so a
        # server restarted on a full disk can still open a log.  If even the checkpoint
        # finds no room, the ballast is given up for it.
        body = self._snapshot_body(new_seq)
        try:
            self._write_snapshot_sync(body, new_seq)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not self._release_ballast():
                raise
            self._write_snapshot_sync(body, new_seq)
        self._log = self._open_log(new_seq)
        self.files.fsync_dir(self.root)  # the new log's name: its records are relied on
        self._ensure_ballast()

    def _ensure_ballast(self) -> None:
        """Keep BALLAST bytes allocated that a full disk can give back to the metadata."""
        path = self.root / "ballast"
        if path.exists() and path.stat().st_blocks * 512 >= BALLAST:
            return
        fd = self.files.open(path, os.O_RDWR | os.O_CREAT)
        try:
            self.files.allocate(fd, 0, BALLAST)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.files.unlink(path)
            self._low_space = True
        finally:
            self.files.close(fd)

    def _release_ballast(self) -> bool:
        path = self.root / "ballast"
        if not path.exists():
            return False
        log.warning("disk full: releasing the ballast file to keep metadata writable")
        self.files.unlink(path)
        self._low_space = True
        return True

    def _check_format(self) -> None:
        path = self.root / "FORMAT"
        if not path.exists():
            others = [p for p in self.root.iterdir() if p.name not in ("layers", "quarantine")]
            if others:
                raise StoreFormatError(f"{self.root} holds files but no FORMAT: not a page store")
            text = f"{FORMAT_NAME} {FORMAT_VERSION}\nserver {self.server_id}\n"
            self.files.replace_durably(path, text.encode())
            return
        lines = self.files.read_file(path).decode(errors="replace").split("\n")
        head = lines[0].split()
        if len(head) != 2 or head[0] != FORMAT_NAME:
            raise StoreFormatError(f"{path} does not describe a lamina page store")
        if head[1] != str(FORMAT_VERSION):
            raise StoreFormatError(f"{path}: format version {head[1]}, this build reads 1")
        owner = lines[1].split(maxsplit=1)[1] if len(lines) > 1 and " " in lines[1] else "?"
        if owner != self.server_id:
            raise StoreFormatError(
                f"{self.root} belongs to storage server {owner!r}, not {self.server_id!r}"
            )

    def _bump_boot(self) -> int:
        path = self.root / "BOOT"
        n = int(self.files.read_file(path).strip() or 0) if path.exists() else 0
        self.files.replace_durably(path, f"{n + 1}\n".encode())
        return n + 1

    def _load_snapshot(self) -> int:
        path = self.root / "meta.snap"
        if not path.exists():
            return 1
        raw = self.files.read_file(path)
        if len(raw) < SNAP_HEAD.size:
            raise StoreFormatError(f"{path} is truncated")
        magic, length, crc = SNAP_HEAD.unpack_from(raw)
        body = raw[SNAP_HEAD.size : SNAP_HEAD.size + length]
        if magic != SNAP_MAGIC or len(body) != length or crc32c.crc32c(body) != crc:
            raise StoreFormatError(f"{path} fails its checksum: refusing to guess")
        snap = msgpack.unpackb(body, raw=False, strict_map_key=False)
        self._lineages = {int(lid): int(lineage) for lid, lineage in snap.get("lineages", [])}
        for layer_id, volume_id, page_size, pages in snap["layers"]:
            layer = self._layers[layer_id] = _Layer(volume_id, page_size)
            for page, state, mask, gen, crcs in pages:
                layer.pages[page] = _Page(
                    PageState(state), mask, gen, None if crcs is None else _crc_array(crcs), mask
                )
        return int(snap["next_log"])

    def _replay(self, seq: int) -> None:
        path = self.root / f"log.{seq}"
        raw = self.files.read_file(path)
        off = 0
        self._replay_generations.append(set())  # a new log starts a new generation
        while off + REC_HEAD.size <= len(raw):
            self._pos = (seq, off)
            length, crc = REC_HEAD.unpack_from(raw, off)
            body = raw[off + REC_HEAD.size : off + REC_HEAD.size + length]
            if length == 0 or length > MAX_RECORD or len(body) != length:
                break
            if crc32c.crc32c(body) != crc:
                break
            try:
                self._apply_record(msgpack.unpackb(body, raw=False))
            except (KeyError, ValueError, TypeError, AssertionError) as exc:
                raise StoreFormatError(
                    f"{path}: record at offset {off} does not fit the metadata before it "
                    f"({exc.__class__.__name__}: {exc}); refusing to guess"
                ) from None
            off += REC_HEAD.size + length

    def _apply_record(self, rec: list[Any]) -> None:
        kind = rec[0]
        if kind == R_LAYER:
            _, layer_id, volume_id, page_size = rec
            self._layers.setdefault(layer_id, _Layer(volume_id, page_size))
        elif kind == R_DROP:
            self._layers.pop(rec[1], None)
            self._lineages.pop(rec[1], None)
            for key in [k for k in self._doubts if k[0] == rec[1]]:
                del self._doubts[key]
        elif kind == R_PAGE:
            _, layer_id, page, state, mask, gen, crcs = rec
            layer = self._layers[layer_id]
            before = layer.pages.get(page)
            p = _Page(PageState(state), mask, gen, None if crcs is None else _crc_array(crcs), mask)
            if crcs is not None or state == PageState.TOMBSTONE:
                self._doubt(layer_id, page, before)
            layer.pages[page] = p
        elif kind == R_CRC:
            _, layer_id, page, first, crcs, gen = rec
            p = self._layers[layer_id].pages[page]
            assert p.crcs is not None
            self._doubt(layer_id, page, p)
            new = _crc_array(crcs)
            p.crcs[first : first + len(new)] = new
            p.generation = gen
        elif kind == R_DROP_PAGE:
            self._layers[rec[1]].pages.pop(rec[2], None)
        elif kind == R_MASK:
            _, layer_id, page, mask = rec
            p = self._layers[layer_id].pages[page]
            p.mask = p.disk_mask = mask
        elif kind == R_SYNCED:
            self._synced_upto((rec[1], rec[2]))
        elif kind == R_ACTIVE:
            self._replay_generations[-1].add((rec[1], rec[2]))
        elif kind == R_AGE:
            self._replay_generations.append(set())
        elif kind == R_LINEAGE:
            _, layer_id, lineage = rec
            self._lineages[layer_id] = lineage

    # -- recovery of what was not synced -------------------------------------------------------
    #
    # A data record (PAGE with data or a tombstone, CRC) is appended before its data is
    # written, and the log may become durable (a group commit for another page's mask
    # clear) long before the data does; and after a power loss the data of a write may be
    # on the disk while its record is not.  After kill -9 only the last record may describe
    # data not written; after a power loss any page written since the last data sync may
    # hold old or new bytes, matching its records or not.  Two kinds of records bound that:
    #
    # * SYNCED [7, seq, offset]: the data of every record before (log seq, offset) is
    #   durable.  For every page with data records after the last SYNCED record, replay
    #   keeps the page as it was before each of them (_Doubt).
    # * ACTIVE [8, layer, page] and AGE [9]: before a page is written, an ACTIVE record of
    #   it must be durable in the current activity generation; a generation ends at an AGE
    #   record or a new log, and starts only once a data sync that began in the previous
    #   one has completed and appended its SYNCED record.  So every write whose data may
    #   not be durable is to a page with an ACTIVE record in the last two generations.
    #
    # _resolve_doubts reads those pages and keeps, per 4 KiB block, the checksum of what
    # the disk holds: one of the page's versions, or (the record was lost) new bytes.

    def _doubt(self, layer_id: int, page: int, before: _Page | None) -> None:
        doubt = self._doubts.setdefault((layer_id, page), _Doubt())
        doubt.before.append((self._pos, _copy_page(before)))

    def _synced_upto(self, pos: tuple[int, int]) -> None:
        """Forget the doubts of every record before ``pos``: their data is durable."""
        for key in list(self._doubts):
            doubt = self._doubts[key]
            while doubt.before and doubt.before[0][0] < pos:
                doubt.before.pop(0)
            if not doubt.before:
                del self._doubts[key]

    def _remove_orphans(self) -> None:
        """Layer files of layers the metadata does not know (dropped, or never recorded)."""
        for path in (self.root / "layers").glob("*.data"):
            stem = path.name.split(".", 1)[0]
            if not stem.isdigit() or int(stem) not in self._layers:
                log.info("recovery: removing %s, a layer file of no known layer", path.name)
                self.files.unlink(path)

    def _resolve_doubts(self) -> None:
        """Make each page that may hold unsynced writes agree with its data (see above).

        The pages: those with data records after the last SYNCED record, and those with an
        ACTIVE record in the last two generations.  Per 4 KiB block the newest checksum
        stays if the data matches it; else the data's own checksum is taken: an older
        version of the page, or the bytes of a write whose record was lost.  A page created
        since whose data is not all there goes back to absent ("look in the layer below",
        which zeros are not); a zero page written since whose data landed nowhere is a
        zero page again.  A page created since, never written, whose data matches neither
        what was written nor zeros is damage: left for the read path to quarantine.
        """
        doubts, self._doubts = self._doubts, {}
        active = set().union(*self._replay_generations[-2:])
        self._replay_generations = [set()]
        self.unsynced_pages = set(doubts) | active
        for layer_id, page in sorted(self.unsynced_pages):
            layer = self._layers.get(layer_id)
            p = None if layer is None else layer.pages.get(page)
            if layer is None or p is None:
                continue
            base = page * layer.page_size
            if p.state == PageState.TOMBSTONE:
                self.files.punch(layer.fd, base, layer.page_size)
                continue
            if p.state != PageState.PRESENT or p.crcs is None:
                continue
            doubt = doubts.get((layer_id, page))
            befores = [] if doubt is None else [old for _, old in doubt.before]
            origin = befores[0] if befores else p
            created = origin is None or origin.state == PageState.ABSENT
            versions: list[set[int]] = [set() for _ in range(len(p.crcs))]
            for old in befores:
                if old is not None and old.state == PageState.ZERO:
                    for v in versions:
                        v.add(ZERO_BLOCK_CRC)
                elif old is not None and old.crcs is not None:
                    for b, value in enumerate(old.crcs):
                        versions[b].add(value)
            data = self.files.pread(layer.fd, layer.page_size, base)
            now = block_crcs(data.ljust(layer.page_size, b"\0"))
            resolved = array("I", p.crcs)
            unlanded = damaged = 0
            for b, got in enumerate(now):
                if got == p.crcs[b]:
                    continue
                resolved[b] = got
                if got in versions[b]:
                    continue
                if created and got == ZERO_BLOCK_CRC:
                    unlanded += 1  # still the zeros of the fresh extent
                elif (layer_id, page) not in active:
                    damaged += 1
            if damaged:
                log.warning(
                    "recovery: page %d of layer %d: %d blocks match none of their versions",
                    page,
                    layer_id,
                    damaged,
                )
                continue
            if created and unlanded:
                log.warning(
                    "recovery: page %d of layer %d never fully written; undone", page, layer_id
                )
                del layer.pages[page]
                continue
            if (
                origin is not None
                and origin.state == PageState.ZERO
                and all(c == ZERO_BLOCK_CRC for c in resolved)
            ):
                log.warning(
                    "recovery: page %d of layer %d never written; a zero page again", page, layer_id
                )
                layer.pages[page] = _Page(
                    PageState.ZERO, p.mask, origin.generation, None, p.disk_mask
                )
                continue
            if resolved != p.crcs:
                log.warning(
                    "recovery: page %d of layer %d keeps other bytes than its last record in "
                    "%d blocks (never synced)",
                    page,
                    layer_id,
                    sum(1 for x, y in zip(resolved, p.crcs, strict=True) if x != y),
                )
                p.crcs = resolved

    # -- the log ----------------------------------------------------------------------------

    def _open_log(self, seq: int) -> _Log:
        fd = self.files.open(self.root / f"log.{seq}", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        lg = _Log(seq, fd)
        try:
            self.files.allocate(fd, 0, LOG_EXTENT)
            lg.allocated = LOG_EXTENT
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            self._low_space = True
            try:
                self.files.allocate(fd, 0, LOG_RESERVE)
                lg.allocated = LOG_RESERVE
            except OSError:
                lg.allocated = 0
        return lg

    def _append(self, body: list[Any]) -> int:
        self._refuse_if_failed()
        rec = _encode_record(body)
        lg = self._log
        assert lg is not None
        if lg.offset + len(rec) > lg.allocated:
            self._extend_log()
            if lg.offset + len(rec) > lg.allocated and self._release_ballast():
                self._extend_log()
            if lg.offset + len(rec) > lg.allocated:
                raise NoSpace("no space left for metadata")
        self.files.pwrite(lg.fd, rec, lg.offset)
        lg.offset += len(rec)
        self._lsn += len(rec)
        if lg.allocated - lg.offset < LOG_RESERVE:
            self._extend_log()
        if (
            lg.offset > self.checkpoint_bytes
            and not self._checkpointing
            and self._synced_switch == self._switch_id  # else checkpoint() waits anyway
        ):
            asyncio.get_running_loop().call_soon(self._start_checkpoint)
        return self._lsn

    def _extend_log(self) -> None:
        lg = self._log
        assert lg is not None
        for size in (LOG_EXTENT, LOG_RESERVE):
            try:
                self.files.allocate(lg.fd, lg.allocated, size)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                continue
            lg.allocated += size
            self._low_space = size < LOG_EXTENT
            return
        self._low_space = True

    # -- group commit -------------------------------------------------------------------------

    def _durable(self, lsn: int) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((lsn, fut))
        if not self._commit_running:
            self._start_commit()
        return fut

    def _start_commit(self) -> None:
        self._commit_running = True
        target = self._lsn
        assert self._log is not None
        fd = self._log.fd
        loop = asyncio.get_running_loop()
        cf = loop.run_in_executor(self._commit_exec, self.files.fdatasync, fd)
        cf.add_done_callback(lambda f: self._commit_done(f, target))

    def _commit_done(self, f: asyncio.Future[None], target: int) -> None:
        self._commit_running = False
        exc = f.exception()
        waiters, self._waiters = self._waiters, []
        if exc is not None:
            self._fail(f"fdatasync of the log failed: {exc}")
        else:
            self._synced_lsn = max(self._synced_lsn, target)
            self.commits += 1
            self._run_after()
        for lsn, fut in waiters:
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(StorageIOError(self._failed or "sync failed"))
            elif lsn <= target:
                fut.set_result(None)
            else:
                self._waiters.append((lsn, fut))
        if self._waiters:
            self._start_commit()

    # -- checkpoints --------------------------------------------------------------------------

    def _snapshot_body(self, next_log: int) -> bytes:
        layers = [
            [
                layer_id,
                layer.volume_id,
                layer.page_size,
                [
                    [
                        n,
                        int(p.state),
                        p.disk_mask,
                        p.generation,
                        None if p.crcs is None else _crc_bytes(p.crcs),
                    ]
                    for n, p in layer.pages.items()
                ],
            ]
            for layer_id, layer in self._layers.items()
        ]
        lineages = [[lid, lineage] for lid, lineage in sorted(self._lineages.items())]
        body: bytes = msgpack.packb(
            {
                "format": FORMAT_VERSION,
                "next_log": next_log,
                "layers": layers,
                "lineages": lineages,
            },
            use_bin_type=True,
        )
        return body

    def _write_snapshot_sync(self, body: bytes, next_log: int) -> None:
        self._sync_all([layer.fd for layer in self._layers.values()])
        head = SNAP_HEAD.pack(SNAP_MAGIC, len(body), crc32c.crc32c(body))
        self.files.replace_durably(self.root / "meta.snap", head + body)
        for p in self.root.glob("log.*"):
            suffix = p.name.split(".", 1)[1]
            if suffix.isdigit() and int(suffix) < next_log:
                self.files.unlink(p)

    def _start_checkpoint(self) -> None:
        if self._checkpointing or self._log is None:
            return
        task = asyncio.ensure_future(self.checkpoint())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def checkpoint(self) -> None:
        """Fold the log into a new meta.snap and start an empty log."""
        if self._checkpointing or self._log is None:
            return
        self._checkpointing = True
        loop = asyncio.get_running_loop()
        try:
            old = self._log
            if self._synced_switch != self._switch_id:
                return  # a new log starts a generation: not before the last one is synced
            try:
                new = self._open_log(old.seq + 1)
            except OSError as exc:
                log.warning("checkpoint postponed: %s", exc)
                return
            self._log = new
            self._new_generation()  # every page is recorded active again in the new log
            # Queued now, before any commit of the new log: a commit that completes later
            # thus also covers every record of the old one, and the new log's name.
            old_done = loop.run_in_executor(self._commit_exec, self._sync_close, old.fd)
            loop.run_in_executor(self._commit_exec, self.files.fsync_dir, self.root)
            body = self._snapshot_body(new.seq)
            try:
                await old_done
                await loop.run_in_executor(
                    self._data_exec, self._write_snapshot_sync, body, new.seq
                )
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    log.warning("checkpoint failed (old logs kept): %s", exc)
                else:  # a failed sync: the page cache can no longer be trusted
                    self._fail(f"checkpoint failed: {exc}")
        finally:
            self._checkpointing = False

    # -- helpers -------------------------------------------------------------------------------

    def _sync_close(self, fd: int) -> None:
        try:
            self.files.fdatasync(fd)
        finally:
            self.files.close(fd)

    def _sync_all(self, fds: list[int], names: bool = True) -> None:
        """fdatasync the files, and first (with ``names``) the names of new layer files."""
        if names:
            self.files.fsync_dir(self.root / "layers")
        for fd in fds:
            self.files.fdatasync(fd)

    def _layer_path(self, layer_id: int) -> Path:
        return self.root / "layers" / f"{layer_id}.data"

    def _next_gen(self) -> int:
        self._gen += 1
        return self._gen

    def check_layer(self, volume_id: int, layer_id: int, page_size: int | None) -> None:
        layer = self._layers.get(layer_id)
        if layer is not None and (
            layer.volume_id != volume_id or (page_size is not None and layer.page_size != page_size)
        ):
            check_layer(self, volume_id, layer_id, page_size)  # raises, saying why

    def _get_layer(self, volume_id: int, layer_id: int, page_size: int) -> _Layer:
        layer = self._layers.get(layer_id)
        if layer is not None and layer.volume_id == volume_id and layer.page_size == page_size:
            return layer
        check_layer(self, volume_id, layer_id, page_size)
        if layer is None:
            if layer_id in self._dropping:  # a layer id used again: its old file goes first
                assert self._log is not None
                self.files.fdatasync(self._log.fd)
                self._synced_lsn = self._lsn
                self._run_after()
            if layer_id in self._unlinked:  # and for good: never the old file under the id
                self.files.fsync_dir(self.root / "layers")
                self._unlinked.clear()
            self._append([R_LAYER, layer_id, volume_id, page_size])
            fd = self.files.open(self._layer_path(layer_id), os.O_RDWR | os.O_CREAT)
            self._new_layer_files = True
            layer = self._layers[layer_id] = _Layer(volume_id, page_size, fd)
        return layer

    def _after_durable(self, lsn: int, action: Callable[[], None]) -> None:
        """Run ``action`` once a commit has made the log durable up to ``lsn``: the next
        group commit, FLUSH or background pass (never if the commit fails: then the store
        has failed, and recovery redoes what is needed)."""
        if lsn <= self._synced_lsn:
            action()
        else:
            self._after.append((lsn, action))

    def _run_after(self) -> None:
        due = [a for lsn, a in self._after if lsn <= self._synced_lsn]
        self._after = [(lsn, a) for lsn, a in self._after if lsn > self._synced_lsn]
        for action in due:
            action()

    def _punch_tombstone(self, layer: _Layer, layer_id: int, page: int) -> None:
        p = layer.pages.get(page)
        if self._layers.get(layer_id) is layer and p is not None and p.state == PageState.TOMBSTONE:
            self.files.punch(layer.fd, page * layer.page_size, layer.page_size)

    def _unlink_dropped(self, layer_id: int, lsn: int) -> None:
        if self._dropping.get(layer_id) == lsn:
            del self._dropping[layer_id]
            self.files.unlink(self._layer_path(layer_id))
            self._unlinked.add(layer_id)

    @property
    def failure(self) -> str | None:
        return self._failed

    def _fail(self, why: str) -> None:
        """Fail-stop: after a failed fsync the kernel may have dropped dirty pages and
        marked them clean, so neither the page cache nor the files can be trusted any
        more (PostgreSQL's "fsyncgate").  Every later operation is refused; the server
        stops renewing its lease and is marked down; a restart recovers from the disk."""
        if self._failed is None:
            self._failed = why
            log.error("page store failed, refusing all I/O from now on: %s", why)

    def _refuse_if_failed(self) -> None:
        if self._failed is not None:
            raise StorageIOError(f"store failed: {self._failed}")

    def _page(self, layer_id: int, page: int) -> _Page | None:
        layer = self._layers.get(layer_id)
        return None if layer is None else layer.pages.get(page)

    def _allocate(self, layer: _Layer, page: int) -> None:
        if self._low_space:
            self._extend_log()
            if self._low_space:
                raise NoSpace("no space left on the storage server's disk")
        try:
            self.files.allocate(layer.fd, page * layer.page_size, layer.page_size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space left for page {page}: {exc.strerror}") from None
            raise StorageIOError(f"allocating page {page}: {exc}") from None

    def _pwrite(self, layer: _Layer, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.files.pwrite(layer.fd, data, offset)
        self._dirty_fds.add(layer.fd)

    def _undo(self, record: list[Any]) -> None:
        """Append a record taking back one whose data write failed; if even that fails,
        the store can no longer vouch for its metadata and stops taking writes."""
        try:
            self._append(record)
        except (LaminaError, OSError) as exc:
            self._fail(f"could not undo a failed write: {exc}")

    def _quarantine(self, layer_id: int, layer: _Layer, page: int, p: _Page, why: str) -> Corrupt:
        log.error("quarantining page %d of layer %d: %s", page, layer_id, why)
        try:
            data = self.files.pread(layer.fd, layer.page_size, page * layer.page_size)
            name = f"{layer_id}-{page}-{time.time_ns()}.page"
            self.files.write_file(self.root / "quarantine" / name, data, durable=False)
        except OSError as exc:
            log.warning("could not keep a copy of the quarantined page: %s", exc)
        p.state = PageState.QUARANTINED
        p.generation = self._next_gen()
        if p.crcs is not None:
            self._used -= layer.page_size
        p.crcs = None
        try:
            self._append([R_PAGE, layer_id, page, int(p.state), p.disk_mask, p.generation, None])
        except LaminaError as exc:
            log.warning("quarantine of page %d not recorded: %s", page, exc)
        return Corrupt(f"page {page} of layer {layer_id} failed its checksum ({why}); quarantined")

    # -- PageStore -----------------------------------------------------------------------------

    def info(self, layer_id: int, page: int) -> PageInfo:
        p = self._page(layer_id, page)
        return ABSENT_INFO if p is None else PageInfo(p.state, p.mask, p.generation)

    def layer_page_size(self, layer_id: int) -> int | None:
        layer = self._layers.get(layer_id)
        return None if layer is None else layer.page_size

    def layer_volume(self, layer_id: int) -> int | None:
        layer = self._layers.get(layer_id)
        return None if layer is None else layer.volume_id

    def layer_lineage(self, layer_id: int) -> int:
        return self._lineages.get(layer_id, 0)

    def record_lineage(self, layer_id: int, lineage: int) -> None:
        """Logged before any page record of the layer that follows it (the log's durable
        prefix then never holds the layer's pages without its token)."""
        if self._lineages.get(layer_id) == lineage:
            return
        self._append([R_LINEAGE, layer_id, lineage])
        self._lineages[layer_id] = lineage

    def read(self, layer_id: int, page: int, offset: int, length: int) -> bytes:
        self._refuse_if_failed()
        layer = self._layers.get(layer_id)
        p = None if layer is None else layer.pages.get(page)
        if layer is None or p is None or p.state != PageState.PRESENT or p.crcs is None:
            if p is not None and p.state == PageState.QUARANTINED:
                raise Corrupt(f"page {page} of layer {layer_id} is quarantined")
            raise NotFound(f"page {page} of layer {layer_id} holds no data")
        b0 = offset // BLOCK
        b1 = -(-(offset + length) // BLOCK)
        n = (b1 - b0) * BLOCK
        data = self.files.pread(layer.fd, n, page * layer.page_size + b0 * BLOCK)
        if len(data) < n:
            data = data.ljust(n, b"\0")
        view = memoryview(data)
        fn = crc32c.crc32c
        crcs = p.crcs
        for i in range(b1 - b0):
            if fn(view[i * BLOCK : (i + 1) * BLOCK]) != crcs[b0 + i]:
                raise self._quarantine(layer_id, layer, page, p, f"block {b0 + i}")
        skip = offset - b0 * BLOCK
        if skip == 0 and length == n:
            return data
        return data[skip : skip + length]

    def write(
        self,
        volume_id: int,
        layer_id: int,
        page_size: int,
        page: int,
        offset: int,
        data: bytes | bytearray,
    ) -> int:
        self._refuse_if_failed()
        layer = self._get_layer(volume_id, layer_id, page_size)
        p = layer.pages.get(page)
        if p is None or p.state in (PageState.ABSENT, PageState.TOMBSTONE):
            raise NotFound(f"page {page} of layer {layer_id} is not writable")
        length = len(data)
        if offset + length > page_size or length == 0:
            raise BadRequest("write outside the page")
        full = offset == 0 and length == page_size
        if p.state == PageState.QUARANTINED and not full:
            raise Corrupt(f"page {page} of layer {layer_id} is quarantined")
        fresh = p.crcs is None
        if fresh:
            if not full:  # the extent may hold bytes of an undone create: zeros first
                self.files.punch(layer.fd, page * page_size, page_size)
            self._allocate(layer, page)
        crcs = p.crcs if p.crcs is not None else zero_crcs(page_size // BLOCK)
        base = page * page_size
        b0 = offset // BLOCK
        b1 = -(-(offset + length) // BLOCK)
        buf: bytes | bytearray = data
        if offset % BLOCK or length % BLOCK:
            n = (b1 - b0) * BLOCK
            old = bytearray(self.files.pread(layer.fd, n, base + b0 * BLOCK).ljust(n, b"\0"))
            if not fresh:
                for b in {b0, b1 - 1}:
                    i = b - b0
                    if crc32c.crc32c(memoryview(old)[i * BLOCK : (i + 1) * BLOCK]) != crcs[b]:
                        raise self._quarantine(layer_id, layer, page, p, f"block {b}")
            skip = offset - b0 * BLOCK
            old[skip : skip + length] = data
            buf = old
        new = block_crcs(buf)
        gen = self._next_gen()
        if p.state != PageState.PRESENT or fresh:
            crcs = array("I", crcs)
            crcs[b0:b1] = new
            self._append(
                [R_PAGE, layer_id, page, int(PageState.PRESENT), p.disk_mask, gen, _crc_bytes(crcs)]
            )
        else:
            self._append([R_CRC, layer_id, page, b0, _crc_bytes(new), gen])
            before = crcs[b0:b1]
            crcs[b0:b1] = new
        try:
            self._pwrite(layer, buf, base + b0 * BLOCK)
        except OSError as exc:
            # The record already claims the new checksums: take them back.
            if fresh or p.state != PageState.PRESENT:
                self._undo([R_PAGE, layer_id, page, int(p.state), p.disk_mask, p.generation, None])
            else:
                crcs[b0:b1] = before
                self._undo([R_CRC, layer_id, page, b0, _crc_bytes(before), p.generation])
            raise _io_error(exc, f"writing page {page} of layer {layer_id}") from None
        if fresh:
            self._used += page_size
        p.crcs = crcs
        p.state = PageState.PRESENT
        p.generation = gen
        self._write_seq += 1
        p.data_seq = self._write_seq
        return gen

    def create(
        self,
        volume_id: int,
        layer_id: int,
        page_size: int,
        page: int,
        data: bytes | bytearray | None,
        mask: int,
    ) -> tuple[bool, int]:
        self._refuse_if_failed()
        layer = self._get_layer(volume_id, layer_id, page_size)
        p = layer.pages.get(page)
        if p is not None and p.state != PageState.ABSENT:
            return False, p.generation
        gen = self._next_gen()
        if data is None:
            lsn = self._append([R_PAGE, layer_id, page, int(PageState.ZERO), mask, gen, None])
            layer.pages[page] = _Page(PageState.ZERO, mask, gen, None, mask, lsn)
            self._pages += 1
            return True, gen
        if len(data) != page_size:
            raise BadRequest("create needs a full page")
        self._allocate(layer, page)
        crcs = block_crcs(data)
        lsn = self._append(
            [R_PAGE, layer_id, page, int(PageState.PRESENT), mask, gen, _crc_bytes(crcs)]
        )
        try:
            self._pwrite(layer, data, page * page_size)
        except OSError as exc:
            self._undo([R_DROP_PAGE, layer_id, page])
            raise _io_error(exc, f"writing page {page} of layer {layer_id}") from None
        self._write_seq += 1
        layer.pages[page] = _Page(PageState.PRESENT, mask, gen, crcs, mask, lsn, self._write_seq)
        self._pages += 1
        self._used += page_size
        return True, gen

    def set_mask(
        self, layer_id: int, page: int, mask: int, wait_durable: bool = True
    ) -> Awaitable[None] | None:
        self._refuse_if_failed()
        p = self._page(layer_id, page)
        if p is None:
            raise NotFound(f"page {page} of layer {layer_id} is absent")
        p.mask = mask
        cleared = p.disk_mask & ~mask
        if cleared:
            target = p.disk_mask & mask
            p.disk_lsn = self._append([R_MASK, layer_id, page, target])
            p.disk_mask = target
        if mask & ~p.disk_mask:
            self._lazy.add((layer_id, page))
        if not wait_durable:
            return None
        need = p.disk_lsn if mask != FULL else 0
        if p.active != self._generation:
            # a write follows: its page is recorded as active first (see _resolve_doubts)
            need = self._append([R_ACTIVE, layer_id, page])
            p.active = self._generation
            self._activating[(layer_id, page)] = need
        need = max(need, self._activating.get((layer_id, page), 0))
        if need > self._synced_lsn:
            return self._durable(need)
        return None

    async def _sync_data(self) -> int:
        """fdatasync every layer file written so far; the write sequence number covered.
        A failed fdatasync may have dropped dirty pages: the store stops accepting writes."""
        seq = self._write_seq
        assert self._log is not None
        if (
            self._synced_switch == self._switch_id
            and time.monotonic() - self._generation_started >= ACTIVE_PERIOD
        ):
            self._new_generation()
            self._append([R_AGE])
        covers = self._switch_id
        upto = (self._log.seq, self._log.offset)  # every data record before it is covered
        fds = list(self._dirty_fds)
        self._dirty_fds.clear()
        names, self._new_layer_files = self._new_layer_files, False
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._data_exec, self._sync_all, fds, names
            )
        except OSError as exc:
            self._fail(f"fdatasync of the data failed: {exc}")
            raise StorageIOError(f"store failed: {self._failed}") from None
        if seq > self._marked_seq or covers > self._synced_switch:
            # Tell recovery that those records' data is durable (see _resolve_doubts).
            try:
                self._append([R_SYNCED, *upto])
                self._marked_seq = seq
                self._synced_switch = max(self._synced_switch, covers)
            except LaminaError as exc:
                log.warning("sync marker not recorded: %s", exc)
        return seq

    def _new_generation(self) -> None:
        self._generation += 1
        self._switch_id += 1
        self._generation_started = time.monotonic()
        self._activating = {k: v for k, v in self._activating.items() if v > self._synced_lsn}

    def _persist_lazy(self, seq: int) -> int:
        """Append the mask increases of pages whose data is durable up to ``seq``."""
        done = 0
        for key in list(self._lazy):
            p = self._page(*key)
            if p is None:
                self._lazy.discard(key)
                continue
            if p.data_seq > seq:
                continue
            self._lazy.discard(key)
            if p.mask != p.disk_mask and not (p.disk_mask & ~p.mask):
                try:
                    p.disk_lsn = self._append([R_MASK, key[0], key[1], p.mask])
                except LaminaError:
                    self._lazy.add(key)
                    break
                p.disk_mask = p.mask
                done += 1
        return done

    async def persist_restores(self) -> int:
        """Persist mask increases once the data they vouch for is durable; how many.
        FLUSH does the same for free, since it syncs the data anyway."""
        if (
            not self._lazy
            and self._write_seq == self._marked_seq
            and not self._after
            and self._synced_switch == self._switch_id
        ):
            return 0
        done = self._persist_lazy(await self._sync_data())
        if self._lsn > self._synced_lsn:
            await self._durable(self._lsn)
        return done

    def tombstone(self, volume_id: int, layer_id: int, page_size: int, page: int) -> int:
        self._refuse_if_failed()
        layer = self._get_layer(volume_id, layer_id, page_size)
        gen = self._next_gen()
        lsn = self._append([R_PAGE, layer_id, page, int(PageState.TOMBSTONE), FULL, gen, None])
        old = layer.pages.get(page)
        if old is None:
            self._pages += 1
        elif old.crcs is not None:
            # the hole only once the tombstone is durable: a power loss must never leave
            # the page's old record over a hole
            self._after_durable(lsn, lambda: self._punch_tombstone(layer, layer_id, page))
            self._used -= page_size
        layer.pages[page] = _Page(PageState.TOMBSTONE, FULL, gen, None, FULL, lsn)
        self._lazy.discard((layer_id, page))
        return gen

    def delete_layer(self, layer_id: int) -> int:
        layer = self._layers.get(layer_id)
        if layer is None:
            if self._lineages.pop(layer_id, None) is not None:
                self._append([R_DROP, layer_id])  # forget the token recorded ahead
            return 0
        self._lineages.pop(layer_id, None)
        lsn = self._append([R_DROP, layer_id])
        del self._layers[layer_id]
        self._pages -= len(layer.pages)
        self._used -= layer.page_size * sum(1 for p in layer.pages.values() if p.crcs is not None)
        # Unlink once the DROP is durable (a power loss must never leave the layer's records
        # without its file; recovery removes the file of a dropped layer), close on the I/O
        # thread after any sync already queued for this descriptor.
        self._dropping[layer_id] = lsn
        self._after_durable(lsn, lambda: self._unlink_dropped(layer_id, lsn))
        self._dirty_fds.discard(layer.fd)
        self._data_exec.submit(self.files.close, layer.fd)
        return len(layer.pages)

    def enumerate(
        self, layer_id: int, what: EnumerateWhat, start: int, limit: int
    ) -> tuple[list[int], int, bool]:
        layer = self._layers.get(layer_id)
        if layer is None:
            return [], start, True
        return enumerate_pages(
            ((n, p.state, p.mask) for n, p in layer.pages.items()), what, start, limit
        )

    async def flush(self) -> None:
        if self._failed:
            raise StorageIOError(f"store failed earlier: {self._failed}")
        self._persist_lazy(await self._sync_data())
        if self._lsn > self._synced_lsn:
            await self._durable(self._lsn)

    def stats(self) -> StoreStats:
        st = os.statvfs(self.root)
        return StoreStats(st.f_blocks * st.f_frsize, self._used, self._pages, len(self._layers))

    def layers(self) -> list[int]:
        return sorted(self._layers)

    async def close(self) -> None:
        """Flush, checkpoint and release every file."""
        if self._log is None:
            return
        try:
            await self.persist_restores()
            await self.flush()
            await self.checkpoint()
        finally:
            self._commit_exec.shutdown(wait=True)
            self._data_exec.shutdown(wait=True)
            self._close_fds()
            self._log = None

    def _close_fds(self) -> None:
        for layer in self._layers.values():
            if layer.fd >= 0:
                self.files.close(layer.fd)
                layer.fd = -1
        if self._log is not None:
            self.files.close(self._log.fd)

    def abandon(self) -> None:
        """Drop every file handle without flushing (tests simulate a crash with this)."""
        self._commit_exec.shutdown(wait=True)
        self._data_exec.shutdown(wait=True)
        for layer in self._layers.values():
            if layer.fd >= 0:
                self.files.close(layer.fd)
        if self._log is not None:
            self.files.close(self._log.fd)
            self._log = None


def _io_error(exc: OSError, what: str) -> LaminaError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: {exc.strerror}")
    return StorageIOError(f"{what}: {exc.strerror or exc}")

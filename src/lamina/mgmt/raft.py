"""Raft replication of the managers' command log: the only module that knows PySyncObj.

Theory of operation
-------------------
The managers (1, 3 or 5 of them) keep one ordered log of opaque command bytes.  Any member
may :meth:`ReplicatedLog.propose` a command; PySyncObj forwards it to the Raft leader,
which appends it to the log and commits it once a majority has it in its journal.  Every
member then calls the ``apply`` callback it was built with, once per committed command,
in log order, on PySyncObj's own thread.  The same happens after a restart: the member
replays its journal (and its last snapshot, if the log was compacted) through ``apply``
before it takes new entries from the leader.  What a command means is the caller's
business: this module never looks inside it.

The proposer gets back whatever its *own* ``apply`` returned for the command.  A result
never crosses the network, so it may be any Python object; an exception raised by
``apply`` is handed to the proposer the same way and re-raised there.

Bridging threads: PySyncObj runs a tick thread per member.  :meth:`propose` submits the
command with a callback; the callback runs on the tick thread and hands the outcome to
the proposer's event loop with ``call_soon_threadsafe``.  A proposal that fails is
reported as :class:`NotLeader` (the leader was missing or changed) or
:class:`~lamina.errors.Unavailable` (no commit within the timeout, queue full, closed);
``NotLeader`` is a kind of ``Unavailable``.  A proposal that timed out or whose leader
changed in flight may still commit later: its outcome is unknown, so commands should be
safe to apply even when the proposer gave up (e.g. conditional on the epoch they expect).

Security: every Raft message is pickled by PySyncObj, so the cluster key (``password``)
is mandatory: PySyncObj encrypts and authenticates each message with it (Fernet), and a
peer that does not hold the key is disconnected before anything it sent is unpickled.
The snapshot file written for log compaction is our own format (magic, version, msgpack),
not pickle.

Files in ``journal_dir`` (all written by PySyncObj except through our snapshot hooks):
``raft.journal`` (the log), ``raft.journal.meta`` (term, vote, commit index) and
``raft.dump`` (the snapshot after log compaction; see docs/raft.md).

Durability: PySyncObj never fsyncs.  This module installs its own journal class
(:class:`_DurableJournal`, through ``pysyncobj.syncobj.createJournal``, the one place
PySyncObj makes its journal) and transport (:class:`_SyncingTransport`).  The journal
remembers that it was changed; before this member sends any Raft message (an
acknowledgement of entries, a vote, the leader's append_entries) and at the end of every
tick (before a single member counts its own entries as committed on the next one), a
changed journal is fdatasynced.  So no member acknowledges, and no leader counts, an entry
that is not on its disk, and a committed entry survives losing power on every member at
once.  The meta file (term and vote) is written to a temporary file, fsynced, renamed and
its directory fsynced before any vote leaves.  Log compaction rewrites the journal into a
new file that replaces the old one only once it and the snapshot it follows are durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import msgpack
import pysyncobj.syncobj
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.journal import FileJournal, Journal, MemoryJournal, MetaStorer
from pysyncobj.node import TCPNode
from pysyncobj.pickle import dumps as _pysyncobj_dumps
from pysyncobj.transport import TCPTransport

from lamina.durable import fsync_dir
from lamina.errors import LocalError, Unavailable

__all__ = [
    "JOURNAL_FILE",
    "MAX_COMMAND_BYTES",
    "SNAPSHOT_FILE",
    "NotLeader",
    "RaftStatus",
    "RaftTimings",
    "ReplicatedLog",
    "SyncObserver",
]

log = logging.getLogger(__name__)

JOURNAL_FILE: Final = "raft.journal"
SNAPSHOT_FILE: Final = "raft.dump"
# PySyncObj sends a log entry larger than its 64 KiB batch in pieces through a separate
# path; commands stay well below that (they are map changes, not data).
MAX_COMMAND_BYTES: Final = 60_000
# A member compacts its log into a snapshot after this many entries, or this many seconds
# since its last snapshot if new entries were applied meanwhile (PySyncObj's rule).
COMPACT_MIN_ENTRIES: Final = 5000
COMPACT_MIN_SECONDS: Final = 300

SNAPSHOT_MAGIC: Final = b"LMRAFTSN"
SNAPSHOT_VERSION: Final = 1

VALID_CLUSTER_SIZES: Final = (1, 3, 5)
_LEADER_STATE: Final = 2  # PySyncObj's _RAFT_STATE.LEADER
_CONNECTED: Final = 2  # PySyncObj's partner node status for "connected"

# PySyncObj ships no type hints.  The decorated method takes PySyncObj's extra keyword
# ``callback(result, fail_reason)`` when called, so it is typed loosely.
_replicated: Callable[[Callable[..., Any]], Callable[..., Any]] = replicated


class NotLeader(Unavailable):
    """No Raft leader was reachable, or the leader changed while the command was in flight.

    ``detail`` is PySyncObj's failure reason code.
    """


@dataclass(frozen=True, slots=True)
class RaftTimings:
    """PySyncObj's timing knobs, in seconds (see docs/raft.md for why these values).

    With the defaults a command commits in tens of milliseconds and a new leader is
    elected within about one to two seconds of losing the old one.
    """

    tick: float = 0.005  # autoTickPeriod: longest wait for socket events per tick
    heartbeat: float = 0.01  # appendEntriesPeriod: leader's append_entries interval
    election_min: float = 0.3  # raftMinTimeout
    election_max: float = 0.6  # raftMaxTimeout
    connection_timeout: float = 2.0  # a connection silent this long is dropped
    reconnect: float = 1.0  # connectionRetryTime: interval between connection attempts
    leader_fallback: float = 2.0  # a leader without majority replies this long steps down

    def __post_init__(self) -> None:
        # PySyncObj's own rules (SyncObjConf.validate), checked here so a bad value is a
        # clear error instead of an AssertionError inside the library.
        if not (
            self.tick > 0
            and self.heartbeat > 0
            and self.election_min > 3 * self.heartbeat
            and self.election_max > self.election_min
            and self.connection_timeout >= self.election_max
            and self.reconnect >= 0
            and self.leader_fallback > self.heartbeat
        ):
            raise LocalError(f"inconsistent raft timings: {self}")


@dataclass(frozen=True, slots=True)
class RaftStatus:
    """One member's view of the Raft group (it may be stale by the time it is read)."""

    self_addr: str
    leader: str | None  # address of the leader this member knows, if any
    term: int
    is_leader: bool
    commit_index: int
    last_applied: int
    connected_peers: int  # other members this one has an authenticated connection to
    has_quorum: bool  # this member plus its connected peers form a majority
    caught_up: bool  # see ReplicatedLog.caught_up


def _check_addr(addr: str) -> str:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LocalError(f"raft address {addr!r} is not HOST:PORT")
    return addr


def _check_password(password: str) -> str:
    try:
        key = bytes.fromhex(password)
    except ValueError:
        key = b""
    if not key:
        raise LocalError("the raft password must be the cluster key as non-empty hex")
    return password


def _fail_error(reason: int) -> Unavailable:
    """The typed error for one of PySyncObj's FAIL_REASON codes."""
    if reason == FAIL_REASON.MISSING_LEADER:
        return NotLeader("no raft leader (election in progress or no quorum)", reason)
    if reason == FAIL_REASON.NOT_LEADER:
        return NotLeader("the raft leader changed before logging the command", reason)
    if reason == FAIL_REASON.DISCARDED:
        return NotLeader("a new raft leader replaced the command in the log", reason)
    if reason == FAIL_REASON.LEADER_CHANGED:
        return NotLeader("the raft leader changed in flight; outcome unknown", reason)
    if reason == FAIL_REASON.QUEUE_FULL:
        return Unavailable("the raft command queue is full", reason)
    if reason == FAIL_REASON.REQUEST_DENIED:
        return Unavailable("the raft leader denied the command", reason)
    if reason == FAIL_REASON.UNKNOWN_OUTCOME:
        return Unavailable("raft cannot tell whether the command committed", reason)
    return Unavailable(f"raft failure reason {reason}", reason)


@dataclass(frozen=True, slots=True)
class _Raised:
    """``apply`` raised: the exception travels to the proposer as the result."""

    error: BaseException


def _settle(fut: asyncio.Future[Any], result: Any, reason: int) -> None:
    """Resolve a proposal's future on its event loop (a late outcome is dropped)."""
    if fut.done():
        return
    if reason != FAIL_REASON.SUCCESS:
        fut.set_exception(_fail_error(reason))
    elif isinstance(result, _Raised):
        fut.set_exception(result.error)
    else:
        fut.set_result(result)


def _fail_closed(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(Unavailable("the raft member was closed; outcome unknown"))


class SyncObserver(Protocol):
    """What a test-only power cut (:mod:`lamina.mgmt.powerloss`) is told by the Raft
    thread: every journal opened, every completed journal sync, and every gap between two
    ticks."""

    def journal_opened(self, path: str) -> None:
        """The journal ``path`` is about to be opened (or created): what it holds now is
        what the disk holds."""

    def journal_synced(self, path: str, fd: int) -> None:
        """The journal ``path``, open as ``fd``, was just made durable."""

    def between_ticks(self) -> None:
        """Between two ticks, before the end-of-tick sync."""


# journal path -> the observer its journal reports to, set before PySyncObj makes it
_OBSERVERS: dict[str, SyncObserver] = {}


def _journal_fd(journal: FileJournal) -> int:
    """The descriptor of a FileJournal's file (PySyncObj reopens it when it grows it)."""
    return int(journal._FileJournal__journalFile._ResizableFile__f.fileno())


class _DurableMeta(MetaStorer):  # type: ignore[misc]  # PySyncObj has no type hints
    """PySyncObj's meta file (term, vote, commit index), replaced durably: temporary file
    fsynced, renamed over the old one, directory fsynced."""

    def storeMeta(self, meta: dict[str, Any]) -> None:  # noqa: N802  # PySyncObj's name
        path = self.getPath()
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(_pysyncobj_dumps(meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")


class _DurableJournal(FileJournal):  # type: ignore[misc]  # PySyncObj has no type hints
    """PySyncObj's file journal that knows when it holds changes not yet on disk.

    Every change marks it dirty; :meth:`sync` fdatasyncs the file (on Linux that also
    writes back what PySyncObj wrote through its memory map).  All calls come from the
    member's tick thread."""

    def __init__(self, path: str, observer: SyncObserver | None = None) -> None:
        self._lamina_path = path
        self._lamina_dirty = True
        self._lamina_new_name = not os.path.exists(path)
        self._lamina_observer = observer
        if observer is not None:
            observer.journal_opened(path)
        super().__init__(path)
        self._FileJournal__metaStorer = _DurableMeta(path + ".meta")
        self.sync()

    def sync(self) -> None:
        """Make every change so far durable (a no-op when there is none)."""
        if not self._lamina_dirty:
            return
        os.fdatasync(_journal_fd(self))
        if self._lamina_new_name:
            fsync_dir(os.path.dirname(self._lamina_path) or ".")
            self._lamina_new_name = False
        self._lamina_dirty = False
        self._synced()

    def _synced(self) -> None:
        if self._lamina_observer is not None:
            self._lamina_observer.journal_synced(self._lamina_path, _journal_fd(self))

    def onOneSecondTimer(self) -> None:  # noqa: N802  # PySyncObj's name
        # the commit index the meta file is about to store never runs ahead of the
        # entries durable in the journal
        self.sync()
        super().onOneSecondTimer()

    def add(self, command: bytes, idx: int, term: int) -> None:
        self._lamina_dirty = True
        super().add(command, idx, term)

    def deleteEntriesFrom(self, entry_from: int) -> None:  # noqa: N802  # PySyncObj's name
        self._lamina_dirty = True
        super().deleteEntriesFrom(entry_from)

    def clear(self) -> None:
        # PySyncObj clears the journal after it installed a snapshot from the leader: the
        # snapshot must be durable before the entries it replaces may go.
        self._snapshot_durable()
        self._lamina_dirty = True
        super().clear()

    def deleteEntriesTo(self, entry_to: int) -> None:  # noqa: N802  # PySyncObj's name
        """Log compaction: keep the entries from ``entry_to`` on, in a new file that
        replaces this one only once it, and the snapshot it follows, are durable (PySyncObj
        rewrites the file in place, which a crash halfway through would leave short)."""
        keep = list(self._FileJournal__journal[entry_to:])
        self._snapshot_durable()
        tmp = self._lamina_path + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fresh = FileJournal(tmp)
        for entry in keep:
            fresh.add(*entry)
        os.fdatasync(_journal_fd(fresh))
        fresh._destroy()
        meta: dict[str, Any] = getattr(self, "_FileJournal__meta")  # noqa: B009
        saved: bool = getattr(self, "_FileJournal__metaSaved")  # noqa: B009
        self._destroy()
        os.replace(tmp, self._lamina_path)
        fsync_dir(os.path.dirname(self._lamina_path) or ".")
        FileJournal.__init__(self, self._lamina_path)
        self._FileJournal__meta, self._FileJournal__metaSaved = meta, saved
        self._FileJournal__metaStorer = _DurableMeta(self._lamina_path + ".meta")
        self._lamina_dirty = False
        self._synced()

    def _snapshot_durable(self) -> None:
        """fsync the snapshot file beside the journal, and the directory (its rename)."""
        snapshot = os.path.join(os.path.dirname(self._lamina_path), SNAPSHOT_FILE)
        try:
            fd = os.open(snapshot, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(snapshot) or ".")


def _create_journal(path: str | None = None) -> Journal:
    """What PySyncObj calls to make a member's journal: ours when it is a file."""
    return MemoryJournal() if path is None else _DurableJournal(path, _OBSERVERS.pop(path, None))


# PySyncObj makes its journal through this module-level name only (SyncObj.__init__).
pysyncobj.syncobj.createJournal = _create_journal


class _SyncingTransport(TCPTransport):  # type: ignore[misc]  # PySyncObj has no type hints
    """PySyncObj's TCP transport that makes the journal durable before any message
    leaves: every acknowledgement, vote and append_entries then speaks of entries that
    are on this member's disk."""

    def send(self, node: Any, message: Any) -> bool:
        self._syncObj._lamina_sync_journal()
        return bool(super().send(node, message))


class _Member(SyncObj):  # type: ignore[misc]  # PySyncObj has no type hints
    """The PySyncObj object: one replicated method that hands commands to ``apply``."""

    def __init__(
        self,
        self_addr: str,
        others: list[str],
        conf: Any,
        apply: Callable[[bytes], Any],
        observer: SyncObserver | None = None,
    ) -> None:
        # Set before SyncObj.__init__: its tick thread may replay the journal at once.
        self._lamina_apply = apply
        self.caught_up = False
        if observer is not None:
            _OBSERVERS[conf.journalFile] = observer
        try:
            super().__init__(self_addr, others, conf, transportClass=_SyncingTransport)
        finally:
            _OBSERVERS.pop(conf.journalFile, None)
        if observer is not None:  # first: entries of the tick not yet synced are lost
            self.addOnTickCallback(observer.between_ticks)
        self.addOnTickCallback(self._lamina_sync_journal)
        self.addOnTickCallback(self._check_caught_up)

    def _lamina_sync_journal(self) -> None:
        """fdatasync the journal if it changed (before any send, and after every tick:
        the entries a leader appended in this tick count for its commit index in the next)."""
        journal = self._SyncObj__raftLog
        if isinstance(journal, _DurableJournal):
            journal.sync()

    def _check_caught_up(self) -> None:
        """On the tick thread, after every tick: latch ``caught_up`` once this member knows
        a leader, has applied up to the commit index it learned from that leader in this
        run, and has applied an entry of the current term (a new leader's commit index
        covers everything committed before its term only once an entry of its own term
        commits: its no-op).  Read without a lock: a bool is replaced atomically."""
        if self.caught_up or self._getLeader() is None:
            return
        leader_commit = self._SyncObj__leaderCommitIndex  # None until learned in this run
        applied = self.raftLastApplied
        if leader_commit is None or applied < leader_commit:
            return
        entries = self._SyncObj__getEntries(applied, 1)
        if entries and entries[0][2] == self.raftCurrentTerm:
            self.caught_up = True

    @_replicated
    def _command(self, command: bytes) -> Any:
        try:
            return self._lamina_apply(command)
        except Exception as exc:
            # apply is deterministic, so every member raises here alike; the entry counts
            # as applied (re-applying it forever would stall the member).
            log.exception("raft apply raised on a committed command")
            return _Raised(exc)


class ReplicatedLog:
    """One member of a Raft group that orders opaque commands and applies them everywhere.

    ``apply(command)`` is called on PySyncObj's thread for every committed command, in log
    order, on every member, also when replaying the journal after a restart; it must be
    deterministic and must not block on the event loop.  ``dump()`` returns the state
    that the applied commands built and ``load(data)`` replaces the state with such a
    dump; both run on PySyncObj's thread too, when the log is compacted or a snapshot is
    installed.  Build and close the object on the event loop's thread: PySyncObj's tick
    thread stops when the thread that built it exits.
    """

    def __init__(
        self,
        self_addr: str,
        peers: list[str],
        journal_dir: Path,
        password: str,
        apply: Callable[[bytes], Any],
        dump: Callable[[], bytes],
        load: Callable[[bytes], None],
        *,
        timings: RaftTimings | None = None,
        bind_addr: str | None = None,
        observer: SyncObserver | None = None,
    ) -> None:
        """``observer``: TEST ONLY, told of every journal sync and tick
        (:mod:`lamina.mgmt.powerloss`)."""
        self.self_addr = _check_addr(self_addr)
        others = list(dict.fromkeys(_check_addr(p) for p in peers if p != self_addr))
        size = len(others) + 1
        if size not in VALID_CLUSTER_SIZES:
            raise LocalError(f"a raft group has 1, 3 or 5 members, not {size}")
        self.peers = others
        self.journal_dir = journal_dir
        self._dump = dump
        self._load = load
        self._closed = False
        self._pending: set[asyncio.Future[Any]] = set()
        self._lock = threading.Lock()

        if not journal_dir.is_dir():
            journal_dir.mkdir(parents=True)
            fsync_dir(journal_dir.parent)
        snapshot = journal_dir / SNAPSHOT_FILE
        if snapshot.exists():
            # PySyncObj logs and ignores a snapshot that fails to load, which would leave
            # the state without the compacted commands: refuse to start instead.
            _decode_snapshot(snapshot.read_bytes())

        t = timings or RaftTimings()
        conf = SyncObjConf(
            password=_check_password(password),
            journalFile=str(journal_dir / JOURNAL_FILE),
            fullDumpFile=str(snapshot),
            serializer=self._write_snapshot,
            deserializer=self._read_snapshot,
            autoTickPeriod=t.tick,
            appendEntriesPeriod=t.heartbeat,
            raftMinTimeout=t.election_min,
            raftMaxTimeout=t.election_max,
            connectionTimeout=t.connection_timeout,
            connectionRetryTime=t.reconnect,
            leaderFallbackTimeout=t.leader_fallback,
            # Commands proposed during an election wait for the new leader (bounded by
            # the proposal's timeout) instead of failing at once.
            commandsWaitLeader=True,
            dynamicMembershipChange=False,
            logCompactionMinEntries=COMPACT_MIN_ENTRIES,
            logCompactionMinTime=COMPACT_MIN_SECONDS,
            bindAddress=_check_addr(bind_addr) if bind_addr else self_addr,
            maxBindRetries=1,
            # never fork a process that runs threads and an event loop
            useFork=False,
        )
        self._member = _Member(self_addr, others, conf, apply, observer)
        try:
            self._member.waitBinded()
        except Exception as exc:
            self._member._doDestroy()
            self._closed = True
            raise LocalError(f"cannot listen for raft on {conf.bindAddress}: {exc}") from exc

    # -- proposals ---------------------------------------------------------------------

    async def propose(self, command: bytes, timeout: float = 5.0) -> Any:
        """Commit ``command`` and return what this member's ``apply`` returned for it.

        Raises :class:`NotLeader` or :class:`~lamina.errors.Unavailable` when it cannot
        commit within ``timeout`` seconds; then the outcome may be unknown (see module
        docstring).
        """
        if not isinstance(command, bytes):
            raise TypeError("a raft command is bytes")
        if len(command) > MAX_COMMAND_BYTES:
            raise LocalError(f"raft command of {len(command)} bytes > {MAX_COMMAND_BYTES}")
        if self._closed:
            raise Unavailable("the raft member is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def on_outcome(result: Any, reason: int) -> None:  # on PySyncObj's thread
            with contextlib.suppress(RuntimeError):  # the proposer's loop is gone
                loop.call_soon_threadsafe(_settle, fut, result, reason)

        with self._lock:
            self._pending.add(fut)
        deadline = asyncio.timeout(timeout)
        try:
            self._member._command(command, callback=on_outcome)
            async with deadline:
                return await fut
        except TimeoutError:
            if not deadline.expired():
                raise  # apply itself raised TimeoutError
            raise Unavailable(
                f"raft did not commit within {timeout:g} s (no quorum?); outcome unknown"
            ) from None
        finally:
            with self._lock:
                self._pending.discard(fut)

    # -- status and lifecycle ----------------------------------------------------------

    def status(self) -> RaftStatus:
        """This member's current view: leader, term, indexes, connected peers."""
        for _ in range(10):
            try:
                # read from another thread without a lock: a dict it iterates may change
                # size under it, so retry
                st = self._member.getStatus()
                break
            except RuntimeError:
                continue
        else:
            raise Unavailable("could not read the raft status")
        leader = st["leader"]
        prefix = "partner_node_status_server_"
        return RaftStatus(
            self_addr=self.self_addr,
            leader=None if leader is None else str(leader.address),
            term=int(st["raft_term"]),
            is_leader=st["state"] == _LEADER_STATE,
            commit_index=int(st["commit_idx"]),
            last_applied=int(st["last_applied"]),
            connected_peers=sum(
                1 for k, v in st.items() if k.startswith(prefix) and v == _CONNECTED
            ),
            has_quorum=bool(st["has_quorum"]),
            caught_up=self.caught_up,
        )

    @property
    def caught_up(self) -> bool:
        """Whether this member's state is at least as new as anything the group committed
        before this member (re)started, so a read of it is never older than one it served
        before: true once it knows a leader, has applied up to the leader's commit index
        as learned in this run, and has applied an entry of the current term.  It stays
        true from then on (the state only moves forward).  Until then the manager answers
        no map reads and does no leader work (docs/raft.md)."""
        return bool(self._member.caught_up)

    def compact(self) -> None:
        """Ask for a snapshot and log compaction at the next tick (normally automatic)."""
        self._member.forceLogCompaction()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop this member: close its sockets and journal; pending proposals fail."""
        if self._closed:
            return
        self._closed = True
        # RuntimeError: called from apply, i.e. on the tick thread: it stops after this tick
        with contextlib.suppress(RuntimeError):
            self._member.destroy_synchronous()
        with self._lock:
            pending = list(self._pending)
        for fut in pending:
            with contextlib.suppress(RuntimeError):
                fut.get_loop().call_soon_threadsafe(_fail_closed, fut)

    # -- snapshot hooks (PySyncObj's serializer/deserializer, on its thread) -------------

    def _write_snapshot(self, path: str, raft_data: tuple[Any, Any, Any]) -> None:
        last, prev, cluster = raft_data
        body = msgpack.packb(
            {
                "state": self._dump(),
                "last": list(last),
                "prev": list(prev),
                "cluster": sorted(str(node.address) for node in cluster),
            }
        )
        with open(path, "wb") as f:
            f.write(SNAPSHOT_MAGIC + bytes([SNAPSHOT_VERSION]) + body)
            f.flush()
            os.fsync(f.fileno())

    def _read_snapshot(self, path: str) -> tuple[Any, Any, Any]:
        with open(path, "rb") as f:
            snap = _decode_snapshot(f.read())
        self._load(snap.state)
        return snap.last, snap.prev, {TCPNode(addr) for addr in snap.cluster}


@dataclass(frozen=True, slots=True)
class _Snapshot:
    state: bytes
    last: tuple[bytes, int, int]  # PySyncObj log entries: (entry, index, term)
    prev: tuple[bytes, int, int]
    cluster: list[str]


def _decode_snapshot(data: bytes) -> _Snapshot:
    head = len(SNAPSHOT_MAGIC)
    if data[:head] != SNAPSHOT_MAGIC:
        raise LocalError("raft snapshot: bad magic")
    if data[head : head + 1] != bytes([SNAPSHOT_VERSION]):
        raise LocalError(f"raft snapshot: unsupported version {data[head : head + 1]!r}")
    try:
        body = msgpack.unpackb(data[head + 1 :])
        state = body["state"]
        last = _entry(body["last"])
        prev = _entry(body["prev"])
        cluster = [str(a) for a in body["cluster"]]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise LocalError(f"raft snapshot: malformed ({exc})") from exc
    if not isinstance(state, bytes):
        raise LocalError("raft snapshot: state is not bytes")
    return _Snapshot(state, last, prev, cluster)


def _entry(raw: Any) -> tuple[bytes, int, int]:
    entry, index, term = raw
    if not (isinstance(entry, bytes) and isinstance(index, int) and isinstance(term, int)):
        raise TypeError("log entry is not (bytes, int, int)")
    return entry, index, term

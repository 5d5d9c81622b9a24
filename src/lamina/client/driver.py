"""The driver: volume reads and writes turned into page requests [0041]-[0046], [0065]-[0068].

Theory of operation
-------------------
A :class:`Cluster` holds what several volumes share: the link to the managers, one wire
connection per storage server, the restore tokens waiting to go back to each server,
and the client session that keeps exclusive locks alive.  A :class:`Volume` is one open
volume: the published map it uses (a :class:`~lamina.client.layout.VolumeView`) and the
read and write processes of DESIGN section 7.

Every I/O is split into page extents, which run in parallel; each extent loops until it
succeeds or its deadline (``io_timeout``) passes:

- **Read** (Fig. 7A): from the top layer down, READ one ``up`` copy of the page (the
  least busy); data -> done, absent -> next layer, no layer -> zeros.  A copy whose mask
  does not vouch for every readable copy is resynchronised first (writable opens) or
  judged by STATUS of all copies (read-only opens, which never write).  CORRUPT -> read
  another copy, and repair the bad one from it.  A copy that fails -> try another.
- **Write** (Fig. 7B): to every ``up`` copy of the page in the top layer, each with its
  clear mask and the restore mask of the copies written.  Once every copy acknowledged,
  the write waits to be *durable* on every copy: a FLUSH of those servers (the client's
  own, or one the driver sends within ``SYNC_DELAY``) that succeeds on all of them.  Only
  then do its tokens go back (on the next request to that server, or on their own within
  ``RESTORE_DELAY``), so a mask never vouches for a copy whose bytes a power loss could
  still take (see docs/protocol.md, "When a mask bit comes back"); a quiet page is clean
  again within a second.  A partial write to a
  page the top layer does not hold yet is NOT_FOUND: copy-up (CREATE_IF_ABSENT of the page
  from the uppermost layer that has it, or zeros) and write again; a page copied up out
  of a migration source is tombstoned there by the next successful :meth:`Volume.flush`,
  which covers every layer written since the last one.  An attempt whose
  copies did not all succeed returns no token: the evidence that a copy may have missed
  it stays in the masks, until an attempt of the same write in the same layer succeeds
  on every copy (the tokens of both go back then) or a resynchronisation.  An attempt
  answered more than ``WRITE_ATTEMPT_LIMIT`` seconds after it was sent counts as failed.
- **Errors**: STALE -> fetch the published map (at least the epoch the server named) and
  restart; a copy that fails (connection lost, no answer within ``request_timeout``,
  NO_LEASE) -> report it to the managers, wait a little, take the newest published map
  and restart: the write is redone without that copy only once a map marks it down,
  which the managers publish only when it can no longer accept old-epoch writes.
- **Exclusive access** (DESIGN section 9): a writable open takes the volume's lock for
  this client's session before it does anything, and waits until the map that grants it
  is published, so every write of a previous holder is fenced.  The session is kept
  alive by keepalives to every manager.  When the lock is gone (a takeover, or the
  session lapsed), every write fails with :class:`LockLost` instead of being retried:
  a STALE answer, or a keepalive that no longer lists the lock, leads to a look at the
  published map, and a map whose lock belongs to another session ends all writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import secrets
import socket
import time
import urllib.parse
from collections.abc import Coroutine
from typing import Any, TypeVar

from lamina import repair
from lamina.client.layout import (
    FULL,
    Extent,
    LayerView,
    VolumeView,
    authoritative,
    bits,
    clear_mask,
    needs_resync,
    presence_fixed,
    restore_mask,
    split,
    volume_view,
)
from lamina.client.managers import ManagerLink
from lamina.errors import (
    AuthFailed,
    BadRequest,
    Conflict,
    Corrupt,
    Deleted,
    LaminaError,
    LocalError,
    NoLease,
    NoSpace,
    NotFound,
    ProtocolError,
    StaleEpoch,
    StorageIOError,
    Unavailable,
)
from lamina.repair import Status
from lamina.storage.syncmask import WRITE_ATTEMPT_LIMIT
from lamina.wire import messages as m
from lamina.wire.connection import Client
from lamina.wire.framing import Frame, Payload
from lamina.wire.handshake import load_key
from lamina.wire.messages import PageState

log = logging.getLogger(__name__)

#: pages of a layer beyond which the driver keeps no presence map of it (memory bound)
MAX_PRESENCE = 1 << 22
T = TypeVar("T")
#: (layer id, server id, token) of copies that took a write attempt that failed elsewhere
Orphans = list[tuple[int, str, int]]

#: a write's tokens go back on their own after this long if no request carries them
RESTORE_DELAY = 0.2
#: writes acknowledged by every copy are made durable (a FLUSH of their servers) after
#: this long if the client sends no FLUSH itself; only then are their tokens confirmed
SYNC_DELAY = 0.2
#: (server id, token) of every copy one write reached
Group = tuple[tuple[str, int], ...]
#: tokens per request (the wire limit of a list)
MAX_TOKENS_PER_REQUEST = m.MAX_LIST
#: pages copied up out of a migration source kept for the next flush to tombstone
MAX_MOVED = 1 << 16
#: TOMBSTONE requests in flight at once after a flush
TOMBSTONE_BATCH = 256
IO_TIMEOUT = 120.0
REQUEST_TIMEOUT = 5.0


class LockLost(StorageIOError):
    """The volume's exclusive lock now belongs to someone else: writing is over."""


class PageLost(StorageIOError):
    """Every copy of a page that may be read failed its checksums (each is quarantined):
    the page is lost until it is written whole again or restored from a backup.  Reads
    of it, and writes that do not cover it whole, fail at once; other pages are served."""

    def __init__(self, volume: str, layer: int, page: int, page_size: int) -> None:
        start = page * page_size
        where = f"bytes {start}..{start + page_size - 1}"
        super().__init__(
            f"volume {volume}: page {page} of layer {layer} ({where}) is corrupt on every"
            " copy: it is lost; write the whole page again, or restore that range from a backup"
        )


#: times a read resynchronises a page and reads it again before it waits and retries
READ_RESYNCS = 4


class Failed(Exception):
    """A copy failed a request in a way that another map (or a retry) may mend."""

    def __init__(self, server_id: str, error: BaseException) -> None:
        super().__init__(f"storage server {server_id}: {error}")
        self.server_id = server_id
        self.error = error


class Cluster:
    """A connection to one lamina cluster; open volumes with :meth:`open`."""

    def __init__(
        self,
        managers: ManagerLink,
        key: bytes,
        *,
        io_timeout: float = IO_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.managers = managers
        self.key = key
        self.io_timeout = io_timeout
        self.request_timeout = request_timeout
        self.session = secrets.token_hex(12)
        self.host = socket.gethostname()[:255] or "localhost"
        self.pid = os.getpid()
        self._addrs: dict[str, tuple[str, int]] = {}
        self._clients: dict[str, Client] = {}
        self._connecting: dict[str, asyncio.Future[Client]] = {}
        self._tokens: dict[str, list[int]] = {}
        self._restore_timer: asyncio.TimerHandle | None = None
        self._volumes: set[Volume] = set()
        self._keepalive: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._reported: dict[str, float] = {}
        self._generation = 0
        self.keepalive_interval = 1.0
        self.closed = False

    @classmethod
    async def connect(
        cls,
        cluster_file: str | os.PathLike[str] | None = None,
        *,
        io_timeout: float = IO_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> Cluster:
        """Connect to the cluster a cluster file describes (``lamina up`` writes one;
        ``None``: ``$LAMINA_CLUSTER`` or ``./lamina-data/cluster.toml``)."""
        from lamina.clusterctl import find_cluster_file

        cf = find_cluster_file(None if cluster_file is None else str(cluster_file))
        key = load_key(cf.key)
        try:
            token: str | None = cf.token()
        except LocalError:
            token = None  # read-only use needs no token
        cluster = cls(
            ManagerLink(cf.managers, token),
            key,
            io_timeout=io_timeout,
            request_timeout=request_timeout,
        )
        await cluster.managers.get_map()  # fail now, clearly, if no manager answers
        return cluster

    async def open(self, name: str, *, read_only: bool = False, takeover: bool = False) -> Volume:
        """Open volume ``name``.  Read-write opens take its exclusive lock (CONFLICT,
        naming the holder, when another client has it; ``takeover`` revokes that holder
        first)."""
        if self.closed:
            raise LocalError("the cluster connection is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.io_timeout
        volume_name, at, _ = name.partition("@")
        if at and not read_only:
            raise BadRequest(f"snapshot {name} is read-only: open it read-only")
        if read_only:
            doc = await self.managers.get_map()
            try:
                volume_view(doc, name)
            except NotFound:
                # just created? Wait for the map that made it to be published.
                current = await self.managers.get_map(current=True)
                fence = current.get("volumes", {}).get(volume_name, {}).get("fence_epoch")
                if isinstance(fence, int):
                    doc = await self.managers.wait_map(fence, deadline)
            view = volume_view(doc, name)
        else:
            if self.managers.token is None:
                raise LocalError("opening a volume for writing needs the cluster's admin token")
            answer = await self.managers.lock(name, self.session, self.host, self.pid, takeover)
            epoch = int(answer["epoch"])
            view = volume_view(await self.managers.wait_map(epoch, deadline), name)
            if view.lock is None or view.lock.session != self.session:
                raise LockLost(f"the lock of volume {name} was taken away while opening it")
            self._start_keepalive()
        self.learn(view)
        volume = Volume(self, view, read_only)
        self._volumes.add(volume)
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch_requests())
        return volume

    # -- snapshots and clones (the managers' HTTP API, docs/api.md) -------------------------

    def _path(self, *parts: str) -> str:
        return "/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)

    async def create_snapshot(self, volume: str, snapshot: str) -> dict[str, Any]:
        """Take snapshot ``snapshot`` of ``volume``; returns once it is taken (no write
        made before can change it any more): ``{"name", "layer", "since"}``."""
        path = self._path("volumes", volume, "snapshots")
        doc: dict[str, Any] = await self.managers.call("POST", path, {"name": snapshot})
        return doc

    async def snapshots(self, volume: str) -> list[dict[str, Any]]:
        """The snapshots of ``volume``, oldest first, each with the clones using it."""
        docs: list[dict[str, Any]] = await self.managers.call(
            "GET", self._path("volumes", volume, "snapshots")
        )
        return docs

    async def delete_snapshot(self, volume: str, snapshot: str) -> None:
        """Delete a snapshot (refused while a clone uses it); merged in the background."""
        await self.managers.call("DELETE", self._path("volumes", volume, "snapshots", snapshot))

    async def rollback(self, volume: str, snapshot: str) -> None:
        """Make ``volume`` (not attached anywhere) read as ``snapshot`` again."""
        path = self._path("volumes", volume, "rollback")
        await self.managers.call("POST", path, {"snapshot": snapshot})

    async def clone(self, volume: str, snapshot: str, name: str) -> dict[str, Any]:
        """A new volume ``name`` sharing the layers of ``volume@snapshot``; its map entry."""
        path = self._path("volumes", volume, "clone")
        doc: dict[str, Any] = await self.managers.call(
            "POST", path, {"name": name, "snapshot": snapshot}
        )
        return doc

    async def close(self) -> None:
        for volume in list(self._volumes):
            with contextlib.suppress(LaminaError):
                await volume.close()
        self.closed = True
        self.send_restores()
        await asyncio.sleep(0)
        for task in (self._keepalive, self._watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        await self.managers.close()

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- storage connections -------------------------------------------------------------

    def learn(self, view: VolumeView) -> None:
        """Take the server addresses of a newer map."""
        for sid, server in view.servers.items():
            addr = (server.host, server.port)
            if self._addrs.get(sid) != addr:
                self._addrs[sid] = addr
                old = self._clients.pop(sid, None)
                if old is not None:
                    old.close()

    async def _client(self, sid: str) -> Client:
        client = self._clients.get(sid)
        if client is not None and client.connected:
            return client
        pending = self._connecting.get(sid)
        if pending is None:
            pending = asyncio.ensure_future(self._connect(sid))
            self._connecting[sid] = pending
            pending.add_done_callback(lambda _f: self._connecting.pop(sid, None))
        return await asyncio.shield(pending)

    async def _connect(self, sid: str) -> Client:
        addr = self._addrs.get(sid)
        if addr is None:
            raise Unavailable(f"storage server {sid} is not in the map")
        self._generation += 1  # a newer connection makes the server drop older ones
        client = await Client.connect(
            addr[0], addr[1], self.key, peer=f"driver {self.host}:{self.pid}",
            timeout=self.request_timeout, client_id=self.session,
            generation=self._generation,
        )  # fmt: skip
        if client.server_id != sid:
            client.close()
            raise Unavailable(
                f"{addr[0]}:{addr[1]} is storage server {client.server_id}, not {sid}"
            )
        self._clients[sid] = client
        return client

    async def call(self, sid: str, msg: m.Message, payload: Payload = b"") -> tuple[Any, Payload]:
        """One request to server ``sid``: its answer, or :class:`Failed` for an error a
        retry or a newer map may mend; typed errors of the request itself pass through."""
        client = self._clients.get(sid)
        if client is None or not client.connected:
            client = await self.connected(sid)
        fut = client.send(msg, payload)
        await client.drain()
        return self.answer(sid, await _settled(fut))

    async def connected(self, sid: str) -> Client:
        """The connection to ``sid``, made if needed; :class:`Failed` if it cannot be."""
        try:
            return await self._client(sid)
        except (Unavailable, ProtocolError, OSError) as exc:
            raise Failed(sid, exc) from None

    def sender(self, sid: str) -> Client | None:
        """The connection to ``sid`` if it is up (the hot path sends without awaiting)."""
        client = self._clients.get(sid)
        return client if client is not None and client.connected else None

    @staticmethod
    def answer(sid: str, frame: Frame | BaseException) -> tuple[Any, Payload]:
        """The typed answer of a settled request (see :func:`_settled`)."""
        if isinstance(frame, BaseException):
            if isinstance(frame, Unavailable | StorageIOError | NoLease):
                raise Failed(sid, frame)
            raise frame
        try:
            return Client.unpack(frame)
        except (Unavailable, StorageIOError, NoLease) as exc:
            raise Failed(sid, exc) from None

    def busy(self, sid: str) -> int:
        client = self._clients.get(sid)
        return 0 if client is None else client.in_flight

    async def _watch_requests(self) -> None:
        """Close a connection whose server has answered nothing for ``request_timeout``
        while requests wait (a stopped or wedged server): they fail, and are retried."""
        while True:
            await asyncio.sleep(min(1.0, self.request_timeout / 4))
            now = time.monotonic()
            for sid, client in list(self._clients.items()):
                stalled = client.stalled_for(now)
                if stalled > self.request_timeout:
                    log.warning(
                        "storage server %s answered nothing for %.1f s; reconnecting", sid, stalled
                    )
                    self._clients.pop(sid, None)
                    client.abandon()  # and everything queued on it, so nothing lands late

    def report(self, sid: str, error: BaseException) -> None:
        """Tell the managers (at most once a second per server) that ``sid`` failed."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._reported.get(sid, -10.0) < 1.0:
            return
        self._reported[sid] = now
        log.warning("storage server %s failed a request: %s", sid, error)
        task = loop.create_task(self.managers.report(sid, str(error)))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # -- restore tokens --------------------------------------------------------------------

    def confirm_later(self, sid: str, token: int) -> None:
        """Queue a token of a write every copy acknowledged, for server ``sid``."""
        queue = self._tokens.get(sid)
        if queue is None:
            queue = self._tokens[sid] = []
        queue.append(token)
        if self._restore_timer is None:
            loop = asyncio.get_running_loop()
            self._restore_timer = loop.call_later(RESTORE_DELAY, self.send_restores)

    def take_tokens(self, sid: str) -> tuple[int, ...]:
        """Tokens to piggyback on a request to ``sid`` [0043]."""
        queue = self._tokens.get(sid)
        if not queue:
            return ()
        if len(queue) <= MAX_TOKENS_PER_REQUEST:
            self._tokens[sid] = []
            return tuple(queue)
        out = tuple(queue[:MAX_TOKENS_PER_REQUEST])
        del queue[:MAX_TOKENS_PER_REQUEST]
        return out

    def send_restores(self) -> None:
        """Send every queued token in RESTORE requests (no answer awaited)."""
        self._restore_timer = None
        for sid in list(self._tokens):
            while True:
                tokens = self.take_tokens(sid)
                if not tokens:
                    break
                client = self._clients.get(sid)
                if client is None or not client.connected:
                    break  # the server went away: its episodes are gone with it
                fut = client.send(m.RestoreRequest(tokens))
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    # -- the session ---------------------------------------------------------------------------

    def _start_keepalive(self) -> None:
        if self._keepalive is None or self._keepalive.done():
            self._keepalive = asyncio.create_task(self._keep_session())

    async def _keep_session(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive_interval)
            answers = await self.managers.keepalive(self.session)
            for answer in answers:
                timeout = answer.get("timeout") if isinstance(answer, dict) else None
                if isinstance(timeout, int | float) and timeout > 0:
                    self.keepalive_interval = max(0.2, min(2.0, timeout / 4))
            writers = [v for v in self._volumes if v.writable]
            if not writers or not answers:
                continue
            for volume in writers:
                if any(
                    isinstance(a, dict) and volume.name not in a.get("locks", ()) for a in answers
                ):
                    await volume.check_lock()


class _Pending:
    """A write of the hot path, waiting for the answers of its copies."""

    __slots__ = (
        "answers", "copies", "data", "fua", "layer_id", "left", "offset", "out", "page",
        "part", "sent", "view",
    )  # fmt: skip

    def __init__(
        self,
        out: asyncio.Future[None],
        view: VolumeView,
        layer_id: int,
        page: int,
        offset: int,
        data: Payload,
        fua: bool,
        part: tuple[str, ...],
        copies: list[int],
    ) -> None:
        self.out = out
        self.view = view
        self.layer_id = layer_id
        self.page = page
        self.offset = offset
        self.data = data
        self.fua = fua
        self.part = part
        self.copies = copies
        self.answers: list[asyncio.Future[Frame] | None] = [None] * len(copies)
        self.left = len(copies)
        self.sent = time.monotonic()


class Volume:
    """An open volume.  All methods are coroutines and may run concurrently."""

    def __init__(self, cluster: Cluster, view: VolumeView, read_only: bool) -> None:
        self.cluster = cluster
        self.view = view
        self.name = view.name
        self.writable = not read_only
        self._lost: LockLost | None = None
        self._closed = False
        self._refreshing: asyncio.Future[None] | None = None
        # pages (layer id, page) this client saw consistent since it opened the volume:
        # as the only writer, whatever dirt their masks show later is its own episodes
        self._clean: set[tuple[int, int]] = set()
        self._writes: dict[tuple[int, int], int] = {}
        self._idle: dict[tuple[int, int], asyncio.Event] = {}
        self._resyncs: dict[tuple[int, int], asyncio.Future[None]] = {}
        self._rr = random.randrange(1 << 16)
        # presence maps: the pages each layer holds, for the layers whose set of pages
        # can change only by this client's copy-ups (so a read skips the layers that
        # lack its page: one round trip, however deep the chain)
        self._presence: dict[int, set[int]] = {}
        self._presence_loading: dict[int, asyncio.Future[None]] = {}
        self._fixed: set[int] = set()
        # pages this client created in a presence-fixed layer that has no map yet: a
        # listing may have been answered before the creation reached the server
        self._created: dict[int, set[int]] = {}
        # what the next FLUSH must cover: the layers written since their last flush (a
        # snapshot or a migration may have moved the top onto other servers since), and
        # the pages copied up out of a migration source, tombstoned there only once a
        # FLUSH made their copies in the top durable; each with the write count
        self._writes_sent = 0
        self._unflushed: dict[int, int] = {}
        self._moved: list[tuple[int, int, int]] = []  # (count, source layer, page)
        self._cache_presence(view)
        # writes every copy acknowledged whose tokens wait until a FLUSH made them durable
        # on all those copies (confirmed earlier, a mask would vouch for bytes that a
        # power loss of one copy could still take)
        self._unsynced: list[Group] = []
        self._sync_timer: asyncio.TimerHandle | None = None
        self._sync_task: asyncio.Task[None] | None = None

    # -- BlockBackend ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.view.size

    @property
    def page_size(self) -> int:
        return self.view.page_size

    @property
    def read_only(self) -> bool:
        return not self.writable

    fast_zero = False  # zeroing writes zeros: never faster than writing them

    async def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        if length == 0:
            return b""
        extents = split(offset, length, self.view.page_size)
        if len(extents) == 1:
            return await self._read_extent(extents[0])
        parts = await asyncio.gather(*(self._read_extent(e) for e in extents))
        return b"".join(parts)

    async def write(self, offset: int, data: bytes | bytearray, fua: bool = False) -> None:
        self._check_writable(offset, len(data))
        extents = split(offset, len(data), self.view.page_size)
        if len(extents) == 1:
            await self._write_extent(extents[0], data, fua)
            return
        view = memoryview(data)
        await _all(
            self._write_extent(e, bytes(view[e.start : e.start + e.length]), fua) for e in extents
        )

    async def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable(offset, length)
        extents = split(offset, length, self.view.page_size)
        await _all(self._write_extent(e, bytes(e.length), fua) for e in extents)

    async def trim(self, offset: int, length: int) -> None:
        """Nothing is freed yet: the data stays as it was (which TRIM allows)."""
        self._check_writable(offset, length)

    async def flush(self) -> None:
        """Return once every copy of the volume's top layer, and of every other layer
        this client wrote since its last flush, has made what it acknowledged durable;
        then tombstone the pages copied up out of a migration source before it began."""
        self._check_open()
        deadline = self._deadline()
        covered = self._writes_sent
        # the writes acknowledged so far: durable once this FLUSH succeeded everywhere
        batch, self._unsynced = self._unsynced, []
        # the tokens already confirmed first: on the same connections they arrive before
        # the FLUSH, which then makes the restored masks durable too
        self.cluster.send_restores()
        try:
            batch = await self._flush_servers(covered, deadline, batch)
        finally:
            if batch:  # not covered (a server left meanwhile): the background sync's turn
                self._unsynced[:0] = batch
                self._sync_soon()
        moved = [(lid, page) for n, lid, page in self._moved if n <= covered]
        if moved:
            self._moved = [entry for entry in self._moved if entry[0] > covered]
            await self._tombstone_moved(self.view, moved)

    async def _flush_servers(
        self, covered: int, deadline: float, batch: list[Group]
    ) -> list[Group]:
        """FLUSH every server of the top layer and of the layers written up to write
        ``covered``, until all succeed; confirm the writes of ``batch`` they cover, and
        return the others."""
        attempt = 0
        while True:
            view = self.view
            self._check_lock()
            written = {lid for lid, n in self._unflushed.items() if n <= covered}
            servers = sorted(
                {
                    sid
                    for layer in view.layers
                    if layer.id == view.top.id or layer.id in written
                    for sid in view.servers_of(layer)
                    if view.is_live(sid)
                }
            )
            results = await asyncio.gather(
                *(self._call(sid, m.FlushRequest(view.id, view.epoch)) for sid in servers),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if not errors:
                break
            attempt += 1
            await self._recover(view, errors, deadline, attempt, "flush")
        for lid in written:
            if self._unflushed.get(lid, covered + 1) <= covered:
                del self._unflushed[lid]
        return self._confirm_durable(batch, set(servers))

    def _sent(self, layer_id: int) -> None:
        """A write (or copy-up) to ``layer_id`` is going out: the next FLUSH covers it."""
        self._writes_sent += 1
        self._unflushed[layer_id] = self._writes_sent

    async def _tombstone_moved(self, view: VolumeView, moved: list[tuple[int, int]]) -> None:
        """TOMBSTONE in their migration source the pages copied up out of it, now that
        their copies in the top are durable (best effort: the worker tombstones what
        is left, after its own FLUSH of the target)."""
        sources = {layer.id: layer for layer in view.layers if layer.migrates_to is not None}
        requests = [
            self._call(
                sid, m.TombstoneRequest(layer.owner, view.epoch, layer.id, page, view.page_size)
            )
            for lid, page in moved
            if (layer := sources.get(lid)) is not None
            for sid in _up_copies(view, layer, page)
        ]
        for k in range(0, len(requests), TOMBSTONE_BATCH):
            await asyncio.gather(*requests[k : k + TOMBSTONE_BATCH], return_exceptions=True)

    # -- durability before confirmation -----------------------------------------------------

    def _durable_later(self, group: Group) -> None:
        """Confirm the tokens of one write once it is durable on every copy it reached."""
        if group:
            self._unsynced.append(group)
            self._sync_soon()

    def _sync_soon(self) -> None:
        if self._sync_timer is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._sync_timer = loop.call_later(SYNC_DELAY, self._start_sync)

    def _start_sync(self) -> None:
        self._sync_timer = None
        if self._sync_task is not None and not self._sync_task.done():
            self._sync_soon()  # one at a time: look again after this one
            return
        if self._unsynced and not self._closed:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_unsynced())

    async def _sync_unsynced(self) -> None:
        """FLUSH the servers of the writes waiting for durability, then confirm the tokens
        of every write whose copies all flushed.  A write on a server that failed keeps its
        pages dirty, as a write that failed there would: a resynchronisation cleans them."""
        batch, self._unsynced = self._unsynced, []
        view = self.view
        servers = sorted({sid for group in batch for sid, _ in group})
        results = await asyncio.gather(
            *(self._call(sid, m.FlushRequest(view.id, view.epoch)) for sid in servers),
            return_exceptions=True,
        )
        flushed = {
            sid for sid, r in zip(servers, results, strict=True) if not isinstance(r, BaseException)
        }
        for sid, r in zip(servers, results, strict=True):
            if isinstance(r, BaseException):
                log.info("background flush of %s failed: %s", sid, r)
        dropped = self._confirm_durable(batch, flushed)
        if dropped:
            log.info("%d writes stay unconfirmed (a copy did not flush)", len(dropped))

    def _confirm_durable(self, batch: list[Group], flushed: set[str]) -> list[Group]:
        """Confirm the groups whose servers all flushed; the others."""
        rest = []
        for group in batch:
            if all(sid in flushed for sid, _ in group):
                for sid, token in group:
                    self.cluster.confirm_later(sid, token)
            else:
                rest.append(group)
        self.cluster.send_restores()
        return rest

    async def close(self) -> None:
        """Flush, give back the tokens and the lock."""
        if self._closed:
            return
        try:
            if self.writable and self._lost is None:
                await self.flush()
                # the tokens the first FLUSH confirmed went out on the connections ahead of
                # this one, which makes the restored masks durable too: a crash right after
                # a clean close resynchronises nothing
                await self.flush()
        finally:
            self._closed = True
            if self._sync_timer is not None:
                self._sync_timer.cancel()
                self._sync_timer = None
            self.cluster.send_restores()
            self.cluster._volumes.discard(self)
            if self.writable and self._lost is None:
                with contextlib.suppress(LaminaError):
                    await self.cluster.managers.unlock(self.name, self.cluster.session)

    async def __aenter__(self) -> Volume:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- checks ------------------------------------------------------------------------------

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.cluster.io_timeout

    def _check_open(self) -> None:
        if self._closed:
            raise LocalError(f"volume {self.name} is closed")

    def _check_range(self, offset: int, length: int) -> None:
        self._check_open()
        if offset < 0 or length < 0:
            raise BadRequest(f"range {offset}+{length} is negative")
        if offset + length > self.view.size:
            raise BadRequest(
                f"range {offset}+{length} ends beyond volume {self.name} ({self.view.size} bytes)"
            )

    def _check_writable(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if not self.writable:
            raise BadRequest(f"volume {self.name} is open read-only")
        self._check_lock()

    def _check_lock(self) -> None:
        if self._lost is not None:
            raise self._lost

    # -- the map ------------------------------------------------------------------------------

    async def refresh(self, min_epoch: int = 0, deadline: float | None = None) -> None:
        """Take the newest published map (at least ``min_epoch``); one fetch at a time."""
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            if self.view.epoch >= min_epoch:
                return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._refreshing = fut
        try:
            doc = await self.cluster.managers.wait_map(
                min_epoch, deadline if deadline is not None else self._deadline()
            )
            view = volume_view(doc, self.name)
            if view.epoch >= self.view.epoch:
                self._adopt(view)
        finally:
            self._refreshing = None
            fut.set_result(None)

    def _adopt(self, view: VolumeView) -> None:
        if view.id != self.view.id:
            raise NotFound(f"volume {self.name} was deleted (a new one has its name)")
        if self.writable and (view.lock is None or view.lock.session != self.cluster.session):
            holder = "nobody" if view.lock is None else f"{view.lock.host} pid {view.lock.pid}"
            self._lost = LockLost(
                f"volume {self.name}: this client's lock was revoked (now held by {holder}); "
                "writes fail"
            )
            log.error("%s", self._lost.message)
        if view.layers != self.view.layers:
            self._clean.clear()
        self._cache_presence(view)
        self.cluster.learn(view)
        self.view = view

    async def check_lock(self) -> None:
        """Look at the published map: is the lock still this client's?"""
        with contextlib.suppress(LaminaError):
            await self.refresh(self.view.epoch)

    # -- requests -------------------------------------------------------------------------------

    async def _call(self, sid: str, msg: m.Message, payload: Payload = b"") -> tuple[Any, Payload]:
        return await self.cluster.call(sid, msg, payload)

    async def _recover(
        self,
        view: VolumeView,
        errors: list[BaseException],
        deadline: float,
        attempt: int,
        what: str,
    ) -> None:
        """Act on the errors of one attempt; return to try again, raise to give up."""
        for err in errors:
            if isinstance(err, asyncio.CancelledError):
                raise err
            if isinstance(err, NoSpace | BadRequest | LocalError | StorageIOError | AuthFailed):
                raise err
            if not isinstance(err, LaminaError | Failed):
                raise err
        stale = [e for e in errors if isinstance(e, StaleEpoch)]
        if stale:
            if self.writable:
                # our lock may be gone: never retry a write before knowing it is not
                self._check_lock()
            await self.refresh(max(e.current_epoch for e in stale), deadline)
            self._check_lock()
            return
        loop = asyncio.get_running_loop()
        if loop.time() > deadline:
            raise StorageIOError(f"volume {self.name}: {what} failed: {errors[0]}")
        for err in errors:
            if isinstance(err, Failed):
                self.cluster.report(err.server_id, err.error)
        await asyncio.sleep(min(0.02 * (2 ** min(attempt, 5)), 0.5))
        with contextlib.suppress(Unavailable):
            await self.refresh(view.epoch, deadline)
        self._check_lock()

    def _pick(self, partition: tuple[str, ...], candidates: list[int]) -> int:
        """The least busy candidate copy (ties: rotating)."""
        if len(candidates) == 1:
            return candidates[0]
        self._rr += 1
        n = len(candidates)
        best = candidates[self._rr % n]
        best_load = self.cluster.busy(partition[best])
        for k in range(1, n):
            i = candidates[(self._rr + k) % n]
            load = self.cluster.busy(partition[i])
            if load < best_load:
                best, best_load = i, load
        return best

    # -- the hot path: no task, no coroutine -------------------------------------------------

    def start_read(self, offset: int, length: int) -> asyncio.Future[Payload]:
        """:meth:`read` as a future, for the NBD server.  The common case (one page, its
        copy in the top layer answers with data and a clean mask) runs in callbacks, with
        no task; anything else goes the full way through :meth:`read`."""
        loop = asyncio.get_running_loop()
        out: asyncio.Future[Payload] = loop.create_future()
        view = self.view
        page_size = view.page_size
        page, in_page = divmod(offset, page_size)
        client = None
        inside = offset >= 0 and 0 < length <= page_size - in_page and offset + length <= view.size
        if inside and not self._closed:
            # the first layer that may hold the page: the presence maps skip the others
            k, last = self._holder(view, page)
            if k < 0:
                out.set_result(bytes(length))  # no layer holds it: zeros, no round trip
                return out
            layer = view.layers[k]
            part = layer.placement[page % len(layer.placement)]
            readable = view.readable(layer, page)
            if readable:
                i = self._pick(part, readable)
                client = self.cluster.sender(part[i])
        if client is None:
            return self._slow(out, self.read(offset, length))
        tokens = self.cluster.take_tokens(part[i])
        req = m.ReadRequest(
            layer.owner, view.epoch, layer.id, page, page_size, in_page, length, tokens
        )
        client.send(req).add_done_callback(
            lambda fut: self._read_answered(fut, out, view, k, page, offset, length, last)
        )
        return out

    def _holder(self, view: VolumeView, page: int) -> tuple[int, bool]:
        """(index in ``view.layers`` of the first layer a read of ``page`` must ask, or -1
        if the presence maps show that no layer holds it; whether every layer below that
        one is known not to hold it)."""
        presence = self._presence
        first = -1
        for k, layer in enumerate(view.layers):
            pages = presence.get(layer.id)
            if first < 0:
                if pages is None or page in pages:
                    first = k
            elif pages is None or page in pages:
                return first, False
        return first, True

    def _read_answered(
        self,
        fut: asyncio.Future[Frame],
        out: asyncio.Future[Payload],
        view: VolumeView,
        k: int,
        page: int,
        offset: int,
        length: int,
        last: bool,
    ) -> None:
        if out.done():
            return
        layer = view.layers[k]
        resp: Any = None
        try:
            resp, data = Client.unpack(fut.result())
        except Exception:
            resp = None
        if (resp is not None and (layer.id, page) in self._clean) or (
            resp is not None and not needs_resync(resp.mask, view.readable(layer, page))
        ):
            state = resp.state
            if state == PageState.PRESENT:
                out.set_result(data)
                return
            if state == PageState.ZERO or (state == PageState.ABSENT and last):
                out.set_result(bytes(length))
                return
            if state == PageState.ABSENT:
                # on down from the layer below (immutable: what it holds now, it held
                # when this layer answered), not from the top again
                self._slow(out, self._read_below(view, k + 1, offset, length))
                return
        self._slow(out, self.read(offset, length))

    async def _read_below(self, view: VolumeView, start: int, offset: int, length: int) -> bytes:
        try:
            return await self._read_layers(view, split(offset, length, view.page_size)[0], start)
        except (LaminaError, Failed):
            return await self.read(offset, length)  # the full way, with its retries

    # -- presence maps ---------------------------------------------------------------------

    def _cache_presence(self, view: VolumeView) -> None:
        """Keep the presence maps of the layers whose set of pages only this client's own
        copy-ups can change (:func:`lamina.client.layout.presence_fixed`) and drop the
        others.  A layer that gains pages behind our back (a migration or merge target, a
        flatten target, the top when others may write) is never trusted, and a page that
        leaves a layer leaves a tombstone, which restarts the read: so a read that skips
        a layer on the word of its presence map never misses newer data."""
        self._fixed = {
            layer.id for layer in view.layers if presence_fixed(view, layer, self.writable)
        }
        # Pages reach a layer only from the layer right below it (a merge, a migration)
        # or, in a flatten, from the shared layers below.  Whatever happened between the
        # two maps, such a change shows as a different layer below, or a different
        # ``migrates_to`` of it, or a different flattening flag: then the map is redone.
        keep = set() if view.flattening != self.view.flattening else set(self._fixed)
        before = _below(self.view)
        for lid, under in _below(view).items():
            if before.get(lid, under) != under:
                keep.discard(lid)
        for lid in [lid for lid in self._presence if lid not in keep]:
            del self._presence[lid]
        for lid in [lid for lid in self._created if lid not in self._fixed]:
            del self._created[lid]

    def _now_present(self, layer_id: int, page: int) -> None:
        """This client is about to create ``page`` in ``layer_id`` (a copy-up, a
        whole-page write)."""
        pages = self._presence.get(layer_id)
        if pages is not None:
            pages.add(page)
        elif layer_id in self._fixed:
            # remembered until a map is loaded: the listing of a load that starts later
            # may still overtake the creation on its way to the server
            created = self._created.setdefault(layer_id, set())
            created.add(page)
            if len(created) > MAX_PRESENCE:  # no map would be kept anyway: none until
                self._fixed.discard(layer_id)  # the next map change
                del self._created[layer_id]

    async def _load_presence(self, view: VolumeView, layer: LayerView) -> None:
        """ENUMERATE the pages ``layer`` holds on each server with a readable copy of it,
        once (bounded: a layer of more than ``MAX_PRESENCE`` pages is not mapped)."""
        if layer.id not in self._fixed or layer.id in self._presence:
            return
        loading = self._presence_loading.get(layer.id)
        if loading is not None:
            await asyncio.shield(loading)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._presence_loading[layer.id] = fut
        try:
            servers = sorted(
                {
                    layer.placement[p][i]
                    for p in range(len(layer.placement))
                    for i in view.readable(layer, p)
                }
            )
            if any(not view.readable(layer, p) for p in range(len(layer.placement))):
                return  # a partition has no readable copy: no map
            pages: set[int] = set()
            for sid in servers:
                start = 0
                while len(pages) <= MAX_PRESENCE:
                    resp, _ = await self._call(
                        sid,
                        m.EnumerateRequest(
                            layer.owner, view.epoch, layer.id, m.EnumerateWhat.PRESENT, start,
                            m.MAX_ENUMERATE,
                        ),
                    )  # fmt: skip
                    pages.update(resp.pages)
                    if resp.done:
                        break
                    start = resp.next_start
            # pages this client created may have been passed over by the listing
            pages |= self._created.get(layer.id, set())
            if len(pages) <= MAX_PRESENCE and layer.id in self._fixed:
                self._presence[layer.id] = pages
                self._created.pop(layer.id, None)
        except (LaminaError, Failed) as exc:
            log.info("no presence map of layer %d: %s", layer.id, exc)
        finally:
            del self._presence_loading[layer.id]
            fut.set_result(None)

    def start_write(self, offset: int, data: Payload, fua: bool) -> asyncio.Future[None]:
        """:meth:`write` as a future, for the NBD server: a write within one page whose
        copies are all connected is sent to every copy at once and completed by the
        answers' callbacks; anything else (or any error) goes through :meth:`write`."""
        loop = asyncio.get_running_loop()
        out: asyncio.Future[None] = loop.create_future()
        view = self.view
        page_size = view.page_size
        page, in_page = divmod(offset, page_size)
        length = len(data)
        if (
            self._closed
            or not self.writable
            or self._lost is not None
            or offset < 0
            or not 0 < length <= page_size - in_page
            or offset + length > view.size
        ):
            return self._slow(out, self.write(offset, data, fua))
        layer = view.layers[0]
        key = (layer.id, page)
        part = layer.placement[page % len(layer.placement)]
        copies = view.writable(layer, page)
        clients = [self.cluster.sender(part[i]) for i in copies]
        if not copies or key in self._resyncs or None in clients:
            return self._slow(out, self.write(offset, data, fua))
        n = len(part)
        restore = restore_mask(set(copies), n)
        take = self.cluster.take_tokens
        self._writes[key] = self._writes.get(key, 0) + 1
        self._sent(layer.id)
        if len(data) == page_size:
            self._now_present(layer.id, page)  # a whole-page write creates the page
        pending = _Pending(out, view, layer.id, page, offset, data, fua, part, copies)
        for k, (i, client) in enumerate(zip(copies, clients, strict=True)):
            req = m.WriteRequest(
                view.id, view.epoch, layer.id, page, page_size, in_page,
                clear_mask(i, n), restore, fua, take(part[i]),
            )  # fmt: skip
            assert client is not None
            client.send(req, data).add_done_callback(
                functools.partial(self._write_answered, pending, k)
            )
        return out

    def _write_answered(self, p: _Pending, k: int, fut: asyncio.Future[Frame]) -> None:
        p.answers[k] = fut
        p.left -= 1
        if p.left:
            return
        key = (p.layer_id, p.page)
        self._write_done(key)
        if p.out.done():
            return
        tokens = []
        failed = False
        for i, answer in zip(p.copies, p.answers, strict=True):
            resp: Any
            try:
                assert answer is not None
                resp, _ = Client.unpack(answer.result())
            except Exception:
                failed = True
                continue
            tokens.append((p.part[i], resp.token))
        if failed or time.monotonic() - p.sent > WRITE_ATTEMPT_LIMIT:
            # redone the full way (too slow: see syncmask.IN_FLIGHT); the copies that took
            # it are confirmed once an attempt succeeds everywhere
            orphans = [(p.layer_id, sid, token) for sid, token in tokens]
            self._slow(p.out, self._write_again(p, orphans))
            return
        self._durable_later(tuple(tokens))
        if len(p.data) == p.view.page_size:
            self._clean.add(key)
        p.out.set_result(None)

    async def _write_again(self, p: _Pending, orphans: Orphans) -> None:
        self._check_writable(p.offset, len(p.data))
        (ext,) = split(p.offset, len(p.data), p.view.page_size)
        await self._write_extent(ext, p.data, p.fua, orphans)

    def _write_done(self, key: tuple[int, int]) -> None:
        """A write of this client on page ``key`` is over (a waiting resync may start)."""
        left = self._writes.pop(key) - 1
        if left:
            self._writes[key] = left
        else:
            idle = self._idle.pop(key, None)
            if idle is not None:
                idle.set()

    def _slow(self, out: asyncio.Future[T], coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Complete ``out`` with ``coro`` run as a task."""
        task = asyncio.get_running_loop().create_task(coro)

        def done(t: asyncio.Task[T]) -> None:
            if out.done():
                return
            if t.cancelled():
                out.cancel()
            elif (exc := t.exception()) is not None:
                out.set_exception(exc)
            else:
                out.set_result(t.result())

        def cancelled(f: asyncio.Future[T]) -> None:
            if f.cancelled() and not task.done():
                task.cancel()

        task.add_done_callback(done)
        out.add_done_callback(cancelled)
        return out

    # -- the read process (Fig. 7A) -------------------------------------------------------------

    async def _read_extent(self, ext: Extent) -> bytes:
        deadline = self._deadline()
        attempt = 0
        while True:
            view = self.view
            try:
                return await self._read_layers(view, ext)
            except (LaminaError, Failed) as exc:
                attempt += 1
                await self._recover(view, [exc], deadline, attempt, f"read of page {ext.page}")

    async def _read_layers(self, view: VolumeView, ext: Extent, start: int = 0) -> bytes:
        for layer in view.layers[start:]:
            if layer.id in self._fixed and len(view.layers) > 1:
                await self._load_presence(view, layer)
                pages = self._presence.get(layer.id)
                if pages is not None and ext.page not in pages:
                    continue
            state, data = await self._read_page(view, layer, ext.page, ext.offset, ext.length)
            if state == PageState.PRESENT:
                return bytes(data) if type(data) is not bytes else data
            if state == PageState.ZERO:
                return bytes(ext.length)
            if state == PageState.TOMBSTONE:
                raise Deleted(f"page {ext.page} of layer {layer.id} moved up")
        return bytes(ext.length)

    async def _read_page(
        self,
        view: VolumeView,
        layer: LayerView,
        page: int,
        offset: int,
        length: int,
        resyncs: int = 0,
    ) -> tuple[int, Payload]:
        """(state, data) of one page of one layer from an in-sync copy (``resyncs``: how
        often this read resynchronised the page already)."""
        part = layer.partition(page)
        readable = view.readable(layer, page)
        if not readable:
            raise Unavailable(f"no copy of page {page} of layer {layer.id} is up")
        tried: list[int] = []
        failures: list[BaseException] = []
        while len(tried) < len(readable):
            i = self._pick(part, [c for c in readable if c not in tried])
            tried.append(i)
            sid = part[i]
            req = m.ReadRequest(
                layer.owner, view.epoch, layer.id, page, view.page_size, offset, length,
                self.cluster.take_tokens(sid),
            )  # fmt: skip
            try:
                resp, data = await self._call(sid, req)
            except Corrupt as exc:
                if self.writable and len(readable) > 1 and resyncs < READ_RESYNCS:
                    await self._resync(view, layer, page, exclude=frozenset({i}))
                    return await self._read_page(view, layer, page, offset, length, resyncs + 1)
                failures.append(exc)
                continue
            except Failed as exc:
                failures.append(exc)
                continue
            state = resp.state
            if (
                state in (PageState.PRESENT, PageState.ZERO)
                and needs_resync(resp.mask, readable)
                and (layer.id, page) not in self._clean
            ):
                if self.writable and resyncs < READ_RESYNCS:
                    await self._resync(view, layer, page)
                    return await self._read_page(view, layer, page, offset, length, resyncs + 1)
                auth = await self._authoritative(view, layer, page, readable)
                if auth is not None and auth != i:
                    resp, data = await self._call(
                        part[auth],
                        m.ReadRequest(
                            layer.owner, view.epoch, layer.id, page, view.page_size, offset, length
                        ),
                    )
                    state = resp.state
            return state, data
        if all(isinstance(f, Corrupt) for f in failures):
            raise PageLost(self.name, layer.id, page, view.page_size)
        raise failures[0]

    async def _authoritative(
        self, view: VolumeView, layer: LayerView, page: int, readable: list[int]
    ) -> int | None:
        statuses = await self._statuses(view, layer, page, readable)
        return authoritative({i: (st[0], st[1]) for i, st in statuses.items()})

    async def _statuses(
        self, view: VolumeView, layer: LayerView, page: int, copies: list[int]
    ) -> dict[int, Status]:
        """{copy: (state, mask, generation, flags)} by STATUS; raises the first failure."""
        part = layer.partition(page)
        answers = await _all(
            self._call(part[i], m.StatusRequest(layer.owner, view.epoch, layer.id, (page,)))
            for i in copies
        )
        out = {}
        for i, (resp, _) in zip(copies, answers, strict=True):
            _, state, mask, gen, flags = resp.entries[0]
            out[i] = (state, mask, gen, flags)
        return out

    # -- resynchronisation ---------------------------------------------------------------------

    async def _resync(
        self, view: VolumeView, layer: LayerView, page: int, exclude: frozenset[int] = frozenset()
    ) -> None:
        """Make every readable copy of ``page`` of ``layer`` equal to the authoritative one
        and mark them clean by compare-and-set on their generations.  Runs while no write
        of this client is in flight on the page (and holds new ones back)."""
        key = (layer.id, page)
        running = self._resyncs.get(key)
        if running is not None:
            await asyncio.shield(running)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._resyncs[key] = fut
        try:
            while self._writes.get(key):
                idle = self._idle.setdefault(key, asyncio.Event())
                await idle.wait()
            for _ in range(8):
                if await self._resync_once(view, layer, page, exclude):
                    self._clean.add(key)
                    return
            raise Unavailable(f"page {page} of layer {layer.id} kept changing during its resync")
        finally:
            del self._resyncs[key]
            fut.set_result(None)

    async def _resync_once(
        self, view: VolumeView, layer: LayerView, page: int, exclude: frozenset[int]
    ) -> bool:
        part = layer.partition(page)
        readable = view.readable(layer, page)
        statuses = await self._statuses(view, layer, page, readable)
        # this client is the only writer and none of its writes is on its way: a copy's
        # WRITING flag is a write of its own that reached every copy
        plan = repair.plan(
            statuses, readable, readable, top=True, bad=exclude, wait_for_writes=False
        )
        if plan.verdict is repair.Verdict.NO_SOURCE and repair.lost(statuses, readable, exclude):
            raise PageLost(self.name, layer.id, page, view.page_size)
        if plan.verdict in (repair.Verdict.AGREE, repair.Verdict.NO_SOURCE):
            return True  # equal already, or no copy holds it: nothing to make equal
        auth = plan.source
        assert auth is not None
        gens = dict(plan.generations)
        size = view.page_size
        if statuses[auth][0] == PageState.PRESENT:
            try:
                resp, data = await self._call(
                    part[auth],
                    m.ReadRequest(layer.owner, view.epoch, layer.id, page, size, 0, size),
                )
            except Corrupt:
                return False  # quarantined now: another copy, or none, is the authority
            if resp.state != PageState.PRESENT or resp.generation != gens[auth]:
                return False
        else:
            data = bytes(size)
        self._sent(layer.id)
        # each copy is overwritten only if it did not change since its STATUS: a write that
        # reached it meanwhile is never replaced by older data (CONFLICT: start over)
        try:
            written = await _all(
                self._call(
                    part[i],
                    m.WriteRequest(  # durable (fua) before any mask vouches for it
                        layer.owner, view.epoch, layer.id, page, size, 0, FULL, FULL, True,
                        conditional=True, if_generation=gens[i],
                    ),
                    data,
                )
                for i in plan.targets
            )  # fmt: skip
        except Conflict:
            return False
        gens.update(
            (i, resp.generation) for i, (resp, _) in zip(plan.targets, written, strict=True)
        )
        # every mask is about to vouch for every live copy's bytes: the targets' are on
        # disk (fua), the others' (the source's at least) may be in a page cache only
        await _all(
            self._call(part[i], m.FlushRequest(layer.owner, view.epoch))
            for i in plan.generations
            if i not in plan.targets
        )
        try:
            order = plan.mark_order
            for group in (order[:-1], order[-1:]):  # the source last
                await _all(
                    self._call(
                        part[i],
                        m.MarkCleanRequest(
                            layer.owner, view.epoch, layer.id, page, gens[i], plan.mask
                        ),
                    )
                    for i in group
                )
        except Conflict:
            return False
        log.info("resynchronised page %d of layer %d from copy %d", page, layer.id, auth)
        return True

    # -- the write process (Fig. 7B) ------------------------------------------------------------

    async def _write_extent(
        self, ext: Extent, data: Payload, fua: bool, orphans: Orphans | None = None
    ) -> None:
        """Write one extent, attempt after attempt, until every copy of the top layer
        acknowledged one attempt.  ``orphans``: (layer, server, token) of the copies that
        took an earlier attempt that failed elsewhere; once an attempt in the same layer
        succeeds, every copy holds these bytes again (written after them), so those
        tokens are confirmed with its own: left unconfirmed they would keep the pages
        dirty and flagged WRITING for up to ``IN_FLIGHT`` seconds."""
        deadline = self._deadline()
        attempt = 0
        orphans = [] if orphans is None else orphans
        while True:
            view = self.view
            self._check_lock()
            layer = view.top
            key = (layer.id, ext.page)
            while key in self._resyncs:
                await asyncio.shield(self._resyncs[key])
            self._writes[key] = self._writes.get(key, 0) + 1
            try:
                errors = await self._write_page(view, layer, ext, data, fua, orphans)
            finally:
                self._write_done(key)
            if not errors:
                # another layer's copies never got this attempt
                self._durable_later(tuple((sid, t) for lid, sid, t in orphans if lid == layer.id))
                return
            attempt += 1
            absent = [e for e in errors if isinstance(e, NotFound)]
            if absent and len(absent) == len(errors):
                # every copy written said NOT_FOUND: nobody in the top layer holds the page
                everywhere = len(absent) == len(view.writable(layer, ext.page))
                try:
                    await self._copy_up(view, layer, ext.page, deadline, everywhere)
                except (LaminaError, Failed) as exc:
                    await self._recover(view, [exc], deadline, attempt, f"copy-up of {ext.page}")
                continue
            corrupt = [e for e in errors if isinstance(e, Corrupt)]
            if corrupt and len(corrupt) == len(errors) and self.writable:
                # a partial write to a quarantined copy: repair it from a sound one (none:
                # PageLost, which fails the write at once); again only after a pause
                await self._resync(view, layer, ext.page)
                if attempt <= READ_RESYNCS:
                    continue
            await self._recover(view, errors, deadline, attempt, f"write of page {ext.page}")

    async def _write_page(
        self,
        view: VolumeView,
        layer: LayerView,
        ext: Extent,
        data: Payload,
        fua: bool,
        orphans: Orphans,
    ) -> list[BaseException]:
        """One attempt: the write to every up copy; the errors (none: done).  A failed
        attempt adds the tokens of the copies that took it to ``orphans``."""
        part = layer.partition(ext.page)
        copies = view.writable(layer, ext.page)
        if not copies:
            return [Unavailable(f"no copy of page {ext.page} of layer {layer.id} is up")]
        n = len(part)
        restore = restore_mask(set(copies), n)
        cluster = self.cluster
        self._sent(layer.id)
        if ext.length == view.page_size:
            self._now_present(layer.id, ext.page)  # a whole-page write creates the page
        clients: list[Client] = []
        for i in copies:
            client = cluster.sender(part[i])
            if client is None:
                try:
                    client = await cluster.connected(part[i])
                except Failed as exc:
                    return [exc]
            clients.append(client)
        # every copy's request goes out before we wait for any answer
        futures = [
            client.send(
                m.WriteRequest(
                    view.id, view.epoch, layer.id, ext.page, view.page_size, ext.offset,
                    clear_mask(i, n), restore, fua, cluster.take_tokens(part[i]),
                ),
                data,
            )
            for i, client in zip(copies, clients, strict=True)
        ]  # fmt: skip
        sent = time.monotonic()
        for client in clients:
            await client.drain()
        took: list[tuple[str, int]] = []
        errors: list[BaseException] = []
        for i, fut in zip(copies, futures, strict=True):
            try:
                resp, _ = cluster.answer(part[i], await _settled(fut))
                took.append((part[i], resp.token))
            except (LaminaError, Failed) as exc:
                errors.append(exc)
        elapsed = time.monotonic() - sent
        if not errors and elapsed > WRITE_ATTEMPT_LIMIT:
            # a resync may already have judged it failed (see syncmask.IN_FLIGHT): it is
            # redone, not acknowledged, and its tokens wait for the attempt that succeeds
            log.warning("write of page %d took %.1f s on its copies: redoing it", ext.page, elapsed)
            errors.append(Unavailable(f"write of page {ext.page} took {elapsed:.1f} s"))
        if errors:
            # the copies that took it stay dirty until an attempt succeeds everywhere
            orphans.extend((layer.id, sid, token) for sid, token in took)
            return errors
        self._durable_later(tuple(took))
        if ext.length == view.page_size:
            self._clean.add((layer.id, ext.page))
        return []

    async def _copy_up(
        self,
        view: VolumeView,
        layer: LayerView,
        page: int,
        deadline: float,
        absent_everywhere: bool = False,
    ) -> None:
        """Put ``page`` into the top layer: the uppermost lower layer's copy of it, or
        zeros; CREATE_IF_ABSENT makes a late or repeated copy-up harmless [0050].
        ``absent_everywhere``: every copy of the top layer just said it lacks the page
        (the usual first write of a page), so there is no holder to look for."""
        data: Payload | None = None
        source: LayerView | None = None
        part = layer.partition(page)
        readable = view.readable(layer, page)
        holders = []
        if not absent_everywhere:
            statuses = await self._statuses(view, layer, page, view.writable(layer, page))
            holders = [i for i in readable if statuses[i][0] in (PageState.PRESENT, PageState.ZERO)]
        if holders:
            # Some up copy of the top layer holds the page: only others (a recovering copy
            # that missed its creation) lack it.  They get that copy's bytes, not the
            # lower layers' (which the page in the top layer has moved on from).
            state, got = await self._read_page(view, layer, page, 0, view.page_size)
            if state == PageState.PRESENT:
                data = got
            lower_layers: tuple[LayerView, ...] = ()
        else:
            lower_layers = view.layers[1:]
        for lower in lower_layers:
            if lower.id in self._fixed:
                await self._load_presence(view, lower)
                pages = self._presence.get(lower.id)
                if pages is not None and page not in pages:
                    continue
            state, got = await self._read_page(view, lower, page, 0, view.page_size)
            if state == PageState.PRESENT:
                data, source = got, lower
                break
            if state == PageState.ZERO:
                source = lower
                break
            if state == PageState.TOMBSTONE:
                raise Deleted(f"page {page} of layer {lower.id} moved up")
        copies = view.writable(layer, page)
        if not copies:
            raise Unavailable(f"no copy of page {page} of layer {layer.id} is up")
        mask = FULL & ~(bits(range(len(part))) & ~bits(copies))
        # in the presence map before it exists: a map may say "present" wrongly (the read
        # then finds it absent and goes on down), never "absent" wrongly
        self._now_present(layer.id, page)
        self._sent(layer.id)
        results = await asyncio.gather(
            *(
                self._call(
                    part[i],
                    m.CreateRequest(
                        view.id,
                        view.epoch,
                        layer.id,
                        page,
                        view.page_size,
                        mask,
                        data is None,
                        self.cluster.take_tokens(part[i]),
                    ),
                    b"" if data is None else data,
                )
                for i in copies
            ),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # the copies created vouch for the ones that failed: take that back (by CAS
            # on the generation they were created at), so the page stays dirty for them
            failed = bits(
                [i for i, r in zip(copies, results, strict=True) if isinstance(r, BaseException)]
            )
            for i, r in zip(copies, results, strict=True):
                if not isinstance(r, BaseException) and r[0].created:
                    with contextlib.suppress(LaminaError, Failed):
                        await self._call(
                            part[i],
                            m.MarkCleanRequest(
                                view.id, view.epoch, layer.id, page, r[0].generation,
                                mask & ~failed,
                            ),
                        )  # fmt: skip
            await self._recover(view, errors, deadline, 1, f"copy-up of page {page}")
            return
        if all(reply[0].created for reply in results if not isinstance(reply, BaseException)):
            self._clean.add((layer.id, page))
        if source is not None and source.migrates_to == layer.id:
            # tombstoned only after the next FLUSH made the copies in the top durable: a
            # power loss before it must find the page still in the source
            self._moved.append((self._writes_sent, source.id, page))
            if len(self._moved) > MAX_MOVED:
                del self._moved[0]  # the worker tombstones it, after its own FLUSH


def _below(view: VolumeView) -> dict[int, tuple[int, int | None] | None]:
    """For each layer of ``view``: (id, ``migrates_to``) of the layer right below it."""
    layers = view.layers  # top first
    return {
        layer.id: (layers[k + 1].id, layers[k + 1].migrates_to) if k + 1 < len(layers) else None
        for k, layer in enumerate(layers)
    }


def _up_copies(view: VolumeView, layer: LayerView, page: int) -> list[str]:
    part = layer.partition(page)
    return [part[i] for i in view.writable(layer, page)]


async def _settled(fut: asyncio.Future[Frame]) -> Frame | BaseException:
    """The frame a request's future resolves to, or the exception it failed with."""
    try:
        return await fut
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return exc


async def _all(aws: Any) -> list[Any]:
    """Await every awaitable; if any failed, raise the first error once all are done
    (nothing is left running behind the caller's back)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)

"""What the manager leader does for storage servers: leases, failure marking, publication.

Theory of operation
-------------------
Storage servers ask for their leases over the wire protocol (LEASE, see
:mod:`lamina.mgmt.leases` for why the *server* asks).  Only the leader grants; any
other manager answers UNAVAILABLE and the server tries the next one.  A grant carries
the map's epoch and the fence epochs of the volumes on that server, so a server knows
them before it serves (DESIGN section 6).

Once a second or so the leader's duty loop (:meth:`LeaderDuties.run_once`):
- marks ``down`` every ``up``/``recovering`` server whose lease is certainly over;
- moves a server that asked for a lease while ``down``, or that restarted, to
  ``recovering`` (only the resync makes it ``up`` again).  A restart shows as an
  incarnation in the LEASE request other than the one the map records
  (``ServerStarted`` commits the new one through Raft), so a leader elected after the
  restart, or during it, sees it as well as the one that granted the earlier lease;
- publishes the current epoch once every server holding a layer of a volume fenced since
  the last publication has acknowledged it (by asking for a lease with that epoch) or has
  certainly lost its lease: the publication rule, with leases as the channel;
- reclaims space: DELETE_LAYER of every layer gone from the map (deleted volumes, ...)
  to every server that may hold it, until each confirmed; and of every layer copy a
  re-replication moved away to the server it ``retired`` (that server may still hold old
  pages of it), then ``ReclaimDone``, after which the layer may be placed there again;
- once a second, releases the volume locks whose sessions sent this manager no
  keepalive for longer than the session timeout (:mod:`lamina.mgmt.sessions`).
Every change goes through Raft like any other; a new leader resumes from the map.

Failure reports: a driver that saw a storage server fail a request reports it
(:meth:`LeaderDuties.check_report`).  The leader does not take the driver's word for it:
it PINGs the server (one second for everything) and marks it ``down`` only if no answer
comes.  Marking it down right away is safe because it cannot take effect early: the
change fences the server's volumes, and the new epoch is published only once the
server acknowledged it or its lease is certainly over, so by the time a driver uses the
map without it, the server refuses I/O on its own.  Concurrent reports of one server
share one check.

Two guards keep a lease from outliving what a new leader assumes: a new leader waits its
predecessor's Raft fallback (``grace``) plus a lease before judging anyone, and a manager
that finds its duty loop was paused (SIGSTOP, a stalled VM) grants nothing for ``grace``,
so a deposed leader waking up cannot hand out a lease before Raft tells it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

from lamina.config import parse_addr
from lamina.errors import BadRequest, LaminaError, NotFound, StorageIOError, Unavailable
from lamina.mgmt import clustermap as cm
from lamina.mgmt.leases import LeaseTable
from lamina.mgmt.service import ManagerService, Rejected
from lamina.mgmt.sessions import EXPIRY_PERIOD, SessionTable, locks_held
from lamina.wire import messages as m
from lamina.wire.connection import Client
from lamina.wire.framing import Payload

log = logging.getLogger(__name__)
Reply = tuple[m.Message, Payload]
#: a reported server must answer PING within this many seconds, connection included
REPORT_PING_TIMEOUT = 1.0


def fences_of(cmap: cm.ClusterMap, server_id: str) -> tuple[tuple[int, int], ...]:
    """(volume id, fence epoch) of every volume with a layer copy on ``server_id``, or a
    copy it was retired from (it must refuse the old maps that still place it there)."""
    volume_ids = {
        layer.volume_id
        for layer in cmap.layers.values()
        if server_id in layer.retired or any(server_id in part for part in layer.placement)
    }
    return tuple(
        (v.id, v.fence_epoch) for v in sorted(cmap.volumes.values(), key=lambda v: v.id)
        if v.id in volume_ids
    )  # fmt: skip


def lineages_of(cmap: cm.ClusterMap, server_id: str) -> tuple[tuple[int, int], ...]:
    """(layer id, lineage token) of the layers placed on ``server_id`` (newest first, at
    most MAX_LINEAGES): the server refuses a layer file it recorded with another token."""
    placed = [
        (lid, layer.lineage)
        for lid, layer in sorted(cmap.layers.items(), reverse=True)
        if layer.lineage and any(server_id in part for part in layer.placement)
    ]
    return tuple(placed[: m.MAX_LINEAGES])


def publication_waits_for(cmap: cm.ClusterMap) -> set[str]:
    """The servers that must acknowledge ``cmap.epoch`` before it is published."""
    fenced = {v.id for v in cmap.volumes.values() if v.fence_epoch > cmap.published_epoch}
    return cm.holders(cmap, fenced)


class LeaderDuties:
    """The storage-facing side of a manager: a RequestHandler for LEASE, and the loop."""

    def __init__(
        self,
        service: ManagerService,
        is_leader: Callable[[], bool],
        clock: Callable[[], float],
        lease_duration: float = 3.0,
        key: bytes | None = None,
        grace: float = 2.5,
        period: float = 0.2,
        session_timeout: float = 10.0,
        rereplicate_after: float = 600.0,
    ) -> None:
        self.service = service
        self.key = key
        self.period = period
        self._last_run: float | None = None
        self._quiet_until = 0.0
        self._next_expiry = 0.0
        self._reclaiming: asyncio.Task[None] | None = None
        self._checks: dict[str, asyncio.Task[tuple[cm.ServerState, bool]]] = {}
        self.sessions = SessionTable(session_timeout)
        self.server_id = service.manager_id
        self.is_leader = is_leader
        self.clock = clock
        self.table = LeaseTable(lease_duration, grace)
        self._proposing: set[cm.Command] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: the background worker (lamina.mgmt.worker), whose progress the API shows
        self.worker: Any = None
        self.rereplicate_after = rereplicate_after
        self.rereplication_problems: dict[str, str] = {}
        #: why a server was marked down, when it said so (a failed store answers every
        #: request, PING included, with the reason); ``lamina status`` shows it
        self.server_failures: dict[str, str] = {}
        self._down_since: dict[str, float] = {}
        self._pushing: dict[str, asyncio.Task[None]] = {}
        self._leading_since = 0.0

    # -- RequestHandler ----------------------------------------------------------------

    def current_epoch(self) -> int:
        return self.service.map.epoch

    def leading(self) -> bool:
        """Whether this manager acts as the leader now (Raft says so, its duty loop has
        taken the role, and it is not in the quiet time after a pause)."""
        return self.table.leading and self.is_leader() and self.clock() >= self._quiet_until

    def handle(self, msg: m.Message, payload: Payload) -> Reply:
        if not isinstance(msg, m.LeaseRequest):
            raise BadRequest(f"{type(msg).__name__} is not a manager operation")
        if not self.leading():
            raise Unavailable(f"manager {self.server_id} is not the leader")
        cmap = self.service.map
        server = cmap.servers.get(msg.server_id)
        if server is None or server.state == cm.ServerState.OUT:
            raise NotFound(f"storage server {msg.server_id} is not a member of the cluster")
        if msg.incarnation != server.incarnation:
            # recorded in the map, so any later leader tells a restart too; a restarted
            # server (or one that was down) becomes recovering with it
            self._propose(cm.ServerStarted(msg.server_id, msg.incarnation))
            if server.incarnation:
                # No lease until that is in the map: with one at this epoch, where the
                # map still has it up, clients would read from a server that may have
                # lost writes to a power cut and has lost its episodes.  With the lease
                # of the next epoch it serves those clients STALE instead.
                raise Unavailable(
                    f"storage server {msg.server_id} restarted (incarnation "
                    f"{msg.incarnation}); recording that first: ask again"
                )
        self.table.grant(msg.server_id, self.clock(), msg.epoch)
        self.server_failures.pop(msg.server_id, None)  # it serves again (after a restart)
        if msg.incarnation == server.incarnation and server.state == cm.ServerState.DOWN:
            self._propose(cm.SetServerState(msg.server_id, cm.ServerState.RECOVERING))
        duration_ms = int(self.table.duration * 1000)
        sid = msg.server_id
        reply = m.LeaseResponse(
            duration_ms, cmap.epoch, fences_of(cmap, sid), lineages_of(cmap, sid)
        )
        return reply, b""

    # -- the duty loop -------------------------------------------------------------------

    def run_once(self) -> None:
        now = self.clock()
        self.sessions.observe(self.service.map, now)
        last, self._last_run = self._last_run, now
        if last is not None and now - last > 5 * self.period:
            # This process was paused (SIGSTOP, a stalled VM): while it slept another
            # manager may have been elected.  Grant nothing until Raft has had time to
            # tell us (a deposed leader steps down within its fallback timeout).
            log.warning("manager %s was paused %.1fs; not granting leases for %.1fs",
                        self.server_id, now - last, self.table.grace)  # fmt: skip
            self.table.step_down()
            self._quiet_until = now + self.table.grace
            return
        if now < self._quiet_until:
            return
        if not self.is_leader():
            if self.table.leading:
                log.info("manager %s is no longer the leader", self.server_id)
                self.table.step_down()
            return
        if not self.table.leading:
            log.info("manager %s leads: waiting one lease before judging servers", self.server_id)
            self.table.become_leader(now)
            self._leading_since = now
        cmap = self.service.map
        for sid, server in sorted(cmap.servers.items()):
            self.table.saw(sid, now)
            if server.state in (cm.ServerState.UP, cm.ServerState.RECOVERING) and (
                self.table.expired(sid, now)
            ):
                log.warning("storage server %s: lease over, marking it down", sid)
                self._propose(cm.SetServerState(sid, cm.ServerState.DOWN))
                if self.key is not None:  # a failed store says why when PINGed
                    self._start_check(sid)
        if cmap.published_epoch < cmap.epoch:
            waits = publication_waits_for(cmap)
            if self.table.may_publish(cmap.epoch, waits, now):
                self._propose(cm.Publish(cmap.epoch))
            elif self.key is not None:
                self._push_epoch(cmap, waits)
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRY_PERIOD
            self.expire_sessions(cmap, now)
        self.rereplicate(cmap, now)
        self.drain(cmap)
        if (
            (self.service.reclaim or any(layer.retired for layer in cmap.layers.values()))
            and self.key is not None
            and (self._reclaiming is None or self._reclaiming.done())
        ):
            self._reclaiming = asyncio.ensure_future(self.reclaim_once())

    def _push_epoch(self, cmap: cm.ClusterMap, waits: set[str]) -> None:
        """SET_EPOCH to every live server the publication waits for: its answer is an
        acknowledgement like the epoch of its next LEASE request, only sooner (clients
        then wait for a new map a round trip, not a lease renewal)."""
        for sid in sorted(waits):
            server = cmap.servers.get(sid)
            if (
                server is None
                or server.state not in (cm.ServerState.UP, cm.ServerState.RECOVERING)
                or self.table.acked.get(sid, 0) >= cmap.epoch
                or sid in self._pushing
            ):
                continue
            request = m.SetEpochRequest(cmap.epoch, fences_of(cmap, sid), lineages_of(cmap, sid))
            task = asyncio.ensure_future(self._push(sid, server.addr, request))
            self._pushing[sid] = task
            task.add_done_callback(functools.partial(self._pushed, sid))

    def _pushed(self, sid: str, task: asyncio.Task[None]) -> None:
        self._pushing.pop(sid, None)

    async def _push(self, sid: str, addr: str, request: m.SetEpochRequest) -> None:
        try:
            reply = await self._call(addr, request, 1.0, 2.0)
        except (LaminaError, OSError, TimeoutError) as exc:
            log.debug("SET_EPOCH %d to %s: %s", request.epoch, sid, exc)
            return
        assert isinstance(reply, m.SetEpochResponse)
        if self.table.leading:
            self.table.acked[sid] = max(self.table.acked.get(sid, 0), reply.epoch)

    def drain(self, cmap: cm.ClusterMap) -> None:
        """Migrate every volume with an own layer on a draining server (and no migration
        or flatten running) to the servers that may take copies; once the server holds
        nothing, ``lamina server remove`` succeeds."""
        draining = {sid for sid, s in cmap.servers.items() if s.draining}
        if not draining:
            return
        targets = tuple(s.id for s in cmap.placeable())
        for name in sorted(cmap.volumes):
            volume = cmap.volumes[name]
            if volume.migration or volume.flattening:
                continue
            used = {
                sid
                for lid in cmap.own_layers(volume)
                if cmap.layers[lid].migrates_to is None
                for part in cmap.layers[lid].placement
                for sid in part
            }
            if used & draining:
                self._propose(cm.MigrateVolume(name, targets))

    def rereplicate(self, cmap: cm.ClusterMap, now: float) -> None:
        """Re-replicate the copies of every server ``down`` for ``rereplicate_after``
        seconds (counted from when this leader first saw it down, or took over): they go
        to other servers and the worker fills them.  Why it cannot be done is kept in
        ``rereplication_problems`` (``lamina status`` shows it)."""
        for sid, server in sorted(cmap.servers.items()):
            if server.state is not cm.ServerState.DOWN or not cmap.layers_on(sid):
                self._down_since.pop(sid, None)
                self.rereplication_problems.pop(sid, None)
                continue
            since = max(self._down_since.setdefault(sid, now), self._leading_since)
            if now - since < self.rereplicate_after:
                continue
            cmd = cm.Rereplicate(sid)
            reason = cm.validate(cmap, cmd)
            if reason is None:
                log.warning(
                    "storage server %s down for %.0f s: re-replicating its copies", sid, now - since
                )
                self._propose(cmd)
            elif self.rereplication_problems.get(sid) != reason:
                log.error("cannot re-replicate storage server %s: %s", sid, reason)
            if reason is not None:
                self.rereplication_problems[sid] = reason

    def expire_sessions(self, cmap: cm.ClusterMap, now: float) -> None:
        """Propose ReleaseLock for every lock whose session has expired at this leader."""
        assert self.table.leader_since is not None
        for name, lock in self.sessions.expired(cmap, self.table.leader_since, now):
            if self._propose(cm.ReleaseLock(name, lock.session)):
                log.warning("volume %s: no keepalive from the lock holder, %s, for over %gs; "
                            "releasing its lock", name, cm.describe_lock(lock),
                            self.sessions.timeout)  # fmt: skip

    def keepalive(self, session: str) -> list[str]:
        """Record a keepalive of ``session`` now; the volumes whose lock it holds."""
        self.sessions.keepalive(session, self.clock())
        return locks_held(self.service.map, session)

    async def check_report(self, server_id: str, reason: str) -> tuple[cm.ServerState, bool]:
        """A driver saw ``server_id`` fail a request: PING it and, if it does not answer,
        mark it ``down`` (only from ``up`` or ``recovering``).  The server's state after
        that, and whether it answered.  Raises Unavailable unless this manager leads,
        NotFound for a server not in the map."""
        if not self.leading() or self.key is None:
            raise Unavailable(f"manager {self.server_id} is not the leader")
        if server_id not in self.service.map.servers:
            raise NotFound(f"no server {server_id!r}")
        log.info("storage server %s reported failing: %.200s", server_id, reason)
        return await asyncio.shield(self._start_check(server_id))

    def _start_check(self, server_id: str) -> asyncio.Future[tuple[cm.ServerState, bool]]:
        task = self._checks.get(server_id)
        if task is None:
            task = asyncio.ensure_future(self._check(server_id))
            self._checks[server_id] = task
            task.add_done_callback(lambda _: self._checks.pop(server_id, None))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _check(self, server_id: str) -> tuple[cm.ServerState, bool]:
        addr = self.service.map.servers[server_id].addr
        limit = REPORT_PING_TIMEOUT
        try:
            async with asyncio.timeout(limit):
                reply = await self._call(addr, m.PingRequest(), limit, limit)
            answered = isinstance(reply, m.PingResponse) and reply.server_id == server_id
        except (LaminaError, OSError, TimeoutError) as exc:
            log.info("storage server %s does not answer PING: %s", server_id, exc)
            answered = False
            if isinstance(exc, StorageIOError):  # it answered: its store has failed
                self.server_failures[server_id] = exc.message
        current = self.service.map.servers.get(server_id)
        if current is None:
            raise NotFound(f"server {server_id!r} was removed")
        if not answered and current.state in (cm.ServerState.UP, cm.ServerState.RECOVERING):
            log.warning("storage server %s was reported and does not answer: marking it down",
                        server_id)  # fmt: skip
            try:
                await self.service.submit(cm.SetServerState(server_id, cm.ServerState.DOWN))
            except Rejected as exc:  # marked down (or removed) meanwhile
                log.info("marking %s down: %s", server_id, exc.message)
        after = self.service.map.servers.get(server_id)
        if after is None:
            raise NotFound(f"server {server_id!r} was removed")
        return after.state, answered

    async def _call(
        self, addr: str, msg: m.Message, connect_timeout: float, timeout: float
    ) -> m.Message:
        """One request to the storage server at ``addr`` on a new connection: at most
        ``connect_timeout`` to connect and authenticate, then ``timeout`` for the answer."""
        assert self.key is not None
        host, port = parse_addr(addr)
        client = await Client.connect(
            host, port, self.key, peer=f"manager/{self.server_id}", timeout=connect_timeout
        )
        try:
            async with asyncio.timeout(timeout):
                return await client.call(msg)
        finally:
            client.close()

    async def reclaim_once(self) -> None:
        """Ask every server that may hold a layer of a deleted volume to drop it (DELETE_LAYER
        at the current epoch, which also fences the volume there); retried until each did."""
        assert self.key is not None
        cmap = self.service.map
        for lid, (vid, servers) in list(self.service.reclaim.items()):
            for sid in servers:
                server = cmap.servers.get(sid)
                if server is None:  # removed from the cluster: nothing to ask
                    self.service.reclaimed(lid, sid)
                    continue
                try:
                    request = m.DeleteLayerRequest(vid, cmap.epoch, lid)
                    reply = await self._call(server.addr, request, 2.0, 5.0)
                except (LaminaError, OSError, TimeoutError) as exc:
                    log.info("reclaiming layer %d on %s: %s; will retry", lid, sid, exc)
                    continue
                assert isinstance(reply, m.DeleteLayerResponse)
                log.info("reclaimed layer %d on %s (%d pages)", lid, sid, reply.pages_removed)
                self.service.reclaimed(lid, sid)
        await self.reclaim_retired(cmap)

    async def reclaim_retired(self, cmap: cm.ClusterMap) -> None:
        """DELETE_LAYER to every server a layer retired (not ``down`` or ``out``), and
        ``ReclaimDone`` once it confirmed.  No copy of the layer is placed on a retired
        server, so the delete cannot reach a copy the server holds now.  Not while a copy
        of the layer is being filled: until the fill is done the old copy may be the only
        one with some of the data (the fill's source may fail)."""
        assert self.key is not None
        for lid in sorted(cmap.layers):
            layer = cmap.layers[lid]
            if layer.filling:
                continue
            for sid in layer.retired:
                server = cmap.servers.get(sid)
                if server is None or server.state in (cm.ServerState.DOWN, cm.ServerState.OUT):
                    continue  # gone, or without a lease: asked once it is back
                try:
                    request = m.DeleteLayerRequest(layer.volume_id, cmap.epoch, lid)
                    reply = await self._call(server.addr, request, 2.0, 5.0)
                    assert isinstance(reply, m.DeleteLayerResponse)
                    await self.service.submit(cm.ReclaimDone(lid, sid))
                except (LaminaError, OSError, TimeoutError) as exc:
                    log.info("reclaiming the old copy of layer %d on %s: %s; will retry",
                             lid, sid, exc)  # fmt: skip
                    continue
                log.info("reclaimed the old copy of layer %d on %s (%d pages)", lid, sid,
                         reply.pages_removed)  # fmt: skip

    async def run(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:
                log.exception("leader duties failed; trying again")
            await asyncio.sleep(self.period)

    def _propose(self, cmd: cm.Command) -> bool:
        """Submit ``cmd`` in the background unless it is already on its way; whether it
        was submitted now."""
        if cmd in self._proposing:
            return False
        self._proposing.add(cmd)
        task = asyncio.ensure_future(self._submit(cmd))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _submit(self, cmd: cm.Command) -> None:
        try:
            await self.service.submit(cmd)
        except LaminaError as exc:
            log.info("%s not applied: %s", cmd, exc.message)
        finally:
            self._proposing.discard(cmd)

    async def close(self) -> None:
        if self._reclaiming is not None:
            self._reclaiming.cancel()
        for check in [*self._checks.values(), *self._pushing.values()]:
            check.cancel()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

"""The model manager: server states, the epoch, the volume's fence, leases, publication.

It mirrors DESIGN section 6: every map change raises the epoch and fences the volume at
it; heartbeats carry SET_EPOCH (epoch and fence) and renew the lease; the change is
*published* (clients and the worker may use it) only once every server acknowledged the
new epoch or the lease it was last granted has certainly expired.  A server is declared
down only after its heartbeats stopped being answered, or at once when it answers that it
stopped (its disk failed); while it is being declared down its lease is no longer
renewed.  A heartbeat answered by a new incarnation of an up server (it restarted, maybe
after losing power) makes it recovering, as ``leader.py`` does with LEASE requests.

Re-replication (docs/layers.md): a server down for ``rereplicate_after`` seconds loses
its copies, each to an up server not in that partition and not retired, at the same
index, unless a partition has no other copy that is up and not filling (then none
moves); the new copy is ``filling`` (written, never read, not trusted) until the worker's
FillDone, and the old server is ``retired`` until the worker dropped the layer there
(ReclaimDone): no copy is placed on it before.  The placement, the copies being filled
and the retired servers are published with the server states.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

UP, DOWN, RECOVERING = "up", "down", "recovering"
LIVE = (UP, RECOVERING)

HEARTBEAT = 0.25
LEASE = 1.0
SUSPECT = 1.5  # unanswered heartbeats for this long: down
SUSPECT_REPORTED = 0.75  # ... or this long when a client reported the server
BACK = 0.6  # a down server answering heartbeats for this long comes back (recovering)

SendHeartbeat = Callable[[str, int, int, float, int, Callable[[int, int, str], None]], None]


Parts = list[tuple[str, ...]]


@dataclass(slots=True)
class Change:
    epoch: int
    states: dict[str, str]
    why: str
    parts: Parts
    filling: frozenset[tuple[int, str]]
    retired: frozenset[str]
    up_until: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Manager:
    servers: tuple[str, ...]
    send_heartbeat: SendHeartbeat
    clock: Callable[[], float]
    trace: Callable[[str], None]
    epoch: int = 1
    fence: int = 1
    states: dict[str, str] = field(default_factory=dict)
    published_epoch: int = 1
    published: dict[str, str] = field(default_factory=dict)
    pending: Change | None = None
    lease_until: dict[str, float] = field(default_factory=dict)
    last_ack: dict[str, float] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    answering_since: dict[str, float] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    reported: set[str] = field(default_factory=set)
    incarnations: dict[str, int] = field(default_factory=dict)
    restarted: set[str] = field(default_factory=set)
    #: the incarnation the map records per server: a heartbeat (SET_EPOCH and lease) is
    #: taken only by that incarnation, as ``leader.py`` grants no lease to a restarted
    #: server before its restart is in the map
    recorded: dict[str, int] = field(default_factory=dict)
    lease_before_restart_recorded: bool = False  # the old leader: a lease at once
    stopped: dict[str, str] = field(default_factory=dict)  # server -> why it stopped
    changes: int = 0
    partitions: Parts = field(default_factory=list)
    guard_last_up: bool = True
    rereplicate_after: float = 0.0  # 0: never
    filling: set[tuple[int, str]] = field(default_factory=set)  # (partition, server)
    retired: set[str] = field(default_factory=set)
    down_since: dict[str, float] = field(default_factory=dict)
    published_parts: Parts = field(default_factory=list)
    published_filling: frozenset[tuple[int, str]] = frozenset()
    published_retired: frozenset[str] = frozenset()
    #: per server, the epoch it last stopped being up (clustermap.Server.up_until)
    up_until: dict[str, int] = field(default_factory=dict)
    published_up_until: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for s in self.servers:
            self.states[s] = UP
            self.lease_until[s] = 0.0
            self.last_ack[s] = 0.0
            self.acked[s] = 0
        self.published = dict(self.states)

    # -- heartbeats and leases ------------------------------------------------------------

    def tick(self) -> None:
        now = self.clock()
        for s in self.servers:
            if s not in self.revoked:
                self._heartbeat(s, now)
        self._decide(now)
        self._publish(now)

    def _heartbeat(self, s: str, now: float) -> None:
        grant = now + LEASE
        expect = 0 if self.lease_before_restart_recorded else self.recorded.get(s, 0)
        if not expect or self.incarnations.get(s, expect) == expect:
            # (a restart not recorded yet takes no lease: none to wait for)
            self.lease_until[s] = max(self.lease_until[s], grant)
        self.send_heartbeat(
            s, self.epoch, self.fence, grant, expect, functools.partial(self._ack, s)
        )

    def _ack(self, s: str, epoch: int, incarnation: int, stopped: str) -> None:
        now = self.clock()
        self.recorded.setdefault(s, incarnation)  # a first report is no restart
        if self.incarnations.setdefault(s, incarnation) != incarnation:
            self.incarnations[s] = incarnation
            self.restarted.add(s)
        if stopped:
            if s not in self.stopped:
                self.trace(f"mgr: {s} stopped: {stopped}")
            self.stopped[s] = stopped
            self.acked[s] = max(self.acked[s], epoch)  # it knows the fence; it serves nothing
            self._publish(now)
            return
        self.stopped.pop(s, None)
        if now - self.last_ack[s] > HEARTBEAT * 3:
            self.answering_since[s] = now
        self.last_ack[s] = now
        self.acked[s] = max(self.acked[s], epoch)
        self._publish(now)

    # -- decisions ------------------------------------------------------------------------

    def report(self, s: str, why: str) -> None:
        if s not in self.reported:
            self.trace(f"mgr: {s} reported ({why})")
        self.reported.add(s)

    def ready(self, s: str) -> None:
        """The worker found nothing dirty on recovering server ``s``."""
        if self.pending is None and self.states[s] == RECOVERING:
            self._change(s, UP, "resynchronised")

    def fill_done(self, pidx: int, s: str) -> None:
        """FillDone: the copy of partition ``pidx`` on ``s`` holds every page and serves
        reads."""
        if self.pending is None and (pidx, s) in self.filling:
            self.filling.discard((pidx, s))
            self._change(s, self.states[s], f"filled partition {pidx}")

    def reclaim_done(self, s: str) -> None:
        """ReclaimDone: retired server ``s`` dropped the layer; it may get a copy again."""
        if self.pending is None and s in self.retired:
            self.retired.discard(s)
            self._change(s, self.states[s], "dropped the layer it was retired from")

    def _rereplicate(self, now: float) -> bool:
        """Move every copy of a server down for long enough; whether one moved."""
        for s in self.servers:
            since = self.down_since.get(s)
            if self.states[s] != DOWN or since is None or now - since < self.rereplicate_after:
                continue
            moves = []
            for pidx, part in enumerate(self.partitions):
                if s not in part:
                    continue
                if not any(
                    o != s and (pidx, o) not in self.filling and self.states[o] == UP for o in part
                ):
                    return False  # no other complete up copy: s keeps the only source
                to = [
                    t
                    for t in self.servers
                    if self.states[t] == UP and t not in self.retired and t not in part
                ]
                if not to:
                    return False
                moves.append((pidx, part.index(s), to[0]))
            if not moves:
                continue
            for pidx, i, t in moves:
                copies = list(self.partitions[pidx])
                copies[i] = t
                self.partitions[pidx] = tuple(copies)
                self.filling.discard((pidx, s))
                self.filling.add((pidx, t))
            self.retired.add(s)
            self._change(s, DOWN, f"re-replicated: {moves}")
            return True
        return False

    def _decide(self, now: float) -> None:
        if self.pending is not None:
            return
        for s in sorted(self.restarted):
            self.restarted.discard(s)
            self.recorded[s] = self.incarnations[s]  # ServerStarted
            if self.states[s] == UP:
                self._change(s, RECOVERING, "restarted")
                return
        for s in self.servers:
            silent = now - self.last_ack[s]
            limit = SUSPECT_REPORTED if s in self.reported else SUSPECT
            if s in self.stopped:
                limit = 0.0
            if self.states[s] in LIVE and silent > limit and not self._last_up(s):
                self.revoked.add(s)  # no more lease: it stops serving before we go on
                self.down_since[s] = now
                self._change(s, DOWN, f"silent for {silent:.2f}")
                return
            if (
                self.states[s] == DOWN
                and silent < HEARTBEAT * 2
                and now - self.answering_since.get(s, now) > BACK
            ):
                self._change(s, RECOVERING, "answers heartbeats again")
                return
        if self.rereplicate_after and self._rereplicate(now):
            return
        self.reported.clear()

    def _last_up(self, s: str) -> bool:
        """Whether ``s`` is the last up copy of a partition (then it is never declared
        down: the copies left may lack acknowledged writes, and nothing could repair them)."""
        if not self.guard_last_up or self.states[s] != UP:
            return False
        return any(
            s in part
            and not any(
                self.states[t] == UP and (pidx, t) not in self.filling for t in part if t != s
            )
            for pidx, part in enumerate(self.partitions)
        )

    def _change(self, s: str, state: str, why: str) -> None:
        self.epoch += 1
        self.fence = self.epoch
        if self.states[s] == UP and state != UP:
            self.up_until[s] = self.epoch
        self.states[s] = state
        self.changes += 1
        self.pending = Change(
            self.epoch, dict(self.states), f"{s} {state}: {why}", list(self.partitions),
            frozenset(self.filling), frozenset(self.retired), dict(self.up_until),
        )  # fmt: skip
        self.trace(f"mgr: epoch {self.epoch} (fence): {self.pending.why}")
        now = self.clock()
        for t in self.servers:
            if t not in self.revoked:
                self._heartbeat(t, now)

    def _publish(self, now: float) -> None:
        change = self.pending
        if change is None:
            return
        for s in self.servers:
            if self.acked[s] < change.epoch and self.lease_until[s] >= now:
                return
        self.published_epoch = change.epoch
        self.published = dict(change.states)
        self.published_parts = change.parts
        self.published_filling = change.filling
        self.published_retired = change.retired
        self.published_up_until = change.up_until
        self.pending = None
        self.revoked.clear()
        self.reported.clear()
        moved = ""
        if self.rereplicate_after:
            moved = (
                f" {change.parts} filling {sorted(change.filling)} retired {sorted(change.retired)}"
            )
        self.trace(f"mgr: published epoch {change.epoch} {sorted(change.states.items())}{moved}")

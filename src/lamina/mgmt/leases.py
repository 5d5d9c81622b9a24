"""Storage-server leases as the manager leader sees them, as pure code [0028].

Theory of operation
-------------------
A storage server asks the leader for its lease (LEASE) and counts it from the moment
*it sent* the request: its lease ends at ``t_sent + d`` on its own clock.  The leader
grants at ``t_grant >= t_sent`` and so may only consider the lease over at
``t_grant + d`` plus a margin for clock-rate drift: whatever the network or a paused
process did, the server's lease is over by then.  A new leader knows nothing of the
grants its predecessor made, and the predecessor may have gone on granting for a while
after it lost its majority (until Raft's leader fallback timeout made it step down): so
a new leader treats every server as possibly holding a lease until ``grace + d`` (plus
margin) after it became leader, ``grace`` covering the predecessor's fallback.

Only after a server's lease is over may the leader mark it ``down`` (DESIGN section 6):
by then the server refuses I/O on its own, so nobody proceeds without it while it still
serves.  A LEASE request also reports the epoch the server knows: the acknowledgement the
epoch publication rule waits for.  (Its incarnation, which tells a restart, is compared
with the one the cluster map records, not kept here: a new leader knows nothing of what
the old one saw.)  Times are passed in (no clock is read here).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

#: extra fraction of the lease, and extra seconds, the leader waits for drift
DRIFT = 0.05
SLACK = 0.05


@dataclass
class LeaseTable:
    duration: float
    grace: float = 0.0  # how long a deposed leader may still grant, unaware
    leader_since: float | None = None
    granted: dict[str, float] = field(default_factory=dict)  # id -> time of the last grant
    acked: dict[str, int] = field(default_factory=dict)  # id -> epoch it reported
    # id -> when this leader first saw the server in the map: one added later than the
    # election gets a lease's time to ask for its first lease before it is judged
    seen: dict[str, float] = field(default_factory=dict)

    def _over(self, since: float, now: float) -> bool:
        return now >= since + self.duration * (1 + DRIFT) + SLACK

    def become_leader(self, now: float) -> None:
        self.leader_since = now
        self.granted.clear()
        self.acked.clear()
        self.seen.clear()

    def step_down(self) -> None:
        self.leader_since = None
        self.granted.clear()
        self.acked.clear()
        self.seen.clear()

    def saw(self, server_id: str, now: float) -> None:
        """The server is in the map this leader judges (the first call counts)."""
        self.seen.setdefault(server_id, now)

    @property
    def leading(self) -> bool:
        return self.leader_since is not None

    def grant(self, server_id: str, now: float, epoch: int) -> None:
        """Record a grant to a server that reported knowing ``epoch``."""
        self.granted[server_id] = now
        self.acked[server_id] = max(self.acked.get(server_id, 0), epoch)

    def expired(self, server_id: str, now: float) -> bool:
        """Whether the server certainly holds no lease (from this leader or an earlier)."""
        if self.leader_since is None:
            return False  # not leading: not ours to judge
        last = self.granted.get(server_id)
        if last is None:
            since = max(self.leader_since + self.grace, self.seen.get(server_id, 0.0))
            return self._over(since, now)
        return self._over(max(last, self.leader_since + self.grace), now)

    def may_publish(self, epoch: int, servers: Iterable[str], now: float) -> bool:
        """Whether every server has acknowledged ``epoch`` or certainly lost its lease."""
        return self.leading and all(
            self.acked.get(s, 0) >= epoch or self.expired(s, now) for s in servers
        )

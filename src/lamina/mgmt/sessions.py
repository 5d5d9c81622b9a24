"""Lock sessions as the managers see them: keepalives, and which locks have expired.

Theory of operation
-------------------
A driver that holds volume locks (see :mod:`lamina.mgmt.clustermap`) keeps its
*session* alive by sending a keepalive to every manager well within the session timeout
(the answer tells the timeout and the locks the session holds).  Each manager notes, in
memory only, when it last heard from each session (:class:`SessionTable`).  An acquire
counts as a keepalive at the manager that took it, and the first time a manager sees a
grant in its map counts as one too, so a lock granted through another manager is given
a full timeout here before anyone judges it.

Only the Raft leader acts on what it heard: once a second it proposes ReleaseLock for
every lock whose session has been silent at this manager for longer than the timeout
(:func:`expired_locks`), counting from the later of the last keepalive and the moment
this manager became leader.  A new leader has heard nothing yet, so it gives every
holder a full timeout; nothing here is replicated, which is why drivers send keepalives
to every manager, not only to the leader.

The release is an ordinary map change: it raises the volume's fence, and the leader
publishes the new epoch only once every storage server of the volume knows it, so the
writes the expired holder still has in flight are refused STALE before anyone else may
take the lock and write (DESIGN sections 6 and 9).  A holder that was merely slow learns
it at its next keepalive (the lock is no longer listed) or from STALE.

Forgetting a record older than the timeout changes no decision (it would count from a
time already more than a timeout ago, or from the leader's start, which is later), so
the table keeps only sessions heard from recently.  Times are seconds on the manager's
monotonic clock, passed in: no clock is read here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lamina.mgmt import clustermap as cm

#: how often the leader looks for expired sessions, in seconds
EXPIRY_PERIOD = 1.0


def locks_held(cmap: cm.ClusterMap, session: str) -> list[str]:
    """Names of the volumes whose lock ``session`` holds in ``cmap``, sorted."""
    return sorted(
        name
        for name, volume in cmap.volumes.items()
        if volume.lock is not None and volume.lock.session == session
    )


def expired_locks(
    cmap: cm.ClusterMap,
    last_seen: Mapping[str, float],
    leader_since: float,
    now: float,
    timeout: float,
) -> list[tuple[str, cm.Lock]]:
    """(volume name, lock) of every lock in ``cmap`` whose session was last heard from
    more than ``timeout`` before ``now``, counting from the later of its last keepalive
    (``last_seen``) and ``leader_since``; by volume name."""
    expired = []
    for name in sorted(cmap.volumes):
        lock = cmap.volumes[name].lock
        if lock is None:
            continue
        heard = max(last_seen.get(lock.session, leader_since), leader_since)
        if now - heard > timeout:
            expired.append((name, lock))
    return expired


@dataclass
class SessionTable:
    """When this manager last heard from each session (keepalives and grants)."""

    timeout: float
    last_seen: dict[str, float] = field(default_factory=dict)
    granted: frozenset[tuple[str, str]] = frozenset()  # (volume, session) locks last seen

    def keepalive(self, session: str, now: float) -> None:
        self.last_seen[session] = max(now, self.last_seen.get(session, now))

    def observe(self, cmap: cm.ClusterMap, now: float) -> None:
        """Count every lock grant seen in ``cmap`` for the first time as a keepalive of
        its session, and forget records older than the timeout (they decide nothing)."""
        granted = frozenset(
            (name, volume.lock.session)
            for name, volume in cmap.volumes.items()
            if volume.lock is not None
        )
        for _, session in sorted(granted - self.granted):
            self.keepalive(session, now)
        self.granted = granted
        cutoff = now - self.timeout
        for session in [s for s, t in self.last_seen.items() if t < cutoff]:
            del self.last_seen[session]

    def expired(
        self, cmap: cm.ClusterMap, leader_since: float, now: float
    ) -> list[tuple[str, cm.Lock]]:
        """The locks of ``cmap`` whose sessions have expired (see :func:`expired_locks`)."""
        return expired_locks(cmap, self.last_seen, leader_since, now, self.timeout)

"""The epoch comparator [0028], as pure code.

Every data request carries the epoch of the map its sender used.  A request older than
the volume's fence epoch (the last epoch at which anything about the volume changed) is
refused STALE with the current epoch, so the sender refetches the map.  A request newer
than anything the server knows means the server missed an update: it catches up from the
managers before deciding.  A server without a valid lease refuses everything (NO_LEASE);
that check comes first, because a server without a lease may not know the fences.
"""

from __future__ import annotations

from enum import Enum


class Verdict(Enum):
    OK = "ok"
    STALE = "stale"
    AHEAD = "ahead"  # the server must catch up before deciding
    NO_LEASE = "no_lease"


def compare(request_epoch: int, server_epoch: int, fence_epoch: int, lease_valid: bool) -> Verdict:
    if not lease_valid:
        return Verdict.NO_LEASE
    if request_epoch < fence_epoch:
        return Verdict.STALE
    if request_epoch > server_epoch:
        return Verdict.AHEAD
    return Verdict.OK

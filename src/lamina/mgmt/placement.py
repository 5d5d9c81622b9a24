"""Where the copies of a new layer go, as pure code [0031].

Theory of operation
-------------------
A layer's placement is a tuple of ``stripe`` partitions; page ``p`` lives on partition
``p mod stripe``.  A partition is the ordered tuple of the ``replicas`` servers holding the
copies of its pages: that order is the copy order and the bit order of the sync masks.

:func:`place` fills the partitions one after the other, and each partition copy by copy,
greedily: the next copy goes to the eligible server whose fill ``(copies + 1) / capacity``
would be lowest, where ``copies`` is what the server already holds (``load``) plus what this
placement gave it so far; ties go to the smaller server id.  A server is eligible if the
partition does not hold it yet and, when zones are in force, holds no server of its zone.
Zones are in force when any candidate has a non-empty zone; the zone ``""`` then counts as
one zone like any other (servers without a zone share it).

What follows from the rule (and what the tests check):

* each pick makes exactly one server (one zone) ineligible for the rest of its partition,
  so the greedy fill never gets stuck: a placement exists iff there are at least
  ``replicas`` candidates (``replicas`` zones when zones are in force);
* with equal capacities, no zones and no prior load, the copies per server differ by at
  most one; a server of higher capacity never gets fewer copies than one of lower
  capacity in its zone (no prior load); of two equal servers in one zone, the one with
  more prior load never receives more new copies;
* the result depends only on the candidates as a set, ``stripe``, ``replicas`` and
  ``load``: the candidates are sorted by id first.

Which servers are candidates is the caller's choice (the cluster map passes its ``up``
servers).  The fills are compared exactly, by cross-multiplication, never as floats.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lamina.errors import ErrorCode, LaminaError

if TYPE_CHECKING:
    from lamina.mgmt.clustermap import Server

Placement = tuple[tuple[str, ...], ...]


class PlacementError(LaminaError):
    """No placement satisfies the request; the message says why."""

    code = ErrorCode.BAD_REQUEST


def zones_in_force(servers: Sequence[Server]) -> bool:
    """Whether copies of a partition must sit in distinct zones among ``servers``."""
    return any(s.zone for s in servers)


def _zone_names(zones: set[str]) -> str:
    return ", ".join(repr(z) for z in sorted(zones))


def check_feasible(servers: Sequence[Server], replicas: int) -> None:
    """Raise :class:`PlacementError` unless partitions of ``replicas`` copies fit ``servers``."""
    if replicas < 1:
        raise PlacementError(f"a partition needs at least one copy, not {replicas}")
    if len(servers) < replicas:
        raise PlacementError(
            f"{replicas} copies per partition need {replicas} servers, "
            f"only {len(servers)} available"
        )
    if zones_in_force(servers):
        zones = {s.zone for s in servers}
        if len(zones) < replicas:
            raise PlacementError(
                f"{replicas} copies per partition need {replicas} distinct zones, "
                f"the servers span only {len(zones)} ({_zone_names(zones)})"
            )


def place(
    servers: Sequence[Server], stripe: int, replicas: int, load: Mapping[str, int]
) -> Placement:
    """``stripe`` partitions of ``replicas`` distinct servers each, spread by capacity.

    ``load`` maps a server id to the copies it already holds (missing ids hold none).
    Raises :class:`PlacementError` if the request cannot be met.
    """
    if stripe < 1:
        raise PlacementError(f"a layer needs at least one partition, not {stripe}")
    candidates = sorted(servers, key=lambda s: s.id)
    for prev, cur in itertools.pairwise(candidates):
        if prev.id == cur.id:
            raise PlacementError(f"server {cur.id} is listed twice")
    for s in candidates:
        if s.capacity < 1:
            raise PlacementError(f"server {s.id} has no capacity ({s.capacity})")
        if load.get(s.id, 0) < 0:
            raise PlacementError(f"server {s.id} has a negative load ({load[s.id]})")
    check_feasible(candidates, replicas)
    zoned = zones_in_force(candidates)
    copies = {s.id: load.get(s.id, 0) for s in candidates}
    partitions: list[tuple[str, ...]] = []
    for _ in range(stripe):
        chosen: list[str] = []
        used_zones: set[str] = set()
        for _ in range(replicas):
            best: Server | None = None
            for s in candidates:
                if s.id in chosen or (zoned and s.zone in used_zones):
                    continue
                # (copies[s] + 1) / s.capacity < (copies[best] + 1) / best.capacity
                if (
                    best is None
                    or (copies[s.id] + 1) * best.capacity < (copies[best.id] + 1) * s.capacity
                ):
                    best = s
            assert best is not None, "check_feasible guarantees an eligible server"
            chosen.append(best.id)
            used_zones.add(best.zone)
            copies[best.id] += 1
        partitions.append(tuple(chosen))
    return tuple(partitions)

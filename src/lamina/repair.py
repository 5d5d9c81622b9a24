"""The repair core: what to do with the copies of one page, as pure code.

Theory of operation
-------------------
Every resynchronisation, whoever runs it (the driver before it reads a copy whose mask
does not vouch for the others, the manager's worker after an outage, the scrub after a
checksum mismatch, the simulation in ``tests/sim``), takes the same decisions from the
same evidence: the STATUS of each copy, ``(state, mask, generation, flags)``, and which
copies may be copied from.  :func:`plan` turns that evidence into a :class:`Plan`; the
caller only carries it out (READ the source at its generation, WRITE each target
conditionally at its generation with ``fua``, FLUSH the other live copies, the source
among them, so that every byte the new masks vouch for is on disk, then MARK_CLEAN every
live copy with ``Plan.mask``, the source last) and decides policy (deferral, throttling, retries).
Nothing here does I/O or reads a clock.

The rules, and why:

- *Agree*: nothing to do when every live copy vouches for every live copy and all hold
  the same kind of page (all data, all zeros or all absent): dirt in their masks is then
  only about copies that are not live.
- *Source*: among the copies that may be copied from (``up`` and not being filled; when
  none is, the ones :func:`sources` names: those up last when every copy restarted, or
  a filling copy that holds the page and is up), minus the ``bad`` ones (a
  checksum failed there), the first in partition order that holds the page and that no
  other copy has disowned; failing that, the first that holds it
  (:func:`lamina.storage.syncmask.authoritative`).  A mask bit vouches for durable bytes
  only (docs/protocol.md, "When a mask bit comes back"), so a copy that lost power never
  wins over one that kept a write it lost.
- *Targets*: the live copies other than the source that may differ from it: a bad copy,
  one whose checksum differs (scrub), or, by the masks, one in another state, one that
  disowns the source, or one some live copy disowns.
- *Writes in flight*: a target of a volume's top layer whose STATUS says ``WRITING`` has
  a client write on its way that the source may not hold yet: the plan says ``WAIT``
  (the driver, which is the only writer and waited for its own writes, asks not to).
- *Lost*: no source, but a live copy holds the page in bytes that failed their checksums
  (:func:`lost`): nothing sound is left to copy from.  The driver fails reads of it at
  once, the worker reports it and stops repairing it (docs/cli.md, ``lamina status``).
- *Clean mask*: every live copy vouched for; for copies that are not live, whatever
  evidence any live copy held against them is kept (:func:`syncmask.clean_mask`).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from lamina.storage.syncmask import authoritative, bits, clean_mask

__all__ = [
    "Plan", "Status", "Verdict", "agree", "clean_mask", "lost", "needs_copy", "plan", "sources",
]  # fmt: skip
from lamina.wire import messages as m
from lamina.wire.messages import PageState

#: STATUS of one copy: (state, mask, generation, flags)
Status = tuple[int, int, int, int]

_KINDS = ({PageState.PRESENT}, {PageState.ZERO}, {PageState.ABSENT})


class Verdict(enum.Enum):
    AGREE = "agree"  # the live copies agree: nothing to do
    NO_SOURCE = "no source"  # no copy that may be copied from holds the page
    WAIT = "wait"  # a target has a client write in flight: look again later
    REPAIR = "repair"  # copy the source to the targets, then mark every live copy clean


@dataclass(frozen=True, slots=True)
class Plan:
    verdict: Verdict
    source: int | None = None
    targets: tuple[int, ...] = ()
    #: the mask MARK_CLEAN gives every live copy
    mask: int = 0
    #: the generation each live copy must still be at when it is written or marked
    generations: Mapping[int, int] = field(default_factory=dict)

    @property
    def mark_order(self) -> list[int]:
        """The copies to MARK_CLEAN, the source last (so a repair cut short leaves the
        source still disowning the copies it may not have reached)."""
        return [i for i in self.generations if i != self.source] + (
            [] if self.source is None else [self.source]
        )


def agree(statuses: Mapping[int, Status], live: Sequence[int]) -> bool:
    """Whether the live copies vouch for each other and hold the same kind of page."""
    need = bits(live)
    if any(statuses[i][1] & need != need for i in live):
        return False
    states = {statuses[i][0] for i in live}
    return any(states <= kind for kind in _KINDS)


def lost(statuses: Mapping[int, Status], live: Sequence[int], bad: Collection[int] = ()) -> bool:
    """Whether a page with no source (``Verdict.NO_SOURCE``) is *lost*: a live copy holds
    it, but only in bytes that failed their checksums (quarantined, or ``bad``), so
    nothing sound is left to copy from and a read of it can only fail."""
    return any(i in bad or statuses[i][0] == PageState.QUARANTINED for i in live)


def sources(
    statuses: Mapping[int, Status],
    live: Sequence[int],
    copies: int,
    *,
    up: Collection[int] = (),
    filling: Collection[int] = (),
    layer_filling: bool = False,
    up_until: Mapping[int, int] | None = None,
) -> list[int]:
    """The copies a repair of one page may copy from.

    ``statuses``: the STATUS of (at least) every live copy.  ``live``: the copies on
    live servers, in partition order.  ``copies``: how many copies the partition has.
    ``up``: the copies whose servers are ``up``.  ``filling``: the copies of this
    partition being filled; ``layer_filling``: some copy of the layer is.
    ``up_until``: copy -> the epoch its server stopped being up.  The *trusted* copies
    are the live ones ``up`` and not being filled (the ones a read may use).

    - Some copy is trusted: the trusted ones.
    - None is, and a copy that is not being filled is not live: none (the page waits; a
      copy that is down may hold writes the live ones missed).
    - None is, every copy is live and nothing of the layer is filled (all restarted, or
      the last up copy was declared down too): the copies whose servers were up last.
      A copy whose server stopped earlier missed the writes acknowledged after that,
      and its mask may still vouch for the others or be disowned only as much as theirs
      (a write whose tokens never came back): partition order would then pick it as
      often as not.  Copies that stopped at the same epoch were up together; their
      masks say which holds what.
    - None is, every copy not being filled is live and this partition is being filled
      (its only complete copies came back ``recovering`` while the new one was being
      filled): no write went out since no copy may be read (the driver's rule), so the
      pages the filling copies hold are what the complete copies held, or newer (a
      write the complete copies lost to a power cut, that the filling copy kept):

      - a filling copy that holds the page (data or zeros) and whose server is ``up`` is
        the source;
      - one that holds it, or may (its server is down), but whose server is not ``up``:
        none, the page waits (its bytes may be older than a write it missed while it
        was away);
      - no filling copy holds it: the complete copies whose servers were up last, as
        above (the fill has not reached the page yet; the repair fills it).

      Without this the partition has no source at all: the fill copies only from a
      trusted copy, and the recovering copies are never vouched for (their only peers
      are being filled), so the partition would never have a readable copy again.
    - Otherwise (another partition of the layer is being filled): none.
    """
    trusted = [i for i in live if i in up and i not in filling]
    if trusted:
        return trusted
    complete = [i for i in range(copies) if i not in filling]
    if any(i not in live for i in complete):
        return []
    if filling:
        holders = [
            i
            for i in sorted(filling)
            if i not in live or statuses[i][0] in (PageState.PRESENT, PageState.ZERO)
        ]
        if holders:
            return [] if any(i not in up for i in holders) else holders
    elif layer_filling:
        return []
    if up_until:
        last = max(up_until.get(i, 0) for i in complete)
        return [i for i in complete if up_until.get(i, 0) == last]
    return complete


def needs_copy(statuses: Mapping[int, Status], live: Sequence[int], source: int, t: int) -> bool:
    """Whether copy ``t`` may differ from copy ``source``, by their masks and states."""
    state, mask, *_ = statuses[t]
    if state != statuses[source][0] or not mask & (1 << source):
        return True
    return any(not statuses[k][1] & (1 << t) for k in live)


def plan(
    statuses: Mapping[int, Status],
    live: Sequence[int],
    trusted: Sequence[int],
    *,
    top: bool,
    bad: Collection[int] = (),
    digests: Mapping[int, Hashable] | None = None,
    wait_for_writes: bool = True,
) -> Plan:
    """The plan for one page.

    ``statuses``: the STATUS of (at least) every live copy.  ``live``: the copies on
    live servers, in partition order.  ``trusted``: those a repair may copy from (see
    :func:`sources`).  ``top``: the page is in the volume's top layer (the only one that
    takes client writes).  ``bad``: copies whose bytes failed a checksum: never a source,
    always a target.  ``digests``: the scrub's checksums per copy; when given, a copy is a
    target exactly when its digest differs from the source's (or it is bad).
    ``wait_for_writes``: say WAIT for a target with a client write in flight.
    """
    bad = frozenset(bad)
    if not bad and (
        len({digests.get(i) for i in live}) <= 1 if digests is not None else agree(statuses, live)
    ):
        return Plan(Verdict.AGREE)
    source = authoritative({i: statuses[i][:2] for i in trusted if i not in bad})
    if source is None:
        return Plan(Verdict.NO_SOURCE)
    if digests is not None:
        targets = tuple(
            t for t in live if t != source and (t in bad or digests.get(t) != digests[source])
        )
    else:
        targets = tuple(
            t for t in live if t != source and (t in bad or needs_copy(statuses, live, source, t))
        )
    if wait_for_writes and top and any(statuses[t][3] & m.WRITING for t in targets):
        return Plan(Verdict.WAIT, source, targets)
    return Plan(
        Verdict.REPAIR,
        source,
        targets,
        clean_mask([statuses[i][1] for i in live], live),
        {i: statuses[i][2] for i in live},
    )

"""Sync-mask episodes of one page copy [0040]-[0047], as pure code.

Theory of operation
-------------------
Each copy of a page keeps a mask with one bit per copy: bit j set means "as far as this
copy knows, copy j holds the same data".  A write to copy i carries a clear mask ``c``
(the other copies' bits cleared: they may miss this write) and a restore mask ``r``
(the bits of the copies the driver sent the write to).

Writes come in *episodes*.  An episode starts with a write that finds none pending; it
records ``base`` = the mask at that moment.  Every write of the episode ANDs the mask
with its clear mask (the caller makes that durable before the data is applied) and ANDs
its restore mask into ``acc``.  A write is *confirmed* when its token comes back, which
the driver sends only after every copy acknowledged it.  When the last pending write of
the episode is confirmed, ``mask |= base & acc``.  So a write restores only bits that were
set before its episode began, and only once every write of the episode reached every
copy it was sent to.  A page whose episode never completes stays dirty until a
resynchronisation marks it clean (``mark_clean``), which also ends the episode.

The functions here take and return immutable values; the storage service keeps the
episode of each page and makes mask decreases durable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lamina.wire.messages import PageState

FULL = 0xFFFFFFFF


#: an episode tracking more unconfirmed writes than this stops tracking them (it is stuck)
MAX_PENDING = 4096

#: A driver confirms the tokens of a write attempt only if every copy it was sent to
#: answered within this many seconds of sending it; a slower attempt counts as failed and
#: is redone.  So a write whose token a copy has held unconfirmed for longer than
#: ``IN_FLIGHT`` either never completes, or reached every other copy long ago: a
#: resynchronisation that reads another copy after that holds it.
WRITE_ATTEMPT_LIMIT = 5.0
#: seconds an unconfirmed token of a client write marks its page copy as being written
#: (``messages.WRITING``): must exceed ``WRITE_ATTEMPT_LIMIT`` with room for clock rates
IN_FLIGHT = 3 * WRITE_ATTEMPT_LIMIT


@dataclass(slots=True)
class Episode:
    """One episode of a page copy.  Mutable (a hot page must not copy a set per write);
    the functions below own every change to it.  A *stuck* episode lost track of some
    token (too many pending): no confirmation can end it, only a resynchronisation."""

    base: int
    acc: int
    pending: set[int] | frozenset[int]
    stuck: bool = False


def begin_write(
    mask: int, episode: Episode | None, clear: int, restore: int, token: int
) -> tuple[int, Episode]:
    """Mask and episode after a write with ``clear``/``restore`` masks arrives.

    The returned mask must be durable before the write's data is applied.  (Later writes
    of an episode usually clear nothing new; one that does, e.g. a write redone without
    a failed copy, clears those bits too.)
    """
    if episode is None:
        return mask & clear, Episode(mask, restore, {token})
    episode.acc &= restore
    if not episode.stuck:
        if len(episode.pending) >= MAX_PENDING:
            abandon(episode)
        else:
            pending = episode.pending
            if not isinstance(pending, set):
                pending = episode.pending = set(pending)
            pending.add(token)
    return mask & clear, episode


def confirm(mask: int, episode: Episode | None, token: int) -> tuple[int, Episode | None]:
    """Mask and episode after ``token`` is confirmed; unknown tokens change nothing."""
    if episode is None or episode.stuck or token not in episode.pending:
        return mask, episode
    pending = episode.pending
    if not isinstance(pending, set):
        pending = episode.pending = set(pending)
    pending.discard(token)
    if pending:
        return mask, episode
    return mask | (episode.base & episode.acc), None


def abandon(episode: Episode) -> None:
    """Stop tracking the episode's tokens: it ends only by a resynchronisation."""
    episode.stuck = True
    episode.pending = set()


def is_clean(mask: int) -> bool:
    return mask == FULL


def clear_mask(copy_index: int, copies: int) -> int:
    """The clear mask a driver sends to copy ``copy_index`` of ``copies``."""
    others = ((1 << copies) - 1) & ~(1 << copy_index)
    return FULL & ~others


def restore_mask(written: frozenset[int] | set[int], copies: int) -> int:
    """The restore mask for a write sent to the copies in ``written`` of ``copies``."""
    missing = ((1 << copies) - 1) & ~sum(1 << i for i in written)
    return FULL & ~missing


# --- resynchronisation choices (driver and background worker) -----------------------


def bits(indices: Sequence[int] | set[int] | frozenset[int]) -> int:
    """The mask with the bits of ``indices`` set."""
    out = 0
    for i in indices:
        out |= 1 << i
    return out


def needs_resync(mask: int, readable: Sequence[int]) -> bool:
    """True when a copy answering with ``mask`` does not vouch for every readable copy:
    some write may have reached one copy and not another (an unfinished episode)."""
    need = bits(readable)
    return mask & need != need


def authoritative(
    statuses: Mapping[int, tuple[int, int]], exclude: frozenset[int] = frozenset()
) -> int | None:
    """The copy a resynchronisation copies from, given ``{copy index: (state, mask)}``
    of the readable copies: the first, in partition order, that holds the page and that
    no other readable copy has disowned in its mask; failing that (two copies that
    disowned each other: a write was never acknowledged, either is right) the first that
    holds the page.  ``None`` when no copy holds it (nothing to synchronise)."""
    holders = [
        i
        for i in sorted(statuses)
        if i not in exclude and statuses[i][0] in (PageState.PRESENT, PageState.ZERO)
    ]
    for i in holders:
        if all(mask & (1 << i) for k, (_, mask) in statuses.items() if k != i):
            return i
    return holders[0] if holders else None


def clean_mask(masks: Sequence[int], readable: Sequence[int]) -> int:
    """The mask a resynchronised page gets: every readable copy vouched for, and for the
    copies that are not readable (down, recovering) whatever evidence any readable copy
    held against them kept."""
    up = bits(readable)
    evidence = FULL
    for mask in masks:
        evidence &= mask
    return (evidence & ~up) | up

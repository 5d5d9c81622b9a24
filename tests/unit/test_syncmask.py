"""The episode algebra of sync masks (lamina.storage.syncmask).

The model: ``n`` copies of one page, each keeping its own mask and episode.  A write goes
to a subset of the copies; at copy ``i`` it carries a clear mask built with
``restore_mask(S | {i}, n)`` for a random subset ``S`` (``clear_mask(i, n)`` is the case
``S = {}``) and a restore mask ``restore_mask(R, n)`` for a random subset ``R``.  Tokens are
confirmed in random order, some twice, some never, and unknown tokens arrive too.

The test keeps its own account of each copy's episode (the mask when it began, the clear
and restore masks of its writes, the tokens not yet confirmed) and checks, after every
step, the closed form of the rule:

* while a write of the episode is unconfirmed:  ``mask == before & C``
* when the last write is confirmed:              ``mask == (before & C) | (before & R)``

where ``before`` is the mask when the episode began, ``C`` the AND of the episode's clear
masks and ``R`` the AND of its restore masks.  (``base`` of the episode is ``before``: no
one else changes the mask inside these functions.)
"""

from __future__ import annotations

import functools
import itertools
import operator
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from lamina.storage.syncmask import (
    FULL,
    Episode,
    begin_write,
    clear_mask,
    confirm,
    is_clean,
    restore_mask,
)

MAX_COPIES = 6
masks = st.integers(min_value=0, max_value=FULL)
start_masks = st.one_of(st.just(FULL), masks)


def and_all(values: list[int]) -> int:
    return functools.reduce(operator.and_, values, FULL)


def bits(subset: frozenset[int]) -> int:
    return sum(1 << i for i in subset)


# --- (f) the helpers -------------------------------------------------------------------


@given(copies=st.integers(1, 32), data=st.data())
def test_clear_mask_keeps_own_bit_and_clears_the_other_copies(
    copies: int, data: st.DataObject
) -> None:
    """clear_mask(i, n) has bit i set, every other copy's bit cleared and bits >= n set."""
    i = data.draw(st.integers(0, copies - 1))
    c = clear_mask(i, copies)
    for j in range(32):
        assert bool(c >> j & 1) == (j == i or j >= copies), j
    assert 0 <= c <= FULL


@given(copies=st.integers(1, 32), data=st.data())
def test_restore_mask_sets_exactly_the_written_copies(copies: int, data: st.DataObject) -> None:
    """restore_mask(W, n) has the bits of W and of positions >= n set, the rest cleared."""
    written = data.draw(st.frozensets(st.integers(0, copies - 1)))
    r = restore_mask(written, copies)
    for j in range(32):
        assert bool(r >> j & 1) == (j in written or j >= copies), j
    assert restore_mask(set(written), copies) == r
    assert 0 <= r <= FULL


def test_helper_examples() -> None:
    """The helpers give the documented masks for small, hand-checked cases."""
    assert clear_mask(0, 1) == FULL
    assert clear_mask(0, 2) == FULL & ~0b10
    assert clear_mask(1, 3) == FULL & ~0b101
    assert restore_mask({0, 1, 2}, 3) == FULL
    assert restore_mask({0, 2}, 3) == FULL & ~0b010
    assert restore_mask(set(), 2) == FULL & ~0b11
    assert clear_mask(2, 4) == restore_mask({2}, 4)
    assert is_clean(FULL)
    assert not is_clean(FULL & ~1)


# --- the copy model -------------------------------------------------------------------


@dataclass
class EpisodeRecord:
    before: int
    clears: list[int] = field(default_factory=list)
    restores: list[int] = field(default_factory=list)
    outstanding: set[int] = field(default_factory=set)


@dataclass
class Copy:
    mask: int
    episode: Episode | None = None
    record: EpisodeRecord | None = None
    closed: int = 0  # episodes that ended by confirmation


@dataclass(frozen=True)
class Write:
    targets: frozenset[int]
    extra_clear: tuple[frozenset[int], ...]  # per copy: the copies its clear mask keeps
    restored: frozenset[int]


@dataclass(frozen=True)
class Confirm:
    pick: int  # index (mod count) into the tokens issued so far


@dataclass(frozen=True)
class Unknown:
    token: int


Action = Write | Confirm | Unknown


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[int], list[Action]]:
    n = draw(st.integers(1, MAX_COPIES))
    subsets = st.frozensets(st.integers(0, n - 1))
    write = st.builds(
        Write,
        targets=st.frozensets(st.integers(0, n - 1), min_size=1),
        extra_clear=st.tuples(*[subsets] * n),
        restored=st.one_of(st.just(frozenset(range(n))), subsets),
    )
    action: st.SearchStrategy[Action] = st.one_of(
        write,
        st.builds(Confirm, st.integers(0, 1000)),
        st.builds(Confirm, st.integers(0, 1000)),
        st.builds(Unknown, st.integers(1 << 50, 1 << 51)),
    )
    initial = draw(st.lists(start_masks, min_size=n, max_size=n))
    return n, initial, draw(st.lists(action, max_size=40))


def check_open(copy: Copy) -> None:
    rec = copy.record
    assert rec is not None
    assert copy.episode is not None
    cleared = and_all(rec.clears)
    # (b) nothing cleared by the episode (or before it) comes back while it is open
    assert copy.mask & ~cleared == 0
    assert copy.mask & ~rec.before == 0
    assert copy.mask == rec.before & cleared


def check_closed(copy: Copy, rec: EpisodeRecord, n: int) -> None:
    cleared = and_all(rec.clears)
    restored = and_all(rec.restores)
    # (a) the closed form of the rule
    assert copy.mask == (rec.before & cleared) | (rec.before & restored)
    assert copy.mask & ~rec.before == 0, "restored a bit that was clear when the episode began"
    # (c) a copy excluded by any restore mask stays cleared if the episode or its past cleared it
    for j in range(n):
        excluded = any(not r >> j & 1 for r in rec.restores)
        was_cleared = not rec.before >> j & 1 or not cleared >> j & 1
        if excluded and was_cleared:
            assert not copy.mask >> j & 1, f"bit {j} came back"
    # (d) a write to every copy, confirmed everywhere, restores the mask it found
    if all(r == restore_mask(frozenset(range(n)), n) for r in rec.restores):
        assert copy.mask == rec.before


@settings(max_examples=400)
@given(scenarios())
def test_episodes_follow_the_closed_form(scenario: tuple[int, list[int], list[Action]]) -> None:
    """Mask is before & C while an episode is open and (before & C) | (before & R) once closed."""
    n, initial, actions = scenario
    copies = [Copy(mask) for mask in initial]
    issued: list[tuple[int, int]] = []  # (copy, token) in issue order
    tokens = itertools.count(1)
    for action in actions:
        if isinstance(action, Write):
            r = restore_mask(action.restored, n)
            for i in sorted(action.targets):
                copy = copies[i]
                c = restore_mask(action.extra_clear[i] | {i}, n)
                token = next(tokens)
                if copy.record is None:
                    copy.record = EpisodeRecord(copy.mask)
                copy.record.clears.append(c)
                copy.record.restores.append(r)
                copy.record.outstanding.add(token)
                copy.mask, copy.episode = begin_write(copy.mask, copy.episode, c, r, token)
                issued.append((i, token))
                check_open(copy)
        elif isinstance(action, Confirm):
            if not issued:
                continue
            i, token = issued[action.pick % len(issued)]
            copy = copies[i]
            rec = copy.record
            if rec is None or token not in rec.outstanding:
                # (e) a duplicate (or a token of an episode that already ended) changes nothing
                before = (copy.mask, copy.episode)
                assert confirm(copy.mask, copy.episode, token) == before
                continue
            copy.mask, copy.episode = confirm(copy.mask, copy.episode, token)
            rec.outstanding.discard(token)
            if rec.outstanding:
                check_open(copy)
            else:
                assert copy.episode is None
                copy.record = None
                copy.closed += 1
                check_closed(copy, rec, n)
        else:
            # (e) a token nobody issued changes nothing, at any copy
            for copy in copies:
                assert confirm(copy.mask, copy.episode, action.token) == (copy.mask, copy.episode)
    for copy in copies:
        assert (copy.episode is None) == (copy.record is None)
        if copy.record is not None:
            check_open(copy)  # tokens that never came: the episode stays open, the page dirty


@settings(max_examples=200)
@given(
    n=st.integers(1, MAX_COPIES),
    writes=st.integers(1, 8),
    initial=start_masks,
    data=st.data(),
)
def test_writes_to_all_copies_confirmed_restore_the_mask(
    n: int, writes: int, initial: int, data: st.DataObject
) -> None:
    """(d) Writes sent to every copy and all confirmed leave each copy's mask as it was."""
    everyone = frozenset(range(n))
    masks_ = [initial] * n
    episodes: list[Episode | None] = [None] * n
    pending: list[tuple[int, int]] = []
    token = 0
    for _ in range(writes):
        for i in range(n):
            token += 1
            masks_[i], episodes[i] = begin_write(
                masks_[i], episodes[i], clear_mask(i, n), restore_mask(everyone, n), token
            )
            pending.append((i, token))
    for i in range(n):
        assert masks_[i] == initial & clear_mask(i, n)
    order = data.draw(st.permutations(pending))
    for k, (i, t) in enumerate(order):
        masks_[i], episodes[i] = confirm(masks_[i], episodes[i], t)
        if any(j == i for j, _ in order[k + 1 :]):
            assert masks_[i] == initial & clear_mask(i, n), "restored before the last token"
    assert masks_ == [initial] * n
    assert episodes == [None] * n


@given(initial=masks, c=masks, r=masks)
def test_one_write_restores_only_what_it_found(initial: int, c: int, r: int) -> None:
    """(a) For a one-write episode the mask ends as (m & c) | (m & r): never above m."""
    mask, episode = begin_write(initial, None, c, r, 7)
    assert mask == initial & c
    assert episode == Episode(initial, r, frozenset({7}))
    mask2, episode2 = confirm(mask, episode, 7)
    assert episode2 is None
    assert mask2 == (initial & c) | (initial & r)
    assert mask2 & ~initial == 0


@given(initial=masks, c1=masks, c2=masks, r1=masks, r2=masks)
def test_later_clear_inside_an_episode_is_not_undone_by_its_restore(
    initial: int, c1: int, c2: int, r1: int, r2: int
) -> None:
    """(a) A later write's clears count even though the episode's base was taken before it."""
    ep: Episode | None
    mask, ep = begin_write(initial, None, c1, r1, 1)
    mask, ep = begin_write(mask, ep, c2, r2, 2)
    assert mask == initial & c1 & c2
    mask, ep = confirm(mask, ep, 2)
    assert mask == initial & c1 & c2  # token 1 still pending
    assert ep is not None
    mask, ep = confirm(mask, ep, 1)
    assert ep is None
    assert mask == (initial & c1 & c2) | (initial & r1 & r2)


@given(initial=masks, c=masks, r=masks, token=st.integers(0, 1 << 63))
def test_confirm_without_episode_or_of_other_token_is_a_no_op(
    initial: int, c: int, r: int, token: int
) -> None:
    """(e) Confirming with no episode, or a token the episode does not hold, changes nothing."""
    assert confirm(initial, None, token) == (initial, None)
    mask, ep = begin_write(initial, None, c, r, token)
    other = token + 1
    assert confirm(mask, ep, other) == (mask, ep)
    mask, ep2 = confirm(mask, ep, token)
    assert ep2 is None
    assert confirm(mask, ep2, token) == (mask, None)  # duplicate


def test_excluded_copy_stays_dirty_example() -> None:
    """(c) A write redone without failed copy 2 leaves bit 2 cleared at the others."""
    n = 3
    everyone = {0, 1, 2}
    ep: Episode | None
    mask, ep = begin_write(FULL, None, clear_mask(0, n), restore_mask(everyone, n), 1)
    # copy 2 did not answer: the write is redone to copies 0 and 1 only; even if both
    # tokens come back, the redone write's restore mask keeps bit 2 cleared
    mask, ep = begin_write(mask, ep, clear_mask(0, n), restore_mask({0, 1}, n), 2)
    mask, ep = confirm(mask, ep, 2)
    assert mask == clear_mask(0, n)
    mask, ep = confirm(mask, ep, 1)
    assert ep is None
    assert mask == FULL & ~bits(frozenset({2}))
    assert not is_clean(mask)

"""The repair core (lamina.repair): the decisions every resynchronisation takes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lamina import repair
from lamina.repair import Status, Verdict
from lamina.storage.syncmask import FULL
from lamina.wire import messages as m
from lamina.wire.messages import PageState

P, Z, A = PageState.PRESENT, PageState.ZERO, PageState.ABSENT


def disown(*copies: int) -> int:
    mask = FULL
    for c in copies:
        mask &= ~(1 << c)
    return mask


def test_copies_that_vouch_for_each_other_agree() -> None:
    statuses: dict[int, Status] = {0: (P, FULL, 4, 0), 1: (P, FULL, 9, 0)}
    assert repair.plan(statuses, [0, 1], [0, 1], top=True).verdict is Verdict.AGREE
    # dirt about a copy that is not live is no reason to repair the live ones
    statuses[0] = (P, disown(2), 4, 0)
    assert repair.plan(statuses, [0, 1], [0, 1], top=True).verdict is Verdict.AGREE


def test_the_copy_that_kept_a_write_is_the_source_not_the_one_that_may_have_lost_it() -> None:
    """Copy 1 holds a write copy 0 may have lost (a power loss before it was durable):
    copy 1 disowns copy 0.  Copy 0's own mask still vouches for copy 1 (its clear came
    from an older episode that ended).  The source is copy 1, copy 0 the target."""
    statuses: dict[int, Status] = {0: (P, FULL, 4, 0), 1: (P, disown(0), 9, 0)}
    plan = repair.plan(statuses, [0, 1], [0, 1], top=True)
    assert plan.verdict is Verdict.REPAIR
    assert plan.source == 1
    assert plan.targets == (0,)
    assert plan.mask == FULL
    assert plan.mark_order == [0, 1]
    assert plan.generations == {0: 4, 1: 9}


def test_a_bad_copy_is_never_the_source_and_always_a_target() -> None:
    statuses: dict[int, Status] = {0: (P, FULL, 4, 0), 1: (P, FULL, 9, 0)}
    plan = repair.plan(statuses, [0, 1], [0, 1], top=True, bad={0})
    assert plan.source == 1
    assert plan.targets == (0,)
    assert repair.plan(statuses, [0, 1], [0, 1], top=True, bad={0, 1}).verdict is (
        Verdict.NO_SOURCE
    )


def test_a_page_with_no_sound_copy_left_is_lost() -> None:
    """No source and a quarantined (or bad) live copy: lost; no source because no copy
    holds the page, or a sound copy left: not lost."""
    q = PageState.QUARANTINED
    statuses: dict[int, Status] = {0: (q, FULL, 4, 0), 1: (q, FULL, 9, 0)}
    assert repair.plan(statuses, [0, 1], [0, 1], top=True).verdict is Verdict.NO_SOURCE
    assert repair.lost(statuses, [0, 1])
    statuses = {0: (P, FULL, 4, 0), 1: (P, FULL, 9, 0)}
    assert repair.lost(statuses, [0, 1], bad={0, 1})
    assert not repair.lost({0: (A, FULL, 0, 0), 1: (A, FULL, 0, 0)}, [0, 1])
    assert (
        repair.plan({0: (q, FULL, 4, 0), 1: (P, FULL, 9, 0)}, [0, 1], [0, 1], top=True).source == 1
    )


def test_a_target_with_a_client_write_in_flight_waits_unless_asked_not_to() -> None:
    statuses: dict[int, Status] = {0: (P, disown(1), 4, 0), 1: (P, FULL, 9, m.WRITING)}
    assert repair.plan(statuses, [0, 1], [0, 1], top=True).verdict is Verdict.WAIT
    # a lower layer takes no client writes; the writer itself does not wait for its own
    assert repair.plan(statuses, [0, 1], [0, 1], top=False).verdict is Verdict.REPAIR
    plan = repair.plan(statuses, [0, 1], [0, 1], top=True, wait_for_writes=False)
    assert plan.verdict is Verdict.REPAIR
    assert plan.targets == (1,)


def test_scrub_digests_decide_the_targets() -> None:
    statuses: dict[int, Status] = {i: (P, FULL, i, 0) for i in range(3)}
    digests = {0: (True, 7), 1: (True, 8), 2: (True, 7)}
    plan = repair.plan(statuses, [0, 1, 2], [0, 1, 2], top=True, digests=digests)
    assert plan.source == 0
    assert plan.targets == (1,)
    same = dict.fromkeys(range(3), (True, 7))
    assert repair.plan(statuses, [0, 1, 2], [0, 1, 2], top=True, digests=same).verdict is (
        Verdict.AGREE
    )


def test_sources_are_the_trusted_copies_or_all_when_every_copy_restarted() -> None:
    held: dict[int, Status] = {0: (P, FULL, 3, 0), 1: (P, FULL, 3, 0)}
    assert repair.sources(held, [0, 1], 2, up=[1]) == [1]
    assert repair.sources(held, [0, 1], 2) == [0, 1]
    assert repair.sources(held, [0, 1], 3) == []  # one copy is still down
    # another partition of the layer is being filled: none (as long as it is)
    assert repair.sources(held, [0, 1], 2, layer_filling=True) == []


def filled(
    statuses: dict[int, Status],
    live: list[int],
    copies: int,
    filling: list[int],
    up: list[int],
    up_until: dict[int, int] | None = None,
) -> list[int]:
    """``repair.sources`` with no trusted copy, for a partition whose ``filling`` copies
    are being filled."""
    return repair.sources(
        statuses, live, copies, up=up, filling=filling, layer_filling=True, up_until=up_until
    )


def test_with_no_readable_copy_an_up_filling_copy_that_holds_the_page_is_the_source() -> None:
    """Copy 0 (the only complete one) came back recovering while copy 1 is being filled
    on an up server.  No write went out since (no copy may be read), so what copy 1
    holds is what copy 0 held, or newer: a write copy 0 lost to a power cut."""
    statuses: dict[int, Status] = {0: (P, FULL, 3, 0), 1: (P, disown(0), 7, 0)}
    assert filled(statuses, [0, 1], 2, [1], [1]) == [1]
    plan = repair.plan(statuses, [0, 1], [1], top=True)
    assert (plan.verdict, plan.source, plan.targets) == (Verdict.REPAIR, 1, (0,))
    # zeros are the page too
    zeros = {**statuses, 1: (Z, FULL, 7, 0)}
    assert filled(zeros, [0, 1], 2, [1], [1]) == [1]
    # the complete copy is down: none (it may hold writes the filling copy missed)
    assert filled(statuses, [1], 2, [1], [1]) == []


def test_a_filling_copy_that_holds_the_page_but_is_not_up_makes_the_page_wait() -> None:
    """The filling copy holds the page but its server is recovering (it was away, and
    may have missed writes the complete copy took), or down (it may hold the page):
    neither it nor the complete copy, which may have lost a write it kept, is a source."""
    statuses: dict[int, Status] = {0: (P, FULL, 3, 0), 1: (P, FULL, 7, 0)}
    assert filled(statuses, [0, 1], 2, [1], []) == []
    assert filled(statuses, [0], 2, [1], []) == []
    # with two filling copies, one holding the page but not up is enough to wait
    three: dict[int, Status] = {**statuses, 2: (P, FULL, 5, 0)}
    assert filled(three, [0, 1, 2], 3, [1, 2], [1]) == []
    assert filled(three, [0, 1, 2], 3, [1, 2], [1, 2]) == [1, 2]


def test_no_filling_copy_holds_the_page_the_complete_copies_up_last_are_sources() -> None:
    """The fill has not reached the page: the complete copies are the sources, those
    whose servers were up last (a repair then fills the page)."""
    statuses: dict[int, Status] = {0: (P, FULL, 3, 0), 1: (P, FULL, 4, 0), 2: (A, FULL, 0, 0)}
    assert filled(statuses, [0, 1, 2], 3, [2], [2]) == [0, 1]
    assert filled(statuses, [0, 1, 2], 3, [2], [2], {0: 9, 1: 5, 2: 9}) == [0]
    plan = repair.plan(statuses, [0, 1, 2], [0], top=True)
    assert (plan.verdict, plan.source) == (Verdict.REPAIR, 0)
    assert 2 in plan.targets
    # whether or not the filling copy's server is up
    assert filled(statuses, [0, 1, 2], 3, [2], []) == [0, 1]
    # a complete copy is down: none
    assert filled(statuses, [0, 2], 3, [2], [2]) == []


status = st.tuples(
    st.sampled_from([P, Z, A]),
    st.integers(0, 7).map(lambda low: (FULL & ~7) | low),
    st.integers(0, 50),
    st.sampled_from([0, m.WRITING]),
)


@given(
    st.lists(status, min_size=2, max_size=3),
    st.data(),
)
def test_every_plan_keeps_the_rules(statuses_list: list[Status], data: st.DataObject) -> None:
    n = len(statuses_list)
    statuses = dict(enumerate(statuses_list))
    live = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1)))
    trusted = [i for i in live if data.draw(st.booleans())]
    bad = data.draw(st.sets(st.sampled_from(live)))
    top = data.draw(st.booleans())
    plan = repair.plan(statuses, live, trusted, top=top, bad=bad)
    if plan.verdict is Verdict.AGREE:
        assert not bad
        assert repair.agree(statuses, live)
        return
    if plan.verdict is Verdict.NO_SOURCE:
        assert not [i for i in trusted if i not in bad and statuses[i][0] in (P, Z)]
        return
    src = plan.source
    assert src is not None
    assert src in trusted
    assert src not in bad
    assert statuses[src][0] in (P, Z)
    assert src not in plan.targets
    assert set(plan.targets) <= set(live)
    assert set(bad) <= set(plan.targets)
    # a source no other copy disowns is chosen whenever one exists
    undisowned = [
        i
        for i in trusted
        if i not in bad
        and statuses[i][0] in (P, Z)
        and all(statuses[k][1] & (1 << i) for k in trusted if k != i)
    ]
    if undisowned:
        assert src == undisowned[0]
    # every live copy that may differ from the source is a target
    for t in live:
        if t != src and (statuses[t][0] != statuses[src][0] or not statuses[t][1] & (1 << src)):
            assert t in plan.targets
    if plan.verdict is Verdict.WAIT:
        assert top
        assert any(statuses[t][3] & m.WRITING for t in plan.targets)
        return
    for i in live:
        assert plan.mask & (1 << i)
    assert plan.mark_order[-1] == src
    assert sorted(plan.mark_order) == live


def test_with_no_copy_up_only_the_copies_up_last_are_sources() -> None:
    """Copy 1's server stopped being up at epoch 9, copy 0's at epoch 5: copy 0 missed the
    writes acknowledged in between, so only copy 1 may be the source, whatever the
    partition order."""
    held: dict[int, Status] = dict.fromkeys(range(3), (P, FULL, 3, 0))
    assert repair.sources(held, [0, 1], 2, up_until={0: 5, 1: 9}) == [1]
    assert repair.sources(held, [0, 1, 2], 3, up_until={0: 9, 1: 5, 2: 9}) == [0, 2]
    # once a copy is up, it is the source as before
    assert repair.sources(held, [0, 1], 2, up=[0], up_until={0: 5, 1: 9}) == [0]

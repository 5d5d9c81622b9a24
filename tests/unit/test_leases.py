"""The leader's view of storage-server leases."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from lamina.mgmt.leases import DRIFT, SLACK, LeaseTable

D = 3.0
OVER = D * (1 + DRIFT) + SLACK


@given(st.floats(0, 1000), st.floats(0, 10 * D))
def test_a_lease_is_over_only_after_its_duration_and_margin(start: float, later: float) -> None:
    """A server granted at t is expired exactly from t + d(1 + drift) + slack on."""
    table = LeaseTable(D)
    table.become_leader(start)
    table.grant("s1", start, epoch=1)
    assume(abs(later - OVER) > 1e-6)  # float sums may round either way at the very edge
    assert table.expired("s1", start + later) == (later > OVER)


@given(st.floats(0, 1000), st.floats(0, 10 * D))
def test_a_new_leader_waits_a_full_lease_for_servers_it_never_granted(
    start: float, later: float
) -> None:
    """Grants of an earlier leader are unknown: nobody is expired before d after election."""
    table = LeaseTable(D)
    table.become_leader(start)
    assume(abs(later - OVER) > 1e-6)
    assert table.expired("s9", start + later) == (later > OVER)


def test_a_server_added_after_the_election_gets_a_lease_to_ask_for_its_first() -> None:
    """A server that joins the map long after the election has never been granted a lease
    and holds none: still it is judged only a full lease after the leader first saw it,
    not at once (it would be marked down before its first LEASE request arrived)."""
    table = LeaseTable(D)
    table.become_leader(0.0)
    table.saw("s1", 0.0)
    table.saw("s3", 500.0)  # added now
    table.saw("s3", 600.0)  # only the first sighting counts
    assert table.expired("s1", 500.0)
    assert not table.expired("s3", 500.0 + OVER / 2)
    assert table.expired("s3", 500.0 + OVER + 0.01)
    table.grant("s3", 500.0 + OVER / 2, epoch=1)
    assert not table.expired("s3", 500.0 + OVER + 0.01)


def test_not_leading_judges_nothing_and_stepping_down_forgets_grants() -> None:
    """A follower never declares a lease over; a leader that steps down starts afresh."""
    table = LeaseTable(D)
    assert not table.expired("s1", 1e9)
    table.become_leader(0.0)
    table.grant("s1", 0.0, 5)
    table.step_down()
    assert not table.expired("s1", 1e9)
    table.become_leader(100.0)
    assert not table.expired("s1", 100.0 + OVER / 2)
    assert table.expired("s1", 100.0 + OVER)


def test_publication_waits_for_acknowledgement_or_expiry() -> None:
    """An epoch may be published once every affected server reported it or lost its lease."""
    table = LeaseTable(D)
    table.become_leader(0.0)
    table.grant("s1", 0.0, epoch=4)
    table.grant("s2", 0.0, epoch=3)
    assert not table.may_publish(4, ["s1", "s2"], 1.0)
    table.grant("s2", 1.0, epoch=4)
    assert table.may_publish(4, ["s1", "s2"], 1.0)
    assert not table.may_publish(5, ["s1", "s2"], 2.0)
    assert table.may_publish(5, ["s1", "s2"], 1.0 + OVER)  # both leases over by then
    assert table.may_publish(5, [], 0.0)


def test_a_new_leader_also_waits_out_its_predecessors_fallback() -> None:
    """With a grace for the deposed leader's fallback, nobody's lease is judged over before
    grace + d after the election, even a server this leader granted meanwhile."""
    table = LeaseTable(D, grace=2.5)
    table.become_leader(0.0)
    table.grant("s1", 0.1, epoch=1)
    for sid in ("s1", "s2"):
        assert not table.expired(sid, 2.5 + OVER - 0.01)
        assert table.expired(sid, 2.5 + OVER + 0.01)
    table.grant("s1", 5.0, epoch=1)  # a grant after the grace counts as usual
    assert not table.expired("s1", 5.0 + OVER - 0.01)
    assert table.expired("s1", 5.0 + OVER + 0.01)

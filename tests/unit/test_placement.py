"""Placement of a new layer's partitions (lamina.mgmt.placement).

The properties are those the module docstring derives from its greedy rule: valid
partitions whenever enough servers (zones) exist and a PlacementError otherwise, an even
spread for equal servers, more copies for more capacity, prior load respected, and a
result that depends on nothing but the inputs.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lamina.errors import LaminaError
from lamina.mgmt.clustermap import Server, ServerState
from lamina.mgmt.placement import Placement, PlacementError, place
from tests.unit.mgmt_strategies import loads, server_lists, zone_choices

stripes = st.integers(1, 24)


def counts(placement: Placement, servers: list[Server]) -> Counter[str]:
    """Copies per server in ``placement``, with a zero for every server that got none."""
    got = Counter(sid for part in placement for sid in part)
    for s in servers:
        got[s.id] += 0
    return got


def feasible_replicas(servers: list[Server]) -> int:
    """The most copies per partition ``servers`` can take."""
    if any(s.zone for s in servers):
        return len({s.zone for s in servers})
    return len(servers)


def server(sid: str, capacity: int = 1, zone: str = "") -> Server:
    return Server(sid, f"{sid}:7000", ServerState.UP, capacity, zone)


@given(servers=server_lists(min_size=1, zones=("",)), stripe=stripes, data=st.data())
def test_partitions_have_replicas_distinct_servers(
    servers: list[Server], stripe: int, data: st.DataObject
) -> None:
    """Without zones there are `stripe` partitions of `replicas` distinct candidate servers."""
    replicas = data.draw(st.integers(1, len(servers)))
    load = data.draw(loads(servers))
    placement = place(servers, stripe, replicas, load)
    ids = {s.id for s in servers}
    assert len(placement) == stripe
    for part in placement:
        assert len(part) == replicas
        assert len(set(part)) == replicas
        assert set(part) <= ids


@given(servers=server_lists(min_size=1, zones=("a", "b", "c", "")), stripe=stripes, data=st.data())
def test_partitions_span_distinct_zones(
    servers: list[Server], stripe: int, data: st.DataObject
) -> None:
    """With zones in force, no two copies of a partition share a server or a zone."""
    if not any(s.zone for s in servers):
        servers = [*servers[:-1], server(servers[-1].id, servers[-1].capacity, "a")]
    replicas = data.draw(st.integers(1, feasible_replicas(servers)))
    placement = place(servers, stripe, replicas, data.draw(loads(servers)))
    zone_of = {s.id: s.zone for s in servers}
    assert len(placement) == stripe
    for part in placement:
        assert len(part) == replicas
        assert len(set(part)) == replicas
        assert len({zone_of[sid] for sid in part}) == replicas


@given(
    servers=server_lists(min_size=1, capacity=st.just(3)),
    stripe=stripes,
    data=st.data(),
)
def test_equal_servers_differ_by_at_most_one_copy(
    servers: list[Server], stripe: int, data: st.DataObject
) -> None:
    """Equal capacities, no zones, no prior load: copies per server differ by at most one."""
    replicas = data.draw(st.integers(1, len(servers)))
    got = counts(place(servers, stripe, replicas, {}), servers)
    assert max(got.values()) - min(got.values()) <= 1
    assert sum(got.values()) == stripe * replicas


@given(
    servers=server_lists(min_size=1, capacity=st.integers(1, 8)),
    zones=zone_choices(),
    stripe=stripes,
    data=st.data(),
)
def test_higher_capacity_never_gets_fewer_copies(
    servers: list[Server], zones: tuple[str, ...], stripe: int, data: st.DataObject
) -> None:
    """No prior load: a server never gets fewer copies than a lower-capacity one of its zone."""
    servers = [server(s.id, s.capacity, data.draw(st.sampled_from(zones))) for s in servers]
    replicas = data.draw(st.integers(1, feasible_replicas(servers)))
    got = counts(place(servers, stripe, replicas, {}), servers)
    for a, b in itertools.permutations(servers, 2):
        if a.zone == b.zone and a.capacity > b.capacity:
            assert got[a.id] >= got[b.id], (a, b, got)


@given(servers=server_lists(min_size=1, capacity=st.integers(1, 8)), stripe=stripes)
def test_single_copies_give_every_server_its_lower_quota(
    servers: list[Server], stripe: int
) -> None:
    """One copy per partition: each server gets at least floor(stripe * its capacity share)."""
    got = counts(place(servers, stripe, 1, {}), servers)
    total = sum(s.capacity for s in servers)
    for s in servers:
        assert got[s.id] >= stripe * s.capacity // total, (s, got)


@given(
    servers=server_lists(min_size=1, capacity=st.just(2)),
    zones=zone_choices(),
    stripe=stripes,
    data=st.data(),
)
def test_more_prior_load_never_receives_more_copies(
    servers: list[Server], zones: tuple[str, ...], stripe: int, data: st.DataObject
) -> None:
    """Of two equal servers in one zone, the one holding more already never receives more."""
    servers = [server(s.id, s.capacity, data.draw(st.sampled_from(zones))) for s in servers]
    replicas = data.draw(st.integers(1, feasible_replicas(servers)))
    load = data.draw(loads(servers))
    got = counts(place(servers, stripe, replicas, load), servers)
    for a, b in itertools.permutations(servers, 2):
        if a.zone == b.zone and load.get(a.id, 0) > load.get(b.id, 0):
            assert got[a.id] <= got[b.id], (a, b, load, got)


@given(
    servers=server_lists(min_size=1, capacity=st.integers(1, 8)),
    zones=zone_choices(),
    stripe=stripes,
    data=st.data(),
)
def test_placement_depends_only_on_its_inputs(
    servers: list[Server], zones: tuple[str, ...], stripe: int, data: st.DataObject
) -> None:
    """The same servers in any order, and the same load, give the same placement."""
    servers = [server(s.id, s.capacity, data.draw(st.sampled_from(zones))) for s in servers]
    replicas = data.draw(st.integers(1, feasible_replicas(servers)))
    load = data.draw(loads(servers))
    first = place(servers, stripe, replicas, load)
    shuffled = data.draw(st.permutations(servers))
    reordered_load = dict(reversed(load.items()))
    assert place(shuffled, stripe, replicas, reordered_load) == first
    assert place(tuple(servers), stripe, replicas, {**load, "not-a-candidate": 5}) == first


@given(
    servers=server_lists(zones=("", "a", "b")),
    stripe=st.integers(-2, 4),
    replicas=st.integers(-1, 9),
)
def test_impossible_requests_raise_placement_error(
    servers: list[Server], stripe: int, replicas: int
) -> None:
    """place succeeds exactly when stripe >= 1 and 1 <= replicas <= servers (zones in force)."""
    possible = stripe >= 1 and 1 <= replicas <= feasible_replicas(servers)
    if possible:
        assert len(place(servers, stripe, replicas, {})) == stripe
    else:
        with pytest.raises(PlacementError) as info:
            place(servers, stripe, replicas, {})
        assert isinstance(info.value, LaminaError)
        assert info.value.message.strip()


@pytest.mark.parametrize(
    ("servers", "stripe", "replicas", "load", "words"),
    [
        ([], 1, 1, {}, "1 servers"),
        ([server("a"), server("b")], 2, 3, {}, "3 servers, only 2"),
        ([server("a", zone="z"), server("b", zone="z")], 1, 2, {}, "distinct zones"),
        ([server("a", zone="z"), server("b")], 1, 3, {}, "3 servers"),
        ([server("a"), server("a")], 1, 1, {}, "listed twice"),
        ([server("a", capacity=0)], 1, 1, {}, "no capacity"),
        ([server("a")], 1, 1, {"a": -1}, "negative load"),
        ([server("a")], 0, 1, {}, "at least one partition"),
        ([server("a")], 1, 0, {}, "at least one copy"),
    ],
)
def test_impossible_request_examples(
    servers: list[Server], stripe: int, replicas: int, load: dict[str, int], words: str
) -> None:
    """Each kind of impossible request raises PlacementError saying what is missing."""
    with pytest.raises(PlacementError, match=words):
        place(servers, stripe, replicas, load)


def test_placement_example() -> None:
    """A hand-checked placement: fills by capacity, prior load first, zones kept apart."""
    servers = [server("s1", 1, "a"), server("s2", 1, "a"), server("s3", 2, "b")]
    assert place(servers, 3, 2, {}) == (("s3", "s1"), ("s2", "s3"), ("s3", "s1"))
    assert place(servers, 1, 2, {"s1": 4}) == (("s3", "s2"),)
    assert place([server("b"), server("a")], 3, 1, {}) == (("a",), ("b",), ("a",))

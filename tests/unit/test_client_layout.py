"""The driver's pure decisions: page extents, copies, sync-mask judgements, the map."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lamina.client.layout import (
    FULL,
    authoritative,
    bits,
    clean_mask,
    needs_resync,
    split,
    volume_view,
)
from lamina.errors import NotFound, ProtocolError
from lamina.wire.messages import PageState

PAGE_SIZES = st.sampled_from([1 << 16, 1 << 17, 1 << 20])


@given(PAGE_SIZES, st.integers(0, 1 << 30), st.integers(0, 1 << 22))
def test_split_covers_the_range_in_order_within_pages(
    page_size: int, offset: int, length: int
) -> None:
    extents = split(offset, length, page_size)
    assert sum(e.length for e in extents) == length
    pos = offset
    for k, e in enumerate(extents):
        assert e.page * page_size + e.offset == pos  # contiguous, in order
        assert e.length > 0
        assert e.offset + e.length <= page_size
        assert e.start == pos - offset
        if 0 < k < len(extents) - 1:
            assert (e.offset, e.length) == (0, page_size)  # middle extents are whole pages
        pos += e.length


def test_split_of_nothing_is_empty() -> None:
    assert split(12345, 0, 1 << 20) == []


@given(st.lists(st.integers(0, 7), max_size=8))
def test_a_mask_vouching_for_every_readable_copy_needs_no_resync(readable: list[int]) -> None:
    assert not needs_resync(FULL, readable)
    assert not needs_resync(bits(readable), readable)
    for i in readable:
        assert needs_resync(FULL & ~(1 << i), readable)


def test_a_copy_not_readable_may_be_disowned_without_a_resync() -> None:
    # copy 1 is down: the writes since cleared its bit; copy 0 alone is read
    assert not needs_resync(FULL & ~0b10, [0])


P, Z, A, T = PageState.PRESENT, PageState.ZERO, PageState.ABSENT, PageState.TOMBSTONE


def test_authoritative_is_the_first_copy_nobody_disowned() -> None:
    # copy 0 missed a write: copy 1 cleared bit 0; copy 0 still vouches for everyone
    statuses = {0: (P, FULL), 1: (P, FULL & ~0b01)}
    assert authoritative(statuses) == 1
    # nobody disowned anyone: the first in partition order
    assert authoritative({0: (P, FULL), 1: (P, FULL)}) == 0
    # they disowned each other (a write that was never acknowledged): the first holder
    assert authoritative({0: (P, FULL & ~0b10), 1: (P, FULL & ~0b01)}) == 0
    # a copy that holds nothing is never the source; zeros are data
    assert authoritative({0: (A, FULL), 1: (Z, FULL)}) == 1
    assert authoritative({0: (A, FULL), 1: (T, FULL)}) is None
    # an excluded copy (it answered CORRUPT) is never the source
    assert authoritative({0: (P, FULL), 1: (P, FULL)}, frozenset({0})) == 1


@given(st.lists(st.integers(0, FULL), min_size=1, max_size=4), st.sets(st.integers(0, 3)))
def test_clean_mask_vouches_for_readable_copies_and_keeps_evidence_against_the_rest(
    masks: list[int], readable: set[int]
) -> None:
    order = sorted(readable)
    mask = clean_mask(masks, order)
    for i in range(32):
        if i in readable:
            assert mask >> i & 1
        else:  # evidence kept: clear in the result iff some copy had it clear
            assert mask >> i & 1 == all(m >> i & 1 for m in masks)


def _doc() -> dict[str, Any]:
    return {
        "format": 1,
        "epoch": 9,
        "published_epoch": 8,
        "servers": {
            "s1": {"addr": "127.0.0.1:7401", "state": "up", "capacity": 1, "zone": ""},
            "s2": {"addr": "127.0.0.1:7402", "state": "recovering", "capacity": 1, "zone": ""},
        },
        "volumes": {
            "db": {
                "id": 3, "size": 1 << 30, "page_size": 1 << 20, "replicas": 2, "stripe": 2,
                "layers": [4, 7], "fence_epoch": 6,
                "lock": {"session": "abc", "host": "h", "pid": 12, "since": 1},
            }
        },
        "layers": {
            "4": {"volume_id": 3, "placement": [["s1", "s2"]], "role": "snapshot",
                  "migrates_to": None},
            "7": {"volume_id": 3, "placement": [["s1", "s2"], ["s2", "s1"]], "role": "live",
                  "migrates_to": None, "filling": []},
        },
    }  # fmt: skip


def test_volume_view_reads_the_published_map() -> None:
    view = volume_view(_doc(), "db")
    assert view.epoch == 8  # the published epoch, not the newest committed one
    assert [layer.id for layer in view.layers] == [7, 4]  # top first
    assert view.top.partition(0) == ("s1", "s2")
    assert view.top.partition(5) == ("s2", "s1")  # striping: page mod partitions
    top = view.top
    assert view.readable(top, 0) == [0]  # a recovering server is never read
    assert view.readable(top, 5) == [1]
    assert view.writable(top, 0) == [0, 1]  # ... but it takes every write
    assert view.servers["s2"].port == 7402
    assert view.lock is not None
    assert view.lock.session == "abc"
    assert view.servers_of(view.top) == ["s1", "s2"]


def test_a_copy_being_filled_is_written_but_never_read() -> None:
    doc = _doc()
    doc["servers"]["s2"]["state"] = "up"
    doc["layers"]["7"]["filling"] = [[1, "s2"]]
    view = volume_view(doc, "db")
    assert view.top.filling == frozenset({(1, "s2")})
    assert view.readable(view.top, 1) == [1]  # partition 1 is (s2, s1): s2 is filling
    assert view.readable(view.top, 0) == [0, 1]  # s2's copy of partition 0 is fine
    assert view.readable(view.layers[1], 1) == [0, 1]  # other layers: as usual
    assert view.writable(view.top, 1) == [0, 1]


def test_no_write_while_no_copy_of_the_partition_may_be_read() -> None:
    # partition 1 is (s2, s1): s2 is up but being filled, s1 recovering
    doc = _doc()
    doc["servers"]["s1"]["state"] = "recovering"
    doc["servers"]["s2"]["state"] = "up"
    doc["layers"]["7"]["filling"] = [[1, "s2"]]
    view = volume_view(doc, "db")
    assert view.readable(view.top, 1) == []
    # the recovering copy may lack nothing (no write went out while it was away), but
    # the filling copy alone may lack the page and every write before it was placed
    assert view.writable(view.top, 1) == []
    assert view.writable(view.top, 0) == [0, 1]  # (s1, s2): s2 up and not filling here
    # nothing up at all: no write either
    doc["servers"]["s2"]["state"] = "recovering"
    view = volume_view(doc, "db")
    assert view.writable(view.top, 0) == []


def test_volume_view_errors() -> None:
    with pytest.raises(NotFound, match="no volume named 'nope'"):
        volume_view(_doc(), "nope")
    doc = _doc()
    del doc["layers"]["7"]
    with pytest.raises(ProtocolError):
        volume_view(doc, "db")
    doc = _doc()
    doc["servers"]["s1"]["addr"] = "nowhere"
    with pytest.raises(ProtocolError, match="bad server address"):
        volume_view(doc, "db")

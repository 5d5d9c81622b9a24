"""A resynchronisation while the only complete copy of a partition is recovering and
the other copy is being filled, over both page stores.

The background worker's real ``_resync_page`` runs against two real storage services:
s2 holds the partition's only complete copy and came back ``recovering``; s3, on an up
server, is being filled (a re-replication placed it).  No copy may be read, so no client
write went out since; the repair copies from s3 the pages it holds (it may hold a write
s2 lost to a power cut), and from s2 the pages the fill has not reached yet
(``lamina.repair.sources``).  Then s2 can be up again and the fill goes on from it.
"""

from __future__ import annotations

from dataclasses import replace

from lamina.mgmt import clustermap as cm
from lamina.storage.service import StorageService
from lamina.storage.syncmask import FULL, IN_FLIGHT
from lamina.wire import messages as m
from lamina.wire.messages import PageState
from tests.contract.stores import MakeStore, in_loop
from tests.contract.test_resync_races import (
    EPOCH,
    LAYER,
    PAGE,
    TOP,
    VOL,
    VOLUME,
    client_write,
    send,
    services,
    worker_over,
)
from tests.contract.test_service_contract import Clock, call, page_bytes

FILLING = replace(TOP, filling=((0, "s3"),))
BACK = {"s2": cm.ServerState.RECOVERING, "s3": cm.ServerState.UP}


async def holds(svc: dict[str, StorageService], sid: str, page: int) -> tuple[int, bytes, int]:
    """(state, bytes, mask) of ``page`` on ``sid``."""
    reply, data = await call(svc[sid], m.ReadRequest(VOL, EPOCH, LAYER, page, PAGE, 0, PAGE))
    assert isinstance(reply, m.ReadResponse)
    return reply.state, bytes(data), reply.mask


async def lost_on_s2(
    make_store: MakeStore,
) -> tuple[dict[str, StorageService], bytes, bytes]:
    """A write reached both copies of page 0; s2 lost it to a power cut (it kept the
    clear of its mask, made durable first, and its old bytes), s3 kept it; its tokens
    never came back, so both are dirty.  The services, the old bytes and the new."""
    clock = Clock()
    svc = services(make_store, clock)
    s2, s3 = svc["s2"], svc["s3"]
    old, new = page_bytes(1, PAGE), page_bytes(2, PAGE)
    for s in (s2, s3):
        await send(s, m.CreateRequest(VOL, EPOCH, LAYER, 0, PAGE, FULL, False), old)
    await send(s2, client_write(0, 0), old)  # the clear, without the bytes it lost
    await send(s3, client_write(1, 0), new)
    clock.now += IN_FLIGHT + 1  # no longer a write on its way
    return svc, old, new


@in_loop
async def test_a_write_the_complete_copy_lost_comes_back_from_the_filling_copy(
    make_store: MakeStore,
) -> None:
    """The filling copy, up and holding the page, is the source: s2 gets back the write
    it lost."""
    svc, _, new = await lost_on_s2(make_store)
    worker = worker_over(svc)
    assert await worker._resync_page(VOLUME, FILLING, 0, EPOCH, BACK)
    for sid in ("s2", "s3"):
        assert await holds(svc, sid, 0) == (PageState.PRESENT, new, FULL), sid


@in_loop
async def test_a_page_the_fill_has_not_reached_comes_from_the_complete_copy(
    make_store: MakeStore,
) -> None:
    """s3 lacks the page (the fill has not reached it): s2 is the source, and the
    repair fills it."""
    svc = services(make_store, Clock())
    data = page_bytes(3, PAGE)
    await send(svc["s2"], m.CreateRequest(VOL, EPOCH, LAYER, 0, PAGE, FULL, False), data)
    worker = worker_over(svc)
    assert await worker._resync_page(VOLUME, FILLING, 0, EPOCH, BACK)
    for sid in ("s2", "s3"):
        assert await holds(svc, sid, 0) == (PageState.PRESENT, data, FULL), sid


@in_loop
async def test_a_filling_copy_that_is_not_up_is_no_source(make_store: MakeStore) -> None:
    """s3 holds the page but is recovering too (it may have missed writes s2 took):
    no source, nothing is changed, and the page waits."""
    svc, old, new = await lost_on_s2(make_store)
    worker = worker_over(svc)
    both_back = {"s2": cm.ServerState.RECOVERING, "s3": cm.ServerState.RECOVERING}
    assert not await worker._resync_page(VOLUME, FILLING, 0, EPOCH, both_back)
    state, data, mask = await holds(svc, "s2", 0)
    assert (state, data) == (PageState.PRESENT, old)
    assert mask != FULL
    state, data, mask = await holds(svc, "s3", 0)
    assert (state, data) == (PageState.PRESENT, new)
    assert mask != FULL


@in_loop
async def test_a_zero_page_is_filled_as_a_zero_page(make_store: MakeStore) -> None:
    """A page that reads as zeros on the source (a WRITE_ZEROES or a trim) is created as
    a zero page on the copy being filled, as every other repair copies it: no page of
    zero bytes that takes space on the disk (a trimmed volume would fill its new copy's
    disk), and the copies agree in kind."""
    svc = services(make_store, Clock())
    await send(svc["s2"], m.CreateRequest(VOL, EPOCH, LAYER, 0, PAGE, FULL, True))
    worker = worker_over(svc)
    assert await worker._fill_page(VOLUME, FILLING, 0, EPOCH, "s2", "s3")
    assert await holds(svc, "s3", 0) == (PageState.ZERO, b"", FULL)
    # a page the target holds already is left alone
    assert await worker._fill_page(VOLUME, FILLING, 0, EPOCH, "s2", "s3")
    assert await holds(svc, "s3", 0) == (PageState.ZERO, b"", FULL)

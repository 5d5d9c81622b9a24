"""A resynchronisation racing a client write, over both page stores.

The background worker's real ``_resync_page`` runs against two real storage services
(copies 0 and 1 of one page); the test decides when each copy receives the client's
write, so the interleaving that once lost an acknowledged write is replayed exactly:
the write reaches the recovering copy, the worker reads the up copy before the write
reaches it, and the worker must not overwrite the recovering copy with those older bytes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lamina.errors import StaleEpoch
from lamina.mgmt import clustermap as cm
from lamina.mgmt.worker import Worker
from lamina.storage.service import StorageService
from lamina.storage.syncmask import FULL, IN_FLIGHT, clear_mask, restore_mask
from lamina.wire import messages as m
from lamina.wire.framing import Payload
from lamina.wire.messages import PageState
from tests.contract.stores import MakeStore, in_loop
from tests.contract.test_service_contract import Clock, call, page_bytes, restore

PAGE = 64 * 1024
VOL = 7
LAYER = 3
EPOCH = 5
COPIES = ("s2", "s3")
VOLUME = cm.Volume("v", VOL, PAGE, PAGE, 2, 1, (LAYER,), EPOCH)
TOP = cm.Layer(LAYER, VOL, (COPIES,), cm.LayerRole.LIVE, None)


def client_write(copy: int, offset: int, *, written: tuple[int, ...] = (0, 1)) -> m.WriteRequest:
    return m.WriteRequest(
        VOL, EPOCH, LAYER, 0, PAGE, offset,
        clear_mask(copy, 2), restore_mask(set(written), 2), False,
    )  # fmt: skip


async def send(service: StorageService, msg: m.Message, payload: bytes = b"") -> Any:
    reply, _ = await call(service, msg, payload)
    return reply


async def flags(service: StorageService) -> int:
    reply = await send(service, m.StatusRequest(VOL, EPOCH, LAYER, (0,)))
    assert isinstance(reply, m.StatusResponse)
    return reply.entries[0][4]


def worker_over(services: dict[str, StorageService]) -> Worker:
    """A worker whose requests go straight to ``services`` (no network, no manager)."""
    worker = Worker(None, b"", lambda: True, _no_proposals)  # type: ignore[arg-type]

    async def direct(sid: str, msg: m.Message, payload: Payload = b"") -> tuple[Any, Payload]:
        return await call(services[sid], msg, bytes(payload))

    worker._call_with_payload = direct  # type: ignore[method-assign]
    return worker


async def _no_proposals(cmd: cm.Command) -> None:
    raise AssertionError(f"unexpected proposal {cmd}")


def services(make_store: MakeStore, clock: Clock) -> dict[str, StorageService]:
    return {sid: StorageService(make_store(), sid, clock) for sid in COPIES}


@in_loop
async def test_an_unconfirmed_client_write_flags_its_copy_as_writing(
    make_store: MakeStore,
) -> None:
    """STATUS and CHECKSUM say WRITING while a client write's token is unconfirmed, for
    at most IN_FLIGHT seconds and only at the volume's fence or newer; a resync's
    conditional write never sets it."""
    clock = Clock()
    svc = StorageService(make_store(), "s2", clock)
    first = await send(svc, client_write(0, 0), page_bytes(1, PAGE))
    assert await flags(svc) == m.WRITING
    summed = await send(svc, m.ChecksumRequest(VOL, EPOCH, LAYER, 0, PAGE))
    assert summed.flags == m.WRITING
    assert await restore(svc, first.token) == 1
    assert await flags(svc) == 0
    # a conditional write (what a resync sends) is no client write
    conditional = m.WriteRequest(
        VOL, EPOCH, LAYER, 0, PAGE, 0, FULL, FULL, False,
        conditional=True, if_generation=first.generation,
    )  # fmt: skip
    await send(svc, conditional, page_bytes(2, PAGE))
    assert await flags(svc) == 0
    # a token nobody confirms stops counting after IN_FLIGHT seconds
    await send(svc, client_write(0, 100), b"x" * 100)
    clock.now += IN_FLIGHT - 1
    assert await flags(svc) == m.WRITING
    clock.now += 2
    assert await flags(svc) == 0
    # ... or as soon as the volume is fenced above the write's epoch
    await send(svc, client_write(0, 200), b"y" * 100)
    assert await flags(svc) == m.WRITING
    await send(svc, m.SetEpochRequest(EPOCH, ((VOL, EPOCH),)))
    assert await flags(svc) == m.WRITING  # its own epoch: still on its way
    await send(svc, m.SetEpochRequest(EPOCH + 1, ((VOL, EPOCH + 1),)))
    reply = await send(svc, m.StatusRequest(VOL, EPOCH + 1, LAYER, (0,)))
    assert reply.entries[0][4] == 0


async def recovering_copy_with_a_write_on_its_way(
    make_store: MakeStore,
) -> tuple[dict[str, StorageService], bytes, m.WriteResponse]:
    """s3 took a write while s2 was away (s3's mask disowns s2); s2 is back, recovering,
    and a new client write reached s2 but not s3 yet.  The services, the bytes every
    copy must end with, and s2's answer to that write."""
    svc = services(make_store, Clock())
    s2, s3 = svc["s2"], svc["s3"]
    base = page_bytes(1, PAGE)
    for s in (s2, s3):
        created = await send(s, m.CreateRequest(VOL, EPOCH, LAYER, 0, PAGE, FULL, False), base)
        assert created.created
    away = await send(s3, client_write(1, 0, written=(1,)), b"A" * 4096)
    await restore(s3, away.token)
    on_s2 = await send(s2, client_write(0, 8192), b"W" * 4096)
    expected = b"A" * 4096 + base[4096:8192] + b"W" * 4096 + base[12288:]
    return svc, expected, on_s2


async def the_write_reaches_s3(svc: dict[str, StorageService], on_s2: m.WriteResponse) -> None:
    """The rest of the write lands on s3, and its tokens come back (acknowledged)."""
    on_s3 = await send(svc["s3"], client_write(1, 8192), b"W" * 4096)
    await restore(svc["s2"], on_s2.token)
    await restore(svc["s3"], on_s3.token)


async def both_hold(svc: dict[str, StorageService], expected: bytes) -> None:
    for sid, s in svc.items():
        reply, data = await call(s, m.ReadRequest(VOL, EPOCH, LAYER, 0, PAGE, 0, PAGE))
        assert isinstance(reply, m.ReadResponse)
        assert reply.state == PageState.PRESENT
        assert bytes(data) == expected, f"{sid} lost a write"
        assert reply.mask == FULL, f"{sid} is still dirty"


STATE = {"s2": cm.ServerState.RECOVERING, "s3": cm.ServerState.UP}


@in_loop
async def test_a_resync_never_overwrites_a_write_the_up_copy_has_not_received_yet(
    make_store: MakeStore,
) -> None:
    """The worker reads s3 before the write reaches it: it must leave s2 alone.
    Overwriting s2 with s3's older bytes, and then the write's confirmation vouching for
    s2, lost the write for good."""
    svc, expected, on_s2 = await recovering_copy_with_a_write_on_its_way(make_store)
    worker = worker_over(svc)
    done = await worker._resync_page(VOLUME, TOP, 0, EPOCH, STATE)
    assert not done, "the worker repaired a copy with a client write on its way"
    await the_write_reaches_s3(svc, on_s2)
    for _ in range(3):  # the next rounds repair s2 from s3, now that s3 holds the write
        if await worker._resync_page(VOLUME, TOP, 0, EPOCH, STATE):
            break
    await both_hold(svc, expected)


@in_loop
async def test_a_write_confirmed_soon_is_waited_for_within_the_round(
    make_store: MakeStore,
) -> None:
    """Tokens come back within a fraction of a second: the worker looks again within
    the same round and repairs s2 then, so a recovering server written all the time
    still comes up (its pages are seldom free of writes for a whole round)."""
    svc, expected, on_s2 = await recovering_copy_with_a_write_on_its_way(make_store)
    worker = worker_over(svc)
    resync = asyncio.ensure_future(worker._resync_page(VOLUME, TOP, 0, EPOCH, STATE))
    await asyncio.sleep(0.2)
    assert not resync.done()
    await the_write_reaches_s3(svc, on_s2)
    assert await resync, "not repaired within the round"
    await both_hold(svc, expected)


@in_loop
async def test_a_lower_layer_is_repaired_even_with_a_write_flagged(make_store: MakeStore) -> None:
    """A layer that is no longer the top takes no client write: a write still on its way
    to another copy is refused there by the newer fence, so an unconfirmed token on a
    frozen layer (a snapshot was taken meanwhile) holds no repair back."""
    clock = Clock()
    svc = services(make_store, clock)
    s2, s3 = svc["s2"], svc["s3"]
    base = page_bytes(3, PAGE)
    for s in (s2, s3):
        await send(s, m.CreateRequest(VOL, EPOCH, LAYER, 0, PAGE, FULL, False), base)
    away = await send(s3, client_write(1, 0, written=(1,)), b"A" * 4096)
    await restore(s3, away.token)
    await send(s2, client_write(0, 8192), b"W" * 4096)  # on its way to s3 still
    assert await flags(s2) == m.WRITING
    # a snapshot froze the layer: the volume is fenced at the new epoch everywhere
    fence = m.SetEpochRequest(EPOCH + 1, ((VOL, EPOCH + 1),))
    for s in (s2, s3):
        await send(s, fence)
    frozen = cm.Volume("v", VOL, PAGE, PAGE, 2, 1, (LAYER, LAYER + 1), EPOCH + 1)
    worker = worker_over(svc)
    state = {"s2": cm.ServerState.RECOVERING, "s3": cm.ServerState.UP}
    assert await worker._resync_page(frozen, TOP, 0, EPOCH + 1, state)
    with pytest.raises(StaleEpoch):  # the rest of that write: refused, never acknowledged
        await call(s3, client_write(1, 8192), b"W" * 4096)
    datas = set()
    for s in (s2, s3):
        reply, data = await call(s, m.ReadRequest(VOL, EPOCH + 1, LAYER, 0, PAGE, 0, PAGE))
        assert isinstance(reply, m.ReadResponse)
        assert reply.mask == FULL
        datas.add(bytes(data))
    assert datas == {b"A" * 4096 + base[4096:]}, "the copies of the frozen page differ"

"""The storage service (epochs, leases, sync-mask episodes) over both page stores.

Requests go through ``StorageService.handle`` exactly as the wire server calls it; a reply
that comes back as a coroutine is awaited.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from lamina.errors import (
    BadRequest,
    Conflict,
    Deleted,
    NoLease,
    NotFound,
    StaleEpoch,
)
from lamina.storage.pagestore import PageInfo, PageStore
from lamina.storage.service import Lease, Reply, StorageService
from lamina.storage.syncmask import FULL, clear_mask, restore_mask
from lamina.wire import messages as m
from lamina.wire.messages import EnumerateWhat, PageState
from tests.contract.stores import MakeStore, in_loop

PAGE = 64 * 1024
VOL = 7
OTHER_VOL = 8
LAYER = 3
OTHER_LAYER = 4
COPIES = 3
ALL = frozenset(range(COPIES))


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def page_bytes(seed: int, size: int = PAGE) -> bytes:
    return random.Random(seed).randbytes(size)


async def call(service: StorageService, msg: m.Message, payload: bytes = b"") -> Reply:
    result = service.handle(msg, payload)
    if isinstance(result, tuple):
        return result
    return await result


def write_req(
    page: int,
    offset: int = 0,
    *,
    epoch: int = 1,
    volume: int = VOL,
    layer: int = LAYER,
    copy: int = 0,
    written: frozenset[int] = ALL,
    restore: tuple[int, ...] = (),
    fua: bool = False,
) -> m.WriteRequest:
    return m.WriteRequest(
        volume,
        epoch,
        layer,
        page,
        PAGE,
        offset,
        clear_mask(copy, COPIES),
        restore_mask(written, COPIES),
        fua,
        restore,
    )


def read_req(
    page: int,
    offset: int = 0,
    length: int = PAGE,
    *,
    epoch: int = 1,
    volume: int = VOL,
    layer: int = LAYER,
    restore: tuple[int, ...] = (),
) -> m.ReadRequest:
    return m.ReadRequest(volume, epoch, layer, page, PAGE, offset, length, restore)


async def write(service: StorageService, req: m.WriteRequest, data: bytes) -> m.WriteResponse:
    reply, payload = await call(service, req, data)
    assert isinstance(reply, m.WriteResponse)
    assert payload == b""
    return reply


async def status(
    service: StorageService, pages: tuple[int, ...], *, epoch: int = 1, layer: int = LAYER
) -> dict[int, PageInfo]:
    reply, _ = await call(service, m.StatusRequest(VOL, epoch, layer, pages))
    assert isinstance(reply, m.StatusResponse)
    return {
        page: PageInfo(PageState(state), mask, gen) for page, state, mask, gen, _ in reply.entries
    }


async def dirty(service: StorageService, *, epoch: int = 1) -> tuple[int, ...]:
    req = m.EnumerateRequest(VOL, epoch, LAYER, EnumerateWhat.DIRTY, 0, 1000)
    reply, _ = await call(service, req)
    assert isinstance(reply, m.EnumerateResponse)
    assert reply.done
    return reply.pages


async def restore(service: StorageService, *tokens: int) -> int:
    reply, _ = await call(service, m.RestoreRequest(tokens))
    assert isinstance(reply, m.RestoreResponse)
    return reply.restored


def snapshot(store: PageStore, layers: tuple[int, ...], pages: range) -> object:
    """Everything observable about the store's pages, to compare before and after."""
    infos = {(lay, p): store.info(lay, p) for lay in layers for p in pages}
    data = {
        key: store.read(*key, 0, PAGE)
        for key, info in infos.items()
        if info.state == PageState.PRESENT
    }
    return infos, data, store.stats().pages, store.layers()


# --- epochs ----------------------------------------------------------------------------


@in_loop
async def test_stale_epoch_is_refused_with_the_current_epoch(make_store: MakeStore) -> None:
    """Once volume V is fenced at e, V's requests below e fail STALE(current) and do nothing."""
    store = make_store()
    service = StorageService(store, "s1", Clock())
    data = page_bytes(1)
    await write(service, write_req(0, epoch=3), data)
    await write(service, write_req(0, epoch=3, volume=OTHER_VOL, layer=OTHER_LAYER), data)
    reply, _ = await call(service, m.SetEpochRequest(6, ((VOL, 5),)))
    assert reply == m.SetEpochResponse(6)
    before = snapshot(store, (LAYER, OTHER_LAYER), range(3))

    stale: list[tuple[m.Message, bytes]] = [
        (read_req(0, epoch=4), b""),
        (write_req(0, epoch=4), page_bytes(2)),
        (write_req(1, epoch=4), page_bytes(2)),
        (m.CreateRequest(VOL, 4, LAYER, 2, PAGE, FULL, False, ()), page_bytes(3)),
        (m.StatusRequest(VOL, 4, LAYER, (0,)), b""),
        (m.EnumerateRequest(VOL, 4, LAYER, EnumerateWhat.PRESENT, 0, 10), b""),
        (m.MarkCleanRequest(VOL, 4, LAYER, 0, store.info(LAYER, 0).generation, FULL), b""),
        (m.TombstoneRequest(VOL, 4, LAYER, 0, PAGE), b""),
        (m.DeleteLayerRequest(VOL, 4, LAYER), b""),
        (m.FlushRequest(VOL, 4), b""),
    ]
    for msg, payload in stale:
        with pytest.raises(StaleEpoch) as err:
            await call(service, msg, payload)
        assert err.value.current_epoch == 6, msg
        assert err.value.detail == 6
    assert snapshot(store, (LAYER, OTHER_LAYER), range(3)) == before

    # the fence itself and anything up to the server's epoch are served
    reply, got = await call(service, read_req(0, epoch=5))
    assert got == data
    # other volumes are not fenced: epoch 4 (even 3) still works for them
    other = page_bytes(9)
    await write(service, write_req(0, epoch=3, volume=OTHER_VOL, layer=OTHER_LAYER), other)
    _, got = await call(service, read_req(0, epoch=4, volume=OTHER_VOL, layer=OTHER_LAYER))
    assert got == other

    # a later epoch without a new fence keeps the fence; the answer names the newer epoch
    await call(service, m.SetEpochRequest(8, ()))
    with pytest.raises(StaleEpoch) as err:
        await call(service, read_req(0, epoch=4))
    assert err.value.current_epoch == 8
    await call(service, read_req(0, epoch=5))


@in_loop
async def test_set_epoch_never_lowers_epoch_or_fence(make_store: MakeStore) -> None:
    """SET_EPOCH with an older epoch or fence leaves the newer one in force."""
    service = StorageService(make_store(), "s1", Clock())
    await call(service, m.SetEpochRequest(10, ((VOL, 9),)))
    reply, _ = await call(service, m.SetEpochRequest(4, ((VOL, 2),)))
    assert reply == m.SetEpochResponse(10)
    assert service.current_epoch() == 10
    with pytest.raises(StaleEpoch):
        await call(service, m.StatusRequest(VOL, 8, LAYER, (0,)))
    await call(service, m.StatusRequest(VOL, 9, LAYER, (0,)))


@in_loop
async def test_standalone_server_adopts_a_newer_epoch(make_store: MakeStore) -> None:
    """A standalone server serves a request from a newer epoch and moves up to it."""
    service = StorageService(make_store(), "s1", Clock())
    assert service.current_epoch() == 0
    data = page_bytes(4)
    await write(service, write_req(0, epoch=12), data)
    assert service.current_epoch() == 12
    _, got = await call(service, read_req(0, epoch=12))
    assert got == data
    await call(service, read_req(0, epoch=7))  # no fence: older epochs are still fine
    assert service.current_epoch() == 12
    ping, _ = await call(service, m.PingRequest())
    assert isinstance(ping, m.PingResponse)
    assert ping.epoch == 12


# --- leases ----------------------------------------------------------------------------


@in_loop
async def test_no_lease_refuses_every_data_op_and_changes_nothing(make_store: MakeStore) -> None:
    """Without a valid lease every data operation fails NO_LEASE and the store is untouched."""
    store = make_store()
    store.create(VOL, LAYER, PAGE, 0, page_bytes(1), FULL)
    store.create(VOL, LAYER, PAGE, 1, None, FULL & ~2)
    gen0 = store.info(LAYER, 0).generation
    service = StorageService(store, "s1", Clock(), Lease(standalone=False, valid_until=0))
    before = snapshot(store, (LAYER,), range(4))
    ops: list[tuple[m.Message, bytes]] = [
        (read_req(0), b""),
        (write_req(0), page_bytes(2)),
        (write_req(0, 100), b"abc"),
        (write_req(2), page_bytes(2)),
        (m.CreateRequest(VOL, 1, LAYER, 3, PAGE, FULL, True, ()), b""),
        (m.CreateRequest(VOL, 1, LAYER, 2, PAGE, FULL, False, ()), page_bytes(5)),
        (m.StatusRequest(VOL, 1, LAYER, (0, 1)), b""),
        (m.EnumerateRequest(VOL, 1, LAYER, EnumerateWhat.DIRTY, 0, 10), b""),
        (m.MarkCleanRequest(VOL, 1, LAYER, 1, store.info(LAYER, 1).generation, FULL), b""),
        (m.TombstoneRequest(VOL, 1, LAYER, 0, PAGE), b""),
        (m.DeleteLayerRequest(VOL, 1, LAYER), b""),
        (m.FlushRequest(VOL, 1), b""),
    ]
    for msg, payload in ops:
        with pytest.raises(NoLease):
            await call(service, msg, payload)
    assert snapshot(store, (LAYER,), range(4)) == before
    assert store.info(LAYER, 0).generation == gen0
    assert service.current_epoch() == 0  # not even the epoch moved
    ping, _ = await call(service, m.PingRequest())
    assert isinstance(ping, m.PingResponse)
    assert not ping.lease_valid


def granted(service: StorageService, epoch: int = 1) -> None:
    """What a lease grant at ``epoch`` tells a managed server: the epoch and VOL's fence."""
    service.set_epoch(m.SetEpochRequest(epoch, ((VOL, 1),)), b"")


@in_loop
async def test_a_managed_server_serves_no_volume_it_was_not_told_of(make_store: MakeStore) -> None:
    """A managed server refuses STALE every data request, at any epoch it knows, for a
    volume whose fence no lease or SET_EPOCH gave it (a copy it was moved away from and
    dropped, asked through an old map); DELETE_LAYER still works; once told, it serves."""
    store = make_store()
    store.create(VOL, LAYER, PAGE, 0, page_bytes(1), FULL)
    service = StorageService(store, "s1", Clock(100.0), Lease(standalone=False, valid_until=110))
    service.set_epoch(m.SetEpochRequest(5, ((VOL + 1, 3),)), b"")
    before = snapshot(store, (LAYER,), range(2))
    for epoch in (1, 5):
        for msg, payload in [
            (m.ReadRequest(VOL, epoch, LAYER, 0, PAGE, 0, PAGE), b""),
            (m.WriteRequest(VOL, epoch, LAYER, 1, PAGE, 0, FULL, FULL, False), page_bytes(2)),
            (m.CreateRequest(VOL, epoch, LAYER, 1, PAGE, FULL, True, ()), b""),
            (m.StatusRequest(VOL, epoch, LAYER, (0,)), b""),
        ]:
            with pytest.raises(StaleEpoch) as err:
                await call(service, msg, payload)
            assert err.value.current_epoch == 5
            assert "holds no copy of volume" in err.value.message
    assert snapshot(store, (LAYER,), range(2)) == before
    service.set_epoch(m.SetEpochRequest(6, ((VOL, 6),)), b"")
    with pytest.raises(StaleEpoch):  # told now: older maps stay refused
        await call(service, m.ReadRequest(VOL, 5, LAYER, 0, PAGE, 0, PAGE))
    _, got = await call(service, m.ReadRequest(VOL, 6, LAYER, 0, PAGE, 0, PAGE))
    assert got == page_bytes(1)
    other = StorageService(store, "s1", Clock(100.0), Lease(standalone=False, valid_until=110))
    other.set_epoch(m.SetEpochRequest(5, ()), b"")
    done, _ = await call(other, m.DeleteLayerRequest(VOL, 5, LAYER))
    assert isinstance(done, m.DeleteLayerResponse)
    assert done.pages_removed == 1


@in_loop
async def test_lease_expiry_stops_service(make_store: MakeStore) -> None:
    """A managed server serves while its lease is valid and refuses from the moment it expires."""
    clock = Clock(100.0)
    service = StorageService(make_store(), "s1", clock, Lease(standalone=False, valid_until=110))
    granted(service)
    await write(service, write_req(0), page_bytes(1))
    clock.now = 109.999
    await call(service, read_req(0))
    clock.now = 110.0
    with pytest.raises(NoLease):
        await call(service, read_req(0))
    service.lease.valid_until = 200.0  # renewed by a heartbeat
    await call(service, read_req(0))


# --- sync-mask episodes ----------------------------------------------------------------


@in_loop
async def test_write_clears_mask_and_restore_token_restores_it(make_store: MakeStore) -> None:
    """A write clears the other copies' bits; RESTORE of its token brings them back, once."""
    service = StorageService(make_store(), "s1", Clock())
    first = await write(service, write_req(0, copy=1), page_bytes(1))
    info = (await status(service, (0,)))[0]
    assert info.state == PageState.PRESENT
    assert info.mask == clear_mask(1, COPIES)
    assert info.generation == first.generation
    assert await dirty(service) == (0,)
    assert await restore(service, first.token) == 1
    assert (await status(service, (0,)))[0].mask == FULL
    assert await dirty(service) == ()
    assert await restore(service, first.token) == 0  # a duplicate changes nothing
    assert await restore(service, first.token + 12345) == 0


@in_loop
async def test_restore_tokens_ride_on_a_later_read(make_store: MakeStore) -> None:
    """Tokens piggybacked on a READ are applied before it is answered."""
    service = StorageService(make_store(), "s1", Clock())
    created = await write(service, write_req(0), page_bytes(1))
    await restore(service, created.token)
    partial = await write(service, write_req(0, 5000, copy=2), b"hello")
    assert (await status(service, (0,)))[0].mask == clear_mask(2, COPIES)
    reply, got = await call(service, read_req(0, 5000, 5, restore=(partial.token,)))
    assert isinstance(reply, m.ReadResponse)
    assert reply.mask == FULL
    assert got == b"hello"
    assert await dirty(service) == ()


@in_loop
async def test_restore_tokens_ride_on_a_later_write(make_store: MakeStore) -> None:
    """Tokens piggybacked on a WRITE to another page restore the page they belong to."""
    service = StorageService(make_store(), "s1", Clock())
    a = await write(service, write_req(0), page_bytes(1))
    b = await write(service, write_req(1, restore=(a.token,)), page_bytes(2))
    infos = await status(service, (0, 1))
    assert infos[0].mask == FULL
    assert infos[1].mask == clear_mask(0, COPIES)
    assert await dirty(service) == (1,)
    await call(service, read_req(0, restore=(b.token,)))
    assert await dirty(service) == ()


@in_loop
async def test_unconfirmed_write_keeps_the_page_dirty(make_store: MakeStore) -> None:
    """While any write of the episode is unconfirmed, the page stays cleared and listed DIRTY."""
    service = StorageService(make_store(), "s1", Clock())
    w1 = await write(service, write_req(0), page_bytes(1))
    w2 = await write(service, write_req(0, 10), b"x" * 10)
    w3 = await write(service, write_req(0, 20), b"y" * 10)
    for token in (w1.token, w3.token):
        assert await restore(service, token) == 1
        assert (await status(service, (0,)))[0].mask == clear_mask(0, COPIES)
        assert await dirty(service) == (0,)
    assert await restore(service, w2.token) == 1
    assert (await status(service, (0,)))[0].mask == FULL
    assert await dirty(service) == ()


@in_loop
async def test_write_redone_without_a_copy_keeps_its_bit_cleared(make_store: MakeStore) -> None:
    """A write whose restore mask excludes copy 2 leaves bit 2 cleared after confirmation."""
    service = StorageService(make_store(), "s1", Clock())
    w = await write(service, write_req(0, written=frozenset({0, 1})), page_bytes(1))
    await restore(service, w.token)
    assert (await status(service, (0,)))[0].mask == FULL & ~0b100
    assert await dirty(service) == (0,)
    w2 = await write(service, write_req(0, 0), b"z")  # a later, complete episode
    await restore(service, w2.token)
    assert (await status(service, (0,)))[0].mask == FULL & ~0b100, "restored a bit it never had"


@in_loop
async def test_mark_clean_is_a_compare_and_set(make_store: MakeStore) -> None:
    """MARK_CLEAN with a stale generation is a Conflict naming the current one; else it cleans."""
    service = StorageService(make_store(), "s1", Clock())
    w1 = await write(service, write_req(0), page_bytes(1))  # token never confirmed
    w2 = await write(service, write_req(0, 100), b"abc")  # nor this one
    assert w2.generation > w1.generation
    with pytest.raises(Conflict) as err:
        await call(service, m.MarkCleanRequest(VOL, 1, LAYER, 0, w1.generation, FULL))
    assert err.value.detail == w2.generation
    assert (await status(service, (0,)))[0].mask == clear_mask(0, COPIES)

    reply, _ = await call(service, m.MarkCleanRequest(VOL, 1, LAYER, 0, w2.generation, FULL))
    assert reply == m.MarkCleanResponse(w2.generation)
    info = (await status(service, (0,)))[0]
    assert (info.mask, info.generation) == (FULL, w2.generation)
    assert await dirty(service) == ()

    # the episode ended: a new write starts a fresh one that its own token alone closes,
    # and the old tokens do not reopen or close anything
    w3 = await write(service, write_req(0, 200), b"def")
    await restore(service, w1.token)
    assert (await status(service, (0,)))[0].mask == clear_mask(0, COPIES)
    await restore(service, w3.token)
    assert (await status(service, (0,)))[0].mask == FULL
    await restore(service, w2.token)
    assert (await status(service, (0,)))[0].mask == FULL

    with pytest.raises(NotFound):
        await call(service, m.MarkCleanRequest(VOL, 1, LAYER, 9, 0, FULL))


@in_loop
async def test_a_conditional_write_applies_only_at_the_expected_generation(
    make_store: MakeStore,
) -> None:
    """A conditional WRITE (what resynchronisations send) is refused with CONFLICT, and
    changes nothing, unless the copy is at the generation it names (0: absent)."""
    service = StorageService(make_store(), "s1", Clock())

    def cond(page: int, gen: int) -> m.WriteRequest:
        plain = write_req(page)
        return m.WriteRequest(
            plain.volume_id, plain.epoch, plain.layer_id, page, PAGE, 0, FULL, FULL, False,
            conditional=True, if_generation=gen,
        )  # fmt: skip

    with pytest.raises(Conflict):
        await call(service, cond(0, 5), page_bytes(1))  # absent is generation 0, not 5
    assert (await status(service, (0,)))[0].state == PageState.ABSENT
    created = await write(service, cond(0, 0), page_bytes(1))
    newer = await write(service, write_req(0, 10), b"newer")  # a client write lands
    with pytest.raises(Conflict) as err:
        await call(service, cond(0, created.generation), page_bytes(2))  # stale: refused
    assert err.value.detail == newer.generation
    _, data = await call(service, read_req(0))
    assert data == page_bytes(1)[:10] + b"newer" + page_bytes(1)[15:]
    done = await write(service, cond(0, newer.generation), page_bytes(3))
    assert done.generation > newer.generation
    _, data = await call(service, read_req(0))
    assert data == page_bytes(3)


@in_loop
async def test_checksum_is_the_crc_of_the_page_verified_where_it_is_stored(
    make_store: MakeStore,
) -> None:
    """CHECKSUM answers the crc32c of the page's bytes without sending them."""
    from crc32c import crc32c

    service = StorageService(make_store(), "s1", Clock())

    async def checksum(page: int) -> m.ChecksumResponse:
        reply, payload = await call(service, m.ChecksumRequest(VOL, 1, LAYER, page, PAGE))
        assert isinstance(reply, m.ChecksumResponse)
        assert payload == b""
        return reply

    absent = await checksum(0)
    assert (absent.state, absent.crc) == (PageState.ABSENT, 0)
    written = await write(service, write_req(0), page_bytes(7))
    got = await checksum(0)
    assert (got.state, got.crc, got.generation) == (
        PageState.PRESENT, crc32c(page_bytes(7)), written.generation,
    )  # fmt: skip
    await write(service, write_req(0, 5), b"xyz")
    changed = page_bytes(7)[:5] + b"xyz" + page_bytes(7)[8:]
    assert (await checksum(0)).crc == crc32c(changed)
    await call(service, m.CreateRequest(VOL, 1, LAYER, 1, PAGE, FULL, True))
    assert (await checksum(1)).crc == crc32c(bytes(PAGE))  # a ZERO page: the zeros' crc


@in_loop
async def test_mark_clean_can_set_any_mask(make_store: MakeStore) -> None:
    """MARK_CLEAN sets the given mask (a resync that left one copy out marks it out)."""
    service = StorageService(make_store(), "s1", Clock())
    w = await write(service, write_req(0), page_bytes(1))
    mask = FULL & ~0b10
    await call(service, m.MarkCleanRequest(VOL, 1, LAYER, 0, w.generation, mask))
    assert (await status(service, (0,)))[0].mask == mask
    await restore(service, w.token)  # the ended episode cannot raise it
    assert (await status(service, (0,)))[0].mask == mask


# --- page states through the service ---------------------------------------------------


@in_loop
async def test_write_to_absent_page(make_store: MakeStore) -> None:
    """A partial write to an absent page is NotFound; a full-page write creates the page."""
    store = make_store()
    service = StorageService(store, "s1", Clock())
    with pytest.raises(NotFound):
        await call(service, write_req(0, 0), b"abc")
    with pytest.raises(NotFound):
        await call(service, write_req(0, 4096), b"q" * 4096)
    assert store.info(LAYER, 0).state == PageState.ABSENT
    assert await dirty(service) == ()
    data = page_bytes(3)
    w = await write(service, write_req(0), data)
    info = store.info(LAYER, 0)
    assert (info.state, info.generation) == (PageState.PRESENT, w.generation)
    reply, got = await call(service, read_req(0))
    assert isinstance(reply, m.ReadResponse)
    assert (reply.state, reply.generation) == (PageState.PRESENT, w.generation)
    assert got == data


@in_loop
async def test_read_of_absent_and_zero_pages(make_store: MakeStore) -> None:
    """READ of an absent or ZERO page answers its state with no payload."""
    service = StorageService(make_store(), "s1", Clock())
    reply, got = await call(service, read_req(0))
    assert isinstance(reply, m.ReadResponse)
    assert (reply.state, got) == (PageState.ABSENT, b"")
    created, _ = await call(service, m.CreateRequest(VOL, 1, LAYER, 0, PAGE, FULL, True, ()))
    assert isinstance(created, m.CreateResponse)
    assert created.created
    reply, got = await call(service, read_req(0))
    assert isinstance(reply, m.ReadResponse)
    assert (reply.state, reply.generation, got) == (PageState.ZERO, created.generation, b"")


@in_loop
async def test_create_if_absent_through_the_service(make_store: MakeStore) -> None:
    """CREATE_IF_ABSENT stores a page once; a second create keeps the first data."""
    service = StorageService(make_store(), "s1", Clock())
    first = page_bytes(1)
    reply, _ = await call(service, m.CreateRequest(VOL, 1, LAYER, 0, PAGE, FULL, False, ()), first)
    assert isinstance(reply, m.CreateResponse)
    assert reply.created
    again, _ = await call(
        service, m.CreateRequest(VOL, 1, LAYER, 0, PAGE, FULL, False, ()), page_bytes(2)
    )
    assert again == m.CreateResponse(False, reply.generation)
    _, got = await call(service, read_req(0))
    assert got == first
    with pytest.raises(BadRequest):
        await call(
            service,
            m.CreateRequest(VOL, 1, LAYER, 1, 2 * PAGE, FULL, False, ()),
            bytes(2 * PAGE),
        )


@in_loop
async def test_write_to_tombstone_is_deleted(make_store: MakeStore) -> None:
    """Writes to a tombstoned page fail DELETED and leave the tombstone in place."""
    store = make_store()
    service = StorageService(store, "s1", Clock())
    await write(service, write_req(0), page_bytes(1))
    reply, _ = await call(service, m.TombstoneRequest(VOL, 1, LAYER, 0, PAGE))
    assert isinstance(reply, m.TombstoneResponse)
    for offset, data in ((0, page_bytes(2)), (10, b"abc")):
        with pytest.raises(Deleted):
            await call(service, write_req(0, offset), data)
    info = store.info(LAYER, 0)
    assert (info.state, info.generation, info.mask) == (
        PageState.TOMBSTONE,
        reply.generation,
        FULL,
    )
    read, got = await call(service, read_req(0))
    assert isinstance(read, m.ReadResponse)
    assert (read.state, got) == (PageState.TOMBSTONE, b"")


@in_loop
async def test_delete_layer_through_the_service(make_store: MakeStore) -> None:
    """DELETE_LAYER removes the layer's pages and answers how many there were."""
    store = make_store()
    service = StorageService(store, "s1", Clock())
    tokens = [(await write(service, write_req(p), page_bytes(p))).token for p in range(3)]
    reply, _ = await call(service, m.DeleteLayerRequest(VOL, 1, LAYER))
    assert reply == m.DeleteLayerResponse(3)
    assert store.layers() == []
    assert await restore(service, *tokens) == 3  # known tokens, but nothing to restore
    assert store.info(LAYER, 0).state == PageState.ABSENT


@in_loop
async def test_flush_and_fua(make_store: MakeStore) -> None:
    """FLUSH answers once the store flushed; a FUA write is answered and readable."""
    service = StorageService(make_store(), "s1", Clock())
    await write(service, write_req(0), page_bytes(1))
    w = await write(service, write_req(0, 3, fua=True), b"fua")
    assert w.generation > 0
    reply, payload = await call(service, m.FlushRequest(VOL, 1))
    assert (reply, payload) == (m.FlushResponse(), b"")
    _, got = await call(service, read_req(0, 3, 3))
    assert got == b"fua"


@in_loop
async def test_write_not_yet_applied_is_fenced_by_a_newer_epoch(make_store: MakeStore) -> None:
    """A write admitted at epoch e whose data is not applied yet is refused once e is fenced."""
    store = make_store()
    service = StorageService(store, "s1", Clock())
    data = page_bytes(1)
    first = await write(service, write_req(0), data)
    await restore(service, first.token)
    # a FUA write (like one waiting for its mask clear to be durable) answers later
    pending = service.handle(write_req(0, 10, fua=True), b"zombie")
    assert not isinstance(pending, tuple)
    reply, _ = await call(service, m.SetEpochRequest(2, ((VOL, 2),)))
    assert reply == m.SetEpochResponse(2)
    # the epoch is published once SET_EPOCH is acknowledged: the old write may not land now
    with pytest.raises(StaleEpoch) as err:
        await pending
    assert err.value.current_epoch == 2
    _, got = await call(service, read_req(0, epoch=2))
    assert got == data
    assert store.info(LAYER, 0).generation == first.generation


@in_loop
async def test_write_not_yet_applied_is_refused_when_the_lease_ran_out(
    make_store: MakeStore,
) -> None:
    """A write whose data would land after the server's lease expired is refused NO_LEASE."""
    store = make_store()
    clock = Clock(100.0)
    service = StorageService(store, "s1", clock, Lease(standalone=False, valid_until=110))
    granted(service)
    data = page_bytes(1)
    first = await write(service, write_req(0), data)
    pending = service.handle(write_req(0, 10, fua=True), b"late")
    assert not isinstance(pending, tuple)
    clock.now = 111.0
    with pytest.raises(NoLease):
        await pending
    service.lease.valid_until = 200.0
    _, got = await call(service, read_req(0))
    assert got == data
    assert store.info(LAYER, 0).generation == first.generation


@in_loop
async def test_mark_clean_is_a_conflict_while_a_write_is_not_applied(
    make_store: MakeStore,
) -> None:
    """MARK_CLEAN cannot succeed on a generation that an admitted, unapplied write will replace."""
    store = make_store()
    service = StorageService(store, "s1", Clock())
    first = await write(service, write_req(0), page_bytes(1))
    await restore(service, first.token)
    # admitted (its clear is in force) but its data is applied only when it runs
    pending = service.handle(write_req(0, 10, fua=True), b"new")
    assert not isinstance(pending, tuple)
    assert store.info(LAYER, 0).mask == clear_mask(0, COPIES)
    with pytest.raises(Conflict) as err:
        await call(service, m.MarkCleanRequest(VOL, 1, LAYER, 0, first.generation, FULL))
    assert err.value.detail == first.generation
    reply, _ = await pending
    assert isinstance(reply, m.WriteResponse)
    # the write landed on a page that still says a copy may have missed it
    info = store.info(LAYER, 0)
    assert (info.generation, info.mask) == (reply.generation, clear_mask(0, COPIES))
    await call(service, m.MarkCleanRequest(VOL, 1, LAYER, 0, reply.generation, FULL))
    assert store.info(LAYER, 0).mask == FULL


# --- layer lineage -----------------------------------------------------------------------


@in_loop
async def test_a_layer_file_of_another_maps_layer_is_never_served(make_store: MakeStore) -> None:
    """A layer written under the map's lineage token A takes A; once the managers' map
    gives that layer id token B (a map rolled back by a power loss that reused the id),
    every request on it is refused naming both tokens, and its old bytes are never read;
    other layers are untouched, and after DELETE_LAYER the id serves B afresh."""
    store = make_store()
    service = StorageService(store, "s1", Clock())
    await call(service, m.SetEpochRequest(1, (), ((LAYER, 0xA), (OTHER_LAYER, 0xC))))
    old = page_bytes(21)
    await write(service, write_req(0), old)
    await write(service, write_req(0, layer=OTHER_LAYER), page_bytes(22))
    assert store.layer_lineage(LAYER) == 0xA
    await call(service, m.SetEpochRequest(2, (), ((LAYER, 0xB), (OTHER_LAYER, 0xC))))
    for req in (read_req(0, epoch=2), write_req(0, epoch=2), m.StatusRequest(VOL, 2, LAYER, (0,))):
        with pytest.raises(BadRequest, match="another cluster map's layer 3"):
            await call(service, req, page_bytes(23) if isinstance(req, m.WriteRequest) else b"")
    assert store.read(LAYER, 0, 0, PAGE) == old  # refused, not overwritten
    reply, payload = await call(service, read_req(0, epoch=2, layer=OTHER_LAYER))
    assert isinstance(reply, m.ReadResponse)
    assert payload == page_bytes(22)
    await call(service, m.DeleteLayerRequest(VOL, 2, LAYER))
    assert store.layer_lineage(LAYER) == 0
    new = page_bytes(24)
    await write(service, write_req(0, epoch=2), new)
    assert store.layer_lineage(LAYER) == 0xB
    reply, payload = await call(service, read_req(0, epoch=2))
    assert payload == new

"""The page-store contract, run against the in-memory and the on-disk store alike.

Every test receives a ``make_store`` factory for one backend (``conftest.py``) and runs its
body on an event loop of its own (``in_loop``): the on-disk store schedules work on the
running loop.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.errors import BadRequest, NotFound
from lamina.storage.checksums import BLOCK
from lamina.storage.pagestore import ABSENT_INFO, PageInfo, PageStore
from lamina.storage.syncmask import FULL
from lamina.wire.messages import EnumerateWhat, PageState
from tests.contract.stores import MakeStore, in_loop

PAGE = 64 * 1024
VOL = 7
LAYER = 3
OTHER_LAYER = 4


def page_bytes(seed: int, size: int = PAGE) -> bytes:
    return random.Random(seed).randbytes(size)


async def set_mask(store: PageStore, layer: int, page: int, mask: int) -> None:
    pending = store.set_mask(layer, page, mask)
    if pending is not None:
        await pending


# --- thin pages, create ----------------------------------------------------------------


@in_loop
async def test_pages_are_absent_until_created_or_written(make_store: MakeStore) -> None:
    """A page is ABSENT (and nothing is allocated) until it is created."""
    store = make_store()
    assert store.info(LAYER, 0) == ABSENT_INFO
    assert store.info(LAYER, 0).state == PageState.ABSENT
    assert store.layers() == []
    assert store.layer_page_size(LAYER) is None
    assert store.layer_volume(LAYER) is None
    assert store.stats().pages == 0
    with pytest.raises(NotFound):
        store.read(LAYER, 0, 0, 10)
    store.create(VOL, LAYER, PAGE, 5, page_bytes(1), FULL)
    for neighbour in (0, 4, 6, 1 << 40):
        assert store.info(LAYER, neighbour) == ABSENT_INFO
    assert store.info(LAYER, 5).state == PageState.PRESENT
    assert store.stats().pages == 1
    assert store.stats().used == PAGE
    assert store.layer_page_size(LAYER) == PAGE
    assert store.layer_volume(LAYER) == VOL


@in_loop
async def test_create_zero_page_is_zero(make_store: MakeStore) -> None:
    """CREATE without data makes a ZERO page with the given mask and a fresh generation."""
    store = make_store()
    created, gen = store.create(VOL, LAYER, PAGE, 2, None, FULL & ~0b10)
    assert created
    info = store.info(LAYER, 2)
    assert info.state == PageState.ZERO
    assert info.mask == FULL & ~0b10
    assert info.generation == gen > 0
    assert store.stats().used == 0  # a whiteout holds no data


@in_loop
async def test_create_with_data_reads_back(make_store: MakeStore) -> None:
    """CREATE with data stores the page: whole-page and unaligned sub-range reads return it."""
    store = make_store()
    data = page_bytes(42)
    created, gen = store.create(VOL, LAYER, PAGE, 9, data, FULL)
    assert created
    assert store.info(LAYER, 9) == PageInfo(PageState.PRESENT, FULL, gen)
    assert store.read(LAYER, 9, 0, PAGE) == data
    for offset, length in [(1, 100), (BLOCK - 1, 2), (4000, 9000), (PAGE - 1, 1), (0, 1)]:
        assert store.read(LAYER, 9, offset, length) == data[offset : offset + length]


@in_loop
async def test_create_on_existing_page_changes_nothing(make_store: MakeStore) -> None:
    """CREATE on an existing page answers created=False with its generation and keeps it."""
    store = make_store()
    data = page_bytes(1)
    _, gen = store.create(VOL, LAYER, PAGE, 0, data, FULL)
    _, zgen = store.create(VOL, LAYER, PAGE, 1, None, FULL & ~1)
    assert store.create(VOL, LAYER, PAGE, 0, page_bytes(2), FULL & ~1) == (False, gen)
    assert store.create(VOL, LAYER, PAGE, 0, None, FULL) == (False, gen)
    assert store.create(VOL, LAYER, PAGE, 1, page_bytes(3), FULL) == (False, zgen)
    assert store.read(LAYER, 0, 0, PAGE) == data
    assert store.info(LAYER, 0).mask == FULL
    assert store.info(LAYER, 1) == PageInfo(PageState.ZERO, FULL & ~1, zgen)


@in_loop
async def test_create_needs_a_full_page(make_store: MakeStore) -> None:
    """CREATE with data shorter than a page is refused and creates nothing."""
    store = make_store()
    with pytest.raises(BadRequest):
        store.create(VOL, LAYER, PAGE, 0, b"x" * (PAGE - 1), FULL)
    assert store.info(LAYER, 0) == ABSENT_INFO


# --- writes --------------------------------------------------------------------------


@in_loop
async def test_write_to_absent_page_is_not_found(make_store: MakeStore) -> None:
    """A write to an absent page (in a known or unknown layer) raises NotFound."""
    store = make_store()
    with pytest.raises(NotFound):
        store.write(VOL, LAYER, PAGE, 0, 0, page_bytes(1))
    store.create(VOL, LAYER, PAGE, 1, None, FULL)
    with pytest.raises(NotFound):
        store.write(VOL, LAYER, PAGE, 0, 10, b"abc")
    assert store.info(LAYER, 0) == ABSENT_INFO


@in_loop
async def test_write_outside_the_page_is_refused(make_store: MakeStore) -> None:
    """An empty write, or one that ends beyond the page, is a BadRequest that changes nothing."""
    store = make_store()
    data = page_bytes(5)
    _, gen = store.create(VOL, LAYER, PAGE, 0, data, FULL)
    _, zgen = store.create(VOL, LAYER, PAGE, 1, None, FULL)
    for page in (0, 1):
        for offset, chunk in ((PAGE - 2, b"abc"), (PAGE, b"a"), (0, b""), (100, b"")):
            with pytest.raises(BadRequest):
                store.write(VOL, LAYER, PAGE, page, offset, chunk)
    assert store.read(LAYER, 0, 0, PAGE) == data
    assert store.info(LAYER, 0).generation == gen
    assert store.info(LAYER, 1) == PageInfo(PageState.ZERO, FULL, zgen)
    assert store.stats().used == PAGE


write_ranges = st.one_of(
    st.tuples(st.integers(0, PAGE - 1), st.integers(1, 3 * BLOCK)),
    st.tuples(st.integers(0, 15).map(lambda b: b * BLOCK), st.sampled_from([BLOCK, 2 * BLOCK])),
    st.just((0, PAGE)),
    st.tuples(st.integers(PAGE - 2 * BLOCK, PAGE - 1), st.just(2 * BLOCK)),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, 1), write_ranges, st.integers(0, 2**32)), min_size=1, max_size=12
    ),
    reads=st.lists(st.tuples(st.integers(0, PAGE - 1), st.integers(1, PAGE)), max_size=4),
)
def test_partial_writes_match_a_bytearray_model(
    make_store: MakeStore,
    writes: list[tuple[int, tuple[int, int], int]],
    reads: list[tuple[int, int]],
) -> None:
    """Unaligned writes into a ZERO and a PRESENT page read back as a bytearray model says."""

    async def body() -> None:
        store = make_store()
        try:
            model = {0: bytearray(PAGE), 1: bytearray(page_bytes(77))}
            _, last = store.create(VOL, LAYER, PAGE, 0, None, FULL)
            store.create(VOL, LAYER, PAGE, 1, bytes(model[1]), FULL)
            for page, (offset, wanted), seed in writes:
                length = min(wanted, PAGE - offset)
                data = page_bytes(seed, length)
                gen = store.write(VOL, LAYER, PAGE, page, offset, data)
                assert gen > last
                last = gen
                model[page][offset : offset + length] = data
                info = store.info(LAYER, page)
                assert info.state == PageState.PRESENT
                assert info.generation == gen
                assert store.read(LAYER, page, offset, length) == data
            for page, expected in model.items():
                if store.info(LAYER, page).state == PageState.ZERO:
                    assert not any(expected)  # never written: still reads as zeros
                    continue
                assert store.read(LAYER, page, 0, PAGE) == expected
                for offset, wanted in reads:
                    end = min(offset + wanted, PAGE)
                    assert store.read(LAYER, page, offset, end - offset) == expected[offset:end]
            await store.flush()
            for page, expected in model.items():
                if store.info(LAYER, page).state == PageState.PRESENT:
                    assert store.read(LAYER, page, 0, PAGE) == expected
        finally:
            await store.close()

    asyncio.run(body())


@in_loop
async def test_generation_strictly_increases_with_every_change(make_store: MakeStore) -> None:
    """Every create, write and tombstone returns a generation above all earlier ones."""
    store = make_store()
    gens: list[int] = []
    gens.append(store.create(VOL, LAYER, PAGE, 0, None, FULL)[1])
    gens.append(store.create(VOL, LAYER, PAGE, 1, page_bytes(1), FULL)[1])
    for i in range(6):
        page = i % 2
        gens.append(store.write(VOL, LAYER, PAGE, page, i * 1000, b"\xab" * 10))
        assert store.info(LAYER, page).generation == gens[-1]
    gens.append(store.write(VOL, LAYER, PAGE, 0, 100, b"\xab" * 10))  # same bytes again
    gens.append(store.tombstone(VOL, LAYER, PAGE, 1))
    gens.append(store.create(VOL, OTHER_LAYER, PAGE, 0, None, FULL)[1])
    assert gens == sorted(set(gens)), gens
    before = store.info(LAYER, 0).generation
    await set_mask(store, LAYER, 0, FULL & ~4)
    assert store.info(LAYER, 0).generation == before  # a mask change is not a data change


# --- tombstones, layers, mismatches ------------------------------------------------------


@in_loop
async def test_tombstone_blocks_writes(make_store: MakeStore) -> None:
    """A tombstoned page is TOMBSTONE with a full mask; writes, reads and creates fail on it."""
    store = make_store()
    store.create(VOL, LAYER, PAGE, 0, page_bytes(1), FULL & ~2)
    gen = store.tombstone(VOL, LAYER, PAGE, 0)
    assert store.info(LAYER, 0) == PageInfo(PageState.TOMBSTONE, FULL, gen)
    with pytest.raises(NotFound):
        store.write(VOL, LAYER, PAGE, 0, 0, page_bytes(2))
    with pytest.raises(NotFound):
        store.write(VOL, LAYER, PAGE, 0, 5, b"abc")
    with pytest.raises(NotFound):
        store.read(LAYER, 0, 0, PAGE)
    assert store.create(VOL, LAYER, PAGE, 0, page_bytes(3), FULL) == (False, gen)
    assert store.info(LAYER, 0).state == PageState.TOMBSTONE
    # a tombstone may also mark a page that this layer never held
    gen2 = store.tombstone(VOL, LAYER, PAGE, 8)
    assert store.info(LAYER, 8).state == PageState.TOMBSTONE
    assert gen2 > gen


@in_loop
async def test_delete_layer_removes_its_pages(make_store: MakeStore) -> None:
    """delete_layer drops every page of the layer, answers how many, and spares other layers."""
    store = make_store()
    for page in range(5):
        store.create(VOL, LAYER, PAGE, page, page_bytes(page), FULL)
    store.create(VOL, LAYER, PAGE, 5, None, FULL)
    store.tombstone(VOL, LAYER, PAGE, 6)
    other = page_bytes(99)
    store.create(VOL, OTHER_LAYER, PAGE, 0, other, FULL)
    assert store.delete_layer(LAYER) == 7
    for page in range(7):
        assert store.info(LAYER, page) == ABSENT_INFO
    assert store.layers() == [OTHER_LAYER]
    assert store.layer_volume(LAYER) is None
    assert store.delete_layer(LAYER) == 0
    assert store.delete_layer(12345) == 0
    assert store.read(OTHER_LAYER, 0, 0, PAGE) == other
    assert store.stats().pages == 1
    assert store.enumerate(LAYER, EnumerateWhat.PRESENT, 0, 100) == ([], 0, True)


@in_loop
async def test_layer_volume_and_page_size_mismatch_is_bad_request(make_store: MakeStore) -> None:
    """Using a layer with another volume id or page size is a BadRequest and changes nothing."""
    store = make_store()
    data = page_bytes(4)
    _, gen = store.create(VOL, LAYER, PAGE, 0, data, FULL)
    bad: list[tuple[int, int]] = [(VOL + 1, PAGE), (VOL, 2 * PAGE), (VOL + 1, PAGE // 2)]
    for volume, size in bad:
        with pytest.raises(BadRequest):
            store.write(volume, LAYER, size, 0, 0, b"zz")
        with pytest.raises(BadRequest):
            store.create(volume, LAYER, size, 1, None, FULL)
        with pytest.raises(BadRequest):
            store.tombstone(volume, LAYER, size, 0)
    assert store.info(LAYER, 0) == PageInfo(PageState.PRESENT, FULL, gen)
    assert store.info(LAYER, 1) == ABSENT_INFO
    assert store.read(LAYER, 0, 0, PAGE) == data
    assert store.layer_volume(LAYER) == VOL
    assert store.layer_page_size(LAYER) == PAGE


# --- enumerate, masks, stats, flush ------------------------------------------------------

page_kinds = st.sampled_from(["present", "zero", "dirty", "dirty_zero", "tombstone"])


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    pages=st.dictionaries(st.integers(0, 300), page_kinds, max_size=25),
    limit=st.integers(1, 8),
    start=st.integers(0, 50),
)
def test_enumerate_pages_through_every_match_once(
    make_store: MakeStore, pages: dict[int, str], limit: int, start: int
) -> None:
    """Paginated ENUMERATE lists each matching page >= start exactly once, in order."""

    async def body() -> None:
        store = make_store()
        try:
            for page, kind in pages.items():
                if kind == "tombstone":
                    store.tombstone(VOL, LAYER, PAGE, page)
                    continue
                data = None if kind.endswith("zero") else bytes(PAGE)
                store.create(VOL, LAYER, PAGE, page, data, FULL)
                if kind.startswith("dirty"):
                    await set_mask(store, LAYER, page, FULL & ~0b100)
            expected = {
                EnumerateWhat.DIRTY: sorted(
                    p for p, k in pages.items() if k.startswith("dirty") and p >= start
                ),
                EnumerateWhat.PRESENT: sorted(
                    p for p, k in pages.items() if k != "tombstone" and p >= start
                ),
            }
            for what, want in expected.items():
                seen: list[int] = []
                cursor = start
                for _ in range(len(want) + 2):
                    found, cursor, done = store.enumerate(LAYER, what, cursor, limit)
                    assert len(found) <= limit
                    assert all(p >= start for p in found)
                    seen.extend(found)
                    if done:
                        break
                else:
                    pytest.fail("enumerate never reported done")
                assert seen == want, what
        finally:
            await store.close()

    asyncio.run(body())


@in_loop
async def test_enumerate_unknown_layer_is_empty(make_store: MakeStore) -> None:
    """ENUMERATE of a layer the store never saw answers nothing and done."""
    store = make_store()
    assert store.enumerate(LAYER, EnumerateWhat.DIRTY, 17, 10) == ([], 17, True)


@in_loop
async def test_set_mask_round_trips(make_store: MakeStore) -> None:
    """set_mask changes exactly the mask (decreases and increases), and needs the page."""
    store = make_store()
    store.create(VOL, LAYER, PAGE, 0, page_bytes(1), FULL)
    store.create(VOL, LAYER, PAGE, 1, None, FULL)
    for mask in (FULL & ~1, FULL & ~0b110, 0, FULL & ~0b10, FULL):
        for page in (0, 1):
            before = store.info(LAYER, page)
            await set_mask(store, LAYER, page, mask)
            after = store.info(LAYER, page)
            assert after.mask == mask
            assert (after.state, after.generation) == (before.state, before.generation)
    pending = store.set_mask(LAYER, 0, FULL & ~8, wait_durable=False)
    assert pending is None
    assert store.info(LAYER, 0).mask == FULL & ~8
    with pytest.raises(NotFound):
        store.set_mask(LAYER, 2, FULL)
    with pytest.raises(NotFound):
        store.set_mask(OTHER_LAYER, 0, FULL)


@in_loop
async def test_stats_count_pages_layers_and_data(make_store: MakeStore) -> None:
    """stats counts pages (tombstones included), layers, and the bytes of pages with data."""
    store = make_store()
    store.create(VOL, LAYER, PAGE, 0, page_bytes(1), FULL)
    store.create(VOL, LAYER, PAGE, 1, None, FULL)
    store.create(VOL, LAYER, PAGE, 2, None, FULL)
    store.write(VOL, LAYER, PAGE, 2, 10, b"x")
    store.tombstone(VOL, LAYER, PAGE, 3)
    store.create(VOL + 1, OTHER_LAYER, 2 * PAGE, 0, bytes(2 * PAGE), FULL)
    st_ = store.stats()
    assert (st_.pages, st_.layers) == (5, 2)
    assert st_.used == 2 * PAGE + 2 * PAGE
    assert st_.capacity > 0
    assert store.layers() == [LAYER, OTHER_LAYER]


@in_loop
async def test_flush_keeps_everything(make_store: MakeStore) -> None:
    """FLUSH completes with writes and mask changes outstanding and changes no page."""
    store = make_store()
    await store.flush()  # nothing to do
    data = bytearray(page_bytes(3))
    store.create(VOL, LAYER, PAGE, 0, bytes(data), FULL)
    await set_mask(store, LAYER, 0, FULL & ~2)
    store.write(VOL, LAYER, PAGE, 0, 7, b"hello")
    data[7:12] = b"hello"
    store.set_mask(LAYER, 0, FULL, wait_durable=False)
    before = store.info(LAYER, 0)
    await store.flush()
    await store.flush()
    assert store.info(LAYER, 0) == before
    assert store.read(LAYER, 0, 0, PAGE) == data

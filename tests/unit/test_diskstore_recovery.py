"""Crash recovery of the on-disk page store (lamina.storage.diskstore).

``abandon()`` drops every file handle without flushing: the kernel page cache survives, so
this is what kill -9 leaves behind.  The files are then edited where a test needs the
crash window of the crash model (a data record appended, its data not written), a flipped
bit, or a torn log record, and a new store is opened on the same directory.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from lamina.errors import Corrupt
from lamina.storage.checksums import BLOCK, crc
from lamina.storage.diskstore import REC_HEAD, DiskPageStore, StoreFormatError
from lamina.storage.pagestore import ABSENT_INFO, PageInfo
from lamina.storage.syncmask import FULL
from lamina.wire.messages import EnumerateWhat, PageState
from tests.contract.stores import in_loop

PAGE = 64 * 1024
VOL = 7
LAYER = 3
OTHER_LAYER = 4
Key = tuple[int, int]


def page_bytes(seed: int, size: int = PAGE) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The data directory of the store under test."""
    return tmp_path / "data"


def open_store(root: Path, server_id: str = "s1") -> DiskPageStore:
    store = DiskPageStore(root, server_id)
    store.open()
    return store


def crash_and_reopen(store: DiskPageStore) -> DiskPageStore:
    store.abandon()
    return open_store(store.root)


async def clear(store: DiskPageStore, key: Key, mask: int) -> None:
    pending = store.set_mask(*key, mask)
    if pending is not None:
        await pending


def state_of(store: DiskPageStore, keys: list[Key]) -> dict[Key, tuple[PageInfo, bytes | None]]:
    """Info and (for PRESENT pages) data of each page."""
    out: dict[Key, tuple[PageInfo, bytes | None]] = {}
    for key in keys:
        info = store.info(*key)
        data = store.read(*key, 0, PAGE) if info.state == PageState.PRESENT else None
        out[key] = (info, data)
    return out


def layer_file(root: Path, layer: int) -> Path:
    return root / "layers" / f"{layer}.data"


def patch_file(path: Path, offset: int, data: bytes | bytearray) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def latest_log(root: Path) -> Path:
    return max(root.glob("log.*"), key=lambda p: int(p.name.split(".", 1)[1]))


def log_records(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every intact record of a log file."""
    raw = path.read_bytes()
    out: list[tuple[int, int]] = []
    off = 0
    while off + REC_HEAD.size <= len(raw):
        length, check = REC_HEAD.unpack_from(raw, off)
        body = raw[off + REC_HEAD.size : off + REC_HEAD.size + length]
        if length == 0 or len(body) != length or crc(body) != check:
            break
        out.append((off, off + REC_HEAD.size + length))
        off += REC_HEAD.size + length
    return out


async def populate(store: DiskPageStore) -> list[Key]:
    """Pages in every state, some masks cleared, over two layers; the keys used."""
    store.create(VOL, LAYER, PAGE, 0, page_bytes(0), FULL)
    store.create(VOL, LAYER, PAGE, 1, None, FULL & ~0b10)
    store.create(VOL, LAYER, PAGE, 2, None, FULL)
    store.write(VOL, LAYER, PAGE, 2, 5000, b"partial into a zero page")
    store.create(VOL, LAYER, PAGE, 3, page_bytes(3), FULL)
    store.write(VOL, LAYER, PAGE, 3, 3 * BLOCK, page_bytes(33, 2 * BLOCK))
    store.write(VOL, LAYER, PAGE, 3, 100, b"unaligned")
    await clear(store, (LAYER, 3), FULL & ~0b100)
    store.create(VOL, LAYER, PAGE, 4, page_bytes(4), FULL)
    store.tombstone(VOL, LAYER, PAGE, 4)
    store.create(VOL + 1, OTHER_LAYER, 2 * PAGE, 0, page_bytes(5, 2 * PAGE), FULL)
    store.write(VOL, LAYER, PAGE, 0, PAGE - 3, b"end")
    return [(LAYER, p) for p in range(6)] + [(OTHER_LAYER, 0)]


def read_other(store: DiskPageStore) -> bytes:
    return store.read(OTHER_LAYER, 0, 0, 2 * PAGE)


# --- plain crashes -----------------------------------------------------------------------


@in_loop
async def test_everything_written_survives_a_crash(root: Path) -> None:
    """After kill -9 every page reads back with the same state, mask, generation and data."""
    store = open_store(root)
    keys = await populate(store)
    keys.remove((OTHER_LAYER, 0))
    before = state_of(store, keys)
    other = read_other(store)
    store = crash_and_reopen(store)
    try:
        assert state_of(store, keys) == before
        assert read_other(store) == other
        assert store.layers() == [LAYER, OTHER_LAYER]
        assert store.layer_page_size(OTHER_LAYER) == 2 * PAGE
        assert store.layer_volume(OTHER_LAYER) == VOL + 1
        assert store.info(LAYER, 1).state == PageState.ZERO
        assert store.info(LAYER, 4).state == PageState.TOMBSTONE
        assert store.enumerate(LAYER, EnumerateWhat.DIRTY, 0, 10) == ([1, 3], 4, True)
        # and it survives a second crash right after recovery
        store = crash_and_reopen(store)
        assert state_of(store, keys) == before
    finally:
        await store.close()


@in_loop
async def test_generations_after_reopen_are_above_all_earlier_ones(root: Path) -> None:
    """The incarnation bump makes every generation after a restart larger than any before."""
    store = open_store(root)
    keys = await populate(store)
    highest = max(store.info(*k).generation for k in keys)
    first_incarnation = store.incarnation
    store = crash_and_reopen(store)
    assert store.incarnation == first_incarnation + 1
    gens = [
        store.write(VOL, LAYER, PAGE, 0, 0, b"a"),
        store.create(VOL, LAYER, PAGE, 9, None, FULL)[1],
        store.tombstone(VOL, LAYER, PAGE, 3),
    ]
    assert min(gens) > highest
    assert gens == sorted(gens)
    highest = max(gens)
    await store.close()  # a clean stop bumps it too
    store = open_store(root)
    try:
        assert store.write(VOL, LAYER, PAGE, 2, 0, b"b") > highest
    finally:
        await store.close()


@in_loop
async def test_mask_clears_persist_and_unpersisted_restores_stay_dirty(root: Path) -> None:
    """An awaited mask clear survives a crash; a restore not yet persisted leaves the page dirty."""
    store = open_store(root)
    for page in range(3):
        store.create(VOL, LAYER, PAGE, page, page_bytes(page), FULL)
        await clear(store, (LAYER, page), FULL & ~0b110)
    # page 0 stays cleared; pages 1 and 2 are restored in memory, only page 2 on disk
    store.set_mask(LAYER, 2, FULL, wait_durable=False)
    assert await store.persist_restores() == 1
    store.set_mask(LAYER, 1, FULL, wait_durable=False)
    assert [store.info(LAYER, p).mask for p in range(3)] == [FULL & ~0b110, FULL, FULL]
    store = crash_and_reopen(store)
    try:
        assert store.info(LAYER, 0).mask == FULL & ~0b110
        assert store.info(LAYER, 1).mask == FULL & ~0b110  # dirty: the safe direction
        assert store.info(LAYER, 2).mask == FULL
        assert store.enumerate(LAYER, EnumerateWhat.DIRTY, 0, 10) == ([0, 1], 2, True)
        for page in range(3):
            assert store.read(LAYER, page, 0, PAGE) == page_bytes(page)
    finally:
        await store.close()


@in_loop
async def test_persisted_restore_survives_a_crash(root: Path) -> None:
    """A restore persisted by persist_restores (after its data is durable) survives kill -9."""
    store = open_store(root)
    store.create(VOL, LAYER, PAGE, 0, page_bytes(0), FULL)
    await clear(store, (LAYER, 0), FULL & ~0b10)
    store.write(VOL, LAYER, PAGE, 0, 10, b"new data")
    store.set_mask(LAYER, 0, FULL, wait_durable=False)
    assert await store.persist_restores() == 1
    store = crash_and_reopen(store)
    try:
        assert store.info(LAYER, 0).mask == FULL
        assert store.read(LAYER, 0, 10, 8) == b"new data"
    finally:
        await store.close()


@in_loop
async def test_deleted_layer_stays_deleted_after_a_crash(root: Path) -> None:
    """A layer dropped before kill -9 is gone after recovery, its file too."""
    store = open_store(root)
    store.create(VOL, LAYER, PAGE, 0, page_bytes(0), FULL)
    store.create(VOL, OTHER_LAYER, PAGE, 0, page_bytes(1), FULL)
    assert store.delete_layer(LAYER) == 1
    store = crash_and_reopen(store)
    try:
        assert store.layers() == [OTHER_LAYER]
        assert store.info(LAYER, 0) == ABSENT_INFO
        assert not layer_file(root, LAYER).exists()
        assert store.read(OTHER_LAYER, 0, 0, PAGE) == page_bytes(1)
    finally:
        await store.close()


# --- the crash window: record appended, data not written ---------------------------------


@pytest.mark.parametrize(
    ("offset", "length"),
    [(2 * BLOCK, 2 * BLOCK), (2 * BLOCK + 100, 50), (BLOCK - 10, 20), (0, PAGE)],
)
@in_loop
async def test_last_write_whose_data_never_landed_keeps_old_blocks(
    root: Path, offset: int, length: int
) -> None:
    """If the last write's data never reached the file, recovery keeps the old checksums."""
    store = open_store(root)
    old = page_bytes(1)
    store.create(VOL, LAYER, PAGE, 5, old, FULL)
    store.create(VOL, LAYER, PAGE, 6, page_bytes(2), FULL)
    await store.flush()
    store.write(VOL, LAYER, PAGE, 5, offset, page_bytes(9, length))
    store.abandon()
    # the crash hit between the record and the data: the file still holds the old blocks
    b0, b1 = offset // BLOCK, -(-(offset + length) // BLOCK)
    patch_file(layer_file(root, LAYER), 5 * PAGE + b0 * BLOCK, old[b0 * BLOCK : b1 * BLOCK])
    store = open_store(root)
    try:
        assert store.read(LAYER, 5, 0, PAGE) == old  # no Corrupt: the old data is whole
        assert store.info(LAYER, 5).state == PageState.PRESENT
        assert store.read(LAYER, 6, 0, PAGE) == page_bytes(2)
        store = crash_and_reopen(store)  # the decision itself was made durable
        assert store.read(LAYER, 5, 0, PAGE) == old
    finally:
        await store.close()


@in_loop
async def test_last_write_that_landed_in_part_keeps_each_block_it_finds(root: Path) -> None:
    """Recovery decides per block: blocks that were written keep the new checksum."""
    store = open_store(root)
    old = page_bytes(1)
    store.create(VOL, LAYER, PAGE, 0, old, FULL)
    new = page_bytes(2, 3 * BLOCK)
    store.write(VOL, LAYER, PAGE, 0, 4 * BLOCK, new)
    store.abandon()
    patch_file(layer_file(root, LAYER), 5 * BLOCK, old[5 * BLOCK : 6 * BLOCK])  # middle block
    store = open_store(root)
    try:
        expected = bytearray(old)
        expected[4 * BLOCK : 7 * BLOCK] = new
        expected[5 * BLOCK : 6 * BLOCK] = old[5 * BLOCK : 6 * BLOCK]
        assert store.read(LAYER, 0, 0, PAGE) == expected
    finally:
        await store.close()


@in_loop
async def test_first_write_to_a_zero_page_that_never_landed_is_undone(root: Path) -> None:
    """A ZERO page whose first write never reached the file is a ZERO page again."""
    store = open_store(root)
    store.create(VOL, LAYER, PAGE, 0, page_bytes(0), FULL)
    _, gen = store.create(VOL, LAYER, PAGE, 1, None, FULL & ~0b10)
    store.write(VOL, LAYER, PAGE, 1, 3000, b"never written")
    store.abandon()
    patch_file(layer_file(root, LAYER), PAGE + 3000, bytes(13))
    store = open_store(root)
    try:
        assert store.info(LAYER, 1) == PageInfo(PageState.ZERO, FULL & ~0b10, gen)
        assert store.read(LAYER, 0, 0, PAGE) == page_bytes(0)
        store.write(VOL, LAYER, PAGE, 1, 0, b"again")
        assert store.read(LAYER, 1, 0, 6) == b"again\0"
    finally:
        await store.close()


@in_loop
async def test_create_whose_data_never_landed_is_undone(root: Path) -> None:
    """A CREATE with data whose bytes never reached the file leaves the page absent."""
    store = open_store(root)
    store.create(VOL, LAYER, PAGE, 0, page_bytes(0), FULL)
    store.create(VOL, LAYER, PAGE, 1, page_bytes(1), FULL)
    store.abandon()
    patch_file(layer_file(root, LAYER), PAGE, bytes(PAGE))
    store = open_store(root)
    try:
        assert store.info(LAYER, 1) == ABSENT_INFO
        assert store.read(LAYER, 0, 0, PAGE) == page_bytes(0)
    finally:
        await store.close()


# --- bit rot and quarantine --------------------------------------------------------------


@in_loop
async def test_flipped_byte_quarantines_only_that_page(root: Path) -> None:
    """A flipped byte in an older page: Corrupt, QUARANTINED, copy kept, others fine, repairable."""
    store = open_store(root)
    for page in range(3):
        store.create(VOL, LAYER, PAGE, page, page_bytes(page), FULL)
    store.write(VOL, LAYER, PAGE, 2, 0, b"last record")  # page 0 is not the last data record
    expected2 = bytearray(page_bytes(2))
    expected2[:11] = b"last record"
    store.abandon()
    rotten = bytearray(page_bytes(0))
    rotten[7 * BLOCK + 5] ^= 0x10
    patch_file(layer_file(root, LAYER), 7 * BLOCK + 5, rotten[7 * BLOCK + 5 : 7 * BLOCK + 6])
    store = open_store(root)
    try:
        assert store.read(LAYER, 0, 0, BLOCK) == page_bytes(0)[:BLOCK]  # good blocks still read
        gen = store.info(LAYER, 0).generation
        with pytest.raises(Corrupt):
            store.read(LAYER, 0, 0, PAGE)
        info = store.info(LAYER, 0)
        assert info.state == PageState.QUARANTINED
        assert info.generation > gen
        with pytest.raises(Corrupt):
            store.read(LAYER, 0, 0, 10)
        kept = list((root / "quarantine").iterdir())
        assert len(kept) == 1
        assert kept[0].read_bytes() == rotten
        assert store.read(LAYER, 1, 0, PAGE) == page_bytes(1)
        assert store.read(LAYER, 2, 0, PAGE) == expected2
        assert store.enumerate(LAYER, EnumerateWhat.DIRTY, 0, 10) == ([0], 1, True)
        with pytest.raises(Corrupt):
            store.write(VOL, LAYER, PAGE, 0, 0, b"partial repair is refused")
        assert store.stats().used == 2 * PAGE
        # a full-page write (the driver's repair from a good copy) makes it whole again
        repair = page_bytes(0)
        assert store.write(VOL, LAYER, PAGE, 0, 0, repair) > info.generation
        assert store.info(LAYER, 0).state == PageState.PRESENT
        assert store.read(LAYER, 0, 0, PAGE) == repair
        store = crash_and_reopen(store)
        assert store.read(LAYER, 0, 0, PAGE) == repair
    finally:
        await store.close()


@in_loop
async def test_quarantine_survives_a_crash(root: Path) -> None:
    """A page quarantined after its last write is still QUARANTINED after kill -9."""
    store = open_store(root)
    store.create(VOL, LAYER, PAGE, 0, page_bytes(0), FULL)
    store.create(VOL, LAYER, PAGE, 1, page_bytes(1), FULL)
    store.write(VOL, LAYER, PAGE, 0, 0, page_bytes(5, BLOCK))  # the last data record
    patch_file(layer_file(root, LAYER), 9 * BLOCK, b"\xff" * 3)  # bit rot elsewhere in page 0
    with pytest.raises(Corrupt):
        store.read(LAYER, 0, 0, PAGE)
    assert store.info(LAYER, 0).state == PageState.QUARANTINED
    store = crash_and_reopen(store)
    try:
        assert store.info(LAYER, 0).state == PageState.QUARANTINED
        with pytest.raises(Corrupt):
            store.read(LAYER, 0, 0, PAGE)
        assert store.read(LAYER, 1, 0, PAGE) == page_bytes(1)
        store.write(VOL, LAYER, PAGE, 0, 0, page_bytes(6))
        assert store.read(LAYER, 0, 0, PAGE) == page_bytes(6)
    finally:
        await store.close()


# --- checkpoints, ownership, torn logs ---------------------------------------------------


@in_loop
async def test_checkpoint_then_more_writes_then_crash(root: Path) -> None:
    """State from before a checkpoint and from the log after it are both recovered."""
    store = open_store(root)
    keys = await populate(store)
    log_before = latest_log(root)
    await store.checkpoint()
    assert latest_log(root) != log_before
    assert not log_before.exists()  # folded into meta.snap
    assert (root / "meta.snap").exists()
    store.write(VOL, LAYER, PAGE, 0, 7, b"after the checkpoint")
    store.create(VOL, LAYER, PAGE, 10, page_bytes(10), FULL)
    store.create(VOL, 5, PAGE, 0, page_bytes(11), FULL)
    store.tombstone(VOL, LAYER, PAGE, 1)
    await clear(store, (LAYER, 0), FULL & ~0b1)
    keys += [(LAYER, 10), (5, 0)]
    keys.remove((OTHER_LAYER, 0))
    before = state_of(store, keys)
    other = read_other(store)
    store = crash_and_reopen(store)
    try:
        assert state_of(store, keys) == before
        assert read_other(store) == other
        assert store.layers() == [LAYER, OTHER_LAYER, 5]
    finally:
        await store.close()


@in_loop
async def test_clean_close_and_reopen_keeps_everything(root: Path) -> None:
    """close() (flush, checkpoint) and a reopen keep every page, restores included."""
    store = open_store(root)
    keys = await populate(store)
    store.set_mask(LAYER, 3, FULL, wait_durable=False)
    keys.remove((OTHER_LAYER, 0))
    before = state_of(store, keys)
    await store.close()
    store = open_store(root)
    try:
        assert state_of(store, keys) == before
        assert store.info(LAYER, 3).mask == FULL  # close persisted the restore
    finally:
        await store.close()


def test_directory_of_another_server_is_refused(root: Path) -> None:
    """Opening a data directory that belongs to another server id raises StoreFormatError."""

    async def body() -> None:
        store = open_store(root, "s1")
        store.create(VOL, LAYER, PAGE, 0, page_bytes(0), FULL)
        await store.close()

    asyncio.run(body())
    with pytest.raises(StoreFormatError, match="s1"):
        DiskPageStore(root, "s2").open()
    with pytest.raises(StoreFormatError):
        DiskPageStore(root, "s").open()


def test_directory_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    """A non-empty directory without FORMAT, or with a foreign FORMAT, is not opened."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "precious.txt").write_text("not ours")
    with pytest.raises(StoreFormatError):
        DiskPageStore(tmp_path / "a", "s1").open()
    assert (tmp_path / "a" / "precious.txt").read_text() == "not ours"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "FORMAT").write_text("something-else 1\nserver s1\n")
    with pytest.raises(StoreFormatError):
        DiskPageStore(tmp_path / "b", "s1").open()


@pytest.mark.parametrize("tear", ["truncate", "garble", "half_header"])
@in_loop
async def test_torn_last_log_record_is_ignored(root: Path, tear: str) -> None:
    """A torn last record (cut short, garbled, or a partial header) is ignored on reopen."""
    store = open_store(root)
    store.create(VOL, LAYER, PAGE, 0, page_bytes(0), FULL)
    store.create(VOL, LAYER, PAGE, 1, page_bytes(1), FULL)
    await clear(store, (LAYER, 0), FULL & ~0b10)
    before = state_of(store, [(LAYER, 0), (LAYER, 1)])
    # the last record: a mask clear nobody waited for, torn by the crash
    store.set_mask(LAYER, 1, FULL & ~0b100, wait_durable=False)
    store.abandon()
    path = latest_log(root)
    records = log_records(path)
    _, end = records[-1]
    if tear == "truncate":
        os.truncate(path, end - 3)
    elif tear == "garble":
        patch_file(path, end - 2, b"\xde\xad")
    else:
        # the last record is whole; what follows it is the start of a header, cut short
        info1, data1 = before[(LAYER, 1)]
        before[(LAYER, 1)] = (PageInfo(info1.state, FULL & ~0b100, info1.generation), data1)
        patch_file(path, end, REC_HEAD.pack(1000, 0)[:5])
    store = open_store(root)
    try:
        assert state_of(store, [(LAYER, 0), (LAYER, 1)]) == before
        gen = store.write(VOL, LAYER, PAGE, 1, 0, b"fresh")
        store = crash_and_reopen(store)  # the new log is sane
        assert store.info(LAYER, 1).generation == gen
        assert store.read(LAYER, 1, 0, 5) == b"fresh"
    finally:
        await store.close()


@in_loop
async def test_a_damaged_page_created_by_the_last_record_is_reported_not_undone(
    root: Path,
) -> None:
    """A page created by the last record whose data is neither what was written nor the
    untouched zeros of its extent is damage: it reads CORRUPT instead of disappearing."""
    store = open_store(root)
    store.create(VOL, LAYER, PAGE, 0, page_bytes(0), FULL)
    store.abandon()
    patch_file(layer_file(root, LAYER), 100, b"\xff")
    store = open_store(root)
    try:
        assert store.info(LAYER, 0).state == PageState.PRESENT
        with pytest.raises(Corrupt):
            store.read(LAYER, 0, 0, PAGE)
    finally:
        await store.close()


@in_loop
async def test_a_page_allocated_again_never_shows_bytes_of_an_undone_create(root: Path) -> None:
    """A create undone by recovery (its data landed only in part) leaves no bytes behind:
    the page, created again as a zero page and written in part, reads zeros elsewhere."""
    store = open_store(root)
    store.create(VOL, LAYER, PAGE, 0, page_bytes(0), FULL)
    store.abandon()
    patch_file(layer_file(root, LAYER), 3 * BLOCK, bytes(BLOCK))  # one block never landed
    store = open_store(root)
    try:
        assert store.info(LAYER, 0) == ABSENT_INFO
        store.create(VOL, LAYER, PAGE, 0, None, FULL)
        store.write(VOL, LAYER, PAGE, 0, 0, b"new")
        assert store.read(LAYER, 0, 0, PAGE) == b"new" + bytes(PAGE - 3)
    finally:
        await store.close()


@in_loop
async def test_lineage_tokens_survive_a_restart_and_go_with_their_layer(tmp_path: Path) -> None:
    """The on-disk store keeps each layer id's lineage token across a restart (from the
    log and from a checkpoint); deleting the layer forgets it."""
    store = DiskPageStore(tmp_path / "s", "s1")
    store.open()
    store.record_lineage(3, 0xA)
    store.create(7, 3, PAGE, 0, bytes(PAGE), FULL)
    store.record_lineage(9, 0xB)  # ahead of its layer
    await store.flush()
    await store.close()
    again = DiskPageStore(tmp_path / "s", "s1")
    again.open()  # replays the log, then writes a checkpoint
    assert (again.layer_lineage(3), again.layer_lineage(9)) == (0xA, 0xB)
    again.delete_layer(3)
    again.delete_layer(9)
    await again.flush()
    await again.close()
    third = DiskPageStore(tmp_path / "s", "s1")
    third.open()
    assert (third.layer_lineage(3), third.layer_lineage(9)) == (0, 0)
    await third.close()


@in_loop
async def test_a_long_log_is_checkpointed_while_pages_are_written(root: Path) -> None:
    """Once the log passes checkpoint_bytes under writes (each recorded active first, as the
    service does), a checkpoint starts a new log and folds the old one; nothing is lost."""
    big = 1 << 20  # a whole-page write of 1 MiB logs about 1 KiB of checksums
    store = DiskPageStore(root, "s1", checkpoint_bytes=1 << 20)
    store.open()
    first = latest_log(root)
    store.create(VOL, OTHER_LAYER, big, 0, bytes(big), FULL)
    data = b""
    try:
        for i in range(3000):
            await clear(store, (OTHER_LAYER, 0), store.info(OTHER_LAYER, 0).mask)
            data = i.to_bytes(4, "big") * (big // 4)
            store.write(VOL, OTHER_LAYER, big, 0, 0, data)
            if i % 100 == 0:
                await store.flush()
            await asyncio.sleep(0)  # the checkpoint runs on the loop
            if latest_log(root) != first and not first.exists():
                break
        else:
            pytest.fail("the log was never checkpointed")
        await store.flush()
        store = crash_and_reopen(store)
        assert store.read(OTHER_LAYER, 0, 0, big) == data
    finally:
        await store.close()

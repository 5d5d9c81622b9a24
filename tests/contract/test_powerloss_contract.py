"""The on-disk page store through power cuts at random points (the crash model of
docs/ondisk.md, "After a power failure").

A random sequence of store operations runs on the disk that can lose power
(:class:`lamina.storage.powerloss.PowerLossFiles`); the power is cut after it, keeping a
seeded arbitrary subset of the unsynced 4 KiB blocks and name changes; a new store opens
the directory.  A model knows every page as of the last completed FLUSH and every state
and block version each page had since.  What must hold after recovery:

1. everything acknowledged before the last completed FLUSH reads back exactly (a page
   left alone since reads as it stood then);
2. nothing reads CORRUPT;
3. every page changed since reads, state by state and block by block, as it stood at that
   FLUSH or as some later operation left it (old or new bytes, never anything else); an
   acknowledged mask clear that no persisted restore took back is still there.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lamina.errors import Corrupt
from lamina.storage.checksums import BLOCK
from lamina.storage.diskstore import DiskPageStore
from lamina.storage.powerloss import PowerLossFiles, seed_keeping
from lamina.storage.syncmask import FULL
from lamina.wire.messages import PageState

PAGE = 64 * 1024
BLOCKS = PAGE // BLOCK
VOL = 7
LAYERS = (3, 4)
PAGES = 4

#: a page as the model sees it: (state, bytes of a PRESENT page or None)
View = tuple[PageState, bytes | None]
ABSENT: View = (PageState.ABSENT, None)


def page_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Model:
    """Pages now, at the last completed FLUSH, and every state / block version since."""

    now: dict[tuple[int, int], View] = field(default_factory=dict)
    flushed: dict[tuple[int, int], View] = field(default_factory=dict)
    states: dict[tuple[int, int], set[PageState]] = field(default_factory=dict)
    blocks: dict[tuple[int, int], list[set[bytes]]] = field(default_factory=dict)
    #: bits of an acknowledged mask clear that no later restore may have persisted
    cleared: dict[tuple[int, int], int] = field(default_factory=dict)
    #: bits raised in memory since, which a FLUSH or background pass may persist
    restored: dict[tuple[int, int], int] = field(default_factory=dict)
    masks: dict[tuple[int, int], int] = field(default_factory=dict)  # in memory

    def set_mask(self, key: tuple[int, int], mask: int) -> None:
        old = self.masks.get(key, FULL)
        self.masks[key] = mask
        self.cleared[key] = self.cleared.get(key, 0) | (old & ~mask)
        self.restored[key] = (self.restored.get(key, 0) | (mask & ~old)) & mask

    def persisted_restores(self) -> None:
        for key, bits in self.restored.items():
            self.cleared[key] = self.cleared.get(key, 0) & ~bits
        self.restored.clear()

    def view(self, key: tuple[int, int]) -> View:
        return self.now.get(key, ABSENT)

    def set(self, key: tuple[int, int], view: View) -> None:
        self.cleared.pop(key, None)
        self.restored.pop(key, None)
        self.masks.pop(key, None)
        if key not in self.states:  # first change since the flush: the old view counts too
            self._note(key, self.flushed.get(key, ABSENT))
        self.now[key] = view
        self._note(key, view)

    def _note(self, key: tuple[int, int], view: View) -> None:
        self.states.setdefault(key, set()).add(view[0])
        versions = self.blocks.setdefault(key, [set() for _ in range(BLOCKS)])
        data = view[1] if view[0] == PageState.PRESENT else None
        if view[0] == PageState.ZERO:
            data = bytes(PAGE)
        if data is not None:
            for b in range(BLOCKS):
                versions[b].add(data[b * BLOCK : (b + 1) * BLOCK])

    def flush(self) -> None:
        self.flushed = dict(self.now)
        self.states = {}
        self.blocks = {}
        for key, view in self.now.items():
            self._note(key, view)

    def changed(self, key: tuple[int, int]) -> bool:
        return key in self.states and (
            self.states[key] != {self.flushed.get(key, ABSENT)[0]}
            or any(len(v) > 1 for v in self.blocks[key])
        )


ops = st.one_of(
    st.tuples(st.just("create"), st.sampled_from(LAYERS), st.integers(0, PAGES - 1), st.booleans()),
    st.tuples(
        st.just("write"),
        st.sampled_from(LAYERS),
        st.integers(0, PAGES - 1),
        st.one_of(
            st.tuples(st.integers(0, BLOCKS - 1).map(lambda b: b * BLOCK), st.just(BLOCK)),
            st.tuples(st.integers(0, PAGE - 1), st.integers(1, 3 * BLOCK)),
            st.just((0, PAGE)),
        ),
    ),
    st.tuples(st.just("clear"), st.sampled_from(LAYERS), st.integers(0, PAGES - 1)),
    st.tuples(st.just("restore"), st.sampled_from(LAYERS), st.integers(0, PAGES - 1)),
    st.tuples(st.just("tombstone"), st.sampled_from(LAYERS), st.integers(0, PAGES - 1)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("persist")),
    st.tuples(st.just("checkpoint")),
    st.tuples(st.just("drop"), st.sampled_from(LAYERS)),
)


async def apply(store: DiskPageStore, model: Model, op: tuple[object, ...], seed: int) -> None:
    kind = op[0]
    if kind == "flush":
        await store.flush()
        model.flush()
        model.persisted_restores()
        return
    if kind == "persist":
        await store.persist_restores()
        model.persisted_restores()
        return
    if kind == "checkpoint":
        await store.checkpoint()
        return
    if kind == "drop":
        layer = op[1]
        assert isinstance(layer, int)
        store.delete_layer(layer)
        for key in [k for k in model.now if k[0] == layer]:
            model.set(key, ABSENT)
        return
    layer, page = op[1], op[2]
    assert isinstance(layer, int)
    assert isinstance(page, int)
    key = (layer, page)
    state, data = model.view(key)
    if kind == "create":
        if state == PageState.ABSENT:
            new = None if op[3] else page_bytes(seed, PAGE)
            store.create(VOL, layer, PAGE, page, new, FULL)
            model.set(key, (PageState.ZERO, None) if new is None else (PageState.PRESENT, new))
    elif kind == "write":
        if state in (PageState.ZERO, PageState.PRESENT):
            span = op[3]
            assert isinstance(span, tuple)
            offset, wanted = int(span[0]), int(span[1])
            length = min(wanted, PAGE - offset)
            chunk = page_bytes(seed, length)
            image = bytearray(data if data is not None else bytes(PAGE))
            image[offset : offset + length] = chunk
            # as the storage service does: set_mask (awaited) before every write
            pending = store.set_mask(layer, page, store.info(layer, page).mask)
            if pending is not None:
                await pending
            store.write(VOL, layer, PAGE, page, offset, chunk)
            model.set(key, (PageState.PRESENT, bytes(image)))
    elif kind == "clear":
        if state in (PageState.ZERO, PageState.PRESENT):
            bit = 1 << (seed % 3)
            pending = store.set_mask(layer, page, FULL & ~bit)
            if pending is not None:
                await pending
            model.set_mask(key, FULL & ~bit)
    elif kind == "restore":
        if state in (PageState.ZERO, PageState.PRESENT):
            store.set_mask(layer, page, FULL, wait_durable=False)
            model.set_mask(key, FULL)
    elif kind == "tombstone":
        store.tombstone(VOL, layer, PAGE, page)
        model.set(key, (PageState.TOMBSTONE, None))


def check(store: DiskPageStore, model: Model) -> None:
    """The three properties of the module docstring, page by page."""
    for layer in LAYERS:
        for page in range(PAGES):
            key = (layer, page)
            info = store.info(layer, page)
            data = None
            if info.state == PageState.PRESENT:
                try:
                    data = store.read(layer, page, 0, PAGE)
                except Corrupt as exc:  # property 2
                    pytest.fail(f"page {key} reads CORRUPT after the power cut: {exc}")
            assert info.state != PageState.QUARANTINED, key
            if info.state in (PageState.PRESENT, PageState.ZERO):  # an acked clear survives
                assert not info.mask & model.cleared.get(key, 0), (key, hex(info.mask))
            if not model.changed(key):  # property 1
                flushed = model.flushed.get(key, ABSENT)
                assert info.state == flushed[0], key
                if info.state == PageState.PRESENT:
                    assert data == flushed[1], f"flushed page {key} does not read back"
                continue
            allowed = model.states[key]  # property 3
            assert info.state in allowed, (key, info.state, allowed)
            if data is not None:
                for b in range(BLOCKS):
                    blk = data[b * BLOCK : (b + 1) * BLOCK]
                    assert blk in model.blocks[key][b], f"page {key} block {b}: neither old nor new"


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(  # a write whose data reaches the disk while its record does not
    steps=[(("create", 3, 0, False), 1), (("flush",), 0), (("write", 3, 0, (0, BLOCK)), 5)],
    cut=59,
    twice=False,
    prefilled=False,
)
@example(  # a dropped layer whose file's unlink outlives its DROP record
    steps=[(("create", 3, 0, False), 1), (("flush",), 0), (("drop", 3), 0)],
    cut=35,
    twice=False,
    prefilled=False,
)
@example(  # a group commit for page 1 makes page 0's checksums durable before its data
    steps=[(("create", 3, 0, False), 0), (("create", 3, 1, False), 0), (("clear", 3, 0), 0)],
    cut=0,
    twice=False,
    prefilled=False,
)
@given(
    steps=st.lists(st.tuples(ops, st.integers(0, 2**32)), min_size=1, max_size=30),
    cut=st.integers(0, 2**32),
    twice=st.booleans(),
    prefilled=st.booleans(),
)
def test_power_cut_at_a_random_point(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[tuple[object, ...], int]],
    cut: int,
    twice: bool,
    prefilled: bool,
) -> None:
    """After a power cut anywhere in a random run, flushed pages read back exactly, nothing
    reads CORRUPT, and every other page reads as it stood at the FLUSH or after a later write."""
    root = tmp_path_factory.mktemp("powerloss")

    async def body() -> None:
        model = Model()
        files = PowerLossFiles(root / "trash")
        store = DiskPageStore(root / "data", "s1", files=files)
        store.open()
        setup: list[tuple[tuple[object, ...], int]] = (
            []
            if not prefilled
            else [
                *((("create", LAYERS[0], page, False), page) for page in range(PAGES)),
                (("flush",), 0),
            ]
        )
        for op, seed in [*setup, *steps]:
            await apply(store, model, op, seed)
        files.power_cut(cut)
        store.abandon()
        rounds = 2 if twice else 1  # a second cut right after recovery changes nothing
        for n in range(rounds):
            files = PowerLossFiles(root / "trash")
            store = DiskPageStore(root / "data", "s1", files=files)
            store.open()
            check(store, model)
            if n + 1 < rounds:
                files.power_cut(cut + 1)
                store.abandon()
        await store.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_a_group_commit_of_another_page_does_not_make_unsynced_checksums_bind(
    tmp_path: Path,
) -> None:
    """The sequence of issue 11 point 2: flush, write page A, clear page B's mask (a group
    commit), write B, lose the power with A's data unsynced: A reads old bytes, not CORRUPT."""
    model = Model()
    steps: list[tuple[tuple[object, ...], int]] = [
        (("create", 3, 0, False), 1),
        (("create", 3, 1, False), 2),
        (("flush",), 0),
        (("write", 3, 0, (0, BLOCK)), 3),
        (("clear", 3, 1), 4),
        (("write", 3, 1, (BLOCK, BLOCK)), 5),
    ]
    seed = seed_keeping(0.0, 0.0)

    async def body() -> None:
        files = PowerLossFiles(tmp_path / "trash")
        store = DiskPageStore(tmp_path / "data", "s1", files=files)
        store.open()
        for op, s in steps:
            await apply(store, model, op, s)
        files.power_cut(seed)  # keeps no unsynced block
        store.abandon()
        store = DiskPageStore(tmp_path / "data", "s1")
        store.open()
        check(store, model)
        await store.close()

    asyncio.run(asyncio.wait_for(body(), 60))

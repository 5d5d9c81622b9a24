"""The simulated store keeps the durability rules of the disk store (docs/ondisk.md)."""

from __future__ import annotations

import random

from lamina.storage.syncmask import FULL
from tests.sim.store import SimStore

UNIT = 4096
PAGE = 4 * UNIT


def _cut_that_mixes() -> tuple[SimStore, bytes]:
    """A store whose page 0, written since its last sync, kept only some of its new
    units through a power cut; what the page then holds."""
    for seed in range(100):
        store = SimStore(random.Random(seed), UNIT)
        store.create(1, 1, PAGE, 0, bytes(PAGE), FULL)
        store.sync()
        store.write(1, 1, PAGE, 0, 0, b"\xff" * PAGE)
        store.power_cut()
        held = store.read(1, 0, 0, PAGE)
        if held not in (bytes(PAGE), b"\xff" * PAGE):
            return store, held
    raise AssertionError("no seed in 100 kept part of the write")


def test_what_survived_a_power_cut_is_durable() -> None:
    # The disk store checkpoints what recovery found on disk before it serves, so a
    # second power cut must not take the page back further: a mask that vouches for
    # those bytes (a resynchronisation copied them to another copy) would then lie.
    store, held = _cut_that_mixes()
    store.set_mask(1, 0, FULL & ~0b10)
    store.set_mask(1, 0, FULL, wait_durable=False)
    store.sync()
    store.power_cut()
    assert store.read(1, 0, 0, PAGE) == held
    assert store.info(1, 0).mask == FULL


def test_a_power_cut_keeps_what_was_synced() -> None:
    store = SimStore(random.Random(1), UNIT)
    store.create(1, 1, PAGE, 0, b"\x01" * PAGE, FULL)
    store.sync()
    store.crash()
    store.power_cut()
    assert store.read(1, 0, 0, PAGE) == b"\x01" * PAGE

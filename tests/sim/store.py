"""The page store of a simulated server: ``MemPageStore`` with a durable state beside
its live one, following the durability rules of the on-disk store (docs/ondisk.md):

- a mask decrease is durable at once (the disk store makes the clear durable before the
  write's data is applied);
- data, created pages and mask increases (restores, MARK_CLEAN) become durable only at
  a sync: FLUSH, a FUA write, or the server's periodic pass that persists restores
  (which fdatasyncs the data first);
- a crash of the server process keeps the data (the page cache survives) and loses the
  mask increases not persisted yet;
- a power cut replaces the live state by the durable one, except that a page written
  since its last sync keeps, per ``unit`` bytes (the simulation's 8 KiB slot), either
  its old or its new bytes (a seeded choice); such a page gets a new generation unless
  every unit kept its old bytes, and what it kept is durable from then on (the disk
  store checkpoints what its recovery found before it serves).

A failed disk (``fail``) answers every later write, mask change and sync with
StorageIOError, and its page cache has lost the writes that did not reach the disk (as
after a failed writeback: the power-cut rule for the data, while the metadata in memory
still describes the new bytes).  Once an
operation failed, ``failure`` says why, as the disk store's does, and the real service
refuses every request (unless ``fail_stop`` is off: then it goes on serving what the
page cache holds).
"""

from __future__ import annotations

import random

from lamina.errors import StorageIOError
from lamina.storage.memstore import MemPageStore, _Layer, _Page

Key = tuple[int, int]


def _copy(p: _Page) -> _Page:
    return _Page(p.state, p.mask, p.generation, None if p.data is None else bytearray(p.data))


class SimStore(MemPageStore):
    def __init__(self, rng: random.Random, unit: int, fail_stop: bool = True) -> None:
        super().__init__()
        self.rng = rng
        self.unit = unit
        self.fail_stop = fail_stop
        self.failed = ""  # the disk fails every write and sync
        self._failure: str | None = None  # an operation failed: the store fail-stopped
        self.syncs = 0
        self._durable_layers: dict[int, tuple[int, int]] = {}  # layer -> (volume, page size)
        self._durable: dict[Key, _Page] = {}
        self._unsynced: set[Key] = set()  # pages whose data or state changed since a sync

    # -- the failing disk -----------------------------------------------------------------

    def fail(self, why: str) -> int:
        """The disk fails, and writeback with it: the page cache now holds what the disk
        holds (per unit, the old or the new bytes of a page written since its last sync),
        while the store's metadata in memory (states, masks, generations) is unchanged;
        the number of pages whose data changed."""
        changed = 0
        for key in sorted(self._unsynced):
            live, old = self._page(*key), self._durable.get(key)
            if live is None or live.data is None:
                continue
            disk = _Page(live.state, live.mask, live.generation, None)
            if old is not None and old.data is not None:
                disk.data = bytearray(old.data)
            self._mix(disk, live)
            data = disk.data if disk.data is not None else bytearray(len(live.data))
            if old is not None and old.data is not None:
                old.data = bytearray(data)  # what reached the disk is on it
            if data != live.data:
                live.data = data
                changed += 1
        self.failed = why
        return changed

    @property
    def failure(self) -> str | None:
        return self._failure

    def _check(self) -> None:
        if self.failed:
            if self.fail_stop:
                self._failure = f"a sync failed: {self.failed}"
            raise StorageIOError(f"store failed: {self.failed}")

    # -- changes ----------------------------------------------------------------------------

    def write(
        self,
        volume_id: int,
        layer_id: int,
        page_size: int,
        page: int,
        offset: int,
        data: bytes | bytearray,
    ) -> int:
        self._check()
        gen = super().write(volume_id, layer_id, page_size, page, offset, data)
        self._unsynced.add((layer_id, page))
        return gen

    def create(
        self,
        volume_id: int,
        layer_id: int,
        page_size: int,
        page: int,
        data: bytes | bytearray | None,
        mask: int,
    ) -> tuple[bool, int]:
        self._check()
        created, gen = super().create(volume_id, layer_id, page_size, page, data, mask)
        if created:
            self._unsynced.add((layer_id, page))
        return created, gen

    def set_mask(self, layer_id: int, page: int, mask: int, wait_durable: bool = True) -> None:
        self._check()
        super().set_mask(layer_id, page, mask, wait_durable)
        durable = self._durable.get((layer_id, page))
        if durable is not None and durable.mask & ~mask:
            durable.mask &= mask  # the clear is durable before anything it guards changes

    def tombstone(self, volume_id: int, layer_id: int, page_size: int, page: int) -> int:
        self._check()
        gen = super().tombstone(volume_id, layer_id, page_size, page)
        self._unsynced.add((layer_id, page))
        return gen

    def delete_layer(self, layer_id: int) -> int:
        self._check()
        self._durable_layers.pop(layer_id, None)
        for key in [k for k in self._durable if k[0] == layer_id]:
            del self._durable[key]
        self._unsynced = {k for k in self._unsynced if k[0] != layer_id}
        return super().delete_layer(layer_id)

    async def flush(self) -> None:
        self.sync()

    # -- durability -------------------------------------------------------------------------

    def sync(self) -> None:
        """fdatasync everything, then persist every mask increase."""
        self._check()
        self.syncs += 1
        for layer_id, layer in self._layers.items():
            self._durable_layers[layer_id] = (layer.volume_id, layer.page_size)
            for page, p in layer.pages.items():
                key = (layer_id, page)
                if key in self._unsynced or key not in self._durable:
                    self._durable[key] = _copy(p)
                else:
                    self._durable[key].mask = p.mask
        self._unsynced.clear()

    def crash(self) -> None:
        """The server process dies (kill -9): the page cache keeps the data, but a mask
        increase not yet persisted (it waits for a sync) is lost with the process."""
        for key, p in self._durable.items():
            live = self._page(*key)
            if live is not None and live.mask != p.mask:
                live.mask = p.mask

    def power_cut(self) -> int:
        """Lose what was not durable; the number of pages that kept some unsynced bytes."""
        mixed = self._revert()
        self.failed = ""
        self._failure = None
        return mixed

    def _revert(self) -> int:
        mixed = 0
        live = {(lid, n): p for lid, layer in self._layers.items() for n, p in layer.pages.items()}
        self._layers = {
            lid: _Layer(volume, size) for lid, (volume, size) in self._durable_layers.items()
        }
        for key, old in sorted(self._durable.items()):
            page = _copy(old)
            new = live.get(key)
            if key in self._unsynced and new is not None and new.data is not None:
                kept = self._mix(page, new)
                if kept:
                    mixed += 1
                    page.generation = next(self._gen)
                    # what survived is what the disk holds: the disk store's recovery
                    # checkpoints it before serving (docs/ondisk.md, "Recovery")
                    self._durable[key] = _copy(page)
            self._layers[key[0]].pages[key[1]] = page
        self._unsynced.clear()
        return mixed

    def _mix(self, page: _Page, new: _Page) -> bool:
        """Keep the new bytes of a seeded choice of units; whether any were kept."""
        assert new.data is not None
        kept = False
        for at in range(0, len(new.data), self.unit):
            if self.rng.random() < 0.5:
                continue
            if page.data is None:
                page.data = bytearray(len(new.data))
            page.data[at : at + self.unit] = new.data[at : at + self.unit]
            kept = True
        if kept:
            page.state = new.state
        return kept

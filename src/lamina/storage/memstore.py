"""The in-memory twin of the on-disk page store (tests and simulations)."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable
from dataclasses import dataclass, field

from lamina.errors import BadRequest, Corrupt, NotFound
from lamina.storage.pagestore import (
    ABSENT_INFO,
    PageInfo,
    PageStore,
    StoreStats,
    check_layer,
    enumerate_pages,
)
from lamina.storage.syncmask import FULL
from lamina.wire.messages import EnumerateWhat, PageState


@dataclass(slots=True)
class _Page:
    state: PageState
    mask: int
    generation: int
    data: bytearray | None = None


@dataclass(slots=True)
class _Layer:
    volume_id: int
    page_size: int
    pages: dict[int, _Page] = field(default_factory=dict)


class MemPageStore(PageStore):
    def __init__(self, capacity: int = 1 << 30) -> None:
        self._layers: dict[int, _Layer] = {}
        self._lineages: dict[int, int] = {}
        self._gen = itertools.count(1)
        self.capacity = capacity

    def _layer(self, volume_id: int, layer_id: int, page_size: int) -> _Layer:
        check_layer(self, volume_id, layer_id, page_size)
        layer = self._layers.get(layer_id)
        if layer is None:
            layer = self._layers[layer_id] = _Layer(volume_id, page_size)
        return layer

    def _page(self, layer_id: int, page: int) -> _Page | None:
        layer = self._layers.get(layer_id)
        return None if layer is None else layer.pages.get(page)

    def info(self, layer_id: int, page: int) -> PageInfo:
        p = self._page(layer_id, page)
        return ABSENT_INFO if p is None else PageInfo(p.state, p.mask, p.generation)

    def layer_page_size(self, layer_id: int) -> int | None:
        layer = self._layers.get(layer_id)
        return None if layer is None else layer.page_size

    def layer_volume(self, layer_id: int) -> int | None:
        layer = self._layers.get(layer_id)
        return None if layer is None else layer.volume_id

    def layer_lineage(self, layer_id: int) -> int:
        return self._lineages.get(layer_id, 0)

    def record_lineage(self, layer_id: int, lineage: int) -> None:
        self._lineages[layer_id] = lineage

    def read(self, layer_id: int, page: int, offset: int, length: int) -> bytes:
        p = self._page(layer_id, page)
        if p is None or p.state != PageState.PRESENT or p.data is None:
            if p is not None and p.state == PageState.QUARANTINED:
                raise Corrupt(f"page {page} of layer {layer_id} is quarantined")
            raise NotFound(f"page {page} of layer {layer_id} holds no data")
        return bytes(p.data[offset : offset + length])

    def write(
        self,
        volume_id: int,
        layer_id: int,
        page_size: int,
        page: int,
        offset: int,
        data: bytes | bytearray,
    ) -> int:
        layer = self._layer(volume_id, layer_id, page_size)
        p = layer.pages.get(page)
        if p is None or p.state in (PageState.ABSENT, PageState.TOMBSTONE):
            raise NotFound(f"page {page} of layer {layer_id} is not writable")
        if offset + len(data) > page_size or not data:
            raise BadRequest("write outside the page")
        if p.state == PageState.QUARANTINED and (offset, len(data)) != (0, page_size):
            raise Corrupt(f"page {page} of layer {layer_id} is quarantined")
        if p.data is None:
            p.data = bytearray(page_size)
        p.data[offset : offset + len(data)] = data
        p.state = PageState.PRESENT
        p.generation = next(self._gen)
        return p.generation

    def create(
        self,
        volume_id: int,
        layer_id: int,
        page_size: int,
        page: int,
        data: bytes | bytearray | None,
        mask: int,
    ) -> tuple[bool, int]:
        layer = self._layer(volume_id, layer_id, page_size)
        p = layer.pages.get(page)
        if p is not None and p.state != PageState.ABSENT:
            return False, p.generation
        if data is not None and len(data) != page_size:
            raise BadRequest("create needs a full page")
        state = PageState.ZERO if data is None else PageState.PRESENT
        gen = next(self._gen)
        layer.pages[page] = _Page(state, mask, gen, None if data is None else bytearray(data))
        return True, gen

    def set_mask(
        self, layer_id: int, page: int, mask: int, wait_durable: bool = True
    ) -> Awaitable[None] | None:
        p = self._page(layer_id, page)
        if p is None:
            raise NotFound(f"page {page} of layer {layer_id} is absent")
        p.mask = mask
        return None

    def tombstone(self, volume_id: int, layer_id: int, page_size: int, page: int) -> int:
        layer = self._layer(volume_id, layer_id, page_size)
        gen = next(self._gen)
        layer.pages[page] = _Page(PageState.TOMBSTONE, FULL, gen)
        return gen

    def delete_layer(self, layer_id: int) -> int:
        self._lineages.pop(layer_id, None)
        layer = self._layers.pop(layer_id, None)
        return 0 if layer is None else len(layer.pages)

    def enumerate(
        self, layer_id: int, what: EnumerateWhat, start: int, limit: int
    ) -> tuple[list[int], int, bool]:
        layer = self._layers.get(layer_id)
        if layer is None:
            return [], start, True
        return enumerate_pages(
            ((n, p.state, p.mask) for n, p in layer.pages.items()), what, start, limit
        )

    async def flush(self) -> None:
        return None

    def stats(self) -> StoreStats:
        used = sum(
            layer.page_size
            for layer in self._layers.values()
            for p in layer.pages.values()
            if p.data is not None
        )
        pages = sum(len(layer.pages) for layer in self._layers.values())
        return StoreStats(self.capacity, used, pages, len(self._layers))

    def layers(self) -> list[int]:
        return sorted(self._layers)

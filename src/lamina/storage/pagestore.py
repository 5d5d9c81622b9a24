"""The page store interface, shared by the on-disk store and its in-memory twin.

A store holds pages per (layer, page index).  Each page copy has a state
(:class:`~lamina.wire.messages.PageState`), a sync mask, a generation (bumped by every
change, never reused, also across restarts) and, when it holds data, a crc32c per 4 KiB
block.  Pages are thin: nothing is allocated before the first write.

The store knows nothing of epochs, leases or episodes (that is the service's job); it
knows how to make a mask decrease durable before the data it guards is applied
(``set_mask`` returns an awaitable to wait on), and how to make everything durable
(``flush``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass

from lamina.errors import BadRequest, NotFound
from lamina.storage.syncmask import FULL
from lamina.wire.messages import EnumerateWhat, PageState


@dataclass(frozen=True, slots=True)
class PageInfo:
    state: PageState
    mask: int
    generation: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    capacity: int
    used: int
    pages: int
    layers: int


ABSENT_INFO = PageInfo(PageState.ABSENT, FULL, 0)


class PageStore(ABC):
    """What the storage service needs from a backend.  All methods run on the loop."""

    @abstractmethod
    def info(self, layer_id: int, page: int) -> PageInfo:
        """State, mask and generation of a page (ABSENT_INFO if the store has none)."""

    @abstractmethod
    def layer_page_size(self, layer_id: int) -> int | None: ...

    @abstractmethod
    def layer_volume(self, layer_id: int) -> int | None: ...

    @abstractmethod
    def layer_lineage(self, layer_id: int) -> int:
        """The lineage token recorded for a layer id (0: none).  The cluster map gives
        every layer one; a layer file recorded with another belongs to another map's layer
        of the same id (a map rolled back by a power loss) and is never served."""

    @abstractmethod
    def record_lineage(self, layer_id: int, lineage: int) -> None:
        """Record the lineage token of a layer id (held or not yet); deleting the layer
        forgets it."""

    def check_layer(self, volume_id: int, layer_id: int, page_size: int | None) -> None:
        """BadRequest unless the layer is unknown or holds pages of this volume and size."""
        check_layer(self, volume_id, layer_id, page_size)

    @abstractmethod
    def read(self, layer_id: int, page: int, offset: int, length: int) -> bytes:
        """Bytes of a PRESENT page, checksums verified (Corrupt: the page is quarantined)."""

    @abstractmethod
    def write(
        self,
        volume_id: int,
        layer_id: int,
        page_size: int,
        page: int,
        offset: int,
        data: bytes | bytearray,
    ) -> int:
        """Apply data to a PRESENT or ZERO page (or a whole QUARANTINED one); new generation.
        A caller first sets the page's mask with ``set_mask`` and awaits what it returns:
        the on-disk store then has recorded the page as written (its crash recovery needs
        that, see docs/ondisk.md)."""

    @abstractmethod
    def create(
        self,
        volume_id: int,
        layer_id: int,
        page_size: int,
        page: int,
        data: bytes | bytearray | None,
        mask: int,
    ) -> tuple[bool, int]:
        """Create the page with ``data`` (None: zeros) unless it exists: (created, generation)."""

    @abstractmethod
    def set_mask(
        self, layer_id: int, page: int, mask: int, wait_durable: bool = True
    ) -> Awaitable[None] | None:
        """Set the mask.  With ``wait_durable``, an awaitable is returned when the bits the
        mask has cleared are not yet durable; it resolves once they are.  Increases are
        persisted lazily, after the data they vouch for is durable."""

    @abstractmethod
    def tombstone(self, volume_id: int, layer_id: int, page_size: int, page: int) -> int: ...

    @abstractmethod
    def delete_layer(self, layer_id: int) -> int:
        """Remove a layer and reclaim its space; the number of pages it had."""

    @abstractmethod
    def enumerate(
        self, layer_id: int, what: EnumerateWhat, start: int, limit: int
    ) -> tuple[list[int], int, bool]:
        """Pages >= start matching ``what``, at most ``limit``: (pages, next_start, done)."""

    @abstractmethod
    async def flush(self) -> None:
        """Make every applied write and metadata change durable."""

    @abstractmethod
    def stats(self) -> StoreStats: ...

    @abstractmethod
    def layers(self) -> list[int]: ...

    @property
    def failure(self) -> str | None:
        """Why the store fail-stopped (a sync failed), or None: a failed store refuses
        every request until its server restarts."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (the on-disk store flushes)."""


def check_layer(store: PageStore, volume_id: int, layer_id: int, page_size: int | None) -> None:
    """Refuse a request whose volume or page size disagrees with what the layer holds."""
    known = store.layer_volume(layer_id)
    if known is not None and known != volume_id:
        raise BadRequest(f"layer {layer_id} belongs to volume {known}, not {volume_id}")
    size = store.layer_page_size(layer_id)
    if page_size is not None and size is not None and size != page_size:
        raise BadRequest(f"layer {layer_id} has pages of {size} bytes, not {page_size}")


def require_present(info: PageInfo, layer_id: int, page: int) -> None:
    if info.state == PageState.ABSENT:
        raise NotFound(f"page {page} of layer {layer_id} is absent")


def matches(what: EnumerateWhat, state: PageState, mask: int) -> bool:
    """Whether a page with ``state`` and ``mask`` is listed by ENUMERATE ``what``."""
    if what == EnumerateWhat.DIRTY:
        return state == PageState.QUARANTINED or (
            state in (PageState.PRESENT, PageState.ZERO) and mask != FULL
        )
    return state in (PageState.PRESENT, PageState.ZERO, PageState.QUARANTINED)


def enumerate_pages(
    items: Iterable[tuple[int, PageState, int]], what: EnumerateWhat, start: int, limit: int
) -> tuple[list[int], int, bool]:
    """The bounded, ordered ENUMERATE answer over (page, state, mask) items."""
    found = sorted(n for n, state, mask in items if n >= start and matches(what, state, mask))
    if len(found) > limit:
        return found[:limit], found[limit], False
    return found, (found[-1] + 1 if found else start), True

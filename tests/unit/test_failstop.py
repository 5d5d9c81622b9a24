"""A failed fdatasync fail-stops the page store and its service (issue 11, point 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.errors import StorageIOError
from lamina.storage.diskstore import DiskPageStore
from lamina.storage.powerloss import PowerLossFiles
from lamina.storage.service import StorageService
from lamina.storage.syncmask import FULL
from lamina.wire import messages as m
from tests.contract.stores import in_loop

PAGE = 64 * 1024
VOL = 7
LAYER = 3


def failure_of(store: DiskPageStore) -> str | None:
    return store.failure


@in_loop
async def test_after_a_failed_sync_every_operation_is_refused(tmp_path: Path) -> None:
    """Once an fdatasync failed, reads, writes, creates, mask changes, flushes and every
    request to the service (PING too) are refused with the reason; a restart recovers."""
    files = PowerLossFiles(tmp_path / "trash")
    store = DiskPageStore(tmp_path / "data", "s1", files=files)
    store.open()
    service = StorageService(store, "s1", lambda: 0.0)
    store.create(VOL, LAYER, PAGE, 0, bytes(PAGE), FULL)
    await store.flush()
    assert failure_of(store) is None
    store.write(VOL, LAYER, PAGE, 0, 0, b"x" * 4096)
    files.fail_syncs = True
    with pytest.raises(StorageIOError, match="fdatasync"):
        await store.flush()
    assert "fdatasync" in (failure_of(store) or "")
    for call in (
        lambda: store.read(LAYER, 0, 0, 10),
        lambda: store.write(VOL, LAYER, PAGE, 0, 0, b"y"),
        lambda: store.create(VOL, LAYER, PAGE, 1, None, FULL),
        lambda: store.set_mask(LAYER, 0, FULL & ~2),
        lambda: store.tombstone(VOL, LAYER, PAGE, 0),
        lambda: service.handle(m.PingRequest(), b""),
    ):
        with pytest.raises(StorageIOError, match="failed"):
            call()
    with pytest.raises(StorageIOError):
        await store.flush()
    store.abandon()
    again = DiskPageStore(tmp_path / "data", "s1")
    again.open()
    try:
        assert again.failure is None
        assert again.read(LAYER, 0, 0, 4096) == bytes(4096)  # the failed write is gone
    finally:
        await again.close()

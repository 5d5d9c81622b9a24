"""Sync-mask clears are group-committed, and a hot page pays for its clear once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lamina.storage.diskstore import DiskPageStore
from lamina.storage.service import Result, StorageService
from lamina.storage.syncmask import FULL, clear_mask, restore_mask
from lamina.wire import messages as m
from tests.contract.stores import in_loop

PAGE = 1 << 20
VOL, LAYER = 3, 11
CLEAR = clear_mask(0, 2)
RESTORE = restore_mask({0, 1}, 2)


async def settle(result: Result) -> m.Message:
    reply = result if isinstance(result, tuple) else await result
    return reply[0]


def write(page: int, offset: int, restore: tuple[int, ...] = ()) -> m.WriteRequest:
    return m.WriteRequest(VOL, 1, LAYER, page, PAGE, offset, CLEAR, RESTORE, False, restore)


def open_service(tmp_path: Path) -> tuple[DiskPageStore, StorageService]:
    store = DiskPageStore(tmp_path / "data", "s1")
    store.open()
    return store, StorageService(store, "s1", lambda: 0.0)


@in_loop
async def test_concurrent_clears_share_group_commits(tmp_path: Path) -> None:
    """64 writes to 64 clean pages, all in flight at once, need far fewer than 64 fdatasyncs."""
    store, service = open_service(tmp_path)
    try:
        for page in range(64):
            store.create(VOL, LAYER, PAGE, page, None, FULL)
        before = store.commits
        results = [service.handle(write(page, 0), b"x" * 4096) for page in range(64)]
        assert all(not isinstance(r, tuple) for r in results), "each write waits for its clear"
        replies = await asyncio.gather(*(settle(r) for r in results))
        assert all(isinstance(r, m.WriteResponse) for r in replies)
        used = store.commits - before
        assert 1 <= used <= 8, f"{used} commits for 64 clears"
        for page in range(64):
            assert store.info(LAYER, page).mask == CLEAR
    finally:
        await store.close()


@in_loop
async def test_a_hot_page_pays_for_its_clear_once(tmp_path: Path) -> None:
    """Once a page's clear is durable, later episodes on it (each confirmed before the next
    write) are answered at once, with no commit, until the restore is persisted."""
    store, service = open_service(tmp_path)
    try:
        store.create(VOL, LAYER, PAGE, 0, None, FULL)
        first = await settle(service.handle(write(0, 0), b"a" * 4096))
        assert isinstance(first, m.WriteResponse)
        commits = store.commits
        token = first.token
        for i in range(1, 200):
            result = service.handle(write(0, (i % 256) * 4096, (token,)), b"b" * 4096)
            assert isinstance(result, tuple), f"write {i} waited for a commit"
            reply = result[0]
            assert isinstance(reply, m.WriteResponse)
            token = reply.token
        assert store.commits == commits
        service.handle(m.RestoreRequest((token,)), b"")
        assert store.info(LAYER, 0).mask == FULL  # clean in memory at once
        assert await store.persist_restores() == 1  # persisted once its data is durable
        again = service.handle(write(0, 0), b"c" * 4096)
        assert not isinstance(again, tuple), "a persisted restore makes the next clear durable"
        await settle(again)
        assert store.commits > commits
    finally:
        await store.close()

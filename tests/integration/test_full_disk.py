"""A full disk refuses new pages with NO_SPACE but keeps stored pages readable and writable."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lamina.errors import NoSpace
from lamina.localcluster import StorageProcess
from lamina.wire import messages as m
from lamina.wire.connection import Client
from tests.integration.support import (
    BLOCK,
    CLEAR_2,
    PAGE_SIZE,
    RESTORE_2,
    ZERO_PAGE,
    Cluster,
    connect,
    create_req,
    read_page,
    run,
    write_req,
)

pytestmark = pytest.mark.integration

LAYER = 51
MAX_PAGES = 200  # 48 MiB hold far fewer 1 MiB pages than this


@pytest.fixture
def tiny_server(small_disk: Path, cluster: Cluster) -> StorageProcess:
    """A storage server whose data directory is the 48 MiB tmpfs."""
    proc = cluster.server(start=False)
    assert proc.data == small_disk
    proc.start()
    return proc


async def fill(client: Client, rng: random.Random) -> dict[int, bytearray]:
    """Add pages until NO_SPACE; the contents of every acknowledged page."""
    pages: dict[int, bytearray] = {}
    for page in range(MAX_PAGES):
        if page % 2 == 0:  # a whole new page
            data = rng.randbytes(PAGE_SIZE)
            try:
                reply = await client.call(create_req(LAYER, page, zero=False), data)
            except NoSpace:
                return pages
            assert isinstance(reply, m.CreateResponse)
            assert reply.created
            pages[page] = bytearray(data)
        else:  # a zero page (metadata only), then its first write allocates it
            reply = await client.call(create_req(LAYER, page, zero=True))
            assert isinstance(reply, m.CreateResponse)
            assert reply.created
            pages[page] = bytearray(PAGE_SIZE)
            offset = rng.randrange(PAGE_SIZE // BLOCK) * BLOCK
            chunk = rng.randbytes(BLOCK)
            try:
                await client.call(write_req(LAYER, page, offset, clear=CLEAR_2), chunk)
            except NoSpace:
                return pages
            pages[page][offset : offset + BLOCK] = chunk
    raise AssertionError(f"{MAX_PAGES} MiB fit on a 48 MiB disk")


async def check_pages(client: Client, pages: dict[int, bytearray]) -> None:
    for page, expected in pages.items():
        _, got = await read_page(client, LAYER, page)
        assert got == expected, f"page {page} changed"


async def overwrite(client: Client, pages: dict[int, bytearray], rng: random.Random) -> None:
    """Overwrite allocated pages: aligned, unaligned, whole, with and without mask clears."""
    allocated = [page for page, data in pages.items() if data != ZERO_PAGE]
    assert len(allocated) >= 3
    writes = [
        (allocated[0], 5 * BLOCK, rng.randbytes(BLOCK), CLEAR_2),
        (allocated[1], 1234, rng.randbytes(3 * BLOCK), m.FULL_MASK),
        (allocated[2], 0, rng.randbytes(PAGE_SIZE), CLEAR_2),
    ]
    for page, offset, data, clear in writes:
        req = write_req(LAYER, page, offset, clear=clear, restore=RESTORE_2)
        reply = await client.call(req, data)
        assert isinstance(reply, m.WriteResponse)
        pages[page][offset : offset + len(data)] = data
    reply = await client.call(m.FlushRequest(1, 1))
    assert isinstance(reply, m.FlushResponse)
    await check_pages(client, pages)


def test_full_disk_refuses_new_pages_and_keeps_old_ones(
    tiny_server: StorageProcess, key: bytes
) -> None:
    """Filling the disk ends in NO_SPACE; stored pages still read, overwrite and restart."""
    rng = random.Random(10)

    async def main() -> dict[int, bytearray]:
        client = await connect(tiny_server, key)
        try:
            pages = await fill(client, rng)
            assert len(pages) >= 10, f"only {len(pages)} pages fit"
            with pytest.raises(NoSpace):  # still full: a new page is refused again
                await client.call(create_req(LAYER, 9999, zero=False), rng.randbytes(PAGE_SIZE))
            await check_pages(client, pages)
            await overwrite(client, pages, rng)
            pong = await client.call(m.PingRequest())
            assert isinstance(pong, m.PingResponse)
            assert pong.used > 0
            return pages
        finally:
            client.close()

    pages = run(main())
    assert tiny_server.alive()
    assert tiny_server.stop() == 0, "a clean stop on a full disk failed"
    tiny_server.start()

    async def after_restart() -> None:
        client = await connect(tiny_server, key)
        try:
            await check_pages(client, pages)
            await overwrite(client, pages, rng)
        finally:
            client.close()

    run(after_restart())


def test_full_disk_after_kill_9_still_overwrites(tiny_server: StorageProcess, key: bytes) -> None:
    """After kill -9 on a full disk the restarted server still reads and overwrites its pages."""
    rng = random.Random(11)

    async def main() -> dict[int, bytearray]:
        client = await connect(tiny_server, key)
        try:
            return await fill(client, rng)
        finally:
            client.close()

    pages = run(main())
    tiny_server.kill()
    tiny_server.start()

    async def after_restart() -> None:
        client = await connect(tiny_server, key)
        try:
            await check_pages(client, pages)
            await overwrite(client, pages, rng)
        finally:
            client.close()

    run(after_restart())
    assert tiny_server.alive()

"""A page whose bytes rot on disk is detected, quarantined, reported and repairable."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lamina.errors import Corrupt
from lamina.localcluster import StorageProcess
from lamina.wire import messages as m
from tests.integration.support import (
    BLOCK,
    PAGE_SIZE,
    connect,
    create_req,
    enumerate_pages,
    read_page,
    read_req,
    run,
    status,
    write_req,
)

pytestmark = pytest.mark.integration

LAYER = 31
PAGES = 6
BAD = 3


def flip_byte(proc: StorageProcess, page: int, offset: int) -> tuple[int, int]:
    """Invert one byte of ``page`` in the layer file; (old value, new value)."""
    path = proc.data / "layers" / f"{LAYER}.data"
    with open(path, "r+b") as f:
        f.seek(page * PAGE_SIZE + offset)
        old = f.read(1)[0]
        f.seek(page * PAGE_SIZE + offset)
        f.write(bytes([old ^ 0xFF]))
    return old, old ^ 0xFF


def write_pages(proc: StorageProcess, key: bytes, rng: random.Random) -> dict[int, bytes]:
    pages = {page: rng.randbytes(PAGE_SIZE) for page in range(PAGES)}

    async def main() -> None:
        client = await connect(proc, key)
        try:
            for page, data in pages.items():
                reply = await client.call(create_req(LAYER, page, zero=False), data)
                assert isinstance(reply, m.CreateResponse)
                assert reply.created
        finally:
            client.close()

    run(main())
    return pages


def quarantined(proc: StorageProcess) -> list[Path]:
    return sorted((proc.data / "quarantine").iterdir())


def test_flipped_byte_is_quarantined_and_a_full_write_repairs_it(
    server: StorageProcess, key: bytes
) -> None:
    """A flipped byte reads CORRUPT, stays quarantined over a restart, a full write heals it."""
    rng = random.Random(3)
    pages = write_pages(server, key, rng)
    assert server.stop() == 0
    offset = rng.randrange(PAGE_SIZE)
    flip_byte(server, BAD, offset)
    rotten = bytearray(pages[BAD])
    rotten[offset] ^= 0xFF
    server.start()
    repair = rng.randbytes(PAGE_SIZE)

    async def detect() -> None:
        client = await connect(server, key)
        try:
            for _ in range(2):  # the second read finds the page quarantined
                with pytest.raises(Corrupt):
                    await client.call(read_req(LAYER, BAD))
            for page, data in pages.items():
                if page != BAD:
                    _, got = await read_page(client, LAYER, page)
                    assert got == data
            (entry,) = (await status(client, LAYER, [BAD])).values()
            assert entry[1] == m.PageState.QUARANTINED
            assert BAD in await enumerate_pages(client, LAYER, m.EnumerateWhat.DIRTY)
            with pytest.raises(Corrupt):  # a partial write cannot heal it
                await client.call(write_req(LAYER, BAD, BLOCK), b"x" * BLOCK)
            pong = await client.call(m.PingRequest())
            assert isinstance(pong, m.PingResponse)
        finally:
            client.close()

    run(detect())
    assert server.alive()
    (copy,) = quarantined(server)
    assert copy.read_bytes() == rotten, "the quarantine copy is not the page as found"
    assert server.stop() == 0
    server.start()

    async def heal() -> None:
        client = await connect(server, key)
        try:
            with pytest.raises(Corrupt):  # still quarantined after a restart
                await client.call(read_req(LAYER, BAD))
            reply = await client.call(write_req(LAYER, BAD, 0), repair)
            assert isinstance(reply, m.WriteResponse)
            state, got = await read_page(client, LAYER, BAD)
            assert state.state == m.PageState.PRESENT
            assert got == repair
            (entry,) = (await status(client, LAYER, [BAD])).values()
            assert entry[1] == m.PageState.PRESENT
        finally:
            client.close()

    run(heal())
    assert server.stop() == 0
    server.start()

    async def check() -> None:
        client = await connect(server, key)
        try:
            for page, data in pages.items():
                _, got = await read_page(client, LAYER, page)
                assert got == (repair if page == BAD else data), f"page {page}"
        finally:
            client.close()

    run(check())


def test_unaligned_write_over_a_rotten_block_quarantines_the_page(
    server: StorageProcess, key: bytes
) -> None:
    """A partial-block write that must merge with a rotten block answers CORRUPT, not garbage."""
    rng = random.Random(4)
    pages = write_pages(server, key, rng)
    assert server.stop() == 0
    block = 7
    flip_byte(server, BAD, block * BLOCK + 100)
    server.start()

    async def main() -> None:
        client = await connect(server, key)
        try:
            # the rotten block is outside this read, so the read is fine
            reply, data = await client.call_with_payload(read_req(LAYER, BAD, 0, block * BLOCK))
            assert isinstance(reply, m.ReadResponse)
            assert data == pages[BAD][: block * BLOCK]
            with pytest.raises(Corrupt):
                await client.call(write_req(LAYER, BAD, block * BLOCK + 10), b"y" * 20)
            with pytest.raises(Corrupt):
                await client.call(read_req(LAYER, BAD, 0, BLOCK))
            (entry,) = (await status(client, LAYER, [BAD])).values()
            assert entry[1] == m.PageState.QUARANTINED
            for page, expected in pages.items():
                if page != BAD:
                    _, got = await read_page(client, LAYER, page)
                    assert got == expected
        finally:
            client.close()

    run(main())
    assert server.alive()
    assert len(quarantined(server)) == 1

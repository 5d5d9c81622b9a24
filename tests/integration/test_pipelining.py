"""Many requests in flight on one connection, answered in completion order."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from lamina.localcluster import StorageProcess
from lamina.wire import messages as m
from lamina.wire.connection import Client
from lamina.wire.framing import Frame
from tests.integration.support import (
    BLOCK,
    CLEAR_2,
    PAGE_SIZE,
    RESTORE_2,
    connect,
    create_req,
    read_page,
    read_req,
    run,
    write_req,
)

pytestmark = pytest.mark.integration

LAYER = 11


async def gather_in_order(futs: list[asyncio.Future[Frame]]) -> tuple[list[Frame], list[int]]:
    """The answer frames in request order, and the request indexes in completion order."""
    done_order: list[int] = []

    def note(i: int) -> Callable[[asyncio.Future[Frame]], None]:
        return lambda _fut: done_order.append(i)

    for i, fut in enumerate(futs):
        fut.add_done_callback(note(i))
    async with asyncio.timeout(30):
        frames = list(await asyncio.gather(*futs))
    await asyncio.sleep(0)  # let the last done-callbacks run
    assert sorted(done_order) == list(range(len(futs)))
    return frames, done_order


def test_64_pipelined_writes_then_64_pipelined_reads_all_match(
    server: StorageProcess, key: bytes
) -> None:
    """64 writes sent at once on one connection, then 64 reads at once, all answer correctly."""
    rng = random.Random(1)

    async def main() -> None:
        client = await connect(server, key)
        try:
            fresh_pages = list(range(100, 108))  # absent: written whole
            zero_pages = list(range(14))  # created as zeros: written in 8 KiB slots
            for page in zero_pages:
                reply = await client.call(create_req(LAYER, page, zero=True))
                assert isinstance(reply, m.CreateResponse)
                assert reply.created
            model = {page: bytearray(PAGE_SIZE) for page in fresh_pages + zero_pages}
            writes: list[tuple[int, int, bytes, m.WriteRequest]] = []
            for page in fresh_pages:
                data = rng.randbytes(PAGE_SIZE)
                writes.append((page, 0, data, write_req(LAYER, page, 0, clear=CLEAR_2)))
            slots = rng.sample([(p, s) for p in zero_pages for s in range(8)], 56)
            for n, (page, slot) in enumerate(slots):
                # unaligned or not, each write stays inside its own 8 KiB slot
                offset = slot * 2 * BLOCK + (rng.randrange(1, BLOCK) if n % 3 == 0 else 0)
                length = BLOCK if n % 5 else rng.randrange(1, BLOCK)
                data = rng.randbytes(length)
                clear = CLEAR_2 if n % 2 else m.FULL_MASK
                req = write_req(LAYER, page, offset, clear=clear, restore=RESTORE_2, fua=n % 7 == 0)
                writes.append((page, offset, data, req))
            rng.shuffle(writes)
            assert len(writes) == 64

            futs = [client.send(req, data) for _, _, data, req in writes]
            frames, _ = await gather_in_order(futs)
            tokens, gens = set(), set()
            for frame in frames:
                reply, _ = Client.unpack(frame)
                assert isinstance(reply, m.WriteResponse)
                tokens.add(reply.token)
                gens.add(reply.generation)
            assert len(tokens) == 64
            assert len(gens) == 64
            for page, offset, data, _ in writes:
                model[page][offset : offset + len(data)] = data

            reads = [read_req(LAYER, page, offset, len(data)) for page, offset, data, _ in writes]
            frames, _ = await gather_in_order([client.send(r) for r in reads])
            for frame, (_, _, data, _) in zip(frames, writes, strict=True):
                reply, payload = Client.unpack(frame)
                assert isinstance(reply, m.ReadResponse)
                assert reply.state == m.PageState.PRESENT
                assert payload == data
            for page, expected in model.items():  # nothing outside the written ranges moved
                _, got = await read_page(client, LAYER, page)
                assert got == expected, f"page {page} differs"
        finally:
            client.close()

    run(main())


def test_answers_leave_in_completion_order_not_request_order(
    server: StorageProcess, key: bytes
) -> None:
    """A write waiting for its group commit is overtaken by reads sent after it."""
    rng = random.Random(2)
    hot = rng.randbytes(PAGE_SIZE)

    async def main() -> None:
        client = await connect(server, key)
        try:
            created = await client.call(create_req(LAYER, 0, zero=False), hot)
            assert isinstance(created, m.CreateResponse)
            assert created.created
            for attempt in range(10):
                # a zero page whose first write clears copy 1's bit: durable commit first
                page = 1000 + attempt
                zero = await client.call(create_req(LAYER, page, zero=True))
                assert isinstance(zero, m.CreateResponse)
                data = rng.randbytes(PAGE_SIZE)
                futs = [client.send(write_req(LAYER, page, 0, clear=CLEAR_2), data)]
                offsets = [rng.randrange(0, PAGE_SIZE - BLOCK) for _ in range(16)]
                futs += [client.send(read_req(LAYER, 0, off, BLOCK)) for off in offsets]
                frames, done_order = await gather_in_order(futs)
                reply, _ = Client.unpack(frames[0])
                assert isinstance(reply, m.WriteResponse)
                for frame, off in zip(frames[1:], offsets, strict=True):
                    read, payload = Client.unpack(frame)
                    assert isinstance(read, m.ReadResponse)
                    assert payload == hot[off : off + BLOCK]
                _, got = await read_page(client, LAYER, page)
                assert got == data
                if done_order != sorted(done_order):
                    assert done_order.index(0) > 0, "a later read was answered first"
                    return
            raise AssertionError("10 batches were all answered in request order")
        finally:
            client.close()

    run(main())

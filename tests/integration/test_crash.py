"""kill -9 in the middle of a stream of acknowledged writes loses none of them."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lamina.errors import Unavailable
from lamina.localcluster import StorageProcess
from lamina.wire import messages as m
from tests.integration.support import (
    BLOCK,
    CLEAR_2,
    PAGE_SIZE,
    RESTORE_2,
    Cluster,
    connect,
    create_req,
    enumerate_pages,
    read_page,
    run,
    status,
    write_req,
)

pytestmark = pytest.mark.integration

LAYER = 21
PAGES = 64
ZERO_PAGES = range(48)  # created as zero pages up front; pages 48.. start absent
CONFIRMED = frozenset(range(0, PAGES, 2))  # pages whose tokens are (mostly) sent back
WRITERS = 6
ROUNDS = 3
ROUND_SECONDS = 20.0
MAX_WRITES_PER_WRITER = 5000
COPY1_BIT = 0b10


@dataclass
class Model:
    """What the server must hold: page bytes and what acknowledged writes imply."""

    data: dict[int, bytearray] = field(
        default_factory=lambda: {p: bytearray(PAGE_SIZE) for p in range(PAGES)}
    )
    exists: set[int] = field(default_factory=set)  # zero or present on the server
    written: set[int] = field(default_factory=set)  # at least one acknowledged write
    gen_before: dict[int, int] = field(default_factory=dict)  # at the start of the round
    last_gen: dict[int, int] = field(default_factory=dict)  # of the last acked write
    must_be_dirty: set[int] = field(default_factory=set)  # an acked token never sent back
    max_gen: int = 0  # the largest generation seen before the last restart


@dataclass
class Stream:
    """The state of one round's write stream when the server was killed."""

    acks: int = 0
    restores: int = 0
    busy: set[int] = field(default_factory=set)
    inflight: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    unsent: dict[int, list[int]] = field(default_factory=dict)  # acked, never RESTOREd
    written: set[int] = field(default_factory=set)


def choose_write(rng: random.Random, model: Model, page: int) -> tuple[int, bytes]:
    if page not in model.exists or rng.random() < 0.02:
        return 0, rng.randbytes(PAGE_SIZE)  # a fresh page is written whole
    if rng.random() < 0.75:
        return rng.randrange(PAGE_SIZE // BLOCK) * BLOCK, rng.randbytes(BLOCK)
    offset = rng.randrange(PAGE_SIZE - 1)
    length = rng.randrange(1, min(2 * BLOCK, PAGE_SIZE - offset) + 1)
    return offset, rng.randbytes(length)


async def write_stream(
    proc: StorageProcess, key: bytes, model: Model, rng: random.Random, kill_after: int
) -> Stream:
    """Write until ``kill_after`` acks, then kill -9 the server at a random moment."""
    assert proc.proc is not None
    pid = proc.proc.pid
    client = await connect(proc, key)
    st = Stream()
    killed = asyncio.Event()
    reached = asyncio.Event()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ROUND_SECONDS

    async def writer(wrng: random.Random) -> None:
        for _ in range(MAX_WRITES_PER_WRITER):
            if killed.is_set() or loop.time() > deadline:
                return
            page = wrng.choice([p for p in range(PAGES) if p not in st.busy])
            offset, data = choose_write(wrng, model, page)
            st.busy.add(page)
            st.inflight[page] = (offset, data)
            req = write_req(
                LAYER, page, offset, clear=CLEAR_2, restore=RESTORE_2, fua=wrng.random() < 0.02
            )
            try:
                reply = await client.call(req, data)
            except Unavailable:
                assert killed.is_set(), "connection lost before the kill"
                return  # the page stays in flight: old or new data are both fine
            assert isinstance(reply, m.WriteResponse)
            assert reply.generation > model.max_gen, "generation reused after a restart"
            del st.inflight[page]
            model.data[page][offset : offset + len(data)] = data
            model.exists.add(page)
            model.written.add(page)
            st.written.add(page)
            model.last_gen[page] = reply.generation
            st.unsent.setdefault(page, []).append(reply.token)
            st.acks += 1
            if st.acks >= kill_after:
                reached.set()
            if page in CONFIRMED and wrng.random() < 0.8:
                tokens = st.unsent.pop(page)
                try:
                    restored = await client.call(m.RestoreRequest(tuple(tokens)))
                except Unavailable:
                    assert killed.is_set(), "connection lost before the kill"
                    return
                assert isinstance(restored, m.RestoreResponse)
                assert restored.restored == len(tokens)
                st.restores += 1
            st.busy.discard(page)

    async def killer() -> None:
        try:
            await asyncio.wait_for(reached.wait(), ROUND_SECONDS)
        except TimeoutError:
            raise AssertionError(f"only {st.acks} acks in {ROUND_SECONDS}s") from None
        await asyncio.sleep(rng.uniform(0, 0.03))  # a random moment of the stream
        killed.set()
        os.kill(pid, signal.SIGKILL)

    try:
        writers = [writer(random.Random(rng.random())) for _ in range(WRITERS)]
        await asyncio.gather(killer(), *writers)
    finally:
        client.close()
    return st


async def verify(proc: StorageProcess, key: bytes, model: Model, st: Stream) -> None:
    """Check the restarted server against the model, then fold the round into it."""
    client = await connect(proc, key)
    try:
        pages = list(range(PAGES))
        entries = await status(client, LAYER, pages)
        for page in pages:
            _, got = await read_page(client, LAYER, page)
            expected = model.data[page]
            if page in st.inflight:  # unacknowledged: each block is old or new
                offset, data = st.inflight[page]
                new = bytearray(expected)
                new[offset : offset + len(data)] = data
                for b in range(0, PAGE_SIZE, BLOCK):
                    assert got[b : b + BLOCK] in (expected[b : b + BLOCK], new[b : b + BLOCK]), (
                        f"page {page} block {b // BLOCK}: neither before nor after the write"
                    )
                model.data[page] = bytearray(got)
            else:
                assert got == expected, f"page {page} lost acknowledged data"
            _, state, _, gen, _ = entries[page]
            if page in model.written:
                assert state == m.PageState.PRESENT, f"page {page} is {m.PageState(state)!r}"
                assert gen >= model.last_gen[page], f"page {page} went back a generation"
            if page in st.written:
                assert gen > model.gen_before.get(page, 0)
            if page in model.exists:
                assert state != m.PageState.ABSENT, f"page {page} vanished"
            elif state != m.PageState.ABSENT:
                model.exists.add(page)  # its first write was in flight and survived
        dirty = set(await enumerate_pages(client, LAYER, m.EnumerateWhat.DIRTY))
        must = model.must_be_dirty | {page for page, tokens in st.unsent.items() if tokens}
        assert must <= dirty, f"unconfirmed pages look clean: {sorted(must - dirty)}"
        for page in must:
            assert not entries[page][2] & COPY1_BIT, f"page {page} claims copy 1 is in sync"
        model.must_be_dirty = must
        model.gen_before = {page: entry[3] for page, entry in entries.items()}
        model.max_gen = max([model.max_gen, *model.gen_before.values(), *model.last_gen.values()])
    finally:
        client.close()


async def setup(proc: StorageProcess, key: bytes, model: Model) -> None:
    client = await connect(proc, key)
    try:
        for page in ZERO_PAGES:
            reply = await client.call(create_req(LAYER, page, zero=True))
            assert isinstance(reply, m.CreateResponse)
            assert reply.created
            model.exists.add(page)
        entries = await status(client, LAYER, list(range(PAGES)))
        model.gen_before = {page: entry[3] for page, entry in entries.items()}
        model.max_gen = max(model.gen_before.values())
    finally:
        client.close()


def test_kill_9_loses_no_acknowledged_write(cluster: Cluster, tmp_path: Path) -> None:
    """After kill -9 at 3 random moments every acknowledged write reads back and stays dirty."""
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"seed {seed}")
    rng = random.Random(seed)
    config = tmp_path / "storage.toml"
    config.write_text("[storage]\nmask_sync_interval = 0.05\n")  # restores persist often
    proc = cluster.server(["--config", str(config)])
    model = Model()
    run(setup(proc, cluster.key, model))
    for round_no in range(ROUNDS):
        kill_after = rng.randint(300, 1200)
        st = run(write_stream(proc, cluster.key, model, rng, kill_after), ROUND_SECONDS + 30)
        proc.kill()  # reaps the process (already killed)
        assert proc.proc is not None
        assert proc.proc.returncode == -signal.SIGKILL
        print(
            f"round {round_no}: killed after {st.acks} acks ({kill_after} wanted), "
            f"{st.restores} restores, {len(st.inflight)} writes in flight"
        )
        assert st.acks >= kill_after
        proc.start()
        run(verify(proc, cluster.key, model, st))
    assert len(model.written) > PAGES // 2, "the stream wrote too few pages to mean much"
    assert model.must_be_dirty, "no page was left unconfirmed"

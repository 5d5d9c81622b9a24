"""Driver races that need a precise order of requests and answers.

The driver's connections are replaced by recorders the test answers by hand (and, for
the attempt limit, the driver's clock is moved forward between a request and its
answers):

- a write attempt that took longer than ``WRITE_ATTEMPT_LIMIT`` is redone, and its
  tokens are confirmed only with those of the attempt that succeeds (what bounds
  ``syncmask.IN_FLIGHT``, docs/protocol.md); so are the tokens of an attempt that
  failed on one copy;
- a page this client creates while no presence map of the layer is loaded is in the
  map loaded next, even when that listing overtook the creation;
- a write's tokens go back only once a FLUSH succeeded on every copy it reached, so no
  mask vouches for a copy whose bytes a power loss could still take;
- no write goes out while no copy of its partition may be read (up and not being
  filled);
- a resynchronisation FLUSHes the copies it did not write before it marks any clean.
"""

from __future__ import annotations

import asyncio
import itertools
import types
from typing import Any

import pytest

from lamina.client import driver
from lamina.client.layout import volume_view
from lamina.errors import ErrorCode, Unavailable
from lamina.storage.syncmask import WRITE_ATTEMPT_LIMIT
from lamina.wire import messages as m
from lamina.wire.connection import Client
from lamina.wire.framing import Frame, Kind
from tests.unit.test_client_layout import _doc

PAGE = 1 << 20


class Recorder:
    """A connection that records each request and lets the test answer it."""

    connected = True
    in_flight = 0

    def __init__(self) -> None:
        self.sent: list[tuple[m.Message, asyncio.Future[Frame]]] = []

    def send(self, msg: m.Message, payload: Any = b"") -> asyncio.Future[Frame]:
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.sent.append((msg, fut))
        return fut

    async def drain(self) -> None:
        return None


class Managers:
    def __init__(self) -> None:
        self.doc: dict[str, Any] | None = None  # what the managers publish (None: _doc())

    async def wait_map(self, min_epoch: int, deadline: float) -> dict[str, Any]:
        return _doc() if self.doc is None else self.doc


class Cluster:
    """The parts of ``driver.Cluster`` a write uses."""

    io_timeout = 30.0
    session = "abc"

    def __init__(self) -> None:
        self.clients = {"s1": Recorder(), "s2": Recorder()}
        self.confirmed: list[tuple[str, int]] = []
        self.managers = Managers()
        self.reported: list[str] = []

    def learn(self, view: Any) -> None:
        return None

    def sender(self, sid: str) -> Recorder:
        return self.clients[sid]

    async def connected(self, sid: str) -> Recorder:
        return self.clients[sid]

    def take_tokens(self, sid: str) -> tuple[int, ...]:
        return ()

    def answer(self, sid: str, frame: Frame) -> tuple[Any, Any]:
        return Client.unpack(frame)

    def confirm_later(self, sid: str, token: int) -> None:
        self.confirmed.append((sid, token))

    def send_restores(self) -> None:
        return None

    async def call(self, sid: str, msg: m.Message, payload: Any = b"") -> tuple[Any, Any]:
        return self.answer(sid, await self.clients[sid].send(msg, payload))

    def busy(self, sid: str) -> int:
        return 0

    def report(self, sid: str, error: BaseException) -> None:
        self.reported.append(sid)


tokens = itertools.count(100)


@pytest.fixture(autouse=True)
def quick_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """The background FLUSH that makes acknowledged writes durable goes out at once."""
    monkeypatch.setattr(driver, "SYNC_DELAY", 0.001, raising=False)


async def answer_flushes(cluster: Cluster, failing: tuple[str, ...] = ()) -> set[str]:
    """Wait for a FLUSH to every server (a little), answer each (an error from the
    servers in ``failing``); the servers that got one."""
    asked: set[str] = set()
    for _ in range(200):
        for sid, c in cluster.clients.items():
            for msg, fut in c.sent:
                if isinstance(msg, m.FlushRequest) and not fut.done():
                    asked.add(sid)
                    if sid in failing:
                        lost = m.encode_error(Unavailable("disk gone"))
                        fut.set_result(
                            Frame(
                                Kind.RESPONSE, m.Op.FLUSH, int(ErrorCode.UNAVAILABLE), 1, lost, b""
                            )
                        )
                    else:
                        reply(fut, m.FlushResponse())
        if asked == set(cluster.clients):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)
    return asked


async def one_write(hot: bool) -> tuple[Cluster, asyncio.Future[None]]:
    """A cluster of recorders and a 4 KiB write to page 5 started on it, by the hot path
    (``start_write``) or the full one (``write``)."""
    cluster = Cluster()
    vol = driver.Volume(cluster, volume_view(_doc(), "db"), read_only=False)  # type: ignore[arg-type]
    data = b"x" * 4096
    if hot:
        out: asyncio.Future[None] = vol.start_write(5 * PAGE, data, False)
    else:
        out = asyncio.ensure_future(vol.write(5 * PAGE, data))
    await asyncio.sleep(0)
    return cluster, out


def ack(fut: asyncio.Future[Frame]) -> int:
    """Answer a WRITE with a new token; the token."""
    token = next(tokens)
    header = m.WriteResponse(token, token).encode()
    fut.set_result(Frame(Kind.RESPONSE, m.Op.WRITE, 0, 1, header, b""))
    return token


async def answer_all(cluster: Cluster, done: int) -> list[tuple[str, int]]:
    """Wait for the next attempt (every copy sent ``done + 1`` requests) and answer it."""
    for _ in range(200):
        if all(len(c.sent) > done for c in cluster.clients.values()):
            break
        await asyncio.sleep(0.01)
    return [(sid, ack(c.sent[done][1])) for sid, c in cluster.clients.items()]


@pytest.mark.parametrize("hot", [True, False], ids=["hot path", "full path"])
def test_a_write_attempt_answered_too_late_is_redone_and_not_acknowledged(
    hot: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(driver, "time", types.SimpleNamespace(monotonic=lambda: now[0]))

    async def main() -> None:
        cluster, out = await one_write(hot)
        now[0] += WRITE_ATTEMPT_LIMIT + 1  # every copy answers, but only this much later
        late = await answer_all(cluster, 0)
        await asyncio.sleep(0.05)
        assert not out.done(), "a write acknowledged after its attempt took too long"
        assert cluster.confirmed == [], "the late attempt's tokens went back on their own"
        retry = await answer_all(cluster, 1)  # the attempt redone answers at once
        await asyncio.wait_for(out, 5)
        assert await answer_flushes(cluster) == {"s1", "s2"}
        # every copy holds the bytes again, written after the late attempt: its tokens
        # go back with the redone attempt's
        assert sorted(cluster.confirmed) == sorted(late + retry)
        for c in cluster.clients.values():
            writes = [msg for msg, _ in c.sent if not isinstance(msg, m.FlushRequest)]
            assert [type(msg) for msg in writes] == [m.WriteRequest, m.WriteRequest]

    asyncio.run(main())


def test_a_write_answered_in_time_is_acknowledged_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(driver, "time", types.SimpleNamespace(monotonic=lambda: now[0]))

    async def main() -> None:
        cluster = Cluster()
        vol = driver.Volume(cluster, volume_view(_doc(), "db"), read_only=False)  # type: ignore[arg-type]
        out = vol.start_write(5 * PAGE, b"y" * 4096, False)
        now[0] += WRITE_ATTEMPT_LIMIT - 1
        acks = await answer_all(cluster, 0)
        await asyncio.wait_for(out, 5)
        assert await answer_flushes(cluster) == {"s1", "s2"}
        assert sorted(cluster.confirmed) == sorted(acks)

    asyncio.run(main())


async def next_request(cluster: Cluster) -> tuple[str, m.Message, asyncio.Future[Frame]]:
    """The oldest request not answered yet (waiting a little for one to be sent)."""
    for _ in range(200):
        for sid, c in cluster.clients.items():
            for msg, fut in c.sent:
                if not fut.done():
                    return sid, msg, fut
        await asyncio.sleep(0.01)
    raise AssertionError("no request was sent")


def reply(fut: asyncio.Future[Frame], msg: m.Message, payload: bytes = b"") -> None:
    fut.set_result(Frame(Kind.RESPONSE, msg.OP, 0, 1, msg.encode(), payload))


def test_a_page_created_before_the_presence_map_is_listed_is_in_the_map() -> None:
    """The top layer's presence map is loaded (ENUMERATE) while this client's whole-page
    write, which creates the page, is still on its way: the listing does not show it,
    yet the map must, or reads of that page would skip the top layer and return the
    older bytes of the layer below."""

    async def main() -> None:
        cluster = Cluster()
        vol = driver.Volume(cluster, volume_view(_doc(), "db"), read_only=False)  # type: ignore[arg-type]
        page = 5
        write = vol.start_write(page * PAGE, b"z" * PAGE, False)
        read = asyncio.ensure_future(vol.read(page * PAGE, 4096))
        answered = 0
        while not (read.done() and write.done()):
            _, msg, fut = await next_request(cluster)
            if isinstance(msg, m.WriteRequest):
                reply(fut, m.WriteResponse(next(tokens), 1))
            elif isinstance(msg, m.EnumerateRequest):
                # answered before the write's creation reached the server
                reply(fut, m.EnumerateResponse(0, True, ()))
            else:
                assert isinstance(msg, m.ReadRequest), msg
                assert msg.layer_id == 7, f"the read skipped the top layer: {msg}"
                reply(fut, m.ReadResponse(m.PageState.PRESENT, 1, m.FULL_MASK), b"z" * 4096)
            answered += 1
            assert answered < 20
            await asyncio.sleep(0.01)
        assert await read == b"z" * 4096
        await write

    asyncio.run(main())


@pytest.mark.parametrize("hot", [True, False], ids=["hot path", "full path"])
def test_an_attempt_that_failed_on_one_copy_is_confirmed_with_the_one_that_succeeds(
    hot: bool,
) -> None:
    """s2 takes the first attempt, s1 fails it: s2's token waits (the page stays dirty)
    and goes back with the tokens of the attempt redone on both; the copies that did not
    take it are never confirmed for it."""

    async def main() -> None:
        cluster, out = await one_write(hot)
        for _ in range(200):
            if all(c.sent for c in cluster.clients.values()):
                break
            await asyncio.sleep(0.01)
        took = ("s2", ack(cluster.clients["s2"].sent[0][1]))
        # s1 lost the request (its connection dropped): a failed attempt
        lost = m.encode_error(Unavailable("connection lost"))
        failed = Frame(Kind.RESPONSE, m.Op.WRITE, int(ErrorCode.UNAVAILABLE), 1, lost, b"")
        cluster.clients["s1"].sent[0][1].set_result(failed)
        await asyncio.sleep(0.05)
        assert cluster.confirmed == []
        assert not out.done()
        retry = await answer_all(cluster, 1)
        await asyncio.wait_for(out, 5)
        assert await answer_flushes(cluster) == {"s1", "s2"}
        assert sorted(cluster.confirmed) == sorted([took, *retry])

    asyncio.run(main())


@pytest.mark.parametrize("hot", [True, False], ids=["hot path", "full path"])
def test_tokens_go_back_only_once_every_copy_made_the_write_durable(hot: bool) -> None:
    """Both copies acknowledge a write; its tokens wait for a FLUSH that succeeds on
    both.  One that fails on s2 (its bytes may be only in its page cache) confirms
    nothing, on s1 either: s1's mask keeps disowning s2, so a power loss of s2 cannot
    leave s1 vouching for bytes s2 lost.  The next write, flushed on both, is confirmed."""

    async def main() -> None:
        cluster, out = await one_write(hot)
        first = await answer_all(cluster, 0)
        await asyncio.wait_for(out, 5)
        await asyncio.sleep(0.05)
        assert cluster.confirmed == [], "tokens went back before any copy flushed"
        assert await answer_flushes(cluster, failing=("s2",)) == {"s1", "s2"}
        assert cluster.confirmed == [], "tokens went back though s2 did not flush"
        vol = driver.Volume(cluster, volume_view(_doc(), "db"), read_only=False)  # type: ignore[arg-type]
        again = vol.start_write(6 * PAGE, b"w" * 4096, False)
        done = len(cluster.clients["s1"].sent)
        second = [(sid, ack(c.sent[done - 1][1])) for sid, c in cluster.clients.items()]
        await asyncio.wait_for(again, 5)
        assert await answer_flushes(cluster) == {"s1", "s2"}
        assert sorted(cluster.confirmed) == sorted(second)
        assert not set(first) & set(cluster.confirmed)

    asyncio.run(main())


def test_a_client_flush_confirms_the_writes_it_covered() -> None:
    """A FLUSH of the client makes the writes acknowledged before it durable on every
    copy: their tokens go back once it succeeded, not before."""

    async def main() -> None:
        cluster = Cluster()
        vol = driver.Volume(cluster, volume_view(_doc(), "db"), read_only=False)  # type: ignore[arg-type]
        driver.SYNC_DELAY = 3600.0  # only the client's FLUSH makes it durable here
        try:
            out = vol.start_write(5 * PAGE, b"f" * 4096, False)
            acks = await answer_all(cluster, 0)
            await asyncio.wait_for(out, 5)
            flush = asyncio.ensure_future(vol.flush())
            await asyncio.sleep(0.05)
            assert cluster.confirmed == []
            assert await answer_flushes(cluster) == {"s1", "s2"}
            await asyncio.wait_for(flush, 5)
            assert sorted(cluster.confirmed) == sorted(acks)
        finally:
            driver.SYNC_DELAY = 0.001

    asyncio.run(main())


@pytest.mark.parametrize("hot", [True, False], ids=["hot path", "full path"])
def test_no_write_goes_out_while_the_only_up_copy_is_being_filled(hot: bool) -> None:
    """Page 5 is in partition 1, (s2, s1): s2 is up but being filled, s1 (the only
    complete copy) recovering.  Neither may be read, and either may lack a write the
    other took (s1 one it lost to a power cut, s2 every page it was not filled with
    yet): a write acknowledged by them could be lost, so it waits for a map in which a
    copy may be read again."""

    def doc(s1: str) -> dict[str, Any]:
        d = _doc()
        d["servers"]["s1"]["state"] = s1
        d["servers"]["s2"]["state"] = "up"
        d["layers"]["7"]["filling"] = [[1, "s2"]]
        if s1 == "up":
            d["epoch"] = d["published_epoch"] = 10
        return d

    async def main() -> None:
        cluster = Cluster()
        cluster.managers.doc = doc("recovering")
        vol = driver.Volume(cluster, volume_view(doc("recovering"), "db"), read_only=False)  # type: ignore[arg-type]
        data = b"w" * 4096
        out = vol.start_write(5 * PAGE, data, False) if hot else vol.write(5 * PAGE, data)
        out = asyncio.ensure_future(out)
        await asyncio.sleep(0.3)
        sent = [(sid, msg) for sid, c in cluster.clients.items() for msg, _ in c.sent]
        assert not any(isinstance(msg, m.WriteRequest) for _, msg in sent), sent
        assert not out.done()
        cluster.managers.doc = doc("up")  # s1 is resynchronised and up again
        acks = await answer_all(cluster, 0)
        await asyncio.wait_for(out, 5)
        assert await answer_flushes(cluster) == {"s1", "s2"}
        assert sorted(cluster.confirmed) == sorted(acks)

    asyncio.run(main())


def test_a_resync_flushes_the_source_before_it_marks_any_copy_clean() -> None:
    """Both copies of page 0 disown each other (a write whose FLUSH did not succeed on
    both); the driver's resynchronisation copies s1's bytes to s2 with ``fua``.  The
    masks it then sets vouch for s1's bytes too, which may be in s1's page cache only,
    so s1 gets a FLUSH, answered, before any MARK_CLEAN goes out."""

    async def main() -> None:
        cluster = Cluster()
        doc = _doc()
        doc["servers"]["s2"]["state"] = "up"
        view = volume_view(doc, "db")
        vol = driver.Volume(cluster, view, read_only=False)  # type: ignore[arg-type]
        order: list[tuple[str, str]] = []
        masks = {"s1": 0xFFFFFFFF & ~0b10, "s2": 0xFFFFFFFF & ~0b01}

        async def serve() -> None:
            seen = dict.fromkeys(cluster.clients, 0)
            while True:
                for sid, c in cluster.clients.items():
                    for msg, fut in c.sent[seen[sid] :]:
                        order.append((sid, type(msg).__name__))
                        if isinstance(msg, m.StatusRequest):
                            reply(fut, m.StatusResponse(((0, 1, masks[sid], 3, 0),)))
                        elif isinstance(msg, m.ReadRequest):
                            reply(fut, m.ReadResponse(1, 3, masks[sid]), b"a" * PAGE)
                        elif isinstance(msg, m.WriteRequest):
                            assert msg.fua
                            assert msg.conditional
                            reply(fut, m.WriteResponse(next(tokens), 4))
                        elif isinstance(msg, m.FlushRequest):
                            reply(fut, m.FlushResponse())
                        elif isinstance(msg, m.MarkCleanRequest):
                            reply(fut, m.MarkCleanResponse(msg.generation))
                    seen[sid] = len(c.sent)
                await asyncio.sleep(0.001)

        server = asyncio.ensure_future(serve())
        try:
            await asyncio.wait_for(vol._resync(view, view.top, 0), 5)
        finally:
            server.cancel()
        marks = [k for k, (_, op) in enumerate(order) if op == "MarkCleanRequest"]
        assert marks, order
        assert ("s2", "WriteRequest") in order[: marks[0]], order
        assert ("s1", "FlushRequest") in order[: marks[0]], order

    asyncio.run(main())

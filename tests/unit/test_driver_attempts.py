"""A write attempt that took longer than ``WRITE_ATTEMPT_LIMIT`` is redone, and its
tokens are never confirmed (what bounds ``syncmask.IN_FLIGHT``, see docs/protocol.md).

The driver's connections are replaced by recorders the test answers by hand, and the
driver's clock is moved forward between a request and its answers.
"""

from __future__ import annotations

import asyncio
import itertools
import types
from typing import Any

import pytest

from lamina.client import driver
from lamina.client.layout import volume_view
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
    async def wait_map(self, min_epoch: int, deadline: float) -> dict[str, Any]:
        return _doc()


class Cluster:
    """The parts of ``driver.Cluster`` a write uses."""

    io_timeout = 30.0
    session = "abc"

    def __init__(self) -> None:
        self.clients = {"s1": Recorder(), "s2": Recorder()}
        self.confirmed: list[tuple[str, int]] = []
        self.managers = Managers()

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


tokens = itertools.count(100)


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
def test_a_write_attempt_answered_too_late_is_redone_and_its_tokens_dropped(
    hot: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(driver, "time", types.SimpleNamespace(monotonic=lambda: now[0]))

    async def main() -> None:
        cluster = Cluster()
        vol = driver.Volume(cluster, volume_view(_doc(), "db"), read_only=False)  # type: ignore[arg-type]
        data = b"x" * 4096
        if hot:
            out: asyncio.Future[None] = vol.start_write(5 * PAGE, data, False)
        else:
            out = asyncio.ensure_future(vol.write(5 * PAGE, data))
        await asyncio.sleep(0)
        now[0] += WRITE_ATTEMPT_LIMIT + 1  # every copy answers, but only this much later
        late = await answer_all(cluster, 0)
        await asyncio.sleep(0.05)
        assert not out.done(), "a write acknowledged after its attempt took too long"
        retry = await answer_all(cluster, 1)  # the attempt redone answers at once
        await asyncio.wait_for(out, 5)
        assert not set(late) & set(cluster.confirmed), "the late attempt's tokens went back"
        assert sorted(cluster.confirmed) == sorted(retry)
        for c in cluster.clients.values():
            assert [type(msg) for msg, _ in c.sent] == [m.WriteRequest, m.WriteRequest]

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
        assert sorted(cluster.confirmed) == sorted(acks)

    asyncio.run(main())

"""What a driver's FLUSH covers, and when a copy-up out of a migration source may
tombstone the source, against real storage services (in-memory stores).

Each storage server is a real :class:`StorageService`; the driver's connections hand
its requests straight to them and every request and answer is written to one log in
the order it happened, so the tests check orders, not mock calls:

- a FLUSH after the top layer moved to other servers (a migration pushed a new top, or
  a snapshot's new top landed elsewhere) still reaches the servers of the old top that
  took writes acknowledged before it;
- a copy-up out of a migration source tombstones the source page only after every copy
  of the new top answered a FLUSH (a power loss before it must find the page still in
  the source), and the flush after the write does tombstone it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lamina.client import driver
from lamina.client.layout import volume_view
from lamina.errors import LaminaError
from lamina.storage.memstore import MemPageStore
from lamina.storage.service import StorageService
from lamina.wire import messages as m
from lamina.wire.framing import Frame, Kind, Payload
from lamina.wire.messages import PageState
from tests.unit import test_driver_races as races

PAGE = 64 * 1024
VOL = 3
OLD, NEW = 4, 7
EPOCH = 8
SERVERS = ("s1", "s2", "s3", "s4")


def doc(change: str) -> dict[str, Any]:
    """A published map of volume ``db``: ``none`` (one layer on s1, s2), ``migration``
    (it migrates to a new top on s3, s4) or ``snapshot`` (it is a snapshot under a new
    top on s3, s4)."""
    servers = {
        sid: {"addr": f"127.0.0.1:{7400 + k}", "state": "up", "capacity": 1, "zone": ""}
        for k, sid in enumerate(SERVERS)
    }
    old = {"volume_id": VOL, "placement": [["s1", "s2"]], "role": "live", "migrates_to": None}
    layers = {str(OLD): old}
    stack = [OLD]
    if change != "none":
        new = {"volume_id": VOL, "placement": [["s3", "s4"]], "role": "live", "migrates_to": None}
        layers[str(NEW)] = new
        stack.append(NEW)
        old["role"] = "migration_source" if change == "migration" else "snapshot"
        old["migrates_to"] = NEW if change == "migration" else None
    return {
        "format": 1, "epoch": EPOCH, "published_epoch": EPOCH, "servers": servers,
        "volumes": {
            "db": {
                "id": VOL, "size": 16 * PAGE, "page_size": PAGE, "replicas": 2, "stripe": 1,
                "layers": stack, "fence_epoch": 1,
                "lock": {"session": "abc", "host": "h", "pid": 12, "since": 1},
            }
        },
        "layers": layers,
    }  # fmt: skip


class Link:
    """A driver's connection to one real storage service; logs requests and answers."""

    connected = True
    in_flight = 0

    def __init__(self, sid: str, service: StorageService, log: list[tuple[str, str, str]]):
        self.sid = sid
        self.service = service
        self.log = log

    def send(self, msg: m.Message, payload: Payload = b"") -> asyncio.Future[Frame]:
        self.log.append(("sent", self.sid, type(msg).__name__))
        return asyncio.ensure_future(self._answer(msg, bytes(payload)))

    async def _answer(self, msg: m.Message, payload: bytes) -> Frame:
        op = int(type(msg).OP)
        name = type(msg).__name__
        try:
            result = self.service.handle(msg, payload)
            reply, data = result if isinstance(result, tuple) else await result
        except LaminaError as exc:
            self.log.append(("failed", self.sid, name))
            return Frame(Kind.RESPONSE, op, int(exc.code), 1, m.encode_error(exc), b"")
        self.log.append(("answered", self.sid, name))
        return Frame(Kind.RESPONSE, op, 0, 1, reply.encode(), data)

    async def drain(self) -> None:
        return None


class Managers:
    def __init__(self) -> None:
        self.doc = doc("none")

    async def wait_map(self, min_epoch: int, deadline: float) -> dict[str, Any]:
        return self.doc


class Cluster(races.Cluster):
    """The parts of ``driver.Cluster`` a volume uses, over real storage services."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, str]] = []
        self.services = {sid: StorageService(MemPageStore(), sid, lambda: 0.0) for sid in SERVERS}
        for service in self.services.values():
            service.epoch = EPOCH
        self.links = {sid: Link(sid, s, self.log) for sid, s in self.services.items()}
        self.maps = Managers()
        self.managers = self.maps  # type: ignore[assignment]

    def sender(self, sid: str) -> Link:  # type: ignore[override]
        return self.links[sid]

    async def connected(self, sid: str) -> Link:  # type: ignore[override]
        return self.links[sid]

    def confirm_later(self, sid: str, token: int) -> None:
        self.services[sid].handle(m.RestoreRequest((token,)), b"")

    def send_restores(self) -> None:
        return None

    async def call(self, sid: str, msg: m.Message, payload: Any = b"") -> tuple[Any, Any]:
        return self.answer(sid, await self.links[sid].send(msg, payload))

    def report(self, sid: str, error: BaseException) -> None:
        raise AssertionError(f"{sid} failed: {error}")

    def flushed(self) -> set[str]:
        """The servers that answered a FLUSH."""
        return {sid for what, sid, op in self.log if what == "answered" and op == "FlushRequest"}

    def state(self, sid: str, layer: int, page: int) -> int:
        result = self.services[sid].handle(m.StatusRequest(VOL, EPOCH, layer, (page,)), b"")
        assert isinstance(result, tuple)
        reply = result[0]
        assert isinstance(reply, m.StatusResponse)
        return reply.entries[0][1]


def open_volume(cluster: Cluster, change: str) -> driver.Volume:
    cluster.maps.doc = doc(change)
    return driver.Volume(cluster, volume_view(doc(change), "db"), read_only=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", ["migration", "snapshot"])
def test_a_flush_covers_writes_acknowledged_into_the_old_top(change: str) -> None:
    """Writes acknowledged into the top layer on s1, s2, then a map whose top is on s3,
    s4: the next FLUSH reaches s1 and s2 too, and the one after it only the new top."""

    async def main() -> None:
        cluster = Cluster()
        vol = open_volume(cluster, "none")
        await vol.write(0, b"a" * PAGE)  # whole pages: no copy-up
        await vol.write(PAGE, b"b" * PAGE)
        cluster.maps.doc = doc(change)
        await vol.refresh(EPOCH)
        assert vol.view.top.id == NEW
        await vol.flush()
        assert cluster.flushed() >= {"s1", "s2"}, cluster.log
        cluster.log.clear()
        await vol.flush()  # nothing new was written to the old top
        assert cluster.flushed() == {"s3", "s4"}, cluster.log

    asyncio.run(main())


def test_a_copy_up_out_of_a_migration_source_tombstones_only_after_a_flush() -> None:
    """A partial write to a page only the migration source holds copies it up into the
    new top; no copy of the source is tombstoned before both copies of the new top
    answered a FLUSH, and the flush that follows the write tombstones it."""

    async def main() -> None:
        cluster = Cluster()
        for sid in ("s1", "s2"):
            created = cluster.services[sid].handle(
                m.CreateRequest(VOL, EPOCH, OLD, 2, PAGE, 0xFFFFFFFF, False), b"c" * PAGE
            )
            assert isinstance(created, tuple)
        vol = open_volume(cluster, "migration")
        await vol.write(2 * PAGE + 10, b"x")
        assert await vol.read(2 * PAGE, PAGE) == b"c" * 10 + b"x" + b"c" * (PAGE - 11)
        await vol.flush()
        tombstones = [
            k for k, (what, _, op) in enumerate(cluster.log)
            if what == "sent" and op == "TombstoneRequest"
        ]  # fmt: skip
        assert tombstones, f"the source page was never tombstoned: {cluster.log}"
        before = cluster.log[: tombstones[0]]
        synced = {sid for what, sid, op in before if what == "answered" and op == "FlushRequest"}
        assert synced >= {"s3", "s4"}, f"tombstoned before the new top was durable: {before}"
        for sid in ("s1", "s2"):
            assert cluster.state(sid, OLD, 2) == PageState.TOMBSTONE
        for sid in ("s3", "s4"):
            assert cluster.state(sid, NEW, 2) == PageState.PRESENT

    asyncio.run(main())

"""Lock sessions: which locks expire (pure), and the leader acting on it with a virtual
clock; failure reports checked against real wire servers on loopback."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lamina.errors import NotFound, Unavailable
from lamina.mgmt import clustermap as cm
from lamina.mgmt.leader import LeaderDuties
from lamina.mgmt.service import ManagerService
from lamina.mgmt.sessions import SessionTable, expired_locks, locks_held
from lamina.wire import messages as m
from lamina.wire.connection import ServerConnection
from lamina.wire.framing import Payload
from tests.unit.test_leader import Clock, LocalLog

GiB = 1 << 30
T0 = 1_795_600_800_000
TIMEOUT = 10.0


def locked_map(**holders: str) -> cm.ClusterMap:
    """Volumes named by the keywords, each locked by the session given."""
    cmap = cm.apply(cm.empty_map(), cm.AddServer("s1", "127.0.0.1:1", GiB))
    for name, session in holders.items():
        cmap = cm.apply(cmap, cm.CreateVolume(name, GiB, replicas=1, stripe=1))
        cmap = cm.apply(cmap, cm.AcquireLock(name, session, "h", 1, T0))
    return cmap


# --- the pure decision ---------------------------------------------------------------------


def test_a_lock_expires_only_after_a_full_timeout_of_silence() -> None:
    """Counting from the later of the last keepalive and the leader's start, a lock
    expires once more than the timeout has passed, not at the boundary."""
    cmap = locked_map(db="a", logs="b")
    seen = {"a": 100.0, "b": 105.0}
    assert expired_locks(cmap, seen, 50.0, 110.0, TIMEOUT) == []
    assert [n for n, _ in expired_locks(cmap, seen, 50.0, 110.5, TIMEOUT)] == ["db"]
    assert [n for n, _ in expired_locks(cmap, seen, 50.0, 116.0, TIMEOUT)] == ["db", "logs"]
    # a leader that started after the keepalives gives everyone a full timeout
    assert expired_locks(cmap, seen, 108.0, 118.0, TIMEOUT) == []
    assert len(expired_locks(cmap, seen, 108.0, 118.1, TIMEOUT)) == 2
    # a session never heard from counts from the leader's start
    assert expired_locks(cmap, {}, 100.0, 110.0, TIMEOUT) == []
    (name, lock), *_ = expired_locks(cmap, {}, 100.0, 110.1, TIMEOUT)
    assert (name, lock) == ("db", cm.Lock("a", "h", 1, T0))


def test_locks_held_lists_a_sessions_volumes() -> None:
    cmap = locked_map(db="a", logs="b", vm="a")
    assert locks_held(cmap, "a") == ["db", "vm"]
    assert locks_held(cmap, "zz") == []


@given(
    beats=st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 100)), max_size=12),
    leader_since=st.floats(0, 100),
    later=st.floats(0, 50),
)
def test_forgetting_old_records_changes_no_decision(
    beats: list[tuple[str, float]], leader_since: float, later: float
) -> None:
    """observe() drops records older than the timeout; the expiry decision, now and later,
    is the same as with every record kept."""
    cmap = locked_map(db="a", logs="b", vm="c")
    granted = frozenset((n, v.lock.session) for n, v in cmap.volumes.items() if v.lock)
    table = SessionTable(TIMEOUT, granted=granted)  # every grant seen already
    for session, t in beats:
        table.keepalive(session, t)
    everything = dict(table.last_seen)
    now = max([t for _, t in beats] + [leader_since])
    table.observe(cmap, now)
    for when in (now, now + later):
        assert table.expired(cmap, leader_since, when) == expired_locks(
            cmap, everything, leader_since, when, TIMEOUT
        )


def test_a_grant_seen_for_the_first_time_counts_as_a_keepalive() -> None:
    """A lock granted through another manager is not judged by what this one heard
    before it: the first sight of the grant starts its timeout; a takeover too."""
    table = SessionTable(TIMEOUT)
    table.observe(cm.empty_map(), 0.0)
    cmap = locked_map(db="a")
    table.observe(cmap, 500.0)
    assert table.expired(cmap, 0.0, 509.0) == []
    table.observe(cmap, 509.0)  # seen before: no new keepalive
    assert [n for n, _ in table.expired(cmap, 0.0, 511.0)] == ["db"]
    taken = cm.apply(cmap, cm.AcquireLock("db", "b", "h2", 2, T0 + 1, takeover=True))
    table.observe(taken, 511.0)
    assert table.expired(taken, 0.0, 520.0) == []


# --- the leader's loop -------------------------------------------------------------------


def duties_with_lock(clock: Clock, is_leader: Callable[[], bool] = lambda: True) -> LeaderDuties:
    svc = ManagerService("m1")
    svc.log = LocalLog(svc)
    for cmd in (
        cm.AddServer("s1", "127.0.0.1:1", GiB),
        cm.CreateVolume("db", GiB, replicas=1, stripe=1),
        cm.AcquireLock("db", "abc", "h", 42, T0),
    ):
        assert svc.apply_entry(cm.encode_command(cmd))[0]
    return LeaderDuties(svc, is_leader, clock, lease_duration=3.0, grace=2.5,
                        key=secrets.token_bytes(32), session_timeout=TIMEOUT)  # fmt: skip


def holder(duties: LeaderDuties) -> cm.Lock | None:
    return duties.service.map.volumes["db"].lock


async def tick(duties: LeaderDuties, clock: Clock, seconds: float, step: float = 0.2) -> None:
    """Run the duty loop for ``seconds`` of virtual time, letting proposals commit."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += step
        duties.run_once()
        for _ in range(3):
            await asyncio.sleep(0)


def test_the_leader_releases_a_silent_sessions_lock_and_keeps_a_live_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With keepalives the lock stays; after the timeout without one it is released,
    with a warning naming the holder, at a new epoch that fences the volume."""

    async def main() -> None:
        clock = Clock()
        duties = duties_with_lock(clock)
        for _ in range(6):  # 24 s of keepalives every 4 s
            await tick(duties, clock, 4.0)
            assert duties.keepalive("abc") == ["db"]
        assert holder(duties) is not None
        before = duties.service.map.epoch
        await tick(duties, clock, TIMEOUT - 0.5)
        assert holder(duties) is not None
        await tick(duties, clock, 2.0)
        assert holder(duties) is None
        after = duties.service.map
        assert after.volumes["db"].fence_epoch == after.epoch == before + 1
        assert duties.keepalive("abc") == []

    asyncio.run(main())
    assert "host h pid 42 since 2026-11-25T10:00:00Z (session abc)" in caplog.text


def test_a_follower_releases_nothing_and_a_new_leader_gives_a_full_timeout() -> None:
    """Only the leader expires sessions, and it counts from when it took the role."""

    async def main() -> None:
        clock = Clock()
        leading = False
        duties = duties_with_lock(clock, lambda: leading)
        await tick(duties, clock, 3 * TIMEOUT)
        assert holder(duties) is not None
        leading = True
        await tick(duties, clock, TIMEOUT - 0.5)
        assert holder(duties) is not None
        await tick(duties, clock, 2.0)
        assert holder(duties) is None

    asyncio.run(main())


# --- failure reports ---------------------------------------------------------------------


class Pinged:
    """A wire-protocol handler that answers PING as storage server ``server_id``."""

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id

    def current_epoch(self) -> int:
        return 0

    def handle(self, msg: m.Message, payload: Payload) -> tuple[m.Message, Payload]:
        assert isinstance(msg, m.PingRequest)
        return m.PingResponse(self.server_id, 0, True, 1, 0, 0), b""


def reported(body: Callable[[LeaderDuties, Clock], Awaitable[Any]]) -> Any:
    clock = Clock()
    duties = duties_with_lock(clock)

    async def main() -> Any:
        return await body(duties, clock)

    return asyncio.run(main())


async def serve_ping(duties: LeaderDuties, server_id: str) -> asyncio.Server:
    """A PING answerer on loopback, registered in the map as s2."""
    assert duties.key is not None
    key = duties.key
    server = await asyncio.get_running_loop().create_server(
        lambda: ServerConnection(Pinged(server_id), key), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    await duties.service.submit(cm.AddServer("s2", f"127.0.0.1:{port}", GiB))
    return server


def test_a_reported_server_that_answers_stays_up() -> None:
    """A reported server that answers PING as itself is left as it is."""

    async def body(duties: LeaderDuties, clock: Clock) -> Any:
        server = await serve_ping(duties, "s2")
        try:
            duties.run_once()
            return await duties.check_report("s2", "timed out")
        finally:
            server.close()

    assert reported(body) == (cm.ServerState.UP, True)


def test_a_reported_server_that_does_not_answer_is_marked_down_once() -> None:
    """No answer (nothing listens), or an answer from another server at that address:
    marked down, at a new epoch; reported again, it stays down with no new change."""

    async def body(duties: LeaderDuties, clock: Clock) -> Any:
        server = await serve_ping(duties, "s7")
        try:
            duties.run_once()
            svc = duties.service
            assert await duties.check_report("s1", "connection refused") == (
                cm.ServerState.DOWN, False,
            )  # fmt: skip
            epoch = svc.map.epoch
            again = await asyncio.gather(
                duties.check_report("s1", "again"), duties.check_report("s1", "and again")
            )
            assert list(again) == [(cm.ServerState.DOWN, False)] * 2
            assert svc.map.epoch == epoch
            assert await duties.check_report("s2", "odd") == (cm.ServerState.DOWN, False)
            return svc.map.epoch - epoch
        finally:
            server.close()

    assert reported(body) == 1


def test_reports_need_the_leader_and_a_known_server() -> None:
    """A manager that is not leading refuses (Unavailable); an unknown server is NotFound."""

    async def body(duties: LeaderDuties, clock: Clock) -> None:
        with pytest.raises(Unavailable, match="not the leader"):
            await duties.check_report("s1", "x")
        duties.run_once()
        with pytest.raises(NotFound):
            await duties.check_report("s9", "x")
        assert duties.service.map.servers["s1"].state is cm.ServerState.UP

    reported(body)


def test_expiring_a_lock_released_meanwhile_changes_nothing() -> None:
    """An expiry decided on a map whose lock was released since is refused and harmless."""

    async def body(duties: LeaderDuties, clock: Clock) -> None:
        duties.run_once()
        seen = duties.service.map
        await duties.service.submit(cm.ReleaseLock("db", "abc"))
        before = duties.service.map
        duties.expire_sessions(seen, clock.now + 100)
        for _ in range(3):
            await asyncio.sleep(0)
        assert duties.service.map == before

    reported(body)

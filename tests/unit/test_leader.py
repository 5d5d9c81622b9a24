"""The leader's duty loop and lease grants, driven with a virtual clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lamina.errors import NotFound, Unavailable
from lamina.mgmt import clustermap as cm
from lamina.mgmt.leader import LeaderDuties, fences_of, publication_waits_for
from lamina.mgmt.service import ManagerService, encode_entry
from lamina.wire import messages as m

GiB = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class LocalLog:
    """Commits every proposal at once on one service (no Raft: the service is the unit)."""

    def __init__(self, service: ManagerService) -> None:
        self.service = service

    async def propose(self, command: bytes, timeout: float = 5.0) -> Any:
        return self.service.apply_entry(command)


def make(clock: Clock) -> tuple[ManagerService, LeaderDuties]:
    svc = ManagerService("m1")
    svc.log = LocalLog(svc)
    svc.apply_entry(cm.encode_command(cm.AddServer("s1", "127.0.0.1:1", GiB)))
    duties = LeaderDuties(svc, lambda: True, clock, lease_duration=3.0, grace=2.5)
    return svc, duties


def lease(duties: LeaderDuties, incarnation: int = 1) -> m.Message:
    reply, _ = duties.handle(m.LeaseRequest("s1", 1, incarnation), b"")
    return reply


def in_loop(fn: Any) -> Any:
    """Run the test body inside an event loop (the duties schedule their proposals)."""

    def run() -> None:
        async def main() -> None:
            fn()
            await asyncio.sleep(0)

        asyncio.run(main())

    run.__doc__ = fn.__doc__
    return run


def state(svc: ManagerService) -> cm.ServerState:
    return svc.map.servers["s1"].state


@in_loop
def test_grants_need_leadership_and_a_member() -> None:
    """Only a leading manager grants, and only to servers of the map."""
    clock = Clock()
    svc, duties = make(clock)
    with pytest.raises(Unavailable):
        lease(duties)  # the loop has not run: not leading yet
    duties.run_once()
    reply = lease(duties)
    assert isinstance(reply, m.LeaseResponse)
    assert reply.duration_ms == 3000
    assert reply.epoch == svc.map.epoch
    with pytest.raises(NotFound):
        duties.handle(m.LeaseRequest("s9", 1, 1), b"")


@in_loop
def test_a_paused_leader_grants_nothing_until_raft_had_time_to_depose_it() -> None:
    """After a pause much longer than the loop's period, the manager refuses grants for
    the grace period, then leads again if Raft still says so."""
    clock = Clock()
    _, duties = make(clock)
    duties.run_once()
    lease(duties)
    clock.now += 10.0  # SIGSTOP / SIGCONT
    duties.run_once()
    with pytest.raises(Unavailable):
        lease(duties)
    clock.now += 1.0
    duties.run_once()
    with pytest.raises(Unavailable):
        lease(duties)
    for _ in range(10):  # past the grace, one loop period at a time
        clock.now += 0.2
        duties.run_once()
    assert isinstance(lease(duties), m.LeaseResponse)


def test_a_server_is_marked_down_only_after_grace_and_lease() -> None:
    """A new leader marks a silent server down only after grace + lease, then publishes."""

    async def main() -> None:
        clock = Clock()
        svc, duties = make(clock)
        start = clock.now
        duties.run_once()
        while clock.now < start + 2.5 + 3.0:
            clock.now += 0.2
            duties.run_once()
            await asyncio.sleep(0)
            if clock.now < start + 2.5 + 3.0:
                assert state(svc) == cm.ServerState.UP
        for _ in range(5):
            clock.now += 0.2
            duties.run_once()
            await asyncio.sleep(0)
        assert state(svc) == cm.ServerState.DOWN
        assert svc.map.published_epoch == svc.map.epoch
        lease(duties)  # it comes back: recovering
        for _ in range(3):
            await asyncio.sleep(0)
        assert state(svc) == cm.ServerState.RECOVERING

    asyncio.run(main())


def test_a_restart_is_seen_by_a_leader_that_never_granted_the_earlier_lease() -> None:
    """The incarnation a server reports is committed to the map, so a new leader (whose
    lease table is empty) tells that the server restarted: it becomes recovering."""

    async def settle() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    async def main() -> None:
        clock = Clock()
        svc, first = make(clock)
        first.run_once()
        lease(first, incarnation=1)
        await settle()
        assert svc.map.servers["s1"].incarnation == 1
        assert state(svc) == cm.ServerState.UP  # a first report is no restart
        lease(first, incarnation=1)
        await settle()
        epoch = svc.map.epoch
        assert svc.map.servers["s1"].incarnation == 1  # nothing new to commit
        first.table.step_down()  # failover: another manager leads, knowing nothing
        second = LeaderDuties(svc, lambda: True, clock, lease_duration=3.0, grace=2.5)
        second.run_once()
        with pytest.raises(Unavailable, match="restarted"):  # no lease before it is recorded
            lease(second, incarnation=2)
        await settle()
        assert state(svc) == cm.ServerState.RECOVERING
        assert svc.map.servers["s1"].incarnation == 2
        assert svc.map.epoch == epoch + 1

    asyncio.run(main())


def test_a_server_retired_from_a_layer_is_fenced_and_awaited_like_its_holders() -> None:
    """The server a re-replication moved a copy away from gets the volume's fence with
    its lease and is one of the servers a publication of that volume waits for."""
    cmap = cm.empty_map()
    for cmd in (
        cm.AddServer("s1", "127.0.0.1:1", GiB),
        cm.AddServer("s2", "127.0.0.1:2", GiB),
        cm.CreateVolume("db", GiB, replicas=2, stripe=1),
        cm.AddServer("s3", "127.0.0.1:3", GiB),
        cm.SetServerState("s2", cm.ServerState.DOWN),
        cm.Rereplicate("s2"),
    ):
        cmap = cm.apply(cmap, cmd)
    vid = cmap.volumes["db"].id
    assert fences_of(cmap, "s2") == ((vid, cmap.epoch),)
    assert publication_waits_for(cmap) == {"s1", "s2", "s3"}
    (lid,) = cmap.layers
    reclaimed = cm.apply(cmap, cm.ReclaimDone(lid, "s2"))
    assert fences_of(reclaimed, "s2") == ()
    locked = cm.apply(reclaimed, cm.AcquireLock("db", "abc", "h", 1, 1_800_000_000_000))
    assert publication_waits_for(locked) == {"s1", "s3"}


@in_loop
def test_a_lease_carries_the_lineage_tokens_of_the_layers_on_the_server() -> None:
    """A LEASE answer lists (layer id, lineage token) of every layer placed on the server,
    so it can refuse a layer file recorded for another map's layer of the same id."""
    clock = Clock()
    svc, duties = make(clock)
    svc.apply_entry(encode_entry(cm.CreateVolume("db", GiB, 1, 1), 0x1234))
    duties.run_once()
    reply = lease(duties)
    assert isinstance(reply, m.LeaseResponse)
    assert reply.lineages == ((1, cm.layer_lineage(0x1234, 1)),)
    assert reply.lineages[0][1] == svc.map.layers[1].lineage


def test_a_restarted_server_gets_no_lease_at_the_epoch_that_has_it_up() -> None:
    """A server that restarted may have lost writes to a power cut, and has lost its
    episodes; while the map still has it up, clients would read from it.  So its LEASE
    is refused until the restart is in the map (it is recovering at a new epoch), and
    the lease it then gets carries that epoch: older clients get STALE from it."""

    async def settle() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    async def main() -> None:
        clock = Clock()
        svc, duties = make(clock)
        duties.run_once()
        lease(duties, incarnation=1)
        await settle()
        epoch = svc.map.epoch
        assert state(svc) == cm.ServerState.UP
        with pytest.raises(Unavailable, match="restarted"):
            lease(duties, incarnation=2)
        await settle()  # ServerStarted commits
        assert state(svc) == cm.ServerState.RECOVERING
        granted = lease(duties, incarnation=2)
        assert isinstance(granted, m.LeaseResponse)
        assert granted.epoch == epoch + 1 == svc.map.epoch

    asyncio.run(main())

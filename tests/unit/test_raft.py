"""ReplicatedLog (lamina.mgmt.raft): real PySyncObj members over loopback, in process.

Each member applies commands to its own :class:`Recorder` (a list of the commands it has
applied), so "the same log on every member" is "the same list on every member".  Every
wait is a short poll bounded by a deadline, and every test coroutine by ``run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
from pysyncobj.journal import LAST_RECORD_OFFSET_OFFSET

from lamina.errors import LocalError, Unavailable
from lamina.mgmt.raft import (
    JOURNAL_FILE,
    SNAPSHOT_FILE,
    SNAPSHOT_MAGIC,
    NotLeader,
    RaftStatus,
    ReplicatedLog,
)

KEY = "6b" * 32
WRONG_KEY = "77" * 32
TEST_TIMEOUT = 25.0  # bound on one test's coroutine
WAIT = 10.0  # bound on one awaited condition (elections take about a second)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT) -> T:
    """Run one test coroutine on a fresh event loop, bounded by ``timeout`` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def free_addrs(n: int) -> list[str]:
    """``n`` distinct free HOST:PORT addresses on 127.0.0.1 (bound at once, then freed)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]


class Recorder:
    """A toy state machine: the list of commands applied, in order."""

    def __init__(self) -> None:
        self.applied: list[bytes] = []
        self.loads = 0
        self._lock = threading.Lock()

    def apply(self, command: bytes) -> int:
        if command == b"boom":
            raise ValueError("refused: boom")
        with self._lock:
            self.applied.append(command)
            return len(self.applied)

    def dump(self) -> bytes:
        with self._lock:
            return msgpack.packb(self.applied)

    def load(self, data: bytes) -> None:
        with self._lock:
            self.applied = list(msgpack.unpackb(data))
            self.loads += 1

    def snapshot(self) -> list[bytes]:
        with self._lock:
            return list(self.applied)


class Group:
    """Members of one Raft group in this process, each with its own dir and Recorder."""

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.addrs = free_addrs(size)
        self.members: list[ReplicatedLog | None] = [None] * size
        self.recorders: list[Recorder] = [Recorder() for _ in range(size)]

    def start(self, i: int, password: str = KEY) -> ReplicatedLog:
        """Start (or restart, on the same journal dir) member ``i`` with a fresh Recorder."""
        assert self.members[i] is None
        rec = self.recorders[i] = Recorder()
        member = ReplicatedLog(
            self_addr=self.addrs[i],
            peers=self.addrs,
            journal_dir=self.root / f"m{i}",
            password=password,
            apply=rec.apply,
            dump=rec.dump,
            load=rec.load,
        )
        self.members[i] = member
        return member

    def stop(self, i: int) -> None:
        member = self.members[i]
        assert member is not None
        member.close()
        self.members[i] = None

    def live(self) -> list[int]:
        return [i for i, m in enumerate(self.members) if m is not None]

    def member(self, i: int) -> ReplicatedLog:
        member = self.members[i]
        assert member is not None
        return member

    def close_all(self) -> None:
        for i in self.live():
            self.stop(i)

    def statuses(self, which: list[int] | None = None) -> dict[int, RaftStatus]:
        return {i: self.member(i).status() for i in (self.live() if which is None else which)}

    async def leader(self, which: list[int] | None = None, timeout: float = WAIT) -> int:
        """Wait until one of ``which`` leads and all of them name it; return its index."""
        found: list[int] = []

        def agreed() -> bool:
            st = self.statuses(which)
            leaders = [i for i, s in st.items() if s.is_leader]
            if len(leaders) != 1:
                return False
            addr = self.addrs[leaders[0]]
            if any(s.leader != addr for s in st.values()):
                return False
            found[:] = leaders
            return True

        await wait_until(agreed, timeout, "a leader that all members agree on")
        return found[0]

    async def converged(self, which: list[int], count: int, timeout: float = WAIT) -> list[bytes]:
        """Wait until each of ``which`` applied ``count`` commands; return the common list."""
        await wait_until(
            lambda: all(len(self.recorders[i].snapshot()) >= count for i in which),
            timeout,
            f"{count} commands applied on members {which}",
        )
        lists = [self.recorders[i].snapshot() for i in which]
        assert all(lst == lists[0] for lst in lists), lists
        assert len(lists[0]) == count
        return lists[0]


async def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``pred`` every 10 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def group3(tmp_path: Path) -> Iterator[Group]:
    """A three-member group, not started; every member still running is closed after."""
    g = Group(tmp_path, 3)
    try:
        yield g
    finally:
        g.close_all()


@pytest.fixture
def group1(tmp_path: Path) -> Iterator[Group]:
    """A one-member group, not started; closed after the test."""
    g = Group(tmp_path, 1)
    try:
        yield g
    finally:
        g.close_all()


def cmds(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{k}".encode() for k in range(n)]


def test_follower_proposal_commits_on_all_in_same_order(group3: Group) -> None:
    """Commands from a follower, and concurrently from every member, commit in one order on all."""

    async def body() -> None:
        for i in range(3):
            group3.start(i)
        leader = await group3.leader()
        follower = next(i for i in range(3) if i != leader)
        results = [await group3.member(follower).propose(c) for c in cmds("seq", 5)]
        assert results == [1, 2, 3, 4, 5]  # the follower's own apply result, in order

        batch = [(i, c) for i in range(3) for c in cmds(f"par{i}", 10)]
        await asyncio.gather(*(group3.member(i).propose(c) for i, c in batch))
        applied = await group3.converged([0, 1, 2], 35)
        assert applied[:5] == cmds("seq", 5)
        assert sorted(applied[5:]) == sorted(c for _, c in batch)
        for i in range(3):  # each member's commands keep the order it proposed them in
            mine = [c for c in applied if c.startswith(f"par{i}-".encode())]
            assert mine == cmds(f"par{i}", 10)
        st = group3.statuses()
        assert all(s.last_applied == st[leader].last_applied for s in st.values())
        assert all(s.connected_peers == 2 and s.has_quorum for s in st.values())

    run(body())


def test_new_leader_after_leader_closes(group3: Group) -> None:
    """After the leader closes, the survivors elect a new leader within seconds and commit on."""

    async def body() -> None:
        for i in range(3):
            group3.start(i)
        old = await group3.leader()
        await group3.member(old).propose(b"before")
        await group3.converged([0, 1, 2], 1)
        old_term = group3.member(old).status().term

        group3.stop(old)
        survivors = group3.live()
        new = await group3.leader(survivors)
        assert new != old
        assert group3.member(new).status().term > old_term

        for i in survivors:
            await group3.member(i).propose(f"after-{i}".encode())
        applied = await group3.converged(survivors, 3)
        assert applied[0] == b"before"
        assert sorted(applied[1:]) == [f"after-{i}".encode() for i in survivors]

    run(body())


def test_restarted_member_replays_journal_and_catches_up(group3: Group) -> None:
    """A member restarted on its journal dir replays its log, then catches up to the same list."""

    async def body() -> None:
        for i in range(3):
            group3.start(i)
        leader = await group3.leader()
        down = next(i for i in range(3) if i != leader)
        for c in cmds("a", 5):
            await group3.member(leader).propose(c)
        await group3.converged([0, 1, 2], 5)

        group3.stop(down)
        for c in cmds("b", 5):
            await group3.member(leader).propose(c)
        group3.start(down)
        applied = await group3.converged([0, 1, 2], 10)
        assert applied == cmds("a", 5) + cmds("b", 5)

    run(body())


def test_whole_group_restart_replays_from_journals(group3: Group) -> None:
    """With every member restarted at once, each rebuilds the same list from its own journal."""

    async def body() -> None:
        for i in range(3):
            group3.start(i)
        leader = await group3.leader()
        for c in cmds("x", 8):
            await group3.member(leader).propose(c)
        await group3.converged([0, 1, 2], 8)

        group3.close_all()
        for i in range(3):
            group3.start(i)
        assert await group3.converged([0, 1, 2], 8) == cmds("x", 8)
        await group3.leader()
        await group3.member(0).propose(b"y")
        assert await group3.converged([0, 1, 2], 9) == [*cmds("x", 8), b"y"]

    run(body())


def test_restart_after_compaction_loads_snapshot(group3: Group) -> None:
    """A member that compacted its log restarts from its snapshot plus the journal tail."""

    async def body() -> None:
        for i in range(3):
            group3.start(i)
        leader = await group3.leader()
        member = next(i for i in range(3) if i != leader)
        for c in cmds("s", 6):
            await group3.member(leader).propose(c)
        await group3.converged([0, 1, 2], 6)

        snapshot = group3.root / f"m{member}" / SNAPSHOT_FILE
        group3.member(member).compact()
        await wait_until(snapshot.exists, WAIT, "the snapshot file")
        assert snapshot.read_bytes().startswith(SNAPSHOT_MAGIC)
        for c in cmds("t", 3):
            await group3.member(leader).propose(c)
        await group3.converged([0, 1, 2], 9)

        group3.stop(member)
        group3.start(member)
        applied = await group3.converged([0, 1, 2], 9)
        assert applied == cmds("s", 6) + cmds("t", 3)
        assert group3.recorders[member].loads == 1

    run(body())


def test_member_with_wrong_password_gets_nothing(group3: Group) -> None:
    """A member without the cluster key never connects or applies, and the others keep working."""

    async def body() -> None:
        group3.start(0)
        group3.start(1)
        intruder = group3.start(2, password=WRONG_KEY)
        await group3.leader([0, 1])
        for c in cmds("ok", 5):
            await group3.member(1).propose(c)
        await group3.converged([0, 1], 5)

        with pytest.raises(Unavailable):
            await intruder.propose(b"evil", timeout=1.0)
        await asyncio.sleep(0.3)  # give a stray entry time to arrive, were it possible
        assert group3.recorders[2].snapshot() == []
        st = intruder.status()
        assert (st.leader, st.connected_peers, st.last_applied) == (None, 0, 1)
        assert group3.recorders[0].snapshot() == cmds("ok", 5)  # "evil" never committed

    run(body())


def test_no_quorum_proposals_fail_within_timeout(group3: Group) -> None:
    """With two of three members closed, a proposal fails with Unavailable within its timeout."""

    async def body() -> None:
        for i in range(3):
            group3.start(i)
        leader = await group3.leader()
        await group3.member(leader).propose(b"one")
        await group3.converged([0, 1, 2], 1)

        for survivor in (leader, next(i for i in range(3) if i != leader)):
            group3.close_all()
            for i in range(3):
                group3.start(i)
            await group3.leader()
            for i in range(3):
                if i != survivor:
                    group3.stop(i)
            start = time.monotonic()
            with pytest.raises(Unavailable):
                await group3.member(survivor).propose(b"lonely", timeout=1.5)
            assert time.monotonic() - start < 3.0
            assert b"lonely" not in group3.recorders[survivor].snapshot()

    run(body())


def test_close_fails_pending_proposals(group3: Group) -> None:
    """Closing a member fails its pending proposals at once instead of at their timeout."""

    async def body() -> None:
        group3.start(0)
        member = group3.member(0)
        pending = asyncio.ensure_future(member.propose(b"waiting", timeout=20.0))
        await asyncio.sleep(0.2)
        assert not pending.done()
        start = time.monotonic()
        group3.stop(0)
        with pytest.raises(Unavailable, match="closed"):
            await pending
        assert time.monotonic() - start < 2.0
        with pytest.raises(Unavailable):
            await member.propose(b"after close")

    run(body())


def test_single_member_commits_and_replays(group1: Group) -> None:
    """A one-member group commits alone and replays its journal after a restart."""

    async def body() -> None:
        group1.start(0)
        await group1.leader()
        assert [await group1.member(0).propose(c) for c in cmds("solo", 4)] == [1, 2, 3, 4]
        group1.stop(0)
        group1.start(0)
        assert await group1.converged([0], 4) == cmds("solo", 4)

    run(body())


def test_apply_error_reaches_proposer(group1: Group) -> None:
    """An exception raised by apply is re-raised to the proposer; later commands still apply."""

    async def body() -> None:
        group1.start(0)
        await group1.leader()
        with pytest.raises(ValueError, match="boom"):
            await group1.member(0).propose(b"boom")
        assert await group1.member(0).propose(b"fine") == 1

    run(body())


def test_not_leader_is_unavailable() -> None:
    """NotLeader is a kind of Unavailable, so callers may catch either."""
    assert issubclass(NotLeader, Unavailable)


@pytest.mark.parametrize(
    ("peers", "password"),
    [
        pytest.param(["127.0.0.1:1"], KEY, id="two members"),
        pytest.param(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], KEY, id="four members"),
        pytest.param(["127.0.0.1:1", "localhost"], KEY, id="no port"),
        pytest.param([], "", id="no key"),
        pytest.param([], "not hex", id="key not hex"),
    ],
)
def test_bad_configuration_is_refused(tmp_path: Path, peers: list[str], password: str) -> None:
    """Group sizes other than 1, 3, 5, malformed addresses and keys are refused loudly."""
    rec = Recorder()
    with pytest.raises(LocalError):
        ReplicatedLog("127.0.0.1:9", peers, tmp_path, password, rec.apply, rec.dump, rec.load)


def test_corrupt_snapshot_is_refused(tmp_path: Path) -> None:
    """A member refuses to start on a snapshot it cannot read rather than lose commands."""
    (tmp_path / SNAPSHOT_FILE).write_bytes(SNAPSHOT_MAGIC + b"\x01garbage")
    rec = Recorder()
    (addr,) = free_addrs(1)
    with pytest.raises(LocalError, match="snapshot"):
        ReplicatedLog(addr, [addr], tmp_path, KEY, rec.apply, rec.dump, rec.load)


def test_port_in_use_is_refused(tmp_path: Path) -> None:
    """A member whose Raft port is taken fails at construction instead of running deaf."""
    rec = Recorder()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(LocalError, match="cannot listen"):
            ReplicatedLog(addr, [addr], tmp_path, KEY, rec.apply, rec.dump, rec.load)


def test_restarted_member_is_caught_up_only_once_it_has_everything(group3: Group) -> None:
    """A member restarted behind the group reports ``caught_up`` only once it has applied
    every command committed before it restarted, and then for good."""

    async def body() -> None:
        for i in range(3):
            group3.start(i)
        leader = await group3.leader()
        down = next(i for i in range(3) if i != leader)
        for c in cmds("a", 5):
            await group3.member(leader).propose(c)
        await group3.converged([0, 1, 2], 5)
        assert all(group3.member(i).caught_up for i in range(3))

        group3.stop(down)
        for c in cmds("b", 30):
            await group3.member(leader).propose(c)
        member = group3.start(down)
        assert not member.status().caught_up  # it knows no leader yet
        samples = 0
        deadline = time.monotonic() + WAIT
        while not member.caught_up:
            # the flag is read before the list: applied entries only ever grow
            assert time.monotonic() < deadline, "never caught up"
            samples += 1
            await asyncio.sleep(0.001)
        assert len(group3.recorders[down].snapshot()) >= 35
        assert member.status().caught_up
        await group3.member(leader).propose(b"c")
        await group3.converged([0, 1, 2], 36)
        assert member.caught_up
        assert samples > 0

    run(body())


class SyncedJournals:
    """Wraps ``os.fdatasync`` and ``os.fsync`` to record, per Raft journal, how far its
    records were durable at the last sync (the journal's own end-of-records offset, read
    from the file at that moment), and the content of the meta file last made durable."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offsets: dict[str, int] = {}
        self.metas: dict[str, bytes] = {}
        self._lock = threading.Lock()
        real_fdatasync, real_fsync = os.fdatasync, os.fsync

        def record(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if path.endswith(JOURNAL_FILE):
                (end,) = struct.unpack("<I", os.pread(fd, 4, LAST_RECORD_OFFSET_OFFSET))
                with self._lock:
                    self.offsets[path] = end
            elif path.endswith(".meta.tmp"):
                content = Path(path).read_bytes()  # opened write-only: read it by name
                with self._lock:
                    self.metas[path.removesuffix(".tmp")] = content

        def fdatasync(fd: int) -> None:
            real_fdatasync(fd)
            record(fd)

        def fsync(fd: int) -> None:
            real_fsync(fd)
            record(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "fsync", fsync)

    def holds(self, journal: Path, command: bytes) -> bool:
        """Whether ``command`` is within the durable part of ``journal``."""
        with self._lock:
            end = self.offsets.get(str(journal), 0)
        with open(journal, "rb") as f:
            return command in f.read(end)

    def lose_power(self, journal: Path) -> None:
        """Put ``journal`` and its meta file back to what their last syncs made durable:
        every record after the durable end is zeroed, the meta file restored."""
        with self._lock:
            end = self.offsets.get(str(journal), 0)
            meta = self.metas.get(str(journal) + ".meta")
        data = bytearray(journal.read_bytes())
        if end:
            data[end:] = bytes(len(data) - end)
            data[LAST_RECORD_OFFSET_OFFSET : LAST_RECORD_OFFSET_OFFSET + 4] = struct.pack("<I", end)
        if end:
            journal.write_bytes(bytes(data))
        else:  # never synced: not even its creation survives
            journal.unlink()
        meta_path = Path(str(journal) + ".meta")
        if meta is None:
            meta_path.unlink(missing_ok=True)
        else:
            meta_path.write_bytes(meta)


def _checking_apply(
    group: Group, i: int, synced: SyncedJournals, majority: int, problems: list[str]
) -> None:
    """Make member ``i``'s Recorder check, on every apply, that a majority of the
    members hold the command durably in their journals, this member among them."""
    rec = group.recorders[i]
    plain = rec.apply

    def apply(command: bytes) -> int:
        journals = [group.root / f"m{k}" / JOURNAL_FILE for k in range(len(group.addrs))]
        durable = [k for k, j in enumerate(journals) if j.exists() and synced.holds(j, command)]
        if i not in durable or len(durable) < majority:
            problems.append(f"m{i} applied {command!r} durable only on {durable}")
        return plain(command)

    rec.apply = apply  # type: ignore[method-assign]


def start_checked(
    group: Group, i: int, synced: SyncedJournals, majority: int, problems: list[str]
) -> ReplicatedLog:
    """Start member ``i`` with a Recorder whose apply checks durability first."""
    assert group.members[i] is None
    rec = group.recorders[i] = Recorder()
    _checking_apply(group, i, synced, majority, problems)
    member = ReplicatedLog(
        self_addr=group.addrs[i],
        peers=group.addrs,
        journal_dir=group.root / f"m{i}",
        password=KEY,
        apply=rec.apply,
        dump=rec.dump,
        load=rec.load,
    )
    group.members[i] = member
    return member


@pytest.mark.parametrize("size", [1, 3])
def test_an_entry_is_durable_on_a_majority_before_it_is_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Every member applies a command only once it is fdatasynced in its own journal and
    in the journals of a majority (so no member acknowledged an entry not on its disk)."""
    synced = SyncedJournals(monkeypatch)
    group = Group(tmp_path, size)
    problems: list[str] = []

    async def body() -> None:
        for i in range(size):
            start_checked(group, i, synced, size // 2 + 1, problems)
        leader = await group.leader()
        for c in cmds("d", 10):
            await group.member(leader).propose(c)
        await asyncio.gather(
            *(group.member(i).propose(c) for i in range(size) for c in cmds(f"p{i}", 5))
        )
        await group.converged(list(range(size)), 10 + 5 * size)

    try:
        run(body())
    finally:
        group.close_all()
    assert problems == []


def test_committed_commands_survive_losing_power_on_every_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every command whose proposal returned is still there after every member loses what
    it had not synced (journal records after the last fdatasync, an unsynced meta file)."""
    synced = SyncedJournals(monkeypatch)
    group = Group(tmp_path, 3)

    async def first() -> list[bytes]:
        for i in range(3):
            group.start(i)
        leader = await group.leader()
        done = []
        for c in cmds("w", 20):
            await group.member(leader).propose(c)
            done.append(c)
        return done

    async def after(count: int) -> list[bytes]:
        for i in range(3):
            group.start(i)
        await group.leader()
        await group.member(0).propose(b"after")
        return await group.converged([0, 1, 2], count + 1)

    try:
        done = run(first())
        group.close_all()
        for i in range(3):
            synced.lose_power(tmp_path / f"m{i}" / JOURNAL_FILE)
        applied = run(after(len(done)))
    finally:
        group.close_all()
    assert applied == [*done, b"after"]

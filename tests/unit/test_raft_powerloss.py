"""The test-only manager power cut (lamina.mgmt.powerloss) and the switch that turns it on.

In process: what :class:`RaftPowerCut` keeps as the disk's image of a journal, and that
putting it back loses exactly what was not synced.  In a child process: a real member cut
between two ticks exits with status 99, and a member restarted on its journal holds every
command whose proposal returned.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lamina import daemon
from lamina.config import ConfigError
from lamina.mgmt.powerloss import RaftPowerCut
from lamina.mgmt.raft import JOURNAL_FILE, ReplicatedLog
from tests.unit.test_raft import KEY, WAIT, Recorder, free_addrs, run, wait_until


def test_a_journal_is_put_back_as_its_last_sync_left_it(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    journal.write_bytes(b"A" * 100)
    cut = RaftPowerCut()
    cut.journal_opened(str(journal))
    with journal.open("r+b") as f:
        f.write(b"B" * 150)
        f.flush()
        cut.journal_synced(str(journal), f.fileno())
        f.write(b"C" * 500)  # after the sync: lost
        f.seek(10)
        f.write(b"D")  # over synced bytes, not synced: lost too
    assert cut.restore() == 1
    assert journal.read_bytes() == b"B" * 150
    assert cut.restore() == 0  # nothing left that was not synced


def test_a_journal_never_synced_is_back_to_what_it_held_when_opened(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    journal.write_bytes(b"old")
    cut = RaftPowerCut()
    cut.journal_opened(str(journal))
    journal.write_bytes(b"new, never synced")
    cut.restore()
    assert journal.read_bytes() == b"old"


def test_a_journal_created_and_never_synced_is_gone(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    cut = RaftPowerCut()
    cut.journal_opened(str(journal))
    journal.write_bytes(b"created by this process")
    assert cut.restore() == 1
    assert not journal.exists()


def test_no_cut_before_it_is_requested(tmp_path: Path) -> None:
    cut = RaftPowerCut()
    cut.between_ticks()  # returns: nothing asked
    assert not cut.requested
    cut.request()
    assert cut.requested


def test_a_member_tells_its_observer_of_every_sync(tmp_path: Path) -> None:
    """The image a member's observer keeps holds every committed command (each was synced
    before it was counted), and only a sync updates it."""
    cut = RaftPowerCut()
    rec = Recorder()
    journal = tmp_path / "m" / JOURNAL_FILE

    async def body() -> None:
        (addr,) = free_addrs(1)
        member = ReplicatedLog(
            addr, [addr], tmp_path / "m", KEY, rec.apply, rec.dump, rec.load, observer=cut
        )
        try:
            for k in range(20):
                await member.propose(f"c{k}".encode())
            await wait_until(lambda: len(rec.snapshot()) == 20, WAIT, "20 commands applied")
            image = cut.images()[str(journal)]
            assert image is not None
            assert all(f"c{k}".encode() in image for k in range(20))
        finally:
            member.close()

    run(body())


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from lamina.mgmt.powerloss import RaftPowerCut
    from lamina.mgmt.raft import ReplicatedLog

    async def main() -> None:
        addr, where, key = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
        cut = RaftPowerCut()
        log = ReplicatedLog(addr, [addr], where, key, lambda c: None, lambda: b"",
                            lambda d: None, observer=cut)
        done = 0
        for k in range(100):
            await log.propose(b"acked-%d" % k)
            print(k, flush=True)
            done += 1
        # a stream of proposals nobody waits for, and the cut in the middle of it
        pending = [asyncio.ensure_future(log.propose(b"late-%d" % k)) for k in range(2000)]
        cut.request()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.sleep(30)  # the cut ends the process first
        sys.exit(3)

    asyncio.run(main())
    """
)


def test_a_member_cut_between_two_ticks_exits_99_and_keeps_every_acknowledged_command(
    tmp_path: Path,
) -> None:
    (addr,) = free_addrs(1)
    where = tmp_path / "m"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, addr, str(where), KEY],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert child.returncode == daemon.POWERCUT_EXIT, child.stderr[-2000:]
    acked = [int(line) for line in child.stdout.split()]
    assert acked == list(range(100))
    assert "power cut" in child.stderr

    rec = Recorder()

    async def again() -> list[bytes]:
        (addr2,) = free_addrs(1)
        member = ReplicatedLog(addr2, [addr2], where, KEY, rec.apply, rec.dump, rec.load)
        try:
            await member.propose(b"after")
            await wait_until(lambda: b"after" in rec.snapshot(), WAIT, "the new command applied")
            return rec.snapshot()
        finally:
            member.close()

    applied = run(again())
    assert applied[:100] == [b"acked-%d" % k for k in range(100)]
    assert applied[-1] == b"after"
    late = applied[100:-1]
    assert late == [b"late-%d" % k for k in range(len(late))]  # a prefix, in order


@pytest.mark.parametrize("value", ["0", "yes", "true", " 1"])
def test_the_power_cut_switch_refuses_every_value_but_1(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(daemon.POWERCUT_ENV, value)
    with pytest.raises(ConfigError, match="only 1"):
        daemon.powercut_enabled("the disk")


def test_the_power_cut_switch_is_off_unless_set_to_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(daemon.POWERCUT_ENV, raising=False)
    assert not daemon.powercut_enabled("the disk")
    monkeypatch.setenv(daemon.POWERCUT_ENV, "")
    assert not daemon.powercut_enabled("the disk")
    monkeypatch.setenv(daemon.POWERCUT_ENV, "1")
    assert daemon.powercut_enabled("the disk")

"""Fault injection under a verified writer.

fio writes random blocks through `lamina nbd` to a 2-replica striped volume, each block
stamped with a crc32c, and reads the whole region back; meanwhile one fault is injected:
a storage server killed and restarted, a storage server paused past its lease, the
manager leader killed, a storage server cut off from the managers, bytes rotting on one
copy.  After each: fio saw no I/O error and every block read back as written (DESIGN
section 10, invariants 1 and 2); once the cluster is quiet, `lamina volume scrub` finds
every copy of every page identical (invariant 3), and a second fio pass (`--verify_only`)
reads everything back again.

One more test cuts what the client sends to a storage server, under a writer that
overwrites the same blocks (tests/integration/rewriter.py), which fio's write-once
verification could not judge: no acknowledged overwrite may be lost to a write that was
redone after its connection was given up.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lamina.errors import LaminaError, NoLease, StaleEpoch, Unavailable
from lamina.wire import messages as m
from lamina.wire.connection import Client
from tests.integration.netns import CLIENT, SERVER, netns_cluster
from tests.integration.test_driver import storage_client, volume_info
from tests.integration.test_resync import copies_of, scrub, server_state, status, wait_state
from tests.integration.volumes import (
    Exporter,
    LocalCluster,
    MiB,
    finished,
    fio_result,
    local_cluster,
    start_fio,
)

pytestmark = pytest.mark.integration

VOLUME = 64 * MiB
#: fio writes REGION at 3 MiB/s: about 16 s of writing, so every fault lands mid-run
REGION = 48 * MiB
WRITER = (f"--size={REGION // MiB}M", "--rate=3m")
QUIET = 60.0  # seconds the cluster may take to have every server `up` again
BLOCK = 4096


def wait_quiet(lc: LocalCluster, timeout: float = QUIET) -> None:
    """Wait (bounded) until every storage server is `up` and the map is published."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(lc)
        states = {s["id"]: s["state"] for s in st["servers"]}
        if set(states.values()) == {"up"} and st["published_epoch"] == st["epoch"]:
            return
        assert time.monotonic() < deadline, f"not quiet after {timeout}s: {states}"
        time.sleep(0.2)


def running(job: subprocess.Popen[bytes], what: str) -> None:
    """Fail unless fio is still writing (the fault must land mid-run)."""
    assert job.poll() is None, f"fio ended before {what}: {job.communicate()}"


def writing(
    lc: LocalCluster, cwd: Path, stripe: int = 2, before: float = 2.0
) -> tuple[dict[str, Any], Exporter, subprocess.Popen[bytes]]:
    """Volume v (2 copies, ``stripe`` partitions) exported by `lamina nbd`, fio writing to
    it for ``before`` seconds: the volume, the exporter and the running fio."""
    info = lc.create_volume("v", VOLUME, replicas=2, stripe=stripe)
    exporter = lc.export("v")
    job = start_fio(exporter.uri, cwd, *WRITER, prefix=lc.prefix)
    time.sleep(before)
    running(job, "the fault")
    return info, exporter, job


def finish_writer(job: subprocess.Popen[bytes]) -> dict[str, Any]:
    """fio finished with no error, wrote the whole region and verified all of it."""
    result = fio_result(job)
    assert result["write"]["io_bytes"] == REGION, result["write"]
    assert result["read"]["io_bytes"] == REGION, result["read"]  # the verify pass
    return result


def check_quiet(lc: LocalCluster, exporter: Exporter, cwd: Path) -> None:
    """Once quiet, scrub finds no two copies that differ; fio reads it all back again; the
    exporter saw no crash and stops cleanly."""
    wait_quiet(lc)
    report = scrub(lc, "v")
    assert (report["mismatches"], report["corrupt"], report["errors"]) == (0, 0, 0), report
    again = fio_result(start_fio(exporter.uri, cwd, *WRITER, "--verify_only", prefix=lc.prefix))
    assert again["read"]["io_bytes"] == REGION, again["read"]
    log = exporter.log_text()
    assert "Traceback" not in log, log
    assert exporter.stop() == 0, exporter.log_text()


def check_after(
    lc: LocalCluster, exporter: Exporter, job: subprocess.Popen[bytes], cwd: Path
) -> None:
    """What every scenario ends with: :func:`finish_writer`, then :func:`check_quiet`."""
    finish_writer(job)
    check_quiet(lc, exporter, cwd)


def missed(lc: LocalCluster) -> None:
    """The writer went on without the failed server: the worker had pages to copy to it."""
    resync = status(lc)["resync"]
    assert resync["pages_resynced"] > 0, resync
    assert resync["bytes_copied"] > 0, resync


def test_a_storage_server_killed_and_restarted_under_the_writer(tmp_path: Path) -> None:
    """(a) kill -9 of s1 (first in every partition, the copy the worker trusts first),
    then `lamina up` restarts it: it comes back `recovering` while fio goes on writing,
    the worker resyncs what it missed, and it is `up` again."""
    with local_cluster(tmp_path / "cluster", 1, 2) as lc:
        _, exporter, job = writing(lc, tmp_path)
        os.kill(lc.storage_pid("s1"), signal.SIGKILL)
        wait_state(lc, "s1", "down", timeout=20)
        assert lc.up(1, 2)["started"] == ["s1"]
        assert server_state(lc, "s1") in ("recovering", "up")
        running(job, "s1 came back")  # the writer goes on while s1 is resynchronised
        check_after(lc, exporter, job, tmp_path)
        missed(lc)


async def serving_epoch(lc: LocalCluster, client: Client, info: dict[str, Any]) -> int:
    """An epoch at which the server on ``client`` serves the volume now (the published
    epoch, or the newer fence it names), found by READs of the volume's last page."""
    layer = info["layers"][-1]["id"]
    epoch = int(status(lc)["published_epoch"])
    for _ in range(50):
        try:
            await client.call(
                m.ReadRequest(info["id"], epoch, layer, info["size"] // MiB - 1, MiB, 0, BLOCK)
            )
            return epoch
        except StaleEpoch as exc:
            epoch = exc.current_epoch
        except Unavailable:  # catching up to the epoch we named
            await asyncio.sleep(0.1)
    raise AssertionError("the server served no READ at any epoch")


async def _io_refused(lc: LocalCluster, info: dict[str, Any], pid: int, pause: float) -> list[str]:
    """Pause s2 (SIGSTOP) for ``pause`` seconds, longer than its lease; a READ and a WRITE
    at the epoch it served before are queued on a connection made before the pause, and
    the same again right after SIGCONT.  What each was answered."""
    layer = info["layers"][-1]["id"]
    page = info["size"] // MiB - 1  # beyond the region fio writes
    client = await storage_client(lc, "s2")
    try:
        epoch = await serving_epoch(lc, client, info)

        def requests() -> list[asyncio.Future[Any]]:
            read = m.ReadRequest(info["id"], epoch, layer, page, MiB, 0, BLOCK)
            write = m.WriteRequest(info["id"], epoch, layer, page, MiB, 0, m.FULL_MASK,
                                   m.FULL_MASK, False)  # fmt: skip
            return [
                asyncio.ensure_future(client.call(read)),
                asyncio.ensure_future(client.call(write, b"\xee" * BLOCK)),
            ]

        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(pause)
            state = server_state(lc, "s2")
            assert state == "down", f"s2 paused {pause}s past its lease is still {state}"
            queued = requests()
            await asyncio.sleep(0.2)  # on the wire, waiting in s2's socket
        finally:
            os.kill(pid, signal.SIGCONT)
        after = requests()
        answers = []
        for fut in [*queued, *after]:
            try:
                async with asyncio.timeout(10):
                    reply = await fut
                answers.append(f"served: {reply}")
            except (NoLease, StaleEpoch) as exc:
                answers.append(type(exc).__name__)
            except LaminaError as exc:
                answers.append(f"{type(exc).__name__}: {exc}")
        return answers
    finally:
        client.close()


def test_a_storage_server_paused_past_its_lease(tmp_path: Path) -> None:
    """(b) SIGSTOP of s2 for 8 s (lease 3 s): the writer goes on without it once the map
    marks it down.  Requests at the epoch it served before, waiting in its socket when it
    resumes and sent right after, are refused (NO_LEASE or STALE), never served; it comes
    back `recovering`, is resynchronised and `up` again."""
    with local_cluster(tmp_path / "cluster", 1, 2) as lc:
        info, exporter, job = writing(lc, tmp_path, stripe=4)
        answers = asyncio.run(_io_refused(lc, info, lc.storage_pid("s2"), 8.0))
        assert all(a in ("NoLease", "StaleEpoch") for a in answers), answers
        running(job, "s2 resumed")
        check_after(lc, exporter, job, tmp_path)
        missed(lc)
        # the refused WRITE left nothing behind
        page = VOLUME // MiB - 1
        assert asyncio.run(copies_of(lc, volume_info(lc, "v"), page)) == [bytes(MiB)] * 2


def test_the_manager_leader_killed_under_the_writer(tmp_path: Path) -> None:
    """(c) kill -9 of the manager leader of three: the others elect a new leader, the
    writer goes on (it may pause while leases move to the new leader), and changes go
    through the new leader afterwards."""
    with local_cluster(tmp_path / "cluster", 3, 2) as lc:
        _, exporter, job = writing(lc, tmp_path)
        old = status(lc)["leader"]["id"]
        os.kill(int((lc.root / "run" / f"{old}.pid").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        while (leader := (status(lc)["leader"] or {}).get("id")) in (None, old):
            assert time.monotonic() - killed < 20, f"no new leader: {status(lc)}"
            time.sleep(0.2)
        created = lc.create_volume("later", 8 * MiB, replicas=2, stripe=2)
        assert created["name"] == "later"
        running(job, "the new leader took over")
        check_after(lc, exporter, job, tmp_path)
        st = status(lc)
        assert st["leader"]["id"] == leader
        assert {v["name"] for v in st["volumes"]} == {"v", "later"}


def rot_written_blocks(lc: LocalCluster, layer: int, pages: int, count: int) -> dict[int, bytes]:
    """Flip one byte in each of ``count`` 4 KiB blocks, in distinct pages, of s1's copy:
    blocks fio has already written (equal and not zero on both copies; fio writes each
    block once).  {file offset of the block: its bytes before}."""
    files = [lc.root / sid / "layers" / f"{layer}.data" for sid in ("s1", "s2")]
    rotted: dict[int, bytes] = {}
    with files[0].open("r+b") as s1, files[1].open("rb") as s2:
        for page in range(pages):
            for block in range(0, MiB, 37 * BLOCK):  # a few blocks of every page
                at = page * MiB + block
                s1.seek(at)
                s2.seek(at)
                mine, other = s1.read(BLOCK), s2.read(BLOCK)
                if mine == other and len(mine) == BLOCK and any(mine):
                    s1.seek(at + 1000)
                    s1.write(bytes([mine[1000] ^ 0x5A]))
                    s1.flush()
                    rotted[at] = mine
                    break
            if len(rotted) == count:
                break
    assert len(rotted) == count, f"only {len(rotted)} written blocks to rot"
    return rotted


async def read_blocks(lc: LocalCluster, info: dict[str, Any], sid: str, at: list[int]) -> list[str]:
    """READ the 4 KiB block at each volume offset in ``at`` straight from server ``sid``;
    what each was answered."""
    layer = info["layers"][-1]["id"]
    client = await storage_client(lc, sid)
    try:
        epoch = await serving_epoch(lc, client, info)
        answers = []
        for off in at:
            req = m.ReadRequest(info["id"], epoch, layer, off // MiB, MiB, off % MiB, BLOCK)
            try:
                reply = await client.call(req)
                answers.append(f"served: {reply}")
            except LaminaError as exc:
                answers.append(type(exc).__name__)
        return answers
    finally:
        client.close()


def test_bytes_rotting_on_one_copy_under_the_writer(tmp_path: Path) -> None:
    """(e) While fio writes, one byte of four blocks it already wrote rots on s1's disk.
    Every read stays right (the driver reads around a CORRUPT copy and repairs it); a
    scrub repairs whatever no read came across, and then finds every copy identical,
    with s1's blocks as they were written."""
    with local_cluster(tmp_path / "cluster", 1, 2) as lc:
        info, exporter, job = writing(lc, tmp_path, before=4.0)
        layer = info["layers"][-1]["id"]
        rotted = rot_written_blocks(lc, layer, REGION // MiB, 4)
        # s1 finds the rot when it reads those blocks: CORRUPT, and the pages quarantined
        # while fio still writes to them (a write to a quarantined copy is CORRUPT too,
        # and the driver resynchronises the page from the good copy)
        assert asyncio.run(read_blocks(lc, info, "s1", list(rotted))) == ["Corrupt"] * 4
        running(job, "the rot was found")
        finish_writer(job)
        first = scrub(lc, "v")  # what the verify pass did not repair, this scrub does
        assert first["mismatches"] == first["repaired"] == first["corrupt"] <= 4, first
        assert first["errors"] == 0, first
        check_quiet(lc, exporter, tmp_path)
        path = lc.root / "s1" / "layers" / f"{layer}.data"
        with path.open("rb") as f:
            for at, before in rotted.items():
                f.seek(at)
                assert f.read(BLOCK) == before, f"block at {at} of s1 not repaired"


def test_a_storage_server_cut_off_from_the_managers(tmp_path: Path) -> None:
    """(d) s2 in its own network namespace loses its path to the manager (both ways) but
    not to the client.  Its lease lapses, so it refuses the exporter's I/O (NO_LEASE)
    though the exporter still reaches it; the manager marks it down and the writer goes
    on without it.  Healed, s2 gets a lease again, comes back `recovering`, is
    resynchronised and `up`."""
    with netns_cluster(tmp_path / "cluster") as lc:
        _, exporter, job = writing(lc, tmp_path)
        lc.nets.cut()
        try:
            lapsed = lc.wait_lease(SERVER, False, timeout=10)  # s2 itself says so
            assert lapsed < 5, f"s2 served {lapsed:.1f}s past its 3 s lease"
            wait_state(lc, "s2", "down", timeout=15)
            running(job, "s2 was marked down")
            time.sleep(2.0)  # the writer goes on without s2
        finally:
            lc.nets.heal()
        wait_state(lc, "s2", "recovering", timeout=15)
        running(job, "s2 came back")
        check_after(lc, exporter, job, tmp_path)
        missed(lc)
        # the exporter reached s2 during the cut and was refused, not cut off
        assert "s2 failed a request: NO_LEASE" in exporter.log.read_text(), exporter.log_text()


def rewriter(lc: LocalCluster, *args: str) -> subprocess.Popen[bytes]:
    """tests/integration/rewriter.py with ``args``, in the cluster's namespace."""
    script = Path(__file__).with_name("rewriter.py")
    return subprocess.Popen(
        [*lc.prefix, sys.executable, str(script), args[0], str(lc.cluster_file), "v", *args[1:]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def rewriter_report(proc: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, Any]:
    """The JSON report of a finished rewriter (which must exit 0)."""
    out, err = finished(proc, "the rewriter", timeout)
    assert proc.returncode == 0, err.decode()[-3000:]
    report: dict[str, Any] = json.loads(out)
    return report


def test_a_storage_server_cut_off_from_the_client(tmp_path: Path) -> None:
    """(d') What the client sends to s2 stops arriving (one way: s2 keeps its path to the
    manager, and so its lease, and its answers still reach the client) while a writer
    overwrites the same blocks round after round.  The writes wait: s2 answers the
    manager's PING, so it is not marked down, and the driver gives up its connection to
    s2 with unacknowledged writes in it.  Healed, the writes are redone on a new
    connection at the same epoch and the writer goes on, then moves to other blocks of
    the same pages; the kernel still retransmits the old connection's writes, which reach
    s2 about 12.6 s after the cut, unless the driver reset the abandoned connection
    (it does: SO_LINGER 0, so nothing queued on it is ever delivered).  No block may read
    back older than its last
    acknowledged write, neither then nor once the cluster is quiet."""
    with netns_cluster(tmp_path / "cluster") as lc:
        lc.create_volume("v", VOLUME, replicas=2, stripe=2)
        state, switch, stop = tmp_path / "acked.json", tmp_path / "switch", tmp_path / "stop"
        writer = rewriter(lc, "write", str(state), str(switch), str(stop), "2")
        time.sleep(3.0)
        assert writer.poll() is None, writer.communicate()
        lc.nets.cut(CLIENT, one_way=True)
        try:
            # the driver gives up the connection after 5-6 s; its kernel retransmits the
            # writes in it about 0.2, 0.6, 1.4, 3.0, 6.2 (all lost) and 12.6 s after the cut
            time.sleep(7.0)
            assert server_state(lc, "s2") == "up"  # it holds its lease all along
        finally:
            lc.nets.heal(CLIENT, one_way=True)
        time.sleep(2.5)  # a new connection, the writes redone, a few more rounds
        switch.touch()  # from now on only the side blocks are written
        time.sleep(6.0)  # the old connection's writes land meanwhile
        stop.touch()
        report = rewriter_report(writer)
        assert report["errors"] == [], report
        assert report["rounds"] > 5, report
        assert report["wrong"] == [], report
        wait_quiet(lc)
        first = scrub(lc, "v")
        again = rewriter_report(rewriter(lc, "check", str(state)))
        assert again["wrong"] == [], (again, first)
        assert (first["mismatches"], first["corrupt"], first["errors"]) == (0, 0, 0), first

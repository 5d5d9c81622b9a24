"""Storage servers that lose power, as real processes (docs/ondisk.md, "Crash model").

The cluster's storage servers run with the test-only ``LAMINA_TEST_POWERCUT=1``: their
files sit on the disk that can lose power (lamina.storage.powerloss) and SIGUSR2 cuts
the power (what was not synced is dropped, a seeded part of it kept).  qemu-io writes
4 KiB-aligned patterns through `lamina nbd` and flushes; a model knows, per 4 KiB block,
what the last completed FLUSH covered and every pattern written since.  After a power cut
and a restart: every block reads back as the model allows (flushed bytes exactly; old or
new bytes for blocks written since), nothing reads CORRUPT, no read hangs, every server is
`up` again within a bound, and once quiet a scrub finds no two copies that differ.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

import pytest

from lamina.storage.powerloss import seed_keeping
from tests.integration.test_faults import wait_quiet
from tests.integration.test_resync import scrub, status, wait_state
from tests.integration.volumes import Exporter, LocalCluster, MiB, local_cluster

pytestmark = pytest.mark.integration

VOLUME = 16 * MiB
BLOCK = 4096
BLOCKS = VOLUME // BLOCK
QUIET = 90.0  # seconds every server may take to be `up` again after a restart
STREAM = 10000  # 4 KiB writes qemu-io streams; a power cut lands after the first 5 %


@dataclass
class Model:
    """Per 4 KiB block: the pattern as of the last completed FLUSH, and those written since."""

    now: bytearray = field(default_factory=lambda: bytearray(BLOCKS))
    flushed: bytearray = field(default_factory=lambda: bytearray(BLOCKS))
    since: list[set[int]] = field(default_factory=lambda: [set() for _ in range(BLOCKS)])

    def wrote(self, offset: int, length: int, pattern: int) -> None:
        for b in range(offset // BLOCK, (offset + length) // BLOCK):
            self.now[b] = pattern
            self.since[b].add(pattern)

    def flush(self) -> None:
        self.flushed[:] = self.now
        for s in self.since:
            s.clear()

    def check(self, image: bytes) -> list[str]:
        """What in ``image`` (the whole volume as read back) the crash model forbids."""
        bad: list[str] = []
        for b in range(BLOCKS):
            blk = image[b * BLOCK : (b + 1) * BLOCK]
            value = blk[0]
            allowed = {self.flushed[b], *self.since[b]}
            if blk != bytes([value]) * BLOCK or value not in allowed:
                bad.append(f"block {b}: {blk[:8].hex()}.. allowed {sorted(allowed)}")
        return bad


def qemu_io(
    exporter: Exporter, writes: list[tuple[int, int, int]], flush: bool, out: Path
) -> Popen[bytes]:
    """qemu-io over the export: the writes, then (if ``flush``) a FLUSH; without it the
    cache mode is ``unsafe``, so qemu-io sends no FLUSH at all, not even at exit.  Its
    output goes to the file ``out`` (a pipe nobody reads would stall it)."""
    cmds = [arg for off, n, pat in writes for arg in ("-c", f"write -P {pat} {off} {n}")]
    if flush:
        cmds += ["-c", "flush"]
    mode = "writeback" if flush else "unsafe"
    with out.open("wb") as f:
        return subprocess.Popen[bytes](
            ["qemu-io", "-f", "raw", "-t", mode, *cmds, exporter.uri],
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip


def all_written(
    proc: Popen[bytes], writes: list[tuple[int, int, int]], out_file: Path, timeout: float = 180
) -> None:
    """qemu-io finished, and every write of it was acknowledged."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"qemu-io did not finish in {timeout}s") from None
    out = out_file.read_text(errors="replace")
    assert proc.returncode == 0, out[-2000:]
    assert "failed" not in out, out[-2000:]
    assert out.count("wrote ") == len(writes), out[-2000:]


def batch(rng: random.Random, model: Model, count: int, length: int) -> list[tuple[int, int, int]]:
    """``count`` writes of ``length`` bytes at random 4 KiB-aligned offsets, new patterns."""
    writes = []
    for _ in range(count):
        off = rng.randrange((VOLUME - length) // BLOCK) * BLOCK
        writes.append((off, length, rng.randrange(1, 256)))
    return writes


def run_writes(
    exporter: Exporter, model: Model, writes: list[tuple[int, int, int]], flush: bool
) -> None:
    """The writes (and a FLUSH), to completion."""
    out = exporter.log.with_suffix(".qemu-io")
    all_written(qemu_io(exporter, writes, flush, out), writes, out)
    for off, n, pat in writes:
        model.wrote(off, n, pat)
    if flush:
        model.flush()


def start_stream(
    exporter: Exporter, model: Model, writes: list[tuple[int, int, int]]
) -> Popen[bytes]:
    """The writes, unflushed, in the background: a power cut lands among them.  The model
    counts every one as written since the last FLUSH (acknowledged or not)."""
    for off, n, pat in writes:
        model.wrote(off, n, pat)
    out = exporter.log.with_suffix(".stream")
    proc = qemu_io(exporter, writes, False, out)
    deadline = time.monotonic() + 60
    while out.read_text(errors="replace").count("wrote ") < STREAM // 20:
        assert proc.poll() is None, f"qemu-io ended: {out.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "qemu-io does not write"
        time.sleep(0.02)
    assert proc.poll() is None, "the writes ended before the power cut"
    return proc


def read_volume(exporter: Exporter, dest: Path) -> bytes:
    """The whole volume through the export (nbdcopy); a read that hangs fails the test."""
    dest.unlink(missing_ok=True)
    done = subprocess.run(
        ["nbdcopy", exporter.uri, str(dest)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.stderr[-2000:], exporter.log_text())
    return dest.read_bytes()


def power_cut(lc: LocalCluster, sids: list[str]) -> None:
    """SIGUSR2 to each server at once; each exits with the power-cut status."""
    pids = {sid: lc.storage_pid(sid) for sid in sids}
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    for sid, pid in pids.items():
        while _running(pid):
            assert time.monotonic() < deadline, f"{sid} did not exit on its power cut"
            time.sleep(0.05)
        log = (lc.root / "log" / f"{sid}.log").read_text(errors="replace")
        assert "TEST ONLY: power cut" in log, log[-2000:]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def check_image(lc: LocalCluster, model: Model, root: Path, what: str) -> None:
    """The whole volume, read through a read-only export, is what the model allows."""
    exporter = lc.export("v", "--read-only", "--io-timeout", "60")
    bad = model.check(read_volume(exporter, root / "image.raw"))
    assert not bad, f"{what}: {len(bad)} blocks read wrong, e.g. {bad[:5]}"
    exporter.stop()


def test_power_cuts_of_one_and_then_every_storage_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power cut of one server, then of both at once, under qemu-io writing and flushing:
    every block reads as the crash model allows, the servers come back `up`, and a scrub
    finds the copies equal."""
    monkeypatch.setenv("LAMINA_TEST_POWERCUT", "1")
    # every cut keeps some of the unsynced blocks and drops the others
    monkeypatch.setenv("LAMINA_TEST_POWERCUT_SEED", str(seed_keeping(0.2, 0.6)))
    rng = random.Random(7)
    model = Model()
    with local_cluster(tmp_path / "cluster", 1, 2) as lc:
        logs = lc.root / "log"
        lc.create_volume("v", VOLUME, replicas=2, stripe=2)
        exporter = lc.export("v")
        # flushed data over every page, then a pause: restores reach the disks
        run_writes(exporter, model, batch(rng, model, 32, 256 * 1024), flush=True)
        time.sleep(6)
        # one server loses power among 4 KiB writes; they go on with the other copy, and
        # are flushed
        writes = batch(rng, model, STREAM, BLOCK)
        stream = start_stream(exporter, model, writes)
        power_cut(lc, ["s1"])
        wait_state(lc, "s1", "down", timeout=30)
        all_written(stream, writes, exporter.log.with_suffix(".stream"))
        run_writes(exporter, model, batch(rng, model, 16, BLOCK), flush=True)
        assert lc.up(1, 2)["started"] == ["s1"]
        wait_quiet(lc, QUIET)
        check_image(lc, model, tmp_path, "after s1's power cut")
        # flushed, then 4 KiB writes into flushed pages; every server loses power at once
        run_writes(exporter, model, batch(rng, model, 16, 64 * 1024), flush=True)
        stream = start_stream(exporter, model, batch(rng, model, STREAM, BLOCK))
        power_cut(lc, ["s1", "s2"])
        stream.kill()
        stream.wait()
        exporter.kill()
        assert sorted(lc.up(1, 2)["started"]) == ["s1", "s2"]
        wait_quiet(lc, QUIET)
        check_image(lc, model, tmp_path, "after every server's power cut")
        report = scrub(lc, "v")
        assert (report["mismatches"], report["corrupt"], report["errors"]) == (0, 0, 0), report
        for sid in ("s1", "s2"):
            text = (logs / f"{sid}.log").read_text(errors="replace")
            assert "quarantining" not in text, text[-3000:]
        assert {s["id"]: s["state"] for s in status(lc)["servers"]} == {"s1": "up", "s2": "up"}


def test_a_failed_fdatasync_fail_stops_its_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(issue 11, point 6) The disk of s1 starts failing every fdatasync with EIO: s1
    refuses all I/O, the leader marks it down and `lamina status` says why, the writes and
    flushes go on with the other copy, everything flushed reads back; restarted, s1 is
    resynchronised and a scrub finds the copies equal."""
    monkeypatch.setenv("LAMINA_TEST_POWERCUT", "1")
    rng = random.Random(8)
    model = Model()
    with local_cluster(tmp_path / "cluster", 1, 2) as lc:
        lc.create_volume("v", VOLUME, replicas=2, stripe=2)
        exporter = lc.export("v")
        run_writes(exporter, model, batch(rng, model, 16, 256 * 1024), flush=True)
        pid = lc.storage_pid("s1")
        os.kill(pid, signal.SIGUSR1)  # from now on every sync of s1's disk fails
        started = time.monotonic()
        run_writes(exporter, model, batch(rng, model, 32, BLOCK), flush=True)
        run_writes(exporter, model, batch(rng, model, 8, 64 * 1024), flush=True)
        assert time.monotonic() - started < 60
        wait_state(lc, "s1", "down", timeout=30)
        assert _running(pid)  # stopped serving, still there to say why
        st = status(lc)
        assert any("s1 is down" in p and "fdatasync" in p for p in st["problems"]), st["problems"]
        (s1,) = [s for s in st["servers"] if s["id"] == "s1"]
        assert "fdatasync" in s1["failure"], s1
        text = lc.cli("status")
        assert "fdatasync" in text.stdout.replace("\n", ""), text.stdout
        check_image(lc, model, tmp_path, "with s1 failed")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _running(pid):
            assert time.monotonic() < deadline, "s1 did not die"
            time.sleep(0.05)
        assert lc.up(1, 2)["started"] == ["s1"]
        wait_quiet(lc, QUIET)
        check_image(lc, model, tmp_path, "after s1's restart")
        report = scrub(lc, "v")
        assert (report["mismatches"], report["corrupt"], report["errors"]) == (0, 0, 0), report
        exporter.stop()

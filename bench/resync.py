"""Resync benchmark: what the background worker copies after an outage, and what it costs
the clients.

The script starts a local cluster (``lamina up``: one manager, two storage servers) in a
fresh temporary directory, creates one volume with 2 replicas and fills it with 1 MiB
sequential writes through the driver.  Then, twice:

1. storage server s2 is killed (SIGKILL) and, over ``--outage-seconds``, the driver writes
   ``--outage-bytes`` of new data as whole 1 MiB pages at distinct random page offsets;
2. s2 is restarted with ``lamina up`` and ``lamina status`` (the manager leader's worker
   progress) is followed until s2 is ``up`` again: how long that takes and how many bytes
   the worker copied, which should be about what was written during the outage.

The first outage runs with no client I/O during the resync.  Before the second, fio
(``ioengine=nbd``, 4 KiB random reads at queue depth 16) runs against ``lamina nbd`` of the
volume on the quiet cluster; during the second, the same job starts right after the
restart, and its IOPS while s2 is ``recovering`` are compared with the quiet run's.
See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lamina.client import Cluster as Driver
from lamina.client.layout import volume_view
from lamina.clusterctl import (
    ManagerClient,
    cluster_status,
    format_size,
    load_cluster_file,
    parse_size,
)
from lamina.config import ManagerConfig
from lamina.errors import LaminaError, StaleEpoch
from lamina.storage.syncmask import FULL
from lamina.wire import messages as m
from lamina.wire.connection import Client
from lamina.wire.handshake import load_key
from nbd import (
    BenchError,
    Cluster,
    Job,
    Target,
    _check_tools,
    _indent,
    _pids,
    _version,
    fio_argv,
    lamina_cmd,
)
from storage import (
    _background_load,
    _filesystem,
    _fmt,
    _progress,
    _table,
    cluster_options,
    host_info,
    load_lines,
    scratch_dir,
)

KIB = 1024
MIB = 1024 * KIB
PAGE = MIB
VOLUME = "resync-bench"
#: the storage server taken down (``lamina up`` names them s1, s2, ...)
VICTIM = "s2"
#: seconds between two looks at ``lamina status`` while waiting for a state
POLL = 0.1
#: writes in flight while filling the volume
FILL_DEPTH = 8
#: fio's IOPS log: one averaged sample per this many milliseconds
LOG_MSEC = 100
#: seconds fio may run past its runtime before it counts as hung and is killed
FIO_GRACE = 180.0
#: lines of a log shown when something fails
LOG_TAIL = 40
#: copied/written within this distance of 1 counts as "the worker copied what was written"
COPY_TOLERANCE = 0.1
#: a resync window shorter than this gives an IOPS figure from very few fio samples
SHORT_WINDOW = 2.0
#: a time of at least this many seconds in which no fio I/O completed counts as a stall
STALL = 0.3


def _default_resync_rate() -> int:
    """The worker's copy limit (bytes/s) of a manager that ``lamina up`` starts: the
    config's default, since it passes no config."""
    for f in fields(ManagerConfig):
        if f.name == "resync_rate" and isinstance(f.default, int):
            return f.default
    raise RuntimeError("ManagerConfig has no resync_rate default")


#: the worker's copy limit of a manager started by `lamina up`
RESYNC_RATE = _default_resync_rate()


@dataclass
class Check:
    """Copies of pages read straight from their storage servers and compared."""

    pages: int = 0  # pages checked (every copy of each)
    copies: int = 0  # copies checked
    wrong: list[str] = field(default_factory=list)  # what was wrong, per page and copy


@dataclass
class Outage:
    """One outage of s2 and the resync after it.  Times are seconds."""

    label: str
    pages: int  # pages written during the outage (distinct, whole pages)
    written: int  # bytes
    outage_seconds: float = 0.0  # from the kill to the restart
    write_seconds: float = 0.0  # from the kill to the last write's completion (flush included)
    longest_write: float = 0.0  # the longest single write (the pause until s2 is down)
    copied_before: int = 0  # the worker's bytes_copied just before the restart
    copied: int | None = None  # bytes the worker copied from the restart until s2 was up
    pages_resynced: int | None = None  # pages the worker resynchronised in that time
    conflicts: int | None = None  # the worker's conflicts in that time
    errors: int | None = None  # the worker's errors in that time
    rounds: int | None = None  # worker rounds in that time
    restart_seconds: float | None = None  # how long `lamina up` took
    recovering_after: float | None = None  # from the restart to the first status: recovering
    up_after: float | None = None  # from the restart until the status showed s2 up
    recovering_seconds: float | None = None  # s2 recovering: first seen until up seen
    copy_rate: float | None = None  # copied / recovering_seconds (bytes/s)
    worker_copy_rate: float | None = None  # highest copy_rate of the worker's rounds
    #: every change seen while waiting: seconds since the restart, s2's state, worker progress
    timeline: list[dict[str, Any]] = field(default_factory=list)
    restarted: float = 0.0  # wall clock (time.time()) of the restart
    #: wall-clock bounds of the recovering period, for fio's log
    window: tuple[float, float] | None = None
    page_list: list[int] = field(default_factory=list)  # the pages written, in order
    seed: int = 0  # of the pages chosen and the data written
    #: after s2 was up: every copy of every page written, read back and compared
    check: Check | None = None


@dataclass
class FioRun:
    """One fio run against the NBD export: the whole run, and the resync window of it."""

    label: str
    iops: float | None = None  # fio's own figure for the whole run (reads + writes)
    p50_ms: float | None = None
    p99_ms: float | None = None
    seconds: float | None = None  # fio's runtime
    start: float | None = None  # wall clock (time.time()) of the first I/O: end - runtime
    end: float | None = None  # wall clock of the end of the job (fio's timestamp_ms)
    window_iops: float | None = None  # during the recovering period (from the IOPS log)
    window_seconds: float | None = None  # the part of that period fio ran through
    after_iops: float | None = None  # after s2 was up again, same run (from the IOPS log)
    longest_stall: float | None = None  # longest time in which no I/O completed, s
    #: every such time of at least STALL seconds: [start, seconds]; start relative to the
    #: restart for the run during the resync, to fio's start for the quiet run
    stalls: list[tuple[float, float]] = field(default_factory=list)
    error: str | None = None
    fio: dict[str, Any] | None = None  # fio's JSON result of the job


# --- the cluster -------------------------------------------------------------------------------


class ResyncCluster(Cluster):
    """The local cluster, with the status and the restart this benchmark needs."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._managers: ManagerClient | None = None

    def status(self) -> dict[str, Any]:
        """What ``lamina status --json`` prints (asked in process: polling stays cheap)."""
        if self._managers is None:
            self._managers = ManagerClient(load_cluster_file(self.file), timeout=5.0)
        return cluster_status(self._managers)

    def map(self) -> dict[str, Any]:
        """The published map (``GET /api/v1/map``), as clients get it."""
        self.status()  # makes the manager client
        assert self._managers is not None
        doc: dict[str, Any] = self._managers.get("/map")
        return doc

    def state(self, sid: str) -> tuple[str | None, dict[str, Any] | None]:
        """``sid``'s state and the worker's progress; (None, None) if no manager answered."""
        try:
            st = self.status()
        except LaminaError:
            return None, None
        states = {s["id"]: s["state"] for s in st["servers"]}
        return states.get(sid), st.get("resync")

    def pid(self, sid: str) -> int:
        return int((self.root / "run" / f"{sid}.pid").read_text())

    def kill(self, sid: str) -> None:
        os.kill(self.pid(sid), signal.SIGKILL)

    def restart(self) -> subprocess.Popen[str]:
        """``lamina up`` again, in the background: it restarts whatever is not running."""
        self.started = True
        return subprocess.Popen(
            lamina_cmd("up", "--dir", str(self.root), "--managers", "1", "--servers", "2"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def log_tail(self, daemon: str, lines: int = LOG_TAIL) -> str:
        path = self.root / "log" / f"{daemon}.log"
        try:
            text = path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"    (no log {path}: {exc})"
        return "\n".join(f"    {line}" for line in text[-lines:]) or "    (empty log)"

    def wait_state(self, sid: str, want: str, timeout: float, what: str) -> float:
        """Poll until ``sid`` is ``want``; the seconds it took.  BenchError after timeout."""
        start = time.monotonic()
        state: str | None = None
        resync: dict[str, Any] | None = None
        while time.monotonic() - start < timeout:
            state, resync = self.state(sid)
            if state == want:
                return time.monotonic() - start
            time.sleep(POLL)
        raise BenchError(
            f"{sid} was not {want} {timeout:.0f} s after {what} (state {state}, "
            f"worker {json.dumps(resync)})\n  last lines of {self.root / 'log' / 'm1.log'}:\n"
            + self.log_tail("m1")
        )


# --- the driver side -------------------------------------------------------------------------


def _payloads(seed: int, n: int = 8) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(PAGE) for _ in range(n)]


def filled(size: int, seed: int) -> dict[int, bytes]:
    """What :func:`fill` writes: page -> data."""
    payloads = _payloads(seed)
    return {p: payloads[p % len(payloads)] for p in range(size // PAGE)}


def outage_data(outage: Outage) -> dict[int, bytes]:
    """What :func:`outage_writes` wrote: page -> data."""
    payloads = _payloads(outage.seed + 1)
    return {p: payloads[i % len(payloads)] for i, p in enumerate(outage.page_list)}


async def fill(cluster_file: Path, size: int, seed: int) -> float:
    """Write every page of the volume once (1 MiB sequential writes), flush; the MB/s."""
    payloads = _payloads(seed)
    pages = size // PAGE
    async with await Driver.connect(cluster_file) as c:
        vol = await c.open(VOLUME)
        start = time.monotonic()
        for first in range(0, pages, FILL_DEPTH):
            await asyncio.gather(
                *(
                    vol.write(p * PAGE, payloads[p % len(payloads)])
                    for p in range(first, min(first + FILL_DEPTH, pages))
                )
            )
        await vol.flush()
        seconds = time.monotonic() - start
        await vol.close()
    return size / seconds / 1e6


async def outage_writes(
    cluster_file: Path, outage: Outage, size: int, seconds: float, killed: float
) -> None:
    """Write ``outage.pages`` distinct random pages, evenly spread over ``seconds`` after
    ``killed`` (a time.monotonic()); writes held up by the outage catch up afterwards."""
    outage.page_list = random.Random(outage.seed).sample(range(size // PAGE), outage.pages)
    async with await Driver.connect(cluster_file) as c:
        vol = await c.open(VOLUME)
        for i, (page, data) in enumerate(outage_data(outage).items()):
            delay = killed + i * seconds / outage.pages - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.monotonic()
            await vol.write(page * PAGE, data)
            outage.longest_write = max(outage.longest_write, time.monotonic() - t0)
        await vol.flush()
        outage.write_seconds = time.monotonic() - killed
        await vol.close()


#: pages read back at once by the check
CHECK_DEPTH = 8


async def _check_copies(
    cluster: ResyncCluster, doc: dict[str, Any], expected: dict[int, bytes | None], check: Check
) -> None:
    view = volume_view(doc, VOLUME)
    layer = view.top
    key = load_key(cluster.root / "cluster.key")
    clients: dict[str, Client] = {}

    async def one(page: int, sid: str, want: bytes | None, first: bytes | None) -> bytes:
        client = clients[sid]
        status = await client.call(m.StatusRequest(view.id, view.epoch, layer.id, (page,)))
        assert isinstance(status, m.StatusResponse)
        _, state, mask, gen, _ = status.entries[0]
        _, data = await client.call_with_payload(
            m.ReadRequest(view.id, view.epoch, layer.id, page, PAGE, 0, PAGE)
        )
        data = bytes(data)
        problems = []
        if want is not None and data != want:
            problems.append("does not hold the data written last")
        if want is None and first is not None and data != first:
            problems.append("differs from the page's first copy")
        if mask != FULL:
            problems.append(f"is dirty (mask {mask:#010x})")
        if problems:
            check.wrong.append(
                f"page {page} on {sid} (state {state}, generation {gen}) " + " and ".join(problems)
            )
        check.copies += 1
        return data

    async def page_copies(page: int) -> None:
        part = layer.partition(page)
        first = await one(page, part[0], expected[page], None)
        await asyncio.gather(*(one(page, sid, expected[page], first) for sid in part[1:]))
        check.pages += 1

    try:
        for sid in view.servers_of(layer):
            server = view.servers[sid]
            clients[sid] = await Client.connect(
                server.host, server.port, key, peer=f"lamina-bench/{os.getpid()}"
            )
        pages = sorted(expected)
        for i in range(0, len(pages), CHECK_DEPTH):
            await asyncio.gather(*(page_copies(p) for p in pages[i : i + CHECK_DEPTH]))
    finally:
        for client in clients.values():
            client.close()


def check_copies(cluster: ResyncCluster, expected: dict[int, bytes | None], what: str) -> Check:
    """Read every copy of the pages in ``expected`` straight from its storage server
    (STATUS and READ, no driver): each must be clean (full sync mask) and hold the
    expected data (``None``: the same data as the page's other copies).  With the
    published map; again on STALE (a map change not yet published when it was fetched)."""
    for attempt in range(10):
        check = Check()
        try:
            asyncio.run(_check_copies(cluster, cluster.map(), expected, check))
            break
        except StaleEpoch:
            if attempt == 9:
                raise BenchError(f"reading back {what}: STALE ten times in a row") from None
            time.sleep(0.5)
        except LaminaError as exc:
            raise BenchError(f"reading back {what} failed: {exc}") from exc
    if check.wrong:
        _progress(f"  read back {what}: {len(check.wrong)} of {check.copies} copies are wrong:")
        for line in check.wrong[:LOG_TAIL]:
            _progress(f"    {line}")
    else:
        _progress(f"  read back {what}: all {check.copies} copies are right")
    return check


# --- one outage and its resync ---------------------------------------------------------------


def take_down(args: argparse.Namespace, cluster: ResyncCluster, outage: Outage) -> None:
    """Kill s2, write the outage's pages, wait out the outage; s2 is ``down`` after it."""
    _progress(
        f"{outage.label}: kill -9 {VICTIM} (pid {cluster.pid(VICTIM)}), then "
        f"{format_size(outage.written)} in {outage.pages} random pages over "
        f"{args.outage_seconds:g} s"
    )
    killed = time.monotonic()
    cluster.kill(VICTIM)
    asyncio.run(outage_writes(cluster.file, outage, args.size, args.outage_seconds, killed))
    _progress(
        f"  written in {outage.write_seconds:.1f} s (flush included); longest write "
        f"{outage.longest_write:.1f} s (the driver waits until {VICTIM} is marked down)"
    )
    cluster.wait_state(VICTIM, "down", args.timeout, "the kill")
    rest = killed + args.outage_seconds - time.monotonic()
    if rest > 0:
        time.sleep(rest)
    outage.outage_seconds = time.monotonic() - killed


def bring_back(
    args: argparse.Namespace,
    cluster: ResyncCluster,
    outage: Outage,
    during: Callable[[], None] | None = None,
) -> None:
    """Restart s2 and follow the status until it is ``up``: time, bytes copied, rate.

    ``during`` is called right after the restart command started (it starts fio)."""
    state, resync = cluster.state(VICTIM)
    if resync is None:
        raise BenchError(f"no worker progress in the status before the restart ({state})")
    outage.copied_before = resync["bytes_copied"]
    before = resync
    _progress(
        f"  restarting {VICTIM} (`lamina up`); the worker has copied "
        f"{format_size(outage.copied_before)} so far"
    )
    wall0, t0 = time.time(), time.monotonic()
    outage.restarted = wall0
    proc = cluster.restart()
    last_down = t0
    recovering: float | None = None
    up: float | None = None
    seen: tuple[Any, ...] | None = None
    rate = 0.0
    finished = False
    try:
        if during is not None:
            during()
        while up is None:
            now = time.monotonic()
            if now - t0 > args.timeout:
                break
            if proc.poll() is not None and outage.restart_seconds is None:
                outage.restart_seconds = now - t0
                if proc.returncode:
                    out = proc.stdout.read() if proc.stdout else ""
                    raise BenchError(f"`lamina up` failed ({proc.returncode}):\n{_indent(out)}")
            state, resync = cluster.state(VICTIM)
            now = time.monotonic()
            if resync is not None:
                key = (state, resync["rounds"], resync["bytes_copied"])
                if key != seen:
                    seen = key
                    outage.timeline.append({"t": round(now - t0, 3), "state": state, **resync})
                if state == "recovering":
                    rate = max(rate, float(resync["copy_rate"]))
            if state == "down" or state is None:
                last_down = now
            elif state == "recovering" and recovering is None:
                recovering = now
            elif state == "up":
                up = now
                rate = max(rate, float(resync["copy_rate"])) if resync else rate
                break
            time.sleep(POLL)
        finished = True
    finally:
        if proc.poll() is None:
            try:  # on the way out after a failure or Ctrl-C: stop it at once
                proc.wait(max(1.0, args.timeout - (time.monotonic() - t0)) if finished else 0.1)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if outage.restart_seconds is None:
            outage.restart_seconds = time.monotonic() - t0
    if up is None or resync is None:
        raise BenchError(
            f"{VICTIM} did not become up within {args.timeout:.0f} s of the restart (state "
            f"{state}, worker {json.dumps(resync)})\n  last lines of "
            f"{cluster.root / 'log' / 'm1.log'}:\n{cluster.log_tail('m1')}"
        )
    start = recovering if recovering is not None else last_down
    outage.recovering_after = None if recovering is None else recovering - t0
    outage.up_after = up - t0
    outage.recovering_seconds = up - start
    outage.window = (wall0 + (start - t0), wall0 + (up - t0))
    outage.copied = resync["bytes_copied"] - outage.copied_before
    outage.pages_resynced = resync["pages_resynced"] - before["pages_resynced"]
    outage.conflicts = resync["conflicts"] - before["conflicts"]
    outage.errors = resync["errors"] - before["errors"]
    outage.rounds = resync["rounds"] - before["rounds"]
    if outage.recovering_seconds > 0:
        outage.copy_rate = outage.copied / outage.recovering_seconds
    outage.worker_copy_rate = rate or None
    _progress(
        f"  {VICTIM} up {outage.up_after:.1f} s after the restart "
        f"(`lamina up` took {outage.restart_seconds:.1f} s, recovering for "
        f"{outage.recovering_seconds:.1f} s); the worker copied {format_size(outage.copied)} "
        f"in {outage.pages_resynced} pages ({outage.copied / outage.written:.2f} x written)"
    )


def wait_quiet(cluster: ResyncCluster, timeout: float) -> None:
    """Until every server is up and two worker rounds in a row found no dirty page."""
    deadline = time.monotonic() + timeout
    clean_rounds, last_round = 0, -1
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            st = cluster.status()
        except LaminaError:
            time.sleep(POLL)
            continue
        resync = st.get("resync")
        if all(s["state"] == "up" for s in st["servers"]) and resync:
            if resync["rounds"] != last_round:
                last_round = resync["rounds"]
                clean_rounds = clean_rounds + 1 if resync["pages_found"] == 0 else 0
            if clean_rounds >= 2:
                return
        time.sleep(POLL)
    _progress(
        f"WARNING: the cluster was not quiet after {timeout:.0f} s "
        f"(servers {st.get('servers')}, worker {st.get('resync')}); going on"
    )


# --- fio ---------------------------------------------------------------------------------------


class Export:
    """``lamina nbd`` of the volume (a fresh exporter per fio run)."""

    def __init__(self, cluster: Cluster, root: Path, n: int) -> None:
        (root / "run").mkdir(exist_ok=True)
        port_file = root / "run" / f"nbd-{n}.port"
        argv = lamina_cmd(
            "nbd", VOLUME, "--listen", "127.0.0.1:0", "--port-file", str(port_file),
            "--cluster", str(cluster.file),
        )  # fmt: skip
        self.target = Target("lamina-r2", argv, root / "log" / f"nbd-{n}.log", port_file=port_file)


class Fio:
    """One time-based fio job with an IOPS log in wall-clock time, run in the background."""

    def __init__(self, args: argparse.Namespace, uri: str, scratch: Path, tag: str) -> None:
        job = Job(
            f"{args.fio_rw}-4k-qd{args.iodepth}",
            "",
            args.fio_rw,
            4 * KIB,
            args.iodepth,
        )
        self.output = scratch / f"fio-{tag}.json"
        self.log_prefix = scratch / f"fio-{tag}"
        for old in (self.output, *scratch.glob(f"fio-{tag}_iops*.log")):
            old.unlink(missing_ok=True)
        self.argv = [
            *fio_argv(job, uri, args.size, args.fio_seconds, self.output),
            f"--write_iops_log={self.log_prefix}",
            f"--log_avg_msec={LOG_MSEC}",
            "--log_unix_epoch=1",
        ]
        if args.fio_rw == "randrw":
            self.argv.append("--rwmixread=70")
        self.timeout = args.fio_seconds + FIO_GRACE
        self.proc: subprocess.Popen[str] | None = None
        self.started = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def finish(self, run: FioRun) -> None:
        """Wait for fio and fill ``run`` with its whole-run numbers."""
        assert self.proc is not None
        left = max(1.0, self.timeout - (time.monotonic() - self.started))
        try:
            stdout, stderr = self.proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            self.stop()
            run.error = f"fio did not finish within {self.timeout:.0f} s (killed): hung"
            return
        try:
            text = self.output.read_text()
            # the nbd engine's "fio: connected to NBD server" may precede the JSON document
            doc = json.loads(text[text.find("{") :])
            result: dict[str, Any] = doc["jobs"][0]
            end_ms = float(doc["timestamp_ms"])
        except (OSError, ValueError, LookupError):
            result, end_ms = {}, 0.0
        run.fio = result or None
        if self.proc.returncode or not result or result.get("error"):
            run.error = (
                f"fio exited with {self.proc.returncode}, job error {result.get('error')}"
                f"\n  fio stderr:\n{_indent(stderr)}\n  fio stdout:\n{_indent(stdout)}"
            )
            return
        read, write = result["read"], result["write"]
        run.iops = float(read["iops"]) + float(write["iops"])
        run.seconds = max(read["runtime"], write["runtime"]) / 1e3
        run.end = end_ms / 1e3
        run.start = run.end - run.seconds
        side = read if read["total_ios"] else write
        pct = side["lat_ns"].get("percentile", {})
        for key, value in pct.items():
            if float(key) == 50:
                run.p50_ms = float(value) / 1e6
            elif float(key) == 99:
                run.p99_ms = float(value) / 1e6

    def samples(self) -> list[tuple[float, float]]:
        """(wall-clock end of the interval in s, IOPS over the LOG_MSEC before it), reads
        and writes added up.  fio writes no line for an interval in which no I/O
        completed, so a gap between two lines is a stall."""
        by_time: dict[int, float] = {}
        for path in sorted(self.log_prefix.parent.glob(f"{self.log_prefix.name}_iops*.log")):
            for line in path.read_text().splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) >= 2:
                    t_ms = int(parts[0])
                    by_time[t_ms] = by_time.get(t_ms, 0.0) + float(parts[1])
        return sorted((t / 1e3, v) for t, v in by_time.items())


def window_iops(
    samples: list[tuple[float, float]], run: FioRun, start: float, end: float
) -> tuple[float | None, float]:
    """Average IOPS over the part of [start, end] (wall clock) that fio ran through, from
    its log (intervals without a line count as no I/O); and the length of that part."""
    assert run.start is not None
    assert run.end is not None
    lo, hi = max(start, run.start), min(end, run.end)
    if hi <= lo:
        return None, 0.0
    ops = 0.0
    width = LOG_MSEC / 1e3
    for t, iops in samples:
        a, b = max(t - width, lo), min(t, hi)
        if b > a:
            ops += iops * (b - a)
    return ops / (hi - lo), hi - lo


def stalls(
    samples: list[tuple[float, float]], run: FioRun, origin: float
) -> list[tuple[float, float]]:
    """The times of at least STALL seconds in which no I/O of the run completed, as
    (start relative to ``origin``, seconds)."""
    assert run.start is not None
    assert run.end is not None
    width = LOG_MSEC / 1e3
    out = []
    prev = run.start
    for t in [*(t for t, _ in samples), run.end + width]:
        gap = t - width - prev
        if gap >= STALL:
            out.append((round(prev - origin, 3), round(gap, 3)))
        prev = max(prev, t)
    return out


def _analyse(fio: Fio, run: FioRun, origin: float) -> list[tuple[float, float]]:
    """Fill the run's stalls from the log; the log's samples."""
    samples = fio.samples()
    run.stalls = stalls(samples, run, origin)
    run.longest_stall = max((g for _, g in run.stalls), default=0.0)
    return samples


def quiet_run(args: argparse.Namespace, cluster: ResyncCluster, root: Path) -> FioRun:
    run = FioRun("quiet")
    export = Export(cluster, root, 1)
    try:
        export.target.start()
        _progress(
            f"fio {args.fio_rw} 4 KiB qd {args.iodepth}, {args.fio_seconds:g} s, on the quiet "
            f"cluster ({export.target.uri}, exporter pid {export.target.pid})"
        )
        fio = Fio(args, export.target.uri, root, "quiet")
        fio.start()
        try:
            fio.finish(run)
        finally:
            fio.stop()
    finally:
        _stop_export(export)
    if run.error:
        raise BenchError(f"the quiet fio run failed: {run.error}\n{export.target.log_tail()}")
    assert run.start is not None
    _analyse(fio, run, run.start)
    _progress(f"  {run.iops:,.0f} IOPS; longest stall {_fmt(run.longest_stall, '.2f', ' s')}")
    return run


def resync_run(
    args: argparse.Namespace, cluster: ResyncCluster, root: Path, outage: Outage
) -> FioRun:
    """The second outage with fio: the exporter starts during the outage (the driver that
    wrote has closed the volume), fio right after the restart command."""
    run = FioRun("during resync")
    export = Export(cluster, root, 2)
    try:
        export.target.start()
        fio = Fio(args, export.target.uri, root, "resync")
        _progress(
            f"  exporter pid {export.target.pid} at {export.target.uri}; fio starts right "
            "after the restart"
        )
        try:
            bring_back(args, cluster, outage, during=fio.start)
            _progress(f"  waiting for fio to end ({args.fio_seconds:g} s run)")
            fio.finish(run)
        finally:
            fio.stop()
        if run.error:
            raise BenchError(
                f"the fio run during the resync failed: {run.error}\n{export.target.log_tail()}"
            )
        assert outage.window is not None
        assert run.end is not None
        samples = _analyse(fio, run, outage.restarted)
        run.window_iops, run.window_seconds = window_iops(samples, run, *outage.window)
        run.after_iops, _ = window_iops(samples, run, outage.window[1], run.end)
    finally:
        _stop_export(export)
    _progress(
        f"  {_fmt(run.window_iops, ',.0f')} IOPS while {VICTIM} was recovering "
        f"({_fmt(run.window_seconds, '.1f')} s of fio's run), "
        f"{_fmt(run.after_iops, ',.0f')} after; {run.iops:,.0f} over the whole run"
    )
    for start, gap in run.stalls:
        _progress(f"  no I/O completed for {gap:.2f} s from {start:.2f} s after the restart")
    return run


def _stop_export(export: Export) -> None:
    rc = export.target.stop()
    if rc not in (0, None, -signal.SIGTERM):
        _progress(f"lamina nbd exited with {rc}; see {export.target.log}")


# --- orchestration -------------------------------------------------------------------------------


def bench(
    args: argparse.Namespace, cluster: ResyncCluster, root: Path, doc: dict[str, Any]
) -> tuple[list[Outage], FioRun | None, FioRun | None, Check]:
    pages = args.outage_bytes // PAGE
    _progress(f"filling {format_size(args.size)} with 1 MiB sequential writes (driver)")
    doc["fill_mb_s"] = asyncio.run(fill(cluster.file, args.size, args.seed))
    #: page -> the data written last (None: unknown, fio wrote to the volume)
    expected: dict[int, bytes | None] = {}
    expected.update(filled(args.size, args.seed))
    _progress(f"  {doc['fill_mb_s']:,.1f} MB/s; waiting until the worker finds nothing dirty")
    wait_quiet(cluster, args.timeout)
    outages: list[Outage] = []
    doc["outages"] = outages
    quiet = during = None

    first = Outage("outage 1 (no client I/O)", pages, args.outage_bytes, seed=args.seed + 10)
    outages.append(first)
    take_down(args, cluster, first)
    bring_back(args, cluster, first)
    written = outage_data(first)
    first.check = check_copies(cluster, dict(written), "the pages written")
    expected.update(written)
    if not args.skip_fio:
        wait_quiet(cluster, args.timeout)
        quiet = doc["fio_quiet"] = quiet_run(args, cluster, root)
        wait_quiet(cluster, args.timeout)
        second = Outage(
            "outage 2 (fio during the resync)", pages, args.outage_bytes, seed=args.seed + 20
        )
        outages.append(second)
        take_down(args, cluster, second)
        during = doc["fio_resync"] = resync_run(args, cluster, root, second)
        written = outage_data(second)
        if args.fio_rw == "randread":
            second.check = check_copies(cluster, dict(written), "the pages written")
            expected.update(written)
        else:  # fio wrote too: only whether the copies agree can be checked
            expected = dict.fromkeys(expected)
    _progress("waiting until the worker finds nothing dirty, then reading back every page")
    wait_quiet(cluster, args.timeout)
    volume = doc["volume_check"] = check_copies(cluster, expected, "the whole volume")
    return outages, quiet, during, volume


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:,.1f} MiB/s"


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def report(
    args: argparse.Namespace,
    outages: list[Outage],
    quiet: FioRun | None,
    during: FioRun | None,
    volume: Check,
) -> tuple[str, bool]:
    """The table, the notes under it, and whether the worker copied what was written."""
    header = ["", *(o.label for o in outages)]

    def row(name: str, cell: Callable[[Outage], str]) -> list[str]:
        return [name, *(cell(o) for o in outages)]

    def fio_row(name: str, value: str) -> list[str]:
        return [name, *("-" if i == 0 else value for i in range(len(outages)))]

    q = quiet.iops if quiet else None
    w = during.window_iops if during else None
    stall = (
        f"{_fmt(quiet.longest_stall, '.2f')} s / {_fmt(during.longest_stall, '.2f')} s"
        if quiet and during
        else "-"
    )
    rows = [
        row("volume size", lambda o: format_size(args.size)),
        row("written during the outage", lambda o: f"{format_size(o.written)} ({o.pages} pages)"),
        row(
            "bytes copied by the worker",
            lambda o: (
                "-" if o.copied is None else f"{format_size(o.copied)} ({o.pages_resynced} pages)"
            ),
        ),
        row("copied / written", lambda o: _fmt(_div(o.copied, o.written), ".2f")),
        row("copied / volume", lambda o: _fmt(_div(o.copied, args.size), ".3f")),
        row("time to up (from the restart)", lambda o: _secs(o.up_after)),
        row("  of which recovering", lambda o: _secs(o.recovering_seconds)),
        row("copy rate (copied / time recovering)", lambda o: _rate(o.copy_rate)),
        row("copy rate (worker, best round)", lambda o: _rate(o.worker_copy_rate)),
        row("copies read back after up", _verdict),
    ]
    fio_rows = [
        fio_row("client IOPS, quiet cluster", _fmt(q, ",.0f")),
        fio_row(f"client IOPS while {VICTIM} recovering", _fmt(w, ",.0f")),
        fio_row("  recovering / quiet", _fmt(_div(w, q), ".2f")),
        fio_row(
            f"client IOPS after {VICTIM} up, same run",
            _fmt(during.after_iops if during else None, ",.0f"),
        ),
        fio_row(
            "client IOPS, whole run from the restart",
            _fmt(during.iops if during else None, ",.0f"),
        ),
        fio_row("  whole run / quiet", _fmt(_div(during.iops if during else None, q), ".2f")),
        fio_row("longest client stall, quiet / resync", stall),
    ]
    if during is not None:
        rows += fio_rows
    lines = [_table(header, rows), ""]
    ok = True
    for o in outages:
        r = _div(o.copied, o.written)
        if r is None or abs(r - 1) > COPY_TOLERANCE:
            ok = False
            lines.append(
                f"NOTE: {o.label}: the worker copied {_fmt(r, '.2f')} x what was written "
                f"during the outage (expected about 1)"
            )
        if o.check is not None and o.check.wrong:
            ok = False
            lines.append(
                f"NOTE: {o.label}: {len(o.check.wrong)} copies of pages written during the "
                "outage are wrong after the resync (listed above and in the JSON)"
            )
        if o.conflicts or o.errors:
            lines.append(
                f"NOTE: {o.label}: the worker counted {o.conflicts} conflicts and {o.errors} "
                "errors (an error is a failed call: see the manager's log)"
            )
    if during is not None and during.window_seconds is not None:
        if during.window_seconds < SHORT_WINDOW:
            lines.append(
                f"NOTE: the resync lasted only {during.window_seconds:.1f} s of fio's run; the "
                "IOPS during it come from few samples (a larger --outage-bytes lasts longer)"
            )
        up = outages[-1].up_after
        if up is not None and during.seconds is not None and up > during.seconds:
            lines.append("NOTE: the resync outlasted the fio run (a longer --fio-seconds helps)")
    if volume.wrong:
        ok = False
        lines.append(
            f"NOTE: at the end, {len(volume.wrong)} of the volume's {volume.copies} page copies "
            "are wrong (listed above and in the JSON)"
        )
    if ok:
        checked = [o.label.split(" (")[0] for o in outages if o.check is not None]
        lines.append(
            f"the worker copied what was written during each outage (within "
            f"{COPY_TOLERANCE:.0%}), not the volume; the copies read back right after "
            f"{' and '.join(checked)}, and all {volume.copies} copies of the volume's pages "
            "at the end"
        )
    return "\n".join(lines), ok


def _verdict(o: Outage) -> str:
    if o.check is None:
        return "-"
    if o.check.wrong:
        return f"{len(o.check.wrong)} of {o.check.copies} WRONG"
    return f"all {o.check.copies} right"


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Measure incremental resynchronisation after an outage of a storage "
        "server, and what it costs client I/O."
    )
    p.add_argument("--size", default="1G", help="volume size (K/M/G suffix) [1G]")
    p.add_argument(
        "--outage-bytes", default="64M", help="data written during each outage (whole MiB) [64M]"
    )
    p.add_argument("--outage-seconds", type=float, default=20.0, help="length of each outage [20]")
    p.add_argument("--fio-seconds", type=float, default=30.0, help="duration of each fio run [30]")
    p.add_argument(
        "--fio-rw",
        choices=("randread", "randrw"),
        default="randread",
        help="fio job: 4 KiB random reads, or 70/30 reads and writes [randread]",
    )
    p.add_argument("--iodepth", type=int, default=16, help="fio queue depth [16]")
    p.add_argument("--stripe", type=int, default=4, help="stripe of the volume [4]")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="longest wait for a state change, s [300]"
    )
    p.add_argument("--skip-fio", action="store_true", help="only the first outage, no fio")
    p.add_argument("--seed", type=int, default=1, help="seed of page choice and payloads")
    cluster_options(p)
    args = p.parse_args(argv)
    try:
        args.size = parse_size(args.size, "--size")
        args.outage_bytes = parse_size(args.outage_bytes, "--outage-bytes")
    except LaminaError as exc:
        p.error(exc.message)
    if args.size < MIB or args.size % MIB:
        p.error("--size must be a whole number of MiB")
    if args.outage_bytes < MIB or args.outage_bytes % MIB or args.outage_bytes > args.size:
        p.error("--outage-bytes must be a whole number of MiB, at most --size")
    if min(args.outage_seconds, args.fio_seconds, args.timeout) <= 0:
        p.error("--outage-seconds, --fio-seconds and --timeout must be positive")
    if args.iodepth < 1 or args.stripe < 1:
        p.error("--iodepth and --stripe must be positive")
    return args


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # cleaned up like Ctrl-C


def _jsonable(value: Any) -> Any:
    if isinstance(value, Outage | FioRun | Check):
        return asdict(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.skip_fio:
            _check_tools([])  # fio with its nbd engine
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    idle_load = _background_load()
    root = scratch_dir("lamina-bench-resync-", args.dir, 2 * args.size + 512 * MIB)
    if root is None:
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    cluster = ResyncCluster(root / "cluster")
    doc: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "host": host_info(root, idle_load, fio=_version(["fio", "--version"])),
        "resync_rate": RESYNC_RATE,
    }
    code = 1
    try:
        _progress(f"starting a local cluster in {cluster.root}: 1 manager, 2 storage servers")
        cluster.up()
        cluster.create_volume(VOLUME, args.size, 2, args.stripe)
        rate = RESYNC_RATE
        head = [
            f"lamina resync benchmark: {platform.node()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, {_version(['fio', '--version'])}",
            f"data: {root} on {_filesystem(root)}",
            f"cluster: manager pid {_pids(cluster.pids('m'))}, storage server pids "
            f"{_pids(cluster.pids('s'))}; worker copy limit (resync_rate, manager default) "
            + (f"{format_size(rate)}/s" if rate else "none"),
            f"volume {VOLUME}: {format_size(args.size)}, 2 replicas, stripe {args.stripe}, "
            f"1 MiB pages; each outage of {VICTIM}: {args.outage_seconds:g} s, "
            f"{format_size(args.outage_bytes)} written",
            "client cost: "
            + (
                "skipped"
                if args.skip_fio
                else f"fio {args.fio_rw} 4 KiB, qd {args.iodepth}, {args.fio_seconds:g} s, "
                f"over {format_size(args.size)}"
            ),
            *load_lines(idle_load),
        ]
        print("\n".join(head), flush=True)
        outages, quiet, during, volume = bench(args, cluster, root, doc)
        text, ok = report(args, outages, quiet, during, volume)
        print()
        print(text, flush=True)
        code = 0 if ok else 1
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        doc["error"] = str(exc)
    except KeyboardInterrupt:
        print("\nbench: interrupted; cleaning up", file=sys.stderr)
        doc["error"] = "interrupted"
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        if args.json:
            out = {k: _jsonable(v) for k, v in doc.items()}
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
            print(f"\nresults written to {args.json}")
        _cleanup(args, root, cluster, failed=code == 1)
    return code


def _cleanup(args: argparse.Namespace, root: Path, cluster: ResyncCluster, failed: bool) -> None:
    """Stop the cluster and remove the directory; after a failure the directory (and the
    daemons' logs in it) stays."""
    if args.keep:
        print(f"data kept in {root}", file=sys.stderr)
        if cluster.started:
            print(f"cluster left running: lamina down --dir {cluster.root}", file=sys.stderr)
        return
    try:
        cluster.down()
    except (BenchError, subprocess.TimeoutExpired) as exc:
        _progress(f"stopping the cluster failed: {exc}; data kept in {root}")
        return
    if failed:
        _progress(f"cluster stopped; data and logs kept in {root} (daemons: {cluster.root}/log)")
        return
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

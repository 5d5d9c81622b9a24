"""Storage benchmark: one real ``lamina storage`` process against the local disk ceiling.

The script starts a storage server (``lamina.localcluster``) with its data directory in a
fresh temporary directory, connects to it over loopback and runs four workloads with a
fixed window of requests in flight: 4 KiB random write, 1 MiB sequential write, 4 KiB
random read and 1 MiB sequential read, over a working set of 1 MiB pages.  Writes carry
the sync masks of copy 0 of a 2-copy page and hand their tokens back on later requests,
as the volume driver does.  Right after each lamina measurement the same pattern runs as
a plain single-threaded ``os.pwrite``/``os.pread`` loop on one file of the same size in
the same directory: the local ceiling.  Each workload runs ``--runs`` times; the table
shows medians.  See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import uvloop

from lamina.errors import LaminaError
from lamina.localcluster import StorageProcess, ensure_key, storage_servers
from lamina.storage.syncmask import FULL, clear_mask, restore_mask
from lamina.wire import messages as m
from lamina.wire.connection import Client
from lamina.wire.framing import Frame

KIB = 1024
MIB = 1024 * KIB
PAGE_SIZE = MIB
PAGE_SHIFT = 20
PAGE_MASK = PAGE_SIZE - 1
VOLUME = 1
EPOCH = 1
#: the client is the driver of copy 0 of a 2-copy page and sends each write to both copies
CLEAR_MASK = clear_mask(0, 2)
RESTORE_MASK = restore_mask({0, 1}, 2)
NO_TOKENS: tuple[int, ...] = ()
#: how many random payload buffers each write workload cycles through (a power of two)
PAYLOAD_POOL = 8
#: length of the precomputed random offset sequence (a random pattern repeats after it)
RANDOM_SEQUENCE = 1 << 16
#: the local loop reads the clock once per this many operations
LOCAL_CHECK_EVERY = 64
#: client CPU use (fraction of one core) from which the client counts as saturated
SATURATED = 0.9
#: CPU use by other processes before the start (fraction of one core) worth a warning
BUSY_MACHINE = 0.2
#: the targets of bench/README.md, on a 2-core machine
TARGET_RANDWRITE_OPS = 30_000
TARGET_SEQ_RATIO = 0.5


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    write: bool
    size: int
    random: bool


WORKLOADS = (
    Workload("randwrite-4k", "4 KiB random write", True, 4 * KIB, True),
    Workload("seqwrite-1m", "1 MiB sequential write", True, MIB, False),
    Workload("randread-4k", "4 KiB random read", False, 4 * KIB, True),
    Workload("seqread-1m", "1 MiB sequential read", False, MIB, False),
)
BY_NAME = {w.name: w for w in WORKLOADS}


@dataclass
class Sample:
    """One measurement of one workload on one side (lamina or local)."""

    ops: int
    seconds: float
    ops_s: float
    mb_s: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    client_cpu: float | None = None  # fraction of one core used by this process
    server_cpu: float | None = None  # fraction of one core used by the server process
    machine_cpu: float | None = None  # busy fraction of one core, summed over all CPUs


@dataclass
class Result:
    workload: Workload
    lamina: list[Sample] = field(default_factory=list)
    local: list[Sample] = field(default_factory=list)


# --- requests with directly packed headers --------------------------------------------------


class _PreparedWrite(m.Message):
    """A WRITE whose header was packed by the benchmark.

    The bytes are those ``m.WriteRequest(...).encode()`` produces (checked at start-up by
    :func:`check_header_layout`); packing them directly skips building and validating a
    dataclass per request, which would cost the client more than the rest of a request.
    """

    __slots__ = ("_header",)
    OP = m.Op.WRITE

    def __init__(self, header: bytes) -> None:
        self._header = header

    def encode(self) -> bytes:
        return self._header


class _PreparedRead(_PreparedWrite):
    __slots__ = ()
    OP = m.Op.READ


def _write_fields(layer: int, page: int, offset: int, restore: Sequence[int]) -> list[Any]:
    return [
        VOLUME, EPOCH, layer, page, PAGE_SIZE, offset, CLEAR_MASK, RESTORE_MASK, False, restore,
        False, 0,
    ]  # fmt: skip


def _read_fields(
    layer: int, page: int, offset: int, length: int, restore: Sequence[int]
) -> list[Any]:
    return [VOLUME, EPOCH, layer, page, PAGE_SIZE, offset, length, restore]


def check_header_layout(layer: int) -> None:
    """Fail unless the directly packed headers equal the real messages' encoding."""
    pack = msgpack.Packer(use_bin_type=True).pack
    tokens = [1, 2**40 + 7, 2**63 + 5]
    want = m.WriteRequest(*_write_fields(layer, 3, 8192, tokens)).encode()
    if pack(_write_fields(layer, 3, 8192, tokens)) != want:
        raise SystemExit("bench: WriteRequest fields changed; update _write_fields")
    want = m.ReadRequest(*_read_fields(layer, 3, 8192, 4096, tokens)).encode()
    if pack(_read_fields(layer, 3, 8192, 4096, tokens)) != want:
        raise SystemExit("bench: ReadRequest fields changed; update _read_fields")


# --- access patterns and payloads -----------------------------------------------------------


def offsets_for(w: Workload, total: int, seed: int) -> list[int]:
    """Byte offsets into the working set, aligned to the operation size, in issue order."""
    slots = total // w.size
    if not w.random:
        return [i * w.size for i in range(slots)]
    rng = random.Random(seed)
    return [rng.randrange(slots) * w.size for _ in range(RANDOM_SEQUENCE)]


def payloads_for(size: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(PAYLOAD_POOL)]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


# --- the lamina side ---------------------------------------------------------------------------


class _Slot:
    """One of the ``depth`` places in the window; its callback is bound once."""

    __slots__ = ("callback", "runner", "sent")

    def __init__(self, runner: WindowRunner) -> None:
        self.runner = runner
        self.sent = 0.0
        self.callback = self.done

    def done(self, fut: asyncio.Future[Frame]) -> None:
        self.runner.completed(self, fut)


class WindowRunner:
    """Keeps exactly ``depth`` requests in flight until the deadline or ``limit`` ops.

    No task per request: ``Client.send`` returns a future, and its done callback records
    the latency and issues the next request from the same slot.  Write tokens completed
    since the previous request ride on the next request's ``restore`` field.
    """

    def __init__(
        self,
        client: Client,
        layer: int,
        w: Workload,
        offsets: list[int],
        payloads: list[bytes],
        depth: int,
        seconds: float,
        limit: int | None = None,
        tokens: list[int] | None = None,
    ) -> None:
        self.client = client
        self.layer = layer
        self.write = w.write
        self.size = w.size
        self.offsets = offsets
        self.noffsets = len(offsets)
        self.payloads = payloads
        self.pmask = len(payloads) - 1
        self.depth = depth
        self.seconds = seconds
        self.limit = limit if limit is not None else sys.maxsize
        self.tokens: list[int] = tokens if tokens is not None else []
        self.latencies: list[float] = []
        self.issued = 0
        self.inflight = 0
        self.deadline = 0.0
        self.start = 0.0
        self.last = 0.0
        self.pack = msgpack.Packer(use_bin_type=True).pack
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        slots = [_Slot(self) for _ in range(self.depth)]
        self.start = self.last = time.perf_counter()
        self.deadline = self.start + self.seconds
        for slot in slots:
            if self.issued >= self.limit:
                break
            self.inflight += 1
            self._issue(slot)
        if self.inflight:
            await self.finished

    def _issue(self, slot: _Slot) -> None:
        i = self.issued
        self.issued = i + 1
        off = self.offsets[i % self.noffsets]
        page = off >> PAGE_SHIFT
        offset = off & PAGE_MASK
        tokens = self.tokens
        restore: Sequence[int] = tokens
        if not tokens:
            restore = NO_TOKENS
        elif len(tokens) <= m.MAX_LIST:
            self.tokens = []
        else:
            restore, self.tokens = tokens[: m.MAX_LIST], tokens[m.MAX_LIST :]
        if self.write:
            header = self.pack(_write_fields(self.layer, page, offset, restore))
            msg: m.Message = _PreparedWrite(header)
            payload = self.payloads[i & self.pmask]
        else:
            header = self.pack(_read_fields(self.layer, page, offset, self.size, restore))
            msg = _PreparedRead(header)
            payload = b""
        slot.sent = time.perf_counter()
        try:
            fut = self.client.send(msg, payload)
        except LaminaError as exc:
            self._fail(exc)
            return
        fut.add_done_callback(slot.callback)

    def completed(self, slot: _Slot, fut: asyncio.Future[Frame]) -> None:
        now = time.perf_counter()
        if self.finished.done():
            return
        try:
            frame = fut.result()
            if frame.status:
                Client.unpack(frame)  # raises the typed error
            if self.write:
                self.tokens.append(msgpack.unpackb(frame.header)[0])
            elif len(frame.payload) != self.size:
                raise LaminaError(
                    f"read returned {len(frame.payload)} bytes, not {self.size}: page not PRESENT"
                )
        except (LaminaError, asyncio.CancelledError) as exc:
            self._fail(exc)
            return
        self.latencies.append(now - slot.sent)
        self.last = now
        if self.issued < self.limit and now < self.deadline:
            self._issue(slot)
            return
        self.inflight -= 1
        if self.inflight == 0:
            self.finished.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if not self.finished.done():
            self.finished.set_exception(exc)


def _server_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (from /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (from /proc/stat; idle and iowait excluded)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return math.nan
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


async def _restore_leftovers(client: Client, tokens: list[int]) -> None:
    """Hand back tokens no later request carried (the driver sends RESTORE when idle)."""
    while tokens:
        batch, tokens[:] = tokens[: m.MAX_LIST], tokens[m.MAX_LIST :]
        await client.call(m.RestoreRequest(tuple(batch)))


async def _count_dirty(client: Client, layer: int, pages: int) -> int:
    """Pages whose mask is not full: should be none once every token went back."""
    dirty = 0
    for first in range(0, pages, m.MAX_LIST):
        batch = tuple(range(first, min(first + m.MAX_LIST, pages)))
        reply = await client.call(m.StatusRequest(VOLUME, EPOCH, layer, batch))
        assert isinstance(reply, m.StatusResponse)
        dirty += sum(1 for _, _, mask, *_ in reply.entries if mask != FULL)
    return dirty


async def run_lamina(
    client: Client,
    server_pid: int,
    layer: int,
    w: Workload,
    offsets: list[int],
    payloads: list[bytes],
    depth: int,
    seconds: float,
    pages: int,
) -> Sample:
    runner = WindowRunner(client, layer, w, offsets, payloads, depth, seconds)
    cpu0, srv0, all0 = time.process_time(), _server_cpu_seconds(server_pid), _machine_busy_seconds()
    await runner.run()
    wall = runner.last - runner.start
    cpu, srv = time.process_time() - cpu0, _server_cpu_seconds(server_pid) - srv0
    busy = _machine_busy_seconds() - all0
    if w.write:
        await _restore_leftovers(client, runner.tokens)
        await client.call(m.FlushRequest(VOLUME, EPOCH))  # untimed: each workload starts clean
        dirty = await _count_dirty(client, layer, pages)
        if dirty:
            _progress(f"WARNING: {dirty} pages still dirty after all tokens went back")
    lat = sorted(runner.latencies)
    ops = len(lat)
    if ops == 0 or wall <= 0:
        raise LaminaError(f"{w.name}: no request completed")
    return Sample(
        ops=ops,
        seconds=wall,
        ops_s=ops / wall,
        mb_s=ops * w.size / wall / 1e6,
        p50_ms=percentile(lat, 0.50) * 1e3,
        p99_ms=percentile(lat, 0.99) * 1e3,
        client_cpu=cpu / wall,
        server_cpu=srv / wall,
        machine_cpu=busy / wall,
    )


async def prepare_pages(client: Client, layer: int, pages: int, depth: int) -> None:
    """CREATE_IF_ABSENT every page as zeros (a clean 2-copy page: full mask)."""
    for first in range(0, pages, depth):
        calls = [
            client.call(m.CreateRequest(VOLUME, EPOCH, layer, page, PAGE_SIZE, FULL, True))
            for page in range(first, min(first + depth, pages))
        ]
        await asyncio.gather(*calls)


async def fill_pages(client: Client, layer: int, pages: int, depth: int, seed: int) -> None:
    """Write every page in full (untimed), so the read workloads find PRESENT pages."""
    w = BY_NAME["seqwrite-1m"]
    offsets = [p * PAGE_SIZE for p in range(pages)]
    runner = WindowRunner(
        client, layer, w, offsets, payloads_for(MIB, seed), depth, math.inf, limit=pages
    )
    await runner.run()
    await _restore_leftovers(client, runner.tokens)
    await client.call(m.FlushRequest(VOLUME, EPOCH))


# --- the local ceiling -----------------------------------------------------------------------


def run_local(
    fd: int, w: Workload, offsets: list[int], payloads: list[bytes], seconds: float
) -> Sample:
    """A plain single-threaded pwrite/pread loop: no queue depth, no protocol."""
    n = len(offsets)
    pmask = len(payloads) - 1
    pwrite, pread, clock = os.pwrite, os.pread, time.perf_counter
    size = w.size
    i = 0
    start = clock()
    deadline = start + seconds
    now = start
    while now < deadline:
        if w.write:
            for _ in range(LOCAL_CHECK_EVERY):
                pwrite(fd, payloads[i & pmask], offsets[i % n])
                i += 1
        else:
            for _ in range(LOCAL_CHECK_EVERY):
                if len(pread(fd, size, offsets[i % n])) != size:
                    raise SystemExit("bench: short read from the local baseline file")
                i += 1
        now = clock()
    wall = now - start
    if w.write:
        os.fdatasync(fd)  # untimed, like the FLUSH after a lamina write workload
    return Sample(ops=i, seconds=wall, ops_s=i / wall, mb_s=i * size / wall / 1e6)


def make_local_file(path: Path, size: int, seed: int) -> int:
    """The baseline file: allocated and filled with data, like the lamina pages."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.posix_fallocate(fd, 0, size)
    chunks = payloads_for(MIB, seed)
    for i, off in enumerate(range(0, size, MIB)):
        os.pwrite(fd, chunks[i % len(chunks)], off)
    os.fdatasync(fd)
    return fd


# --- orchestration -------------------------------------------------------------------------------


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def bench(
    args: argparse.Namespace, server: StorageProcess, key: bytes, root: Path
) -> list[Result]:
    workloads = [BY_NAME[n] for n in args.only] if args.only else list(WORKLOADS)
    total = args.size_mib * MIB
    pages = total // PAGE_SIZE
    layer = random.Random(args.seed).randrange(1, 2**32)
    check_header_layout(layer)
    assert server.proc is not None
    pid = server.proc.pid
    client = await Client.connect("127.0.0.1", server.port, key, peer=f"lamina-bench/{os.getpid()}")
    fd = -1
    try:
        _progress(f"creating {pages} pages of 1 MiB (CREATE_IF_ABSENT, zero)")
        await prepare_pages(client, layer, pages, args.depth)
        if not args.skip_local:
            _progress(f"writing the {args.size_mib} MiB local baseline file")
            fd = make_local_file(root / "local-baseline.dat", total, args.seed)
        filled = False
        results = [Result(w) for w in workloads]
        for run in range(1, args.runs + 1):
            for i, res in enumerate(results):
                w = res.workload
                if not w.write and not filled:
                    _progress(f"filling all {pages} pages with data (1 MiB writes, untimed)")
                    await fill_pages(client, layer, pages, args.depth, args.seed + 1)
                    filled = True
                offsets = offsets_for(w, total, args.seed + 100 * run + i)
                payloads = payloads_for(w.size, args.seed + 7) if w.write else []
                s = await run_lamina(
                    client, pid, layer, w, offsets, payloads, args.depth, args.seconds, pages
                )
                res.lamina.append(s)
                line = (
                    f"run {run}/{args.runs} {w.name:13} lamina {s.ops_s:>10,.0f} ops/s "
                    f"p50 {s.p50_ms:.3f} ms p99 {s.p99_ms:.3f} ms"
                )
                if fd >= 0:
                    loc = run_local(fd, w, offsets, payloads, args.seconds)
                    res.local.append(loc)
                    line += f" | local {loc.ops_s:>10,.0f} ops/s"
                _progress(line)
        return results
    finally:
        client.close()
        if fd >= 0:
            os.close(fd)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def summarise(res: Result) -> dict[str, float | None]:
    lam, loc = res.lamina, res.local
    out: dict[str, float | None] = {
        "lamina_ops_s": _median([s.ops_s for s in lam]),
        "lamina_mb_s": _median([s.mb_s for s in lam]),
        "p50_ms": _median([s.p50_ms for s in lam]),
        "p99_ms": _median([s.p99_ms for s in lam]),
        "local_ops_s": _median([s.ops_s for s in loc]),
        "local_mb_s": _median([s.mb_s for s in loc]),
        "client_cpu": _median([s.client_cpu for s in lam]),
        "server_cpu": _median([s.server_cpu for s in lam]),
        "machine_cpu": _median([s.machine_cpu for s in lam]),
    }
    a, b = out["lamina_ops_s"], out["local_ops_s"]
    out["ratio"] = a / b if a is not None and b else None
    return out


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        parts = [c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)]
        return "| " + " | ".join(parts) + " |"

    rule = "|:" + "-" * (widths[0] + 1) + "".join(f"|{'-' * (wd + 1)}:" for wd in widths[1:]) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def report(results: list[Result], summaries: list[dict[str, float | None]]) -> str:
    rows = []
    for res, s in zip(results, summaries, strict=True):
        rows.append(
            [
                res.workload.label,
                _fmt(s["lamina_ops_s"], ",.0f"),
                _fmt(s["lamina_mb_s"], ",.1f"),
                _fmt(s["p50_ms"], ".3f", " ms"),
                _fmt(s["p99_ms"], ".3f", " ms"),
                _fmt(s["local_ops_s"], ",.0f"),
                _fmt(s["local_mb_s"], ",.1f"),
                _fmt(s["ratio"], ".3f"),
            ]
        )
    main = _table(
        ["workload", "lamina ops/s", "lamina MB/s", "p50 latency", "p99 latency",
         "local ops/s", "local MB/s", "lamina/local"],
        rows,
    )  # fmt: skip
    cpu_rows = []
    saturated = []
    for res, s in zip(results, summaries, strict=True):
        c = s["client_cpu"]
        note = ""
        if c is not None and c >= SATURATED:
            note = "client saturates a core"
            saturated.append(res.workload.label)
        cpu_rows.append(
            [
                res.workload.label,
                _fmt(c, ".0%"),
                _fmt(s["server_cpu"], ".0%"),
                _fmt(s["machine_cpu"], ".0%"),
                note or "-",
            ]
        )
    cpu = _table(["workload", "client CPU", "server CPU", "whole machine", "note"], cpu_rows)
    cores = os.cpu_count() or 1
    lines = [
        main,
        "",
        f"CPU time / wall time during the lamina runs (100% = one core, {cores} cores; "
        "whole machine includes the kernel and any other process; medians):",
        "",
        cpu,
        "",
    ]
    if saturated:
        lines.append(
            "WARNING: the client process saturated a core during: "
            + ", ".join(saturated)
            + "; lamina numbers there may be limited by the client."
        )
        lines.append("")
    lines += _targets(results, summaries)
    return "\n".join(lines)


def _targets(results: list[Result], summaries: list[dict[str, float | None]]) -> list[str]:
    by = {r.workload.name: s for r, s in zip(results, summaries, strict=True)}
    out = ["targets (2-core machine):"]
    s = by.get("randwrite-4k")
    if s is not None and s["lamina_ops_s"] is not None:
        ok = s["lamina_ops_s"] >= TARGET_RANDWRITE_OPS
        out.append(
            f"  4 KiB random write >= {TARGET_RANDWRITE_OPS:,} ops/s: "
            f"{'met' if ok else 'NOT met'} ({s['lamina_ops_s']:,.0f})"
        )
    for name in ("seqwrite-1m", "seqread-1m"):
        s = by.get(name)
        if s is None or s["ratio"] is None:
            continue
        ok = s["ratio"] >= TARGET_SEQ_RATIO
        out.append(
            f"  {BY_NAME[name].label} >= {TARGET_SEQ_RATIO:.0%} of local: "
            f"{'met' if ok else 'NOT met'} ({s['ratio']:.0%})"
        )
    return out


def _filesystem(path: Path) -> str:
    """``device type mountpoint`` of the filesystem holding ``path``."""
    best = ("?", "?", "")
    real = str(path.resolve())
    try:
        with open("/proc/mounts") as f:
            for entry in f:
                dev, mnt, fstype, *_ = entry.split()
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best[2]):
                    best = (dev, fstype, mnt)
    except OSError:
        pass
    return f"{best[0]} ({best[1]}, mounted on {best[2] or '?'})"


def scratch_dir(prefix: str, parent: str | None, need: int) -> Path | None:
    """A new temporary directory under ``parent``; None (the reason printed) when its
    filesystem has fewer than ``need`` bytes free."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    free = shutil.disk_usage(root).free
    if free < need:
        shutil.rmtree(root, ignore_errors=True)
        print(f"bench: {root} has {free >> 20} MiB free, needs {need >> 20} MiB", file=sys.stderr)
        return None
    return root


def host_info(root: Path, idle_load: Any, **tools: Any) -> dict[str, Any]:
    """The "host" part of a benchmark's JSON: the machine, ``tools`` (versions), where
    the data lived, and the load before the run started."""
    return {
        "node": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **tools,
        "dir": str(root),
        "filesystem": _filesystem(root),
        "load_before_start": idle_load,
    }


def cluster_options(p: argparse.ArgumentParser) -> None:
    """--dir, --keep and --json of the benchmarks that start a local cluster."""
    p.add_argument("--dir", default=None, help="parent of the temporary directory [system tmp]")
    p.add_argument(
        "--keep", action="store_true", help="leave the cluster running and keep the directory"
    )
    p.add_argument("--json", metavar="FILE", help="also write every raw number as JSON here")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark one lamina storage server against local pwrite/pread."
    )
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement")
    p.add_argument("--runs", type=int, default=3, help="runs per workload (medians reported)")
    p.add_argument("--depth", type=int, default=16, help="requests in flight")
    p.add_argument("--size-mib", type=int, default=1024, help="working set in MiB (1 MiB pages)")
    p.add_argument(
        "--dir", default=None, help="parent of the temporary data directory [system temp dir]"
    )
    p.add_argument("--only", action="append", choices=list(BY_NAME), help="run only these")
    p.add_argument("--skip-local", action="store_true", help="skip the local baseline")
    p.add_argument("--keep", action="store_true", help="keep the data directory afterwards")
    p.add_argument("--seed", type=int, default=1, help="seed of offsets and payloads")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.runs < 1 or args.depth < 1 or args.size_mib < 1:
        p.error("--seconds, --runs, --depth and --size-mib must be positive")
    return args


def _background_load(seconds: float = 1.0) -> float:
    """Busy fraction of one core, summed over all CPUs, before the benchmark starts."""
    before = _machine_busy_seconds()
    time.sleep(seconds)
    return (_machine_busy_seconds() - before) / seconds


def load_lines(idle_load: float) -> list[str]:
    """The header's line on the load before the start, and a warning if it was high."""
    lines = [f"machine load before the start: {idle_load:.0%} of one core (other processes)"]
    if idle_load > BUSY_MACHINE:
        lines.append(
            "WARNING: other processes were using the CPUs before the start; "
            "results will be lower and noisier than on an idle machine"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    idle_load = _background_load()
    root = scratch_dir("lamina-bench-", args.dir, 2 * args.size_mib * MIB + 256 * MIB)
    if root is None:
        return 1
    try:
        key = ensure_key(root / "cluster.key")
        server = storage_servers(root, 1)[0]
        server.start()
        assert server.proc is not None
        head = [
            f"lamina storage benchmark: {platform.node()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, client on uvloop",
            f"server: pid {server.proc.pid} at {server.addr}, data {server.data}",
            "local baseline: skipped"
            if args.skip_local
            else f"local baseline: {root / 'local-baseline.dat'} (same directory tree)",
            f"filesystem of both: {_filesystem(root)}",
            f"working set {args.size_mib} MiB (1 MiB pages), {args.depth} requests in flight, "
            f"{args.seconds:g} s x {args.runs} runs per workload, medians",
            f"writes: clear mask {CLEAR_MASK:#010x}, restore mask {RESTORE_MASK:#010x}, "
            "tokens piggybacked on later requests",
            *load_lines(idle_load),
        ]
        print("\n".join(head), flush=True)
        try:
            uvloop.install()
            results = asyncio.run(bench(args, server, key, root))
        finally:
            code = server.stop()
            if code not in (0, None):
                print(f"bench: server exited with {code}; see {server.log}", file=sys.stderr)
        summaries = [summarise(r) for r in results]
        print()
        print(report(results, summaries), flush=True)
        if args.json:
            doc = {
                "config": {k: v for k, v in vars(args).items() if k not in ("json",)},
                "host": host_info(root, idle_load, data_dir=str(server.data)),
                "workloads": [
                    {
                        "name": r.workload.name,
                        "label": r.workload.label,
                        "op_size": r.workload.size,
                        "median": s,
                        "lamina_runs": [asdict(x) for x in r.lamina],
                        "local_runs": [asdict(x) for x in r.local],
                    }
                    for r, s in zip(results, summaries, strict=True)
                ],
            }
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
            print(f"\nresults written to {args.json}")
    finally:
        if args.keep:
            print(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

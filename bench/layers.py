"""Layer-chain benchmark: 4 KiB random reads of a volume under 20 snapshots, against the
same volume with none.

The script starts a local cluster (``lamina up``: one manager, two storage servers) in a
fresh temporary directory and creates two volumes of the same size, 2 replicas, stripe 4,
1 MiB pages: ``flat`` and ``deep``.  Both are filled once by the same fio job (1 MiB
sequential writes through ``lamina nbd``).  Then ``lamina snapshot create deep s1`` ...
``s20`` stacks 20 layers on deep's data: every page of deep lives only in the bottom of
its 21 layers, under 20 empty ones (``--dirty-pages N`` writes N pages after each
snapshot, so that no layer is empty).

Two measurements:

1. Requests per read, in this process: the driver reads random 4 KiB blocks of each
   volume one at a time while every request it sends to a storage server is counted.
   The first read of deep lists the pages of each layer (the presence maps); every read
   after it should cost one request, as on flat, not one per layer.  The data read from
   deep are compared with snapshot s1 (its bottom layer alone) and the pages written
   since.
2. fio (``ioengine=nbd``, 4 KiB random reads, queue depth 16, the options of
   ``bench/nbd.py``) against ``lamina nbd`` of flat and of deep, both exported
   read-write (the exporter holds the lock, so the top layer's map is trusted too), and
   of deep exported ``--read-only`` (the top layer is not trusted).  Interleaved runs,
   medians.  Target: deep read-write >= 0.80 x flat.

See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from lamina.client import Cluster as Driver
from lamina.client import Volume
from lamina.clusterctl import format_size, parse_size
from lamina.errors import LaminaError
from lamina.wire.connection import Client
from nbd import (
    JOBS_BY_NAME,
    PREFILL,
    BenchError,
    Cluster,
    Results,
    Target,
    _check_tools,
    _cleanup,
    _fail,
    _on_sigterm,
    _pids,
    _version,
    lamina_cmd,
    run_fio,
    summarise,
)
from resync import _div
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
#: the size of every read: fio's block size and the driver's reads alike
BLOCK = 4 * KIB
REPLICAS = 2
JOB = JOBS_BY_NAME["randread-4k-qd16"]
#: deep read-write over flat, 4 KiB random reads at queue depth 16 (bench/README.md)
TARGET_RATIO = 0.8
#: the exports measured with fio, in the order of the table
EXPORTS = ("flat", "deep", "deep-ro")
LABELS = {"flat": "flat, read-write", "deep": "deep, read-write", "deep-ro": "deep, read-only"}
#: the driver's opens whose requests are counted: (volume, read-only); deep read-only
#: before deep read-write, whose unlock at its close changes deep's epoch
OPENS = (("flat", False), ("deep", True), ("deep", False))


@dataclass
class Export(Target):
    """``lamina nbd`` of volume flat or deep (``name``: one of EXPORTS)."""

    @property
    def label(self) -> str:
        return LABELS[self.name]


def start_export(cluster: Cluster, root: Path, name: str, tag: str) -> Export:
    volume = name.removesuffix("-ro")
    port_file = root / "run" / f"nbd-{name}-{tag}.port"
    port_file.parent.mkdir(exist_ok=True)
    argv = lamina_cmd(
        "nbd", volume, "--listen", "127.0.0.1:0", "--port-file", str(port_file),
        "--cluster", str(cluster.file), *(["--read-only"] if name.endswith("-ro") else []),
    )  # fmt: skip
    helpers = {"storage": cluster.pids("s"), "manager": cluster.pids("m")}
    export = Export(
        name, argv, root / "log" / f"nbd-{name}-{tag}.log", port_file=port_file, helpers=helpers
    )
    export.start()
    _progress(f"lamina nbd of {export.label}: pid {export.pid}, {export.uri}")
    return export


# --- the volumes ---------------------------------------------------------------------------


def fill(args: argparse.Namespace, cluster: Cluster, root: Path, started: list[Target]) -> None:
    """Both volumes, every page, with the same fio job through read-write exports that
    are stopped afterwards (their drivers saw the volumes before the snapshots)."""
    exports = [start_export(cluster, root, name, "fill") for name in ("flat", "deep")]
    started += exports
    for export in exports:
        _progress(f"filling {export.name}: {format_size(args.size)} of 1 MiB sequential writes")
        s = run_fio(export, PREFILL, args.size, None, 0, root)
        if s.error:
            raise BenchError(f"filling {export.name} failed: {s.error}\n{export.log_tail()}")
        _progress(f"  {s.mb_s:,.1f} MB/s in {s.seconds:.1f} s")
    for export in exports:
        export.stop()


async def write_blocks(
    cluster_file: Path, rng: random.Random, pages: int, written: dict[int, bytes]
) -> None:
    """One 4 KiB block in each of ``pages`` random pages of deep (each is copied up into
    the top layer first); ``written``: volume offset -> data, the newest last."""
    async with await Driver.connect(cluster_file) as c:
        vol = await c.open("deep")
        for page in rng.sample(range(vol.size // vol.page_size), pages):
            offset = page * vol.page_size + rng.randrange(vol.page_size // BLOCK) * BLOCK
            data = rng.randbytes(BLOCK)
            await vol.write(offset, data)
            written[offset] = data
        await vol.close()


def take_snapshots(args: argparse.Namespace, cluster: Cluster) -> tuple[dict[int, bytes], float]:
    """``lamina snapshot create deep s1`` ... (and the pages written after each); what
    was written, and the seconds the snapshot commands took."""
    written: dict[int, bytes] = {}
    rng = random.Random(args.seed)
    busy = 0.0
    for i in range(1, args.snapshots + 1):
        t0 = time.monotonic()
        cluster.cli("snapshot", "create", "deep", f"s{i}", "--cluster", str(cluster.file), "--json")
        busy += time.monotonic() - t0
        if args.dirty_pages:
            asyncio.run(write_blocks(cluster.file, rng, args.dirty_pages, written))
    return written, busy


# --- requests per read --------------------------------------------------------------------------


@dataclass
class Requests:
    """The storage requests of reads of random 4 KiB blocks, one at a time, by one open."""

    volume: str
    read_only: bool
    path: str  # "start_read": what lamina nbd calls; "read": the Python API
    first: dict[str, int] = field(default_factory=dict)  # the open's first read, by request
    first_ms: float | None = None  # how long the first read took
    per_read: list[int] = field(default_factory=list)  # requests of each read after it
    requests: dict[str, int] = field(default_factory=dict)  # of all those reads, by request
    checked: int = 0  # reads whose data were compared with what the volume holds
    wrong: list[int] = field(default_factory=list)  # offsets of the reads that differed
    seconds: float = 0.0  # of all the reads after the first, one after the other

    @property
    def label(self) -> str:
        return f"{self.volume}, {'read-only' if self.read_only else 'read-write'}"

    @property
    def mean(self) -> float:
        return statistics.fmean(self.per_read)


def _by_request(calls: list[Any]) -> dict[str, int]:
    """Requests sent through :meth:`Client.send` (``calls``: the mock's call list), by
    operation: ``ReadRequest`` -> ``READ``."""
    names = Counter(type(call.args[1]).__name__.removesuffix("Request").upper() for call in calls)
    return dict(sorted(names.items()))


async def _count(
    vol: Volume, blocks: list[int], expected: dict[int, bytes] | None
) -> list[Requests]:
    paths: dict[str, Callable[[int, int], Awaitable[Any]]] = {
        "start_read": vol.start_read,
        "read": vol.read,
    }
    out = []
    with mock.patch.object(Client, "send", autospec=True, side_effect=Client.send) as send:
        t0 = time.perf_counter()
        await vol.start_read(blocks[0], BLOCK)  # lists the layers' pages (deep)
        first_ms = (time.perf_counter() - t0) * 1e3
        first = _by_request(send.call_args_list)
        for sid in vol.view.servers:  # the connections the first read did not need
            await vol.cluster.connected(sid)
        for path, read in paths.items():
            r = Requests(vol.name, vol.read_only, path)
            if path == "start_read":
                r.first, r.first_ms = first, first_ms
            total: Counter[str] = Counter()
            for offset in blocks[1:]:
                send.reset_mock()
                t0 = time.perf_counter()
                data = bytes(await read(offset, BLOCK))
                r.seconds += time.perf_counter() - t0
                r.per_read.append(send.call_count)
                total.update(_by_request(send.call_args_list))
                if expected is not None:
                    r.checked += 1
                    if data != expected[offset]:
                        r.wrong.append(offset)
            r.requests = dict(sorted(total.items()))
            out.append(r)
    return out


async def count_requests(
    args: argparse.Namespace, cluster_file: Path, written: dict[int, bytes]
) -> list[Requests]:
    """Requests per read of each of OPENS, every open by a fresh driver (no connection,
    no presence map yet), on the same random blocks."""
    rng = random.Random(args.seed + 1)
    blocks = [rng.randrange(args.size // BLOCK) * BLOCK for _ in range(args.reads + 1)]
    async with await Driver.connect(cluster_file) as c:
        bottom = await c.open("deep@s1", read_only=True)  # one layer: the data filled
        expected = {b: written.get(b) or await bottom.read(b, BLOCK) for b in blocks}
        await bottom.close()
    out: list[Requests] = []
    for volume, read_only in OPENS:
        async with await Driver.connect(cluster_file) as c:
            vol = await c.open(volume, read_only=read_only)
            try:
                out += await _count(vol, blocks, expected if volume == "deep" else None)
            finally:
                await vol.close()
    return out


def _requests(counts: dict[str, int], reads: int = 1) -> str:
    return ", ".join(f"{n / reads:g} {name}" for name, n in counts.items()) or "none"


# --- fio ------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, exports: list[Export], scratch: Path) -> Results:
    """A warm-up run of each export, then ``--runs`` rounds of one run of each; the
    order rotates from round to round, so a drift of the machine hits all alike."""
    for export in exports if args.warmup else []:
        s = run_fio(export, JOB, args.size, args.warmup, 0, scratch)
        if s.error:
            _fail(export, "warm-up", s)
    results: Results = {e.name: {JOB.name: []} for e in exports}
    for run in range(1, args.runs + 1):
        k = (run - 1) % len(exports)
        for export in exports[k:] + exports[:k]:
            if export.failed:
                continue
            s = run_fio(export, JOB, args.size, args.seconds, run, scratch)
            results[export.name][JOB.name].append(s)
            if s.error:
                _fail(export, f"run {run}", s)
                continue
            _progress(
                f"run {run}/{args.runs} {export.label:16} {s.iops:>9,.0f} IOPS  p50 "
                f"{s.p50_ms:.3f} ms  p99 {s.p99_ms:.3f} ms  lamina nbd CPU "
                f"{_fmt(s.exporter_cpu, '.0%')}"
            )
    return results


def _run_ratios(results: Results, name: str) -> list[float]:
    """deep/flat (or deep-ro/flat) IOPS of each round in which both ran."""
    flat, other = results["flat"][JOB.name], results[name][JOB.name]
    by_run = {s.run: s.iops for s in flat if s.iops}
    return [s.iops / by_run[s.run] for s in other if s.iops and s.run in by_run]


# --- the report -----------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    medians: dict[str, dict[str, dict[str, float | None]]],
    results: Results,
    requests: list[Requests],
) -> tuple[str, dict[str, Any]]:
    """The tables, and the verdicts for the JSON."""
    med = {name: medians[name][JOB.name] for name in EXPORTS}
    flat = med["flat"]["iops"]
    rows = []
    for name in EXPORTS:
        m = med[name]
        rows.append(
            [
                LABELS[name],
                str(1 + args.snapshots if name.startswith("deep") else 1),
                _fmt(m["iops"], ",.0f"),
                _fmt(m["p50_ms"], ".3f", " ms"),
                _fmt(m["p99_ms"], ".3f", " ms"),
                _fmt(m["exporter_cpu"], ".0%"),
                _fmt(m["storage_cpu"], ".0%"),
                _fmt(_per_read(m["exporter_cpu"], m["iops"]), ".1f", " us"),
                _fmt(_per_read(m["storage_cpu"], m["iops"]), ".1f", " us"),
                _fmt(_div(m["iops"], flat), ".2f"),
            ]
        )
    header = [
        "volume, export", "layers", "IOPS", "p50", "p99", "nbd CPU", "storage CPU",
        "nbd CPU/read", "storage CPU/read", "/ flat",
    ]  # fmt: skip
    req_rows = [
        [
            r.label,
            r.path,
            f"{_requests(r.first)} in {r.first_ms:.1f} ms" if r.first_ms is not None else "-",
            f"{r.mean:.2f} (max {max(r.per_read)})",
            _requests(r.requests, len(r.per_read)),
            f"{r.seconds / len(r.per_read) * 1e6:.0f} us",
            "-" if not r.checked else f"{r.checked - len(r.wrong)} of {r.checked} right",
        ]
        for r in requests
    ]
    req_header = [
        "volume, open", "path", "first read", "requests/read", "of which", "time/read", "data",
    ]  # fmt: skip
    ratio = _div(med["deep"]["iops"], flat)
    ro = _div(med["deep-ro"]["iops"], flat)
    deep_rw = [r for r in requests if r.volume == "deep" and not r.read_only]
    verdicts: dict[str, Any] = {
        "ratio": ratio,
        "ratio_read_only": ro,
        "run_ratios": _run_ratios(results, "deep"),
        "run_ratios_read_only": _run_ratios(results, "deep-ro"),
        "target_met": ratio is not None and ratio >= TARGET_RATIO,
        "requests_per_read_deep": max((r.mean for r in deep_rw), default=None),
        "wrong_reads": sum(len(r.wrong) for r in requests),
    }
    dirty = (
        f"{args.dirty_pages} pages written after each snapshot"
        if args.dirty_pages
        else "nothing written between them: every page only in the bottom layer"
    )
    lines = [
        f"fio 4 KiB random reads, qd {JOB.iodepth}, medians of {args.runs} run(s) of "
        f"{args.seconds:g} s per export; deep: {args.snapshots} snapshots, {dirty}; latency "
        "from submission to completion, seen by fio; CPU: CPU time / wall time (100% = one "
        "core; 'storage': both storage servers), and CPU time per read:",
        "",
        _table(header, rows),
        "",
        "per round, deep read-write / flat: "
        + ", ".join(f"{x:.2f}" for x in verdicts["run_ratios"])
        + "; deep read-only / flat: "
        + ", ".join(f"{x:.2f}" for x in verdicts["run_ratios_read_only"]),
        "",
        f"Storage requests of a 4 KiB read through the driver, one read at a time, "
        f"{args.reads} random blocks per path after the open's first read:",
        "",
        _table(req_header, req_rows),
        "",
        f"target: deep read-write >= {TARGET_RATIO:.2f} x flat: "
        + ("no result" if ratio is None else "met" if verdicts["target_met"] else "NOT met")
        + f" ({_fmt(ratio, '.2f')}); deep read-only: {_fmt(ro, '.2f')} x flat (no target)",
        f"deep read-write: {_fmt(verdicts['requests_per_read_deep'], '.2f')} storage "
        f"requests per read after the first, with {1 + args.snapshots} layers",
    ]
    if verdicts["wrong_reads"]:
        lines.append(
            f"NOTE: {verdicts['wrong_reads']} reads of deep returned other data than its "
            "bottom layer and the pages written since (offsets in the JSON)"
        )
    return "\n".join(lines), verdicts


def _per_read(cpu: float | None, iops: float | None) -> float | None:
    """Microseconds of CPU per read, from a CPU share and IOPS."""
    return None if cpu is None or not iops else cpu / iops * 1e6


# --- orchestration -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="4 KiB random reads of a volume under a chain of snapshots against the "
        "same volume without: fio through lamina nbd, and requests per read in the driver."
    )
    p.add_argument("--size", default="1G", help="size of both volumes (whole MiB) [1G]")
    p.add_argument("--snapshots", type=int, default=20, help="snapshots of deep [20]")
    p.add_argument(
        "--dirty-pages", type=int, default=0, help="pages of deep written after each snapshot [0]"
    )
    p.add_argument("--seconds", type=float, default=15.0, help="duration of each fio run [15]")
    p.add_argument("--runs", type=int, default=3, help="fio runs per export (medians) [3]")
    p.add_argument(
        "--warmup", type=float, default=2.0, help="unmeasured fio run per export first, s [2]"
    )
    p.add_argument("--reads", type=int, default=200, help="reads counted per open and path [200]")
    p.add_argument("--stripe", type=int, default=4, help="stripe of both volumes [4]")
    p.add_argument("--seed", type=int, default=1, help="seed of the blocks read and written")
    cluster_options(p)
    args = p.parse_args(argv)
    try:
        args.size = parse_size(args.size, "--size")
    except LaminaError as exc:
        p.error(exc.message)
    if args.size < MIB or args.size % MIB:
        p.error("--size must be a whole number of MiB")
    if min(args.seconds, args.runs, args.snapshots, args.reads, args.stripe) <= 0:
        p.error("--seconds, --runs, --snapshots, --reads and --stripe must be positive")
    if args.warmup < 0 or not 0 <= args.dirty_pages <= args.size // MIB:
        p.error("--warmup must not be negative, --dirty-pages at most the volume's pages")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _check_tools([])  # fio with its nbd engine
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    idle_load = _background_load()
    root = scratch_dir("lamina-bench-layers-", args.dir, 2 * REPLICAS * args.size + 512 * MIB)
    if root is None:
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    cluster = Cluster(root / "cluster")
    started: list[Target] = []
    doc: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "host": host_info(root, idle_load, fio=_version(["fio", "--version"])),
    }
    code = 1
    try:
        _progress(f"starting a local cluster in {cluster.root}: 1 manager, 2 storage servers")
        cluster.up()
        for name in ("flat", "deep"):
            cluster.create_volume(name, args.size, REPLICAS, args.stripe)
        print(
            "\n".join(
                [
                    f"lamina layer-chain benchmark: {platform.node()}, {os.cpu_count()} CPUs, "
                    f"Python {platform.python_version()}, {_version(['fio', '--version'])}",
                    f"data: {root} on {_filesystem(root)}",
                    f"cluster: manager pid {_pids(cluster.pids('m'))}, storage server pids "
                    f"{_pids(cluster.pids('s'))}; volumes flat and deep: "
                    f"{format_size(args.size)}, {REPLICAS} replicas, stripe {args.stripe}, "
                    "1 MiB pages",
                    *load_lines(idle_load),
                ]
            ),
            flush=True,
        )
        fill(args, cluster, root, started)
        _progress(f"taking {args.snapshots} snapshots of deep")
        written, snap_seconds = take_snapshots(args, cluster)
        doc["snapshot_seconds"] = snap_seconds
        _progress(f"  {snap_seconds:.1f} s for the snapshot commands; counting requests per read")
        requests = asyncio.run(count_requests(args, cluster.file, written))
        doc["requests"] = [{**asdict(r), "mean": r.mean} for r in requests]
        for r in requests:
            _progress(f"  {r.label:16} {r.path:10} {r.mean:.2f} requests per read")
        exports = [start_export(cluster, root, name, "bench") for name in EXPORTS]
        started += exports
        results = measure(args, exports, root)
        doc["runs"] = {n: [asdict(s) for s in r[JOB.name]] for n, r in results.items()}
        medians = summarise(results)
        doc["median"] = {n: m[JOB.name] for n, m in medians.items()}
        text, verdicts = report(args, medians, results, requests)
        doc.update(verdicts)
        print()
        print(text, flush=True)
        failed = [
            e.label for e in exports if e.failed or any(s.error for s in results[e.name][JOB.name])
        ]
        if failed:
            print(f"\nFAILED runs or exports: {', '.join(failed)} (details above)")
        code = 1 if failed or verdicts["wrong_reads"] else 0
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        doc["error"] = str(exc)
    except (LaminaError, OSError) as exc:
        print(f"bench: the driver failed: {exc}", file=sys.stderr)
        doc["error"] = str(exc)
    except KeyboardInterrupt:
        print("\nbench: interrupted; cleaning up", file=sys.stderr)
        doc["error"] = "interrupted"
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
            print(f"\nresults written to {args.json}")
        _cleanup(args, root, cluster, started)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""NBD benchmark: ``lamina nbd`` against nbdkit and qemu-nbd, driven by the same fio jobs.

The script starts a local cluster (``lamina up``: one manager, two storage servers) in a
fresh temporary directory, creates two volumes of the working-set size (replicas 1 and
replicas 2, same stripe, 1 MiB pages) and exports each with its own ``lamina nbd``.  Beside
them, in the same directory, ``nbdkit file`` and ``qemu-nbd`` each export a raw file of the
same size: the baselines.  Every target is filled once with 1 MiB sequential writes, then
the fio jobs (``ioengine=nbd``) run against all targets, interleaved: run 1 of every job on
every target, then run 2, ...  The table shows medians.  See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lamina.clusterctl import format_size, parse_size
from lamina.errors import LaminaError
from lamina.localcluster import free_ports
from storage import (
    _background_load,
    _filesystem,
    _fmt,
    _machine_busy_seconds,
    _progress,
    _server_cpu_seconds,
    _table,
    cluster_options,
    host_info,
    load_lines,
    scratch_dir,
)

KIB = 1024
MIB = 1024 * KIB
#: fio's CPU use (fraction of one core) from which the client counts as saturated
SATURATED = 0.9
#: seconds a fio job may run past its runtime before it counts as hung and is killed
FIO_GRACE = 180.0
#: seconds a target gets to start listening, and to stop after SIGTERM
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
#: lines of a target's log shown when one of its fio runs fails
LOG_TAIL = 40
#: the targets set for lamina r2 over nbdkit (job name -> minimum ratio), bench/README.md
TARGET_RATIOS = {
    "randwrite-4k-qd16": 0.3,
    "randread-4k-qd16": 0.4,
    "seqwrite-1m-qd8": 0.15,
    "seqread-1m-qd8": 0.3,
}


@dataclass(frozen=True)
class Job:
    name: str
    label: str
    rw: str  # fio --rw
    bs: int
    iodepth: int

    @property
    def write(self) -> bool:
        return "write" in self.rw

    @property
    def unit(self) -> str:
        """IOPS for small operations, MB/s (10^6 bytes) for large ones."""
        return "MB/s" if self.bs >= MIB else "IOPS"


JOBS = (
    Job("randwrite-4k-qd1", "4 KiB random write, qd 1", "randwrite", 4 * KIB, 1),
    Job("randwrite-4k-qd16", "4 KiB random write, qd 16", "randwrite", 4 * KIB, 16),
    Job("randread-4k-qd1", "4 KiB random read, qd 1", "randread", 4 * KIB, 1),
    Job("randread-4k-qd16", "4 KiB random read, qd 16", "randread", 4 * KIB, 16),
    Job("seqwrite-1m-qd8", "1 MiB sequential write, qd 8", "write", MIB, 8),
    Job("seqread-1m-qd8", "1 MiB sequential read, qd 8", "read", MIB, 8),
)
JOBS_BY_NAME = {j.name: j for j in JOBS}
PREFILL = Job("prefill", "prefill: 1 MiB sequential write, qd 8, one pass", "write", MIB, 8)
TARGET_NAMES = ("lamina-r1", "lamina-r2", "nbdkit", "qemu-nbd")
LABELS = {
    "lamina-r1": "lamina r1",
    "lamina-r2": "lamina r2",
    "nbdkit": "nbdkit",
    "qemu-nbd": "qemu-nbd",
}


@dataclass
class Sample:
    """One fio run of one job on one target."""

    run: int
    iops: float | None = None
    mb_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    ios: int | None = None
    seconds: float | None = None  # fio's runtime of the job
    fio_cpu: float | None = None  # fraction of one core used by fio
    exporter_cpu: float | None = None  # the NBD server process (lamina nbd, nbdkit, qemu-nbd)
    storage_cpu: float | None = None  # both storage servers together (lamina only)
    manager_cpu: float | None = None  # the manager (lamina only)
    machine_cpu: float | None = None  # busy fraction of one core, all CPUs, over fio's wall time
    error: str | None = None
    fio: dict[str, Any] | None = None  # fio's JSON result of the job, as it printed it


class BenchError(Exception):
    pass


# --- the targets -----------------------------------------------------------------------------


def lamina_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lamina", *args]


@dataclass
class Target:
    """One NBD server under test: its command line, process, port and log."""

    name: str
    argv: list[str]
    log: Path
    port: int = 0  # 0: read from port_file once it is listening
    port_file: Path | None = None
    #: other processes whose CPU use is measured with this target's runs, by role
    helpers: dict[str, list[int]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    failed: str | None = None  # why the remaining runs are skipped

    @property
    def label(self) -> str:
        return LABELS[self.name]

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening():
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.label} exited with {self.proc.returncode} at start:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.label} did not listen within {START_TIMEOUT:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _listening(self) -> bool:
        if self.port_file is not None and not self.port:
            with contextlib.suppress(OSError, ValueError):
                self.port = int(self.port_file.read_text())
            return bool(self.port)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; the exit code (None: never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _progress(f"{self.label} ignored SIGTERM for {STOP_TIMEOUT:.0f} s; killing it")
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = LOG_TAIL) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(f"    {line}" for line in text[-lines:]) or "    (empty log)"


class Cluster:
    """The local cluster of ``lamina up`` in ``root``: 1 manager, 2 storage servers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.file = root / "cluster.toml"
        self.started = False

    def cli(self, *args: str, timeout: float = 120.0) -> str:
        proc = subprocess.run(
            lamina_cmd(*args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode:
            raise BenchError(
                f"`lamina {' '.join(args)}` failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    def up(self) -> None:
        self.started = True  # even a failed start may leave daemons behind
        self.cli("up", "--dir", str(self.root), "--managers", "1", "--servers", "2", "--json")

    def down(self) -> None:
        if self.started:
            self.cli("down", "--dir", str(self.root), "--json")

    def pids(self, prefix: str) -> list[int]:
        out = []
        for pid_file in sorted((self.root / "run").glob(f"{prefix}*.pid")):
            with contextlib.suppress(OSError, ValueError):
                out.append(int(pid_file.read_text()))
        return out

    def create_volume(self, name: str, size: int, replicas: int, stripe: int) -> None:
        self.cli(
            "volume", "create", name, "--size", str(size), "--replicas", str(replicas),
            "--stripe", str(stripe), "--cluster", str(self.file), "--json",
        )  # fmt: skip


def make_targets(args: argparse.Namespace, root: Path, cluster: Cluster | None) -> list[Target]:
    targets = []
    logs, run_dir = root / "log", root / "run"
    run_dir.mkdir(exist_ok=True)
    for name in args.targets:
        if name.startswith("lamina-"):
            assert cluster is not None
            volume = f"bench-{name.removeprefix('lamina-')}"
            replicas = int(name[-1])
            cluster.create_volume(volume, args.size, replicas, args.stripe)
            port_file = run_dir / f"nbd-{volume}.port"
            argv = lamina_cmd(
                "nbd", volume, "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                "--cluster", str(cluster.file),
            )  # fmt: skip
            helpers = {"storage": cluster.pids("s"), "manager": cluster.pids("m")}
            target = Target(
                name, argv, logs / f"nbd-{volume}.log", port_file=port_file, helpers=helpers
            )
        else:
            image = root / f"{name}.raw"
            with open(image, "wb") as f:
                f.truncate(args.size)
            port = free_ports(1)[0]
            if name == "nbdkit":
                argv = ["nbdkit", "--exit-with-parent", "-f", "-p", str(port), "-i",
                        "127.0.0.1", "file", str(image)]  # fmt: skip
            else:
                argv = ["qemu-nbd", "-f", "raw", "-x", "", "-b", "127.0.0.1", "-p", str(port),
                        "--persistent", "--shared=16", str(image)]  # fmt: skip
            target = Target(name, argv, logs / f"{name}.log", port=port)
        targets.append(target)
        target.start()
        _progress(f"{target.label}: pid {target.pid}, {target.uri}")
    return targets


# --- fio ---------------------------------------------------------------------------------------


def fio_argv(job: Job, uri: str, size: int, seconds: float | None, output: Path) -> list[str]:
    """The job as fio arguments.  ``--thread``: the job runs in fio's own process, so killing
    fio (timeout, Ctrl-C) leaves no job process behind."""
    argv = [
        "fio", f"--name={job.name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={job.rw}",
        f"--bs={job.bs}", f"--iodepth={job.iodepth}", f"--size={size}", "--norandommap",
        "--thread", "--lat_percentiles=1", "--percentile_list=50:90:99:99.9",
        "--output-format=json", f"--output={output}",
    ]  # fmt: skip
    if seconds is not None:
        argv += ["--time_based", f"--runtime={round(seconds * 1000)}ms"]
    return argv


def _percentile(lat: dict[str, Any], q: float) -> float | None:
    for key, value in lat.get("percentile", {}).items():
        if math.isclose(float(key), q):
            return float(value) / 1e6
    return None


def run_fio(
    target: Target, job: Job, size: int, seconds: float | None, run: int, scratch: Path
) -> Sample:
    """One fio run of ``job`` against ``target``, with the CPU use of the servers around it."""
    sample = Sample(run)
    output = scratch / "fio.json"
    output.unlink(missing_ok=True)
    argv = fio_argv(job, target.uri, size, seconds, output)
    timeout = (seconds + FIO_GRACE) if seconds is not None else 600 + size / 1e6
    pids = {"exporter": [target.pid], **target.helpers}
    cpu0 = {role: [_server_cpu_seconds(p) for p in ps] for role, ps in pids.items()}
    busy0, wall0 = _machine_busy_seconds(), time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        sample.error = f"fio did not finish within {timeout:.0f} s (killed): hung"
        return sample
    busy, wall = _machine_busy_seconds() - busy0, time.monotonic() - wall0
    cpu = {
        role: sum(_server_cpu_seconds(p) for p in ps) - sum(cpu0[role]) for role, ps in pids.items()
    }
    try:
        text = output.read_text()
        # the nbd engine's "fio: connected to NBD server" may precede the JSON document
        doc = json.loads(text[text.find("{") :])
        result: dict[str, Any] = doc["jobs"][0]
    except (OSError, ValueError, LookupError):
        result = {}
    if proc.returncode or not result or result.get("error"):
        errno = result.get("error")
        sample.error = (
            f"fio exited with {proc.returncode}"
            + (f", job error {errno} ({os.strerror(errno)})" if errno else "")
            + f"\n  fio stderr:\n{_indent(proc.stderr)}\n  fio stdout:\n{_indent(proc.stdout)}"
        )
        sample.fio = result or None
        return sample
    side = result["write" if job.write else "read"]
    runtime = side["runtime"] / 1e3
    sample.fio = result
    sample.iops = float(side["iops"])
    sample.mb_s = side["bw_bytes"] / 1e6
    sample.ios = int(side["total_ios"])
    sample.seconds = runtime
    sample.p50_ms = _percentile(side["lat_ns"], 50)
    sample.p99_ms = _percentile(side["lat_ns"], 99)
    sample.mean_ms = side["lat_ns"]["mean"] / 1e6
    sample.fio_cpu = (result["usr_cpu"] + result["sys_cpu"]) / 100
    if runtime > 0:
        sample.exporter_cpu = cpu["exporter"] / runtime
        if "storage" in cpu:
            sample.storage_cpu = cpu["storage"] / runtime
        if "manager" in cpu:
            sample.manager_cpu = cpu["manager"] / runtime
        sample.machine_cpu = busy / wall  # fio's start-up included: the machine as a whole
    return sample


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.strip().splitlines()) or "    (nothing)"


def _pids(pids: list[int]) -> str:
    return ", ".join(map(str, pids)) or "?"


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not found"
    lines = out.stdout.strip().splitlines()
    return lines[0] if lines else "?"


# --- orchestration -------------------------------------------------------------------------------


Results = dict[str, dict[str, list[Sample]]]  # target -> job -> samples, in run order


def _fail(target: Target, what: str, sample: Sample) -> None:
    """Report a failed run with the target's log; skip its remaining runs if it died."""
    _progress(f"FAILED: {what} on {target.label}: {sample.error}")
    _progress(f"  last lines of {target.log}:\n{target.log_tail()}")
    if not target.alive():
        assert target.proc is not None
        target.failed = f"the server exited with {target.proc.returncode}"
        _progress(f"  {target.label} has exited ({target.proc.returncode}); skipping its runs")


def bench(
    args: argparse.Namespace, targets: list[Target], scratch: Path
) -> tuple[dict[str, Sample], Results]:
    jobs = [JOBS_BY_NAME[n] for n in args.jobs]
    prefill: dict[str, Sample] = {}
    for t in targets:
        _progress(f"prefill {t.label}: {format_size(args.size)} of 1 MiB sequential writes")
        s = run_fio(t, PREFILL, args.size, None, 0, scratch)
        prefill[t.name] = s
        if s.error:
            _fail(t, "prefill", s)
            t.failed = t.failed or "prefill failed"
        else:
            _progress(f"  {s.mb_s:,.1f} MB/s in {s.seconds:.1f} s")
    results: Results = {t.name: {j.name: [] for j in jobs} for t in targets}
    for run in range(1, args.runs + 1):
        for job in jobs:
            for t in targets:
                if t.failed:
                    continue
                s = run_fio(t, job, args.size, args.seconds, run, scratch)
                results[t.name][job.name].append(s)
                if s.error:
                    _fail(t, f"run {run} of {job.name}", s)
                    continue
                value = s.mb_s if job.unit == "MB/s" else s.iops
                _progress(
                    f"run {run}/{args.runs} {job.name:17} {t.label:9} {value:>10,.1f} {job.unit:4}"
                    f"  p50 {s.p50_ms:.3f} ms  p99 {s.p99_ms:.3f} ms"
                    f"  server CPU {_fmt(s.exporter_cpu, '.0%')}"
                )
    return prefill, results


def _median(samples: list[Sample], attr: str) -> float | None:
    values = [getattr(s, attr) for s in samples if s.error is None]
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


MEDIAN_FIELDS = (
    "iops",
    "mb_s",
    "p50_ms",
    "p99_ms",
    "mean_ms",
    "fio_cpu",
    "exporter_cpu",
    "storage_cpu",
    "manager_cpu",
    "machine_cpu",
)


def summarise(results: Results) -> dict[str, dict[str, dict[str, float | None]]]:
    """target -> job -> field -> median over the runs that did not fail."""
    return {
        t: {j: {f: _median(samples, f) for f in MEDIAN_FIELDS} for j, samples in by_job.items()}
        for t, by_job in results.items()
    }


def _value(job: Job, med: dict[str, float | None]) -> float | None:
    return med["mb_s"] if job.unit == "MB/s" else med["iops"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(args: argparse.Namespace, medians: dict[str, dict[str, dict[str, float | None]]]) -> str:
    names = [t for t in TARGET_NAMES if t in medians]
    jobs = [JOBS_BY_NAME[n] for n in args.jobs]
    ratios = [t for t in ("lamina-r1", "lamina-r2") if t in medians and "nbdkit" in medians]
    latency = "lamina-r2" in medians
    header = ["workload", "unit", *(LABELS[t] for t in names)]
    header += [f"{t.removeprefix('lamina-')}/nbdkit" for t in ratios]
    if latency:
        header += ["r2 p50", "r2 p99"]
    rows = []
    for job in jobs:
        values = {t: _value(job, medians[t][job.name]) for t in names}
        spec = ",.1f" if job.unit == "MB/s" else ",.0f"
        row = [job.label, job.unit, *(_fmt(values[t], spec) for t in names)]
        row += [_fmt(_ratio(values[t], values["nbdkit"]), ".2f") for t in ratios]
        if latency:
            med = medians["lamina-r2"][job.name]
            row += [_fmt(med["p50_ms"], ".3f", " ms"), _fmt(med["p99_ms"], ".3f", " ms")]
        rows.append(row)
    cpu_header = ["workload"]
    for t in names:
        cpu_header += (
            [f"{LABELS[t]} nbd", f"{LABELS[t]} storage"] if t.startswith("lamina") else [LABELS[t]]
        )
    cpu_header += ["fio (max)"]
    cpu_rows = []
    saturated = []
    for job in jobs:
        row = [job.label]
        for t in names:
            med = medians[t][job.name]
            row.append(_fmt(med["exporter_cpu"], ".0%"))
            if t.startswith("lamina"):
                row.append(_fmt(med["storage_cpu"], ".0%"))
        fio = [c for t in names if (c := medians[t][job.name]["fio_cpu"]) is not None]
        row.append(_fmt(max(fio) if fio else None, ".0%"))
        if fio and max(fio) >= SATURATED:
            saturated.append(job.label)
        cpu_rows.append(row)
    cores = os.cpu_count() or 1
    lines = [
        f"Medians of {args.runs} run(s) of {args.seconds:g} s per job and target; IOPS for "
        "4 KiB jobs, MB/s (10^6 bytes) for 1 MiB jobs; latency from submission to completion, "
        "seen by fio:",
        "",
        _table(header, rows),
        "",
        f"CPU time / wall time of the servers during the runs (100% = one core, {cores} cores; "
        "'nbd' is the exporter process, 'storage' both storage servers together; medians):",
        "",
        _table(cpu_header, cpu_rows),
        "",
    ]
    if saturated:
        lines += [
            "WARNING: fio used 90% or more of a core during: "
            + ", ".join(saturated)
            + "; the numbers there may be limited by the client.",
            "",
        ]
    lines += _targets(medians)
    return "\n".join(lines)


def _targets(medians: dict[str, dict[str, dict[str, float | None]]]) -> list[str]:
    if "lamina-r2" not in medians or "nbdkit" not in medians:
        return ["targets: not checked (they need the lamina-r2 and nbdkit targets)"]
    out = ["targets (lamina r2 / nbdkit):"]
    for name, want in TARGET_RATIOS.items():
        if name not in medians["lamina-r2"]:
            continue
        job = JOBS_BY_NAME[name]
        ratio = _ratio(
            _value(job, medians["lamina-r2"][name]), _value(job, medians["nbdkit"][name])
        )
        verdict = "no result" if ratio is None else "met" if ratio >= want else "NOT met"
        out.append(f"  {job.label} >= {want:.2f}: {verdict} ({_fmt(ratio, '.2f')})")
    return out


def _names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}"
        )
    return [n for n in known if n in names]  # in the canonical order


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark lamina nbd against nbdkit and qemu-nbd with the same fio jobs."
    )
    p.add_argument("--seconds", type=float, default=20.0, help="duration of each fio job")
    p.add_argument("--runs", type=int, default=3, help="runs per job and target (medians)")
    p.add_argument("--size", default="1G", help="working set = volume and file size [1G]")
    p.add_argument(
        "--jobs",
        type=lambda s: _names(s, tuple(JOBS_BY_NAME), "job"),
        default=list(JOBS_BY_NAME),
        help=f"comma-separated subset of: {', '.join(JOBS_BY_NAME)}",
    )
    p.add_argument(
        "--targets",
        type=lambda s: _names(s, TARGET_NAMES, "target"),
        default=list(TARGET_NAMES),
        help=f"comma-separated subset of: {', '.join(TARGET_NAMES)}",
    )
    p.add_argument("--stripe", type=int, default=4, help="stripe of both lamina volumes [4]")
    cluster_options(p)
    args = p.parse_args(argv)
    try:
        args.size = parse_size(args.size, "--size")
    except LaminaError as exc:
        p.error(exc.message)
    if args.seconds <= 0 or args.runs < 1 or args.stripe < 1:
        p.error("--seconds, --runs and --stripe must be positive")
    if args.size < MIB or args.size % MIB:
        p.error("--size must be a whole number of MiB")
    return args


def _check_tools(targets: list[str]) -> None:
    need = ["fio"] + [t for t in ("nbdkit", "qemu-nbd") if t in targets]
    missing = [tool for tool in need if shutil.which(tool) is None]
    if missing:
        raise BenchError(f"{', '.join(missing)} not found; `make deps` installs them")
    if subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, check=False).returncode:
        raise BenchError("this fio has no nbd ioengine (it is built with libnbd on Debian)")


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _check_tools(args.targets)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    idle_load = _background_load()
    copies = sum(int(t[-1]) if t.startswith("lamina") else 1 for t in args.targets)
    root = scratch_dir("lamina-bench-nbd-", args.dir, copies * args.size + 512 * MIB)
    if root is None:
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    lamina = any(t.startswith("lamina") for t in args.targets)
    cluster = Cluster(root / "cluster") if lamina else None
    targets: list[Target] = []
    code = 1
    try:
        if cluster is not None:
            _progress(f"starting a local cluster in {cluster.root}: 1 manager, 2 storage servers")
            cluster.up()
        targets = make_targets(args, root, cluster)
        head = [
            f"lamina NBD benchmark: {platform.node()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}",
            f"tools: {_version(['fio', '--version'])}, {_version(['nbdkit', '--version'])}, "
            f"{_version(['qemu-nbd', '--version'])}",
            f"data: {root} on {_filesystem(root)} (cluster and files alike)",
        ]
        if cluster is not None:
            head.append(
                f"cluster: manager pid {_pids(cluster.pids('m'))}, storage server pids "
                f"{_pids(cluster.pids('s'))}; volumes: {format_size(args.size)}, "
                f"stripe {args.stripe}, 1 MiB pages"
            )
        head += [
            "targets: " + ", ".join(f"{t.label} (pid {t.pid}, {t.uri})" for t in targets),
            f"working set {format_size(args.size)}, {args.seconds:g} s x {args.runs} runs per "
            "job and target, interleaved, medians",
            *load_lines(idle_load),
        ]
        print("\n".join(head), flush=True)
        prefill, results = bench(args, targets, root)
        medians = summarise(results)
        print()
        print(report(args, medians), flush=True)
        if args.json:
            _write_json(args, root, idle_load, targets, prefill, results, medians)
        failed = [t.label for t in targets if t.failed] + [
            f"{t}/{j}"
            for t, by_job in results.items()
            for j, ss in by_job.items()
            if any(s.error for s in ss)
        ]
        if failed:
            print(f"\nFAILED runs or targets: {', '.join(failed)} (details above)")
        code = 1 if failed else 0
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nbench: interrupted; cleaning up", file=sys.stderr)
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        _cleanup(args, root, cluster, targets)
    return code


def _cleanup(
    args: argparse.Namespace, root: Path, cluster: Cluster | None, targets: list[Target]
) -> None:
    for t in reversed(targets):
        rc = t.stop()
        if rc not in (0, None, -signal.SIGTERM):
            _progress(f"{t.label} exited with {rc}; see {t.log}")
    if args.keep:
        print(f"data kept in {root}", file=sys.stderr)
        if cluster is not None and cluster.started:
            print(f"cluster left running: lamina down --dir {cluster.root}", file=sys.stderr)
        return
    if cluster is not None:
        try:
            cluster.down()
        except (BenchError, subprocess.TimeoutExpired) as exc:
            _progress(f"stopping the cluster failed: {exc}; data kept in {root}")
            return
    shutil.rmtree(root, ignore_errors=True)


def _write_json(
    args: argparse.Namespace,
    root: Path,
    idle_load: float,
    targets: list[Target],
    prefill: dict[str, Sample],
    results: Results,
    medians: dict[str, dict[str, dict[str, float | None]]],
) -> None:
    doc = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "host": host_info(
            root,
            idle_load,
            fio=_version(["fio", "--version"]),
            nbdkit=_version(["nbdkit", "--version"]),
            qemu_nbd=_version(["qemu-nbd", "--version"]),
        ),
        "targets": {
            t.name: {
                "argv": t.argv,
                "pid": t.pid,
                "uri": t.uri,
                "helpers": t.helpers,
                "failed": t.failed,
            }
            for t in targets
        },
        "jobs": {j: asdict(JOBS_BY_NAME[j]) for j in args.jobs},
        "prefill": {t: asdict(s) for t, s in prefill.items()},
        "median": medians,
        "runs": {
            t: {j: [asdict(s) for s in ss] for j, ss in bj.items()} for t, bj in results.items()
        },
    }
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())

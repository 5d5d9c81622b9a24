"""A migration never destroys a page of its source before the page's copies in the
target are durable: strace watches the real storage servers of a `lamina up` cluster
while `lamina volume migrate --wait` moves a flushed volume to two other servers.

For every page the source gives up (a hole punched in its layer file, or the whole file
unlinked once the layer leaves the map), each live target server must have written
that page into the target layer's file and then finished an fdatasync of that file
before the source let go of it.  Otherwise a power cut of the storage servers right
after the migration would read the page back as zeros (or not at all), although it was
flushed before the migration started: the second test does exactly that, with the
storage servers on the test-only disk that can lose power."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lamina.client import Cluster
from lamina.storage.powerloss import seed_keeping
from tests.integration.test_driver import volume_info
from tests.integration.test_faults import wait_quiet
from tests.integration.test_layers import wait_for
from tests.integration.test_powerloss import power_cut
from tests.integration.test_resync import scrub
from tests.integration.volumes import LocalCluster, local_cluster

pytestmark = pytest.mark.integration

PAGE = 64 * 1024
PAGES = 24

# 1733300000.123456 fdatasync(7</x/layers/5.data>) = 0 <0.000123>
LINE = re.compile(
    r"^(?P<t>\d+\.\d+) (?P<call>\w+)\((?P<args>.*)\) += (?P<ret>-?\d+)[^<]*<(?P<d>[\d.]+)>"
)
FD_PATH = re.compile(r"^\d+<(?P<path>[^>]*)>")


@dataclass
class Trace:
    """What one storage server did to the data files, from its strace output."""

    synced: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (begun, ended)
    written: dict[tuple[str, int], float] = field(default_factory=dict)  # (path, page) -> last
    punched: dict[tuple[str, int], float] = field(default_factory=dict)  # (path, page) -> first
    unlinked: dict[str, float] = field(default_factory=dict)  # path -> when


def parse(files: list[Path]) -> Trace:
    trace = Trace()
    for f in files:
        for raw in f.read_text(errors="replace").splitlines():
            match = LINE.match(raw)
            if match is None or int(match["ret"]) < 0:
                continue
            t, call, args = float(match["t"]), match["call"], match["args"]
            if call in ("unlink", "unlinkat"):
                path = args.split('"')[1] if '"' in args else ""
                trace.unlinked.setdefault(path, t)
                continue
            fd = FD_PATH.match(args)
            if fd is None:
                continue
            path = fd["path"]
            rest = [a.strip() for a in args.split(", ")]
            if call in ("fdatasync", "fsync"):
                trace.synced.setdefault(path, []).append((t, t + float(match["d"])))
            elif call == "pwrite64":
                offset = int(rest[-1])
                trace.written[(path, offset // PAGE)] = t
            elif call == "fallocate" and "PUNCH_HOLE" in rest[1]:
                offset = int(rest[2])
                trace.punched.setdefault((path, offset // PAGE), t)
    return trace


def durable_before(trace: Trace, path: str, page: int, deadline: float) -> bool:
    """Whether ``page`` of ``path`` was written, and an fdatasync of the file and one of
    the metadata log that began after that write both ended before ``deadline``."""
    wrote = trace.written.get((path, page))
    if wrote is None:
        return False

    def synced(paths: list[str]) -> bool:
        return any(
            begun > wrote and ended < deadline
            for p in paths
            for begun, ended in trace.synced.get(p, [])
        )

    logs = [p for p in trace.synced if re.search(r"/log\.\d+$", p)]
    return synced([path]) and synced(logs)  # the data, and the record that it is there


def strace(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """strace every thread of ``pid`` (data-file syscalls), one output file per thread;
    returns once it is attached."""
    err = out.with_suffix(".err")
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [
                "strace", "-f", "-ff", "-ttt", "-T", "-y", "-qq", "-s", "0",
                "-e", "trace=fdatasync,fsync,fallocate,pwrite64,unlink,unlinkat",
                "-o", str(out), "-p", str(pid),
            ],
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    threads = len(os.listdir(f"/proc/{pid}/task"))
    while len(list(out.parent.glob(out.name + ".*"))) < threads:
        assert proc.poll() is None, err.read_text()
        assert time.monotonic() < deadline, f"strace did not attach to {pid}: {err.read_text()}"
        time.sleep(0.05)
    return proc


def fill(lc: LocalCluster, name: str) -> bytes:
    """Write every page of volume ``name`` and flush; the bytes written."""
    data = b"".join(bytes([k + 1]) * PAGE for k in range(PAGES))

    async def main() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open(name)
            await vol.write(0, data)
            await vol.flush()
            await vol.close()

    asyncio.run(main())
    return data


def test_a_migration_tombstones_no_source_page_before_its_target_copies_are_durable(
    tmp_path: Path,
) -> None:
    """`volume migrate --wait` of a flushed volume from two storage servers to two
    others: every source page punched, and the source layer file unlinked, only after
    both target servers wrote that page and completed an fdatasync of the target file."""
    with local_cluster(tmp_path / "cluster", 1, 4) as lc:
        lc.create_volume("v", PAGES * PAGE, replicas=2, stripe=1, page_size=PAGE)
        fill(lc, "v")
        info = volume_info(lc, "v")
        (old,) = info["layers"]
        sources = sorted(old["placement"][0])
        targets = sorted({"s1", "s2", "s3", "s4"} - set(sources))
        traces = tmp_path / "traces"
        traces.mkdir()
        tracers = {sid: strace(lc.storage_pid(sid), traces / sid) for sid in sources + targets}
        try:
            moved = lc.cli("volume", "migrate", "v", "--servers", ",".join(targets), "--wait")
            assert moved.returncode == 0, moved.stderr
            # a server frees a page, and removes a dropped layer's file, once the record
            # saying so is durable: trace until the source files are gone
            files = [lc.root / sid / "layers" / f"{old['id']}.data" for sid in sources]
            wait_for("the source files to go", lambda: not any(f.exists() for f in files))
        finally:
            for proc in tracers.values():
                proc.send_signal(signal.SIGINT)
            for proc in tracers.values():
                proc.wait(30)
        (new,) = volume_info(lc, "v")["layers"]
        assert sorted(new["placement"][0]) == targets
        runs = {sid: parse(sorted(traces.glob(f"{sid}.*"))) for sid in tracers}
        old_file = f"layers/{old['id']}.data"
        new_file = f"layers/{new['id']}.data"
        given_up: dict[int, float] = {}  # page -> the first moment a source let it go
        for sid in sources:
            run = runs[sid]
            for (path, page), t in run.punched.items():
                if path.endswith(old_file):
                    given_up[page] = min(t, given_up.get(page, t))
            for path, t in run.unlinked.items():
                if path.endswith(old_file):
                    for page in range(PAGES):
                        given_up[page] = min(t, given_up.get(page, t))
        assert sorted(given_up) == list(range(PAGES)), f"the source kept pages: {given_up}"
        late = []
        for sid in targets:
            run = runs[sid]
            paths = {p for p, _ in run.written if p.endswith(new_file)}
            assert len(paths) == 1, f"{sid} wrote no page of layer {new['id']}: {run.written}"
            (path,) = paths
            late += [
                (sid, page)
                for page, t in sorted(given_up.items())
                if not durable_before(run, path, page, t)
            ]
        assert not late, f"source pages given up before their target copies were durable: {late}"


def test_a_power_cut_of_every_storage_server_right_after_a_migration_loses_nothing_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storage servers run on the disk that can lose power; a flushed volume migrates
        to two other servers (`volume migrate --wait`), and at once every server loses power,
        keeping none of what was not synced.  Restarted, the volume reads back as flushed, and
    a scrub finds its copies equal."""
    monkeypatch.setenv("LAMINA_TEST_POWERCUT", "1")
    monkeypatch.setenv("LAMINA_TEST_POWERCUT_SEED", str(seed_keeping(0.0, 0.0)))
    with local_cluster(tmp_path / "cluster", 1, 4) as lc:
        lc.create_volume("v", PAGES * PAGE, replicas=2, stripe=1, page_size=PAGE)
        data = fill(lc, "v")
        (old,) = volume_info(lc, "v")["layers"]
        targets = sorted({"s1", "s2", "s3", "s4"} - set(old["placement"][0]))
        moved = lc.cli("volume", "migrate", "v", "--servers", ",".join(targets), "--wait")
        assert moved.returncode == 0, moved.stderr
        power_cut(lc, ["s1", "s2", "s3", "s4"])
        assert sorted(lc.up(1, 4)["started"]) == ["s1", "s2", "s3", "s4"]
        wait_quiet(lc)
        got = read_all(lc, "v")
        wrong = [
            k
            for k in range(PAGES)
            if got[k * PAGE : (k + 1) * PAGE] != data[k * PAGE : (k + 1) * PAGE]
        ]
        zeros = [k for k in wrong if got[k * PAGE : (k + 1) * PAGE] == bytes(PAGE)]
        assert not wrong, f"pages flushed before the migration read wrong: {wrong} (zeros: {zeros})"
        report = scrub(lc, "v")
        assert (report["mismatches"], report["corrupt"], report["errors"]) == (0, 0, 0), report


def read_all(lc: LocalCluster, name: str) -> bytes:
    """The whole of volume ``name``, read by a read-only driver."""

    async def main() -> bytes:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open(name, read_only=True)
            got = await vol.read(0, vol.size)
            await vol.close()
            return got

    return asyncio.run(main())

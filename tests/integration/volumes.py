"""A real local cluster (`lamina up`), its volumes and `lamina nbd` exporters, for the
integration tests of the driver and the NBD export.  Everything runs as separate
processes and is reached over TCP; nothing is mocked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lamina.localcluster import down

MiB = 1 << 20


def lamina(
    *args: str, timeout: float = 120, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run the lamina CLI (after ``prefix``, e.g. ``ip netns exec NS``); the finished
    process (check its returncode yourself)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "lamina", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


class Exporter:
    """A running `lamina nbd VOLUME` process, on TCP (``port``) or a unix socket."""

    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, log: Path, socket: Path | None = None
    ) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.socket = socket

    @property
    def uri(self) -> str:
        if self.socket is not None:
            return f"nbd+unix:///?socket={self.socket}"
        return f"nbd://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class LocalCluster:
    """A cluster started with `lamina up` under ``root``.  Its CLI commands and exporters
    run after ``prefix`` (e.g. ``ip netns exec NS``: in a network namespace)."""

    def __init__(self, root: Path, prefix: tuple[str, ...] = ()) -> None:
        self.root = root
        self.prefix = prefix
        self.cluster_file = root / "cluster.toml"
        self._exporters: list[Exporter] = []
        self._n = 0

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return lamina(*args, "--cluster", str(self.cluster_file), timeout=timeout,
                      prefix=self.prefix)  # fmt: skip

    def up(self, managers: int = 1, servers: int = 2, *extra: str) -> dict[str, Any]:
        done = lamina(
            "up", "--dir", str(self.root), "--managers", str(managers),
            "--servers", str(servers), "--json", *extra,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        doc: dict[str, Any] = json.loads(done.stdout)
        return doc

    def down(self) -> None:
        for exporter in self._exporters:
            exporter.kill()
        if (self.root / "run").is_dir():
            down(self.root)

    def create_volume(
        self, name: str, size: int, replicas: int = 2, stripe: int = 2, page_size: int = 0
    ) -> dict[str, Any]:
        """Create volume ``name`` (``page_size`` 0: the default); its map entry."""
        extra = ("--page-size", str(page_size)) if page_size else ()
        done = self.cli(
            "volume", "create", name, "--size", str(size), "--replicas", str(replicas),
            "--stripe", str(stripe), *extra, "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        doc: dict[str, Any] = json.loads(done.stdout)
        return doc

    def export(
        self, volume: str, *extra: str, wait: bool = True, socket: Path | None = None
    ) -> Exporter:
        """Start `lamina nbd VOLUME --listen 127.0.0.1:0` (or ``--socket SOCKET``); returns
        once it accepts connections."""
        self._n += 1
        port_file = self.root / f"nbd-{volume}-{self._n}.port"
        log = self.root / f"nbd-{volume}-{self._n}.log"
        with contextlib.suppress(FileNotFoundError):
            port_file.unlink()
        if socket is None:
            where = ["--listen", "127.0.0.1:0", "--port-file", str(port_file)]
        else:
            where = ["--socket", str(socket)]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    *self.prefix, sys.executable, "-m", "lamina", "nbd", volume, *where,
                    "--cluster", str(self.cluster_file), *extra,
                ],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        exporter = Exporter(proc, 0, log, socket)
        self._exporters.append(exporter)
        if not wait:
            return exporter
        deadline = time.monotonic() + 60
        while not (port_file.exists() if socket is None else _accepts(socket)):
            if proc.poll() is not None:
                raise AssertionError(f"lamina nbd exited {proc.returncode}: {exporter.log_text()}")
            if time.monotonic() > deadline:
                exporter.kill()
                raise AssertionError(f"lamina nbd did not start: {exporter.log_text()}")
            time.sleep(0.05)
        if socket is None:
            exporter.port = int(port_file.read_text())
        return exporter

    def storage_pid(self, server_id: str) -> int:
        return int((self.root / "run" / f"{server_id}.pid").read_text())


def _accepts(path: Path) -> bool:
    """Whether a unix socket at ``path`` accepts a connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def local_cluster(
    root: Path, managers: int = 1, servers: int = 2, *extra: str
) -> Iterator[LocalCluster]:
    cluster = LocalCluster(root)
    try:
        cluster.up(managers, servers, *extra)
        yield cluster
    finally:
        cluster.down()


def random_file(path: Path, size: int, seed: int = 1) -> Path:
    """A file of ``size`` pseudo-random bytes (fast: one random block, varied)."""
    import random

    rnd = random.Random(seed)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, MiB)
            f.write(rnd.randbytes(n))
            left -= n
    os.sync()
    return path


#: the verified writer of the fault tests: random writes of 4-64 KiB, 8 in flight, each
#: block stamped with a crc32c that fio checks when it reads the region back
FIO_VERIFY = (
    "--rw=randwrite", "--bsrange=4k-64k", "--iodepth=8", "--verify=crc32c",
    "--verify_fatal=1", "--do_verify=1", "--thread", "--output-format=json",
)  # fmt: skip


def start_fio(
    uri: str, cwd: Path, *extra: str, prefix: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """Start fio's nbd engine on ``uri`` with ``FIO_VERIFY`` and ``extra`` (size, rate,
    --verify_only ...); its state files land in ``cwd``.  ``prefix`` goes before the
    command (e.g. ``ip netns exec NS``)."""
    return subprocess.Popen(
        [*prefix, "fio", "--name=verified", "--ioengine=nbd", f"--uri={uri}", *FIO_VERIFY,
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
    )  # fmt: skip


def finished(proc: subprocess.Popen[bytes], what: str, timeout: float) -> tuple[bytes, bytes]:
    """The output and error output of ``proc`` once it exits; killed, and the test failed,
    if it runs longer than ``timeout`` seconds."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(
            f"{what} did not finish in {timeout}s: {err.decode()[-2000:]}"
        ) from None


def fio_result(proc: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, Any]:
    """Wait for a fio job started by :func:`start_fio`; its one job's JSON result, after
    checking that fio exited 0 and the job reports no error."""
    out, err = finished(proc, "fio", timeout)
    text = err.decode(errors="replace")[-2000:] + out.decode(errors="replace")[-2000:]
    assert proc.returncode == 0, f"fio exited {proc.returncode}: {text}"
    assert b"{" in out, text
    doc = json.loads(out[out.index(b"{") :])
    (job,) = doc["jobs"]
    assert job["error"] == 0, f"fio job error {job['error']}: {text}"
    result: dict[str, Any] = job
    return result

"""Start and stop real lamina daemons on this machine (demo, tests, benchmarks).

Every daemon runs as its own process (``python -m lamina ...``), listens on 127.0.0.1 on
a port it picks itself and reports through a port file, so nothing races for ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lamina.errors import LaminaError, Unavailable
from lamina.wire import messages as m
from lamina.wire.connection import Client
from lamina.wire.handshake import load_key, write_new_key


@dataclass
class StorageProcess:
    """One `lamina storage` process and where to find it."""

    id: str
    data: Path
    key: Path
    log: Path
    port_file: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Start the process and return once it listens (its port file appeared)."""
        self.port_file.unlink(missing_ok=True)
        self.port_file.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        listen = f"127.0.0.1:{self.port}"
        args = [
            sys.executable, "-m", "lamina", "storage",
            "--id", self.id, "--listen", listen, "--data", str(self.data),
            "--key", str(self.key), "--port-file", str(self.port_file),
            *self.extra_args,
        ]  # fmt: skip
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise Unavailable(
                    f"storage server {self.id} exited with {self.proc.returncode}; "
                    f"see {self.log}:\n{self.log.read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise Unavailable(f"storage server {self.id} did not start within {timeout}s")
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait for a clean exit (SIGKILL after ``timeout``); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def ensure_key(path: Path) -> bytes:
    if path.exists():
        return load_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_new_key(path)


def storage_servers(
    root: Path, count: int, extra_args: list[str] | None = None
) -> list[StorageProcess]:
    """Descriptions of ``count`` storage servers s1..sN under ``root`` (not started)."""
    key = root / "cluster.key"
    return [
        StorageProcess(
            id=f"s{i}",
            data=root / f"s{i}",
            key=key,
            log=root / "log" / f"s{i}.log",
            port_file=root / "run" / f"s{i}.port",
            extra_args=list(extra_args or []),
        )
        for i in range(1, count + 1)
    ]


async def ping(addr: str, key: bytes, timeout: float = 5.0) -> m.PingResponse:
    host, _, port = addr.rpartition(":")
    client = await Client.connect(
        host, int(port), key, peer=f"lamina-cli/{os.getpid()}", timeout=timeout
    )
    try:
        async with asyncio.timeout(timeout):
            reply = await client.call(m.PingRequest())
    except TimeoutError:
        raise Unavailable(f"{addr} did not answer PING within {timeout}s") from None
    finally:
        client.close()
    if not isinstance(reply, m.PingResponse):
        raise LaminaError(f"unexpected answer to PING from {addr}")
    return reply

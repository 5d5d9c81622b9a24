"""Start and stop real lamina daemons on this machine (demo, tests, benchmarks).

Every daemon runs as its own process (``python -m lamina ...``), listens on 127.0.0.1 on
a port it picks itself and reports through a port file, so nothing races for ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamina import durable
from lamina.errors import LaminaError, LocalError, Unavailable
from lamina.wire import messages as m
from lamina.wire.connection import Client
from lamina.wire.handshake import load_key, write_new_key


class _Daemon:
    """Starting, signalling and stopping one daemon process (shared by both kinds)."""

    id: str
    log: Path
    port_file: Path
    proc: subprocess.Popen[bytes] | None
    port: int
    detach: bool  # its own session: it outlives the command that started it

    def _launch(self, args: list[str], what: str, timeout: float) -> None:
        """Start ``python -m lamina ARGS`` and return once its port file appeared."""
        self.port_file.unlink(missing_ok=True)
        self.port_file.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lamina", *args],
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=self.detach,
            )
        _wait_for_port_file(self.proc, self.port_file, self.log, what, timeout)
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


@dataclass
class StorageProcess(_Daemon):
    """One `lamina storage` process and where to find it."""

    id: str
    data: Path
    key: Path
    log: Path
    port_file: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    detach: bool = False

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Start the process and return once it listens (its port file appeared)."""
        args = [
            "storage", "--id", self.id, "--listen", f"127.0.0.1:{self.port}",
            "--data", str(self.data), "--key", str(self.key),
            "--port-file", str(self.port_file), *self.extra_args,
        ]  # fmt: skip
        self._launch(args, f"storage server {self.id}", timeout)


@dataclass
class ManagerProcess(_Daemon):
    """One `lamina manager` process: its HTTP API port comes through a port file."""

    id: str
    data: Path
    key: Path
    log: Path
    port_file: Path
    raft: str
    peers: list[str]
    storage_listen: str = ""  # where storage servers ask for leases (wire protocol)
    lease_duration: float = 3.0
    session_timeout: float = 10.0  # seconds a lock's session may go without keepalive
    rereplicate_after: float = 600.0  # seconds a server stays down before re-replication
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    detach: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        args = [
            "manager", "--id", self.id, "--listen", f"127.0.0.1:{self.port}",
            "--raft", self.raft, "--peers", ",".join(self.peers), "--data", str(self.data),
            "--key", str(self.key), "--port-file", str(self.port_file),
            "--lease-duration", str(self.lease_duration),
            "--session-timeout", str(self.session_timeout),
            "--rereplicate-after", str(self.rereplicate_after),
        ]  # fmt: skip
        if self.storage_listen:
            args += ["--storage-listen", self.storage_listen]
        self._launch(args, f"manager {self.id}", timeout)


def _wait_for_port_file(
    proc: subprocess.Popen[bytes], port_file: Path, log: Path, what: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None:
            raise Unavailable(
                f"{what} exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise Unavailable(f"{what} did not start within {timeout}s")
        time.sleep(0.02)


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (for Raft addresses, which must be known upfront)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def managers(
    root: Path, count: int, lease_duration: float = 3.0, session_timeout: float = 10.0
) -> list[ManagerProcess]:
    """Descriptions of ``count`` managers m1..mN under ``root`` (not started)."""
    ports = free_ports(2 * count)
    raft = [f"127.0.0.1:{p}" for p in ports[:count]]
    storage = [f"127.0.0.1:{p}" for p in ports[count:]]
    return [
        ManagerProcess(
            id=f"m{i}",
            data=root / f"m{i}",
            key=root / "cluster.key",
            log=root / "log" / f"m{i}.log",
            port_file=root / "run" / f"m{i}.port",
            raft=raft[i - 1],
            peers=raft,
            storage_listen=storage[i - 1],
            lease_duration=lease_duration,
            session_timeout=session_timeout,
        )
        for i in range(1, count + 1)
    ]


def ensure_token(path: Path) -> str:
    """The admin token beside the cluster key, created (0600) if missing."""
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_hex(24)
    durable.create_new(path, (token + "\n").encode())
    return token


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


# --- `lamina up` / `lamina down`: a local cluster of background daemons -----------------

LAYOUT_FILE = "layout.json"


@dataclass(frozen=True)
class Layout:
    """Which daemons a local cluster has and where they listen (kept in run/layout.json,
    so a second `lamina up` restarts them on the same addresses)."""

    managers: tuple[tuple[str, int, str, int], ...]  # id, API port, raft address, lease port
    servers: tuple[tuple[str, int], ...]  # id, port

    def to_json(self) -> str:
        return json.dumps(
            {
                "managers": [list(m) for m in self.managers],
                "servers": [list(s) for s in self.servers],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Layout:
        try:
            d = json.loads(text)
            return cls(
                tuple((str(i), int(p), str(r), int(w)) for i, p, r, w in d["managers"]),
                tuple((str(i), int(p)) for i, p in d["servers"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise LocalError(f"unreadable cluster layout: {exc}") from None

    @classmethod
    def new(cls, n_managers: int, n_servers: int) -> Layout:
        ports = free_ports(3 * n_managers + n_servers)
        raft = [f"127.0.0.1:{p}" for p in ports[n_managers : 2 * n_managers]]
        lease = ports[2 * n_managers : 3 * n_managers]
        return cls(
            tuple((f"m{i + 1}", ports[i], raft[i], lease[i]) for i in range(n_managers)),
            tuple((f"s{i + 1}", ports[3 * n_managers + i]) for i in range(n_servers)),
        )


def _pid_alive(pid_file: Path, daemon_id: str) -> int | None:
    """The pid in ``pid_file`` if that process is a lamina daemon with this id."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if b"lamina" in b" ".join(cmdline) and daemon_id.encode() in cmdline:
        return pid
    return None


def http_json(
    base: str, method: str, path: str, body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    """One JSON call to a manager's API: (HTTP status, decoded body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@dataclass
class UpReport:
    started: list[str]
    running: list[str]
    registered: list[str]
    leader: str


def up(
    root: Path,
    n_managers: int = 3,
    n_servers: int = 3,
    say: Callable[[str], None] = print,
    session_timeout: float = 10.0,
    rereplicate_after: float = 600.0,
) -> UpReport:
    """Start whatever daemons of the local cluster under ``root`` are not running, register
    the storage servers with the managers and write ``cluster.toml``; return once a
    leader answers and every storage server answers PING.  ``session_timeout`` is given to
    the managers started now (volume locks, see :mod:`lamina.mgmt.sessions`)."""
    root = root.resolve()
    (root / "run").mkdir(parents=True, exist_ok=True)
    key = ensure_key(root / "cluster.key")
    token = ensure_token(root / "admin.token")
    layout_path = root / "run" / LAYOUT_FILE
    if layout_path.exists():
        layout = Layout.from_json(layout_path.read_text())
        if (len(layout.managers), len(layout.servers)) != (n_managers, n_servers):
            raise LocalError(
                f"the cluster in {root} has {len(layout.managers)} managers and "
                f"{len(layout.servers)} storage servers; run `lamina down` and remove {root} "
                "to make a different one"
            )
    else:
        layout = Layout.new(n_managers, n_servers)
        durable.replace(layout_path, layout.to_json().encode())
    started: list[str] = []
    running: list[str] = []
    raft_peers = [r for _, _, r, _ in layout.managers]
    urls = [f"http://127.0.0.1:{port}" for _, port, _, _ in layout.managers]
    for mid, port, raft, lease_port in layout.managers:
        if _pid_alive(root / "run" / f"{mid}.pid", mid):
            running.append(mid)
            continue
        mp = ManagerProcess(
            id=mid, data=root / mid, key=root / "cluster.key", log=root / "log" / f"{mid}.log",
            port_file=root / "run" / f"{mid}.port", raft=raft, peers=raft_peers, port=port,
            storage_listen=f"127.0.0.1:{lease_port}", session_timeout=session_timeout,
            rereplicate_after=rereplicate_after, detach=True,
        )  # fmt: skip
        say(f"starting manager {mid} (API {mp.url}, raft {raft})")
        mp.start()
        assert mp.proc is not None
        (root / "run" / f"{mid}.pid").write_text(f"{mp.proc.pid}\n")
        started.append(mid)
    leader = _wait_leader(urls, timeout=30.0)
    say(f"managers agree on leader {leader}")
    manager_addrs = ",".join(f"127.0.0.1:{lease_port}" for *_, lease_port in layout.managers)
    for sid, port in layout.servers:
        if _pid_alive(root / "run" / f"{sid}.pid", sid):
            running.append(sid)
            continue
        sp = StorageProcess(
            id=sid, data=root / sid, key=root / "cluster.key", log=root / "log" / f"{sid}.log",
            port_file=root / "run" / f"{sid}.port", port=port,
            extra_args=["--managers", manager_addrs], detach=True,
        )  # fmt: skip
        say(f"starting storage server {sid} on {sp.addr}")
        sp.start()
        assert sp.proc is not None
        (root / "run" / f"{sid}.pid").write_text(f"{sp.proc.pid}\n")
        started.append(sid)
    registered = _register_servers(urls, token, layout, root)
    for sid in registered:
        say(f"registered storage server {sid} with the managers")
    for sid, port in layout.servers:
        _wait_lease(sid, f"127.0.0.1:{port}", key, timeout=20.0)
        say(f"storage server {sid} holds a lease")
    _write_cluster_file(root, urls)
    return UpReport(started, running, registered, leader)


def _wait_lease(sid: str, addr: str, key: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        reply = asyncio.run(ping(addr, key))
        if reply.lease_valid:
            return
        if time.monotonic() > deadline:
            raise Unavailable(f"storage server {sid} got no lease within {timeout:.0f}s")
        time.sleep(0.1)


def _wait_leader(urls: list[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last = "no manager answered"
    while time.monotonic() < deadline:
        for url in urls:
            try:
                _, status = http_json(url, "GET", "/api/v1/status")
            except (OSError, ValueError) as exc:
                last = f"{url}: {exc}"
                continue
            leader = status.get("raft", {}).get("leader")
            if leader and status["raft"].get("has_quorum"):
                return str(leader)
            last = f"{url}: no leader yet"
        time.sleep(0.2)
    raise Unavailable(f"the managers elected no leader within {timeout:.0f}s ({last})")


def _register_servers(urls: list[str], token: str, layout: Layout, root: Path) -> list[str]:
    capacity = os.statvfs(root).f_blocks * os.statvfs(root).f_frsize
    done = []
    for sid, port in layout.servers:
        for attempt in range(50):
            url = urls[attempt % len(urls)]
            try:
                status, body = http_json(url, "GET", "/api/v1/servers")
                if status != 200:  # e.g. 503: a manager that has not caught up yet
                    time.sleep(0.2)
                    continue
                if any(s["id"] == sid for s in body):
                    break
                status, body = http_json(
                    url, "POST", "/api/v1/servers",
                    {"id": sid, "addr": f"127.0.0.1:{port}", "capacity": capacity}, token,
                )  # fmt: skip
            except (OSError, ValueError):
                time.sleep(0.2)
                continue
            if status == 201:
                done.append(sid)
                break
            if status in (400, 401, 409):
                raise LocalError(f"registering {sid} failed: {body.get('message', body)}")
            time.sleep(0.2)
        else:
            raise Unavailable(f"could not register storage server {sid} with the managers")
    return done


def _write_cluster_file(root: Path, urls: list[str]) -> None:
    text = (
        "# Written by `lamina up`: how clients find this cluster.\n"
        "[cluster]\n"
        f"managers = [{', '.join(json.dumps(u) for u in urls)}]\n"
        'key = "cluster.key"\n'
        'admin_token = "admin.token"\n'
    )
    durable.replace(root / "cluster.toml", text.encode())


def down(root: Path, timeout: float = 15.0) -> list[str]:
    """Stop every daemon of the local cluster under ``root`` (SIGTERM, then SIGKILL)."""
    root = root.resolve()
    stopped = []
    pids: dict[str, int] = {}
    for pid_file in sorted((root / "run").glob("*.pid")):
        daemon_id = pid_file.stem
        pid = _pid_alive(pid_file, daemon_id)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            pids[daemon_id] = pid
        else:
            pid_file.unlink(missing_ok=True)
    deadline = time.monotonic() + timeout
    for daemon_id, pid in pids.items():
        while (
            _pid_alive(root / "run" / f"{daemon_id}.pid", daemon_id) and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        if _pid_alive(root / "run" / f"{daemon_id}.pid", daemon_id):
            os.kill(pid, signal.SIGKILL)
        (root / "run" / f"{daemon_id}.pid").unlink(missing_ok=True)
        stopped.append(daemon_id)
    return stopped

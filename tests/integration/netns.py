"""A local cluster spread over network namespaces, so one storage server can be cut off
from the managers while the client still reaches it.

Three namespaces, made for the test and removed after it; every address lives inside
them (nothing is added to the host's own network):

- ``client`` (10.213.0.1 on a bridge): storage server s1, `lamina nbd`, fio and every
  CLI command of the test;
- ``managers`` (10.213.0.2): the manager m1;
- ``server`` (10.213.0.3): storage server s2.

The bridge joins the three.  :meth:`Namespaces.cut` parts s2 from the managers (or from
the client namespace) both ways, and :meth:`Namespaces.heal` joins them again: cut from
the managers, s2 can neither renew its lease nor be reached by the manager, while s1,
the exporter and the CLI reach both.  Ports are fixed: each namespace starts with no
sockets of its own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.localcluster import ensure_key, ensure_token
from tests.integration.volumes import LocalCluster, lamina

SUBNET = "10.213.0"
CLIENT, MANAGERS, SERVER = f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.3"
API, RAFT, LEASE, STORAGE = 7300, 7301, 7302, 7400


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"


class Namespaces:
    """The three namespaces (named after this process, so parallel runs do not meet)."""

    def __init__(self) -> None:
        tag = f"lam{os.getpid()}"
        self.client, self.managers, self.server = f"{tag}c", f"{tag}m", f"{tag}s"
        self.made: list[str] = []

    def run_in(self, ns: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", ns)

    def create(self) -> None:
        for ns in (self.client, self.managers, self.server):
            done = subprocess.run(
                ["ip", "netns", "add", ns], capture_output=True, text=True, timeout=30, check=False
            )
            if done.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {done.stderr.strip()}")
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        c = self.client
        ip("-n", c, "link", "add", "br0", "type", "bridge")
        ip("-n", c, "addr", "add", f"{CLIENT}/24", "dev", "br0")
        ip("-n", c, "link", "set", "br0", "up")
        for port, ns, addr in (("vm", self.managers, MANAGERS), ("vs", self.server, SERVER)):
            ip("-n", c, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", c, "link", "set", port, "master", "br0")
            ip("-n", c, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        # in s2's namespace the rules of a cut come before the local table (pref 0 by
        # default), which would otherwise take every packet addressed to s2
        ip("-n", self.server, "rule", "add", "pref", "100", "lookup", "local")
        ip("-n", self.server, "rule", "del", "pref", "0")

    def cut(self, peer: str = MANAGERS, *, one_way: bool = False) -> None:
        """Drop the packets between s2 and ``peer`` (MANAGERS, or CLIENT: the exporter, the
        CLI and s1) in s2's namespace: those from ``peer`` as they arrive (the peer's TCP
        sees only silence and retransmits until healed) and, unless ``one_way``, those s2
        sends to ``peer`` (a blackhole route)."""
        ip("-n", self.server, "rule", "add", "pref", "10", "from", peer, "iif", "eth0",
           "blackhole")  # fmt: skip
        if not one_way:
            ip("-n", self.server, "route", "add", "blackhole", f"{peer}/32")

    def heal(self, peer: str = MANAGERS, *, one_way: bool = False) -> None:
        ip("-n", self.server, "rule", "del", "pref", "10")
        if not one_way:
            ip("-n", self.server, "route", "del", "blackhole", f"{peer}/32")

    def remove(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
        self.made.clear()


class NetnsCluster(LocalCluster):
    """One manager and two storage servers started by hand in :class:`Namespaces`, with
    the run/ pid files `lamina up` writes, so :meth:`LocalCluster.down` stops them."""

    def __init__(self, root: Path, nets: Namespaces) -> None:
        super().__init__(root, nets.run_in(nets.client))
        self.nets = nets

    def _daemon(self, ns: str, daemon_id: str, *args: str) -> None:
        run = self.root / "run"
        port_file = run / f"{daemon_id}.port"
        port_file.unlink(missing_ok=True)
        with (self.root / "log" / f"{daemon_id}.log").open("ab") as log:
            proc = subprocess.Popen(
                [*self.nets.run_in(ns), sys.executable, "-m", "lamina", *args,
                 "--id", daemon_id, "--key", str(self.root / "cluster.key"),
                 "--data", str(self.root / daemon_id), "--port-file", str(port_file)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        (run / f"{daemon_id}.pid").write_text(f"{proc.pid}\n")  # `ip netns exec` execs it
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert proc.poll() is None, f"{daemon_id} exited {proc.returncode}"
            assert time.monotonic() < deadline, f"{daemon_id} did not start"
            time.sleep(0.05)

    def _until(self, what: str, *args: str, want: str = "") -> None:
        deadline = time.monotonic() + 30
        while (done := self.cli(*args)).returncode != 0 or want not in done.stdout:
            assert time.monotonic() < deadline, f"{what}: {done.stdout} {done.stderr}"
            time.sleep(0.2)

    def start(self) -> None:
        nets = self.nets
        for sub in ("run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ensure_key(self.root / "cluster.key")
        ensure_token(self.root / "admin.token")
        self.cluster_file.write_text(
            f'[cluster]\nmanagers = ["http://{MANAGERS}:{API}"]\n'
            'key = "cluster.key"\nadmin_token = "admin.token"\n'
        )
        raft = f"{MANAGERS}:{RAFT}"
        self._daemon(nets.managers, "m1", "manager", "--listen", f"{MANAGERS}:{API}",
                     "--raft", raft, "--peers", raft, "--storage-listen", f"{MANAGERS}:{LEASE}",
                     "--lease-duration", "3")  # fmt: skip
        self._until("a leader", "status", "--json", want='"is_leader": true')
        for sid, ns, host in (("s1", nets.client, CLIENT), ("s2", nets.server, SERVER)):
            self._daemon(ns, sid, "storage", "--listen", f"{host}:{STORAGE}",
                         "--managers", f"{MANAGERS}:{LEASE}")  # fmt: skip
            done = self.cli("server", "add", sid, "--addr", f"{host}:{STORAGE}", "--capacity", "1G")
            assert done.returncode == 0, done.stderr
        for host in (CLIENT, SERVER):
            self.wait_lease(host, True)

    def lease_of(self, host: str) -> bool:
        """Whether the storage server at ``host`` says it holds a lease (asked by PING
        from the client's namespace)."""
        key = str(self.root / "cluster.key")
        done = lamina("ping", f"{host}:{STORAGE}", "--key", key, "--json", prefix=self.prefix)
        assert done.returncode == 0, done.stderr
        return '"lease": true' in done.stdout

    def wait_lease(self, host: str, held: bool, timeout: float = 20) -> float:
        start = time.monotonic()
        while self.lease_of(host) != held:
            assert time.monotonic() - start < timeout, f"{host}: lease still {not held}"
            time.sleep(0.2)
        return time.monotonic() - start


@contextlib.contextmanager
def netns_cluster(root: Path) -> Iterator[NetnsCluster]:
    """A :class:`NetnsCluster` under ``root``; skips the test where namespaces cannot be
    made (no ``ip``, no privilege)."""
    if subprocess.run(["which", "ip"], capture_output=True, check=False).returncode != 0:
        pytest.skip("the ip command is not installed")
    nets = Namespaces()
    cluster = None
    try:
        nets.create()
        cluster = NetnsCluster(root, nets)
        cluster.start()
        yield cluster
    finally:
        if cluster is not None:
            cluster.down()
        nets.remove()

"""Storage-server leases with real managers and storage servers: failure marking,
restart, publication, and I/O refused once a lease lapses."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lamina.errors import NoLease, StaleEpoch
from lamina.localcluster import (
    ManagerProcess,
    StorageProcess,
    ensure_key,
    ensure_token,
    http_json,
    managers,
    ping,
)
from lamina.wire import messages as m
from tests.integration.support import PAGE_SIZE, connect, run

pytestmark = pytest.mark.integration
LEASE = 2.5
GiB = 1 << 30


@dataclass
class Managed:
    root: Path
    key: bytes
    token: str
    managers: list[ManagerProcess]
    servers: list[StorageProcess]

    @property
    def url(self) -> str:
        return next(p for p in self.managers if p.alive()).url

    def map(self) -> dict[str, Any]:
        for p in self.managers:
            if p.alive():
                status, body = http_json(p.url, "GET", "/api/v1/map?current=1")
                if status == 200:
                    return dict(body)
        raise AssertionError("no manager answers")

    def state(self, sid: str) -> str:
        return str(self.map()["servers"][sid]["state"])


def wait_for(check: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def leased(proc: StorageProcess, key: bytes) -> bool:
    return run(ping(proc.addr, key)).lease_valid


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Managed]:
    key = ensure_key(tmp_path / "cluster.key")
    token = ensure_token(tmp_path / "admin.token")
    mgrs = managers(tmp_path, 3, lease_duration=LEASE)
    lease_addrs = ",".join(p.storage_listen for p in mgrs)
    servers = [
        StorageProcess(
            id=f"s{i}",
            data=tmp_path / f"s{i}",
            key=tmp_path / "cluster.key",
            log=tmp_path / "log" / f"s{i}.log",
            port_file=tmp_path / "run" / f"s{i}.port",
            extra_args=["--managers", lease_addrs],
        )
        for i in (1, 2)
    ]
    c = Managed(tmp_path, key, token, mgrs, servers)
    try:
        for p in mgrs:
            p.start()
        for s in servers:
            s.start()
            wait_for(lambda s=s: http_json(c.url, "POST", "/api/v1/servers",
                                           {"id": s.id, "addr": s.addr, "capacity": GiB},
                                           token)[0] == 201, f"registering {s.id}")  # fmt: skip
        for s in servers:
            wait_for(lambda s=s: leased(s, key), f"a lease for {s.id}")
        yield c
    finally:
        procs: list[StorageProcess | ManagerProcess] = [*servers, *mgrs]
        for proc in procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGCONT)
            proc.stop()


def test_a_leased_server_serves_and_learns_the_epoch(cluster: Managed) -> None:
    """A managed storage server holds a lease, knows the map's epoch and fences, and serves."""
    status, vol = http_json(
        cluster.url, "POST", "/api/v1/volumes",
        {"name": "db", "size": GiB, "replicas": 2, "stripe": 2}, cluster.token,
    )  # fmt: skip
    assert status == 201, vol
    wait_for(lambda: (x := cluster.map())["published_epoch"] == x["epoch"], "publication")
    epoch = cluster.map()["volumes"]["db"]["fence_epoch"]  # the latest fence of the volume
    s1 = cluster.servers[0]
    reply = wait_for(lambda: (r := run(ping(s1.addr, cluster.key))).epoch >= epoch and r, "epoch")
    assert reply.lease_valid

    async def io() -> bytes:
        client = await connect(s1, cluster.key)
        try:
            layer = vol["layers"][0]["id"]
            stale = m.WriteRequest(vol["id"], epoch - 1, layer, 0, PAGE_SIZE, 0, m.FULL_MASK,
                                   m.FULL_MASK, False)  # fmt: skip
            with pytest.raises(StaleEpoch):
                await client.call(stale, bytes(PAGE_SIZE))
            write = m.WriteRequest(vol["id"], epoch, layer, 0, PAGE_SIZE, 0, m.FULL_MASK,
                                   m.FULL_MASK, False)  # fmt: skip
            await client.call(write, b"x" * PAGE_SIZE)
            _, data = await client.call_with_payload(
                m.ReadRequest(vol["id"], epoch, layer, 0, PAGE_SIZE, 0, 4)
            )
            return bytes(data)
        finally:
            client.close()

    assert run(io()) == b"xxxx"


def test_kill_9_marks_down_only_after_the_lease_and_restart_recovers(cluster: Managed) -> None:
    """kill -9 of a storage server: `down` no sooner than its lease could last, the epoch
    is then published without it; restarted, it comes back `recovering`."""
    http_json(cluster.url, "POST", "/api/v1/volumes", {"name": "v", "size": GiB}, cluster.token)
    s2 = cluster.servers[1]
    killed = time.monotonic()
    s2.kill()
    wait_for(lambda: cluster.state("s2") == "down", "s2 marked down")
    assert time.monotonic() - killed >= LEASE * 0.4  # never before its lease could be over
    mp = cluster.map()
    wait_for(lambda: (x := cluster.map())["published_epoch"] == x["epoch"], "publication")
    assert mp["servers"]["s1"]["state"] == "up"
    s2.start()
    wait_for(lambda: cluster.state("s2") == "recovering", "s2 recovering")


def test_a_server_cut_off_from_the_managers_refuses_io_once_its_lease_lapses(
    cluster: Managed,
) -> None:
    """With every manager paused (SIGSTOP), a storage server refuses data requests with
    NO_LEASE after its lease; when they resume it is granted one again and serves."""
    s1 = cluster.servers[0]
    for p in cluster.managers:
        assert p.proc is not None
        p.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: not leased(s1, cluster.key), "the lease to lapse", timeout=LEASE * 4)

        async def read() -> None:
            client = await connect(s1, cluster.key)
            try:
                await client.call(m.ReadRequest(1, 10**6, 1, 0, PAGE_SIZE, 0, 4))
            finally:
                client.close()

        with pytest.raises(NoLease):
            run(read())
    finally:
        for p in cluster.managers:
            assert p.proc is not None
            p.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: leased(s1, cluster.key), "a new lease", timeout=30)


def test_publication_waits_for_a_paused_server_until_its_lease_is_over(cluster: Managed) -> None:
    """A change to a volume on a SIGSTOPped storage server is not published (clients keep
    the older map) until that server's lease is certainly over; then it is."""
    status, vol = http_json(
        cluster.url, "POST", "/api/v1/volumes",
        {"name": "v", "size": GiB, "replicas": 2, "stripe": 2}, cluster.token,
    )  # fmt: skip
    assert status == 201, vol
    wait_for(lambda: (x := cluster.map())["published_epoch"] == x["epoch"], "first publication")
    s2 = cluster.servers[1]
    assert s2.proc is not None
    s2.proc.send_signal(signal.SIGSTOP)
    paused = time.monotonic()
    status, grown = http_json(
        cluster.url, "PATCH", "/api/v1/volumes/v", {"size": 2 * GiB}, cluster.token
    )
    assert status == 200, grown
    changed = grown["fence_epoch"]
    while time.monotonic() < paused + LEASE * 0.4:  # s2 may still hold its lease
        _, published = http_json(cluster.url, "GET", "/api/v1/map")
        assert published["published_epoch"] < changed
        assert published["volumes"]["v"]["size"] == GiB  # clients still see the old map
        status, _ = http_json(cluster.url, "GET", f"/api/v1/map?min_epoch={changed}")
        assert status == 503
        time.sleep(0.05)
    wait_for(lambda: cluster.map()["published_epoch"] >= changed, "publication without s2")
    assert time.monotonic() - paused >= LEASE * 0.4
    _, published = http_json(cluster.url, "GET", f"/api/v1/map?min_epoch={changed}")
    assert published["volumes"]["v"]["size"] == 2 * GiB


def test_deleting_a_volume_reclaims_its_space_and_fences_late_writers(cluster: Managed) -> None:
    """After `volume delete`, the leader has every storage server drop the volume's layer
    (its file goes) and a writer still using the old map is refused STALE."""
    status, vol = http_json(
        cluster.url, "POST", "/api/v1/volumes",
        {"name": "gone", "size": GiB, "replicas": 2, "stripe": 1}, cluster.token,
    )  # fmt: skip
    assert status == 201, vol
    wait_for(lambda: (x := cluster.map())["published_epoch"] == x["epoch"], "publication")
    epoch = cluster.map()["volumes"]["gone"]["fence_epoch"]
    layer = vol["layers"][0]["id"]
    s1 = cluster.servers[0]
    wait_for(lambda: run(ping(s1.addr, cluster.key)).epoch >= epoch, "the epoch at s1")
    write = m.WriteRequest(
        vol["id"], epoch, layer, 0, PAGE_SIZE, 0, m.FULL_MASK, m.FULL_MASK, False
    )

    async def send() -> None:
        client = await connect(s1, cluster.key)
        try:
            await client.call(write, b"y" * PAGE_SIZE)
        finally:
            client.close()

    run(send())
    data_file = s1.data / "layers" / f"{layer}.data"
    assert data_file.exists()
    status, _ = http_json(cluster.url, "DELETE", "/api/v1/volumes/gone", token=cluster.token)
    assert status == 200
    wait_for(lambda: not data_file.exists(), "the layer file to be removed", timeout=20)
    with pytest.raises(StaleEpoch):
        run(send())
    assert not data_file.exists()

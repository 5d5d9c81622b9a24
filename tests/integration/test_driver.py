"""The driver (`lamina.client`) against a real local cluster: data, masks, locks, repair.

One cluster (1 manager, 2 storage servers, started with `lamina up`) serves the module;
each test makes its own volume.  The storage servers are also asked directly over the
wire protocol (ENUMERATE, STATUS) to check what the driver left behind.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lamina.client import Cluster, LockLost
from lamina.client.sync import connect
from lamina.errors import BadRequest, Conflict, StaleEpoch, Unavailable
from lamina.wire import messages as m
from lamina.wire.connection import Client
from lamina.wire.handshake import load_key
from tests.integration.volumes import LocalCluster, MiB, local_cluster

pytestmark = pytest.mark.integration

SESSION_TIMEOUT = 3


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("driver") / "cluster"
    with local_cluster(root, 1, 2, "--session-timeout", str(SESSION_TIMEOUT)) as cluster:
        yield cluster


_names = iter(range(1, 1000))


def new_volume(lc: LocalCluster, size: int = 32 * MiB, replicas: int = 2) -> dict[str, Any]:
    return lc.create_volume(f"v{next(_names)}", size, replicas=replicas, stripe=2)


def volume_info(lc: LocalCluster, name: str) -> dict[str, Any]:
    done = lc.cli("volume", "info", name, "--json")
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


async def storage_client(lc: LocalCluster, sid: str) -> Client:
    port = int((lc.root / "run" / f"{sid}.port").read_text())
    return await Client.connect("127.0.0.1", port, load_key(lc.root / "cluster.key"))


async def dirty_pages(lc: LocalCluster, info: dict[str, Any]) -> dict[str, list[int]]:
    """Pages of the volume's top layer whose mask is not full, on each server."""
    layer = info["layers"][-1]
    epoch = json.loads(lc.cli("status", "--json").stdout)["published_epoch"]
    out: dict[str, list[int]] = {}
    for sid in sorted({s for part in layer["placement"] for s in part}):
        client = await storage_client(lc, sid)
        try:
            for _ in range(50):  # the server may know a newer fence: use its epoch
                try:
                    reply = await client.call(
                        m.EnumerateRequest(
                            info["id"], epoch, layer["id"], m.EnumerateWhat.DIRTY, 0, 4096
                        )
                    )
                    break
                except StaleEpoch as exc:
                    epoch = exc.current_epoch
                except Unavailable:  # catching up to the epoch we named
                    await asyncio.sleep(0.1)
            assert isinstance(reply, m.EnumerateResponse)
            out[sid] = list(reply.pages)
        finally:
            client.close()
    return out


def test_random_io_matches_a_model(lc: LocalCluster) -> None:
    info = new_volume(lc)
    size = info["size"]
    rng = random.Random(7)
    model = bytearray(size)
    with connect(lc.cluster_file) as cluster:
        with cluster.open(info["name"]) as vol:
            assert vol.size == size
            for _ in range(150):
                offset = rng.randrange(size)
                length = min(size - offset, rng.choice([1, 511, 4096, 70_000, 1 << 20, 3 << 20]))
                if rng.random() < 0.15:
                    vol.write_zeroes(offset, length)
                    model[offset : offset + length] = bytes(length)
                else:
                    data = rng.randbytes(length)
                    vol.write(offset, data, fua=rng.random() < 0.1)
                    model[offset : offset + length] = data
                if rng.random() < 0.3:
                    offset = rng.randrange(size)
                    length = min(size - offset, rng.randrange(1, 4 << 20))
                    assert vol.read(offset, length) == model[offset : offset + length]
            vol.flush()
            assert vol.read(0, size) == model
            with pytest.raises(BadRequest, match="beyond"):
                vol.read(size - 10, 11)
            with pytest.raises(BadRequest, match="beyond"):
                vol.write(size, b"x")
        # a new client, read-only, sees the same bytes
        with cluster.open(info["name"], read_only=True) as ro:
            assert ro.read(0, size) == model
            with pytest.raises(BadRequest, match="read-only"):
                ro.write(0, b"x")


def test_never_written_areas_read_as_zeros(lc: LocalCluster) -> None:
    info = new_volume(lc)
    with connect(lc.cluster_file) as cluster, cluster.open(info["name"]) as vol:
        vol.write(5 * MiB + 100, b"\x01" * 10)
        assert vol.read(0, 5 * MiB + 100) == bytes(5 * MiB + 100)
        assert vol.read(5 * MiB + 110, MiB) == bytes(MiB)
        assert vol.read(5 * MiB + 95, 20) == bytes(5) + b"\x01" * 10 + bytes(5)


def test_acknowledged_pages_are_clean_again_within_a_second(lc: LocalCluster) -> None:
    info = new_volume(lc)
    name = info["name"]

    async def main() -> dict[str, list[int]]:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open(name)
            rng = random.Random(3)
            # many small writes in flight at once, on pages of both partitions
            await asyncio.gather(
                *(vol.write(rng.randrange(16 * MiB), rng.randbytes(4096)) for _ in range(400))
            )
            # and then nothing: no later request carries the tokens
            await asyncio.sleep(1.0)
            dirty = await dirty_pages(lc, info)
            await vol.close()
            return dirty

    dirty = asyncio.run(main())
    assert set(dirty) == {"s1", "s2"}
    assert dirty == {"s1": [], "s2": []}


def test_a_second_writer_is_refused_a_reader_is_not(lc: LocalCluster) -> None:
    info = new_volume(lc)
    name = info["name"]
    with connect(lc.cluster_file) as first, first.open(name) as vol:
        vol.write(0, b"first")
        with connect(lc.cluster_file) as second:
            with pytest.raises(Conflict) as refused:
                second.open(name)
            message = refused.value.message
            assert f"pid {first.cluster.pid}" in message
            assert first.cluster.host in message
            with second.open(name, read_only=True) as ro:
                assert ro.read(0, 5) == b"first"
        lock = volume_info(lc, name)["lock"]
        assert lock["session"] == first.cluster.session
    # closed: the lock is given back
    assert volume_info(lc, name)["lock"] is None


def test_takeover_ends_the_old_writer(lc: LocalCluster) -> None:
    info = new_volume(lc)
    name = info["name"]

    async def main() -> None:
        async with (
            await Cluster.connect(lc.cluster_file) as c1,
            await Cluster.connect(lc.cluster_file) as c2,
        ):
            old = await c1.open(name)
            await old.write(0, b"A" * 4096)
            new = await c2.open(name, takeover=True)
            # the old holder is refused at once (STALE -> map -> lock gone), not retried
            with pytest.raises(LockLost):
                await old.write(0, b"Z" * 4096)
            with pytest.raises(LockLost):
                await old.write(8 * MiB, b"Z" * 4096)
            await new.write(4096, b"B" * 4096)
            assert await new.read(0, 8192) == b"A" * 4096 + b"B" * 4096
            assert await old.read(0, 8192) == b"A" * 4096 + b"B" * 4096  # reads go on
            await new.close()
            await old.close()

    asyncio.run(main())


def test_a_dead_holder_loses_its_lock_after_the_session_timeout(lc: LocalCluster) -> None:
    info = new_volume(lc)
    name = info["name"]
    exporter = lc.export(name)
    with connect(lc.cluster_file) as cluster:
        with pytest.raises(Conflict):
            cluster.open(name)
        exporter.kill()  # kill -9: no release, its keepalives just stop
        killed = time.monotonic()
        deadline = killed + SESSION_TIMEOUT + 10
        while True:
            try:
                vol = cluster.open(name)
                break
            except Conflict:
                assert time.monotonic() < deadline, "the dead holder kept its lock"
                time.sleep(0.25)
        waited = time.monotonic() - killed
        vol.write(0, b"mine")
        vol.close()
    assert waited >= SESSION_TIMEOUT - 1  # not released before its session lapsed


def test_a_corrupt_copy_is_read_around_and_repaired(lc: LocalCluster) -> None:
    info = new_volume(lc)
    name = info["name"]
    layer = info["layers"][-1]["id"]
    page_data = random.Random(5).randbytes(MiB)
    with connect(lc.cluster_file) as cluster, cluster.open(name) as vol:
        vol.write(0, page_data)  # page 0, both copies
        vol.flush()
    # rot one byte of page 0 on s1, under the server's feet
    path = lc.root / "s1" / "layers" / f"{layer}.data"
    with path.open("r+b") as f:
        f.seek(1000)
        old = f.read(1)[0]
        f.seek(1000)
        f.write(bytes([old ^ 0xFF]))
    with connect(lc.cluster_file) as cluster, cluster.open(name) as vol:
        for _ in range(4):  # whichever copy the reads pick, every answer is right
            assert vol.read(0, MiB) == page_data
    with path.open("rb") as f:  # repaired in place from the good copy
        f.seek(1000)
        assert f.read(1)[0] == old


def test_sigstopped_exporter_loses_every_write_after_a_takeover(lc: LocalCluster) -> None:
    """A stopped (SIGSTOP) exporter with writes in flight, a takeover, new data written,
    SIGCONT: not one of the old exporter's writes lands."""
    info = new_volume(lc, size=16 * MiB)
    name = info["name"]
    old = lc.export(name)
    # fio keeps 16 writes of 0xaa in flight through the old exporter, over the first 4 MiB
    writer = subprocess.Popen(
        [
            "fio", "--name=old", "--ioengine=nbd", f"--uri={old.uri}", "--rw=randwrite",
            "--bs=64k", "--size=4M", "--iodepth=16", "--time_based", "--runtime=60",
            "--buffer_pattern=0xaa", "--output-format=json",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(1.5)
    assert writer.poll() is None, writer.communicate()
    old.proc.send_signal(signal.SIGSTOP)
    try:
        new = lc.export(name, "--takeover")
        done = subprocess.run(
            ["qemu-io", "-f", "raw", new.uri, "-c", "write -P 0xbb 0 4194304"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        old.proc.send_signal(signal.SIGCONT)
    try:
        out, err = writer.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        writer.kill()
        out, err = writer.communicate()
    # the old writer's writes failed (EIO) instead of being retried with the new epoch
    assert writer.returncode != 0, out.decode()[-2000:]
    assert "Input/output error" in err.decode() or '"error" : 5' in out.decode(), err.decode()
    time.sleep(1.0)  # let anything the old exporter still had go wherever it goes
    check = subprocess.run(
        ["qemu-io", "-f", "raw", new.uri, "-c", "read -P 0xbb 0 4194304"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + old.log_text()
    assert "Pattern verification failed" not in check.stdout, check.stdout
    assert "revoked" in old.log_text()
    new.stop()
    old.stop()

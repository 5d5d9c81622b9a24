"""The background worker: a server that was down comes back `recovering`, gets exactly
the pages written while it was away, becomes `up`, and then serves them correctly."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from lamina.client import Cluster
from lamina.errors import LaminaError, StaleEpoch, Unavailable
from lamina.localcluster import StorageProcess
from lamina.wire import messages as m
from tests.integration.test_driver import dirty_pages, storage_client, volume_info
from tests.integration.volumes import LocalCluster, MiB, local_cluster

pytestmark = pytest.mark.integration


def status(lc: LocalCluster) -> dict[str, Any]:
    done = lc.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def server_state(lc: LocalCluster, sid: str) -> str:
    return next(str(s["state"]) for s in status(lc)["servers"] if s["id"] == sid)


def write_whole(lc: LocalCluster, name: str, data: bytes | bytearray) -> None:
    """Write ``data`` at offset 0 of volume ``name`` through the driver, and close it."""

    async def main() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open(name)
            await vol.write(0, bytes(data))
            await vol.close()

    asyncio.run(main())


def read_whole(lc: LocalCluster, name: str, size: int) -> bytes:
    """The first ``size`` bytes of volume ``name``, read by a read-only driver."""

    async def main() -> bytes:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open(name, read_only=True)
            data = await vol.read(0, size)
            await vol.close()
            return data

    return asyncio.run(main())


def wait_state(lc: LocalCluster, sid: str, state: str, timeout: float = 30) -> float:
    start = time.monotonic()
    while (now := server_state(lc, sid)) != state:
        assert time.monotonic() - start < timeout, f"{sid} stayed {now}, never {state}"
        time.sleep(0.2)
    return time.monotonic() - start


def test_a_server_back_from_an_outage_gets_only_what_it_missed(tmp_path: Path) -> None:
    page = MiB
    pages = 48
    missed = 8  # pages written while s2 is down
    with local_cluster(tmp_path / "cluster", 1, 2) as lc:
        info = lc.create_volume("vol", pages * page, replicas=2, stripe=2)
        rng = random.Random(11)
        model = bytearray(rng.randbytes(pages * page))

        async def write(offsets: list[int]) -> None:
            async with await Cluster.connect(lc.cluster_file) as cluster:
                vol = await cluster.open("vol")
                for off in offsets:
                    await vol.write(off, bytes(model[off : off + 4096 * 3]))
                await vol.close()

        write_whole(lc, "vol", model)
        copied_before = status(lc)["resync"]["bytes_copied"]
        os.kill(lc.storage_pid("s2"), signal.SIGKILL)
        # writes go on without s2 (the driver waits until the map marks it down)
        touched = sorted(rng.sample(range(pages), missed))
        for p in touched:
            model[p * page + 100 : p * page + 100 + 4096 * 3] = rng.randbytes(4096 * 3)
        asyncio.run(write([p * page + 100 for p in touched]))
        assert server_state(lc, "s2") == "down"

        lc.up(1, 2)  # s2 restarts: recovering, then the worker repairs it, then up
        wait_state(lc, "s2", "up", timeout=60)
        resync = status(lc)["resync"]
        copied = resync["bytes_copied"] - copied_before
        # exactly the pages written during the outage, not the volume
        assert copied == missed * page, resync
        info = volume_info(lc, "vol")
        assert asyncio.run(dirty_pages(lc, info)) == {"s1": [], "s2": []}

        # now s1 dies: everything must come from s2, which was repaired
        os.kill(lc.storage_pid("s1"), signal.SIGKILL)

        assert read_whole(lc, "vol", len(model)) == model


def test_a_server_back_alone_stays_recovering_until_the_copy_that_has_the_writes_is_back(
    tmp_path: Path,
) -> None:
    """s2 down while s1 alone takes writes; then s1 goes away too (paused past its lease)
    and s2 comes back.  s2's masks are clean (it never heard of the writes it missed), so
    nothing looks dirty: it must stay `recovering` (no read may come from it: the data
    would be stale) until s1 is back; then the worker resyncs from s1 by the masks, both
    become `up`, and every acknowledged write reads back."""
    page = MiB
    pages = 8
    with local_cluster(tmp_path / "cluster", 1, 2) as lc:
        lc.create_volume("vol", pages * page, replicas=2, stripe=2)
        rng = random.Random(12)
        model = bytearray(rng.randbytes(pages * page))
        write_whole(lc, "vol", model)
        os.kill(lc.storage_pid("s2"), signal.SIGKILL)
        model[100:4196] = rng.randbytes(4096)
        model[3 * page : 3 * page + 4096] = rng.randbytes(4096)

        async def write() -> None:
            async with await Cluster.connect(lc.cluster_file) as cluster:
                vol = await cluster.open("vol")
                await vol.write(100, bytes(model[100:4196]))
                await vol.write(3 * page, bytes(model[3 * page : 3 * page + 4096]))
                await vol.close()

        asyncio.run(write())  # acknowledged by s1 alone
        s1 = lc.storage_pid("s1")
        os.kill(s1, signal.SIGSTOP)
        try:
            wait_state(lc, "s1", "down", timeout=20)
            s2 = restart_alone(lc, "s2")  # (`lamina up` would wait for paused s1)
            wait_state(lc, "s2", "recovering", timeout=20)
            time.sleep(5)  # several worker rounds
            assert server_state(lc, "s2") == "recovering"

            async def read_refused() -> None:
                async with await Cluster.connect(lc.cluster_file, io_timeout=2) as cluster:
                    vol = await cluster.open("vol", read_only=True)
                    with pytest.raises(LaminaError):
                        await vol.read(0, 4096)
                    await vol.close()

            asyncio.run(read_refused())
        finally:
            os.kill(s1, signal.SIGCONT)
        wait_state(lc, "s1", "up", timeout=60)
        wait_state(lc, "s2", "up", timeout=60)
        assert read_whole(lc, "vol", len(model)) == model
        s2.stop()


def restart_alone(lc: LocalCluster, sid: str) -> StorageProcess:
    """Start storage server ``sid`` again, on its port, data and managers (and nothing
    else); the caller stops it."""
    layout = json.loads((lc.root / "run" / "layout.json").read_text())
    port = dict(layout["servers"])[sid]
    managers = ",".join(f"127.0.0.1:{m[-1]}" for m in layout["managers"])
    proc = StorageProcess(
        id=sid, data=lc.root / sid, key=lc.root / "cluster.key",
        log=lc.root / "log" / f"{sid}.log", port_file=lc.root / "run" / f"{sid}.port",
        port=port, extra_args=["--managers", managers],
    )  # fmt: skip
    proc.start()
    return proc


async def copies_of(lc: LocalCluster, info: dict[str, Any], page: int) -> list[bytes]:
    """The bytes of ``page`` of the volume's top layer on each of its copies."""
    layer = info["layers"][-1]
    part = layer["placement"][page % len(layer["placement"])]
    epoch = status(lc)["epoch"]
    out = []
    for sid in part:
        client = await storage_client(lc, sid)
        try:
            for _ in range(50):
                try:
                    reply, data = await client.call_with_payload(
                        m.ReadRequest(info["id"], epoch, layer["id"], page, MiB, 0, MiB)
                    )
                    break
                except StaleEpoch as exc:
                    epoch = exc.current_epoch
                except Unavailable:
                    await asyncio.sleep(0.1)
            assert isinstance(reply, m.ReadResponse)
            out.append(bytes(data) if reply.state == m.PageState.PRESENT else bytes(MiB))
        finally:
            client.close()
    return out


def test_pages_a_dead_writer_left_dirty_are_made_equal_and_clean(tmp_path: Path) -> None:
    """kill -9 of an exporter with writes in flight leaves pages whose copies may differ
    and whose masks disown each other; once quiet, the worker makes every page's copies
    identical and clean (no driver involved)."""
    pages = 12
    with local_cluster(tmp_path / "cluster", 1, 2) as lc:
        lc.create_volume("w", pages * MiB, replicas=2, stripe=2)
        exporter = lc.export("w")
        fio = subprocess.Popen(
            [
                "fio", "--name=w", "--ioengine=nbd", f"--uri={exporter.uri}", "--rw=randwrite",
                "--bsrange=4k-64k", f"--size={pages}M", "--iodepth=16", "--time_based",
                "--runtime=30", "--thread",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
        )  # fmt: skip
        try:
            time.sleep(2.0)
            exporter.kill()  # writes in flight: some copies took them, some did not
        finally:
            fio.kill()
            fio.wait(10)
        info = volume_info(lc, "w")
        deadline = time.monotonic() + 30
        while (dirty := asyncio.run(dirty_pages(lc, info))) != {"s1": [], "s2": []}:
            assert time.monotonic() < deadline, f"still dirty: {dirty}"
            time.sleep(0.5)
        for page in range(pages):
            first, second = asyncio.run(copies_of(lc, info, page))
            assert first == second, f"page {page}: the copies differ"
        assert status(lc)["resync"]["pages_resynced"] > 0  # it was the worker's doing


def scrub(lc: LocalCluster, name: str) -> dict[str, Any]:
    done = lc.cli("volume", "scrub", name, "--json", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    assert doc["done"] is True
    assert doc["error"] is None
    return doc


def test_scrub_finds_and_repairs_copies_that_differ(tmp_path: Path) -> None:
    """Two kinds of damage no write recorded: a byte rotted on s1's disk (page 0), and a
    copy on s2 that silently holds other bytes (page 3).  The scrub finds both, repairs
    them from the good copy, and a second scrub finds nothing."""
    pages = 6
    with local_cluster(tmp_path / "cluster", 1, 2) as lc:
        lc.create_volume("sv", pages * MiB, replicas=2, stripe=2)
        model = random.Random(4).randbytes(pages * MiB)

        write_whole(lc, "sv", model)
        assert scrub(lc, "sv")["mismatches"] == 0
        info = volume_info(lc, "sv")
        layer = info["layers"][-1]["id"]
        with (lc.root / "s1" / "layers" / f"{layer}.data").open("r+b") as f:
            f.seek(5000)
            old = f.read(1)[0]
            f.seek(5000)
            f.write(bytes([old ^ 0x55]))

        async def overwrite_on_s2() -> None:
            # a full-page WRITE that clears nobody's bit: the copies now differ silently
            deadline = time.monotonic() + 20
            while (st := status(lc))["published_epoch"] != st["epoch"]:  # the unlock's
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            epoch = st["epoch"]
            client = await storage_client(lc, "s2")
            try:
                done = await client.call(
                    m.WriteRequest(info["id"], epoch, layer, 3, MiB, 0, 0xFFFFFFFF, 0xFFFFFFFF,
                                   False),
                    b"\xee" * MiB,
                )  # fmt: skip
                assert isinstance(done, m.WriteResponse)
                # confirmed, like a finished write: nothing is on its way any more
                await client.call(m.RestoreRequest((done.token,)))
            finally:
                client.close()

        asyncio.run(overwrite_on_s2())
        report = scrub(lc, "sv")
        assert report["pages_checked"] == pages
        assert (report["mismatches"], report["repaired"], report["corrupt"]) == (2, 2, 1), report
        again = scrub(lc, "sv")
        assert (again["mismatches"], again["corrupt"], again["errors"]) == (0, 0, 0), again
        for page in range(pages):
            first, second = asyncio.run(copies_of(lc, info, page))
            assert first == second == model[page * MiB : (page + 1) * MiB], f"page {page}"


def test_a_server_down_too_long_is_replaced_and_its_copies_refilled(tmp_path: Path) -> None:
    """s-X stays down past rereplicate_after: its copies move to the other servers as
    filling copies, the worker fills them from the survivors and declares them done;
    then a second server dies and the one left serves every page correctly."""
    pages = 12
    root = tmp_path / "cluster"
    with local_cluster(root, 1, 3, "--rereplicate-after", "2") as lc:
        lc.create_volume("rr", pages * MiB, replicas=2, stripe=3)
        model = random.Random(8).randbytes(pages * MiB)

        write_whole(lc, "rr", model)
        os.kill(lc.storage_pid("s1"), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            (layer,) = volume_info(lc, "rr")["layers"]
            held = {sid for part in layer["placement"] for sid in part}
            if "s1" not in held and not layer["filling"]:
                break
            assert time.monotonic() < deadline, f"not re-replicated: {layer}"
            time.sleep(0.3)
        assert all(len(set(part)) == 2 for part in layer["placement"])
        assert status(lc)["resync"]["bytes_copied"] >= (pages * MiB) * 2 // 3 // 2  # refilled
        # the survivors now hold both copies of every partition: lose one more server
        os.kill(lc.storage_pid("s2"), signal.SIGKILL)

        assert read_whole(lc, "rr", len(model)) == model

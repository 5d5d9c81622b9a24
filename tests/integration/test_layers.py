"""Translucent layers on a real cluster [0048]-[0060]: snapshots never change, clones are
independent, rollback returns to the snapshot, a deleted snapshot merges up and its
space returns, and a migration moves a volume online.  Data goes through the driver
(``lamina.client``) and is checked against a model of what was written."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lamina.client import Cluster, Volume
from lamina.client.sync import connect
from lamina.errors import LaminaError, NotFound, StaleEpoch
from lamina.wire import messages as m
from lamina.wire.connection import Client
from tests.integration.test_driver import storage_client, volume_info
from tests.integration.volumes import LocalCluster, local_cluster

pytestmark = pytest.mark.integration

PAGE = 64 * 1024
SIZE = 24 * PAGE  # 1.5 MiB: 24 pages over 2 partitions


class Model:
    """The bytes a volume must read back: what was written, zeros elsewhere."""

    def __init__(self, size: int, data: bytes | None = None) -> None:
        self.data = bytearray(size) if data is None else bytearray(data)

    def write(self, offset: int, chunk: bytes) -> None:
        self.data[offset : offset + len(chunk)] = chunk

    def copy(self) -> Model:
        return Model(len(self.data), bytes(self.data))


def ok(lc: LocalCluster, *args: str) -> Any:
    done = lc.cli(*args, "--json")
    assert done.returncode == 0, f"lamina {' '.join(args)}: {done.stderr}"
    return json.loads(done.stdout) if done.stdout.strip() else None


def refused(lc: LocalCluster, *args: str) -> str:
    done = lc.cli(*args)
    assert done.returncode != 0, f"lamina {' '.join(args)} should fail: {done.stdout}"
    return done.stderr


async def scribble(vol: Volume, model: Model, rnd: random.Random, writes: int) -> None:
    """``writes`` random writes (1 B .. 3 pages, anywhere), some concurrent."""

    async def one(lo: int, hi: int) -> None:
        length = rnd.randint(1, min(3 * PAGE, hi - lo))
        offset = rnd.randrange(lo, hi - length + 1)
        chunk = rnd.randbytes(length)
        model.write(offset, chunk)
        await vol.write(offset, chunk)

    quarter = SIZE // 4  # concurrent writes go to different quarters: they never overlap
    for _ in range(writes // 4):
        await asyncio.gather(*(one(q * quarter, (q + 1) * quarter) for q in range(4)))


async def read_all(cluster: Cluster, name: str) -> bytes:
    vol = await cluster.open(name, read_only=True)
    try:
        return await vol.read(0, SIZE)
    finally:
        await vol.close()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def own_layers(info: dict[str, Any]) -> list[dict[str, Any]]:
    return [layer for layer in info["layers"] if layer["volume_id"] == info["id"]]


async def layer_pages(lc: LocalCluster, layer: dict[str, Any]) -> int:
    """Pages (data or zeros) the copies of ``layer`` hold, over all its servers (a
    server that no longer knows the layer holds none)."""
    epoch = json.loads(lc.cli("status", "--json").stdout)["published_epoch"]
    total = 0
    for sid in sorted({s for part in layer["placement"] for s in part}):
        client = await storage_client(lc, sid)
        try:
            reply = await at_its_epoch(client, epoch, lambda e: m.EnumerateRequest(
                layer["volume_id"], e, layer["id"], m.EnumerateWhat.PRESENT, 0, 4096
            ))  # fmt: skip
            total += len(reply.pages)
        except NotFound:
            pass
        finally:
            client.close()
    return total


async def at_its_epoch(client: Client, epoch: int, request: Callable[[int], m.Message]) -> Any:
    """The answer to ``request(epoch)``, retried at the server's epoch while it knows a
    newer fence than the published map the test read (bounded)."""
    for _ in range(50):
        try:
            return await client.call(request(epoch))
        except StaleEpoch as exc:
            epoch = exc.current_epoch
    raise AssertionError("the server's fence kept moving")


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root: Path = tmp_path_factory.mktemp("layers")
    with local_cluster(root, 1, 3, "--rereplicate-after", "3600") as cluster:
        yield cluster


def create(lc: LocalCluster, name: str) -> dict[str, Any]:
    done = lc.cli(
        "volume", "create", name, "--size", str(SIZE), "--replicas", "2", "--stripe", "2",
        "--page-size", str(PAGE), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def test_snapshots_never_change_while_the_volume_is_written(lc: LocalCluster) -> None:
    """The writer keeps writing while snapshots are taken; each snapshot reads back the
    volume exactly as it was when the snapshot command returned, and keeps doing so."""
    create(lc, "snapvol")
    rnd = random.Random(6)

    taken: dict[str, bytes] = {}

    async def main() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open("snapvol")
            model = Model(SIZE)
            for k in range(3):
                await scribble(vol, model, rnd, 24)
                await vol.flush()
                ok(lc, "snapshot", "create", "snapvol", f"s{k}")
                taken[f"s{k}"] = bytes(model.data)
                # writes right after the snapshot go to the new top layer only
                await scribble(vol, model, rnd, 8)
                for name, data in taken.items():
                    assert await read_all(cluster, f"snapvol@{name}") == data, name
            assert await vol.read(0, SIZE) == model.data
            await vol.close()
            assert await read_all(cluster, "snapvol") == model.data
            listed = ok(lc, "snapshot", "list", "snapvol")
            assert [s["name"] for s in listed] == ["s0", "s1", "s2"]

    asyncio.run(main())
    # taking a snapshot is O(1): one new, empty layer per snapshot, nothing copied
    info = volume_info(lc, "snapvol")
    assert len(info["layers"]) == 4
    # a snapshot exported read-only over NBD, read by qemu-img; writes refused
    exporter = lc.export("snapvol@s1", "--read-only")
    out = lc.root / "s1.img"
    done = subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "raw", exporter.uri, str(out)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == taken["s1"]
    write = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write 0 4k", exporter.uri],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert write.returncode != 0  # qemu-io opens it read-write: refused
    assert "Permission denied" in write.stderr, write.stderr
    assert exporter.stop() == 0
    assert "read-only" in refused(lc, "nbd", "snapvol@s1", "--listen", "127.0.0.1:0")
    assert "already has a snapshot" in refused(lc, "snapshot", "create", "snapvol", "s1")
    assert "no snapshot" in refused(lc, "snapshot", "delete", "snapvol", "nope")


def test_clones_and_their_origin_never_see_each_others_writes(lc: LocalCluster) -> None:
    create(lc, "origin")
    rnd = random.Random(7)

    async def main() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open("origin")
            model = Model(SIZE)
            await scribble(vol, model, rnd, 24)
            await vol.flush()
            ok(lc, "snapshot", "create", "origin", "base")
            ok(lc, "volume", "clone", "origin@base", "copy")
            clone_model = model.copy()
            clone = await cluster.open("copy")
            assert await clone.read(0, SIZE) == clone_model.data
            await asyncio.gather(
                scribble(vol, model, rnd, 16), scribble(clone, clone_model, rnd, 16)
            )
            assert await vol.read(0, SIZE) == model.data
            assert await clone.read(0, SIZE) == clone_model.data
            await clone.close()
            await vol.close()

    asyncio.run(main())
    info = volume_info(lc, "copy")
    assert info["origin"] == "origin@base"
    reason = refused(lc, "snapshot", "delete", "origin", "base")
    assert "copy" in reason
    assert "flatten" in reason
    assert "copy" in refused(lc, "volume", "delete", "origin")


def test_a_flattened_clone_no_longer_needs_its_origin(lc: LocalCluster) -> None:
    create(lc, "fo")
    rnd = random.Random(8)

    async def main() -> tuple[bytes, bytes]:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open("fo")
            model = Model(SIZE)
            await scribble(vol, model, rnd, 24)
            await vol.close()
            ok(lc, "snapshot", "create", "fo", "s")
            ok(lc, "volume", "clone", "fo@s", "fc")
            clone = await cluster.open("fc")
            clone_model = model.copy()
            await scribble(clone, clone_model, rnd, 8)
            await clone.close()
            return bytes(model.data), bytes(clone_model.data)

    origin_data, clone_data = asyncio.run(main())
    ok(lc, "volume", "flatten", "fc")
    wait_for("the flatten", lambda: not volume_info(lc, "fc")["origin"])
    info = volume_info(lc, "fc")
    assert all(layer["volume_id"] == info["id"] for layer in info["layers"])
    # the origin can go now, and the clone still reads the same
    ok(lc, "snapshot", "delete", "fo", "s")
    ok(lc, "volume", "delete", "fo")

    async def after() -> bytes:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            return await read_all(cluster, "fc")

    assert asyncio.run(after()) == clone_data
    assert origin_data != clone_data


def test_rollback_returns_to_the_snapshot(lc: LocalCluster) -> None:
    create(lc, "rb")
    rnd = random.Random(9)

    async def main() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open("rb")
            model = Model(SIZE)
            await scribble(vol, model, rnd, 16)
            ok(lc, "snapshot", "create", "rb", "good")
            good = bytes(model.data)
            await scribble(vol, model, rnd, 16)
            assert "attached" in refused(lc, "snapshot", "rollback", "rb", "good")
            await vol.close()
            ok(lc, "snapshot", "rollback", "rb", "good")
            assert await read_all(cluster, "rb") == good
            vol = await cluster.open("rb")
            again = Model(SIZE, good)
            await scribble(vol, again, rnd, 8)
            await vol.close()
            assert await read_all(cluster, "rb") == again.data
            assert await read_all(cluster, "rb@good") == good

    asyncio.run(main())


def test_a_deleted_snapshot_is_merged_up_and_its_space_returns(lc: LocalCluster) -> None:
    create(lc, "mg")
    rnd = random.Random(10)

    async def main() -> dict[str, Any]:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open("mg")
            model = Model(SIZE)
            await scribble(vol, model, rnd, 24)
            ok(lc, "snapshot", "create", "mg", "old")
            await scribble(vol, model, rnd, 8)
            ok(lc, "snapshot", "create", "mg", "new")
            new = bytes(model.data)
            await scribble(vol, model, rnd, 8)
            before = volume_info(lc, "mg")
            old_layer = before["layers"][0]
            assert await layer_pages(lc, old_layer) > 0
            ok(lc, "snapshot", "delete", "mg", "old")
            # the writer keeps writing during the merge
            await scribble(vol, model, rnd, 8)
            wait_for(
                "the merge",
                lambda: old_layer["id"] not in [x["id"] for x in volume_info(lc, "mg")["layers"]],
            )
            assert await vol.read(0, SIZE) == model.data
            await vol.close()
            assert await read_all(cluster, "mg@new") == new
            assert await read_all(cluster, "mg") == model.data
            layer: dict[str, Any] = old_layer
            return layer

    old_layer = asyncio.run(main())
    # the merged layer's pages leave the servers' disks
    wait_for("the space", lambda: asyncio.run(layer_pages(lc, old_layer)) == 0)


def test_a_migration_moves_every_layer_and_keeps_the_data(lc: LocalCluster) -> None:
    create(lc, "mv")
    rnd = random.Random(11)

    async def main() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open("mv")
            model = Model(SIZE)
            await scribble(vol, model, rnd, 24)
            ok(lc, "snapshot", "create", "mv", "s")
            snap = bytes(model.data)
            await scribble(vol, model, rnd, 8)
            ok(lc, "volume", "migrate", "mv", "--servers", "s2,s3")
            await scribble(vol, model, rnd, 16)  # online: writes during the move
            wait_for("the migration", lambda: not volume_info(lc, "mv")["migration"])
            assert await vol.read(0, SIZE) == model.data
            await vol.close()
            assert await read_all(cluster, "mv@s") == snap
            assert await read_all(cluster, "mv") == model.data

    asyncio.run(main())
    info = volume_info(lc, "mv")
    for layer in own_layers(info):
        assert {s for part in layer["placement"] for s in part} <= {"s2", "s3"}, layer
    assert len(info["layers"]) == 2


def test_an_aborted_migration_returns_to_the_old_placement(lc: LocalCluster) -> None:
    create(lc, "ab")
    before = own_layers(volume_info(lc, "ab"))[0]["placement"]
    used = {s for part in before for s in part}
    away = "s2,s3" if used == {"s1", "s3"} else "s1,s3"
    rnd = random.Random(12)

    async def main() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open("ab")
            model = Model(SIZE)
            await scribble(vol, model, rnd, 24)
            ok(lc, "volume", "migrate", "ab", "--servers", away, "--replicas", "2")
            await scribble(vol, model, rnd, 8)
            ok(lc, "volume", "migrate", "ab", "--abort")
            await scribble(vol, model, rnd, 8)  # the writer never stops
            wait_for("the abort", lambda: not volume_info(lc, "ab")["migration"])
            assert await vol.read(0, SIZE) == model.data
            await vol.close()
            assert await read_all(cluster, "ab") == model.data

    asyncio.run(main())
    info = volume_info(lc, "ab")
    assert [layer["placement"] for layer in info["layers"]] == [before]
    assert "not migrating" in refused(lc, "volume", "migrate", "ab", "--abort")


def test_snapshots_and_clones_from_python(lc: LocalCluster) -> None:
    """The same operations through ``lamina.client`` (blocking wrapper)."""
    create(lc, "py")
    with connect(lc.cluster_file) as cluster:
        with cluster.open("py") as vol:
            vol.write(0, b"before" * 1000)
            taken = cluster.create_snapshot("py", "one")
            vol.write(0, b"after!" * 1000)
        assert taken["name"] == "one"
        assert [s["name"] for s in cluster.snapshots("py")] == ["one"]
        cluster.clone("py", "one", "py-clone")
        assert [s["clones"] for s in cluster.snapshots("py")] == [["py-clone"]]
        with cluster.open("py@one", read_only=True) as snap:
            assert snap.read(0, 6000) == b"before" * 1000
        with cluster.open("py-clone", read_only=True) as clone:
            assert clone.read(0, 6000) == b"before" * 1000
        with pytest.raises(LaminaError, match="py-clone"):
            cluster.delete_snapshot("py", "one")
        cluster.rollback("py", "one")
        with cluster.open("py", read_only=True) as vol:
            assert vol.read(0, 6000) == b"before" * 1000

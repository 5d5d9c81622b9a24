"""Scaling by migration [0030]: draining a server moves every copy off it (then it can be
removed), a drain that would leave copies nowhere to go is refused with the volume
named, and a rebalance spreads volumes onto a server that joined later.  Data is written
through the driver and read back after every move."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest

from lamina.client import Cluster
from lamina.localcluster import StorageProcess
from tests.integration.test_driver import volume_info
from tests.integration.test_layers import ok, refused, wait_for
from tests.integration.test_resync import server_state
from tests.integration.volumes import LocalCluster, MiB, local_cluster

pytestmark = pytest.mark.integration


def servers_of(info: dict[str, Any]) -> set[str]:
    return {s for layer in info["layers"] for part in layer["placement"] for s in part}


def fill(lc: LocalCluster, names: list[str], size: int, seed: int) -> dict[str, bytes]:
    """Write ``size`` random bytes to each volume; what each must read back."""
    rnd = random.Random(seed)
    data = {name: rnd.randbytes(size) for name in names}

    async def main() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            for name in names:
                vol = await cluster.open(name)
                await vol.write(0, data[name])
                await vol.close()

    asyncio.run(main())
    return data


def read_back(lc: LocalCluster, data: dict[str, bytes]) -> None:
    async def main() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            for name, expected in data.items():
                vol = await cluster.open(name, read_only=True)
                assert await vol.read(0, len(expected)) == expected, name
                await vol.close()

    asyncio.run(main())


def test_a_drained_server_holds_nothing_and_can_be_removed(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "c", 1, 3) as lc:
        for name in ("a", "b"):
            lc.create_volume(name, 4 * MiB, replicas=2, stripe=2)
        data = fill(lc, ["a", "b"], 4 * MiB, seed=1)
        ok(lc, "snapshot", "create", "a", "s")
        assert "drain it first" in refused(lc, "server", "remove", "s1")
        held = [n for n in ("a", "b") if "s1" in servers_of(volume_info(lc, n))]
        assert held, "placement put nothing on s1"
        out = ok(lc, "server", "drain", "s1", "--wait", "--timeout", "120")
        assert out["copies"] == 0
        for name in ("a", "b"):
            assert "s1" not in servers_of(volume_info(lc, name)), name
        read_back(lc, data)
        ok(lc, "server", "remove", "s1")
        servers = json.loads(lc.cli("server", "list", "--json").stdout)
        assert "s1" not in [s["id"] for s in servers]
        # a new volume never lands on a draining server either: s1 is gone, 2 remain
        lc.create_volume("c", 4 * MiB, replicas=2, stripe=2)
        assert servers_of(volume_info(lc, "c")) == {"s2", "s3"}


def test_a_drain_that_leaves_copies_nowhere_is_refused(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "c", 1, 2) as lc:
        lc.create_volume("pair", 4 * MiB, replicas=2, stripe=2)
        reason = refused(lc, "server", "drain", "s1")
        assert "pair" in reason
        assert "add a server" in reason
        info = volume_info(lc, "pair")
        assert servers_of(info) == {"s1", "s2"}
        assert not info["migration"]


def test_a_rebalance_spreads_volumes_onto_a_new_server(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "c", 1, 2) as lc:
        names = ["r1", "r2", "r3", "r4"]
        for name in names:
            lc.create_volume(name, 2 * MiB, replicas=2, stripe=2)
        data = fill(lc, names, 2 * MiB, seed=2)
        s3 = join_server(lc, "s3")
        try:
            rebalance(lc, names, data)
        finally:
            s3.stop()


def join_server(lc: LocalCluster, sid: str) -> StorageProcess:
    """Start one more `lamina storage` daemon on the cluster's key and managers, and admit
    it with `lamina server add --no-rebalance`; returns once it is up."""
    layout = json.loads((lc.root / "run" / "layout.json").read_text())
    managers = ",".join(f"127.0.0.1:{m[-1]}" for m in layout["managers"])
    proc = StorageProcess(
        id=sid, data=lc.root / sid, key=lc.root / "cluster.key",
        log=lc.root / "log" / f"{sid}.log", port_file=lc.root / "run" / f"{sid}.port",
        extra_args=["--managers", managers],
    )  # fmt: skip
    proc.start()
    servers = json.loads(lc.cli("server", "list", "--json").stdout)
    capacity = str(servers[0]["capacity"])  # like the others: placement weighs capacity
    ok(lc, "server", "add", sid, "--addr", proc.addr, "--capacity", capacity, "--no-rebalance")
    wait_for(f"{sid} up", lambda: server_state(lc, sid) == "up", timeout=30)
    return proc


def rebalance(lc: LocalCluster, names: list[str], data: dict[str, bytes]) -> None:
    """`lamina server rebalance` moves some volumes onto the emptiest server (s3), every
    volume reads back the same, and a second rebalance finds nothing to do."""
    moving = ok(lc, "server", "rebalance")["migrating"]
    assert moving, "nothing moved onto the new server"
    wait_for(
        "the rebalance",
        lambda: not any(volume_info(lc, n)["migration"] for n in names),
        timeout=120,
    )
    on_s3 = [n for n in names if "s3" in servers_of(volume_info(lc, n))]
    assert sorted(on_s3) == sorted(moving)
    read_back(lc, data)
    # a second rebalance finds the cluster even enough
    assert ok(lc, "server", "rebalance")["migrating"] == []

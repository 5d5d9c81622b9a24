"""A migration through a power cut of every storage server: nothing flushed before it is
lost (issue 11 point 4).

Four real storage services on on-disk stores whose files sit on the disk that can lose
power (:class:`lamina.storage.powerloss.PowerLossFiles`): a flushed layer on s1, s2
migrates to a layer on s3, s4.  The leader's real worker moves every page
(``Worker._move_all``: create in the target, tombstone in the source) until the source
is empty and it proposes ``MigrationDone``; the source layer is then deleted on its
servers, as the leader does once that map is published, and their logs are committed
(their background pass does that; the target servers' has not run yet: each server runs
its own).  Then the power of every server is cut, keeping a seeded subset of what was
not synced, and the stores are opened again: every page must read back, from the
target, exactly as it was flushed.

A flatten likewise: once ``FlattenDone`` is proposed the clone no longer reads the
shared layer, so the pages the worker copied into the clone's own layer must survive a
power cut of the clone's servers.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from lamina.mgmt import clustermap as cm
from lamina.mgmt.worker import Worker
from lamina.storage.diskstore import DiskPageStore
from lamina.storage.powerloss import PowerLossFiles
from lamina.storage.service import StorageService
from lamina.storage.syncmask import FULL
from lamina.wire import messages as m
from lamina.wire.framing import Payload
from lamina.wire.messages import PageState
from tests.contract.test_service_contract import call

PAGE = 64 * 1024
PAGES = 6
VOL = 7
SOURCE, TARGET = 3, 4
EPOCH = 5
SERVERS = ("s1", "s2", "s3", "s4")
VOLUME = cm.Volume("v", VOL, PAGES * PAGE, PAGE, 2, 1, (SOURCE, TARGET), EPOCH)
LAYERS = {
    SOURCE: cm.Layer(SOURCE, VOL, (("s1", "s2"),), cm.LayerRole.MIGRATION_SOURCE, TARGET),
    TARGET: cm.Layer(TARGET, VOL, (("s3", "s4"),), cm.LayerRole.MIGRATION_TARGET, None),
}
CMAP = cm.ClusterMap(
    EPOCH, EPOCH,
    {sid: cm.Server(sid, f"127.0.0.1:{7400 + k}", cm.ServerState.UP, 1 << 30, "")
     for k, sid in enumerate(SERVERS)},
    {"v": VOLUME}, LAYERS, VOL + 1, TARGET + 1,
)  # fmt: skip
#: seeds of the three kinds of power cut: keep no unsynced block, all of them, some
CUTS = [
    next(s for s in range(1000) if random.Random(s).choice([0.0, 1.0, 0.5]) == kind)
    for kind in (0.0, 1.0, 0.5)
]


def page(k: int) -> bytes:
    return random.Random(k).randbytes(PAGE)


class Cluster:
    """The four servers, each a storage service on a store on a disk that can lose power."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = {sid: PowerLossFiles(root / f"trash-{sid}") for sid in SERVERS}
        self.stores = {
            sid: DiskPageStore(root / sid, sid, files=self.files[sid]) for sid in SERVERS
        }
        self.services: dict[str, StorageService] = {}
        for sid, store in self.stores.items():
            store.open()
            self.services[sid] = StorageService(store, sid, lambda: 0.0)
            self.services[sid].epoch = EPOCH

    async def send(self, sid: str, msg: m.Message, payload: Payload = b"") -> Any:
        reply, _ = await call(self.services[sid], msg, bytes(payload))
        return reply

    def power_cut(self, seed: int) -> None:
        for k, sid in enumerate(SERVERS):
            self.files[sid].power_cut(seed + k)
            self.stores[sid].abandon()


def worker_over(cluster: Cluster, proposed: list[cm.Command]) -> Worker:
    """The leader's worker, its requests going straight to the services."""

    async def propose(cmd: cm.Command) -> None:
        proposed.append(cmd)

    worker = Worker(None, b"", lambda: True, propose)  # type: ignore[arg-type]

    async def direct(sid: str, msg: m.Message, payload: Payload = b"") -> tuple[Any, Payload]:
        return await call(cluster.services[sid], msg, bytes(payload))

    worker._call_with_payload = direct  # type: ignore[method-assign]
    return worker


async def flushed_source(root: Path) -> Cluster:
    """The four servers, with every page created and flushed in layer SOURCE on s1, s2."""
    cluster = Cluster(root)
    for sid in ("s1", "s2"):
        for k in range(PAGES):
            create = m.CreateRequest(VOL, EPOCH, SOURCE, k, PAGE, FULL, False)
            assert (await cluster.send(sid, create, page(k))).created
        await cluster.send(sid, m.FlushRequest(VOL, EPOCH))
    return cluster


async def check_target(root: Path, volume_id: int) -> None:
    """After the power cut: both copies of layer TARGET hold every page exactly."""
    after = Cluster(root)
    for sid in ("s3", "s4"):
        for k in range(PAGES):
            reply, data = await call(
                after.services[sid], m.ReadRequest(volume_id, EPOCH, TARGET, k, PAGE, 0, PAGE)
            )
            assert isinstance(reply, m.ReadResponse)
            assert reply.state == PageState.PRESENT, f"page {k} on {sid}: {reply}"
            assert data == page(k), f"page {k} on {sid} reads other bytes"
    for store in after.stores.values():
        await store.close()


@pytest.mark.parametrize("cut", CUTS, ids=["keep none", "keep all", "keep some"])
def test_a_migration_then_a_power_cut_of_every_server_loses_nothing_flushed(
    tmp_path: Path, cut: int
) -> None:
    """Every page flushed into the source before the migration reads back exactly from
    the target after the migration completed and every server lost power."""

    async def main() -> None:
        cluster = await flushed_source(tmp_path)
        proposed: list[cm.Command] = []
        worker = worker_over(cluster, proposed)
        state = dict.fromkeys(SERVERS, cm.ServerState.UP)
        for _ in range(10):
            await worker._move_all(CMAP, EPOCH, state, asyncio.Semaphore(4))
            if proposed:
                break
        assert proposed == [cm.MigrationDone(SOURCE)], proposed
        for sid in ("s1", "s2"):  # the leader, once MigrationDone is published
            await cluster.send(sid, m.DeleteLayerRequest(VOL, EPOCH + 1, SOURCE))
        for sid in ("s1", "s2"):
            # their background pass (each server runs its own): the log is committed,
            # so the tombstoned pages are punched and the layer file removed
            await cluster.stores[sid].persist_restores()
            assert not (tmp_path / sid / "layers" / f"{SOURCE}.data").exists()
        cluster.power_cut(cut)

        await check_target(tmp_path, VOL)

    asyncio.run(asyncio.wait_for(main(), 60))


#: a clone ``c`` of ``v`` being flattened: v's layer SOURCE on s1, s2 below its own
#: (lowest) layer TARGET, on s3, s4
CLONE = cm.Volume("c", VOL + 1, PAGES * PAGE, PAGE, 2, 1, (SOURCE, TARGET), EPOCH, flattening=True)
FLATTENING = cm.ClusterMap(
    EPOCH, EPOCH, CMAP.servers,
    {"v": cm.Volume("v", VOL, PAGES * PAGE, PAGE, 2, 1, (SOURCE,), EPOCH), "c": CLONE},
    {
        SOURCE: cm.Layer(SOURCE, VOL, (("s1", "s2"),), cm.LayerRole.SNAPSHOT, None),
        TARGET: cm.Layer(TARGET, VOL + 1, (("s3", "s4"),), cm.LayerRole.LIVE, None),
    },
    VOL + 2, TARGET + 1,
)  # fmt: skip


@pytest.mark.parametrize("cut", CUTS[::2], ids=["keep none", "keep some"])
def test_a_flatten_then_a_power_cut_of_the_clones_servers_loses_nothing(
    tmp_path: Path, cut: int
) -> None:
    """The worker copies a clone's shared pages into its own layer and proposes
    FlattenDone (after which the clone no longer reads the shared layer); the clone's
    servers then lose power: its own layer still holds every page."""

    async def main() -> None:
        cluster = await flushed_source(tmp_path)
        proposed: list[cm.Command] = []
        worker = worker_over(cluster, proposed)
        state = dict.fromkeys(SERVERS, cm.ServerState.UP)
        await worker._flatten_all(FLATTENING, EPOCH, state, asyncio.Semaphore(4))
        assert proposed == [cm.FlattenDone("c")], proposed
        cluster.power_cut(cut)

        await check_target(tmp_path, VOL + 1)

    asyncio.run(asyncio.wait_for(main(), 60))

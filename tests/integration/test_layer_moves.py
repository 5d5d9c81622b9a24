"""Pages moving between layers on a real cluster: the patent's Fig. 4 (migration) and
Fig. 5 (snapshot) with six pages A-F checked page by page, two drivers copying up the
same not-yet-moved pages while the worker moves them [0050], and a migration run online
under a verified fio writer, also with a storage server or the manager leader killed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from lamina.client import Cluster
from lamina.errors import NotFound
from lamina.wire import messages as m
from lamina.wire.messages import PageState
from tests.integration.test_driver import storage_client, volume_info
from tests.integration.test_faults import REGION, WRITER, check_quiet, finish_writer, running
from tests.integration.test_layers import at_its_epoch, ok, wait_for
from tests.integration.test_resync import status, wait_state
from tests.integration.volumes import LocalCluster, MiB, local_cluster, start_fio

pytestmark = pytest.mark.integration

PAGE = 64 * 1024
LETTERS = b"ABCDEF"


def page_of(letter: int) -> bytes:
    return bytes([letter]) * PAGE


async def page_states(lc: LocalCluster, layer: dict[str, Any], pages: int) -> list[set[int]]:
    """For each page, the states its copies in ``layer`` report (STATUS on every copy;
    a server that no longer knows the layer counts as ABSENT)."""
    epoch = status(lc)["published_epoch"]
    states: list[set[int]] = [set() for _ in range(pages)]
    for page in range(pages):
        part = layer["placement"][page % len(layer["placement"])]
        for sid in part:
            client = await storage_client(lc, sid)

            def status_of(e: int, p: int = page) -> m.Message:
                return m.StatusRequest(layer["volume_id"], e, layer["id"], (p,))

            try:
                reply = await at_its_epoch(client, epoch, status_of)
                states[page].add(reply.entries[0][1])
            except NotFound:
                states[page].add(PageState.ABSENT)
            finally:
                client.close()
    return states


def six_pages(lc: LocalCluster, name: str) -> None:
    """Volume ``name``: six pages holding A..F, over two partitions."""
    done = lc.cli(
        "volume", "create", name, "--size", str(6 * PAGE), "--replicas", "2", "--stripe",
        "2", "--page-size", str(PAGE), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    async def fill() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open(name)
            await vol.write(0, b"".join(page_of(c) for c in LETTERS))
            await vol.close()

    asyncio.run(fill())


async def read_pages(cluster: Cluster, name: str) -> list[bytes]:
    vol = await cluster.open(name, read_only=True)
    try:
        data = await vol.read(0, 6 * PAGE)
    finally:
        await vol.close()
    return [data[k * PAGE : (k + 1) * PAGE] for k in range(6)]


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with local_cluster(tmp_path_factory.mktemp("moves"), 1, 3) as cluster:
        yield cluster


def test_fig4_a_migration_moves_each_page_once_and_tombstones_it(lc: LocalCluster) -> None:
    """Fig. 4: the old layer holds A-F; after the migration starts, a write to page 1
    copies it up first (4B: page 1 in the new layer, an X in the old one); the worker
    moves the rest (4C) and the old layer leaves the map.  At every step each page is in
    exactly one layer (moved: tombstoned below) and reads back right."""
    six_pages(lc, "fig4")
    old = volume_info(lc, "fig4")["layers"][0]
    ok(lc, "volume", "migrate", "fig4", "--servers", "s2,s3")
    info = volume_info(lc, "fig4")
    new = info["layers"][-1]
    assert [x["id"] for x in info["layers"]] == [old["id"], new["id"]]
    assert {s for part in new["placement"] for s in part} <= {"s2", "s3"}

    async def steps() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open("fig4")
            await vol.write(PAGE + 10, b"b")  # 4B: page 1 migrates as a prelude to the write
            await vol.close()
            expected = [page_of(c) for c in LETTERS]
            expected[1] = page_of(ord("B"))[:10] + b"b" + page_of(ord("B"))[11:]
            deadline = time.monotonic() + 30
            while True:
                below = await page_states(lc, old, 6)
                above = await page_states(lc, new, 6)
                assert await read_pages(cluster, "fig4") == expected
                for page in range(6):
                    if PageState.PRESENT not in above[page]:
                        # not moved yet: the old layer holds it, unmarked
                        assert below[page] == {PageState.PRESENT}, (page, below, above)
                    # (moved: copied up first, then marked deleted below; a look between
                    # the two steps may see both)
                assert above[1] == {PageState.PRESENT}
                assert below[1] <= {PageState.TOMBSTONE, PageState.ABSENT}
                if all(a == {PageState.PRESENT} for a in above) and all(
                    b <= {PageState.TOMBSTONE, PageState.ABSENT} for b in below
                ):
                    break  # 4C: every page moved, every old one marked deleted
                assert time.monotonic() < deadline, f"not all moved: {above}"
                await asyncio.sleep(0.1)

    asyncio.run(steps())
    wait_for("the old layer to go", lambda: len(volume_info(lc, "fig4")["layers"]) == 1)


def test_fig5_a_snapshot_keeps_every_page_while_the_new_layer_takes_writes(
    lc: LocalCluster,
) -> None:
    """Fig. 5: after a snapshot of A-F, a write to page 1 copies it into the new layer
    and changes it there (5B); the snapshot's page 1 still holds B, never marked deleted.
    Writing every page (5C) leaves the snapshot layer exactly as it was."""
    six_pages(lc, "fig5")
    ok(lc, "snapshot", "create", "fig5", "t0")
    info = volume_info(lc, "fig5")
    snap, new = info["layers"]

    async def steps() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            original = [page_of(c) for c in LETTERS]
            vol = await cluster.open("fig5")
            await vol.write(PAGE, page_of(ord("b")))  # 5B
            assert await page_states(lc, new, 6) == [
                {PageState.ABSENT},
                {PageState.PRESENT},
                *[{PageState.ABSENT}] * 4,
            ]
            assert await page_states(lc, snap, 6) == [{PageState.PRESENT}] * 6
            assert await read_pages(cluster, "fig5@t0") == original
            assert (await read_pages(cluster, "fig5"))[1] == page_of(ord("b"))
            for k, c in enumerate(b"abcdef"):  # 5C
                await vol.write(k * PAGE + 7, bytes([c]))
            await vol.close()
            assert await page_states(lc, new, 6) == [{PageState.PRESENT}] * 6
            assert await page_states(lc, snap, 6) == [{PageState.PRESENT}] * 6
            assert await read_pages(cluster, "fig5@t0") == original
            expected = [bytearray(p) for p in original]
            expected[1] = bytearray(page_of(ord("b")))
            for k, c in enumerate(b"abcdef"):
                expected[k][7] = c
            assert await read_pages(cluster, "fig5") == expected

    asyncio.run(steps())


def test_two_drivers_copying_up_the_same_pages_during_a_migration(lc: LocalCluster) -> None:
    """[0050]: two drivers write different bytes of the same not-yet-moved pages while the
    worker moves them; a late copy-up (CREATE_IF_ABSENT of the old page) never overwrites
    what the other driver already wrote on top of its own copy-up."""
    pages = 24
    done = lc.cli(
        "volume", "create", "race", "--size", str(pages * PAGE), "--replicas", "2",
        "--stripe", "2", "--page-size", str(PAGE), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    base = bytes(range(256)) * (pages * PAGE // 256)

    async def main() -> bytes:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            a = await cluster.open("race")
            await a.write(0, base)
            ok(lc, "volume", "migrate", "race", "--servers", "s1,s3")
            # a second open of the same session: its own copy-ups, presence maps and
            # views, racing the first one's (one session's connections are shared)
            b = await cluster.open("race")
            expected = bytearray(base)
            writes = []
            for page in range(pages):
                for k, vol in enumerate((a, b)):
                    at = page * PAGE + 100 + 1000 * k
                    chunk = bytes([0xA0 + k]) * 500
                    expected[at : at + 500] = chunk
                    writes.append(vol.write(at, chunk))
            await asyncio.gather(*writes)
            assert await a.read(0, pages * PAGE) == expected
            assert await b.read(0, pages * PAGE) == expected
            await b.close()
            await a.close()
            return bytes(expected)

    expected = asyncio.run(main())
    wait_for("the migration", lambda: not volume_info(lc, "race")["migration"])

    async def after() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open("race", read_only=True)
            assert await vol.read(0, pages * PAGE) == expected
            await vol.close()

    asyncio.run(after())


def digest(lc: LocalCluster, name: str) -> str:
    """sha256 of the whole of volume (or snapshot) ``name``, read by the driver."""

    async def main() -> str:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open(name, read_only=True)
            sha = hashlib.sha256()
            for offset in range(0, vol.size, 4 * MiB):
                sha.update(await vol.read(offset, min(4 * MiB, vol.size - offset)))
            await vol.close()
            return sha.hexdigest()

    return asyncio.run(main())


def migrate_under_fio(
    lc: LocalCluster, cwd: Path, servers: str, fault: Any = None
) -> dict[str, Any]:
    """Volume v written by a verified fio through `lamina nbd` while it migrates to
    ``servers`` (``fault()`` runs right after the migration starts; snapshots are taken
    before it and after the fault); returns fio's result once the migration finished,
    fio ended with no error, both snapshots read back unchanged, and the quiet checks
    passed."""
    lc.create_volume("v", 64 * MiB, replicas=2, stripe=2)
    exporter = lc.export("v")
    job = start_fio(exporter.uri, cwd, *WRITER, prefix=lc.prefix)
    time.sleep(2)
    running(job, "the migration")
    ok(lc, "snapshot", "create", "v", "before")
    taken = {"before": digest(lc, "v@before")}
    ok(lc, "volume", "migrate", "v", "--servers", servers)
    if fault is not None:
        fault()
    ok(lc, "snapshot", "create", "v", "during")  # taken after the fault, mid-migration
    taken["during"] = digest(lc, "v@during")
    running(job, "the migration ran")
    result = finish_writer(job)
    # the snapshots never changed, while fio wrote on and the layers moved
    for name, sha in taken.items():
        assert digest(lc, f"v@{name}") == sha, name
    wait_for("the migration", lambda: not volume_info(lc, "v")["migration"], timeout=90)
    info = volume_info(lc, "v")
    for layer in info["layers"]:
        assert {s for part in layer["placement"] for s in part} <= set(servers.split(",")), info
    check_quiet(lc, exporter, cwd)
    return result


def test_a_migration_runs_online_under_a_verified_writer(tmp_path: Path) -> None:
    """fio keeps writing and verifying through the whole migration (and a snapshot taken
    during it): no error, every block reads back, and no I/O waits a second or more."""
    with local_cluster(tmp_path / "cluster", 1, 3) as lc:
        result = migrate_under_fio(lc, tmp_path, "s2,s3")
        for rw in ("write", "read"):
            worst = result[rw]["clat_ns"]["max"] / 1e9
            print(f"longest {rw} during the migration: {worst:.3f} s")
            assert worst < 1.0, f"a {rw} waited {worst:.2f} s during the migration"
        assert result["write"]["io_bytes"] == REGION


def test_a_migration_with_a_storage_server_killed(tmp_path: Path) -> None:
    """kill -9 of a server that both placements use, right after the migration starts;
    `lamina up` restarts it; the move completes and nothing is lost."""
    with local_cluster(tmp_path / "cluster", 1, 3) as lc:

        def kill_s2() -> None:
            time.sleep(1)
            os.kill(lc.storage_pid("s2"), signal.SIGKILL)
            wait_state(lc, "s2", "down", timeout=20)
            time.sleep(2)
            assert lc.up(1, 3)["started"] == ["s2"]

        migrate_under_fio(lc, tmp_path, "s2,s3", kill_s2)


def test_a_migration_with_the_manager_leader_killed(tmp_path: Path) -> None:
    """kill -9 of the manager leader of three right after the migration starts: the new
    leader's worker resumes the move from what the servers hold."""
    with local_cluster(tmp_path / "cluster", 3, 3) as lc:

        def kill_leader() -> None:
            time.sleep(1)
            old = status(lc)["leader"]["id"]
            os.kill(int((lc.root / "run" / f"{old}.pid").read_text()), signal.SIGKILL)
            killed = time.monotonic()
            while (status(lc)["leader"] or {}).get("id") in (None, old):
                assert time.monotonic() - killed < 20, f"no new leader: {status(lc)}"
                time.sleep(0.2)

        migrate_under_fio(lc, tmp_path, "s1,s3", kill_leader)
        assert json.dumps(status(lc)["volumes"])

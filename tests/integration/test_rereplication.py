"""Re-replication on real processes: a server whose copy moved away while it was down
comes back fenced for that copy, never serves it, and has its space reclaimed; when a
copy is placed back on it, the fill starts from nothing, so every acknowledged write
reads back and a scrub finds every copy equal."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lamina.client import Cluster
from lamina.errors import NoLease, StaleEpoch, Unavailable
from lamina.storage.syncmask import FULL
from lamina.wire import messages as m
from tests.integration.test_driver import storage_client, volume_info
from tests.integration.test_resync import copies_of, read_whole, scrub, status, wait_state
from tests.integration.volumes import LocalCluster, MiB, local_cluster

pytestmark = pytest.mark.integration

PAGES = 4
REREPLICATE = ("--rereplicate-after", "2")


def write_flushed(lc: LocalCluster, name: str, data: bytes) -> None:
    """Write ``data`` at offset 0 of ``name`` through the driver and FLUSH it."""

    async def main() -> None:
        async with await Cluster.connect(lc.cluster_file) as cluster:
            vol = await cluster.open(name)
            await vol.write(0, data)
            await vol.flush()
            await vol.close()

    asyncio.run(main())


def wait_layer(
    lc: LocalCluster, name: str, done: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """The volume's (only) layer once ``done`` holds for it (60 s at most)."""
    deadline = time.monotonic() + 60
    while True:
        layer: dict[str, Any]
        (layer,) = volume_info(lc, name)["layers"]
        if done(layer):
            return layer
        assert time.monotonic() < deadline, f"{what}: {layer}"
        time.sleep(0.3)


def wait_gone(path: Path, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while path.exists():
        assert time.monotonic() < deadline, f"{what}: {path} is still there"
        time.sleep(0.2)


async def ask(lc: LocalCluster, sid: str, msg: m.Message, payload: bytes = b"") -> m.Message:
    """Server ``sid``'s answer to ``msg`` (retried while it has no lease yet or catches up)."""
    client = await storage_client(lc, sid)
    try:
        for _ in range(100):
            try:
                reply, _ = await client.call_with_payload(msg, payload)
                return reply
            except (Unavailable, NoLease):
                await asyncio.sleep(0.1)
        raise AssertionError(f"{sid} stayed unavailable for {msg}")
    finally:
        client.close()


def read_at(lc: LocalCluster, sid: str, info: dict[str, Any], epoch: int) -> m.Message:
    """Server ``sid``'s answer to a READ of page 0 of the volume's layer at ``epoch``."""
    layer = info["layers"][-1]["id"]
    return asyncio.run(ask(lc, sid, m.ReadRequest(info["id"], epoch, layer, 0, MiB, 0, MiB)))


def test_a_replaced_copy_that_comes_back_is_fenced_emptied_and_never_trusted(
    tmp_path: Path,
) -> None:
    """(s1,s2) hold A; s2 dies and its copy moves to s3, which is filled; B is written.
    s2 comes back: it refuses its old copy at the old epoch (an idle read-only client
    that still has the old map reads B), and the copy's file goes away; restarted again,
    it refuses a write of the old map that would bring the layer back.  Then s3 dies and
    the copy moves back to s2: it is filled whole, so every copy and every read is B, a
    scrub finds nothing, and s3's old copy is reclaimed once it is back."""
    size = PAGES * MiB
    old, new = b"\xaa" * size, b"\xbb" * size
    root = tmp_path / "cluster"
    with local_cluster(root, 1, 3, *REREPLICATE) as lc:
        info = lc.create_volume("v", size, replicas=2, stripe=1)
        (layer,) = info["layers"]
        lid = layer["id"]
        first, second = layer["placement"][0]
        (third,) = {"s1", "s2", "s3"} - {first, second}
        write_flushed(lc, "v", old)
        old_epoch = status(lc)["published_epoch"]
        idle = lc.export("v", "--read-only")  # opens now: it keeps this map while idle

        os.kill(lc.storage_pid(second), signal.SIGKILL)
        wait_layer(lc, "v", lambda la: la["placement"] == [[first, third]] and not la["filling"],
                   f"{second}'s copy never moved to {third}")  # fmt: skip
        write_flushed(lc, "v", new)

        lc.up(1, 3, *REREPLICATE)  # s2 again, holding A
        wait_state(lc, second, "up", timeout=60)
        # its old copy is fenced: a request of the old map is refused there
        with pytest.raises(StaleEpoch):
            read_at(lc, second, info, old_epoch)
        # the idle client, still on the old map, reads B (real NBD client, verified bytes)
        done = subprocess.run(
            ["qemu-io", "-r", "-f", "raw", "-c", f"read -P 0xbb 0 {size}", idle.uri],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "failed" not in done.stdout, done.stdout
        # and the space of the copy it no longer holds is reclaimed
        wait_gone(root / second / "layers" / f"{lid}.data", f"{second}'s old copy stayed")
        # restarted after that, it knows nothing of the volume: a writer of the old map
        # cannot bring the layer back there
        os.kill(lc.storage_pid(second), signal.SIGKILL)
        wait_state(lc, second, "down", timeout=60)
        lc.up(1, 3, *REREPLICATE)
        wait_state(lc, second, "up", timeout=60)
        zombie = m.WriteRequest(info["id"], old_epoch, lid, 0, MiB, 0, FULL, FULL, False)
        with pytest.raises(StaleEpoch):
            asyncio.run(ask(lc, second, zombie, old[:MiB]))

        os.kill(lc.storage_pid(third), signal.SIGKILL)
        wait_layer(lc, "v", lambda la: la["placement"] == [[first, second]] and not la["filling"],
                   f"{third}'s copy never moved back to {second}")  # fmt: skip
        info = volume_info(lc, "v")
        for page in range(PAGES):
            copies = asyncio.run(copies_of(lc, info, page))
            assert copies == [new[:MiB], new[:MiB]], f"page {page}: a copy is not B"
        assert read_whole(lc, "v", size) == new
        report = scrub(lc, "v")
        assert (report["mismatches"], report["errors"]) == (0, 0), report
        assert read_whole(lc, "v", size) == new

        lc.up(1, 3, *REREPLICATE)  # s3 again, holding B in a copy it no longer has
        wait_gone(root / third / "layers" / f"{lid}.data", f"{third}'s old copy stayed")
        with pytest.raises(StaleEpoch):
            read_at(lc, third, info, old_epoch)
        assert read_whole(lc, "v", size) == new

"""A mask bit vouches only for durable bytes (docs/protocol.md, "When a mask bit comes
back"), on real processes whose disks can lose power.

The sequence that lost a flushed write: both copies acknowledge a write; the driver
confirmed its tokens at once, so the first copy's mask vouched for the second, whose
bytes were still only in its page cache.  The second server then stops (SIGSTOP), the
client's FLUSH goes on without it once it is marked down, and the second server loses
power (its page cache is gone), then the first one too.  Both come back `recovering`:
with no copy up, partition order picked the second copy, the one the first copy's mask
vouched for, and its old bytes replaced the flushed ones.  Now the tokens go back only
once a FLUSH succeeded on every copy, and with no copy up the source is a copy whose
server was up last.  The volume has two partitions, so each server is copy 0 of one.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest

from lamina.client.driver import Cluster
from tests.integration.test_faults import wait_quiet
from tests.integration.test_powerloss import (
    BLOCK,
    QUIET,
    VOLUME,
    Model,
    _running,
    batch,
    check_image,
    power_cut,
    run_writes,
)
from tests.integration.test_resync import scrub, wait_state
from tests.integration.volumes import local_cluster

pytestmark = pytest.mark.integration


def test_a_flush_that_went_on_without_a_copy_survives_every_server_losing_power(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAMINA_TEST_POWERCUT", "1")
    rng = random.Random(11)
    model = Model()
    with local_cluster(tmp_path / "cluster", 1, 2) as lc:
        lc.create_volume("v", VOLUME, replicas=2, stripe=2)
        exporter = lc.export("v")
        # old bytes everywhere, flushed, and their masks clean on disk
        run_writes(exporter, model, batch(rng, model, 32, 256 * 1024), flush=True)
        exporter.stop()
        s2 = lc.storage_pid("s2")
        new = batch(rng, model, 64, BLOCK)

        async def write_stop_flush() -> None:
            """New bytes acknowledged by both copies; s2 stops before any FLUSH; then the
            client's FLUSH, which goes on without s2 once it is marked down."""
            async with await Cluster.connect(lc.cluster_file) as cluster:
                vol = await cluster.open("v")
                for off, n, pat in new:
                    await vol.write(off, bytes([pat]) * n)
                    model.wrote(off, n, pat)
                await asyncio.sleep(1)  # the old driver had confirmed their tokens by now
                os.kill(s2, signal.SIGSTOP)
                await vol.flush()
                model.flush()  # from now on every write so far is owed
                await vol.close()

        try:
            asyncio.run(write_stop_flush())
            wait_state(lc, "s2", "down", timeout=60)
        finally:
            # s2 loses power: its page cache (the twin's unsynced blocks) dies with it
            os.kill(s2, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _running(s2):
            assert time.monotonic() < deadline, "s2 did not die"
            time.sleep(0.05)
        power_cut(lc, ["s1"])
        assert sorted(lc.up(1, 2)["started"]) == ["s1", "s2"]
        wait_quiet(lc, QUIET)
        check_image(lc, model, tmp_path, "after s2 missed the FLUSH and both lost power")
        report = scrub(lc, "v")
        assert (report["mismatches"], report["corrupt"], report["errors"]) == (0, 0, 0), report

"""A resynchronisation, then a power cut of every copy: the write it repaired survives.

Two real storage services on on-disk stores whose files sit on a disk that can lose
power (:class:`lamina.storage.powerloss.PowerLossFiles`).  A client write reached both
copies of a page (each durably disowns the other) and a FLUSH succeeded on s3 alone, so
the write is durable there and owed.  The worker's real ``_resync_page`` then copies
the page from s2 (partition order: the masks disown each other), which holds the write
in its page cache only, and marks both clean.  s3's background pass persists its mask
(it vouches for s2 now); s2's has not run yet when the power of both goes: s2 is back
with its old bytes, and only the masks say which copy to copy from.

A mask bit promises that the other copy holds the same bytes *durably* (docs/protocol.md,
"When a mask bit comes back"): so before marking any copy clean the repair makes the
bytes of every copy it did not write (``fua``) durable, the source's first.  Without
that, s3 vouched for bytes s2 never had on disk, s2 (disowned by no one) was the
source after the cut, and the flushed write was gone from both copies.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from lamina.mgmt import clustermap as cm
from lamina.storage.diskstore import DiskPageStore
from lamina.storage.powerloss import PowerLossFiles, seed_keeping
from lamina.storage.service import StorageService
from lamina.storage.syncmask import FULL, IN_FLIGHT
from lamina.wire import messages as m
from lamina.wire.framing import Payload
from lamina.wire.messages import PageState
from tests.contract import test_resync_races as races
from tests.contract.test_service_contract import Clock, call, page_bytes

COPIES, EPOCH, LAYER, PAGE, VOL = races.COPIES, races.EPOCH, races.LAYER, races.PAGE, races.VOL
UP = dict.fromkeys(COPIES, cm.ServerState.UP)
KEEP_NONE = seed_keeping(0.0, 0.0)  # a power cut that keeps no unsynced block


class Copies:
    """The two servers, each a storage service on a disk that can lose power."""

    def __init__(self, root: Path, clock: Clock) -> None:
        self.files = {sid: PowerLossFiles(root / f"trash-{sid}") for sid in COPIES}
        self.stores = {sid: DiskPageStore(root / sid, sid, files=self.files[sid]) for sid in COPIES}
        self.services: dict[str, StorageService] = {}
        for sid, store in self.stores.items():
            store.open()
            self.services[sid] = StorageService(store, sid, clock)
            self.services[sid].epoch = EPOCH

    async def send(self, sid: str, msg: m.Message, payload: Payload = b"") -> Any:
        reply, _ = await call(self.services[sid], msg, bytes(payload))
        return reply

    async def read(self, sid: str) -> tuple[int, bytes]:
        reply, data = await call(
            self.services[sid], m.ReadRequest(VOL, EPOCH, LAYER, 0, PAGE, 0, PAGE)
        )
        assert isinstance(reply, m.ReadResponse)
        return reply.state, bytes(data)

    def power_cut(self, seed: int) -> None:
        for sid in COPIES:
            self.files[sid].power_cut(seed)
            self.stores[sid].abandon()


def test_a_repaired_write_flushed_on_one_copy_survives_a_power_cut_of_both(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        clock = Clock()
        copies = Copies(tmp_path, clock)
        old, new = page_bytes(1, PAGE), page_bytes(2, PAGE)
        for sid in COPIES:
            create = m.CreateRequest(VOL, EPOCH, LAYER, 0, PAGE, FULL, False)
            assert (await copies.send(sid, create, old)).created
            await copies.send(sid, m.FlushRequest(VOL, EPOCH))
        for k, sid in enumerate(COPIES):
            await copies.send(sid, races.client_write(k, 0), new)  # its tokens never come back
        await copies.send("s3", m.FlushRequest(VOL, EPOCH))  # s2's FLUSH did not happen
        clock.now += IN_FLIGHT + 1  # no longer a write on its way

        worker = races.worker_over(copies.services)
        assert await worker._resync_page(races.VOLUME, races.TOP, 0, EPOCH, UP, defer=False)
        for sid in COPIES:
            assert await copies.read(sid) == (PageState.PRESENT, new), sid
        await copies.stores["s3"].persist_restores()  # its background pass; s2's is later
        copies.power_cut(KEEP_NONE)

        after = Copies(tmp_path, clock)
        worker = races.worker_over(after.services)
        for _ in range(3):  # a repair, if the masks ask for one, then nothing to do
            await worker._resync_page(races.VOLUME, races.TOP, 0, EPOCH, UP, defer=False)
        for sid in COPIES:
            assert await after.read(sid) == (PageState.PRESENT, new), f"{sid} lost the write"
        for store in after.stores.values():
            await store.close()

    asyncio.run(asyncio.wait_for(main(), 60))

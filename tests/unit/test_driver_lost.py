"""A page whose every copy is quarantined is lost: the driver fails its reads and the
writes that do not cover it whole at once (PageLost, an I/O error), serves every other
page, and a whole-page write makes it whole again.  Over real storage services."""

from __future__ import annotations

import asyncio

import pytest

from lamina.client import driver
from lamina.storage.memstore import MemPageStore
from lamina.wire.messages import PageState
from tests.unit.test_driver_flush import OLD, PAGE, Cluster, open_volume

BAD = 2


def quarantine(cluster: Cluster, sid: str, page: int) -> None:
    """Page ``page`` of the layer on ``sid`` failed its checksums (as a store finds it)."""
    store = cluster.services[sid].store
    assert isinstance(store, MemPageStore)
    store._layers[OLD].pages[page].state = PageState.QUARANTINED


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_a_page_quarantined_on_every_copy_fails_at_once(read_only: bool) -> None:
    """Reads of the lost page raise PageLost within a second (no resync loop, no
    recursion), other pages read back; on a writable open a partial write into it
    raises PageLost too, and a whole-page write heals it."""

    async def main() -> None:
        cluster = Cluster()
        vol = open_volume(cluster, "none")
        pages = [bytes([k + 1]) * PAGE for k in range(4)]
        await vol.write(0, b"".join(pages))
        for sid in ("s1", "s2"):
            quarantine(cluster, sid, BAD)
        if read_only:
            vol = driver.Volume(cluster, vol.view, read_only=True)  # type: ignore[arg-type]
        with pytest.raises(driver.PageLost, match="write the whole page again"):
            await asyncio.wait_for(vol.read(BAD * PAGE + 100, 10), 1)
        assert await vol.read(0, BAD * PAGE) == b"".join(pages[:BAD])
        assert await vol.read((BAD + 1) * PAGE, PAGE) == pages[BAD + 1]
        if read_only:
            return
        with pytest.raises(driver.PageLost):
            await asyncio.wait_for(vol.write(BAD * PAGE + 4096, b"x" * 4096), 1)
        await asyncio.wait_for(vol.write(BAD * PAGE, b"y" * PAGE), 1)
        assert await vol.read(BAD * PAGE, PAGE) == b"y" * PAGE

    asyncio.run(main())

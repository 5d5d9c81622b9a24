"""The lamina driver: volumes of a cluster as byte-addressed block devices.

    async with await Cluster.connect("lamina-data/cluster.toml") as cluster:
        volume = await cluster.open("db")
        await volume.write(0, b"hello")
        await volume.flush()
        assert await volume.read(0, 5) == b"hello"
        await volume.close()

:mod:`lamina.client.sync` wraps the same API for scripts that do not use asyncio.
"""

from lamina.client.driver import Cluster, LockLost, Volume

__all__ = ["Cluster", "LockLost", "Volume"]

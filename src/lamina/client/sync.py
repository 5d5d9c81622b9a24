"""A synchronous face of the driver, for scripts that do not use asyncio.

    from lamina.client.sync import connect

    with connect("lamina-data/cluster.toml") as cluster:
        with cluster.open("db") as volume:
            volume.write(0, b"hello")
            volume.flush()
            print(volume.read(0, 5))

The driver runs on an event loop in a background thread; every call here waits for its
coroutine there.  Calls may come from several threads at once.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from lamina.client.driver import IO_TIMEOUT, Cluster, Volume

T = TypeVar("T")


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lamina-driver")
        self.thread.daemon = True
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class SyncVolume:
    """An open volume; the methods of :class:`lamina.client.Volume`, blocking."""

    def __init__(self, runner: _Loop, volume: Volume) -> None:
        self._run = runner.run
        self.volume = volume

    @property
    def size(self) -> int:
        return self.volume.size

    @property
    def name(self) -> str:
        return self.volume.name

    def read(self, offset: int, length: int) -> bytes:
        return self._run(self.volume.read(offset, length))

    def write(self, offset: int, data: bytes | bytearray, fua: bool = False) -> None:
        self._run(self.volume.write(offset, data, fua))

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        self._run(self.volume.write_zeroes(offset, length, fua))

    def trim(self, offset: int, length: int) -> None:
        self._run(self.volume.trim(offset, length))

    def flush(self) -> None:
        self._run(self.volume.flush())

    def close(self) -> None:
        self._run(self.volume.close())

    def __enter__(self) -> SyncVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncCluster:
    def __init__(self, runner: _Loop, cluster: Cluster) -> None:
        self._runner = runner
        self.cluster = cluster

    def open(self, name: str, *, read_only: bool = False, takeover: bool = False) -> SyncVolume:
        volume = self._runner.run(self.cluster.open(name, read_only=read_only, takeover=takeover))
        return SyncVolume(self._runner, volume)

    def create_snapshot(self, volume: str, snapshot: str) -> dict[str, Any]:
        return self._runner.run(self.cluster.create_snapshot(volume, snapshot))

    def snapshots(self, volume: str) -> list[dict[str, Any]]:
        return self._runner.run(self.cluster.snapshots(volume))

    def delete_snapshot(self, volume: str, snapshot: str) -> None:
        self._runner.run(self.cluster.delete_snapshot(volume, snapshot))

    def rollback(self, volume: str, snapshot: str) -> None:
        self._runner.run(self.cluster.rollback(volume, snapshot))

    def clone(self, volume: str, snapshot: str, name: str) -> dict[str, Any]:
        return self._runner.run(self.cluster.clone(volume, snapshot, name))

    def close(self) -> None:
        try:
            self._runner.run(self.cluster.close())
        finally:
            self._runner.stop()

    def __enter__(self) -> SyncCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    cluster_file: str | os.PathLike[str] | None = None, *, io_timeout: float = IO_TIMEOUT
) -> SyncCluster:
    """Connect to a cluster (see :meth:`lamina.client.Cluster.connect`)."""
    runner = _Loop()
    try:
        cluster = runner.run(Cluster.connect(cluster_file, io_timeout=io_timeout))
    except BaseException:
        runner.stop()
        raise
    return SyncCluster(runner, cluster)

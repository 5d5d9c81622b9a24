"""The `lamina storage` daemon: a page store served over TCP.

The server only wires things together: it opens the store, builds the service, accepts
connections (:class:`lamina.wire.connection.ServerConnection`) and runs two background
duties: persisting mask restores once their data is durable, and checkpointing the
metadata log.  SIGTERM/SIGINT stop it cleanly (flush + checkpoint); kill -9 is what the
crash model of ``diskstore`` is for.

TEST ONLY: with ``LAMINA_TEST_POWERCUT=1`` in its environment the server keeps its files
on the disk that can lose power (:mod:`lamina.storage.powerloss`, its trash directory
beside the data directory) and SIGUSR2 is a power failure: what was not synced is dropped
(a seeded arbitrary part of it kept; the seed is ``LAMINA_TEST_POWERCUT_SEED`` or random,
and logged) and the process exits at once with status 99.  SIGUSR1 makes the disk fail:
every later fdatasync / fsync fails with EIO (and drops what it should have written).
Any other value of the variable is refused, so it is never switched on by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time

from lamina import daemon
from lamina.config import StorageConfig
from lamina.daemon import write_port_file
from lamina.storage.diskstore import DiskPageStore
from lamina.storage.files import OS_FILES, Files
from lamina.storage.lease import LeaseKeeper
from lamina.storage.powerloss import PowerLossFiles
from lamina.storage.service import Lease, StorageService
from lamina.wire.connection import ServerConnection
from lamina.wire.handshake import load_key

log = logging.getLogger(__name__)

POWERCUT_SEED_ENV = "LAMINA_TEST_POWERCUT_SEED"


def _files(cfg: StorageConfig) -> Files:
    """The files of the store: the os calls, or (test only) the disk that can lose power."""
    if not daemon.powercut_enabled(f"the data directory {cfg.data}"):
        return OS_FILES
    return PowerLossFiles(str(cfg.data).rstrip("/") + ".powercut-trash")


def _failing_disk(files: PowerLossFiles) -> None:
    log.warning("TEST ONLY: from now on every fdatasync and fsync fails with EIO")
    files.fail_syncs = True


def _power_cut(files: PowerLossFiles) -> None:
    seed = int(os.environ.get(POWERCUT_SEED_ENV) or random.randrange(1 << 32))
    log.warning("TEST ONLY: power cut (seed %d, %d unsynced blocks)", seed, files.unsynced_blocks())
    daemon.flush_logs()
    files.power_cut(seed)
    os._exit(daemon.POWERCUT_EXIT)


async def serve(cfg: StorageConfig, ready: asyncio.Event | None = None) -> None:
    key = load_key(cfg.key)
    files = _files(cfg)
    store = DiskPageStore(cfg.data, cfg.id, checkpoint_bytes=cfg.checkpoint_bytes, files=files)
    started = time.monotonic()
    store.open()
    st = store.stats()
    log.info(
        "page store %s open in %.2fs: incarnation %d, %d layers, %d pages, %.1f MiB of data",
        cfg.data,
        time.monotonic() - started,
        store.incarnation,
        st.layers,
        st.pages,
        st.used / (1 << 20),
    )
    lease = Lease(standalone=not cfg.managers)
    service = StorageService(store, cfg.id, time.monotonic, lease)
    loop = asyncio.get_running_loop()
    host, port = cfg.listen_addr
    server = await loop.create_server(lambda: ServerConnection(service, key), host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if isinstance(files, PowerLossFiles):
        loop.add_signal_handler(signal.SIGUSR2, _power_cut, files)
        loop.add_signal_handler(signal.SIGUSR1, _failing_disk, files)
    if cfg.port_file:
        port = server.sockets[0].getsockname()[1]
        write_port_file(cfg.port_file, port)
    mode = "standalone" if lease.standalone else f"managed by {','.join(cfg.managers)}"
    log.info("storage server %s listening on %s:%d (%s)", cfg.id, host, port, mode)
    keeper_task = None
    if not lease.standalone:
        keeper = LeaseKeeper(service, list(cfg.managers), key, store.incarnation)
        keeper_task = asyncio.ensure_future(keeper.run())

        async def catch_up(epoch: int) -> None:  # a request saw a newer map: ask now
            await keeper.renew_once()

        service.catch_up = catch_up
    if ready is not None:
        ready.set()

    async def restores() -> None:
        while True:
            await asyncio.sleep(cfg.mask_sync_interval)
            try:
                await store.persist_restores()
            except Exception:
                log.exception("persisting restores failed")

    duty = asyncio.ensure_future(restores())
    try:
        await stop.wait()
    finally:
        log.info("storage server %s stopping", cfg.id)
        for task in (duty, keeper_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        server.close()
        await store.close()
        log.info("storage server %s stopped cleanly", cfg.id)


def run(cfg: StorageConfig) -> None:
    daemon.run(serve(cfg))

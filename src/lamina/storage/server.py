"""The `lamina storage` daemon: a page store served over TCP.

The server only wires things together: it opens the store, builds the service, accepts
connections (:class:`lamina.wire.connection.ServerConnection`) and runs two background
duties: persisting mask restores once their data is durable, and checkpointing the
metadata log.  SIGTERM/SIGINT stop it cleanly (flush + checkpoint); kill -9 is what the
crash model of ``diskstore`` is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from lamina import daemon
from lamina.config import StorageConfig
from lamina.daemon import write_port_file
from lamina.storage.diskstore import DiskPageStore
from lamina.storage.lease import LeaseKeeper
from lamina.storage.service import Lease, StorageService
from lamina.wire.connection import ServerConnection
from lamina.wire.handshake import load_key

log = logging.getLogger(__name__)


async def serve(cfg: StorageConfig, ready: asyncio.Event | None = None) -> None:
    key = load_key(cfg.key)
    store = DiskPageStore(cfg.data, cfg.id, checkpoint_bytes=cfg.checkpoint_bytes)
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

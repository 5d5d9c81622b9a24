"""``lamina nbd VOLUME``: one volume of a cluster exported over NBD.

The exporter is one driver instance (:class:`lamina.client.Cluster`) with an NBD server
in front of it: the volume is the export's :class:`~lamina.nbd.server.BlockBackend`.  A
read-write export holds the volume's exclusive lock for as long as it runs; SIGTERM or
SIGINT stop it cleanly (stop listening, flush, give the lock back).  When the lock is
revoked (``--takeover`` elsewhere, or the session lapsed) the export stays up but every
write fails with EIO; reads go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from lamina.client import Cluster
from lamina.config import NbdConfig, parse_addr
from lamina.daemon import write_port_file
from lamina.nbd.server import serve_nbd, serve_nbd_unix

log = logging.getLogger(__name__)
#: seconds a stopping exporter waits for its final flush and lock release
CLOSE_TIMEOUT = 15


async def run_export(opts: NbdConfig) -> None:
    """Serve until SIGTERM/SIGINT."""
    cluster = await Cluster.connect(opts.cluster, io_timeout=opts.io_timeout)
    try:
        volume = await cluster.open(opts.volume, read_only=opts.read_only, takeover=opts.takeover)
        exports = {opts.volume: volume, "": volume}  # the default export is the volume
        if opts.socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(opts.socket)
            server = await serve_nbd_unix(exports, opts.socket)
            where = opts.socket
        else:
            host, port = parse_addr(opts.listen or "127.0.0.1:10809")
            server = await serve_nbd(exports, host, port)
            port = server.sockets[0].getsockname()[1]
            where = f"{host}:{port}"
            if opts.port_file:
                write_port_file(opts.port_file, port)
        mode = "read-only" if opts.read_only else "read-write, exclusive"
        log.info(
            "exporting volume %s (%d bytes, %s) over NBD on %s",
            opts.volume, volume.size, mode, where,
        )  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()
        try:  # a cluster that is gone must not keep the exporter from stopping
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await volume.close()
        except TimeoutError:
            log.error(
                "volume %s: the final flush did not finish within %d s; stopping anyway "
                "(writes acknowledged without FUA or FLUSH may not be durable)",
                opts.volume, CLOSE_TIMEOUT,
            )  # fmt: skip
        if opts.socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(opts.socket)
    finally:
        await cluster.close()

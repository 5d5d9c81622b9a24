"""The `lamina manager` daemon: a Raft member serving the HTTP API.

It wires the pieces together: the cluster key (which is also the Raft password), the
admin token, the replicated log (:mod:`lamina.mgmt.raft`) applying committed commands to
the :class:`~lamina.mgmt.service.ManagerService`, and the aiohttp API.  SIGTERM/SIGINT
stop it cleanly; the Raft journal under ``DATA/raft`` survives kill -9 and, once an entry
is acknowledged, a power failure.

TEST ONLY: with ``LAMINA_TEST_POWERCUT=1`` in its environment SIGUSR2 is a power failure
of this manager: between two Raft ticks the journal is put back as it was at its last
sync and the process exits at once with status 99 (:mod:`lamina.mgmt.powerloss`).  Any
other value of the variable is refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path

from aiohttp import web

from lamina import daemon
from lamina.config import ConfigError, ManagerConfig, parse_addr
from lamina.daemon import write_port_file
from lamina.durable import fsync_dir
from lamina.mgmt.http import make_app
from lamina.mgmt.leader import LeaderDuties
from lamina.mgmt.powerloss import RaftPowerCut
from lamina.mgmt.raft import ReplicatedLog
from lamina.mgmt.service import ManagerService
from lamina.mgmt.worker import Worker
from lamina.wire.connection import ServerConnection
from lamina.wire.handshake import load_key

log = logging.getLogger(__name__)


def load_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ConfigError(f"admin token file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"admin token file {path} is unreadable: {exc}") from None
    if len(token) < 16:
        raise ConfigError(f"admin token in {path} is shorter than 16 characters")
    return token


def make_data_dir(data: Path) -> None:
    """Create the manager's data directory if missing, its name durably (the Raft journal
    below it is durable only with it)."""
    if not data.is_dir():
        os.makedirs(data)
        fsync_dir(data.parent)


async def serve(cfg: ManagerConfig) -> None:
    key = load_key(cfg.key)
    token = load_token(cfg.token_path)
    data = Path(cfg.data)
    make_data_dir(data)
    service = ManagerService(cfg.id)
    power = RaftPowerCut() if daemon.powercut_enabled(f"the raft journal of {cfg.id}") else None
    rlog = ReplicatedLog(
        cfg.raft,
        list(cfg.peers),
        data / "raft",
        key.hex(),
        service.apply_entry,
        service.dump,
        service.load,
        observer=power,
    )
    service.log = rlog
    duties = LeaderDuties(
        service,
        # a member that has not caught up does no leader work (its map may be old)
        lambda: rlog.caught_up and rlog.status().is_leader,
        time.monotonic,
        cfg.lease_duration,
        key,
        session_timeout=cfg.session_timeout,
        rereplicate_after=cfg.rereplicate_after,
    )
    loop = asyncio.get_running_loop()
    shost, sport = parse_addr(cfg.storage_listen)
    try:
        wire = await loop.create_server(lambda: ServerConnection(duties, key), shost, sport)
    except OSError as exc:
        rlog.close()
        raise ConfigError(f"cannot listen on {cfg.storage_listen}: {exc.strerror or exc}") from None
    duty_task = asyncio.ensure_future(duties.run())
    worker = Worker(
        service,
        key,
        duties.leading,
        service.submit,
        parallel=cfg.resync_parallel,
        rate_limit=cfg.resync_rate or None,
        scrub_interval=cfg.scrub_interval,
    )
    duties.worker = worker
    worker_task = asyncio.ensure_future(worker.run())
    app = make_app(
        service, token, lambda: dataclasses.asdict(rlog.status()), duties, lambda: rlog.caught_up
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = cfg.listen_addr
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        duty_task.cancel()
        worker_task.cancel()
        wire.close()
        rlog.close()
        raise ConfigError(f"cannot listen on {cfg.listen}: {exc.strerror or exc}") from None
    if cfg.port_file:
        port = runner.addresses[0][1]
        write_port_file(cfg.port_file, port)
    log.info("manager %s: API on %s:%d, storage servers on %s, raft %s, peers %s", cfg.id,
             host, port, cfg.storage_listen, cfg.raft, ",".join(cfg.peers) or "none")  # fmt: skip
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if power is not None:
        loop.add_signal_handler(signal.SIGUSR2, power.request)
    try:
        await stop.wait()
    finally:
        log.info("manager %s stopping", cfg.id)
        duty_task.cancel()
        worker_task.cancel()
        worker.close()
        await duties.close()
        wire.close()
        await runner.cleanup()
        rlog.close()
        log.info("manager %s stopped cleanly", cfg.id)


def run(cfg: ManagerConfig) -> None:
    daemon.run(serve(cfg))

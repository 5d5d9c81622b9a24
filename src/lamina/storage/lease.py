"""The storage server's side of its lease: ask the manager leader, again and again.

Theory of operation
-------------------
Every third of a lease the keeper sends LEASE to the manager it last reached (trying
the others in turn when that fails or is not the leader).  It reads the clock *before*
sending, and a grant of duration ``d`` makes the lease valid until ``t_sent + d``: so
however long the request or the answer was delayed, or the process paused, the lease
never outlives what the leader granted (see :mod:`lamina.mgmt.leases`).  The answer also
carries the map's epoch and the fence epochs of this server's volumes, which are
applied as SET_EPOCH would, before the lease is extended: a server learns the epoch
before it serves.  A server whose lease lapses refuses data requests (NO_LEASE) until a
grant arrives again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from lamina.config import parse_addr
from lamina.errors import LaminaError
from lamina.storage.service import StorageService
from lamina.wire import messages as m
from lamina.wire.connection import Client

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        service: StorageService,
        managers: list[str],
        key: bytes,
        incarnation: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.managers = managers
        self.key = key
        self.incarnation = incarnation
        self.clock = clock
        self.period = 1.0  # until the first grant tells the duration
        self._next = 0  # index of the manager to try first
        self._client: Client | None = None
        self.granted = 0
        self._stopped = False  # the store failed: no more lease requests

    async def renew_once(self) -> bool:
        """One attempt over the managers, starting with the last good one.  A server whose
        store has failed asks no more: its lease runs out and the leader marks it down."""
        failed = self.service.store.failure
        if failed is not None:
            if not self._stopped:
                self._stopped = True
                log.error("store failed: no more lease requests (%s)", failed)
            return False
        for i in range(len(self.managers)):
            index = (self._next + i) % len(self.managers)
            try:
                reply = await self._ask(self.managers[index])
            except (LaminaError, OSError) as exc:
                log.debug("lease from %s: %s", self.managers[index], exc)
                self._drop_client()
                continue
            self._next = index
            return reply
        return False

    async def _ask(self, addr: str) -> bool:
        if self._client is None or not self._client.connected:
            host, port = parse_addr(addr)
            self._client = await Client.connect(
                host, port, self.key, peer=f"storage/{self.service.server_id}", timeout=2.0
            )
        svc = self.service
        sent = self.clock()
        async with asyncio.timeout(2.0):
            reply = await self._client.call(
                m.LeaseRequest(svc.server_id, svc.epoch, self.incarnation)
            )
        if not isinstance(reply, m.LeaseResponse):
            raise LaminaError(f"unexpected answer to LEASE from {addr}")
        # the epoch and fences first, then the lease: never serve on an older map
        svc.set_epoch(m.SetEpochRequest(reply.epoch, reply.fences, reply.lineages), b"")
        duration = reply.duration_ms / 1000
        svc.lease.valid_until = max(svc.lease.valid_until, sent + duration)
        self.period = max(duration / 3, 0.05)
        self.granted += 1
        if self.granted == 1:
            log.info("first lease from %s: epoch %d, %d fences", addr, reply.epoch,
                     len(reply.fences))  # fmt: skip
        return True

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def run(self) -> None:
        while True:
            try:
                await self.renew_once()
            except Exception:
                log.exception("lease renewal failed")
            await asyncio.sleep(self.period)

    async def close(self) -> None:
        self._drop_client()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)

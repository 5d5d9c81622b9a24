"""A simulated storage server: the real ``StorageService`` over a ``SimStore``.

The model adds what lives outside the service: being paused (frames wait, then run with
the lease the clock says), crashing (a new service over the same store: masks and data
survive, except mask increases not persisted yet; episodes, tokens, epoch, fences and
lease do not), losing power (the same, but the store keeps only its durable state: see
``tests/sim/store.py``), a periodic pass that syncs the store (the disk store's
background persisting of restores), a disk that fails (once a sync failed the store
fail-stops, the real service answers every request with STORAGE_IO_ERROR, and the
server asks for no lease: its heartbeats say why, until it is power-cycled), and the
connection rule of ``lamina.wire.connection``: once a newer connection of a client
authenticated, frames of its older connections are discarded.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from lamina.errors import LaminaError, StorageIOError
from lamina.storage.service import Lease, StorageService
from lamina.wire import messages as m
from tests.sim.store import SimStore

VOLUME = 1
LAYER = 1


def settle(result: Any) -> tuple[m.Message, bytes]:
    """The reply of ``handle``: at once, or by driving its coroutine (a MemPageStore never
    really suspends; if it did, sending again resumes it)."""
    if isinstance(result, tuple):
        return result
    try:
        while True:
            result.send(None)
    except StopIteration as stop:
        reply: tuple[m.Message, bytes] = stop.value
        return reply


class SimServer:
    def __init__(
        self,
        sid: str,
        clock: Callable[[], float],
        trace: Callable[[str], None],
        rng: random.Random,
        unit: int,
        check_generations: bool = True,
        fail_stop: bool = True,
    ) -> None:
        self.sid = sid
        self.clock = clock
        self.trace = trace
        self.check_generations = check_generations
        self.store = SimStore(rng, unit, fail_stop)
        self._told = False  # the fail-stop is in the trace
        self.alive = True
        self.paused = False
        self.incarnation = 1  # as a real server's, never 0 (0: none recorded)
        self.backlog: list[Callable[[], None]] = []
        self.newest: dict[str, int] = {}  # client -> newest connection generation seen
        self.fence_seen = 0  # the highest fence this server ever acknowledged (any life)
        self.svc = self._service()

    def _service(self) -> StorageService:
        return StorageService(
            self.store, self.sid, self.clock, lease=Lease(standalone=False, valid_until=0.0)
        )

    # -- faults ---------------------------------------------------------------------------

    def crash(self) -> None:
        self.store.crash()
        self.alive = False
        self.paused = False
        self.backlog.clear()
        self.incarnation += 1
        self.trace(f"{self.sid}: crash")

    def power_loss(self) -> None:
        self.crash()
        mixed = self.store.power_cut()
        self.trace(f"{self.sid}: power lost: durable state only ({mixed} pages part new)")

    def disk_fails(self) -> None:
        """Writeback fails: the page cache lost what was not on disk, and the next sync
        says so (the periodic pass runs at once)."""
        mixed = self.store.fail("EIO")
        self.trace(f"{self.sid}: disk fails (EIO; {mixed} pages lost bytes in the page cache)")
        self.periodic_sync()

    def power_cycle_if_stopped(self) -> None:
        """The operator's answer to a fail-stopped server: power it off, replace what
        failed, start it again (it comes back with what its disk made durable)."""
        if self.stopped or self.store.failed:
            self.power_loss()
            self.restart()

    @property
    def stopped(self) -> str:
        """Why the server fail-stopped (a sync of its store failed), or ""."""
        return self.store.failure or ""

    def _note_failure(self) -> None:
        if self.stopped and not self._told:
            self._told = True
            self.trace(f"{self.sid}: fail-stop: {self.stopped}")

    def restart(self) -> None:
        self.alive = True
        self._told = False
        self.newest.clear()
        self.svc = self._service()
        self.trace(f"{self.sid}: restart (epoch, fences, lease and episodes lost)")

    def periodic_sync(self) -> None:
        """The store's background pass: data fdatasynced, then restores persisted."""
        if self.alive and not self.paused and not self.stopped:
            try:
                self.store.sync()
            except StorageIOError:
                self._note_failure()

    def restart_if_dead(self) -> None:
        if not self.alive:
            self.restart()

    def resume_if_paused(self) -> None:
        if self.paused:
            self.resume()

    def pause(self) -> None:
        self.paused = True
        self.trace(f"{self.sid}: pause")

    def resume(self) -> None:
        self.paused = False
        self.trace(f"{self.sid}: resume with {len(self.backlog)} frames waiting")
        backlog, self.backlog = self.backlog, []
        for fn in backlog:
            fn()

    def deliver(self, incarnation: int, fn: Callable[[], None]) -> None:
        """Run ``fn`` now, later (paused) or never (crashed, or sent to an earlier life)."""
        if not self.alive or incarnation != self.incarnation:
            return
        if self.paused:
            self.backlog.append(fn)
            return
        fn()

    # -- requests -------------------------------------------------------------------------

    def from_client(
        self, client: str, generation: int, msg: m.Message, payload: bytes
    ) -> tuple[m.Message, bytes] | LaminaError | None:
        """The answer to a client frame; ``None``: discarded (an older connection)."""
        newest = self.newest.get(client, 0)
        if generation < newest and self.check_generations:
            self.trace(f"{self.sid}: discard {type(msg).__name__} of {client} gen {generation}")
            return None
        self.newest[client] = max(newest, generation)
        try:  # a fail-stopped store: the service refuses everything (STORAGE_IO_ERROR)
            reply = settle(self.svc.handle(msg, payload))
        except LaminaError as exc:
            self._note_failure()
            return exc
        if isinstance(msg, m.WriteRequest) and msg.epoch < self.fence_seen:
            raise AssertionError(
                f"{self.sid} applied a write of epoch {msg.epoch} after fence {self.fence_seen}"
            )
        return reply

    def heartbeat(
        self, epoch: int, fence: int, grant: float, expect: int = 0
    ) -> tuple[int, int, str]:
        """A manager heartbeat: SET_EPOCH with the volume's fence, then the lease renewed
        until ``grant``.  Returns the epoch acknowledged, the incarnation (a restart
        changes it) and why the server stopped ("" when it serves: a fail-stopped
        server asks for no lease, and refuses SET_EPOCH like everything else).
        ``expect``: the incarnation the map records (0: none yet); another one is
        granted nothing (``leader.py`` refuses its LEASE until the restart is recorded)
        and only tells its incarnation."""
        if self.stopped:
            return epoch, self.incarnation, self.stopped
        if expect and expect != self.incarnation:
            return self.svc.epoch, self.incarnation, self.stopped
        reply, _ = settle(self.svc.handle(m.SetEpochRequest(epoch, ((VOLUME, fence),)), b""))
        assert isinstance(reply, m.SetEpochResponse)
        self.fence_seen = max(self.fence_seen, fence)
        lease = self.svc.lease
        lease.valid_until = max(lease.valid_until, grant)
        return reply.epoch, self.incarnation, self.stopped

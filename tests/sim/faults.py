"""The seeded choice of one action per simulation step, and healing at the end."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tests.sim import actors
from tests.sim.manager import UP
from tests.sim.net import Faults

if TYPE_CHECKING:
    from tests.sim.engine import World

MAX_CLIENT_OPS = 4
MAX_CUTS = 2


class Chaos:
    def __init__(self, w: World, overlap: bool = False) -> None:
        self.w = w
        self.overlap = overlap
        rng = w.rng
        self.faults = Faults(
            drop=rng.uniform(0.005, 0.03),
            duplicate=rng.uniform(0.005, 0.03),
            delay=rng.uniform(0.005, 0.04),
        )
        w.net.faults = self.faults
        self.actions: list[tuple[int, Callable[[], None]]] = [
            (60, self.write),
            (40, self.read),
            (8, self.restore),
            (8, self.flush),
            (3, self.crash),
            (3, self.power_loss),
            (1, self.power_loss_all),
            (1, self.disk_fails),
            (3, self.pause),
            (6, self.cut),
            (4, self.network),
            (12, self.lag),
            (50, lambda: None),
        ]
        self.total = sum(weight for weight, _ in self.actions)

    def step(self) -> None:
        pick = self.w.rng.randrange(self.total)
        for weight, action in self.actions:
            if pick < weight:
                action()
                return
            pick -= weight

    def _client_ops(self) -> int:
        return sum(1 for name in self.w.procs.running.values() if name != "worker")

    def write(self) -> None:
        if self._client_ops() < MAX_CLIENT_OPS:
            self.w.start_write()

    def read(self) -> None:
        if self._client_ops() < MAX_CLIENT_OPS:
            self.w.start_read()

    def restore(self) -> None:
        self.w.procs.spawn("restore", "c", actors.restore_tokens(self.w), lambda _: None)

    def flush(self) -> None:
        if self._client_ops() < MAX_CLIENT_OPS and "flush" not in self.w.procs.running.values():
            self.w.procs.spawn("flush", "c", actors.flush(self.w), lambda _: None)

    def _impaired(self) -> bool:
        """Whether a server is out or not yet back up: server faults come one at a time
        (or to every server at once) unless ``overlap`` lets them pile up."""
        w = self.w
        if any(not s.alive or s.paused or s.stopped or s.store.failed for s in w.servers.values()):
            return True
        return not self.overlap and (
            w.mgr.pending is not None or any(st != UP for st in w.mgr.published.values())
        )

    def power_loss(self) -> None:
        """One server loses power: it keeps only what its disk made durable."""
        if self._impaired():
            return
        sid = self.w.rng.choice(sorted(self.w.servers))
        self._power_off(sid)

    def power_loss_all(self) -> None:
        """Every server loses power at once (they share one machine or one feed)."""
        if self._impaired():
            return
        for sid in sorted(self.w.servers):
            self._power_off(sid)

    def _power_off(self, sid: str) -> None:
        srv = self.w.servers[sid]
        srv.power_loss()
        self.w.power_lost(sid)
        self._later(0.2, 4.0, srv.restart_if_dead)

    def disk_fails(self) -> None:
        """A server's disk starts failing every write and sync (EIO): the server must
        stop serving, and may have lost what it had not made durable.  The operator
        power-cycles it later."""
        if self._impaired():
            return
        sid = self.w.rng.choice(sorted(self.w.servers))
        srv = self.w.servers[sid]
        srv.disk_fails()
        self.w.power_lost(sid)
        self._later(2.0, 6.0, srv.power_cycle_if_stopped)

    def _later(self, lo: float, hi: float, fn: Callable[[], None]) -> None:
        loop = self.w.loop
        loop.at(loop.now + self.w.rng.uniform(lo, hi), fn)

    def crash(self) -> None:
        if self._impaired():
            return
        srv = self.w.servers[self.w.rng.choice(sorted(self.w.servers))]
        srv.crash()
        self._later(0.2, 4.0, srv.restart_if_dead)

    def pause(self) -> None:
        if self._impaired():
            return
        srv = self.w.servers[self.w.rng.choice(sorted(self.w.servers))]
        srv.pause()
        self._later(0.2, 3.0, srv.resume_if_paused)

    def cut(self) -> None:
        w = self.w
        if len(w.net.cut) >= MAX_CUTS:
            return
        sid = w.rng.choice(sorted(w.servers))
        peer = w.rng.choice(("c", "w", "mgr"))
        links = [(peer, sid), (sid, peer)]
        how = w.rng.randrange(3)  # both ways, or one way only
        chosen = links if how == 2 else [links[how]]
        for link in chosen:
            w.net.cut.add(link)
        w.trace(f"net: cut {chosen}")

        def heal() -> None:
            for link in chosen:
                w.net.cut.discard(link)
            w.trace(f"net: heal {chosen}")

        self._later(0.2, 4.0, heal)

    def lag(self) -> None:
        """The client's frames to one server take longer for a while (its disk is slow to
        make a mask clear durable, or the path is congested): a write reaches its copies
        far apart, while the worker's requests do not wait."""
        w = self.w
        link = ("c", w.rng.choice(sorted(w.servers)))
        if link in w.net.slow:
            return
        w.net.slow[link] = w.rng.uniform(0.05, 0.4)
        w.trace(f"net: slow {link} +{w.net.slow[link]:.2f}s")

        def done() -> None:
            w.net.slow.pop(link, None)
            w.trace(f"net: {link} fast again")

        self._later(0.5, 3.0, done)

    def network(self) -> None:
        """A bad patch or a calm one: change the per-message fault rates."""
        rng, f = self.w.rng, self.faults
        f.drop = rng.choice((0.0, 0.01, 0.05))
        f.duplicate = rng.choice((0.0, 0.01, 0.05))
        f.delay = rng.choice((0.0, 0.02, 0.08))
        self.w.trace(f"net: drop {f.drop} duplicate {f.duplicate} delay {f.delay}")

    def heal_all(self) -> None:
        w = self.w
        w.trace("sim: heal everything, no more faults")
        self.faults.drop = self.faults.duplicate = self.faults.delay = 0.0
        w.net.cut.clear()
        w.net.slow.clear()
        for srv in w.servers.values():
            if srv.paused:
                srv.resume()
            if not srv.alive:
                srv.restart()

"""Seeded in-process simulation of replicated page writes under faults.

``run(seed)`` builds three storage servers (the real ``StorageService``), the model
manager, driver and worker, then for ``steps`` steps advances simulated time and applies
one seeded action: a write, a read check, a crash, a pause, a cut link; every message may
also be dropped, delayed or duplicated.  Afterwards everything is healed and the worker
runs until quiet.  A broken invariant raises ``AssertionError`` starting with
``simulation seed=<seed> steps=<n>:`` and the end of the trace.

    python -m tests.sim.engine --seed 7 --steps 2000 [--replicas 3] [-v]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from lamina.wire import messages as m
from tests.sim import actors, faults
from tests.sim.manager import HEARTBEAT, UP, Manager
from tests.sim.net import Answer, Loop, Net, Procs
from tests.sim.servers import LAYER, VOLUME, SimServer, settle

TRACE_TAIL = 30
STEP = 0.05


@dataclass(frozen=True, slots=True)
class Report:
    seed: int
    steps: int
    replicas: int
    writes: int
    reads: int
    messages: int
    epochs: int
    sim_time: float
    digest: str


class World:
    def __init__(self, seed: int, replicas: int = 2, broken: str = "", verbose: bool = False):
        self.seed = seed
        self.rng = random.Random(seed)
        self.broken = broken
        self.verbose = verbose
        self.tail: collections.deque[str] = collections.deque(maxlen=TRACE_TAIL)
        self.hash = hashlib.sha256()
        self.loop = Loop()
        self.net = Net(self.loop, self.rng, self.trace)
        ids = ("s1", "s2", "s3")
        self.servers = {
            s: SimServer(s, self.clock, self.trace, broken != "no_generation_check") for s in ids
        }
        self.partitions: list[tuple[str, ...]]
        if replicas == 2:
            self.partitions = [("s1", "s2"), ("s2", "s3")]
        else:
            self.partitions = [("s1", "s2", "s3"), ("s2", "s3", "s1")]
        self.mgr = Manager(ids, self.send_heartbeat, self.clock, self.trace)
        self.mgr.partitions = self.partitions
        self.mgr.guard_last_up = broken != "recover_alone"
        self.procs = Procs(self.loop, self.transport, self.on_timeout)
        self.gens: dict[tuple[str, str], int] = {}
        self.tokens: dict[tuple[str, str], list[int]] = {}
        self.acked = {p: [0] * actors.SLOTS for p in range(actors.PAGES)}
        self.issued: dict[int, list[set[int]]] = {
            p: [{0} for _ in range(actors.SLOTS)] for p in range(actors.PAGES)
        }
        self.busy: set[int] = set()
        self.version = 0
        self.writes = self.reads = self.rounds = self.repairs = 0
        self.quiet_rounds = 0
        self._create_pages()

    # -- plumbing -------------------------------------------------------------------------

    def clock(self) -> float:
        return self.loop.now

    def trace(self, line: str) -> None:
        text = f"{self.loop.now:9.3f} {line}"
        self.tail.append(text)
        self.hash.update(text.encode())
        if self.verbose:
            print(text)

    def part(self, page: int) -> tuple[str, ...]:
        return self.partitions[page % len(self.partitions)]

    def take_tokens(self, client: str, sid: str) -> tuple[int, ...]:
        return tuple(self.tokens.pop((client, sid), ()))

    def transport(
        self,
        client: str,
        sid: str,
        msg: m.Message,
        payload: bytes,
        on_answer: Callable[[Answer], None],
    ) -> None:
        gen = self.gens.get((client, sid), 1)
        srv = self.servers[sid]
        inc = srv.incarnation
        name = type(msg).__name__

        def run() -> None:
            answer: Answer | None = srv.from_client(client, gen, msg, payload)
            if answer is not None:
                self.net.send(sid, client, (sid, client, gen, inc), name, lambda: on_answer(answer))

        self.net.send(client, sid, (client, sid, gen, inc), name, lambda: srv.deliver(inc, run))

    def on_timeout(self, client: str, sid: str) -> None:
        self.gens[(client, sid)] = self.gens.get((client, sid), 1) + 1
        self.trace(f"{client}: timeout on {sid}: new connection {self.gens[(client, sid)]}")

    def send_heartbeat(
        self, sid: str, epoch: int, fence: int, grant: float, on_ack: Callable[[int], None]
    ) -> None:
        srv = self.servers[sid]
        inc = srv.incarnation

        def run() -> None:
            acked = srv.heartbeat(epoch, fence, grant)
            self.net.send(sid, "mgr", (sid, "mgr", inc), "hb-ack", lambda: on_ack(acked))

        self.net.send("mgr", sid, ("mgr", sid, inc), "hb", lambda: srv.deliver(inc, run))

    def _tick(self) -> None:
        self.mgr.tick()
        self.loop.at(self.loop.now + HEARTBEAT, self._tick)

    def _create_pages(self) -> None:
        for page in range(actors.PAGES):
            for sid in self.part(page):
                req = m.CreateRequest(VOLUME, 1, LAYER, page, actors.PAGE, 0xFFFFFFFF, False)
                srv = self.servers[sid]
                srv.heartbeat(1, 1, 1.0)
                settle(srv.svc.handle(req, bytes(actors.PAGE)))

    # -- the model of what must hold ---------------------------------------------------------

    def acked_write(
        self, page: int, slot: int, nslots: int, version: int, epoch: int, to: list[str]
    ) -> None:
        self.writes += 1
        for s in range(slot, slot + nslots):
            self.acked[page][s] = version
        self.trace(f"client: ACK v{version} page {page} slots {slot}+{nslots} e{epoch} {to}")

    def check_read(self, page: int, floor: list[int], data: bytes, sid: str) -> None:
        self.reads += 1
        got = [actors.slot_version(data, s) for s in range(actors.SLOTS)]
        self.trace(f"client: read page {page} from {sid}: {got}")
        for s, v in enumerate(got):
            if v < floor[s] or v not in self.issued[page][s]:
                raise AssertionError(
                    f"read of page {page} slot {s} from {sid} returned v{v}, "
                    f"but v{floor[s]} was acknowledged before the read began"
                )

    def start_write(self) -> None:
        free = [p for p in range(actors.PAGES) if p not in self.busy]
        if not free:
            return
        page = self.rng.choice(free)
        slot = self.rng.randrange(actors.SLOTS)
        nslots = self.rng.randint(1, actors.SLOTS - slot)
        self.version += 1
        v = self.version
        for s in range(slot, slot + nslots):
            self.issued[page][s].add(v)
        self.busy.add(page)
        self.trace(f"client: write v{v} page {page} slots {slot}+{nslots}")
        self.procs.spawn(f"write v{v}", "c", actors.write(self, page, slot, nslots, v),
                         lambda _: self.busy.discard(page))  # fmt: skip

    def start_read(self) -> None:
        page = self.rng.randrange(actors.PAGES)
        self.procs.spawn(f"read {page}", "c", actors.read(self, page), lambda _: None)


def run(
    seed: int, steps: int = 2000, replicas: int = 2, broken: str = "", verbose: bool = False
) -> Report:
    """Simulate ``steps`` steps of seed ``seed``; AssertionError on a broken invariant."""
    w = World(seed, replicas, broken, verbose)
    try:
        w.trace(f"sim: seed {seed} steps {steps} replicas {replicas} {broken}")
        w.loop.at(0.0, w._tick)
        w.procs.spawn("worker", "w", actors.worker(w), lambda _: None)
        chaos = faults.Chaos(w)
        for _ in range(steps):
            w.loop.run_until(w.loop.now + STEP)
            chaos.step()
        chaos.heal_all()
        settle_and_check(w)
    except AssertionError as exc:
        tail = "\n".join(w.tail)
        raise AssertionError(
            f"simulation seed={seed} steps={steps}: {exc} "
            f"(replicas={replicas}{', broken=' + broken if broken else ''})\n{tail}"
        ) from None
    return Report(
        seed, steps, replicas, w.writes, w.reads, w.net.sent, w.mgr.changes, w.loop.now,
        w.hash.hexdigest(),
    )  # fmt: skip


def settle_and_check(w: World, limit: float = 200.0) -> None:
    """Run without faults until the worker is quiet, then compare every copy with the
    acknowledged writes."""
    end = w.loop.now + limit
    while True:
        w.loop.run_until(w.loop.now + 0.5)
        settled = (
            w.mgr.pending is None
            and all(st == UP for st in w.mgr.published.values())
            and list(w.procs.running.values()) == ["worker"]
            and all(s.alive and not s.paused for s in w.servers.values())
        )
        if not settled:
            w.quiet_rounds = 0
        elif w.quiet_rounds >= 2:
            break
        if w.loop.now > end:
            raise AssertionError(
                f"not settled after {limit} s: {w.mgr.published} pending={w.mgr.pending} "
                f"running={sorted(w.procs.running.values())}"
            )
    w.trace("sim: settled; checking every copy")
    for page in range(actors.PAGES):
        for sid in w.part(page):
            info = w.servers[sid].store.info(LAYER, page)
            data = w.servers[sid].store.read(LAYER, page, 0, actors.PAGE)
            got = [actors.slot_version(data, s) for s in range(actors.SLOTS)]
            if info.mask != 0xFFFFFFFF or got != w.acked[page]:
                raise AssertionError(
                    f"page {page} on {sid}: mask {info.mask:#x} versions {got}, "
                    f"acknowledged {w.acked[page]}"
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--replicas", type=int, default=2, choices=(2, 3))
    ap.add_argument(
        "--broken",
        default="",
        choices=("", "no_clear_mask", "no_generation_check", "overwrite_writing", "recover_alone"),
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    report = run(args.seed, args.steps, args.replicas, args.broken, args.verbose)
    print(report)


if __name__ == "__main__":
    main()

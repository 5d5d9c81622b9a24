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
from dataclasses import dataclass, field

from lamina.wire import messages as m
from tests.sim import actors, faults
from tests.sim.manager import HEARTBEAT, UP, Manager
from tests.sim.net import Answer, Loop, Net, Procs
from tests.sim.servers import LAYER, VOLUME, SimServer, settle

TRACE_TAIL = 30
STEP = 0.05
SYNC_DELAY = 0.2  # the driver's background FLUSH follows acknowledgements this soon
MASK_SYNC = (0.5, 5.0)  # the range a server's periodic sync interval is drawn from
REREPLICATE = 1.0  # a server down this long loses its copies (2 copies only)
BROKEN = (
    "no_clear_mask", "no_generation_check", "overwrite_writing", "recover_alone",
    "confirm_before_flush", "resync_without_fua", "keep_old_copy", "no_fail_stop",
    "source_by_order", "mark_before_source_sync", "lease_before_restart_recorded",
)  # fmt: skip

Group = tuple[tuple[str, int], ...]  # one write's (server, token) pairs


@dataclass(slots=True)
class Acked:
    """An acknowledged write, for the checker."""

    seq: int
    version: int
    #: server -> its power losses when the acknowledged attempt was sent: the write is
    #: held there until it loses power again, unless a FLUSH made it durable there first
    held: dict[str, int]
    flushed: set[str] = field(default_factory=set)


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
    def __init__(
        self,
        seed: int,
        replicas: int = 2,
        broken: str = "",
        verbose: bool = False,
        rereplicate: bool = False,
        last_up_guard: bool = True,
    ):
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
            s: SimServer(
                s,
                self.clock,
                self.trace,
                self.rng,
                actors.SLOT,
                broken != "no_generation_check",
                broken != "no_fail_stop",
            )
            for s in ids
        }
        self.losses = dict.fromkeys(ids, 0)  # power losses (and failed disks) per server
        parts: list[tuple[str, ...]]
        if replicas == 2:
            parts = [("s1", "s2"), ("s2", "s3")]
        else:
            parts = [("s1", "s2", "s3"), ("s2", "s3", "s1")]
        self.mgr = Manager(ids, self.send_heartbeat, self.clock, self.trace)
        self.mgr.partitions = list(parts)
        self.mgr.published_parts = list(parts)
        self.mgr.guard_last_up = broken != "recover_alone" and last_up_guard
        self.mgr.lease_before_restart_recorded = broken == "lease_before_restart_recorded"
        # re-replication needs a server outside the partition: with 3 copies there is none
        self.mgr.rereplicate_after = REREPLICATE if rereplicate and replicas == 2 else 0.0
        self.procs = Procs(self.loop, self.transport, self.on_timeout)
        self.gens: dict[tuple[str, str], int] = {}
        self.tokens: dict[tuple[str, str], list[int]] = {}
        self.acked = {p: [0] * actors.SLOTS for p in range(actors.PAGES)}
        # per page and slot, the acknowledged writes covering it, oldest first
        self.history: dict[int, list[list[Acked]]] = {
            p: [[] for _ in range(actors.SLOTS)] for p in range(actors.PAGES)
        }
        self.acks: list[Acked] = []  # not yet flushed on every server they were sent to
        self.ack_seq = 0
        self.unsynced: list[Group] = []  # acknowledged writes whose tokens wait for a FLUSH
        self.sync_timer = False
        self.flushes = 0
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

    @property
    def partitions(self) -> list[tuple[str, ...]]:
        """The placement of the published map."""
        return self.mgr.published_parts

    def part(self, page: int) -> tuple[str, ...]:
        return self.partitions[page % len(self.partitions)]

    def view(self) -> actors.View:
        """The published map, as a client or the worker holds it."""
        mgr = self.mgr
        return actors.View(
            mgr.published_epoch, mgr.published, mgr.published_parts, mgr.published_filling,
            mgr.published_retired, mgr.published_up_until,
        )  # fmt: skip

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
        self,
        sid: str,
        epoch: int,
        fence: int,
        grant: float,
        expect: int,
        on_ack: Callable[[int, int, str], None],
    ) -> None:
        srv = self.servers[sid]
        inc = srv.incarnation

        def run() -> None:
            acked = srv.heartbeat(epoch, fence, grant, expect)
            self.net.send(sid, "mgr", (sid, "mgr", inc), "hb-ack", lambda: on_ack(*acked))

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
        for srv in self.servers.values():
            srv.store.sync()
            self._periodic_sync(srv, self.rng.uniform(*MASK_SYNC))

    def _periodic_sync(self, srv: SimServer, every: float) -> None:
        def tick() -> None:
            srv.periodic_sync()
            self.loop.at(self.loop.now + every, tick)

        self.loop.at(self.loop.now + every, tick)

    # -- durability of acknowledged writes (the driver's rule) ------------------------------

    def durable_later(self, group: Group) -> None:
        """What ``Driver._durable_later`` does: the tokens go back once a FLUSH succeeded
        on every copy the write reached (the client's, or one sent SYNC_DELAY later)."""
        self.unsynced.append(group)
        self.sync_soon()

    def sync_soon(self) -> None:
        if not self.sync_timer:
            self.sync_timer = True
            self.loop.at(self.loop.now + SYNC_DELAY, self._start_sync)

    def _start_sync(self) -> None:
        self.sync_timer = False
        if "sync" in self.procs.running.values():
            self.sync_soon()  # one at a time: look again after this one
        elif self.unsynced:
            self.procs.spawn("sync", "c", actors.background_sync(self), lambda _: None)

    def confirm_durable(self, batch: list[Group], flushed: set[str]) -> list[Group]:
        """Confirm the groups whose servers all flushed; the others."""
        rest = []
        for group in batch:
            if all(sid in flushed for sid, _ in group):
                for sid, token in group:
                    self.tokens.setdefault(("c", sid), []).append(token)
            else:
                rest.append(group)
        return rest

    def power_lost(self, sid: str) -> None:
        """``sid`` may have lost every write it did not make durable."""
        self.losses[sid] += 1

    def flushed(self, before: int, servers: set[str]) -> None:
        """A FLUSH succeeded on ``servers``: every write acknowledged before it was sent
        (``seq < before``) is durable on those of them it reached and that kept power."""
        keep = []
        for a in self.acks:
            if a.seq < before:
                for sid, losses in a.held.items():
                    if sid in servers and self.losses[sid] == losses:
                        a.flushed.add(sid)
            if len(a.flushed) < len(a.held):
                keep.append(a)
        self.acks = keep

    def held(self, a: Acked) -> bool:
        """Whether the system still owes write ``a``: some copy it reached has made it
        durable (a FLUSH succeeded there) or has not lost power since."""
        return any(sid in a.flushed or self.losses[sid] == n for sid, n in a.held.items())

    def floor(self, page: int, before: int) -> list[int]:
        """Per slot, the newest write acknowledged before ``before`` that is still owed."""
        out = []
        for slot in self.history[page]:
            out.append(
                next((a.version for a in reversed(slot) if a.seq < before and self.held(a)), 0)
            )
        return out

    # -- the model of what must hold ---------------------------------------------------------

    def acked_write(
        self,
        page: int,
        slot: int,
        nslots: int,
        version: int,
        epoch: int,
        to: list[str],
        losses: dict[str, int],
    ) -> None:
        """Write ``version`` was acknowledged by ``to``; ``losses``: the servers' power
        losses when the acknowledged attempt was sent."""
        self.writes += 1
        self.ack_seq += 1
        a = Acked(self.ack_seq, version, {sid: losses[sid] for sid in to})
        self.acks.append(a)
        for s in range(slot, slot + nslots):
            self.acked[page][s] = version
            self.history[page][s].append(a)
        self.trace(f"client: ACK v{version} page {page} slots {slot}+{nslots} e{epoch} {to}")

    def check_read(self, page: int, before: int, data: bytes, sid: str) -> None:
        self.reads += 1
        got = [actors.slot_version(data, s) for s in range(actors.SLOTS)]
        self.trace(f"client: read page {page} from {sid}: {got}")
        floor = self.floor(page, before)
        for s, v in enumerate(got):
            if v < floor[s] or v not in self.issued[page][s]:
                raise AssertionError(
                    f"read of page {page} slot {s} from {sid} returned v{v}, "
                    f"but v{floor[s]} was acknowledged before the read began and is owed"
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
    seed: int,
    steps: int = 2000,
    replicas: int = 2,
    broken: str = "",
    verbose: bool = False,
    overlap: bool = False,
    rereplicate: bool = False,
    last_up_guard: bool = True,
) -> Report:
    """Simulate ``steps`` steps of seed ``seed``; AssertionError on a broken invariant.
    ``overlap``: server faults may hit a server while another is still out or not yet
    back up (by default they come one at a time, or to every server at once).
    ``rereplicate``: a server down for REREPLICATE seconds loses its copies (2 copies).
    ``last_up_guard=False``: the manager declares the last up copy of a partition down
    too, as ``leader.py`` does when its lease is over."""
    w = World(seed, replicas, broken, verbose, rereplicate, last_up_guard)
    try:
        w.trace(f"sim: seed {seed} steps {steps} replicas {replicas} {broken}")
        w.loop.at(0.0, w._tick)
        w.procs.spawn("worker", "w", actors.worker(w), lambda _: None)
        chaos = faults.Chaos(w, overlap)
        for _ in range(steps):
            w.loop.run_until(w.loop.now + STEP)
            chaos.step()
        chaos.heal_all()
        settle_and_check(w)
    except AssertionError as exc:
        tail = "\n".join(w.tail)
        raise AssertionError(
            f"simulation seed={seed} steps={steps}: {exc} "
            f"(replicas={replicas}{', broken=' + broken if broken else ''}"
            f"{', overlap' if overlap else ''}{', rereplicate' if rereplicate else ''}"
            f"{'' if last_up_guard else ', no last-up guard'})\n{tail}"
        ) from None
    return Report(
        seed, steps, replicas, w.writes, w.reads, w.net.sent, w.mgr.changes, w.loop.now,
        w.hash.hexdigest(),
    )  # fmt: skip


def settle_and_check(w: World, limit: float = 200.0) -> None:
    """Run without faults until the worker is quiet and compare every copy with the
    acknowledged writes; cut the power of every server and do it again (what was
    repaired must have been made durable before any mask vouched for it); then FLUSH,
    cut the power again and check once more: every acknowledged write is flushed by
    then, so every one must be there."""
    _settle(w, limit)
    w.trace("sim: settled; checking every copy")
    _check_copies(w)
    _power_cut_all(w, "settled")
    _settle(w, limit)
    w.trace("sim: settled after the power cut; checking every copy")
    _check_copies(w)
    w.procs.spawn("flush", "c", actors.flush(w), lambda _: None)
    _settle(w, limit)
    _power_cut_all(w, "flushed")
    _settle(w, limit)
    w.trace("sim: settled after the power cut; checking every copy")
    _check_copies(w)


def _power_cut_all(w: World, why: str) -> None:
    w.trace(f"sim: {why}; every server loses power")
    for sid, srv in w.servers.items():
        srv.power_loss()
        w.power_lost(sid)
        srv.restart()


def _settle(w: World, limit: float) -> None:
    end = w.loop.now + limit
    w.quiet_rounds = 0
    while True:
        w.loop.run_until(w.loop.now + 0.5)
        settled = (
            w.mgr.pending is None
            and all(st == UP for st in w.mgr.published.values())
            and list(w.procs.running.values()) == ["worker"]
            and all(s.alive and not s.paused and not s.stopped for s in w.servers.values())
            and not w.mgr.filling
            and not w.mgr.retired
        )
        if not settled:
            w.quiet_rounds = 0
        elif w.quiet_rounds >= 2:
            return
        if w.loop.now > end:
            raise AssertionError(
                f"not settled after {limit} s: {w.mgr.published} pending={w.mgr.pending} "
                f"running={sorted(w.procs.running.values())}"
            )


def _check_copies(w: World) -> None:
    """Every copy clean and equal; each slot holds its newest acknowledged write when
    that one is owed, else some write issued since the newest owed one; a server that
    holds no copy holds nothing of the layer (re-replication reclaimed it)."""
    placed = {sid for part in w.partitions for sid in part}
    for sid, srv in w.servers.items():
        if sid not in placed and srv.store.layers():
            raise AssertionError(f"{sid} holds no copy but still has layers {srv.store.layers()}")
    for page in range(actors.PAGES):
        seen: dict[str, list[int]] = {}
        for sid in w.part(page):
            info = w.servers[sid].store.info(LAYER, page)
            data = w.servers[sid].store.read(LAYER, page, 0, actors.PAGE)
            seen[sid] = got = [actors.slot_version(data, s) for s in range(actors.SLOTS)]
            if info.mask != 0xFFFFFFFF:
                raise AssertionError(f"page {page} on {sid}: mask {info.mask:#x} after settling")
        first = next(iter(seen.values()))  # (servers in no partition are checked below)
        floor = w.floor(page, w.ack_seq + 1)
        for s in range(actors.SLOTS):
            hist = w.history[page][s]
            owed = hist[-1].version if hist and w.held(hist[-1]) else None
            for got in seen.values():
                v = got[s]
                if got != first or (owed is not None and v != owed) or v < floor[s]:
                    raise AssertionError(
                        f"page {page} slot {s}: copies hold {seen}, acknowledged "
                        f"{w.acked[page]}, owed at least {floor}"
                    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--replicas", type=int, default=2, choices=(2, 3))
    ap.add_argument(
        "--broken",
        default="",
        choices=("", *BROKEN),
    )
    ap.add_argument("--overlap", action="store_true", help="server faults may pile up")
    ap.add_argument("--rereplicate", action="store_true", help="copies move off down servers")
    ap.add_argument(
        "--no-last-up-guard", action="store_true", help="the last up copy may be declared down"
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    report = run(
        args.seed, args.steps, args.replicas, args.broken, args.verbose, args.overlap,
        args.rereplicate, not args.no_last_up_guard,
    )  # fmt: skip
    print(report)


if __name__ == "__main__":
    main()

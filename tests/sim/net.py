"""The simulated time, network and processes of the seeded simulation.

Everything runs in one thread with one seeded ``random.Random``: events are ordered by
(time, sequence number), so one seed always gives one trace.  Processes (the model
driver's writes and reads, the model worker) are generators that yield ``Call`` (send
requests to storage servers, resume with every answer or a timeout) or ``Sleep``.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from lamina.wire import messages as m


class TimedOut(Exception):
    """No answer from ``server`` in time (dropped, delayed, cut, paused or crashed)."""

    def __init__(self, server: str) -> None:
        super().__init__(f"{server} timed out")
        self.server = server


Answer = tuple[m.Message, bytes] | BaseException


@dataclass(frozen=True, slots=True)
class Call:
    calls: tuple[tuple[str, m.Message, bytes], ...]
    timeout: float


@dataclass(frozen=True, slots=True)
class Sleep:
    delay: float


Proc = Generator[Call | Sleep, Any, Any]


@dataclass(slots=True)
class Faults:
    """Per-message fault probabilities (all zero: a perfect network)."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    latency: tuple[float, float] = (0.001, 0.01)
    long_delay: tuple[float, float] = (0.3, 3.0)


class Loop:
    """Simulated time: callbacks run in (time, sequence) order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(when, self.now), next(self._seq), fn))

    def run_until(self, when: float) -> None:
        while self._queue and self._queue[0][0] <= when:
            t, _, fn = heapq.heappop(self._queue)
            self.now = t
            fn()
        self.now = max(self.now, when)


@dataclass(slots=True)
class Net:
    """Delivery between named nodes: drop, delay, duplicate, partitions (cut directed
    links).  Frames of one connection stay in order (a stalled connection delays every
    later frame on it); frames of different connections reorder freely."""

    loop: Loop
    rng: random.Random
    trace: Callable[[str], None]
    faults: Faults = field(default_factory=Faults)
    cut: set[tuple[str, str]] = field(default_factory=set)
    #: extra seconds every frame on a directed link takes (a slow path or a busy disk)
    slow: dict[tuple[str, str], float] = field(default_factory=dict)
    _fifo: dict[Any, float] = field(default_factory=dict)
    sent: int = 0

    def send(self, src: str, dst: str, conn: Any, what: str, deliver: Callable[[], None]) -> None:
        self.sent += 1
        f = self.faults
        if (src, dst) in self.cut:
            return
        if f.drop and self.rng.random() < f.drop:
            self.trace(f"net: drop {src}->{dst} {what}")
            return
        lo, hi = f.latency
        if f.delay and self.rng.random() < f.delay:
            lo, hi = f.long_delay
            self.trace(f"net: delay {src}->{dst} {what}")
        lo += self.slow.get((src, dst), 0.0)
        hi += self.slow.get((src, dst), 0.0)
        when = max(self.loop.now + self.rng.uniform(lo, hi), self._fifo.get(conn, 0.0))
        self._fifo[conn] = when

        def arrive() -> None:
            if (src, dst) not in self.cut:
                deliver()

        self.loop.at(when, arrive)
        if f.duplicate and self.rng.random() < f.duplicate:
            self.trace(f"net: duplicate {src}->{dst} {what}")
            self.loop.at(when, arrive)


Transport = Callable[[str, str, m.Message, bytes, Callable[[Answer], None]], None]


class Procs:
    """Runs generator processes over ``transport(client, server, msg, payload, on_answer)``;
    ``on_timeout(client, server)`` is told of each request that timed out."""

    def __init__(
        self, loop: Loop, transport: Transport, on_timeout: Callable[[str, str], None]
    ) -> None:
        self.loop = loop
        self.transport = transport
        self.on_timeout = on_timeout
        self.running: dict[int, str] = {}
        self._ids = itertools.count(1)

    def spawn(self, name: str, client: str, proc: Proc, done: Callable[[Any], None]) -> None:
        pid = next(self._ids)
        self.running[pid] = name
        self._step(pid, client, proc, done, None)

    def _step(
        self, pid: int, client: str, proc: Proc, done: Callable[[Any], None], value: Any
    ) -> None:
        try:
            req = proc.send(value)
        except StopIteration as stop:
            del self.running[pid]
            done(stop.value)
            return
        if isinstance(req, Sleep):
            self.loop.at(
                self.loop.now + req.delay, lambda: self._step(pid, client, proc, done, None)
            )
            return
        answers: list[Answer | None] = [None] * len(req.calls)
        state = {"open": True}

        def finish() -> None:
            state["open"] = False
            self._step(pid, client, proc, done, answers)

        def answer(k: int, a: Answer) -> None:
            if not state["open"] or answers[k] is not None:
                return  # late or duplicated answer
            answers[k] = a
            if all(x is not None for x in answers):
                finish()

        def expire() -> None:
            if not state["open"]:
                return
            for k, (server, _, _) in enumerate(req.calls):
                if answers[k] is None:
                    answers[k] = TimedOut(server)
                    self.on_timeout(client, server)
            finish()

        self.loop.at(self.loop.now + req.timeout, expire)
        for k, (server, msg, payload) in enumerate(req.calls):
            self.transport(client, server, msg, payload, functools.partial(answer, k))

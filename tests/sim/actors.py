"""The model driver (writes and reads) and the model worker, as simulation processes.

They follow ``lamina.client.driver`` (``_write_page``, ``_recover``, reads that
resynchronise a copy whose mask does not vouch for the others) and
``lamina.mgmt.worker`` (``_resync_page``, ``_repair``) in the small; every repair
decision is the real one, :func:`lamina.repair.plan`.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lamina import repair
from lamina.errors import Conflict, LaminaError, StaleEpoch
from lamina.mgmt.worker import Status
from lamina.storage.syncmask import (
    FULL,
    clear_mask,
    needs_resync,
    restore_mask,
)
from lamina.wire import messages as m
from lamina.wire.messages import PageState
from tests.sim.manager import LIVE, RECOVERING, UP
from tests.sim.net import Answer, Call, Proc, Sleep, TimedOut
from tests.sim.servers import LAYER, VOLUME

if TYPE_CHECKING:
    from tests.sim.engine import World

PAGES = 8
PAGE = 1 << 16  # the smallest page size the wire allows
SLOTS = 8
SLOT = PAGE // SLOTS
RPC_TIMEOUT = 0.5
WORKER_PERIOD = 0.4

Resync = Generator[Call | Sleep, Any, bool]


@dataclass(frozen=True, slots=True)
class View:
    """One published map: server states and where the copies are."""

    epoch: int
    states: dict[str, str]
    parts: list[tuple[str, ...]]
    filling: frozenset[tuple[int, str]]
    retired: frozenset[str]
    up_until: dict[str, int]

    def pidx(self, page: int) -> int:
        return page % len(self.parts)

    def part(self, page: int) -> tuple[str, ...]:
        return self.parts[page % len(self.parts)]

    def live(self, page: int) -> list[int]:
        return [i for i, s in enumerate(self.part(page)) if self.states[s] in LIVE]

    def readable(self, page: int) -> list[int]:
        """The copies a read may use, and a repair copy from: up, not being filled."""
        pidx = self.pidx(page)
        return [
            i
            for i, s in enumerate(self.part(page))
            if self.states[s] == UP and (pidx, s) not in self.filling
        ]


def stamp(version: int, nslots: int) -> bytes:
    return version.to_bytes(8, "little") * (SLOT // 8) * nslots


def slot_version(data: bytes, slot: int) -> int:
    """The version slot ``slot`` of a page holds; a torn slot fails."""
    chunk = data[slot * SLOT : (slot + 1) * SLOT]
    version = int.from_bytes(chunk[:8], "little")
    if chunk != stamp(version, 1):
        raise AssertionError(f"slot {slot} is torn: {chunk[:24].hex()}...")
    return version


def _backoff(attempt: int) -> float:
    return min(0.02 * float(2 ** min(attempt, 5)), 0.5)


def recover(w: World, errors: list[tuple[str, BaseException]], attempt: int, what: str) -> Proc:
    """What ``Driver._recover`` does: STALE -> wait for a newer published map; any other
    failure of a server -> report it to the managers, back off, use the map published
    by then (the managers decide whether the server is down)."""
    for sid, err in errors:
        w.trace(f"client: {what}: {sid}: {type(err).__name__}")
        if isinstance(err, StaleEpoch):
            continue
        if not isinstance(err, LaminaError | TimedOut):
            raise err
        w.mgr.report(sid, type(err).__name__)
    yield Sleep(_backoff(attempt))


def write(w: World, page: int, slot: int, nslots: int, version: int) -> Proc:
    data = stamp(version, nslots)
    offset = slot * SLOT
    attempt = 0
    while True:
        attempt += 1
        view = w.view()
        epoch, part = view.epoch, view.part(page)
        copies = view.live(page)
        guarded = w.broken != "recover_alone"
        if not copies or (guarded and not view.readable(page)):
            # (guarded) recovering copies alone may lack acknowledged writes: wait
            yield Sleep(_backoff(attempt))
            continue
        n = len(part)
        restore = restore_mask(set(copies), n)
        calls = tuple(
            (
                part[i],
                m.WriteRequest(
                    VOLUME, epoch, LAYER, page, PAGE, offset,
                    FULL if w.broken == "no_clear_mask" else clear_mask(i, n),
                    restore, False, w.take_tokens("c", part[i]),
                ),
                data,
            )
            for i in copies
        )  # fmt: skip
        losses = dict(w.losses)
        answers: list[Answer] = yield Call(calls, RPC_TIMEOUT)
        errors = [
            (part[i], a)
            for i, a in zip(copies, answers, strict=False)
            if isinstance(a, BaseException)
        ]
        if not errors:
            group = []
            for i, a in zip(copies, answers, strict=False):
                assert isinstance(a, tuple)
                assert isinstance(a[0], m.WriteResponse)
                group.append((part[i], a[0].token))
            if w.broken == "confirm_before_flush":  # the old rule: vouch for page caches
                w.confirm_durable([tuple(group)], {sid for sid, _ in group})
            else:
                w.durable_later(tuple(group))
            to = [part[i] for i in copies]
            w.acked_write(page, slot, nslots, version, epoch, to, losses)
            return
        yield from recover(w, errors, attempt, f"write v{version} page {page} epoch {epoch}")


def read(w: World, page: int) -> Proc:
    before = w.ack_seq + 1  # the writes acknowledged before the read began
    attempt = 0
    while True:
        attempt += 1
        view = w.view()
        epoch, part = view.epoch, view.part(page)
        readable = view.readable(page)
        if not readable:
            yield Sleep(_backoff(attempt))
            continue
        i = w.rng.choice(readable)
        req = m.ReadRequest(VOLUME, epoch, LAYER, page, PAGE, 0, PAGE, w.take_tokens("c", part[i]))
        (a,) = yield Call(((part[i], req, b""),), RPC_TIMEOUT)
        if isinstance(a, BaseException):
            yield from recover(w, [(part[i], a)], attempt, f"read page {page}")
            continue
        resp, data = a
        assert isinstance(resp, m.ReadResponse)
        if needs_resync(resp.mask, readable):
            w.trace(f"client: page {page} on {part[i]} mask {resp.mask:#x}: resync first")
            # as Driver._resync: only while no write of this client is on its way to the
            # page, and holding new ones back
            while page in w.busy:
                yield Sleep(0.01)
            w.busy.add(page)
            try:
                done = yield from resync(w, "c", page, view)
            finally:
                w.busy.discard(page)
            if not done:
                yield Sleep(_backoff(attempt))
            continue
        w.check_read(page, before, bytes(data), part[i])
        return


def resync(w: World, client: str, page: int, view: View) -> Resync:
    """``Worker._resync_page`` + ``_repair`` (``client == "w"``) or
    ``Driver._resync_once`` (``"c"``): STATUS of the live copies (the driver: the
    readable ones); unless they agree, copy the authoritative copy to the others
    (conditional ``fua`` WRITE) and MARK_CLEAN every live copy by compare-and-set, the
    authoritative one last.  Whether it is done."""
    epoch, part = view.epoch, view.part(page)
    live = view.readable(page) if client == "c" else view.live(page)
    if not live:
        return False
    req = m.StatusRequest(VOLUME, epoch, LAYER, (page,))
    answers = yield Call(tuple((part[i], req, b"") for i in live), RPC_TIMEOUT)
    statuses: dict[int, Status] = {}
    for i, a in zip(live, answers, strict=False):
        if not _ok(w, client, part[i], a, "status"):
            return False
        assert isinstance(a, tuple)
        assert isinstance(a[0], m.StatusResponse)
        statuses[i] = a[0].entries[0][1:]
    if client == "c":
        up = live
    else:
        # the copies the real repair core lets a repair copy from: the up ones not being
        # filled; with none, those up last when all copies are back, or a filling copy
        # that holds the page and is up
        pidx = view.pidx(page)
        up = repair.sources(
            statuses, live, len(part),
            up=[i for i, s in enumerate(part) if view.states[s] == UP],
            filling=[i for i, s in enumerate(part) if (pidx, s) in view.filling],
            layer_filling=bool(view.filling),
            up_until=None if w.broken == "source_by_order" else
            {i: view.up_until.get(sid, 0) for i, sid in enumerate(part)},
        )  # fmt: skip
    # the real repair core decides; the worker waits for a client write in flight on a
    # target (the authoritative copy may not hold it yet), the writing client does not
    plan = repair.plan(
        statuses, live, up, top=True,
        wait_for_writes=client == "w" and w.broken != "overwrite_writing",
    )  # fmt: skip
    if plan.verdict is repair.Verdict.AGREE:
        return True
    if plan.verdict is repair.Verdict.NO_SOURCE:
        return client == "c"  # the driver: no readable copy holds it, nothing to equalise
    if plan.verdict is repair.Verdict.WAIT:
        writing = [part[t] for t in plan.targets if statuses[t][3] & m.WRITING]
        w.trace(f"w: page {page}: a write is in flight on {writing}: later")
        return False
    auth = plan.source
    assert auth is not None
    targets = list(plan.targets)
    w.repairs += 1
    w.trace(f"{client}: resync page {page} from {part[auth]} {_show(part, statuses)}")
    if statuses[auth][0] == PageState.PRESENT:
        rq = m.ReadRequest(VOLUME, epoch, LAYER, page, PAGE, 0, PAGE)
        (a,) = yield Call(((part[auth], rq, b""),), RPC_TIMEOUT)
        if not _ok(w, client, part[auth], a, "read"):
            return False
        assert isinstance(a, tuple)
        assert isinstance(a[0], m.ReadResponse)
        if a[0].generation != statuses[auth][2]:
            return False
        data = bytes(a[1])
    else:
        data = bytes(PAGE)
    gens = {i: statuses[i][2] for i in live}
    for t in targets:
        wr = m.WriteRequest(  # durable (fua) before any mask vouches for it
            VOLUME, epoch, LAYER, page, PAGE, 0, FULL, FULL, w.broken != "resync_without_fua",
            conditional=True, if_generation=gens[t],
        )  # fmt: skip
        (a,) = yield Call(((part[t], wr, data),), RPC_TIMEOUT)
        if not _ok(w, client, part[t], a, "copy"):
            return False
        assert isinstance(a, tuple)
        assert isinstance(a[0], m.WriteResponse)
        gens[t] = a[0].generation
    if w.broken != "mark_before_source_sync":  # every mask vouches for every live copy
        flushes = tuple(
            (part[i], m.FlushRequest(VOLUME, epoch), b"") for i in live if i not in targets
        )
        answers = (yield Call(flushes, RPC_TIMEOUT)) if flushes else []
        for (sid, _, _), a in zip(flushes, answers, strict=True):
            if not _ok(w, client, sid, a, "flush"):
                return False
    for i in plan.mark_order:
        mc = m.MarkCleanRequest(VOLUME, epoch, LAYER, page, gens[i], plan.mask)
        (a,) = yield Call(((part[i], mc, b""),), RPC_TIMEOUT)
        if not _ok(w, client, part[i], a, "mark clean"):
            return False
    return True


def _show(part: tuple[str, ...], statuses: dict[int, Status]) -> str:
    return " ".join(
        f"{part[i]}=({st},{mask:#x},g{gen})" for i, (st, mask, gen, _) in statuses.items()
    )


def _ok(w: World, client: str, sid: str, a: Answer, what: str) -> bool:
    if not isinstance(a, BaseException):
        return True
    w.trace(f"{client}: resync {what} on {sid}: {type(a).__name__}")
    if not isinstance(a, LaminaError | TimedOut):
        raise a
    if client == "c" and not isinstance(a, StaleEpoch):
        w.mgr.report(sid, type(a).__name__)
    return False


def worker(w: World) -> Proc:
    """Rounds over every page; a recovering server becomes up after a round at one epoch
    that left nothing of its partitions dirty."""
    while True:
        yield Sleep(WORKER_PERIOD)
        view = w.view()
        epoch, states = view.epoch, view.states
        ready = {s: True for s, st in sorted(states.items()) if st == RECOVERING}
        if w.broken != "recover_alone":
            # A copy may come back up only with every other copy of its partitions live:
            # one that is down may hold the newest acknowledged writes.
            for part in view.parts:
                if any(states[s] not in LIVE for s in part):
                    for s in part:
                        ready[s] = False
        clean, repairs = True, w.repairs
        for sid in sorted(view.retired):
            # not while a copy is being filled: the old copy may still be the only one
            # holding some of the data (the fill's source may fail)
            if not view.filling and states[sid] in LIVE and (yield from reclaim(w, sid, view)):
                w.mgr.reclaim_done(sid)
        for pidx, sid in sorted(view.filling):
            if (yield from fill(w, pidx, sid, view)) and w.mgr.published_epoch == epoch:
                w.mgr.fill_done(pidx, sid)
            else:
                clean = False
        for page in range(PAGES):
            if not (yield from resync(w, "w", page, view)):
                clean = False
                for s in view.part(page):
                    if s in ready:
                        ready[s] = False
        w.rounds += 1
        quiet = clean and repairs == w.repairs and epoch == w.mgr.published_epoch
        w.quiet_rounds = w.quiet_rounds + 1 if quiet else 0
        if w.mgr.published_epoch == epoch:
            for s, ok in ready.items():
                if ok:
                    w.mgr.ready(s)


def reclaim(w: World, sid: str, view: View) -> Resync:
    """What the leader does for a server retired from the layer once it is back:
    DELETE_LAYER there (``keep_old_copy``: skip it, as if the old copy were harmless).
    Whether it is done."""
    if w.broken == "keep_old_copy":
        return True
    req = m.DeleteLayerRequest(VOLUME, view.epoch, LAYER)
    (a,) = yield Call(((sid, req, b""),), RPC_TIMEOUT)
    if not _ok(w, "w", sid, a, "delete layer"):
        return False
    w.trace(f"w: {sid} dropped the layer it was retired from")
    return True


def fill(w: World, pidx: int, target: str, view: View) -> Resync:
    """``Worker._fill``: copy to ``target`` every page of partition ``pidx`` that a
    trusted copy holds and the target lacks (conditional WRITE at generation 0), then
    FLUSH the target.  Whether every page is there and durable."""
    part = view.parts[pidx]
    if view.states[target] != UP:
        return False
    page0 = pidx  # a page of this partition
    sources = [i for i in view.readable(page0) if part[i] != target]
    if not sources:
        return False
    source = part[sources[0]]
    for page in range(pidx, PAGES, len(view.parts)):
        st = m.StatusRequest(VOLUME, view.epoch, LAYER, (page,))
        (a,) = yield Call(((target, st, b""),), RPC_TIMEOUT)
        if not _ok(w, "w", target, a, "fill status"):
            return False
        assert isinstance(a, tuple)
        assert isinstance(a[0], m.StatusResponse)
        if a[0].entries[0][1] != PageState.ABSENT:
            continue
        rq = m.ReadRequest(VOLUME, view.epoch, LAYER, page, PAGE, 0, PAGE)
        (a,) = yield Call(((source, rq, b""),), RPC_TIMEOUT)
        if not _ok(w, "w", source, a, "fill read"):
            return False
        assert isinstance(a, tuple)
        assert isinstance(a[0], m.ReadResponse)
        if a[0].state == PageState.ABSENT:
            continue
        data = bytes(a[1]) if a[0].state == PageState.PRESENT else bytes(PAGE)
        wr = m.WriteRequest(
            VOLUME, view.epoch, LAYER, page, PAGE, 0, FULL, FULL, False,
            conditional=True, if_generation=0,
        )  # fmt: skip
        (a,) = yield Call(((target, wr, data),), RPC_TIMEOUT)
        if isinstance(a, Conflict):
            continue  # a client's write created it meanwhile
        if not _ok(w, "w", target, a, "fill write"):
            return False
        w.trace(f"w: filled page {page} on {target} from {source}")
    (a,) = yield Call(((target, m.FlushRequest(VOLUME, view.epoch), b""),), RPC_TIMEOUT)
    return _ok(w, "w", target, a, "fill flush")


def flush(w: World) -> Proc:
    """What ``Driver.flush`` does: FLUSH every live server of the volume until all
    succeed; then the writes acknowledged before it are durable on every copy it
    reached, and their tokens go back."""
    before = w.ack_seq + 1
    batch, w.unsynced = w.unsynced, []
    w.procs.spawn("restore", "c", restore_tokens(w), lambda _: None)
    attempt = 0
    while True:
        attempt += 1
        view = w.view()
        epoch, states = view.epoch, view.states
        servers = sorted({s for part in view.parts for s in part if states[s] in LIVE})
        req = m.FlushRequest(VOLUME, epoch)
        answers = yield Call(tuple((s, req, b"") for s in servers), RPC_TIMEOUT)
        errors = [
            (s, a) for s, a in zip(servers, answers, strict=True) if isinstance(a, BaseException)
        ]
        if not errors:
            break
        yield from recover(w, errors, attempt, f"flush epoch {epoch}")
    w.flushes += 1
    w.flushed(before, set(servers))
    w.trace(f"client: FLUSH done on {servers} (writes before ack {before})")
    rest = w.confirm_durable(batch, set(servers))
    if rest:  # not covered (a server left meanwhile): the background sync's turn
        w.unsynced[:0] = rest
        w.sync_soon()
    yield from restore_tokens(w)


def background_sync(w: World) -> Proc:
    """``Driver._sync_unsynced``: FLUSH the servers of the writes waiting for
    durability, confirm the writes whose copies all flushed, drop the others (their
    pages stay dirty until a resynchronisation)."""
    before = w.ack_seq + 1
    batch, w.unsynced = w.unsynced, []
    servers = sorted({sid for group in batch for sid, _ in group})
    req = m.FlushRequest(VOLUME, w.mgr.published_epoch)
    answers = yield Call(tuple((s, req, b"") for s in servers), RPC_TIMEOUT)
    done = {s for s, a in zip(servers, answers, strict=True) if not isinstance(a, BaseException)}
    w.flushed(before, done)
    dropped = w.confirm_durable(batch, done)
    if dropped:
        w.trace(
            f"client: {len(dropped)} writes stay unconfirmed (no FLUSH on {set(servers) - done})"
        )
    yield from restore_tokens(w)


def restore_tokens(w: World) -> Proc:
    """Confirm acknowledged writes' tokens that no request carried yet (RESTORE)."""
    calls = []
    for (client, sid), tokens in sorted(w.tokens.items()):
        if tokens and client == "c":
            calls.append((sid, m.RestoreRequest(w.take_tokens(client, sid)), b""))
    if calls:
        yield Call(tuple(calls), RPC_TIMEOUT)

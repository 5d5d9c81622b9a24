"""The manager leader's background worker [0061]-[0064] (Fig. 6): resynchronisation.

Theory of operation
-------------------
The worker is stateless: everything it needs it learns from the published map and by
asking the storage servers, so a new leader simply resumes.  One round
(:meth:`Worker.run_once`):

- **Phase 1**, per layer of every volume: ENUMERATE the pages whose sync mask is not
  full (or that are quarantined) on every live copy (``up`` and ``recovering`` servers),
  at most ``limit`` pages per layer and round; the union is the work.
- **Phase 2**, ``parallel`` pages at a time: STATUS of every live copy.  A page whose
  live copies all vouch for each other and agree needs nothing.  Otherwise the
  authoritative copy is chosen deterministically among the ``up`` copies not being
  filled (never a ``recovering`` one: it is what is being repaired; when none is up,
  among those :func:`lamina.repair.sources` names) by
  :func:`lamina.storage.syncmask.authoritative`; its page is READ whole and written to
  every copy that needs it with a *conditional* WRITE (applied only if that copy is still
  at the generation its STATUS showed), then every live copy is marked clean by
  compare-and-set on its generation, the authoritative copy last.  A client write that
  reaches a copy after its STATUS changes its generation, so a WRITE or MARK_CLEAN
  answers CONFLICT and the page simply stays dirty for the next round.  A client write
  that reached a copy *before* its STATUS may not have reached the authoritative copy
  yet, so the bytes read from it could lack that write: the STATUS flag ``WRITING``
  says so (the write's token is unconfirmed), and such a copy of a top layer is left
  alone until the write is confirmed.  Once it is, every copy acknowledged it before,
  so the authoritative copy, read after the STATUS, holds it.  So a resync never
  overwrites newer data.
- A ``recovering`` server becomes ``up`` after a round that enumerated every layer it
  holds completely and left no page of its partitions dirty, and only where that proves
  something: each of its partitions has another copy that is ``up`` and trusted (a write
  it missed cleared its bit there), or every copy is live (their masks were all listed).
  A copy back alone, while the copies that took writes in its absence are down, has a
  clean mask and stale data: it stays ``recovering``.  Drivers write to
  ``recovering`` copies like to ``up`` ones (and wait for a failed one to be marked down),
  so nothing written after that round can be missing on it.

- A page no live copy holds soundly (every copy it could be repaired from quarantined,
  having failed its checksums) is *lost*: nothing can be copied.  The worker records it
  (:class:`LostPage`, in ``Progress.lost``: ``lamina status`` and ``lamina volume info``
  show it with what the operator can do), stops working on it and looks at it again only
  every ``LOST_RECHECK`` seconds; it is forgotten once no copy lists it as dirty (a
  client wrote the whole page again) or its layer left the map.

Progress (pages found, left, resynchronised, bytes copied, rate) is kept in
:class:`Progress` for ``lamina status`` and ``GET /api/v1/status``.  Copy traffic can
be throttled to ``rate_limit`` bytes per second so client I/O keeps the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from lamina import repair
from lamina.config import parse_addr
from lamina.errors import Conflict, Corrupt, LaminaError, StaleEpoch, Unavailable
from lamina.mgmt import clustermap as cm
from lamina.mgmt.service import ManagerService
from lamina.storage.syncmask import FULL, bits
from lamina.wire import messages as m
from lamina.wire.connection import Client
from lamina.wire.messages import PageState

log = logging.getLogger(__name__)

T = TypeVar("T")
LIVE = (cm.ServerState.UP, cm.ServerState.RECOVERING)
#: one copy's answer to STATUS (or CHECKSUM): state, mask, generation, flags
Status = repair.Status
#: seconds a resync waits, within a round, for a copy to repair to have no client write
#: in flight (looking every WRITING_STEP seconds), before leaving it to the next round
WRITING_WAIT = 0.6
WRITING_STEP = 0.05
#: tries (0.1 s apart) of a request a server refuses while it catches up to an epoch
CATCH_UP_RETRIES = 40
#: seconds of copying the throttle lets through at once (bursts stay short)
THROTTLE_BURST = 0.1
#: seconds between two looks at a lost page (corrupt on every copy it could come from)
LOST_RECHECK = 60.0
#: what an operator can do about a lost page (``lamina status``, ``lamina volume info``)
LOST_ADVICE = (
    "write the whole page again (a write that covers only part of it fails with EIO), "
    "or restore that range from a backup"
)


@dataclass
class LostPage:
    """A page corrupt on every copy it could be repaired from."""

    volume: str
    layer: int
    page: int
    offset: int  # its first byte in the volume
    length: int
    copies: dict[str, str]  # server -> state of its copy ("quarantined", "absent", ...)
    since: float  # unix time it was found lost
    advice: str = LOST_ADVICE


@dataclass
class Progress:
    """What the worker did; the last round's figures and running totals."""

    rounds: int = 0
    pages_found: int = 0  # dirty pages found by the last round
    pages_left: int = 0  # of those, not resynchronised (conflict, error)
    pages_resynced: int = 0  # total
    bytes_copied: int = 0  # total
    conflicts: int = 0  # total
    errors: int = 0  # total
    deferred: int = 0  # total: dirty pages left one round for their writer
    round_seconds: float = 0.0
    copy_rate: float = 0.0  # bytes/s during the last round
    recovering: tuple[str, ...] = ()
    #: by source layer: {volume, layer, to, moved (pages, total), left (last round)}
    moved: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: volume -> shared pages the last round could not copy yet
    flattening: dict[str, int] = field(default_factory=dict)
    #: pages corrupt on every copy, by (layer, page)
    lost: dict[tuple[int, int], LostPage] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["recovering"] = list(self.recovering)
        doc["moved"] = [self.moved[k] for k in sorted(self.moved)]
        doc["lost"] = [asdict(self.lost[k]) for k in sorted(self.lost)]
        return doc


@dataclass
class ScrubReport:
    """One scrub of one volume: every page present on a live copy, all copies compared."""

    volume: str
    started: float  # unix time
    done: bool = False
    pages_total: int = 0  # pages to compare (known once they are enumerated)
    pages_checked: int = 0
    mismatches: int = 0  # pages whose live copies differed (or failed their checksums)
    repaired: int = 0  # of those, made equal and clean again
    corrupt: int = 0  # copies that failed their checksums
    errors: int = 0  # pages that could not be compared (a server failed, a conflict)
    bytes_read: int = 0
    error: str | None = None  # why the scrub stopped early, if it did

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Worker:
    def __init__(
        self,
        service: ManagerService,
        key: bytes,
        leading: Callable[[], bool],
        propose: Callable[[cm.Command], Awaitable[Any]],
        *,
        limit: int = 4096,
        parallel: int = 4,
        interval: float = 1.0,
        rate_limit: float | None = None,
        scrub_interval: float = 0.0,
    ) -> None:
        self.service = service
        self.key = key
        self.leading = leading
        self.propose = propose
        self.limit = limit
        self.parallel = parallel
        self.interval = interval
        self.rate_limit = rate_limit
        self.scrub_interval = scrub_interval
        self._next_scrub = time.monotonic() + scrub_interval
        self._background_scrub: asyncio.Task[None] | None = None
        self.progress = Progress()
        self.scrubs: dict[str, ScrubReport] = {}
        self._scrub_tasks: dict[str, asyncio.Task[ScrubReport]] = {}
        self._clients: dict[str, Client] = {}
        self._budget_t = time.monotonic()
        self._budget = 0.0
        #: generations of the dirty pages left for the next round, by (layer, page)
        self._seen_dirty: dict[tuple[int, int], tuple[int, ...]] = {}
        # per server, the epoch it last stopped being up (repair.sources), as of the map
        # the current round or scrub uses
        self._up_until: dict[str, int] = {}
        #: when each lost page (``progress.lost``) is looked at again (monotonic)
        self._recheck: dict[tuple[int, int], float] = {}

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            if self.leading():
                try:
                    await self.run_once()
                except Exception:
                    log.exception("background worker round failed; trying again")
                self._maybe_scrub()
            else:
                self.close()
            await asyncio.sleep(self.interval)

    def _maybe_scrub(self) -> None:
        """Every ``scrub_interval`` seconds (0: never), scrub every volume, one at a time,
        throttled like the resync."""
        now = time.monotonic()
        if not self.scrub_interval or now < self._next_scrub:
            return
        if self._background_scrub is not None and not self._background_scrub.done():
            return
        self._next_scrub = now + self.scrub_interval
        self._background_scrub = asyncio.ensure_future(self._scrub_all())

    async def _scrub_all(self) -> None:
        for name in sorted(self.service.map.volumes):
            if not self.leading():
                return
            report = await self.scrub(name)
            self.scrubs[name] = report

    def close(self) -> None:
        for task in self._scrub_tasks.values():
            task.cancel()
        if self._background_scrub is not None:
            self._background_scrub.cancel()
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    async def run_once(self) -> Progress:
        """One round over every volume; returns the progress after it.  The worker is the
        leader itself: it works on the newest committed map at its epoch (a server that
        has not learnt that epoch yet answers UNAVAILABLE and the round is retried), so a
        state change is acted on at once, not a publication later."""
        cmap = self.service.map
        started = time.monotonic()
        copied_before = self.progress.bytes_copied
        epoch = cmap.epoch
        state = {sid: s.state for sid, s in cmap.servers.items()}
        self._up_until = {sid: s.up_until for sid, s in cmap.servers.items()}
        recovering = sorted(sid for sid, st in state.items() if st is cm.ServerState.RECOVERING)
        ready = dict.fromkeys(recovering, True)
        found = left = 0
        sem = asyncio.Semaphore(self.parallel)
        lost = self.progress.lost
        for key in [k for k in lost if k[0] not in cmap.layers]:
            self._found(key)  # its layer left the map
        for volume in sorted(cmap.volumes.values(), key=lambda v: v.id):
            for lid in cmap.own_layers(volume):  # a shared layer is its owner's to repair
                layer = cmap.layers[lid]
                servers = sorted({sid for part in layer.placement for sid in part})
                live = [sid for sid in servers if state.get(sid) in LIVE]
                pages, complete = await self._listed(volume, layer, live, epoch)
                for key in [k for k in self._seen_dirty if k[0] == lid and k[1] not in pages]:
                    del self._seen_dirty[key]  # clean again by itself
                for key in [k for k in lost if complete and k[0] == lid and k[1] not in pages]:
                    log.info("page %d of layer %d is no longer lost", key[1], lid)
                    self._found(key)  # written whole again
                now = time.monotonic()
                pages = {p for p in pages if self._recheck.get((lid, p), 0.0) <= now}
                if not complete:
                    for sid in recovering:
                        if sid in servers:
                            ready[sid] = False
                for pidx, part in enumerate(layer.placement):
                    for sid in part:
                        if sid in ready and not _vouched(part, sid, state, layer, pidx):
                            ready[sid] = False
                found += len(pages)

                async def one(
                    page: int, volume: cm.Volume = volume, layer: cm.Layer = layer
                ) -> bool:
                    async with sem:
                        return await self._resync_page(volume, layer, page, epoch, state)

                results = await asyncio.gather(*(one(p) for p in sorted(pages)))
                unsettled: set[int] = set()  # partitions with a page left dirty
                for page, ok in zip(sorted(pages), results, strict=True):
                    if not ok:
                        left += 1
                        unsettled.add(page % len(layer.placement))
                        for sid in layer.placement[page % len(layer.placement)]:
                            if sid in ready:
                                ready[sid] = False
                for pidx, sid in layer.filling:
                    filled = await self._fill(volume, layer, pidx, sid, epoch, state, sem)
                    if filled and complete and pidx not in unsettled and self.leading():
                        log.info(
                            "copy %s of partition %d of layer %d is filled", sid, pidx, layer.id
                        )
                        with contextlib.suppress(LaminaError):
                            await self.propose(cm.FillDone(layer.id, pidx, sid))
        if self.leading():
            await self._move_all(cmap, epoch, state, sem)
            await self._flatten_all(cmap, epoch, state, sem)
        for sid, ok in ready.items():
            if ok and self.leading():
                log.info("storage server %s holds nothing dirty: back up", sid)
                with contextlib.suppress(LaminaError):
                    await self.propose(cm.SetServerState(sid, cm.ServerState.UP))
        p = self.progress
        p.rounds += 1
        p.pages_found, p.pages_left = found, left
        p.round_seconds = time.monotonic() - started
        copied = p.bytes_copied - copied_before
        p.copy_rate = copied / p.round_seconds if p.round_seconds > 0 else 0.0
        p.recovering = tuple(recovering)
        return p

    # -- filling new copies (re-replication) -------------------------------------------

    async def _fill(
        self,
        volume: cm.Volume,
        layer: cm.Layer,
        pidx: int,
        target: str,
        epoch: int,
        state: dict[str, cm.ServerState],
        sem: asyncio.Semaphore,
    ) -> bool:
        """Copy to ``target`` every page of partition ``pidx`` that a trusted copy holds
        and ``target`` does not (a conditional WRITE at generation 0: a page a client
        created there meanwhile is left alone).  Pages copied earlier are not copied
        again, so a new leader resumes where the old one was.  Trusting what ``target``
        holds is right because a copy is only placed on a server that holds nothing of
        the layer (a server the layer ``retired`` gets none until it dropped it), so
        every page there was written since.  Whether every page is there and durable
        (the target FLUSHed)."""
        part = layer.placement[pidx]
        if state.get(target) is not cm.ServerState.UP:
            return False
        live = [i for i, sid in enumerate(part) if state.get(sid) in LIVE]
        sources = [i for i in _trusted(part, live, state, layer, pidx) if part[i] != target]
        if not sources:
            return False
        source = part[sources[0]]
        n = len(layer.placement)
        try:
            held = await self._present_pages(volume, layer, [source], epoch)
        except (LaminaError, OSError, TimeoutError) as exc:
            log.info("filling %s: listing %s: %s", target, source, exc)
            self._failed(exc)
            return False
        pages = sorted(p for p in held if p % n == pidx)

        async def one(page: int) -> bool:
            async with sem:
                return await self._fill_page(volume, layer, page, epoch, source, target)

        results = await asyncio.gather(*(one(p) for p in pages))
        if not all(results):
            return False
        # FillDone makes the copy readable and the others vouch for it from then on: its
        # pages must be on its disk first, not only in its page cache
        try:
            await self._call(target, m.FlushRequest(volume.id, epoch))
        except (LaminaError, OSError, TimeoutError) as exc:
            log.info("filling %s: flush: %s", target, exc)
            self._failed(exc)
            return False
        return True

    async def _fill_page(
        self, volume: cm.Volume, layer: cm.Layer, page: int, epoch: int, source: str, target: str
    ) -> bool:
        size = volume.page_size
        status = m.StatusRequest(volume.id, epoch, layer.id, (page,))
        try:
            reply = await self._call(target, status)
            assert isinstance(reply, m.StatusResponse)
            if reply.entries[0][1] != PageState.ABSENT:
                return True
            read, data = await self._call_with_payload(
                source, m.ReadRequest(volume.id, epoch, layer.id, page, size, 0, size)
            )
            assert isinstance(read, m.ReadResponse)
            if read.state == PageState.ABSENT:
                return True
            if read.state == PageState.ZERO:  # created as it is there: no space taken
                await self._call(
                    target, m.CreateRequest(volume.id, epoch, layer.id, page, size, FULL, True)
                )
                return True
            payload = data if read.state == PageState.PRESENT else bytes(size)
            await self._throttle(size)
            await self._call_with_payload(
                target,
                m.WriteRequest(
                    volume.id, epoch, layer.id, page, size, 0, FULL, FULL, False,
                    conditional=True, if_generation=0,
                ),
                payload,
            )  # fmt: skip
        except Conflict:
            return True  # created meanwhile by a client's copy-up: it has the page
        except (LaminaError, OSError, TimeoutError) as exc:
            log.info("filling page %d of layer %d on %s: %s", page, layer.id, target, exc)
            self._failed(exc)
            return False
        self.progress.bytes_copied += size
        return True

    # -- phase 1 -----------------------------------------------------------------------------

    async def _listed(
        self,
        volume: cm.Volume,
        layer: cm.Layer,
        live: list[str],
        epoch: int,
        what: m.EnumerateWhat = m.EnumerateWhat.DIRTY,
    ) -> tuple[set[int], bool]:
        """Up to ``limit`` pages some live copy lists as ``what`` (dirty, or present);
        whether every listing was complete."""
        pages: set[int] = set()
        complete = True
        for sid in live:
            start = 0
            while True:
                budget = self.limit - len(pages)
                if budget <= 0:
                    return pages, False
                try:
                    reply = await self._call(
                        sid,
                        m.EnumerateRequest(
                            volume.id, epoch, layer.id, what, start,
                            min(budget, m.MAX_ENUMERATE),
                        ),
                    )  # fmt: skip
                except (LaminaError, OSError, TimeoutError) as exc:
                    log.info("enumerating layer %d on %s: %s", layer.id, sid, exc)
                    self._failed(exc)
                    complete = False
                    break
                assert isinstance(reply, m.EnumerateResponse)
                pages.update(reply.pages)
                if reply.done:
                    break
                start = reply.next_start
        return pages, complete

    # -- phase 2 -----------------------------------------------------------------------------

    async def _resync_page(
        self,
        volume: cm.Volume,
        layer: cm.Layer,
        page: int,
        epoch: int,
        state: dict[str, cm.ServerState],
        defer: bool = True,
    ) -> bool:
        """Make the live copies of one page agree (phase 2); whether it is done.  A copy
        to repair with a client write in flight is looked at again every WRITING_STEP
        seconds, for WRITING_WAIT seconds (its tokens come back within a fraction of a
        second), then left for the next round."""
        part = layer.placement[page % len(layer.placement)]
        live = [i for i, sid in enumerate(part) if state.get(sid) in LIVE]
        top = _is_top(volume, layer)
        size = volume.page_size
        give_up = time.monotonic() + WRITING_WAIT
        while True:
            try:
                statuses = await self._statuses(volume, layer, page, epoch, part, live)
                if repair.agree(statuses, live):
                    return True  # the live copies agree; any dirt is about copies not live
                up = self._sources(statuses, part, live, state, layer, page)
                key = (layer.id, page)
                gens_now = tuple(statuses[i][2] for i in live)
                urgent = any(
                    state.get(part[i]) is not cm.ServerState.UP or i not in up for i in live
                )
                if defer and not urgent and self._seen_dirty.get(key) != gens_now:
                    # Dirt on a page whose copies are all trusted is most often a write
                    # whose tokens are still on their way: look again next round, and
                    # resync only if nothing changed meanwhile (a hot page is left to its
                    # writer).
                    self._seen_dirty[key] = gens_now
                    self.progress.deferred += 1
                    return False
                self._seen_dirty.pop(key, None)
                plan = repair.plan(statuses, live, up, top=top)
                if plan.verdict is repair.Verdict.NO_SOURCE:
                    if repair.lost(statuses, live):
                        self._lose(volume, layer, page, part, statuses)
                        return True  # nothing can be done but report it
                    return not any(st != PageState.ABSENT for st, *_ in statuses.values())
                self._found(key)
                auth = plan.source
                assert auth is not None
                targets = list(plan.targets)
                if plan.verdict is repair.Verdict.WAIT:
                    if time.monotonic() < give_up:
                        await asyncio.sleep(WRITING_STEP)
                        continue
                    self.progress.deferred += 1
                    return False
                auth_state, _, auth_gen, _ = statuses[auth]
                if auth_state == PageState.PRESENT:
                    reply, data = await self._call_with_payload(
                        part[auth], m.ReadRequest(volume.id, epoch, layer.id, page, size, 0, size)
                    )
                    assert isinstance(reply, m.ReadResponse)
                    if reply.generation != auth_gen:
                        self.progress.conflicts += 1
                        return False
                else:
                    data = bytes(size)
                copied = await self._repair(
                    volume, layer, page, epoch, part, live, auth, data, statuses, targets
                )
                self.progress.bytes_copied += copied  # not `+= await`: pages run concurrently
            except Conflict:
                self.progress.conflicts += 1
                return False
            except (LaminaError, OSError, TimeoutError) as exc:
                log.info("resync of page %d of layer %d: %s", page, layer.id, exc)
                self._failed(exc)
                return False
            self.progress.pages_resynced += 1
            return True

    # -- settling a frozen layer ---------------------------------------------------------

    async def settle(self, layer_id: int, timeout: float = 15.0) -> bool:
        """Resynchronise now (no deferral) every dirty page of layer ``layer_id`` until a
        complete listing finds none whose live copies differ; whether that happened
        within ``timeout`` seconds.  A snapshot is taken once its layer is settled: a
        write that reached one copy of the old top and was refused by the fence on
        another (it was then redone in the new top) leaves the copies different, and a
        reader of the snapshot could see either until the resync chose one.  Any
        manager may run it: conditional writes and CAS keep it safe beside the worker."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sem = asyncio.Semaphore(self.parallel)
        while True:
            cmap = self.service.map
            layer = cmap.layers.get(layer_id)
            owner = None if layer is None else cmap.volume_by_id(layer.volume_id)
            if layer is None or owner is None:
                return False
            state = {sid: s.state for sid, s in cmap.servers.items()}
            self._up_until = {sid: s.up_until for sid, s in cmap.servers.items()}
            servers = sorted({sid for part in layer.placement for sid in part})
            live = [sid for sid in servers if state.get(sid) in LIVE]
            pages, complete = await self._listed(owner, layer, live, cmap.epoch)

            async def one(page: int, owner: cm.Volume, layer: cm.Layer, epoch: int,
                          state: dict[str, cm.ServerState]) -> bool:  # fmt: skip
                async with sem:
                    return await self._resync_page(owner, layer, page, epoch, state, defer=False)

            results = await asyncio.gather(
                *(one(p, owner, layer, cmap.epoch, state) for p in sorted(pages))
            )
            if complete and all(results):
                return True
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)

    # -- layers: moving pages up (migration, merge of a deleted snapshot), flattening ------

    async def _move_all(
        self,
        cmap: cm.ClusterMap,
        epoch: int,
        state: dict[str, cm.ServerState],
        sem: asyncio.Semaphore,
    ) -> None:
        """Move pages out of every layer that ``migrates_to`` another (DESIGN section 8):
        each page an in-sync source copy holds is created in the target layer if absent
        there (CREATE_IF_ABSENT: a client's copy-up or a newer write wins); once every
        live server of the target has answered a FLUSH (the copies are durable), the
        pages are tombstoned on every source copy, which frees their space at once.  A
        source found empty, complete on every partition, and into which nothing migrates
        any more is retired (``MigrationDone``), after one more FLUSH of the target."""
        moving: dict[int, dict[str, Any]] = {}
        for lid in sorted(cmap.layers):
            source = cmap.layers[lid]
            if source.migrates_to is None:
                continue
            target = cmap.layers[source.migrates_to]
            volume = cmap.volume_by_id(source.volume_id)
            if volume is None:
                continue
            live = sorted(
                {sid for part in source.placement for sid in part if state.get(sid) in LIVE}
            )
            pages, listed = await self._listed(volume, source, live, epoch, m.EnumerateWhat.PRESENT)
            copied = await asyncio.gather(
                *(
                    _bounded(sem, self._move_page(volume, source, target, p, epoch, state))
                    for p in sorted(pages)
                )
            )
            ready = [p for p, ok in zip(sorted(pages), copied, strict=True) if ok]
            moved = 0
            if ready and await self._flush_layer(volume, target, epoch, state):
                buried = await asyncio.gather(
                    *(
                        _bounded(sem, self._tombstone(volume, source, p, epoch, state))
                        for p in ready
                    )
                )
                moved = sum(buried)
            entry = moving.setdefault(
                lid, {"volume": volume.name, "layer": lid, "to": target.id, "moved": 0}
            )
            entry["left"] = len(pages) - moved
            entry["moved"] = self.progress.moved.get(lid, {}).get("moved", 0) + moved
            whole = all(
                _trusted(part, list(range(len(part))), state, source, pidx)
                for pidx, part in enumerate(source.placement)
            )
            if (
                listed
                and not pages
                and whole
                and not any(x.migrates_to == lid for x in cmap.layers.values())
                and self.leading()
                and await self._flush_layer(volume, target, epoch, state)
            ):
                log.info("layer %d holds no page any more: retiring it", lid)
                with contextlib.suppress(LaminaError):
                    await self.propose(cm.MigrationDone(lid))
                entry["left"] = 0
        self.progress.moved = moving

    async def _move_page(
        self,
        volume: cm.Volume,
        source: cm.Layer,
        target: cm.Layer,
        page: int,
        epoch: int,
        state: dict[str, cm.ServerState],
    ) -> bool:
        """Copy one page from ``source`` up into ``target`` (not durable yet, and not
        tombstoned in ``source``); whether it may now be tombstoned there."""
        pidx = page % len(source.placement)
        part = source.placement[pidx]
        live = [i for i, sid in enumerate(part) if state.get(sid) in LIVE]
        try:
            statuses = await self._statuses(volume, source, page, epoch, part, live)
            if any(st == PageState.TOMBSTONE for st, *_ in statuses.values()):
                return True  # moved already: only copies that missed the tombstone are left
            trusted = _trusted(part, live, state, source, pidx)
            verdict = repair.plan(statuses, trusted, trusted, top=False).verdict
            if verdict is repair.Verdict.NO_SOURCE and repair.lost(statuses, trusted):
                return await self._lost_in_source(
                    volume, source, target, page, epoch, state, statuses
                )
            if not repair.agree(statuses, trusted):
                return False  # the resync makes it clean first
            auth = repair.plan(statuses, trusted, trusted, top=False).source
            if auth is None:
                auth = next((i for i in trusted if statuses[i][0] != PageState.ABSENT), None)
            if auth is None:
                return False
            size = volume.page_size
            st = statuses[auth][0]
            data: bytes | bytearray = b""
            if st == PageState.PRESENT:
                reply, data = await self._call_with_payload(
                    part[auth], m.ReadRequest(volume.id, epoch, source.id, page, size, 0, size)
                )
                assert isinstance(reply, m.ReadResponse)
            await self._throttle(size)
            await self._create(volume, target, page, epoch, state, data, st == PageState.ZERO)
            self.progress.bytes_copied += size
        except (LaminaError, OSError, TimeoutError) as exc:
            log.info("moving page %d of layer %d: %s", page, source.id, exc)
            self._failed(exc)
            return False
        return True

    async def _lost_in_source(
        self,
        volume: cm.Volume,
        source: cm.Layer,
        target: cm.Layer,
        page: int,
        epoch: int,
        state: dict[str, cm.ServerState],
        statuses: dict[int, Status],
    ) -> bool:
        """A page of a migration source corrupt on every copy (``statuses``: its copies'
        STATUS there) may go once the target
        holds it (written whole there since); else it is lost.  Whether it may go."""
        part = target.placement[page % len(target.placement)]
        live = [i for i, sid in enumerate(part) if state.get(sid) in LIVE]
        above = await self._statuses(volume, target, page, epoch, part, live)
        held = (PageState.PRESENT, PageState.ZERO)
        if live and all(st in held for st, *_ in above.values()):
            self._found((source.id, page))
            return True
        self._lose(volume, source, page, source.placement[page % len(source.placement)], statuses)
        return False

    async def _tombstone(
        self,
        volume: cm.Volume,
        source: cm.Layer,
        page: int,
        epoch: int,
        state: dict[str, cm.ServerState],
    ) -> bool:
        """TOMBSTONE a page whose copy in the target layer is durable on every live copy
        of the source; whether every one answered."""
        part = source.placement[page % len(source.placement)]
        msg = m.TombstoneRequest(volume.id, epoch, source.id, page, volume.page_size)
        return await self._on_all(
            [sid for sid in part if state.get(sid) in LIVE],
            msg,
            f"tombstoning page {page} of layer {source.id}",
        )

    async def _flush_layer(
        self, volume: cm.Volume, layer: cm.Layer, epoch: int, state: dict[str, cm.ServerState]
    ) -> bool:
        """FLUSH every live server of ``layer``: whether all made what they applied
        durable (the pages created there so far survive a power loss)."""
        servers = sorted(
            {sid for part in layer.placement for sid in part if state.get(sid) in LIVE}
        )
        return await self._on_all(
            servers, m.FlushRequest(volume.id, epoch), f"flushing layer {layer.id}"
        )

    async def _on_all(self, servers: list[str], msg: m.Message, what: str) -> bool:
        """Send ``msg`` to every one of ``servers``: whether all answered it."""
        try:
            await asyncio.gather(*(self._call(sid, msg) for sid in servers))
        except (LaminaError, OSError, TimeoutError) as exc:
            log.info("%s: %s", what, exc)
            self._failed(exc)
            return False
        return True

    async def _create(
        self,
        volume: cm.Volume,
        layer: cm.Layer,
        page: int,
        epoch: int,
        state: dict[str, cm.ServerState],
        data: bytes | bytearray,
        zero: bool,
    ) -> None:
        """CREATE_IF_ABSENT ``page`` on every live copy of ``layer``; a copy that is not
        live is left out of the masks, so the resync gives it the page when it is back."""
        part = layer.placement[page % len(layer.placement)]
        live = [i for i, sid in enumerate(part) if state.get(sid) in LIVE]
        if not live:
            raise Unavailable(f"no copy of page {page} of layer {layer.id} is live")
        mask = FULL & ~(bits(range(len(part))) & ~bits(live))
        results = await asyncio.gather(
            *(
                self._call_with_payload(
                    part[i],
                    m.CreateRequest(volume.id, epoch, layer.id, page, volume.page_size, mask, zero),
                    b"" if zero else data,
                )
                for i in live
            ),
            return_exceptions=True,
        )
        failed = [i for i, r in zip(live, results, strict=True) if isinstance(r, BaseException)]
        if not failed:
            return
        # the copies created vouch for the ones that failed: take that back (by CAS on
        # the generation they were created at), so the page is dirty until they have it
        for i, r in zip(live, results, strict=True):
            if (
                not isinstance(r, BaseException)
                and isinstance(r[0], m.CreateResponse)
                and r[0].created
            ):
                with contextlib.suppress(LaminaError, OSError, TimeoutError):
                    await self._call(
                        part[i],
                        m.MarkCleanRequest(
                            volume.id, epoch, layer.id, page, r[0].generation,
                            mask & ~bits(failed),
                        ),
                    )  # fmt: skip
        error = results[live.index(failed[0])]
        assert isinstance(error, BaseException)
        raise error

    async def _statuses(
        self,
        volume: cm.Volume,
        layer: cm.Layer,
        page: int,
        epoch: int,
        part: tuple[str, ...],
        copies: list[int],
    ) -> dict[int, Status]:
        """{copy: (state, mask, generation, flags)} of ``page`` by STATUS; raises the
        first failure."""
        answers = await asyncio.gather(
            *(
                self._call(part[i], m.StatusRequest(volume.id, epoch, layer.id, (page,)))
                for i in copies
            )
        )
        out: dict[int, Status] = {}
        for i, reply in zip(copies, answers, strict=True):
            assert isinstance(reply, m.StatusResponse)
            out[i] = reply.entries[0][1:]
        return out

    async def _flatten_all(
        self,
        cmap: cm.ClusterMap,
        epoch: int,
        state: dict[str, cm.ServerState],
        sem: asyncio.Semaphore,
    ) -> None:
        """For every volume being flattened: each page its shared layers hold goes, as the
        uppermost of them holds it, into the volume's lowest own layer if absent there;
        once a complete round copied everything, and every live server of that layer
        answered a FLUSH, ``FlattenDone``."""
        flattening = {v.name for v in cmap.volumes.values() if v.flattening}
        for name in [n for n in self.progress.flattening if n not in flattening]:
            del self.progress.flattening[name]  # done, or the volume was deleted
        for volume in sorted(cmap.volumes.values(), key=lambda v: v.id):
            if not volume.flattening:
                continue
            own = cmap.own_layers(volume)
            shared = [cmap.layers[lid] for lid in volume.layers[: len(volume.layers) - len(own)]]
            lowest = cmap.layers[own[0]]
            pages: set[int] = set()
            try:
                for layer in shared:
                    owner = cmap.volume_by_id(layer.volume_id)
                    assert owner is not None
                    live = sorted(
                        {sid for part in layer.placement for sid in part if state.get(sid) in LIVE}
                    )
                    pages |= await self._present_pages(owner, layer, live, epoch)
            except (LaminaError, OSError, TimeoutError) as exc:
                log.info("listing the shared layers of %s: %s", volume.name, exc)
                self._failed(exc)
                continue

            async def one(page: int, volume: cm.Volume = volume, lowest: cm.Layer = lowest,
                          shared: list[cm.Layer] = shared) -> bool:  # fmt: skip
                async with sem:
                    return await self._flatten_page(
                        cmap, volume, shared, lowest, page, epoch, state
                    )

            results = await asyncio.gather(*(one(p) for p in sorted(pages)))
            self.progress.flattening[volume.name] = sum(not ok for ok in results)
            if (
                all(results)
                and self.leading()
                # FlattenDone ends every read of the shared layers: the copies must last
                and await self._flush_layer(volume, lowest, epoch, state)
            ):
                log.info("volume %s holds every page it shared: flattened", volume.name)
                with contextlib.suppress(LaminaError):
                    await self.propose(cm.FlattenDone(volume.name))
                self.progress.flattening.pop(volume.name, None)

    async def _flatten_page(
        self,
        cmap: cm.ClusterMap,
        volume: cm.Volume,
        shared: list[cm.Layer],
        lowest: cm.Layer,
        page: int,
        epoch: int,
        state: dict[str, cm.ServerState],
    ) -> bool:
        size = volume.page_size
        try:
            for layer in reversed(shared):  # the uppermost holder wins
                owner = cmap.volume_by_id(layer.volume_id)
                assert owner is not None
                pidx = page % len(layer.placement)
                part = layer.placement[pidx]
                trusted = _trusted(part, list(range(len(part))), state, layer, pidx)
                if not trusted:
                    return False
                reply, data = await self._call_with_payload(
                    part[trusted[0]], m.ReadRequest(owner.id, epoch, layer.id, page, size, 0, size)
                )
                assert isinstance(reply, m.ReadResponse)
                if reply.state == PageState.TOMBSTONE:
                    return False  # moving up inside the origin: next round
                if reply.state in (PageState.PRESENT, PageState.ZERO):
                    await self._throttle(size)
                    zero = reply.state == PageState.ZERO
                    await self._create(volume, lowest, page, epoch, state, data, zero)
                    self.progress.bytes_copied += size
                    return True
            return True
        except (LaminaError, OSError, TimeoutError) as exc:
            log.info("flattening page %d of %s: %s", page, volume.name, exc)
            self._failed(exc)
            return False

    # -- scrub ------------------------------------------------------------------------------

    def start_scrub(self, name: str) -> ScrubReport:
        """Start scrubbing volume ``name`` in the background (unless it already is); its
        report, which fills in as the scrub goes."""
        running = self._scrub_tasks.get(name)
        if running is not None and not running.done():
            return self.scrubs[name]
        report = ScrubReport(name, time.time())
        self.scrubs[name] = report
        task = asyncio.ensure_future(self.scrub(name, report))
        self._scrub_tasks[name] = task
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return report

    async def scrub(self, name: str, report: ScrubReport | None = None) -> ScrubReport:
        """Compare every copy of every page of volume ``name`` that some live copy holds:
        CHECKSUM makes each server verify its copy against its block checksums (a copy
        that fails is quarantined) and answer the page's crc32c; only where the digests
        differ are bytes read, from the authoritative copy, and the page repaired like a
        resync (conditional WRITE, MARK_CLEAN by CAS)."""
        report = report or ScrubReport(name, time.time())
        try:
            cmap = self.service.map
            volume = cmap.volumes.get(name)
            if volume is None:
                raise LaminaError(f"no volume {name!r}")
            epoch = cmap.epoch
            state = {sid: s.state for sid, s in cmap.servers.items()}
            self._up_until = {sid: s.up_until for sid, s in cmap.servers.items()}
            sem = asyncio.Semaphore(self.parallel)
            for lid in cmap.own_layers(volume):
                layer = cmap.layers[lid]
                live = sorted(
                    {sid for part in layer.placement for sid in part if state.get(sid) in LIVE}
                )
                pages = await self._present_pages(volume, layer, live, epoch)
                report.pages_total += len(pages)

                async def one(page: int, layer: cm.Layer = layer) -> None:
                    async with sem:
                        await self._scrub_page(volume, layer, page, epoch, state, report)

                await asyncio.gather(*(one(p) for p in sorted(pages)))
        except (LaminaError, OSError, TimeoutError) as exc:
            report.error = str(exc)
        finally:
            report.done = True
        log.info("scrub of volume %s: %s", name, report.as_dict())
        return report

    async def _present_pages(
        self, volume: cm.Volume, layer: cm.Layer, live: list[str], epoch: int
    ) -> set[int]:
        """The pages some copy on ``live`` holds (data or zeros)."""
        pages: set[int] = set()
        for sid in live:
            start = 0
            while True:
                reply = await self._call(
                    sid,
                    m.EnumerateRequest(
                        volume.id, epoch, layer.id, m.EnumerateWhat.PRESENT, start,
                        m.MAX_ENUMERATE,
                    ),
                )  # fmt: skip
                assert isinstance(reply, m.EnumerateResponse)
                pages.update(reply.pages)
                if reply.done:
                    break
                start = reply.next_start
        return pages

    async def _scrub_page(
        self,
        volume: cm.Volume,
        layer: cm.Layer,
        page: int,
        epoch: int,
        state: dict[str, cm.ServerState],
        report: ScrubReport,
    ) -> None:
        part = layer.placement[page % len(layer.placement)]
        live = [i for i, sid in enumerate(part) if state.get(sid) in LIVE]
        size = volume.page_size
        try:
            statuses: dict[int, Status] = {}
            digests: dict[int, tuple[bool, int]] = {}  # (holds data or zeros, crc)
            corrupt: set[int] = set()
            for i in live:  # checksums first: each copy is verified where it is stored
                await self._throttle(size)
                try:
                    summed = await self._call(
                        part[i], m.ChecksumRequest(volume.id, epoch, layer.id, page, size)
                    )
                except Corrupt:  # quarantined by its server, now or earlier
                    corrupt.add(i)
                    again = await self._call(
                        part[i], m.StatusRequest(volume.id, epoch, layer.id, (page,))
                    )
                    assert isinstance(again, m.StatusResponse)
                    statuses[i] = again.entries[0][1:]
                    continue
                assert isinstance(summed, m.ChecksumResponse)
                statuses[i] = (summed.state, summed.mask, summed.generation, summed.flags)
                holds = summed.state in (PageState.PRESENT, PageState.ZERO)
                digests[i] = (holds, summed.crc)
            report.pages_checked += 1
            report.corrupt += len(corrupt)
            if not corrupt and len(set(digests.values())) <= 1:
                return
            if not corrupt and _writing(volume, layer, statuses, live):
                report.errors += 1  # a client write on its way: the copies may differ now
                return
            report.mismatches += 1
            up = self._sources(statuses, part, live, state, layer, page)
            plan = repair.plan(
                statuses, live, up, top=_is_top(volume, layer), bad=corrupt, digests=digests
            )
            if plan.verdict is repair.Verdict.NO_SOURCE and repair.lost(statuses, live, corrupt):
                self._lose(volume, layer, page, part, statuses)
            if plan.verdict is not repair.Verdict.REPAIR:  # no good source, or a write on its way
                report.errors += 1
                return
            auth = plan.source
            assert auth is not None
            targets = list(plan.targets)
            data: bytes | bytearray = bytes(size)  # bytes only where the checksums differ
            if statuses[auth][0] == PageState.PRESENT:
                read, data = await self._call_with_payload(
                    part[auth], m.ReadRequest(volume.id, epoch, layer.id, page, size, 0, size)
                )
                assert isinstance(read, m.ReadResponse)
                report.bytes_read += size
                if read.generation != statuses[auth][2]:
                    report.errors += 1  # it changed meanwhile: a write in flight
                    return
            await self._repair(
                volume, layer, page, epoch, part, live, auth, data, statuses, targets
            )
            report.repaired += 1
            log.warning(
                "scrub: page %d of layer %d differed between its copies; repaired from %s",
                page, layer.id, part[auth],
            )  # fmt: skip
        except (LaminaError, OSError, TimeoutError) as exc:
            log.info("scrub of page %d of layer %d: %s", page, layer.id, exc)
            report.errors += 1

    def _sources(
        self,
        statuses: dict[int, Status],
        part: tuple[str, ...],
        live: list[int],
        state: dict[str, cm.ServerState],
        layer: cm.Layer,
        page: int,
    ) -> list[int]:
        """The copies of ``page`` a repair may copy from (:func:`lamina.repair.sources`),
        given the STATUS of its live copies."""
        pidx = page % len(layer.placement)
        return repair.sources(
            statuses, live, len(part),
            up=[i for i, sid in enumerate(part) if state.get(sid) is cm.ServerState.UP],
            filling=[i for i, sid in enumerate(part) if (pidx, sid) in layer.filling],
            layer_filling=bool(layer.filling),
            up_until={i: self._up_until.get(sid, 0) for i, sid in enumerate(part)},
        )  # fmt: skip

    async def _repair(
        self,
        volume: cm.Volume,
        layer: cm.Layer,
        page: int,
        epoch: int,
        part: tuple[str, ...],
        live: list[int],
        auth: int,
        data: bytes | bytearray,
        statuses: dict[int, Status],
        targets: list[int],
    ) -> int:
        """Copy the authoritative ``data`` to ``targets`` (each only if still at the
        generation of its status), then mark every live copy clean by compare-and-set,
        the authoritative one last; the bytes copied.  CONFLICT: something changed."""
        size = volume.page_size
        gens = {i: statuses[i][2] for i in live}
        for t in targets:
            await self._throttle(size)
            written, _ = await self._call_with_payload(
                part[t],
                m.WriteRequest(  # durable (fua) before any mask vouches for it
                    volume.id, epoch, layer.id, page, size, 0, FULL, FULL, True,
                    conditional=True, if_generation=gens[t],
                ),
                data,
            )  # fmt: skip
            assert isinstance(written, m.WriteResponse)
            gens[t] = written.generation
        # every mask is about to vouch for every live copy's bytes: the targets' are on
        # disk (fua), the others' (the source's at least) may be in a page cache only
        for i in live:
            if i not in targets:
                await self._call(part[i], m.FlushRequest(volume.id, epoch))
        mask = repair.clean_mask([statuses[i][1] for i in live], live)
        for i in [t for t in live if t != auth] + [auth]:
            await self._call(
                part[i], m.MarkCleanRequest(volume.id, epoch, layer.id, page, gens[i], mask)
            )
        return size * len(targets)

    def _lose(
        self,
        volume: cm.Volume,
        layer: cm.Layer,
        page: int,
        part: tuple[str, ...],
        statuses: dict[int, Status],
    ) -> None:
        """Record ``page`` of ``layer`` as lost; it is looked at again in LOST_RECHECK s."""
        key = (layer.id, page)
        self._recheck[key] = time.monotonic() + LOST_RECHECK
        if key in self.progress.lost:
            return
        copies = {part[i]: PageState(st[0]).name.lower() for i, st in statuses.items()}
        size = volume.page_size
        self.progress.lost[key] = LostPage(
            volume.name, layer.id, page, page * size, size, copies, time.time()
        )
        log.error(
            "page %d of layer %d of volume %s (bytes %d..%d) is lost: corrupt on every copy "
            "(%s); %s",
            page, layer.id, volume.name, page * size, (page + 1) * size - 1,
            ", ".join(f"{sid} {st}" for sid, st in copies.items()), LOST_ADVICE,
        )  # fmt: skip

    def _found(self, key: tuple[int, int]) -> None:
        """The page ``key`` (layer, page) is not lost (any more)."""
        self.progress.lost.pop(key, None)
        self._recheck.pop(key, None)

    def _failed(self, exc: BaseException) -> None:
        """Count a failed request, unless it only met a newer fence (the map moved on:
        the page is simply done again next round)."""
        if not isinstance(exc, StaleEpoch):
            self.progress.errors += 1

    async def _throttle(self, nbytes: int) -> None:
        """Wait so that copies average at most ``rate_limit`` bytes per second (bursts of
        at most ``THROTTLE_BURST`` seconds' worth)."""
        if not self.rate_limit:
            return
        now = time.monotonic()
        burst = self.rate_limit * THROTTLE_BURST
        self._budget = min(burst, self._budget + (now - self._budget_t) * self.rate_limit)
        self._budget_t = now
        self._budget -= nbytes
        if self._budget < 0:
            await asyncio.sleep(-self._budget / self.rate_limit)

    # -- connections --------------------------------------------------------------------------

    async def _client(self, sid: str) -> Client:
        client = self._clients.get(sid)
        if client is not None and client.connected:
            return client
        cmap = self.service.map
        server = cmap.servers.get(sid)
        if server is None:
            raise LaminaError(f"storage server {sid} is not in the map")
        host, port = parse_addr(server.addr)
        client = await Client.connect(
            host, port, self.key, peer=f"worker/{self.service.manager_id}", timeout=2.0
        )
        self._clients[sid] = client
        return client

    async def _call_with_payload(
        self, sid: str, msg: m.Message, payload: bytes | bytearray = b""
    ) -> tuple[m.Message, bytes | bytearray]:
        for attempt in range(CATCH_UP_RETRIES):
            client = await self._client(sid)
            try:
                async with asyncio.timeout(10.0):
                    return await client.call_with_payload(msg, payload)
            except TimeoutError:
                self._clients.pop(sid, None)
                client.close()
                raise
            except Unavailable as exc:
                # the server has not learnt the map's epoch yet (it asks at its next lease
                # renewal): a moment later it has
                if "catching up" not in exc.message or attempt == CATCH_UP_RETRIES - 1:
                    raise
                await asyncio.sleep(0.1)
        raise AssertionError("unreachable")

    async def _call(self, sid: str, msg: m.Message) -> m.Message:
        reply, _ = await self._call_with_payload(sid, msg)
        return reply


async def _bounded(sem: asyncio.Semaphore, aw: Awaitable[T]) -> T:
    """``aw`` awaited while holding ``sem``."""
    async with sem:
        return await aw


def _vouched(
    part: tuple[str, ...], sid: str, state: dict[str, cm.ServerState], layer: cm.Layer, pidx: int
) -> bool:
    """Whether a round that finds nothing dirty in partition ``pidx`` proves that the
    recovering copy on ``sid`` holds every acknowledged write: some other copy is up and
    trusted (a write ``sid`` missed cleared its bit there, so it would show as dirty), or
    every copy is live (then all their masks were listed), copies being filled included:
    no write goes out while no copy of the partition may be read, so one that ``sid``
    missed reached another copy that was up and not being filled, and is dirty there,
    and one ``sid`` lost to a power cut is dirty on the copies that kept it (a filling
    copy that holds the page is then its source, :func:`lamina.repair.sources`).  Not
    when the copies that took writes while ``sid`` was away are all down: its clean
    mask only says it heard of no write, and its data may be stale."""
    if all(state.get(o) in LIVE for o in part):
        return True
    live = [i for i, o in enumerate(part) if state.get(o) in LIVE]
    return any(part[i] != sid for i in _trusted(part, live, state, layer, pidx))


def _writing(
    volume: cm.Volume, layer: cm.Layer, statuses: dict[int, Status], copies: list[int]
) -> bool:
    """Whether one of ``copies`` of a page of the volume's top layer has a client write
    in flight (STATUS flag ``WRITING``): a repair must not overwrite it then.  Its
    other copies may not have that write yet, so bytes read from them now may lack it,
    and once the write is confirmed they would vouch for this copy holding it.  The
    order makes this exact: the flag is read before the authoritative copy is, and the
    repair writes only at the generation that STATUS saw.  A lower layer takes no
    client write: its copies know a fence newer than any write still on its way."""
    if not _is_top(volume, layer):
        return False
    return any(statuses[i][3] & m.WRITING for i in copies)


def _is_top(volume: cm.Volume, layer: cm.Layer) -> bool:
    """Whether ``layer`` is the volume's top layer (the only one taking client writes)."""
    return bool(volume.layers) and volume.layers[-1] == layer.id


def _trusted(
    part: tuple[str, ...],
    live: list[int],
    state: dict[str, cm.ServerState],
    layer: cm.Layer,
    pidx: int,
) -> list[int]:
    """The copies of partition ``pidx`` a resynchronisation may copy from: ``up`` and not
    being filled."""
    return [
        i
        for i in live
        if state.get(part[i]) is cm.ServerState.UP and (pidx, part[i]) not in layer.filling
    ]

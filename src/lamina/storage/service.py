"""The storage service: page operations with epochs, leases and sync-mask episodes.

Theory of operation
-------------------
The service knows no transport.  ``handle(msg, payload)`` takes a decoded request and
returns its reply, either at once (the hot path: reads and writes whose sync-mask clear
is already durable) or as a coroutine (a write that must wait for its clear to become
durable, a FUA write, FLUSH).

Every data request first has its piggybacked restore tokens applied [0043], then passes
the epoch comparator (``epochs.compare``): no lease -> NO_LEASE, older than the volume's
fence -> STALE with the current epoch, newer than the server knows -> catch up (a
standalone server, one started without managers, adopts the newer epoch).  Only then is
anything read or changed.  A managed server learns the fence of every volume it holds a
copy of (or was retired from) with each lease and SET_EPOCH before it serves, so a
volume it was never told of is one it holds nothing of at any epoch it knows: every
request for it up to the server's epoch is STALE (a copy it was moved away from and
dropped cannot come back through an old map after a restart).  DELETE_LAYER is the
exception: the leader reclaims the layers of deleted volumes, which no fence names.

Writes follow the episode rule of ``syncmask``: the clear is made durable by the store
(group commit) before the data is applied; tokens restore the mask when the whole
episode is confirmed.  MARK_CLEAN is a compare-and-set on the generation and ends the
page's episode.

STATUS and CHECKSUM flag a page copy ``WRITING`` while a client write on it may still be
on its way to another copy (an unconfirmed token of the volume's fence or newer, younger
than ``syncmask.IN_FLIGHT``): a resynchronisation must not overwrite it then (see
``docs/protocol.md``, "Writes in flight").
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from crc32c import crc32c

from lamina.errors import (
    BadRequest,
    Conflict,
    Corrupt,
    Deleted,
    NoLease,
    NotFound,
    StaleEpoch,
    StorageIOError,
    Unavailable,
)
from lamina.storage import syncmask
from lamina.storage.epochs import Verdict, compare
from lamina.storage.pagestore import PageStore
from lamina.wire import messages as m
from lamina.wire.framing import Payload
from lamina.wire.messages import EnumerateWhat, PageState

Reply = tuple[m.Message, Payload]
Result = Reply | Coroutine[Any, Any, Reply]
MAX_TOKENS = 1 << 18  # unconfirmed writes remembered (about 40 MiB at most)


@dataclass(slots=True)
class Lease:
    """The lease a manager leader granted; a standalone server always holds one."""

    standalone: bool = True
    valid_until: float = 0.0

    def valid(self, now: float) -> bool:
        return self.standalone or now < self.valid_until


class StorageService:
    def __init__(
        self,
        store: PageStore,
        server_id: str,
        clock: Callable[[], float],
        lease: Lease | None = None,
        catch_up: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.server_id = server_id
        self.clock = clock
        self.lease = lease or Lease()
        self.epoch = 0
        self.fences: dict[int, int] = {}
        #: layer id -> the lineage token the managers' map gives it (SET_EPOCH, LEASE)
        self.lineages: dict[int, int] = {}
        self.catch_up = catch_up
        self._episodes: dict[tuple[int, int], syncmask.Episode] = {}
        self._tokens: dict[int, tuple[int, int]] = {}
        # unconfirmed tokens of client (not conditional) writes: (epoch, arrival time)
        self._in_flight: dict[int, tuple[int, float]] = {}
        self._token_ids = itertools.count((secrets.randbits(23) + 1) << 40)
        self._unapplied: dict[tuple[int, int], int] = {}  # admitted writes not applied yet
        self._ops: dict[type[m.Message], Callable[[Any, Payload], Result]] = {
            m.PingRequest: self.ping,
            m.ReadRequest: self.read,
            m.WriteRequest: self.write,
            m.RestoreRequest: self.restore,
            m.CreateRequest: self.create,
            m.StatusRequest: self.status,
            m.EnumerateRequest: self.enumerate,
            m.MarkCleanRequest: self.mark_clean,
            m.TombstoneRequest: self.tombstone,
            m.DeleteLayerRequest: self.delete_layer,
            m.SetEpochRequest: self.set_epoch,
            m.FlushRequest: self.flush,
            m.ChecksumRequest: self.checksum,
        }

    # -- RequestHandler ---------------------------------------------------------------------

    def current_epoch(self) -> int:
        return self.epoch

    def handle(self, msg: m.Message, payload: Payload) -> Result:
        op = self._ops.get(type(msg))
        if op is None:
            raise BadRequest(f"{type(msg).__name__} is not a storage operation")
        failed = self.store.failure
        if failed is not None:  # fail-stop: nothing is served, PING included
            raise StorageIOError(
                f"storage server {self.server_id} has failed and serves nothing until it "
                f"is restarted: {failed}"
            )
        return op(msg, payload)

    # -- admission ----------------------------------------------------------------------------

    def _admit(self, msg: m.DataRequest, unknown_volume: bool = False) -> None:
        tokens = getattr(msg, "restore", ())
        if tokens:
            self._confirm(tokens)
        self._check_epoch(msg, unknown_volume)
        if self.lineages and not isinstance(msg, m.DeleteLayerRequest):
            layer_id = getattr(msg, "layer_id", None)
            if layer_id is not None:
                self._check_lineage(layer_id)

    def _check_lineage(self, layer_id: int) -> None:
        """Refuse a layer whose file this store recorded for another cluster map's layer of
        the same id (a map rolled back by a power loss reuses ids); a layer with no token
        recorded yet (new, or from before tokens) takes the map's."""
        expected = self.lineages.get(layer_id, 0)
        if not expected:
            return
        recorded = self.store.layer_lineage(layer_id)
        if recorded == expected:
            return
        if recorded == 0:
            self.store.record_lineage(layer_id, expected)
            return
        raise BadRequest(
            f"layer {layer_id} on storage server {self.server_id} belongs to another cluster "
            f"map's layer {layer_id} (lineage {recorded:#018x}, the map's {expected:#018x}): "
            "not served"
        )

    def _check_epoch(self, msg: m.DataRequest, unknown_volume: bool = False) -> None:
        """Admit ``msg`` by its epoch and the lease; ``unknown_volume``: a volume with no
        known fence has fence 0 (else, on a managed server, the epoch after its own)."""
        lease = self.lease
        fence = self.fences.get(msg.volume_id)
        if fence is None:
            fence = 0 if lease.standalone or unknown_volume else self.epoch + 1
        if fence <= msg.epoch <= self.epoch and (
            lease.standalone or self.clock() < lease.valid_until
        ):
            return  # the common case, decided as compare() would
        verdict = compare(msg.epoch, self.epoch, fence, self.lease.valid(self.clock()))
        if verdict is Verdict.OK:
            return
        if verdict is Verdict.NO_LEASE:
            raise NoLease(f"storage server {self.server_id} holds no valid lease")
        if verdict is Verdict.STALE:
            if msg.volume_id not in self.fences:
                raise StaleEpoch(
                    f"storage server {self.server_id} holds no copy of volume "
                    f"{msg.volume_id} at epoch {msg.epoch}",
                    self.epoch,
                )
            raise StaleEpoch(
                f"epoch {msg.epoch} is older than volume {msg.volume_id}'s fence {fence}",
                self.epoch,
            )
        if self.catch_up is None:
            self.epoch = msg.epoch  # standalone: nobody to ask, the peer is authenticated
            return
        self._start_catch_up(msg.epoch)
        raise Unavailable(f"server at epoch {self.epoch} is catching up to {msg.epoch}")

    def _start_catch_up(self, epoch: int) -> None:
        assert self.catch_up is not None
        task = asyncio.ensure_future(self.catch_up(epoch))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _confirm(self, tokens: Sequence[int]) -> int:
        done = 0
        for token in tokens:
            key = self._tokens.pop(token, None)
            if key is None:
                continue
            self._in_flight.pop(token, None)
            done += 1
            episode = self._episodes.get(key)
            info = self.store.info(*key)
            if info.state == PageState.ABSENT:
                self._episodes.pop(key, None)
                continue
            mask, episode = syncmask.confirm(info.mask, episode, token)
            if episode is None:
                self._episodes.pop(key, None)
            else:
                self._episodes[key] = episode
            if mask != info.mask:
                self.store.set_mask(key[0], key[1], mask, wait_durable=False)
        return done

    def _drop_episodes(self, layer_id: int, page: int | None = None) -> None:
        if page is not None:
            self._episodes.pop((layer_id, page), None)
            return
        for key in [k for k in self._episodes if k[0] == layer_id]:
            del self._episodes[key]

    # -- operations ---------------------------------------------------------------------------

    def ping(self, msg: m.PingRequest, payload: Payload) -> Result:
        st = self.store.stats()
        valid = self.lease.valid(self.clock())
        reply = m.PingResponse(self.server_id, self.epoch, valid, st.capacity, st.used, st.pages)
        return reply, b""

    def read(self, msg: m.ReadRequest, payload: Payload) -> Result:
        self._admit(msg)
        self.store.check_layer(msg.volume_id, msg.layer_id, msg.page_size)
        info = self.store.info(msg.layer_id, msg.page)
        if info.state == PageState.QUARANTINED:
            raise Corrupt(f"page {msg.page} of layer {msg.layer_id} is quarantined")
        data = b""
        if info.state == PageState.PRESENT:
            data = self.store.read(msg.layer_id, msg.page, msg.offset, msg.length)
        return m.ReadResponse(int(info.state), info.generation, info.mask), data

    def write(self, msg: m.WriteRequest, payload: Payload) -> Result:
        self._admit(msg)
        store = self.store
        store.check_layer(msg.volume_id, msg.layer_id, msg.page_size)
        key = (msg.layer_id, msg.page)
        info = store.info(*key)
        state = info.state
        full = msg.offset == 0 and len(payload) == msg.page_size
        if msg.conditional and (info.generation != msg.if_generation or key in self._unapplied):
            raise Conflict(
                f"page {msg.page} of layer {msg.layer_id} is at generation {info.generation}"
                f"{' with a write in progress' if key in self._unapplied else ''}, "
                f"not {msg.if_generation}",
                info.generation,
            )
        if state == PageState.ABSENT:
            if not full:
                raise NotFound(
                    f"page {msg.page} is absent in layer {msg.layer_id}: copy it up first"
                )
            # A whole page needs no copy-up.  It is created with its data and its cleared
            # mask in one record: a copy that did not exist cannot look clean with old
            # data, and a refused write (NO_SPACE) leaves no page behind.
            token = next(self._token_ids)
            mask, episode = syncmask.begin_write(
                syncmask.FULL, None, msg.clear_mask, msg.restore_mask, token
            )
            _, gen = store.create(
                msg.volume_id, msg.layer_id, msg.page_size, msg.page, payload, mask
            )
            self._remember(key, token, episode, msg)
            reply = m.WriteResponse(token, gen), b""
            return self._flushed(reply) if msg.fua else reply
        if state == PageState.TOMBSTONE:
            raise Deleted(f"page {msg.page} of layer {msg.layer_id} was moved up")
        if state == PageState.QUARANTINED and not full:
            raise Corrupt(f"page {msg.page} of layer {msg.layer_id} is quarantined")
        token = next(self._token_ids)
        mask, episode = syncmask.begin_write(
            info.mask, self._episodes.get(key), msg.clear_mask, msg.restore_mask, token
        )
        self._remember(key, token, episode, msg)
        pending = store.set_mask(msg.layer_id, msg.page, mask)
        if pending is None and not msg.fua:
            gen = store.write(
                msg.volume_id, msg.layer_id, msg.page_size, msg.page, msg.offset, payload
            )
            return m.WriteResponse(token, gen), b""
        self._unapplied[key] = self._unapplied.get(key, 0) + 1
        return self._write_later(msg, payload, token, pending)

    def _remember(
        self, key: tuple[int, int], token: int, episode: syncmask.Episode, msg: m.WriteRequest
    ) -> None:
        self._episodes[key] = episode
        self._tokens[token] = key
        if not msg.conditional:
            self._in_flight[token] = (msg.epoch, self.clock())
        if len(self._tokens) > MAX_TOKENS:  # a token that never came back: forget it, and
            old = next(iter(self._tokens))  # its episode can now end only by a resync
            self._in_flight.pop(old, None)
            stale = self._episodes.get(self._tokens.pop(old))
            if stale is not None:
                syncmask.abandon(stale)

    def _flags(self, volume_id: int, key: tuple[int, int]) -> int:
        """:data:`messages.WRITING` while a client write may still be on its way to
        another copy of the page: one of its unconfirmed tokens is of the volume's fence
        or newer (an older write is refused by every copy that knows the fence) and
        younger than ``IN_FLIGHT`` (a driver gives up on an attempt long before)."""
        episode = self._episodes.get(key)
        if episode is None or not episode.pending:
            return 0
        fence = self.fences.get(volume_id, 0)
        oldest = self.clock() - syncmask.IN_FLIGHT
        for token in episode.pending:
            seen = self._in_flight.get(token)
            if seen is not None and seen[0] >= fence and seen[1] > oldest:
                return m.WRITING
        return 0

    async def _flushed(self, reply: Reply) -> Reply:
        await self.store.flush()
        return reply

    async def _write_later(
        self, msg: m.WriteRequest, payload: Payload, token: int, pending: Awaitable[None] | None
    ) -> Reply:
        key = (msg.layer_id, msg.page)
        try:
            if pending is not None:
                await pending
            # The fence or the lease may have changed while this write waited: a SET_EPOCH
            # answered meanwhile promised that no write of an older epoch lands from now on.
            self._check_epoch(msg)
            info = self.store.info(msg.layer_id, msg.page)
            if info.state in (PageState.ABSENT, PageState.TOMBSTONE):
                raise Deleted(f"page {msg.page} of layer {msg.layer_id} changed during the write")
            gen = self.store.write(
                msg.volume_id, msg.layer_id, msg.page_size, msg.page, msg.offset, payload
            )
        finally:
            left = self._unapplied.pop(key) - 1
            if left:
                self._unapplied[key] = left
        if msg.fua:
            await self.store.flush()
        return m.WriteResponse(token, gen), b""

    def restore(self, msg: m.RestoreRequest, payload: Payload) -> Result:
        return m.RestoreResponse(self._confirm(msg.tokens)), b""

    def create(self, msg: m.CreateRequest, payload: Payload) -> Result:
        self._admit(msg)
        self.store.check_layer(msg.volume_id, msg.layer_id, msg.page_size)
        data = None if msg.zero else payload
        created, gen = self.store.create(
            msg.volume_id, msg.layer_id, msg.page_size, msg.page, data, msg.mask
        )
        return m.CreateResponse(created, gen), b""

    def checksum(self, msg: m.ChecksumRequest, payload: Payload) -> Result:
        self._admit(msg)
        self.store.check_layer(msg.volume_id, msg.layer_id, msg.page_size)
        info = self.store.info(msg.layer_id, msg.page)
        if info.state == PageState.QUARANTINED:
            raise Corrupt(f"page {msg.page} of layer {msg.layer_id} is quarantined")
        crc = 0
        if info.state == PageState.PRESENT:
            crc = crc32c(self.store.read(msg.layer_id, msg.page, 0, msg.page_size))
        elif info.state == PageState.ZERO:
            crc = crc32c(bytes(msg.page_size))
        flags = self._flags(msg.volume_id, (msg.layer_id, msg.page))
        return m.ChecksumResponse(int(info.state), info.generation, info.mask, crc, flags), b""

    def status(self, msg: m.StatusRequest, payload: Payload) -> Result:
        self._admit(msg)
        self.store.check_layer(msg.volume_id, msg.layer_id, None)
        entries = []
        for page in msg.pages:
            info = self.store.info(msg.layer_id, page)
            flags = self._flags(msg.volume_id, (msg.layer_id, page))
            entries.append((page, int(info.state), info.mask, info.generation, flags))
        return m.StatusResponse(tuple(entries)), b""

    def enumerate(self, msg: m.EnumerateRequest, payload: Payload) -> Result:
        self._admit(msg)
        self.store.check_layer(msg.volume_id, msg.layer_id, None)
        pages, nxt, done = self.store.enumerate(
            msg.layer_id, EnumerateWhat(msg.what), msg.start, msg.limit
        )
        return m.EnumerateResponse(nxt, done, tuple(pages)), b""

    def mark_clean(self, msg: m.MarkCleanRequest, payload: Payload) -> Result:
        self._admit(msg)
        self.store.check_layer(msg.volume_id, msg.layer_id, None)
        info = self.store.info(msg.layer_id, msg.page)
        if info.state == PageState.ABSENT:
            raise NotFound(f"page {msg.page} of layer {msg.layer_id} is absent")
        if info.generation != msg.generation:
            raise Conflict(
                f"page {msg.page} is at generation {info.generation}, not {msg.generation}",
                info.generation,
            )
        if (msg.layer_id, msg.page) in self._unapplied:  # it will change the generation
            raise Conflict(f"page {msg.page} has a write in progress", info.generation)
        self._episodes.pop((msg.layer_id, msg.page), None)
        self.store.set_mask(msg.layer_id, msg.page, msg.mask, wait_durable=False)
        return m.MarkCleanResponse(info.generation), b""

    def tombstone(self, msg: m.TombstoneRequest, payload: Payload) -> Result:
        self._admit(msg)
        self._drop_episodes(msg.layer_id, msg.page)
        gen = self.store.tombstone(msg.volume_id, msg.layer_id, msg.page_size, msg.page)
        return m.TombstoneResponse(gen), b""

    def delete_layer(self, msg: m.DeleteLayerRequest, payload: Payload) -> Result:
        self._admit(msg, unknown_volume=True)
        self.store.check_layer(msg.volume_id, msg.layer_id, None)
        # Deleting fences the volume at this epoch: a writer still using an older map
        # cannot bring the layer back.
        if msg.epoch > self.fences.get(msg.volume_id, 0):
            self.fences[msg.volume_id] = msg.epoch
        self._drop_episodes(msg.layer_id)
        return m.DeleteLayerResponse(self.store.delete_layer(msg.layer_id)), b""

    def set_epoch(self, msg: m.SetEpochRequest, payload: Payload) -> Result:
        self.epoch = max(self.epoch, msg.epoch)
        for volume_id, fence in msg.fences:
            if fence > self.fences.get(volume_id, 0):
                self.fences[volume_id] = fence
        self.lineages.update(msg.lineages)
        return m.SetEpochResponse(self.epoch), b""

    def flush(self, msg: m.FlushRequest, payload: Payload) -> Result:
        self._admit(msg)
        return self._flush()

    async def _flush(self) -> Reply:
        await self.store.flush()
        return m.FlushResponse(), b""

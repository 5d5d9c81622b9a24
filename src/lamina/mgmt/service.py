"""The manager service: the cluster map behind the Raft log, as the API sees it.

Theory of operation
-------------------
Every manager holds the map its Raft member built by applying the committed log
(:meth:`ManagerService.apply_entry`, called on PySyncObj's thread, in log order, on
every member).  A change is proposed from any manager (:meth:`submit`): the command is
encoded, committed through Raft, and every member runs the same ``validate``/``apply``;
the proposer gets back either the new epoch or the reason the managers refused it
[0030].  Readers on the event loop see the map through one attribute that the apply
thread replaces as a whole, so a reader never sees half a change.

A log entry is ``NONCE_MARK``, 8 random bytes drawn by the proposer, then the encoded
command (an entry without the mark, from before, has nonce 0): the layers a command
creates take their lineage tokens from that nonce (:func:`clustermap.layer_lineage`), so
a map that lost its newest entries to a power loss and reuses a layer id gives the new
layer another token, and no storage server serves it the old layer's file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from lamina.errors import Conflict, LaminaError, Unavailable
from lamina.mgmt import clustermap as cm

log = logging.getLogger(__name__)


class Log(Protocol):
    """What the service needs from the replicated log (lamina.mgmt.raft.ReplicatedLog)."""

    async def propose(self, command: bytes, timeout: float = 5.0) -> Any: ...


#: first byte of a log entry that carries a nonce (0xc1 never starts a msgpack value)
NONCE_MARK = b"\xc1"


def encode_entry(cmd: cm.Command, nonce: int) -> bytes:
    """The log entry for ``cmd`` committed with ``nonce`` (64 bits)."""
    return NONCE_MARK + nonce.to_bytes(8, "big") + cm.encode_command(cmd)


def decode_entry(data: bytes) -> tuple[cm.Command, int]:
    """(command, nonce) of a log entry; LaminaError if it is malformed."""
    if data[:1] == NONCE_MARK:
        return cm.decode_command(data[9:]), int.from_bytes(data[1:9], "big")
    return cm.decode_command(data), 0


class Rejected(Conflict):
    """The managers refused a proposal; the message is their reason."""


@dataclass(frozen=True, slots=True)
class Outcome:
    epoch: int


class ManagerService:
    def __init__(
        self, manager_id: str, nonces: Callable[[], int] = lambda: secrets.randbits(64)
    ) -> None:
        self.manager_id = manager_id
        self.nonces = nonces  # the random bits each proposal is committed with
        self.map: cm.ClusterMap = cm.empty_map()
        # Clients only ever get published maps (DESIGN section 6): the map as it was at
        # the published epoch, kept from the maps of the epochs not yet published.
        self.published: cm.ClusterMap | None = self.map
        self._unpublished: dict[int, cm.ClusterMap] = {}
        self.log: Log | None = None
        self.applied = 0
        # Layers gone from the map whose space the leader still has to reclaim:
        # layer id -> (volume id, servers that may hold its pages).  Built by applying
        # the log, so every manager has it and a new leader carries on.
        self.reclaim: dict[int, tuple[int, tuple[str, ...]]] = {}

    # -- the state machine side (PySyncObj's thread) -------------------------------------

    def apply_entry(self, data: bytes) -> tuple[bool, str | int]:
        """Apply one committed entry: (True, new epoch) or (False, the reason)."""
        self.applied += 1
        try:
            cmd, nonce = decode_entry(data)
        except LaminaError as exc:  # never committed by a correct member; refuse it alike
            return False, f"undecodable command: {exc.message}"
        reason = cm.validate(self.map, cmd)
        if reason is not None:
            return False, reason
        before = self.map
        self.map = cm.apply(self.map, cmd, nonce)
        # a layer that left the map (deleted volume, rollback, finished migration or
        # merge) leaves its pages on its servers until the leader reclaims them
        for lid in before.layers.keys() - self.map.layers.keys():
            layer = before.layers[lid]
            servers = sorted({s for part in layer.placement for s in part} | {*layer.retired})
            self.reclaim[lid] = (layer.volume_id, tuple(servers))
        if isinstance(cmd, cm.Publish):
            seen = self._unpublished.get(cmd.epoch)
            if seen is not None:
                self.published = dataclasses.replace(seen, published_epoch=cmd.epoch)
            elif self.map.epoch == cmd.epoch:
                self.published = self.map
            else:  # restored from a snapshot taken between the change and its publication
                self.published = None
            self._unpublished = {e: m for e, m in self._unpublished.items() if e > cmd.epoch}
        else:
            self._unpublished[self.map.epoch] = self.map
        return True, self.map.epoch

    def dump(self) -> bytes:
        state = {
            "map": cm.map_to_dict(self.map),
            "reclaim": [[lid, vid, list(servers)] for lid, (vid, servers) in self.reclaim.items()],
        }
        data: bytes = msgpack.packb(state, use_bin_type=True)
        return data

    def load(self, data: bytes) -> None:
        state = msgpack.unpackb(data, raw=False, strict_map_key=False)
        self.map = cm.map_from_dict(state["map"])
        self.reclaim = {
            int(lid): (int(vid), tuple(servers)) for lid, vid, servers in state["reclaim"]
        }
        self._unpublished = {self.map.epoch: self.map}
        published = self.map.epoch == self.map.published_epoch
        self.published = self.map if published else None

    # -- the API side (the event loop) ---------------------------------------------------

    def reclaimed(self, layer_id: int, server_id: str) -> None:
        """``server_id`` confirmed it holds nothing of ``layer_id`` any more."""
        entry = self.reclaim.get(layer_id)
        if entry is None:
            return
        left = tuple(s for s in entry[1] if s != server_id)
        if left:
            self.reclaim[layer_id] = (entry[0], left)
        else:
            del self.reclaim[layer_id]

    async def wait_published(self, epoch: int, timeout: float = 10.0) -> None:
        """Return once this manager has applied the publication of ``epoch`` (clients may
        then see it); Unavailable after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.map.published_epoch < epoch:
            if loop.time() > deadline:
                raise Unavailable(
                    f"epoch {epoch} is not published after {timeout:g} s "
                    f"(published: {self.map.published_epoch})"
                )
            await asyncio.sleep(0.02)

    async def submit(self, cmd: cm.Command, timeout: float = 5.0) -> Outcome:
        """Commit a change; its new epoch, or Rejected with the managers' reason."""
        assert self.log is not None, "the replicated log is not attached"
        ok, value = await self.log.propose(encode_entry(cmd, self.nonces()), timeout)
        if not ok:
            raise Rejected(str(value))
        assert isinstance(value, int)
        return Outcome(value)

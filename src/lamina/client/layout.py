"""A volume as the driver sees it in one published map, as pure code.

Theory of operation
-------------------
:func:`volume_view` turns the JSON map the managers publish (``GET /api/v1/map``) into
a :class:`VolumeView`: the volume's geometry, its layers from the top down, where each
server listens and which state it is in.  Everything the read and write processes of
the driver decide without I/O lives here, so it can be tested without a cluster:

- :func:`split` cuts a byte range of the volume into page extents [0031];
- :meth:`LayerView.partition` names the ordered copies of a page (striping: page ``p``
  lives on partition ``p mod len(partitions)``, and the order is the bit order of the
  sync masks [0040]);
- :meth:`VolumeView.readable` / :meth:`VolumeView.writable` are the copies a read may
  use (``up`` servers only, never ``recovering`` or ``down`` ones, DESIGN section 7) and
  the copies a write must reach (``up`` and ``recovering``);
- :func:`needs_resync` is the read-side test of a copy's sync mask, and
  :func:`authoritative` / :func:`clean_mask` are the choices of a resynchronisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lamina.errors import NotFound, ProtocolError
from lamina.storage.syncmask import (
    FULL,
    authoritative,
    bits,
    clean_mask,
    clear_mask,
    needs_resync,
    restore_mask,
)

__all__ = [
    "FULL",
    "Extent",
    "LayerView",
    "LockView",
    "ServerView",
    "VolumeView",
    "authoritative",
    "bits",
    "clean_mask",
    "clear_mask",
    "needs_resync",
    "presence_fixed",
    "restore_mask",
    "split",
    "volume_view",
]


class Extent(NamedTuple):
    """The part of one page an I/O touches: ``length`` bytes at ``offset`` in page
    ``page``, which are bytes ``start``.. of the caller's buffer."""

    page: int
    offset: int
    length: int
    start: int


def presence_fixed(view: VolumeView, layer: LayerView, exclusive: bool) -> bool:
    """Whether the set of pages ``layer`` holds can change only through this client's
    own copy-ups while ``view`` is current, so a map of it, once listed, stays exact:
    a layer below the written top (immutable [0056]) that no layer migrates into, that
    is not moving out itself, and that no flatten fills; the top itself only for the
    holder of the volume's exclusive lock (``exclusive``)."""
    if layer.migrates_to is not None:
        return False  # its pages leave it (a tombstone each)
    if any(other.migrates_to == layer.id for other in view.layers):
        return False  # pages arrive from below
    if view.flattening and layer.owner == view.id:
        own = [other for other in view.layers if other.owner == view.id]
        if own and own[-1].id == layer.id:
            return False  # the flatten fills the lowest own layer
    if not view.snapshot and layer.id == view.top.id:
        return exclusive
    return True


def split(offset: int, length: int, page_size: int) -> list[Extent]:
    """The page extents of ``length`` bytes at volume ``offset``, in order."""
    out: list[Extent] = []
    done = 0
    while done < length:
        pos = offset + done
        page, in_page = divmod(pos, page_size)
        n = min(page_size - in_page, length - done)
        out.append(Extent(page, in_page, n, done))
        done += n
    return out


@dataclass(frozen=True, slots=True)
class ServerView:
    id: str
    host: str
    port: int
    state: str


@dataclass(frozen=True, slots=True)
class LockView:
    session: str
    host: str
    pid: int
    since: int  # unix milliseconds


@dataclass(frozen=True, slots=True)
class LayerView:
    id: int
    placement: tuple[tuple[str, ...], ...]
    role: str
    migrates_to: int | None
    #: (partition index, server) of copies being filled: written, never read
    filling: frozenset[tuple[int, str]] = frozenset()
    #: the id of the volume the layer belongs to (a clone reads its origin's layers,
    #: and every request about a layer names the layer's own volume); 0: the viewed one
    owner: int = 0

    def partition(self, page: int) -> tuple[str, ...]:
        return self.placement[page % len(self.placement)]


@dataclass(frozen=True, slots=True)
class VolumeView:
    """One volume in one published map.  ``epoch`` is the map's published epoch: the
    epoch every request made with this view carries."""

    name: str
    id: int
    size: int
    page_size: int
    replicas: int
    epoch: int
    fence_epoch: int
    layers: tuple[LayerView, ...]  # top first
    servers: Mapping[str, ServerView]
    lock: LockView | None
    #: the snapshot this view shows ("": the volume itself, whose top layer is written)
    snapshot: str = ""
    #: the volume's shared pages are being copied into its lowest own layer
    flattening: bool = False
    _readable: dict[tuple[int, int], list[int]] = field(
        default_factory=dict, compare=False, repr=False
    )
    _writable: dict[tuple[int, int], list[int]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def top(self) -> LayerView:
        return self.layers[0]

    def is_up(self, server_id: str) -> bool:
        server = self.servers.get(server_id)
        return server is not None and server.state == "up"

    def readable(self, layer: LayerView, page: int) -> list[int]:
        """Indices of the copies of ``page`` of ``layer`` a read may use: those on ``up``
        servers that are not being filled (the caller must not change the list: it is
        remembered per layer and partition)."""
        pidx = page % len(layer.placement)
        key = (layer.id, pidx)
        known = self._readable.get(key)
        if known is None:
            part = layer.placement[pidx]
            known = self._readable[key] = [
                i
                for i, sid in enumerate(part)
                if self.is_up(sid) and (pidx, sid) not in layer.filling
            ]
        return known

    def writable(self, layer: LayerView, page: int) -> list[int]:
        """Indices of the copies a write of ``page`` of ``layer`` must reach: on ``up``
        and ``recovering`` servers, filling or not (a recovering copy takes every write,
        so once the background worker has repaired what it missed while away, nothing
        written later can be missing on it); none at all while no copy of the partition
        may be read (``up`` and not being filled: :meth:`readable`)."""
        pidx = page % len(layer.placement)
        key = (layer.id, pidx)
        known = self._writable.get(key)
        if known is None:
            part = layer.placement[pidx]
            known = [i for i, sid in enumerate(part) if self.is_live(sid)]
            if not self.readable(layer, page):
                # Recovering copies and copies being filled alone may all lack writes
                # acknowledged while they were away or before they were placed: a write
                # acknowledged by them only could be lost to the copy that has those
                # (down or recovering now), and a copy being filled may lack the page
                # altogether.  No write until a copy may be read again.
                known = []
            self._writable[key] = known
        return known

    def is_live(self, server_id: str) -> bool:
        server = self.servers.get(server_id)
        return server is not None and server.state in ("up", "recovering")

    def servers_of(self, layer: LayerView) -> list[str]:
        """Every server holding a copy of some page of ``layer``, sorted."""
        return sorted({sid for part in layer.placement for sid in part})


# --- the published map as JSON ---------------------------------------------------------


def _addr(addr: Any) -> tuple[str, int]:
    if type(addr) is not str or ":" not in addr:
        raise ProtocolError(f"bad server address {addr!r:.60} in the map")
    host, _, port = addr.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ProtocolError(f"bad server address {addr!r:.60} in the map") from None


def volume_view(doc: Mapping[str, Any], name: str) -> VolumeView:
    """The view of volume ``name`` (or of snapshot ``VOLUME@SNAPSHOT``: the volume's
    layers up to the snapshot's) in a map document; NotFound if it has no such volume or
    snapshot, ProtocolError if the document is not a map."""
    volume_name, at, snapshot = name.partition("@")
    try:
        volumes = doc["volumes"]
        if volume_name not in volumes:
            raise NotFound(f"no volume named {volume_name!r}")
        vol = volumes[volume_name]
        stack = list(vol["layers"])
        if at:
            # a snapshot: the stack up to and including its layer, never written
            snaps = {s["name"]: s["layer"] for s in vol.get("snapshots") or ()}
            if snapshot not in snaps:
                raise NotFound(f"volume {volume_name!r} has no snapshot {snapshot!r}")
            stack = stack[: stack.index(snaps[snapshot]) + 1]
        layer_docs = doc["layers"]
        layers = tuple(
            LayerView(
                int(lid),
                tuple(tuple(part) for part in layer_docs[str(lid)]["placement"]),
                layer_docs[str(lid)]["role"],
                layer_docs[str(lid)]["migrates_to"],
                frozenset((int(p), str(sid)) for p, sid in layer_docs[str(lid)].get("filling", ())),
                int(layer_docs[str(lid)]["volume_id"]),
            )
            for lid in reversed(stack)
        )
        servers = {
            sid: ServerView(sid, *_addr(s["addr"]), s["state"]) for sid, s in doc["servers"].items()
        }
        raw_lock = vol.get("lock")
        lock = (
            None
            if raw_lock is None
            else LockView(raw_lock["session"], raw_lock["host"], raw_lock["pid"], raw_lock["since"])
        )
        return VolumeView(
            name,
            vol["id"],
            vol["size"],
            vol["page_size"],
            vol["replicas"],
            doc["published_epoch"],
            vol["fence_epoch"],
            layers,
            servers,
            lock,
            snapshot,
            bool(vol.get("flattening")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"the managers sent a map without {exc}") from None

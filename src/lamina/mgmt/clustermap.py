"""The cluster map and the commands that change it, as pure code [0030][0031].

Theory of operation
-------------------
The managers replicate one :class:`ClusterMap`.  Every change is a *command*: a frozen
dataclass, validated when built, that travels through the Raft log as bytes
(:func:`encode_command` / :func:`decode_command`).  On applying a log entry each manager
runs ``validate(map, cmd)``.  ``None`` means the command applies, and every manager then
computes the same ``apply(map, cmd)``; a string is the reason it is rejected, the same on
every manager, so the Raft majority is the vote and the proposer gets the reason.  Both
are pure functions of (map, command): no clock, no randomness, no I/O, and wherever order
matters the code iterates in sorted order, so replicas that apply one log (or restore a
snapshot made by :func:`map_to_dict`) reach equal maps.  ``apply`` checks the command
again and raises :class:`InvalidCommand` rather than build a broken map.

Epochs and fences (DESIGN section 6): every applied command except :class:`Publish`
raises ``epoch`` by one.  A command that affects a volume (:func:`affected_volumes`)
sets that volume's ``fence_epoch`` to the new epoch: CreateVolume, ResizeVolume,
AcquireLock and ReleaseLock their volume, SetServerState, RemoveServer and a
ServerStarted that changes the server's state every volume with a layer on that server
(a server is removed only once it holds nothing, so in practice none).  DeleteVolume
drops the volume and its layers.  The leader sends SET_EPOCH to
:func:`affected_servers` and, once each acknowledged (or its lease expired), proposes
``Publish(e)``, which raises ``published_epoch`` to ``e``; it needs
``published_epoch < e <= epoch``.

Volume ids and layer ids come from counters in the map that only grow, so no id is ever
reused, not even after a delete.  A new volume gets one ``live`` layer placed by
:func:`lamina.mgmt.placement.place` over the ``up`` servers, weighed by the copies every
server already holds; when any ``up`` server has a zone, the copies of a partition sit in
distinct zones (the zone ``""`` then counts as one zone).

Volume locks [0032]-[0037]
--------------------------
A volume opened read-write is held by one exclusive :class:`Lock`: the holder's session
(the id its driver keeps alive with keepalives to the managers), host, pid, and
``since``, the wall-clock time of the grant in milliseconds, which the *proposing*
manager puts in the command so that ``apply`` stays a pure function.  The rules::

    command                      volume's lock        outcome
    AcquireLock(s)               none                 granted to s
    AcquireLock(s)               held by s            refreshed (host, pid from the
                                                      command, ``since`` kept)
    AcquireLock(s)               held by t != s       rejected, naming t's holder
    AcquireLock(s, takeover)     held by t != s       granted to s (t is revoked)
    ReleaseLock(s)               held by s            released
    ReleaseLock(s)               none or t != s       rejected
    DeleteVolume                 held by anyone       rejected, naming the holder

Every applied AcquireLock and ReleaseLock raises the epoch and the volume's fence, like
any change to the volume: the leader publishes the new epoch only once every storage
server of the volume knows the fence (DESIGN section 6), so once a new holder may use
the volume, the writes the old holder still has in flight are refused STALE everywhere.
A revoked lock is revoked by the same path: session expiry (the leader proposes
ReleaseLock, see :mod:`lamina.mgmt.sessions`), break-lock (``lamina volume unlock``) and
takeover.

Re-replication
--------------
``Rereplicate(id)`` moves every partition copy of a ``down`` server to another ``up``
server, in place (the copy keeps its index: the bit order of the sync masks does not
change): the one outside the partition (and its zones, when zones are in force) with
the lowest fill ``(copies + 1) / capacity``, ties to the smaller id.  The new copy is
listed in its layer's ``filling`` as ``(partition index, server id)``: drivers write to
it and never read from it, and the leader's worker copies its partition to it from the
surviving copies.  ``FillDone(layer, partition, server)`` ends that.  Both fence the
volumes they change.  Rejected (with the partition named) when no server can take a
copy, or when a partition has no other copy that is ``up`` and not filling (nothing to
fill a new copy from: the down server may hold the only complete copy); the down server
then keeps it.

The server a copy moved away from still holds its pages, perhaps stale ones, and may
come back.  It is listed in the layer's ``retired`` until ``ReclaimDone(layer,
server)``, which the leader proposes once that server confirmed it dropped the layer
(DELETE_LAYER): a retired server is fenced and awaited by publications like the
layer's own servers (:func:`holders`), and no copy of the layer is placed on it again,
so a copy placed on a server always starts empty and the fill copies every page.
RemoveServer leaves the server in every ``retired`` (its disk may come back under the
same id): such an entry ends when a server of that id confirms the drop, or with the
layer.

Server states
-------------
A new server starts ``up``.  The legal transitions (:data:`TRANSITIONS`); every other,
staying in the same state included, is rejected::

    from         to           allowed when
    up           down         always (its lease expired, or a failure was reported)
    up           recovering   always (it restarted: its pending episodes are gone)
    up           out          it holds no partition copy
    down         recovering   always (it is back; the worker resyncs its pages)
    down         out          it holds no partition copy
    recovering   up           always (the worker found nothing dirty involving it)
    recovering   down         always
    recovering   out          it holds no partition copy
    out          up           always (it holds nothing, so there is nothing to resync)

``down -> up`` is missing on purpose: a server that was down may have missed writes, and
only the resync of ``recovering`` makes it a trustworthy copy again.  RemoveServer is
allowed in any state once the server holds no partition copy.

Field rules (checked when a command is built; :class:`lamina.errors.BadRequest`):
server ids, volume names and zones are 1-64 letters, digits, ``-`` or ``_`` (a zone may
also be empty); addresses are ``HOST:PORT``; capacities are positive; a volume size is a
positive multiple of 4096 up to 16 TiB; a page size a power of two in 64 KiB..16 MiB;
replicas 1..8; stripe 1..64; a lock's session follows the id rule, its host is 1-255
printable characters, its pid an integer >= 0 and ``since`` a time in milliseconds
from 1970 to the end of year 9999.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, StrEnum
from fractions import Fraction
from types import MappingProxyType
from typing import Any, ClassVar, NoReturn, TypeAlias, TypeVar, assert_never

import msgpack

from lamina.errors import BadRequest, ErrorCode, LaminaError, ProtocolError
from lamina.mgmt.placement import PlacementError, check_feasible, place, zones_in_force
from lamina.wire.messages import MAX_LAYER_BYTES, MAX_PAGE_SIZE, MIN_PAGE_SIZE

MAX_ID_LEN = 64
SIZE_ALIGN = 4096
MAX_VOLUME_SIZE = MAX_LAYER_BYTES
DEFAULT_PAGE_SIZE = 1 << 20
MAX_REPLICAS = 8
MAX_STRIPE = 64
MAX_INT = (1 << 63) - 1
#: layers in one volume's stack (snapshots, clone origins and migrations count)
MAX_STACK = 256
MAX_MIGRATE_SERVERS = 256
MAX_LOCK_HOST_LEN = 255
#: 9999-12-31T23:59:59.999Z in milliseconds: the last lock time a date can show
MAX_SINCE_MS = 253_402_300_799_999
#: version of the command encoding (first item of every encoded command)
COMMAND_FORMAT = 1
#: version of the map's dict form (its "format" key)
MAP_FORMAT = 1
#: an encoded command is far smaller than this; anything longer is refused unread
MAX_COMMAND_BYTES = 4096

_ID_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_ID_LEN}}}")
_HOST_RE = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_PORT_RE = re.compile(r"[0-9]{1,5}")
_LAYER_KEY_RE = re.compile(r"[1-9][0-9]{0,18}")


class ServerState(StrEnum):
    UP = "up"
    RECOVERING = "recovering"
    DOWN = "down"
    OUT = "out"


class LayerRole(StrEnum):
    LIVE = "live"
    SNAPSHOT = "snapshot"
    MIGRATION_SOURCE = "migration_source"
    MIGRATION_TARGET = "migration_target"


class InvalidCommand(LaminaError, ValueError):
    """``apply`` was given a command that ``validate`` rejects; the message is the reason."""

    code = ErrorCode.BAD_REQUEST


# --- the map -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Server:
    id: str
    addr: str
    state: ServerState
    capacity: int
    zone: str
    #: being emptied (``DrainServer``): no new copy goes there; migrations move its own
    draining: bool = False
    #: the incarnation the server last reported in a lease request (``ServerStarted``;
    #: 0: none yet): in the map, so any leader tells a restart
    incarnation: int = 0
    #: the epoch at which the server last stopped being ``up`` (0: never did).  A copy on
    #: a server that was up later than another's holds every write acknowledged before
    #: that: when no copy of a partition is up, the ones up last are the sources
    #: (:func:`lamina.repair.sources`)
    up_until: int = 0


@dataclass(frozen=True, slots=True)
class Lock:
    """The exclusive lock of a volume: who holds it, and since when (unix time in ms,
    as the manager that proposed the grant read its clock)."""

    session: str
    host: str
    pid: int
    since: int


@dataclass(frozen=True, slots=True)
class Volume:
    name: str
    id: int
    size: int
    page_size: int
    replicas: int
    stripe: int
    layers: tuple[int, ...]  # bottom -> top; the lower ones may be another volume's
    fence_epoch: int
    lock: Lock | None = None
    #: (name, layer id, unix ms when taken), oldest first: the snapshot is the stack up
    #: to and including that layer (one of this volume's own)
    snapshots: tuple[tuple[str, int, int], ...] = ()
    #: "VOLUME@SNAPSHOT" this volume was cloned from, while it shares layers with it
    origin: str = ""
    #: the worker is copying the shared layers into this volume's lowest own layer
    flattening: bool = False
    #: (target layer id, placement it came from) of each layer of a running migration:
    #: what ``AbortMigration`` returns to; empty when no migration runs
    migration: tuple[tuple[int, tuple[tuple[str, ...], ...]], ...] = ()

    def snapshot_layer(self, name: str) -> int | None:
        for snap, lid, _ in self.snapshots:
            if snap == name:
                return lid
        return None


@dataclass(frozen=True, slots=True)
class Layer:
    id: int
    volume_id: int
    placement: tuple[tuple[str, ...], ...]  # partitions: the ordered ids holding the copies
    role: LayerRole
    migrates_to: int | None
    #: (partition index, server id) of copies being filled after a re-replication: they
    #: take every write but serve no read until the worker has copied their partition
    filling: tuple[tuple[int, str], ...] = ()
    #: servers a re-replication moved a copy away from that may still hold pages of the
    #: layer (sorted): fenced like its own servers, given no copy of it until reclaimed
    retired: tuple[str, ...] = ()
    #: a 63-bit token drawn when the layer was created (:func:`layer_lineage`); a storage
    #: server never serves a layer file recorded with another (0: none, unchecked)
    lineage: int = 0


K = TypeVar("K")
V = TypeVar("V")


def _frozen(d: dict[K, V]) -> Mapping[K, V]:
    """A read-only view of ``d``; the caller hands ``d`` over and never touches it again."""
    return MappingProxyType(d)


@dataclass(frozen=True, slots=True)
class ClusterMap:
    """One version of the replicated state.  Immutable: a change builds a new map that
    shares every unchanged entry (and every unchanged mapping) with this one.  Mappings
    given to the constructor are copied, except a ``MappingProxyType``, which is taken as
    it is (whoever built it hands its dict over).  Not hashable (its mappings are not)."""

    epoch: int
    published_epoch: int
    servers: Mapping[str, Server]
    volumes: Mapping[str, Volume]
    layers: Mapping[int, Layer]
    next_volume_id: int
    next_layer_id: int

    def __post_init__(self) -> None:
        # a plain dict from a caller is copied, so no one can change the map under us
        for name in ("servers", "volumes", "layers"):
            value = getattr(self, name)
            if type(value) is not MappingProxyType:
                object.__setattr__(self, name, MappingProxyType(dict(value)))

    def up_servers(self) -> list[Server]:
        return [
            self.servers[k] for k in sorted(self.servers) if self.servers[k].state is ServerState.UP
        ]

    def placeable(self) -> list[Server]:
        """The servers a new copy may go to: ``up`` and not draining, by id."""
        return [s for s in self.up_servers() if not s.draining]

    def layers_on(self, server_id: str) -> list[Layer]:
        """The layers with a partition copy on ``server_id``, by id."""
        return [
            self.layers[lid]
            for lid in sorted(self.layers)
            if any(server_id in part for part in self.layers[lid].placement)
        ]

    def volume_by_id(self, volume_id: int) -> Volume | None:
        for volume in self.volumes.values():
            if volume.id == volume_id:
                return volume
        return None

    def own_layers(self, volume: Volume) -> tuple[int, ...]:
        """The layers of ``volume``'s stack that are its own (a clone's bottom layers are
        its origin's), bottom first."""
        return tuple(lid for lid in volume.layers if self.layers[lid].volume_id == volume.id)

    def stacking(self, layer_id: int) -> list[Volume]:
        """The volumes whose stack holds layer ``layer_id`` (its owner and its clones),
        by name."""
        return [self.volumes[n] for n in sorted(self.volumes) if layer_id in self.volumes[n].layers]

    def copies_per_server(self) -> dict[str, int]:
        """Partition copies each server holds, over every layer."""
        copies: dict[str, int] = {}
        for layer in self.layers.values():
            for part in layer.placement:
                for sid in part:
                    copies[sid] = copies.get(sid, 0) + 1
        return copies


def empty_map() -> ClusterMap:
    """The map a new cluster starts from: epoch 0, nothing in it."""
    return ClusterMap(0, 0, _frozen({}), _frozen({}), _frozen({}), 1, 1)


# --- field checks --------------------------------------------------------------------


def _show(v: Any) -> str:
    if isinstance(v, list | tuple | dict):
        return f"a {type(v).__name__} of {len(v)} items"
    return f"{v!r:.40}"


def check_id(what: str, v: Any) -> None:
    if type(v) is not str or not _ID_RE.fullmatch(v):
        raise BadRequest(f"{what} must be 1-{MAX_ID_LEN} letters, digits, - or _, not {_show(v)}")


def check_zone(v: Any) -> None:
    if v != "":
        check_id("zone", v)


def check_addr(v: Any) -> None:
    bad = BadRequest(f"address must be HOST:PORT, not {_show(v)}")
    if type(v) is not str or len(v) > 260:
        raise bad
    host, sep, port = v.rpartition(":")
    if not sep or not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise bad
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise bad from None
    elif len(host) > 253 or not _HOST_RE.fullmatch(host):
        raise bad


def check_int(what: str, v: Any, lo: int, hi: int = MAX_INT) -> None:
    if type(v) is not int or not lo <= v <= hi:
        raise BadRequest(f"{what} must be an integer in {lo}..{hi}, not {_show(v)}")


def check_size(v: Any) -> None:
    check_int("volume size", v, SIZE_ALIGN, MAX_VOLUME_SIZE)
    if v % SIZE_ALIGN:
        raise BadRequest(f"volume size must be a multiple of {SIZE_ALIGN}, not {v}")


def check_page_size(v: Any) -> None:
    if type(v) is not int or not MIN_PAGE_SIZE <= v <= MAX_PAGE_SIZE or v & (v - 1):
        raise BadRequest(f"page size must be a power of two in 64 KiB..16 MiB, not {_show(v)}")


def check_lock_host(v: Any) -> None:
    if type(v) is not str or not 1 <= len(v) <= MAX_LOCK_HOST_LEN or not v.isprintable():
        raise BadRequest(f"host must be 1-{MAX_LOCK_HOST_LEN} printable characters, not {_show(v)}")


def check_bool(what: str, v: Any) -> None:
    if type(v) is not bool:
        raise BadRequest(f"{what} must be true or false, not {_show(v)}")


def check_lock_fields(session: Any, host: Any, pid: Any, since: Any) -> None:
    check_id("session", session)
    check_lock_host(host)
    check_int("pid", pid, 0)
    check_int("since", since, 0, MAX_SINCE_MS)


def format_since(ms: int) -> str:
    """A lock time (unix milliseconds) as ISO 8601 UTC to the second: 2026-11-25T10:00:00Z."""
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_lock(lock: Lock) -> str:
    """The holder, as rejection reasons and logs name it."""
    return (
        f"host {lock.host} pid {lock.pid} since {format_since(lock.since)} (session {lock.session})"
    )


def check_enum(what: str, v: Any, enum: type[Enum]) -> None:
    if type(v) is not enum:
        raise BadRequest(f"{what} must be a {enum.__name__}, not {_show(v)}")


# --- commands ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddServer:
    """Admit a storage server; it starts ``up``.  ``capacity`` is in bytes (placement only
    uses its ratio to the other servers' capacities)."""

    TAG: ClassVar[str] = "add_server"
    id: str
    addr: str
    capacity: int
    zone: str = ""

    def __post_init__(self) -> None:
        check_id("server id", self.id)
        check_addr(self.addr)
        check_int("capacity", self.capacity, 1)
        check_zone(self.zone)


@dataclass(frozen=True, slots=True)
class RemoveServer:
    TAG: ClassVar[str] = "remove_server"
    id: str

    def __post_init__(self) -> None:
        check_id("server id", self.id)


@dataclass(frozen=True, slots=True)
class DrainServer:
    """Start emptying server ``id`` (``undo``: stop): no new copy is placed on it, and
    the leader migrates every volume with a copy there to the other servers.  Rejected,
    with the volume named, if some volume's copies would have no place to go."""

    TAG: ClassVar[str] = "drain_server"
    id: str
    undo: bool = False

    def __post_init__(self) -> None:
        check_id("server id", self.id)
        check_bool("undo", self.undo)


@dataclass(frozen=True, slots=True)
class SetServerState:
    TAG: ClassVar[str] = "set_server_state"
    id: str
    state: ServerState = field(metadata={"enum": ServerState})

    def __post_init__(self) -> None:
        check_id("server id", self.id)
        check_enum("state", self.state, ServerState)


@dataclass(frozen=True, slots=True)
class ServerStarted:
    """A lease request showed storage server ``id`` running as ``incarnation`` (its
    store bumps it at every start), another than the map records.  Recorded; if the map
    had recorded one before, the server restarted: its pending write episodes and
    in-flight flags are gone, so an ``up`` server becomes ``recovering`` (only the
    resync makes it ``up`` again).  A ``down`` server becomes ``recovering`` too."""

    TAG: ClassVar[str] = "server_started"
    id: str
    incarnation: int

    def __post_init__(self) -> None:
        check_id("server id", self.id)
        check_int("incarnation", self.incarnation, 1)


@dataclass(frozen=True, slots=True)
class CreateVolume:
    TAG: ClassVar[str] = "create_volume"
    name: str
    size: int
    replicas: int = 2
    stripe: int = 4
    page_size: int = DEFAULT_PAGE_SIZE

    def __post_init__(self) -> None:
        check_id("volume name", self.name)
        check_size(self.size)
        check_int("replicas", self.replicas, 1, MAX_REPLICAS)
        check_int("stripe", self.stripe, 1, MAX_STRIPE)
        check_page_size(self.page_size)


@dataclass(frozen=True, slots=True)
class ResizeVolume:
    TAG: ClassVar[str] = "resize_volume"
    name: str
    size: int

    def __post_init__(self) -> None:
        check_id("volume name", self.name)
        check_size(self.size)


@dataclass(frozen=True, slots=True)
class DeleteVolume:
    TAG: ClassVar[str] = "delete_volume"
    name: str

    def __post_init__(self) -> None:
        check_id("volume name", self.name)


@dataclass(frozen=True, slots=True)
class AcquireLock:
    """Take the exclusive lock of volume ``name`` for ``session`` (see the module
    docstring for the rules); ``since`` is the proposer's clock, in unix milliseconds."""

    TAG: ClassVar[str] = "acquire_lock"
    name: str
    session: str
    host: str
    pid: int
    since: int
    takeover: bool = False

    def __post_init__(self) -> None:
        check_id("volume name", self.name)
        check_lock_fields(self.session, self.host, self.pid, self.since)
        check_bool("takeover", self.takeover)


@dataclass(frozen=True, slots=True)
class ReleaseLock:
    """Release the lock of volume ``name``, which ``session`` must hold."""

    TAG: ClassVar[str] = "release_lock"
    name: str
    session: str

    def __post_init__(self) -> None:
        check_id("volume name", self.name)
        check_id("session", self.session)


@dataclass(frozen=True, slots=True)
class Rereplicate:
    """Give every partition copy the ``down`` server ``id`` holds to another ``up``
    server (placement rules: not already in the partition, distinct zones when zones are
    in force, the lowest fill), as a copy that is *filling* until the worker has copied
    its partition (:class:`FillDone`)."""

    TAG: ClassVar[str] = "rereplicate"
    id: str

    def __post_init__(self) -> None:
        check_id("server id", self.id)


@dataclass(frozen=True, slots=True)
class FillDone:
    """Copy ``server`` of partition ``partition`` of layer ``layer`` holds everything:
    it may serve reads."""

    TAG: ClassVar[str] = "fill_done"
    layer: int
    partition: int
    server: str

    def __post_init__(self) -> None:
        check_int("layer id", self.layer, 1)
        check_int("partition", self.partition, 0, MAX_STRIPE - 1)
        check_id("server id", self.server)


@dataclass(frozen=True, slots=True)
class ReclaimDone:
    """Retired ``server`` dropped every page of layer ``layer``: it may get a copy again."""

    TAG: ClassVar[str] = "reclaim_done"
    layer: int
    server: str

    def __post_init__(self) -> None:
        check_int("layer id", self.layer, 1)
        check_id("server id", self.server)


@dataclass(frozen=True, slots=True)
class CreateSnapshot:
    """Freeze the top layer of volume ``name`` as snapshot ``snapshot`` and push a new,
    empty top layer on the same servers [0056]: O(1), no data moves.  ``since`` is the
    proposer's clock in unix milliseconds."""

    TAG: ClassVar[str] = "create_snapshot"
    name: str
    snapshot: str
    since: int

    def __post_init__(self) -> None:
        check_id("volume name", self.name)
        check_id("snapshot name", self.snapshot)
        check_int("since", self.since, 0, MAX_SINCE_MS)


@dataclass(frozen=True, slots=True)
class DeleteSnapshot:
    """Forget snapshot ``snapshot`` of volume ``name``: its layer ``migrates_to`` the
    layer above it, so the worker merges it up and the space returns [0058]."""

    TAG: ClassVar[str] = "delete_snapshot"
    name: str
    snapshot: str

    def __post_init__(self) -> None:
        check_id("volume name", self.name)
        check_id("snapshot name", self.snapshot)


@dataclass(frozen=True, slots=True)
class RollbackVolume:
    """Make volume ``name`` read as snapshot ``snapshot`` again: the layers above the
    snapshot are dropped and a new empty top layer is pushed on it."""

    TAG: ClassVar[str] = "rollback_volume"
    name: str
    snapshot: str

    def __post_init__(self) -> None:
        check_id("volume name", self.name)
        check_id("snapshot name", self.snapshot)


@dataclass(frozen=True, slots=True)
class CloneVolume:
    """A new writable volume ``name`` whose lower layers are those of snapshot
    ``snapshot`` of volume ``source`` (shared, not copied) under a new empty top layer."""

    TAG: ClassVar[str] = "clone_volume"
    source: str
    snapshot: str
    name: str

    def __post_init__(self) -> None:
        check_id("volume name", self.source)
        check_id("snapshot name", self.snapshot)
        check_id("volume name", self.name)


@dataclass(frozen=True, slots=True)
class FlattenVolume:
    """Start copying what clone ``name`` still shares into its own lowest layer."""

    TAG: ClassVar[str] = "flatten_volume"
    name: str

    def __post_init__(self) -> None:
        check_id("volume name", self.name)


@dataclass(frozen=True, slots=True)
class FlattenDone:
    """The worker copied every shared page of ``name``: drop the shared layers."""

    TAG: ClassVar[str] = "flatten_done"
    name: str

    def __post_init__(self) -> None:
        check_id("volume name", self.name)


@dataclass(frozen=True, slots=True)
class MigrateVolume:
    """Move volume ``name``'s own layers to a new placement [0048]: each layer gets a new
    layer right above it, placed over ``servers`` (empty: every up server) with
    ``replicas`` copies of ``stripe`` partitions (0: keep the volume's), and
    ``migrates_to`` it; the worker moves the pages, and ``MigrationDone`` retires each
    emptied source."""

    TAG: ClassVar[str] = "migrate_volume"
    name: str
    servers: tuple[str, ...] = ()
    replicas: int = 0
    stripe: int = 0

    def __post_init__(self) -> None:
        check_id("volume name", self.name)
        if type(self.servers) is not tuple or len(self.servers) > MAX_MIGRATE_SERVERS:
            raise BadRequest(f"servers must be a list of at most {MAX_MIGRATE_SERVERS} ids")
        for sid in self.servers:
            check_id("server id", sid)
        if len(set(self.servers)) != len(self.servers):
            raise BadRequest("a server is listed twice")
        check_int("replicas", self.replicas, 0, MAX_REPLICAS)
        check_int("stripe", self.stripe, 0, MAX_STRIPE)


@dataclass(frozen=True, slots=True)
class AbortMigration:
    """Send volume ``name``'s running migration back: every layer it moves to gets a new
    layer above it on the placement it came from, and migrates there."""

    TAG: ClassVar[str] = "abort_migration"
    name: str

    def __post_init__(self) -> None:
        check_id("volume name", self.name)


@dataclass(frozen=True, slots=True)
class MigrationDone:
    """Layer ``layer`` (a migration source) holds no page any more: it leaves every stack
    and the map, and its space is reclaimed."""

    TAG: ClassVar[str] = "migration_done"
    layer: int

    def __post_init__(self) -> None:
        check_int("layer id", self.layer, 1)


@dataclass(frozen=True, slots=True)
class Publish:
    """Raise ``published_epoch`` to ``epoch`` (the only command that keeps ``epoch``)."""

    TAG: ClassVar[str] = "publish"
    epoch: int

    def __post_init__(self) -> None:
        check_int("epoch", self.epoch, 0)


Command: TypeAlias = (
    AddServer
    | RemoveServer
    | DrainServer
    | SetServerState
    | ServerStarted
    | CreateVolume
    | ResizeVolume
    | DeleteVolume
    | AcquireLock
    | ReleaseLock
    | Rereplicate
    | FillDone
    | ReclaimDone
    | CreateSnapshot
    | DeleteSnapshot
    | RollbackVolume
    | CloneVolume
    | FlattenVolume
    | FlattenDone
    | MigrateVolume
    | AbortMigration
    | MigrationDone
    | Publish
)
COMMAND_TYPES: tuple[type[Command], ...] = (
    AddServer,
    RemoveServer,
    DrainServer,
    SetServerState,
    ServerStarted,
    CreateVolume,
    ResizeVolume,
    DeleteVolume,
    AcquireLock,
    ReleaseLock,
    Rereplicate,
    FillDone,
    ReclaimDone,
    CreateSnapshot,
    DeleteSnapshot,
    RollbackVolume,
    CloneVolume,
    FlattenVolume,
    FlattenDone,
    MigrateVolume,
    AbortMigration,
    MigrationDone,
    Publish,
)
_BY_TAG: dict[str, type[Command]] = {cls.TAG: cls for cls in COMMAND_TYPES}


# --- server states -------------------------------------------------------------------


class When(Enum):
    """The condition a server-state transition needs."""

    ALWAYS = "always"
    HOLDS_NOTHING = "it holds no partition copy"


_S = ServerState
#: every legal (from, to) server-state transition and its condition (the module docstring
#: shows the same table)
TRANSITIONS: Mapping[tuple[ServerState, ServerState], When] = MappingProxyType(
    {
        (_S.UP, _S.DOWN): When.ALWAYS,
        (_S.UP, _S.RECOVERING): When.ALWAYS,
        (_S.UP, _S.OUT): When.HOLDS_NOTHING,
        (_S.DOWN, _S.RECOVERING): When.ALWAYS,
        (_S.DOWN, _S.OUT): When.HOLDS_NOTHING,
        (_S.RECOVERING, _S.UP): When.ALWAYS,
        (_S.RECOVERING, _S.DOWN): When.ALWAYS,
        (_S.RECOVERING, _S.OUT): When.HOLDS_NOTHING,
        (_S.OUT, _S.UP): When.ALWAYS,
    }
)


# --- validate ------------------------------------------------------------------------


def validate(cmap: ClusterMap, cmd: Command) -> str | None:
    """``None`` if ``cmd`` may apply to ``cmap``, else the reason it is rejected."""
    if type(cmd) not in COMMAND_TYPES:
        return f"not a command: {type(cmd).__name__}"
    match cmd:
        case AddServer():
            return _check_add_server(cmap, cmd)
        case RemoveServer():
            if cmd.id not in cmap.servers:
                return f"unknown server {cmd.id}"
            return _holdings(cmap, cmd.id)
        case SetServerState():
            return _check_set_state(cmap, cmd)
        case ServerStarted():
            return _check_started(cmap, cmd)
        case DrainServer():
            return _check_drain(cmap, cmd)
        case CreateVolume():
            return _check_create(cmap, cmd)
        case ResizeVolume() | DeleteVolume() | AcquireLock() | ReleaseLock():
            volume = cmap.volumes.get(cmd.name)
            if volume is None:
                return f"unknown volume {cmd.name}"
            return _check_volume_change(volume, cmd, _clones(cmap, volume))
        case Rereplicate():
            replaced = _rereplaced(cmap, cmd.id)
            return replaced if isinstance(replaced, str) else None
        case FillDone():
            layer = cmap.layers.get(cmd.layer)
            if layer is None:
                return f"unknown layer {cmd.layer}"
            if (cmd.partition, cmd.server) not in layer.filling:
                return (
                    f"copy {cmd.server} of partition {cmd.partition} of layer {cmd.layer} "
                    "is not being filled"
                )
            return None
        case ReclaimDone():
            layer = cmap.layers.get(cmd.layer)
            if layer is None:
                return f"unknown layer {cmd.layer}"
            if cmd.server not in layer.retired:
                return f"server {cmd.server} holds no retired copy of layer {cmd.layer}"
            return None
        case (
            CreateSnapshot()
            | DeleteSnapshot()
            | RollbackVolume()
            | CloneVolume()
            | FlattenVolume()
            | FlattenDone()
            | MigrateVolume()
            | AbortMigration()
            | MigrationDone()
        ):
            return _check_layer_command(cmap, cmd)
        case Publish():
            if cmd.epoch > cmap.epoch:
                return f"cannot publish epoch {cmd.epoch}: the map is at epoch {cmap.epoch}"
            if cmd.epoch <= cmap.published_epoch:
                return f"epoch {cmd.epoch} is not above the published epoch {cmap.published_epoch}"
            return None
    assert_never(cmd)


def _rereplaced(cmap: ClusterMap, server_id: str) -> dict[int, Layer] | str:
    """The layers after every partition copy on ``server_id`` moved to another up server,
    or why that cannot be done.  Deterministic: layers and partitions in order, each copy
    to the eligible up server with the lowest fill ``(copies + 1) / capacity`` (ties: the
    smaller id), counting the copies given so far.  A server the layer retired is not
    eligible (it may still hold old pages of it); ``server_id`` joins the retired.  A
    copy moves only if another copy of its partition is up and not being filled: the
    new copy has a source now, and the moved one is never the only copy of its data."""
    server = cmap.servers.get(server_id)
    if server is None:
        return f"unknown server {server_id}"
    if server.state is not ServerState.DOWN:
        return f"server {server_id} is {server.state.value}, not down"
    layers = cmap.layers_on(server_id)
    if not layers:
        return f"server {server_id} holds no partition copy"
    up = cmap.placeable()
    zoned = zones_in_force(up)
    copies = cmap.copies_per_server()
    out: dict[int, Layer] = {}
    for layer in layers:
        placement = list(layer.placement)
        filling = [f for f in layer.filling if f[1] != server_id]
        for pidx, part in enumerate(placement):
            if server_id not in part:
                continue
            sources = [
                o
                for o in part
                if o != server_id
                and (pidx, o) not in layer.filling
                and o in cmap.servers
                and cmap.servers[o].state is ServerState.UP
            ]
            if not sources:
                return (
                    f"partition {pidx} of layer {layer.id} (partition {', '.join(part)}) has no "
                    f"other up copy that is not being filled: {server_id} keeps its copy, the "
                    "only one a new copy could be filled from, until one is"
                )
            others = {cmap.servers[o].zone for o in part if o != server_id and o in cmap.servers}
            fits = [s for s in up if s.id not in part and not (zoned and s.zone in others)]
            eligible = [s for s in fits if s.id not in layer.retired]
            if not eligible:
                why = "add a server"
                if fits:
                    old = ", ".join(s.id for s in fits)
                    why = f"{old} still hold(s) an old copy of the layer, not yet reclaimed"
                return (
                    f"no up server can take the copy of partition {pidx} of layer {layer.id} "
                    f"that {server_id} holds (partition {', '.join(part)}): {why}"
                )
            best = min(
                eligible, key=lambda s: (Fraction(copies.get(s.id, 0) + 1, s.capacity), s.id)
            )
            copies[best.id] = copies.get(best.id, 0) + 1
            placement[pidx] = tuple(best.id if sid == server_id else sid for sid in part)
            filling.append((pidx, best.id))
        out[layer.id] = dataclasses.replace(
            layer,
            placement=tuple(placement),
            filling=tuple(sorted(filling)),
            retired=tuple(sorted({*layer.retired, server_id})),
        )
    return out


def _check_volume_change(
    volume: Volume,
    cmd: ResizeVolume | DeleteVolume | AcquireLock | ReleaseLock,
    clones: Sequence[str] = (),
) -> str | None:
    """Why ``cmd`` may not change ``volume`` (which exists), or ``None``; ``clones``
    names the volumes that share a layer of it."""
    lock = volume.lock
    match cmd:
        case ResizeVolume():
            if cmd.size < volume.size:
                return (
                    f"volume {cmd.name} is {volume.size} bytes: volumes only grow, "
                    f"shrinking it to {cmd.size} would drop data"
                )
            if cmd.size == volume.size:
                return f"volume {cmd.name} is already {cmd.size} bytes"
        case DeleteVolume():
            if lock is not None:
                return f"volume {cmd.name} is locked by {describe_lock(lock)}: unlock it first"
            if clones:
                return (
                    f"volume {cmd.name} is the origin of {', '.join(clones)}: flatten "
                    "(lamina volume flatten NAME) or delete them first"
                )
        case AcquireLock():
            if lock is not None and lock.session != cmd.session and not cmd.takeover:
                return f"volume {cmd.name} is locked by {describe_lock(lock)}"
        case ReleaseLock():
            if lock is None:
                return f"volume {cmd.name} is not locked"
            if lock.session != cmd.session:
                return (
                    f"volume {cmd.name} is locked by {describe_lock(lock)}, "
                    f"not by session {cmd.session}"
                )
    return None


def _check_add_server(cmap: ClusterMap, cmd: AddServer) -> str | None:
    if cmd.id in cmap.servers:
        return f"server {cmd.id} already exists"
    addr = cmd.addr.lower()
    for sid in sorted(cmap.servers):
        if cmap.servers[sid].addr.lower() == addr:
            return f"address {cmd.addr} is already used by server {sid}"
    return None


def _holdings(cmap: ClusterMap, server_id: str) -> str | None:
    """Why ``server_id`` may not be emptied of data yet, or ``None`` if it holds nothing."""
    layers = cmap.layers_on(server_id)
    if not layers:
        return None
    first = layers[0]
    volume = cmap.volume_by_id(first.volume_id)
    name = volume.name if volume is not None else f"#{first.volume_id}"
    more = f" and {len(layers) - 1} more layer(s)" if len(layers) > 1 else ""
    return f"{server_id} holds copies of layer {first.id} (volume {name}){more}: drain it first"


def _check_drain(cmap: ClusterMap, cmd: DrainServer) -> str | None:
    server = cmap.servers.get(cmd.id)
    if server is None:
        return f"unknown server {cmd.id}"
    if cmd.undo:
        return None if server.draining else f"server {cmd.id} is not being drained"
    if server.draining:
        return f"server {cmd.id} is already being drained"
    others = [s for s in cmap.placeable() if s.id != cmd.id]
    for volume in sorted(cmap.volumes.values(), key=lambda v: v.name):
        if not any(
            cmd.id in part for lid in cmap.own_layers(volume) for part in cmap.layers[lid].placement
        ):
            continue
        try:
            check_feasible(others, volume.replicas)
        except PlacementError as exc:
            return (
                f"draining {cmd.id} would leave volume {volume.name} without a place for its "
                f"{volume.replicas} copies per partition: {exc.message}; add a server first"
            )
    return None


def _check_set_state(cmap: ClusterMap, cmd: SetServerState) -> str | None:
    server = cmap.servers.get(cmd.id)
    if server is None:
        return f"unknown server {cmd.id}"
    if server.state == cmd.state:
        return f"server {cmd.id} is already {cmd.state}"
    when = TRANSITIONS.get((server.state, cmd.state))
    if when is None:
        allowed = ", ".join(to for (frm, to) in TRANSITIONS if frm == server.state)
        return (
            f"server {cmd.id} cannot go from {server.state} to {cmd.state} "
            f"(from {server.state} it may go to: {allowed})"
        )
    if when is When.HOLDS_NOTHING:
        return _holdings(cmap, cmd.id)
    return None


def _check_started(cmap: ClusterMap, cmd: ServerStarted) -> str | None:
    server = cmap.servers.get(cmd.id)
    if server is None:
        return f"unknown server {cmd.id}"
    if server.state is ServerState.OUT:
        return f"server {cmd.id} is out of the cluster"
    if server.incarnation == cmd.incarnation:
        return f"server {cmd.id} is already recorded as incarnation {cmd.incarnation}"
    return None


def _left_up(server: Server, state: ServerState, epoch: int) -> Server:
    """``server`` in ``state`` from ``epoch`` on, remembering when it stopped being up."""
    if server.state is ServerState.UP and state is not ServerState.UP:
        return dataclasses.replace(server, state=state, up_until=epoch)
    return dataclasses.replace(server, state=state)


def started_state(server: Server, incarnation: int) -> ServerState:
    """The state ``ServerStarted(server.id, incarnation)`` leaves the server in."""
    restarted = server.incarnation not in (0, incarnation)  # 0: never reported before
    if server.state is ServerState.DOWN or (restarted and server.state is ServerState.UP):
        return ServerState.RECOVERING
    return server.state


def _check_create(cmap: ClusterMap, cmd: CreateVolume) -> str | None:
    if cmd.name in cmap.volumes:
        return f"volume {cmd.name} already exists"
    up = cmap.placeable()
    copies = f"{cmd.replicas} copies of each partition"
    if cmd.replicas > len(up):
        return f"volume {cmd.name} needs {cmd.replicas} up servers for {copies}, {len(up)} are up"
    if zones_in_force(up):
        zones = sorted({s.zone for s in up})
        if cmd.replicas > len(zones):
            return (
                f"volume {cmd.name} needs {cmd.replicas} zones for {copies}, the up servers "
                f"span {len(zones)} ({', '.join(repr(z) for z in zones)})"
            )
    try:
        check_feasible(up, cmd.replicas)  # the same rule, as placement states it
    except PlacementError as exc:
        return f"volume {cmd.name}: {exc.message}"
    return None


# --- apply ---------------------------------------------------------------------------


def layer_lineage(nonce: int, layer_id: int) -> int:
    """The lineage token of layer ``layer_id`` created by a command that came with
    ``nonce`` (64 random bits its proposer drew): a map rolled back by a power loss that
    reuses the id gives the new layer another token (splitmix64, 63 bits, never 0)."""
    z = (nonce ^ (layer_id * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF) or 1  # 63 bits: a map integer


def apply(cmap: ClusterMap, cmd: Command, nonce: int = 0) -> ClusterMap:
    """The map after ``cmd``.  Raises :class:`InvalidCommand` if ``validate`` rejects it.
    ``nonce``: the random bits the command was committed with; the layers it creates take
    their lineage tokens from it (:func:`layer_lineage`)."""
    reason = validate(cmap, cmd)
    if reason is not None:
        raise InvalidCommand(reason)
    epoch = cmap.epoch + 1
    replace = dataclasses.replace
    match cmd:
        case Publish():
            return replace(cmap, published_epoch=cmd.epoch)
        case AddServer():
            server = Server(cmd.id, cmd.addr, ServerState.UP, cmd.capacity, cmd.zone)
            return replace(cmap, epoch=epoch, servers=_frozen({**cmap.servers, cmd.id: server}))
        case RemoveServer():
            kept = {k: v for k, v in cmap.servers.items() if k != cmd.id}
            volumes = _fenced(cmap, _affected(cmap, cmd), epoch)
            return replace(cmap, epoch=epoch, servers=_frozen(kept), volumes=volumes)
        case DrainServer():
            server = replace(cmap.servers[cmd.id], draining=not cmd.undo)
            return replace(cmap, epoch=epoch, servers=_frozen({**cmap.servers, cmd.id: server}))
        case SetServerState():
            server = _left_up(cmap.servers[cmd.id], cmd.state, epoch)
            volumes = _fenced(cmap, _affected(cmap, cmd), epoch)
            servers = _frozen({**cmap.servers, cmd.id: server})
            return replace(cmap, epoch=epoch, servers=servers, volumes=volumes)
        case ServerStarted():
            before = cmap.servers[cmd.id]
            state = started_state(before, cmd.incarnation)
            server = replace(_left_up(before, state, epoch), incarnation=cmd.incarnation)
            volumes = _fenced(cmap, _affected(cmap, cmd), epoch)
            servers = _frozen({**cmap.servers, cmd.id: server})
            return replace(cmap, epoch=epoch, servers=servers, volumes=volumes)
        case CreateVolume():
            placement = place(cmap.placeable(), cmd.stripe, cmd.replicas, cmap.copies_per_server())
            vid, lid = cmap.next_volume_id, cmap.next_layer_id
            layer = Layer(
                lid, vid, placement, LayerRole.LIVE, None, lineage=layer_lineage(nonce, lid)
            )
            volume = Volume(
                cmd.name, vid, cmd.size, cmd.page_size, cmd.replicas, cmd.stripe, (lid,), epoch
            )
            return replace(
                cmap,
                epoch=epoch,
                volumes=_frozen({**cmap.volumes, cmd.name: volume}),
                layers=_frozen({**cmap.layers, lid: layer}),
                next_volume_id=vid + 1,
                next_layer_id=lid + 1,
            )
        case Rereplicate():
            replaced = _rereplaced(cmap, cmd.id)
            assert not isinstance(replaced, str)
            volumes = _fenced(cmap, _affected(cmap, cmd), epoch)
            layers = _frozen({**cmap.layers, **replaced})
            return replace(cmap, epoch=epoch, volumes=volumes, layers=layers)
        case FillDone():
            layer = cmap.layers[cmd.layer]
            done = tuple(f for f in layer.filling if f != (cmd.partition, cmd.server))
            layers = _frozen({**cmap.layers, layer.id: replace(layer, filling=done)})
            volumes = _fenced(cmap, _affected(cmap, cmd), epoch)
            return replace(cmap, epoch=epoch, volumes=volumes, layers=layers)
        case ReclaimDone():
            layer = cmap.layers[cmd.layer]
            layer = replace(layer, retired=tuple(s for s in layer.retired if s != cmd.server))
            return replace(cmap, epoch=epoch, layers=_frozen({**cmap.layers, layer.id: layer}))
        case ResizeVolume():
            volume = replace(cmap.volumes[cmd.name], size=cmd.size, fence_epoch=epoch)
            return replace(cmap, epoch=epoch, volumes=_frozen({**cmap.volumes, cmd.name: volume}))
        case DeleteVolume():
            gone = cmap.volumes[cmd.name]
            volumes = {k: v for k, v in cmap.volumes.items() if k != cmd.name}
            layers = {k: v for k, v in cmap.layers.items() if v.volume_id != gone.id}
            return replace(cmap, epoch=epoch, volumes=_frozen(volumes), layers=_frozen(layers))
        case (
            CreateSnapshot()
            | DeleteSnapshot()
            | RollbackVolume()
            | CloneVolume()
            | FlattenVolume()
            | FlattenDone()
            | MigrateVolume()
            | AbortMigration()
            | MigrationDone()
        ):
            return _layer_change(cmap, cmd, epoch, nonce)[0]
        case AcquireLock() | ReleaseLock():
            volume = cmap.volumes[cmd.name]
            lock = _lock_after(volume.lock, cmd)
            volume = replace(volume, lock=lock, fence_epoch=epoch)
            return replace(cmap, epoch=epoch, volumes=_frozen({**cmap.volumes, cmd.name: volume}))
    assert_never(cmd)


def _lock_after(lock: Lock | None, cmd: AcquireLock | ReleaseLock) -> Lock | None:
    """The volume's lock after a (valid) lock command: a refresh by its own session keeps
    ``since``; a grant or a takeover starts anew."""
    if isinstance(cmd, ReleaseLock):
        return None
    since = lock.since if lock is not None and lock.session == cmd.session else cmd.since
    return Lock(cmd.session, cmd.host, cmd.pid, since)


def _fenced(cmap: ClusterMap, volume_ids: Iterable[int], epoch: int) -> Mapping[str, Volume]:
    """``cmap.volumes`` with the fence of every volume in ``volume_ids`` set to ``epoch``."""
    ids = set(volume_ids)
    if not ids:
        return cmap.volumes
    return _frozen(
        {
            name: dataclasses.replace(v, fence_epoch=epoch) if v.id in ids else v
            for name, v in cmap.volumes.items()
        }
    )


# --- layers: snapshots, clones, migration [0048]-[0060] --------------------------------

LayerCommand: TypeAlias = (
    CreateSnapshot
    | DeleteSnapshot
    | RollbackVolume
    | CloneVolume
    | FlattenVolume
    | FlattenDone
    | MigrateVolume
    | AbortMigration
    | MigrationDone
)


def _clones(cmap: ClusterMap, volume: Volume) -> list[str]:
    """The other volumes whose stacks hold a layer of ``volume``, by name."""
    own = set(cmap.own_layers(volume))
    return [
        name
        for name in sorted(cmap.volumes)
        if name != volume.name and own.intersection(cmap.volumes[name].layers)
    ]


def _sources_into(cmap: ClusterMap, layer_id: int) -> list[int]:
    """The layers that still migrate into ``layer_id``, by id."""
    return [lid for lid in sorted(cmap.layers) if cmap.layers[lid].migrates_to == layer_id]


def _migrating(volume: Volume) -> str | None:
    if not volume.migration:
        return None
    return (
        f"volume {volume.name} is migrating: wait for it to finish "
        f"or abort it (lamina volume migrate {volume.name} --abort)"
    )


def _snapshot_of(cmap: ClusterMap, name: str, snapshot: str) -> tuple[Volume, int] | str:
    volume = cmap.volumes.get(name)
    if volume is None:
        return f"unknown volume {name}"
    lid = volume.snapshot_layer(snapshot)
    if lid is None:
        return f"volume {name} has no snapshot {snapshot}"
    return volume, lid


def _movable(cmap: ClusterMap, volume: Volume) -> list[int]:
    """The own layers of ``volume`` a migration moves: all but those already merging
    into a layer above (which moves, so their pages follow)."""
    return [lid for lid in cmap.own_layers(volume) if cmap.layers[lid].migrates_to is None]


def _crowded(cmap: ClusterMap, volume: Volume, moved: Iterable[int]) -> str | None:
    """Why a new layer above each of ``moved`` (layers of ``volume``), in every stack that
    holds it, would stack too many layers in a clone of ``volume``; else ``None``."""
    below = set(moved)
    for name in _clones(cmap, volume):
        stack = cmap.volumes[name].layers
        if len(stack) + len(below.intersection(stack)) > MAX_STACK:
            return (
                f"clone {name} of volume {volume.name} would stack too many layers: "
                "flatten it or delete its snapshots first"
            )
    return None


def _migration_targets(
    cmap: ClusterMap, volume: Volume, cmd: MigrateVolume
) -> list[tuple[tuple[str, ...], ...]] | str:
    """The placement of each own layer's new layer (bottom first), or why there is none."""
    if cmd.servers:
        candidates = []
        for sid in cmd.servers:
            server = cmap.servers.get(sid)
            if server is None:
                return f"unknown server {sid}"
            if server.state is not ServerState.UP:
                return f"server {sid} is {server.state.value}, not up"
            if server.draining:
                return f"server {sid} is being drained"
            candidates.append(server)
    else:
        candidates = cmap.placeable()
    replicas = cmd.replicas or volume.replicas
    stripe = cmd.stripe or volume.stripe
    own = _movable(cmap, volume)
    used = {sid for lid in own for part in cmap.layers[lid].placement for sid in part}
    if (
        replicas == volume.replicas
        and stripe == volume.stripe
        and used == {s.id for s in candidates}
    ):
        return f"volume {volume.name} already lies on exactly those servers"
    load = cmap.copies_per_server()
    out = []
    for _ in own:
        try:
            placement = place(candidates, stripe, replicas, load)
        except PlacementError as exc:
            return f"volume {volume.name}: {exc.message}"
        for part in placement:
            for sid in part:
                load[sid] = load.get(sid, 0) + 1
        out.append(placement)
    return out


def _check_layer_command(cmap: ClusterMap, cmd: LayerCommand) -> str | None:
    match cmd:
        case CreateSnapshot():
            volume = cmap.volumes.get(cmd.name)
            if volume is None:
                return f"unknown volume {cmd.name}"
            if volume.snapshot_layer(cmd.snapshot) is not None:
                return f"volume {cmd.name} already has a snapshot {cmd.snapshot}"
            if len(volume.layers) >= MAX_STACK:
                return (
                    f"volume {cmd.name} has {len(volume.layers)} layers, the most a volume "
                    "may have: delete snapshots first"
                )
            return None
        case DeleteSnapshot():
            found = _snapshot_of(cmap, cmd.name, cmd.snapshot)
            if isinstance(found, str):
                return found
            volume, lid = found
            users = [v.name for v in cmap.stacking(lid) if v.id != volume.id]
            if users:
                return (
                    f"snapshot {cmd.snapshot} of volume {cmd.name} is the origin of "
                    f"{', '.join(users)}: flatten (lamina volume flatten NAME) or delete "
                    "them first"
                )
            if volume.flattening and cmap.own_layers(volume)[0] == lid:
                return (
                    f"volume {cmd.name} is being flattened into snapshot {cmd.snapshot}'s "
                    "layer: delete it once the flatten is done"
                )
            return None
        case RollbackVolume():
            found = _snapshot_of(cmap, cmd.name, cmd.snapshot)
            if isinstance(found, str):
                return found
            volume, lid = found
            if volume.lock is not None:
                return (
                    f"volume {cmd.name} is attached by {describe_lock(volume.lock)}: "
                    "detach it first (a rollback changes the data under its writer)"
                )
            idx = volume.layers.index(lid)
            newer = [n for n, other, _ in volume.snapshots if volume.layers.index(other) > idx]
            if newer:
                return (
                    f"snapshot(s) {', '.join(newer)} of volume {cmd.name} are newer than "
                    f"{cmd.snapshot}: delete them first"
                )
            busy = _migrating(volume)
            if busy is not None:
                return busy
            merging = [x for x in volume.layers[idx + 1 :] if cmap.layers[x].migrates_to]
            if merging:
                return (
                    f"layer {merging[0]} of volume {cmd.name} is still being merged: "
                    "try again when it is done"
                )
            return None
        case CloneVolume():
            found = _snapshot_of(cmap, cmd.source, cmd.snapshot)
            if isinstance(found, str):
                return found
            source, lid = found
            if source.layers.index(lid) + 2 > MAX_STACK:
                return f"a clone of {cmd.source}@{cmd.snapshot} would stack too many layers"
            return _check_create(
                cmap,
                CreateVolume(cmd.name, source.size, source.replicas, source.stripe,
                             source.page_size),
            )  # fmt: skip
        case FlattenVolume() | FlattenDone():
            volume = cmap.volumes.get(cmd.name)
            if volume is None:
                return f"unknown volume {cmd.name}"
            if isinstance(cmd, FlattenDone):
                return None if volume.flattening else f"volume {cmd.name} is not being flattened"
            if len(cmap.own_layers(volume)) == len(volume.layers):
                return f"volume {cmd.name} shares no layer with another volume: nothing to flatten"
            if volume.flattening:
                return f"volume {cmd.name} is already being flattened"
            busy = _migrating(volume)
            if busy is not None:
                return busy
            lowest = cmap.own_layers(volume)[0]
            if cmap.layers[lowest].migrates_to is not None:
                return (
                    f"layer {lowest} of volume {cmd.name} is still being merged: "
                    "try again when it is done"
                )
            return None
        case MigrateVolume():
            volume = cmap.volumes.get(cmd.name)
            if volume is None:
                return f"unknown volume {cmd.name}"
            busy = _migrating(volume)
            if busy is not None:
                return busy
            if volume.flattening:
                return f"volume {cmd.name} is being flattened: migrate it once that is done"
            if len(volume.layers) + len(cmap.own_layers(volume)) > MAX_STACK:
                return f"volume {cmd.name} has too many layers to migrate: delete snapshots"
            crowded = _crowded(cmap, volume, _movable(cmap, volume))
            if crowded is not None:
                return crowded
            targets = _migration_targets(cmap, volume, cmd)
            return targets if isinstance(targets, str) else None
        case AbortMigration():
            volume = cmap.volumes.get(cmd.name)
            if volume is None:
                return f"unknown volume {cmd.name}"
            if not volume.migration:
                return f"volume {cmd.name} is not migrating"
            for _, placement in volume.migration:
                for part in placement:
                    for sid in part:
                        server = cmap.servers.get(sid)
                        if server is None:
                            return f"server {sid} of the old placement was removed: no way back"
                        if server.state is not ServerState.UP or server.draining:
                            why = "being drained" if server.draining else server.state.value
                            return (
                                f"server {sid} of the old placement is {why}: "
                                "the migration goes on (abort once it is up)"
                            )
            if len(volume.layers) + len(volume.migration) > MAX_STACK:
                return f"volume {cmd.name} has too many layers to abort its migration"
            back = [t for t, _ in volume.migration if cmap.layers[t].migrates_to is None]
            return _crowded(cmap, volume, back)
        case MigrationDone():
            layer = cmap.layers.get(cmd.layer)
            if layer is None:
                return f"unknown layer {cmd.layer}"
            if layer.migrates_to is None:
                return f"layer {cmd.layer} is not migrating"
            into = _sources_into(cmap, cmd.layer)
            if into:
                return (
                    f"layer {cmd.layer} still receives pages from layer(s) "
                    f"{', '.join(map(str, into))}"
                )
            return None
    assert_never(cmd)


def rebalance_plan(cmap: ClusterMap, under: Fraction = Fraction(3, 4)) -> list[MigrateVolume]:
    """Migrations that spread volumes onto the servers holding few copies (a new server):
    while some placeable server's fill (copies / capacity) is below ``under`` times the
    cluster's, the next volume (by name) that has no copy there and runs no migration or
    flatten is migrated over every placeable server (placement then favours the emptiest).
    Each migration is applied to a scratch map before the next is chosen, so the plan
    stops as soon as the fills are even enough.  Pure: the same map gives the same plan."""
    plan: list[MigrateVolume] = []
    scratch = cmap
    for _ in range(len(cmap.volumes)):
        servers = scratch.placeable()
        if len(servers) < 2:
            break
        copies = scratch.copies_per_server()
        total = sum(copies.get(s.id, 0) for s in servers)
        capacity = sum(s.capacity for s in servers)
        low = {
            s.id
            for s in servers
            if Fraction(copies.get(s.id, 0), s.capacity) < under * Fraction(total, capacity)
        }
        if not low:
            break
        targets = tuple(s.id for s in servers)
        after = None
        for name in sorted(scratch.volumes):
            volume = scratch.volumes[name]
            if volume.migration or volume.flattening:
                continue
            cmd = MigrateVolume(name, targets)
            used = {sid for lid in _movable(scratch, volume) for p in scratch.layers[lid].placement
                    for sid in p}  # fmt: skip
            if used & low or validate(scratch, cmd) is not None:
                continue
            moved = apply(scratch, cmd)
            gained = moved.copies_per_server()
            # only a move that puts copies on a low server (placement weighs capacity:
            # a small server may be "low" and still not the emptiest)
            if any(gained.get(sid, 0) > copies.get(sid, 0) for sid in low):
                plan.append(cmd)
                after = moved
                break
        if after is None:
            break
        scratch = after
    return plan


def _layer_of(volume: Volume, snapshot: str) -> int:
    lid = volume.snapshot_layer(snapshot)
    assert lid is not None, "validated"
    return lid


def _layer_change(
    cmap: ClusterMap, cmd: LayerCommand, epoch: int, nonce: int = 0
) -> tuple[ClusterMap, frozenset[int]]:
    """The map after ``cmd`` (valid) and the ids of the volumes whose stacks it changed
    (they are fenced at ``epoch``)."""
    replace = dataclasses.replace
    layers = dict(cmap.layers)
    volumes = dict(cmap.volumes)
    next_layer, next_volume = cmap.next_layer_id, cmap.next_volume_id
    touched: set[int] = set()

    def new_layer(volume_id: int, placement: tuple[tuple[str, ...], ...]) -> int:
        nonlocal next_layer
        lid, next_layer = next_layer, next_layer + 1
        layers[lid] = Layer(
            lid, volume_id, placement, LayerRole.LIVE, None, lineage=layer_lineage(nonce, lid)
        )
        return lid

    def insert_above(below: int, lid: int) -> None:
        for name in sorted(volumes):
            v = volumes[name]
            if below in v.layers:
                i = v.layers.index(below) + 1
                volumes[name] = replace(v, layers=(*v.layers[:i], lid, *v.layers[i:]))
                touched.add(v.id)

    def moved_snapshots(v: Volume, renames: Mapping[int, int]) -> tuple[tuple[str, int, int], ...]:
        return tuple((n, renames.get(lid, lid), t) for n, lid, t in v.snapshots)

    match cmd:
        case CreateSnapshot():
            v = volumes[cmd.name]
            top = v.layers[-1]
            lid = new_layer(v.id, layers[top].placement)
            snaps = (*v.snapshots, (cmd.snapshot, top, cmd.since))
            # during a migration the new top is on the new placement: an abort moves it
            # back to where the frozen top came from
            back = [(lid, old) for t, old in v.migration if t == top]
            volumes[v.name] = replace(
                v, layers=(*v.layers, lid), snapshots=snaps, migration=(*v.migration, *back)
            )
            touched.add(v.id)
        case DeleteSnapshot():
            v = volumes[cmd.name]
            lid = _layer_of(v, cmd.snapshot)
            upper = v.layers[v.layers.index(lid) + 1]
            layers[lid] = replace(layers[lid], migrates_to=upper)
            snaps = tuple(s for s in v.snapshots if s[0] != cmd.snapshot)
            volumes[v.name] = replace(v, snapshots=snaps)
            touched.add(v.id)
        case RollbackVolume():
            v = volumes[cmd.name]
            lid = _layer_of(v, cmd.snapshot)
            idx = v.layers.index(lid)
            placement = layers[v.layers[-1]].placement
            for dropped in v.layers[idx + 1 :]:
                del layers[dropped]
            top = new_layer(v.id, placement)
            volumes[v.name] = replace(v, layers=(*v.layers[: idx + 1], top))
            touched.add(v.id)
        case CloneVolume():
            src = volumes[cmd.source]
            lid = _layer_of(src, cmd.snapshot)
            vid, next_volume = next_volume, next_volume + 1
            placement = place(cmap.placeable(), src.stripe, src.replicas, cmap.copies_per_server())
            top = new_layer(vid, placement)
            stack = (*src.layers[: src.layers.index(lid) + 1], top)
            volumes[cmd.name] = Volume(
                cmd.name, vid, src.size, src.page_size, src.replicas, src.stripe, stack, epoch,
                origin=f"{src.name}@{cmd.snapshot}",
            )  # fmt: skip
            touched.add(vid)
        case FlattenVolume():
            volumes[cmd.name] = replace(volumes[cmd.name], flattening=True)
            touched.add(volumes[cmd.name].id)
        case FlattenDone():
            v = volumes[cmd.name]
            volumes[v.name] = replace(v, layers=cmap.own_layers(v), origin="", flattening=False)
            touched.add(v.id)
        case MigrateVolume():
            v = volumes[cmd.name]
            targets = _migration_targets(cmap, v, cmd)
            assert not isinstance(targets, str)
            renames: dict[int, int] = {}
            for source, placement in zip(_movable(cmap, v), targets, strict=True):
                renames[source] = new_layer(v.id, placement)
                layers[source] = replace(layers[source], migrates_to=renames[source])
                insert_above(source, renames[source])
            v = volumes[v.name]
            volumes[v.name] = replace(
                v,
                replicas=cmd.replicas or v.replicas,
                stripe=cmd.stripe or v.stripe,
                snapshots=moved_snapshots(v, renames),
                migration=tuple((t, layers[s].placement) for s, t in renames.items()),
            )
            touched.add(v.id)
        case AbortMigration():
            v = volumes[cmd.name]
            renames = {}
            for target, placement in v.migration:
                if layers[target].migrates_to is not None:
                    continue  # merging into a layer above (a deleted snapshot's)
                renames[target] = new_layer(v.id, placement)
                layers[target] = replace(layers[target], migrates_to=renames[target])
                insert_above(target, renames[target])
            v = volumes[v.name]
            home = v.migration[0][1]
            volumes[v.name] = replace(
                v,
                replicas=len(home[0]),
                stripe=len(home),
                snapshots=moved_snapshots(v, renames),
                migration=tuple((renames[t], layers[t].placement) for t in renames),
            )
            touched.add(v.id)
        case MigrationDone():
            del layers[cmd.layer]
            for name in sorted(volumes):
                v = volumes[name]
                if cmd.layer in v.layers:
                    stack = tuple(x for x in v.layers if x != cmd.layer)
                    # the migration is over once none of its layers receives pages; a
                    # target retired early (a deleted snapshot's, merged up) leaves it
                    moving_to = {t for t, _ in v.migration}
                    running = any(x.migrates_to in moving_to for x in layers.values())
                    left = tuple(m for m in v.migration if m[0] != cmd.layer) if running else ()
                    volumes[name] = replace(v, layers=stack, migration=left)
                    touched.add(v.id)
        case _:
            assert_never(cmd)
    for v in volumes.values():
        if v.id in touched:
            volumes[v.name] = replace(v, fence_epoch=epoch)
    _set_roles(layers, volumes)
    out = replace(
        cmap,
        epoch=epoch,
        volumes=_frozen(volumes),
        layers=_frozen(layers),
        next_layer_id=next_layer,
        next_volume_id=next_volume,
    )
    return out, frozenset(touched)


def _set_roles(layers: dict[int, Layer], volumes: Mapping[str, Volume]) -> None:
    """Give every layer the role its place says: a migration source; the top of its
    owner (live); a layer others migrate into; else a snapshot layer."""
    tops = {v.layers[-1] for v in volumes.values()}
    targets = {layer.migrates_to for layer in layers.values()}
    for lid, layer in layers.items():
        if layer.migrates_to is not None:
            role = LayerRole.MIGRATION_SOURCE
        elif lid in tops:
            role = LayerRole.LIVE
        elif lid in targets:
            role = LayerRole.MIGRATION_TARGET
        else:
            role = LayerRole.SNAPSHOT
        if role is not layer.role:
            layers[lid] = dataclasses.replace(layer, role=role)


# --- what a command affects ------------------------------------------------------------


def affected_volumes(cmap: ClusterMap, cmd: Command) -> frozenset[int]:
    """Ids of the volumes ``cmd`` changes when applied to ``cmap`` (the map *before* it);
    a rejected command affects nothing.  All but a deleted volume get a new fence epoch."""
    if validate(cmap, cmd) is not None:
        return frozenset()
    return _affected(cmap, cmd)


def _affected(cmap: ClusterMap, cmd: Command) -> frozenset[int]:
    match cmd:
        case AddServer() | DrainServer() | ReclaimDone() | Publish():
            return frozenset()
        case RemoveServer() | SetServerState() | Rereplicate():
            return frozenset(layer.volume_id for layer in cmap.layers_on(cmd.id))
        case ServerStarted():
            server = cmap.servers[cmd.id]
            if started_state(server, cmd.incarnation) is server.state:
                return frozenset()  # only recorded
            return frozenset(layer.volume_id for layer in cmap.layers_on(cmd.id))
        case FillDone():
            return frozenset({cmap.layers[cmd.layer].volume_id})
        case CreateVolume():
            return frozenset({cmap.next_volume_id})
        case ResizeVolume() | DeleteVolume() | AcquireLock() | ReleaseLock():
            return frozenset({cmap.volumes[cmd.name].id})
        case (
            CreateSnapshot()
            | DeleteSnapshot()
            | RollbackVolume()
            | CloneVolume()
            | FlattenVolume()
            | FlattenDone()
            | MigrateVolume()
            | AbortMigration()
            | MigrationDone()
        ):
            return _layer_change(cmap, cmd, cmap.epoch + 1)[1]
    assert_never(cmd)


def holders(cmap: ClusterMap, volume_ids: Iterable[int]) -> set[str]:
    """The servers that hold, or may still hold, pages of a layer of these volumes: the
    servers of its placement and those it retired."""
    ids = set(volume_ids)
    servers: set[str] = set()
    for layer in cmap.layers.values():
        if layer.volume_id in ids:
            for part in layer.placement:
                servers.update(part)
            servers.update(layer.retired)
    return servers


def affected_servers(cmap: ClusterMap, cmd: Command) -> set[str]:
    """The :func:`holders` of the volumes ``cmd`` affects, before or after it applies to
    ``cmap`` (the map before it): the servers that must know the new fence before the
    new epoch is published.  A rejected command affects nothing."""
    volume_ids = affected_volumes(cmap, cmd)
    if not volume_ids:
        return set()
    return holders(cmap, volume_ids) | holders(apply(cmap, cmd), volume_ids)


def fences(cmap: ClusterMap) -> list[tuple[int, int]]:
    """(volume id, fence epoch) of every volume, by volume id (SET_EPOCH carries them)."""
    return sorted((v.id, v.fence_epoch) for v in cmap.volumes.values())


# --- commands as bytes -----------------------------------------------------------------


def encode_command(cmd: Command) -> bytes:
    """``cmd`` as msgpack: ``[COMMAND_FORMAT, tag, field, ...]`` in declaration order."""
    if type(cmd) not in COMMAND_TYPES:
        raise BadRequest(f"not a command: {type(cmd).__name__}")
    values = [getattr(cmd, f.name) for f in dataclasses.fields(cmd)]
    plain = [v.value if isinstance(v, Enum) else v for v in values]
    return msgpack.packb([COMMAND_FORMAT, cmd.TAG, *plain], use_bin_type=True)


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    """The command ``encode_command`` made; raises ProtocolError on anything else."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"a command is bytes, not {type(data).__name__}")
    if len(data) > MAX_COMMAND_BYTES:
        raise ProtocolError(f"command of {len(data)} bytes exceeds {MAX_COMMAND_BYTES}")
    try:
        values = msgpack.unpackb(data, use_list=False, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise ProtocolError(f"undecodable command: {exc.__class__.__name__}") from None
    if type(values) is not tuple or len(values) < 2:
        raise ProtocolError("a command is a msgpack array [format, tag, fields...]")
    version, tag, *args = values
    if type(version) is not int or version != COMMAND_FORMAT:
        raise ProtocolError(f"unsupported command format {_show(version)}")
    cls = _BY_TAG.get(tag) if type(tag) is str else None
    if cls is None:
        raise ProtocolError(f"unknown command {_show(tag)}")
    fields = dataclasses.fields(cls)
    if len(args) != len(fields):
        raise ProtocolError(f"{cls.__name__} has {len(fields)} fields, got {len(args)}")
    for i, f in enumerate(fields):
        enum = f.metadata.get("enum")
        if enum is not None:
            try:
                args[i] = enum(args[i])
            except (TypeError, ValueError):
                raise ProtocolError(f"bad {f.name} {_show(args[i])}") from None
    try:
        return cls(*args)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"bad {cls.__name__}: {exc}") from None


# --- the map as a dict -------------------------------------------------------------------


def map_to_dict(cmap: ClusterMap) -> dict[str, Any]:
    """The map as JSON-ready plain data in a stable key order (entries sorted by key)."""
    return {
        "format": MAP_FORMAT,
        "epoch": cmap.epoch,
        "published_epoch": cmap.published_epoch,
        "next_volume_id": cmap.next_volume_id,
        "next_layer_id": cmap.next_layer_id,
        "servers": {
            sid: {
                "addr": s.addr,
                "state": s.state.value,
                "capacity": s.capacity,
                "zone": s.zone,
                "draining": s.draining,
                "incarnation": s.incarnation,
                "up_until": s.up_until,
            }
            for sid, s in sorted(cmap.servers.items())
        },
        "volumes": {
            name: {
                "id": v.id,
                "size": v.size,
                "page_size": v.page_size,
                "replicas": v.replicas,
                "stripe": v.stripe,
                "layers": list(v.layers),
                "fence_epoch": v.fence_epoch,
                "lock": lock_to_dict(v.lock),
                "snapshots": [{"name": n, "layer": lid, "since": t} for n, lid, t in v.snapshots],
                "origin": v.origin,
                "flattening": v.flattening,
                "migration": [
                    {"layer": lid, "from": [list(part) for part in placement]}
                    for lid, placement in v.migration
                ],
            }
            for name, v in sorted(cmap.volumes.items())
        },
        "layers": {
            str(lid): {
                "volume_id": layer.volume_id,
                "placement": [list(part) for part in layer.placement],
                "role": layer.role.value,
                "migrates_to": layer.migrates_to,
                "filling": [list(f) for f in layer.filling],
                "retired": list(layer.retired),
                "lineage": layer.lineage,
            }
            for lid, layer in sorted(cmap.layers.items())
        },
    }


def lock_to_dict(lock: Lock | None) -> dict[str, Any] | None:
    """A lock as plain data (``None`` stays ``None``)."""
    if lock is None:
        return None
    return {"session": lock.session, "host": lock.host, "pid": lock.pid, "since": lock.since}


_MAP_KEYS = (
    "format",
    "epoch",
    "published_epoch",
    "next_volume_id",
    "next_layer_id",
    "servers",
    "volumes",
    "layers",
)
_SERVER_KEYS = ("addr", "state", "capacity", "zone", "draining", "incarnation", "up_until")
_SERVER_OPTIONAL = ("draining", "incarnation", "up_until")
_VOLUME_KEYS = (
    "id", "size", "page_size", "replicas", "stripe", "layers", "fence_epoch", "lock",
    "snapshots", "origin", "flattening", "migration",
)  # fmt: skip
#: keys a map saved before the key existed may lack (their absence means None)
_VOLUME_OPTIONAL = ("lock", "snapshots", "origin", "flattening", "migration")
_SNAPSHOT_KEYS = ("name", "layer", "since")
_MIGRATION_KEYS = ("layer", "from")
_LOCK_KEYS = ("session", "host", "pid", "since")
_LAYER_KEYS = ("volume_id", "placement", "role", "migrates_to", "filling", "retired", "lineage")
_LAYER_OPTIONAL = ("filling", "retired", "lineage")


def _record(
    v: Any, what: str, keys: Sequence[str], optional: Sequence[str] = ()
) -> Mapping[str, Any]:
    """``v`` if it is an object with exactly ``keys``, those in ``optional`` may be
    missing (they are then ``None``)."""
    if not isinstance(v, Mapping):
        raise ProtocolError(f"{what} must be an object, not {_show(v)}")
    record: Mapping[str, Any] = v
    lacking = [k for k in optional if k not in record]
    if lacking:
        record = {**record, **dict.fromkeys(lacking)}
    have = set(record)
    if have != set(keys):
        missing = sorted(set(keys) - have)
        extra = sorted(repr(k) for k in have - set(keys))
        raise ProtocolError(f"{what}: missing keys {missing}, unexpected keys {extra}")
    return record


def _list(v: Any, what: str, max_len: int) -> Sequence[Any]:
    if type(v) not in (list, tuple) or len(v) > max_len:
        raise ProtocolError(f"{what} must be a list of at most {max_len} items, not {_show(v)}")
    seq: Sequence[Any] = v
    return seq


def _int(v: Any, what: str, lo: int = 0) -> int:
    check_int(what, v, lo)
    value: int = v
    return value


def _enum(v: Any, what: str, enum: type[StrEnum]) -> Any:
    if type(v) is not str:
        raise ProtocolError(f"{what} must be a string, not {_show(v)}")
    try:
        return enum(v)
    except ValueError:
        raise ProtocolError(f"unknown {what} {_show(v)}") from None


def map_from_dict(data: Mapping[str, Any]) -> ClusterMap:
    """The map ``map_to_dict`` made; raises ProtocolError on anything malformed or
    inconsistent (see :func:`check_map`)."""
    d = _record(data, "cluster map", _MAP_KEYS)
    if d["format"] != MAP_FORMAT or type(d["format"]) is not int:
        raise ProtocolError(f"unsupported map format {_show(d['format'])}")
    servers: dict[str, Server] = {}
    raw_servers = d["servers"]
    if not isinstance(raw_servers, Mapping):
        raise ProtocolError("servers must be an object")
    for sid, raw in raw_servers.items():
        check_id("server id", sid)
        r = _record(raw, f"server {sid}", _SERVER_KEYS, _SERVER_OPTIONAL)
        state = _enum(r["state"], f"state of server {sid}", ServerState)
        servers[sid] = Server(
            sid,
            r["addr"],
            state,
            r["capacity"],
            r["zone"],
            bool(r["draining"]),
            0 if r["incarnation"] is None else _int(r["incarnation"], f"incarnation of {sid}"),
            0 if r["up_until"] is None else _int(r["up_until"], f"up_until of {sid}"),
        )
    volumes: dict[str, Volume] = {}
    raw_volumes = d["volumes"]
    if not isinstance(raw_volumes, Mapping):
        raise ProtocolError("volumes must be an object")
    for name, raw in raw_volumes.items():
        check_id("volume name", name)
        r = _record(raw, f"volume {name}", _VOLUME_KEYS, _VOLUME_OPTIONAL)
        stack = tuple(
            _int(lid, f"layer of volume {name}", 1)
            for lid in _list(r["layers"], f"layers of volume {name}", 1 << 16)
        )
        lock = None
        if r["lock"] is not None:
            k = _record(r["lock"], f"lock of volume {name}", _LOCK_KEYS)
            lock = Lock(k["session"], k["host"], k["pid"], k["since"])
        snapshots = []
        for raw_snap in _list(r["snapshots"] or [], f"snapshots of volume {name}", MAX_STACK):
            k = _record(raw_snap, f"snapshot of volume {name}", _SNAPSHOT_KEYS)
            snapshots.append((k["name"], k["layer"], k["since"]))
        migration = []
        for raw_move in _list(r["migration"] or [], f"migration of volume {name}", MAX_STACK):
            k = _record(raw_move, f"migration of volume {name}", _MIGRATION_KEYS)
            parts = _list(k["from"], f"migration of volume {name}", MAX_STRIPE)
            placement = tuple(
                tuple(_list(part, f"migration of volume {name}", MAX_REPLICAS)) for part in parts
            )
            migration.append((k["layer"], placement))
        volumes[name] = Volume(
            name, r["id"], r["size"], r["page_size"], r["replicas"], r["stripe"], stack,
            r["fence_epoch"], lock, tuple(snapshots), r["origin"] or "", bool(r["flattening"]),
            tuple(migration),
        )  # fmt: skip
    layers: dict[int, Layer] = {}
    raw_layers = d["layers"]
    if not isinstance(raw_layers, Mapping):
        raise ProtocolError("layers must be an object")
    for key, raw in raw_layers.items():
        if type(key) is not str or not _LAYER_KEY_RE.fullmatch(key):
            raise ProtocolError(f"layer id {_show(key)} is not a positive decimal integer")
        lid = int(key)
        r = _record(raw, f"layer {lid}", _LAYER_KEYS, _LAYER_OPTIONAL)
        parts = _list(r["placement"], f"placement of layer {lid}", MAX_STRIPE)
        placement = tuple(
            tuple(_list(part, f"partition of layer {lid}", MAX_REPLICAS)) for part in parts
        )
        role = _enum(r["role"], f"role of layer {lid}", LayerRole)
        raw_filling = _list(r["filling"] or [], f"filling copies of layer {lid}", 1 << 10)
        filling = tuple(tuple(_list(f, f"filling copy of layer {lid}", 2)) for f in raw_filling)
        retired = tuple(_list(r["retired"] or [], f"retired copies of layer {lid}", 1 << 10))
        lineage = 0 if r["lineage"] is None else _int(r["lineage"], f"lineage of layer {lid}")
        layers[lid] = Layer(
            lid, r["volume_id"], placement, role, r["migrates_to"],
            filling, retired, lineage,  # checked by check_map below
        )  # fmt: skip
    cmap = ClusterMap(
        _int(d["epoch"], "epoch"),
        _int(d["published_epoch"], "published epoch"),
        _frozen(servers),
        _frozen(volumes),
        _frozen(layers),
        _int(d["next_volume_id"], "next volume id", 1),
        _int(d["next_layer_id"], "next layer id", 1),
    )
    check_map(cmap)
    return cmap


def check_map(cmap: ClusterMap) -> None:
    """Raise ProtocolError unless every entry of ``cmap`` is well formed and every
    reference in it holds (what ``apply`` keeps true and a loaded map must satisfy)."""
    try:
        _check_map(cmap)
    except BadRequest as exc:
        raise ProtocolError(f"inconsistent map: {exc.message}") from None


def _check_map(cmap: ClusterMap) -> None:
    def fail(message: str) -> NoReturn:
        raise BadRequest(message)

    check_int("epoch", cmap.epoch, 0)
    check_int("published epoch", cmap.published_epoch, 0, cmap.epoch)
    check_int("next volume id", cmap.next_volume_id, 1)
    check_int("next layer id", cmap.next_layer_id, 1)
    for sid, s in cmap.servers.items():
        check_id("server id", sid)
        if s.id != sid:
            fail(f"server {sid} is filed as {s.id}")
        check_addr(s.addr)
        check_enum("state", s.state, ServerState)
        check_int("capacity", s.capacity, 1)
        check_zone(s.zone)
    owner: dict[int, str] = {}  # layer id -> volume name
    volume_ids: dict[int, str] = {}
    for name, v in cmap.volumes.items():
        if v.name != name:
            fail(f"volume {name} is filed as {v.name}")
        check_int(f"id of volume {name}", v.id, 1)
        if v.id >= cmap.next_volume_id:
            fail(f"volume {name} has id {v.id}, not below the next volume id")
        if v.id in volume_ids:
            fail(f"volumes {volume_ids[v.id]} and {name} share id {v.id}")
        volume_ids[v.id] = name
        check_size(v.size)
        check_page_size(v.page_size)
        check_int("replicas", v.replicas, 1, MAX_REPLICAS)
        check_int("stripe", v.stripe, 1, MAX_STRIPE)
        check_int(f"fence epoch of volume {name}", v.fence_epoch, 0, cmap.epoch)
        if v.lock is not None:
            if type(v.lock) is not Lock:
                fail(f"volume {name} has a lock of {_show(v.lock)}")
            check_lock_fields(v.lock.session, v.lock.host, v.lock.pid, v.lock.since)
        if type(v.layers) is not tuple or not v.layers:
            fail(f"volume {name} has no layer stack")
        if len(v.layers) > MAX_STACK:
            fail(f"volume {name} stacks {len(v.layers)} layers")
        if len(set(v.layers)) != len(v.layers):
            fail(f"volume {name} stacks a layer twice")
        for lid in v.layers:
            layer = cmap.layers.get(lid) if type(lid) is int else None
            if layer is None:
                fail(f"volume {name} stacks unknown layer {_show(lid)}")
            elif layer.volume_id == v.id:
                owner[lid] = name
        own = [lid for lid in v.layers if lid in owner and owner[lid] == name]
        # a clone's stack is its origin's shared part, then its own layers
        if not own or tuple(own) != v.layers[len(v.layers) - len(own) :]:
            fail(f"volume {name}'s own layers are not the top of its stack")
        if (len(own) < len(v.layers)) != bool(v.origin) and not v.flattening:
            fail(f"volume {name} shares layers but names no origin, or the reverse")
        if type(v.origin) is not str or type(v.flattening) is not bool:
            fail(f"volume {name} has a bad origin or flattening flag")
        names = [snap[0] for snap in v.snapshots]
        if len(set(names)) != len(names):
            fail(f"volume {name} has two snapshots of one name")
        for snap in v.snapshots:
            if type(snap) is not tuple or len(snap) != 3 or snap[1] not in own:
                fail(f"snapshot {_show(snap)} of volume {name} is not one of its own layers")
            check_id("snapshot name", snap[0])
            check_int("snapshot time", snap[2], 0, MAX_SINCE_MS)
        for move in v.migration:
            if type(move) is not tuple or len(move) != 2 or move[0] not in own:
                fail(f"migration {_show(move)} of volume {name} is not to one of its layers")
    for lid, layer in cmap.layers.items():
        if layer.id != lid:
            fail(f"layer {lid} is filed as {layer.id}")
        check_int("layer id", lid, 1)
        if lid >= cmap.next_layer_id:
            fail(f"layer {lid} is not below the next layer id {cmap.next_layer_id}")
        if lid not in owner:
            fail(f"layer {lid} is not in its volume's stack")
        check_enum(f"role of layer {lid}", layer.role, LayerRole)
        if not 1 <= len(layer.placement) <= MAX_STRIPE:
            fail(f"layer {lid} has {len(layer.placement)} partitions")
        for part in layer.placement:
            if not 1 <= len(part) <= MAX_REPLICAS:
                fail(f"layer {lid} has a partition of {_show(part)}")
            for sid in part:
                if type(sid) is not str or sid not in cmap.servers:
                    fail(f"layer {lid} places a copy on unknown server {_show(sid)}")
            if len(set(part)) != len(part):
                fail(f"layer {lid} has two copies of a partition on one server")
        for entry in layer.filling:
            if (
                type(entry) is not tuple
                or len(entry) != 2
                or type(entry[0]) is not int
                or not 0 <= entry[0] < len(layer.placement)
                or entry[1] not in layer.placement[entry[0]]
            ):
                fail(f"layer {lid} fills {_show(entry)}, not a copy of one of its partitions")
        placed = {sid for part in layer.placement for sid in part}
        # a retired server may have been removed since (its id may come back)
        if any(
            type(sid) is not str or not _ID_RE.fullmatch(sid) or sid in placed
            for sid in layer.retired
        ) or list(layer.retired) != sorted(set(layer.retired)):
            fail(f"layer {lid} retires {_show(layer.retired)}, not server ids off its placement")
        target = layer.migrates_to
        if target is not None and (
            type(target) is not int
            or target == lid
            or target not in cmap.layers
            or cmap.layers[target].volume_id != layer.volume_id
        ):
            fail(f"layer {lid} migrates to {_show(target)}, not another layer of its volume")

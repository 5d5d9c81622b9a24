"""Hypothesis strategies for the management cluster: servers, placements, commands, logs.

Server ids, volume names, addresses and zones come from small pools so that generated
logs collide often (a duplicate id or address, a command on an unknown or deleted
volume, an illegal state change, a publication out of range, a lock held by another
session).  A log is drawn command by command against the map it has built so far, so
most kinds of command apply often enough while a good share is still rejected:
``validate`` is exercised as much as ``apply``.  Layer commands (snapshots, clones,
flatten, migration) are mostly aimed at what the map holds: a snapshot the volume has, a
clone that shares layers, a migrating volume, a source layer nothing migrates into.
Every value drawn here passes the commands' field checks; tests of those checks build
bad values by hand.
"""

from __future__ import annotations

from hypothesis import strategies as st

from lamina.mgmt.clustermap import (
    MAX_REPLICAS,
    MAX_SINCE_MS,
    SIZE_ALIGN,
    TRANSITIONS,
    AbortMigration,
    AcquireLock,
    AddServer,
    CloneVolume,
    ClusterMap,
    Command,
    CreateSnapshot,
    CreateVolume,
    DeleteSnapshot,
    DeleteVolume,
    FillDone,
    FlattenDone,
    FlattenVolume,
    MigrateVolume,
    MigrationDone,
    Publish,
    ReclaimDone,
    ReleaseLock,
    RemoveServer,
    Rereplicate,
    ResizeVolume,
    RollbackVolume,
    Server,
    ServerStarted,
    ServerState,
    SetServerState,
    apply,
    empty_map,
    validate,
)

SERVER_IDS = tuple(f"s{i}" for i in range(1, 7))
VOLUME_NAMES = ("db", "logs", "vm-1")
#: names clones get besides VOLUME_NAMES (so that a clone rarely takes a name in use)
CLONE_NAMES = ("db-c", "vm-2")
SNAPSHOT_NAMES = ("nightly", "pre-upgrade", "t1")
ZONES = ("a", "b", "c")
HOSTS = ("10.0.0.1", "store-a", "[::1]")
SESSIONS = ("a1", "b2", "c3")
LOCK_HOSTS = ("web-1", "10.0.0.9", "db host")
PAGE_SIZES = tuple(1 << shift for shift in range(16, 25))  # 64 KiB .. 16 MiB
#: ids for placement inputs, deliberately not in sorted order
PLACEMENT_IDS = ("m", "c", "x", "a", "q", "b9", "b10", "z", "k-1", "k_2", "e", "p")

server_ids = st.sampled_from(SERVER_IDS)
volume_names = st.sampled_from(VOLUME_NAMES)
addrs = st.builds("{}:{}".format, st.sampled_from(HOSTS), st.integers(7000, 7003))
capacities = st.integers(1, 4)
sizes = st.integers(1, 512).map(lambda n: n * SIZE_ALIGN)
page_sizes = st.sampled_from(PAGE_SIZES)
states = st.sampled_from(ServerState)
sessions = st.sampled_from(SESSIONS)
lock_hosts = st.sampled_from(LOCK_HOSTS)
pids = st.integers(0, 1 << 22)
since = st.integers(0, MAX_SINCE_MS)
snapshot_names = st.sampled_from(SNAPSHOT_NAMES)
layer_ids = st.integers(1, 12)


def commands(zoned: bool) -> st.SearchStrategy[Command]:
    """Commands over the small pools; with ``zoned``, new servers get a zone or ``""``."""
    zones = st.sampled_from(("", *ZONES)) if zoned else st.just("")
    add = st.builds(AddServer, server_ids, addrs, capacities, zones)
    set_state = st.builds(SetServerState, server_ids, states)
    create = st.builds(
        CreateVolume,
        volume_names,
        sizes,
        replicas=st.integers(1, 4),
        stripe=st.integers(1, 6),
        page_size=page_sizes,
    )
    options: list[st.SearchStrategy[Command]] = [
        add,
        add,
        add,
        set_state,
        set_state,
        set_state,
        create,
        create,
        st.builds(RemoveServer, server_ids),
        st.builds(ServerStarted, server_ids, st.integers(1, 3)),
        st.builds(ResizeVolume, volume_names, sizes),
        st.builds(DeleteVolume, volume_names),
        st.builds(Publish, st.integers(0, 40)),
        st.builds(Publish, st.integers(0, 40)),
        st.builds(AcquireLock, volume_names, sessions, lock_hosts, pids, since, st.booleans()),
        st.builds(ReleaseLock, volume_names, sessions),
        st.builds(Rereplicate, server_ids),
        st.builds(FillDone, st.integers(1, 8), st.integers(0, 5), server_ids),
        st.builds(ReclaimDone, st.integers(1, 8), server_ids),
        st.builds(CreateSnapshot, volume_names, snapshot_names, since),
        st.builds(DeleteSnapshot, volume_names, snapshot_names),
        st.builds(RollbackVolume, volume_names, snapshot_names),
        st.builds(CloneVolume, volume_names, snapshot_names, volume_names),
        st.builds(FlattenVolume, volume_names),
        st.builds(FlattenDone, volume_names),
        st.builds(
            MigrateVolume,
            volume_names,
            st.lists(server_ids, max_size=4, unique=True).map(tuple),
            st.integers(0, 4),
            st.integers(0, 6),
        ),
        st.builds(AbortMigration, volume_names),
        st.builds(MigrationDone, layer_ids),
    ]
    return st.one_of(options)


any_commands = st.booleans().flatmap(commands)


#: one step of a log before it meets a map: (kind, a, b, c, d), see :func:`command_for`
Choice = tuple[int, int, int, int, int]
BASIC_KINDS = 18
#: kinds past the basic ones stand for layer commands (see :func:`layer_command_for`)
LAYER_KINDS = 14
KINDS = BASIC_KINDS + LAYER_KINDS
choices = st.tuples(st.integers(0, KINDS - 1), *[st.integers(0, 255)] * 4)


def _pick(pool: list[str], x: int) -> str:
    return pool[x % len(pool)]


def command_for(cmap: ClusterMap, zoned: bool, choice: Choice) -> Command:
    """The command ``choice`` stands for, aimed at ``cmap``.

    Ids, names, epochs and lock sessions are mostly ones ``cmap`` holds (so that state
    changes, resizes, deletes, publications and releases apply often enough), mixed with
    the rest of the pools.  Logs are drawn as plain integer tuples and turned into
    commands here, against the map the log has built so far: one cheap draw per log, and
    hypothesis shrinks the integers.
    """
    kind, a, b, c, d = choice
    known = sorted(cmap.servers)
    volumes = sorted(cmap.volumes)

    sid = _pick([*known, *known, *SERVER_IDS], a)
    name = _pick([*volumes, *volumes, *volumes, *VOLUME_NAMES], a)
    if kind in {0, 1}:
        zone = ("", *ZONES)[d // 4 % 4] if zoned else ""
        addr = f"{HOSTS[b % len(HOSTS)]}:{7000 + c % 4}"
        return AddServer(SERVER_IDS[a % len(SERVER_IDS)], addr, 1 + d % 4, zone)
    if kind == 2 and c % 3 == 0:  # a lease request with this incarnation
        return ServerStarted(sid, 1 + d % 3)
    if kind == 2 or (kind == 3 and not known):
        return SetServerState(sid, list(ServerState)[b % 4])
    if kind == 3:
        here = cmap.servers[_pick(known, a)]
        targets = sorted(to for (frm, to) in TRANSITIONS if frm == here.state)
        return SetServerState(here.id, targets[b % len(targets)])
    if kind in {4, 5, 11}:
        up = sum(s.state == "up" for s in cmap.servers.values())
        return CreateVolume(
            name,
            (1 + b % 512) * SIZE_ALIGN,
            replicas=1 + c % min(up + 1, MAX_REPLICAS),
            stripe=1 + d % 6,
            page_size=PAGE_SIZES[d // 6 % len(PAGE_SIZES)],
        )
    if kind == 6:
        return RemoveServer(sid)
    if kind == 7:
        volume = cmap.volumes.get(name)
        base = volume.size if volume is not None else SIZE_ALIGN
        return ResizeVolume(name, max(SIZE_ALIGN, base + (b % 67 - 2) * SIZE_ALIGN))
    if kind == 8:
        return DeleteVolume(name)
    if kind == 9:
        low = max(0, cmap.published_epoch - 1)
        return Publish(low + a % (cmap.epoch + 2 - low))
    if kind == 10:
        return Publish(a % 41)
    if kind == 16:  # mostly aimed at a down server
        down = [k for k in known if cmap.servers[k].state == "down"]
        return Rereplicate(_pick([*down, *down, *down, *known, *SERVER_IDS], b))
    if kind == 17:
        retired = [(lid, s) for lid in sorted(cmap.layers) for s in cmap.layers[lid].retired]
        if retired and d % 2:  # half the time, a retired copy reclaimed
            lid, server = retired[c % len(retired)]
            return ReclaimDone(lid, server)
        entries = [(lid, p, s) for lid in sorted(cmap.layers) for p, s in cmap.layers[lid].filling]
        if entries and b % 4:
            lid, part, server = entries[c % len(entries)]
            return FillDone(lid, part, server)
        return FillDone(1 + c % 8, d % 4, sid)
    if kind >= BASIC_KINDS:
        if not volumes and d % 4:  # a layer command needs a volume: make one first
            return command_for(cmap, zoned, (4, a, b, c, d))
        return layer_command_for(cmap, kind - BASIC_KINDS, choice)
    if kind in {13, 15}:  # mostly aimed at a locked volume
        locked = [n for n in volumes if cmap.volumes[n].lock is not None]
        name = _pick([*locked, *locked, *locked, *volumes, *VOLUME_NAMES], a)
    volume = cmap.volumes.get(name)
    holder = [volume.lock.session] * 2 if volume is not None and volume.lock else []
    session = _pick([*holder, *SESSIONS], b)
    if kind in {12, 14}:
        host = LOCK_HOSTS[c % len(LOCK_HOSTS)]
        return AcquireLock(name, session, host, c * 7, 1_800_000_000_000 + d, takeover=d % 4 == 0)
    if kind in {13, 15}:
        return ReleaseLock(name, session)
    raise AssertionError(f"no command kind {kind}")


def _aimed(x: int, wanted: list[str], others: list[str]) -> str:
    """Mostly (three times in four) one of ``wanted`` if any, else one of ``others``."""
    if wanted and x % 4:
        return _pick(wanted, x // 4)
    return _pick(others, x // 4)


def layer_command_for(cmap: ClusterMap, kind: int, choice: Choice) -> Command:
    """The layer command ``kind`` (0..LAYER_KINDS-1) of ``choice`` stands for, aimed at
    ``cmap``: snapshot names the volume has (or, to take one, a name it lacks), clones
    of a snapshot that exists, flatten of a clone, abort of a running migration, and
    MigrationDone mostly of a source nothing migrates into (the worker proposes those)."""
    _, a, b, c, d = choice
    volumes = sorted(cmap.volumes)
    with_snaps = [n for n in volumes if cmap.volumes[n].snapshots]
    anyone = [*volumes, *VOLUME_NAMES]
    name = _aimed(a, with_snaps if kind in {3, 4, 5, 6} else volumes, anyone)
    volume = cmap.volumes.get(name)
    snaps = [snap for snap, _, _ in volume.snapshots] if volume is not None else []
    snapshot = _aimed(b, snaps, list(SNAPSHOT_NAMES))
    if kind in {0, 1, 2}:
        pool = (*SNAPSHOT_NAMES, *(f"t{i}" for i in range(2, 9)))
        fresh = [n for n in pool if n not in snaps] or list(pool)
        taken = snapshot if d % 8 == 0 else _pick(fresh, c)
        return CreateSnapshot(name, taken, 1_800_000_000_000 + d)
    if kind == 3:
        return DeleteSnapshot(name, snapshot)
    if kind == 4:
        return RollbackVolume(name, snapshot)
    if kind in {5, 6}:
        return CloneVolume(name, snapshot, _pick([*CLONE_NAMES, *VOLUME_NAMES], c))
    if kind == 7:
        clones = [n for n in volumes if cmap.volumes[n].origin and not cmap.volumes[n].flattening]
        return FlattenVolume(_aimed(a, clones, anyone))
    if kind == 8:
        flattening = [n for n in volumes if cmap.volumes[n].flattening]
        return FlattenDone(_aimed(a, flattening, anyone))
    if kind in {9, 10}:
        known = sorted(cmap.servers)
        ids = known if d % 5 and known else list(SERVER_IDS)
        servers = tuple(sid for i, sid in enumerate(ids) if c >> i & 1) if d % 3 else ()
        replicas = 0 if d % 4 else 1 + b % 3
        stripe = 0 if d // 4 % 4 else 1 + b // 3 % 4
        return MigrateVolume(name, servers, replicas, stripe)
    if kind == 11:
        migrating = [n for n in volumes if cmap.volumes[n].migration]
        return AbortMigration(_aimed(a, migrating, anyone))
    if kind in {12, 13}:
        sources = [lid for lid in sorted(cmap.layers) if cmap.layers[lid].migrates_to is not None]
        targets = {cmap.layers[lid].migrates_to for lid in sources}
        ready = [lid for lid in sources if lid not in targets]
        if not sources or b % 4 == 0:
            sources = [*sorted(cmap.layers), *range(1, 13)]
        layers = [*ready, *ready, *ready, *sources]
        return MigrationDone(layers[c % len(layers)])
    raise AssertionError(f"no layer command kind {kind}")


@st.composite
def command_logs(draw: st.DrawFn, max_size: int = 30) -> list[Command]:
    """A log of commands, zoned or not as a whole, each aimed at the map the log so far
    builds (see :func:`command_for`); most logs start by adding a few servers, and a good
    share of every log is still rejected."""
    zoned = draw(st.booleans())
    first_servers = draw(st.integers(0, 4))
    size = draw(st.integers(0, max_size))
    steps = draw(st.lists(choices, min_size=size, max_size=size))
    cmap = empty_map()
    log: list[Command] = []
    for i, drawn in enumerate(steps):
        # the first servers get distinct ids and addresses
        choice = (0, i, i, i // len(HOSTS), drawn[4]) if i < first_servers else drawn
        cmd = command_for(cmap, zoned, choice)
        log.append(cmd)
        if validate(cmap, cmd) is None:
            cmap = apply(cmap, cmd)
    return log


@st.composite
def server_lists(
    draw: st.DrawFn,
    min_size: int = 0,
    max_size: int = 8,
    zones: tuple[str, ...] = ("",),
    capacity: st.SearchStrategy[int] = capacities,
) -> list[Server]:
    """Servers with distinct ids (in no particular order), each in one of ``zones``."""
    ids = draw(st.lists(st.sampled_from(PLACEMENT_IDS), min_size=min_size, max_size=max_size,
                        unique=True))  # fmt: skip
    return [
        Server(
            sid,
            f"10.0.0.{i}:7000",
            ServerState.UP,
            draw(capacity),
            draw(st.sampled_from(zones)),
        )
        for i, sid in enumerate(ids)
    ]


def zone_choices() -> st.SearchStrategy[tuple[str, ...]]:
    """The zones servers may be in: none at all, or a few (``""`` among them or not)."""
    return st.sampled_from([("",), ("a", "b"), ("a", "b", "c"), ("", "a", "b")])


def loads(servers: list[Server]) -> st.SearchStrategy[dict[str, int]]:
    """Copies each server already holds (some servers missing, meaning none)."""
    if not servers:
        return st.just({})
    return st.dictionaries(st.sampled_from([s.id for s in servers]), st.integers(0, 12))

"""Layers in the cluster map: snapshots, clones, flatten and migration (lamina.mgmt.clustermap).

The map only says which layers a volume stacks and which layer ``migrates_to`` which;
the properties here check that this is enough to keep data right.  :class:`Pages` is a
content model: for every layer the pages it holds (page -> the data written, a version
number in random runs).  A volume reads a page from the topmost layer of its stack that
holds it; a snapshot reads through the stack up to its layer.  On top of the map the
model simulates what the rest of the system does with pages (DESIGN sections 7 and 8):

- a write goes to the top layer, after a copy-up that tombstones the page in the layer
  it came from when that layer migrates into the top;
- the worker moves a page of a migration source up into its target if the target does
  not hold it, then drops it from the source; it copies the pages a flattening clone
  reads from shared layers (the topmost holder's) into the clone's lowest own layer
  where absent; it proposes ``MigrationDone`` for a source it found empty with nothing
  migrating into it, and ``FlattenDone`` once every shared page is copied.  Other
  commands, writes and page moves may come between what it found and its proposal.

:func:`simulate` plays a run (a random mix of commands, writes and worker steps, then
the worker until nothing is left to do) and records each step; every test checks one
property over the recorded steps, with its own expectations.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from lamina.mgmt import clustermap as cm
from lamina.mgmt.clustermap import (
    MAX_STACK,
    AbortMigration,
    CloneVolume,
    ClusterMap,
    Command,
    CreateSnapshot,
    CreateVolume,
    FlattenDone,
    MigrateVolume,
    MigrationDone,
    RollbackVolume,
    affected_servers,
    affected_volumes,
    apply,
    check_map,
    validate,
)
from tests.unit.mgmt_strategies import (
    SERVER_IDS,
    Choice,
    command_for,
    layer_command_for,
)

PAGES = 6
#: what a page holds: a version number (random runs) or a letter (the examples)
Data = int | str
Content = dict[int, Data]

RUNS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- the content model -------------------------------------------------------------------


def read(held: dict[int, dict[int, Data]], stack: Iterable[int]) -> Content:
    """Every page as the topmost layer of ``stack`` holding it has it."""
    out: Content = {}
    for lid in stack:  # bottom first: a higher holder overwrites
        out.update(held.get(lid, {}))
    return out


def servers_of(cmap: ClusterMap, layer_ids: Iterable[int]) -> set[str]:
    return {sid for lid in layer_ids for part in cmap.layers[lid].placement for sid in part}


@dataclass
class Pages:
    """A map and the pages its layers hold; commands go through validate and apply."""

    cmap: ClusterMap = field(default_factory=cm.empty_map)
    held: dict[int, dict[int, Data]] = field(default_factory=dict)

    def run(self, cmd: Command) -> str | None:
        reason = validate(self.cmap, cmd)
        if reason is None:
            self.cmap = apply(self.cmap, cmd)
            self.held = {lid: self.held.get(lid, {}) for lid in self.cmap.layers}
        return reason

    def ok(self, *cmds: Command) -> None:
        for cmd in cmds:
            reason = self.run(cmd)
            assert reason is None, (cmd, reason)

    def stack(self, name: str, snapshot: str | None = None) -> tuple[int, ...]:
        v = self.cmap.volumes[name]
        if snapshot is None:
            return v.layers
        lid = v.snapshot_layer(snapshot)
        assert lid is not None
        return v.layers[: v.layers.index(lid) + 1]

    def content(self, name: str, snapshot: str | None = None) -> Content:
        return read(self.held, self.stack(name, snapshot))

    def copy_up(self, name: str, page: int) -> None:
        """The driver's copy-up before a write: the top gets the page if it lacks it; the
        layer it came from loses it if it migrates into the top."""
        stack = self.stack(name)
        top = stack[-1]
        if page in self.held[top]:
            return
        for lid in reversed(stack):
            if page in self.held[lid]:
                self.held[top][page] = self.held[lid][page]
                if self.cmap.layers[lid].migrates_to == top:
                    del self.held[lid][page]
                return

    def write(self, name: str, page: int, data: Data) -> None:
        self.copy_up(name, page)
        self.held[self.stack(name)[-1]][page] = data

    def move(self, source: int, pages: Iterable[int] | None = None) -> None:
        """The worker moves ``pages`` (all) of migration source ``source`` up."""
        target = self.held.get(self.cmap.layers[source].migrates_to or 0)
        if target is None:
            return  # a map that lost the target (check_map says so): the pages stay
        for page in sorted(self.held[source]) if pages is None else pages:
            if page in self.held[source]:
                target.setdefault(page, self.held[source].pop(page))

    def shared(self, name: str) -> tuple[tuple[int, ...], int]:
        """The layers ``name`` shares with its origin, and its lowest own layer."""
        v = self.cmap.volumes[name]
        own = self.cmap.own_layers(v)
        return v.layers[: len(v.layers) - len(own)], own[0]

    def flatten(self, name: str, pages: Iterable[int] | None = None) -> None:
        """The worker copies shared pages (``pages``: all) into the lowest own layer."""
        shared, lowest = self.shared(name)
        found = read(self.held, shared)
        for page in sorted(found) if pages is None else pages:
            if page in found:
                self.held[lowest].setdefault(page, found[page])

    def flattened(self, name: str) -> bool:
        shared, lowest = self.shared(name)
        return set(read(self.held, shared)) <= set(self.held[lowest])

    def sources(self) -> list[int]:
        return [lid for lid in sorted(self.cmap.layers) if self.cmap.layers[lid].migrates_to]

    def retirable(self) -> list[int]:
        """Sources the worker would retire: empty, and nothing migrates into them."""
        into = {self.cmap.layers[lid].migrates_to for lid in self.sources()}
        return [lid for lid in self.sources() if not self.held[lid] and lid not in into]


# --- random runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    action: str
    cmd: Command | None
    reason: str | None
    before: ClusterMap = field(repr=False)
    after: ClusterMap = field(repr=False)
    #: volume id -> what it reads, after the step
    reads: dict[int, Content] = field(repr=False)
    #: (volume id, snapshot name) -> what the snapshot reads, after the step
    snaps: dict[tuple[int, str], Content] = field(repr=False)
    #: (volume id, page, data) of a write
    write: tuple[int, int, Data] | None = None
    #: a proposal of the worker: whether the model's source was empty when it applied
    source_empty: bool | None = None


@dataclass
class Run:
    steps: list[Step] = field(repr=False)
    #: the worker ended with no source and no flatten left
    settled: bool


ACTIONS = (
    *["write"] * 4,
    "copy_up",
    *["move"] * 3,
    "flatten",
    *["retire"] * 2,
    *["layer"] * 7,
    *["basic"] * 2,
)
#: layer command kinds of mgmt_strategies a run draws (FlattenDone and MigrationDone
#: come from the simulated worker only)
RUN_LAYER_KINDS = (0, 1, 3, 4, 5, 6, 7, 7, 9, 10, 11)
#: basic kinds: add server, set state, create, resize, delete, lock, unlock, rereplicate
RUN_BASIC_KINDS = (0, 3, 4, 7, 8, 12, 13, 16)

action_choices = st.tuples(st.integers(0, len(ACTIONS) - 1), *[st.integers(0, 255)] * 4)


@dataclass(frozen=True)
class Setup:
    servers: int
    zoned: bool
    volumes: tuple[tuple[int, int], ...]  # (replicas, stripe) of db, logs


setups = st.builds(
    Setup,
    st.integers(2, 5),
    st.booleans(),
    st.lists(st.tuples(st.integers(1, 2), st.integers(1, 3)), min_size=1, max_size=2).map(tuple),
)


class Simulation:
    """Plays a run against :class:`Pages` and records every step."""

    def __init__(self, setup: Setup) -> None:
        self.pages = Pages()
        self.zoned = setup.zoned
        self.steps: list[Step] = []
        self.version = 0
        self.pending: list[Command] = []
        for i in range(setup.servers):
            zone = "abc"[i % 3] if setup.zoned else ""
            self.command("setup", cm.AddServer(SERVER_IDS[i], f"10.0.0.{i + 1}:7000", 1, zone))
        for name, (replicas, stripe) in zip(("db", "logs"), setup.volumes, strict=False):
            self.command("setup", CreateVolume(name, 1 << 20, replicas, stripe))

    def record(self, action: str, before: ClusterMap, cmd: Command | None = None,
               reason: str | None = None, write: tuple[int, int, Data] | None = None,
               source_empty: bool | None = None) -> None:  # fmt: skip
        cmap, held = self.pages.cmap, self.pages.held
        reads = {v.id: read(held, v.layers) for v in cmap.volumes.values()}
        snaps = {
            (v.id, name): read(held, v.layers[: v.layers.index(lid) + 1])
            for v in cmap.volumes.values()
            for name, lid, _ in v.snapshots
        }
        self.steps.append(
            Step(action, cmd, reason, before, cmap, reads, snaps, write, source_empty)
        )
        note(f"{action}: {cmd} -> {reason or 'applied'}" if cmd else f"{action} {write or ''}")

    def command(self, action: str, cmd: Command, source_empty: bool | None = None) -> None:
        before = self.pages.cmap
        reason = self.pages.run(cmd)
        self.record(action, before, cmd, reason, source_empty=source_empty)

    def propose_pending(self, action: str = "worker") -> None:
        """Apply the worker's proposals, after whatever came between."""
        for cmd in self.pending:
            empty = not self.pages.held.get(cmd.layer) if isinstance(cmd, MigrationDone) else None
            self.command(action, cmd, source_empty=empty)
        self.pending = []

    def done(self) -> list[Command]:
        """What the worker finds done: an empty source nothing migrates into, a flatten
        that copied every shared page."""
        cmap = self.pages.cmap
        found: list[Command] = [MigrationDone(lid) for lid in self.pages.retirable()]
        flattened = [n for n in sorted(cmap.volumes) if cmap.volumes[n].flattening]
        return found + [FlattenDone(n) for n in flattened if self.pages.flattened(n)]

    def act(self, choice: Choice) -> None:
        index, a, b, c, d = choice
        action = ACTIONS[index]
        cmap = self.pages.cmap
        names = sorted(cmap.volumes)
        if action in {"write", "copy_up"} and names:
            name, page = names[a % len(names)], b % PAGES
            if action == "copy_up":
                self.pages.copy_up(name, page)
                self.record(action, cmap)
                return
            self.version += 1
            self.pages.write(name, page, self.version)
            self.record(action, cmap, write=(cmap.volumes[name].id, page, self.version))
        elif action == "move" and self.pages.sources():
            sources = self.pages.sources()
            source = sources[a % len(sources)]
            held = sorted(self.pages.held[source])
            pages = None if c % 2 or not held else [held[b % len(held)]]
            self.pages.move(source, pages)
            self.record(action, cmap)
        elif action == "flatten":
            flattening = [n for n in names if cmap.volumes[n].flattening]
            if flattening:
                self.pages.flatten(flattening[a % len(flattening)], None if c % 2 else [b % PAGES])
                self.record(action, cmap)
        elif action == "retire":
            # the proposal found last time applies, and the worker looks again
            self.propose_pending()
            found = self.done()
            self.pending = [found[a % len(found)]] if found else []
        elif action == "layer":
            kind = RUN_LAYER_KINDS[c % len(RUN_LAYER_KINDS)]
            self.command(action, layer_command_for(cmap, kind, choice))
        elif action == "basic":  # c picked the kind: d takes its place
            kind = RUN_BASIC_KINDS[c % len(RUN_BASIC_KINDS)]
            self.command(action, command_for(cmap, self.zoned, (kind, a, b, d, c)))

    def settle(self) -> bool:
        """Run the worker, proposing what it finds done at once, until no source and no
        flatten is left; whether that happened (each round retires at least the lowest
        source of every chain)."""
        self.propose_pending()
        for _ in range(len(self.pages.cmap.layers) + 2):
            cmap = self.pages.cmap
            if not self.pages.sources() and not any(v.flattening for v in cmap.volumes.values()):
                return True
            for source in self.pages.sources():
                self.pages.move(source)
            for name in sorted(cmap.volumes):
                if cmap.volumes[name].flattening:
                    self.pages.flatten(name)
            self.record("settle", cmap)
            self.pending = self.done()
            self.propose_pending("worker at once")
        return False


def simulate(setup: Setup, choices: list[Choice]) -> Run:
    sim = Simulation(setup)
    for choice in choices:
        sim.act(choice)
    return Run(sim.steps, sim.settle())


@st.composite
def runs(draw: st.DrawFn, max_size: int = 60) -> Run:
    """A simulated run of up to ``max_size`` random actions (its size drawn evenly, so
    that long runs, where layers pile up, are as common as short ones)."""
    setup = draw(setups)
    size = draw(st.integers(0, max_size))
    return simulate(setup, draw(st.lists(action_choices, min_size=size, max_size=size)))


def created(step: Step) -> int | None:
    """The id of the volume an applied CreateVolume or CloneVolume made."""
    if step.reason is None and isinstance(step.cmd, CreateVolume | CloneVolume):
        return step.after.volumes[step.cmd.name].id
    return None


# --- properties over random runs -------------------------------------------------------------


@RUNS
@given(runs())
def test_layer_runs_keep_the_map_consistent(run: Run) -> None:
    """Every map a run reaches passes check_map and round-trips through its dict form."""
    for step in run.steps:
        if step.after is not step.before:
            check_map(step.after)
            assert (
                cm.map_from_dict(json.loads(json.dumps(cm.map_to_dict(step.after)))) == step.after
            )


@RUNS
@given(runs())
def test_a_snapshot_never_changes_until_it_is_deleted(run: Run) -> None:
    """A snapshot reads what its volume read when it was taken (data compared, not layers),
    through migrations, merges, flattens and worker moves, until it is deleted."""
    taken: dict[tuple[int, str], Content] = {}
    reads: dict[int, Content] = {}
    for step in run.steps:
        cmd = step.cmd
        for key in list(taken):
            if key not in step.snaps:
                vid, name = key
                dropped = isinstance(cmd, cm.DeleteSnapshot) and cmd.snapshot == name
                assert dropped or step.after.volume_by_id(vid) is None, (key, cmd)
                del taken[key]
        for key, content in step.snaps.items():
            if key not in taken:
                assert isinstance(cmd, CreateSnapshot), (key, cmd)
                assert step.reason is None
                assert content == reads[key[0]]
                taken[key] = content
            assert content == taken[key], (key, cmd)
        reads = step.reads


@RUNS
@given(runs())
def test_a_volume_changes_only_by_its_own_writes_or_a_rollback(run: Run) -> None:
    """A volume reads what it read before, but for the pages it wrote itself; a rollback
    makes it read exactly its snapshot; a new volume reads zeros, a clone its snapshot."""
    reads: dict[int, Content] = {}
    snaps: dict[tuple[int, str], Content] = {}
    for step in run.steps:
        cmd = step.cmd
        new = created(step)
        for vid, content in step.reads.items():
            if vid == new and isinstance(cmd, CloneVolume):
                expected = snaps[(step.before.volumes[cmd.source].id, cmd.snapshot)]
            elif vid == new:
                expected = {}
            elif (
                step.reason is None
                and isinstance(cmd, RollbackVolume)
                and (step.before.volumes[cmd.name].id == vid)
            ):
                expected = snaps[(vid, cmd.snapshot)]
            else:
                expected = dict(reads[vid])
                if step.write is not None and step.write[0] == vid:
                    expected[step.write[1]] = step.write[2]
            assert content == expected, (vid, step.action, cmd)
        reads, snaps = step.reads, step.snaps


@RUNS
@given(runs())
def test_a_clone_starts_as_its_snapshot_and_shares_no_later_write(run: Run) -> None:
    """A clone reads its origin's snapshot when made; afterwards every page any volume
    reads was written by that volume or inherited from its snapshot: origin writes never
    show in a clone and clone writes never in the origin."""
    writer: dict[Data, int] = {}
    inherited: dict[int, set[Data]] = {}
    snaps: dict[tuple[int, str], Content] = {}
    for step in run.steps:
        cmd = step.cmd
        if step.write is not None:
            writer[step.write[2]] = step.write[0]
        new = created(step)
        if new is not None:
            inherited[new] = set()
            if isinstance(cmd, CloneVolume):
                origin = snaps[(step.before.volumes[cmd.source].id, cmd.snapshot)]
                assert step.reads[new] == origin
                inherited[new] = set(origin.values())
        for vid, content in step.reads.items():
            for page, data in content.items():
                assert writer[data] == vid or data in inherited[vid], (vid, page, data)
        snaps = step.snaps


@RUNS
@given(runs())
def test_migration_done_is_accepted_only_for_an_empty_source(run: Run) -> None:
    """The worker proposes MigrationDone for a source it found empty with nothing
    migrating into it; whatever comes before the proposal applies, validate accepts it
    only while the source is still empty and nothing is left to move into it, and the
    worker can always retire every source and end every flatten."""
    for step in run.steps:
        cmd = step.cmd
        if step.action == "worker at once":
            assert step.reason is None, (cmd, step.reason)
        if isinstance(cmd, MigrationDone) and step.action == "worker" and step.reason is None:
            assert step.source_empty, cmd
            layers = step.after.layers.values()
            assert all(layer.migrates_to != cmd.layer for layer in layers), cmd
    assert run.settled, "the worker could not retire every source or end every flatten"


@RUNS
@given(runs())
def test_a_finished_migration_lies_on_its_servers(run: Run) -> None:
    """Once no own layer of a migrated volume migrates any more, its migration is over
    (``migration == ()``) and its own layers lie on the servers it was sent to (the
    named ones, else every placeable one), in the shape asked; an aborted one lies back
    where it came from, in its old shape."""
    # volume id -> (servers it goes to, shape (stripe, replicas), where it came from)
    going: dict[int, tuple[set[str], tuple[int, int], set[str], tuple[int, int]]] = {}
    for step in run.steps:
        cmd, before, after = step.cmd, step.before, step.after
        if step.reason is None and isinstance(cmd, MigrateVolume):
            v = before.volumes[cmd.name]
            dest = set(cmd.servers) or {s.id for s in before.placeable()}
            shape = (cmd.stripe or v.stripe, cmd.replicas or v.replicas)
            home = servers_of(before, before.own_layers(v))
            going[v.id] = (dest, shape, home, (v.stripe, v.replicas))
        elif step.reason is None and isinstance(cmd, AbortMigration):
            vid = before.volumes[cmd.name].id
            if vid in going:
                dest, shape, home, old_shape = going[vid]
                going[vid] = (home, old_shape, dest, shape)
        elif step.reason is None and isinstance(cmd, cm.Rereplicate):
            for vid in affected_volumes(before, cmd):
                going.pop(vid, None)  # copies moved off a down server: anywhere
        for vid in list(going):
            moved = after.volume_by_id(vid)
            if moved is None:
                del going[vid]
                continue
            own = after.own_layers(moved)
            if any(after.layers[lid].migrates_to is not None for lid in own):
                assert moved.migration, (moved.name, cmd)
                continue
            dest, shape, _, _ = going.pop(vid)
            assert moved.migration == (), (moved.name, cmd)
            assert servers_of(after, own) <= dest, (moved.name, cmd)
            assert (moved.stripe, moved.replicas) == shape
            for lid in own:
                placement = after.layers[lid].placement
                assert (len(placement), len(placement[0])) == shape
    assert run.settled
    assert not going


# --- the patent's figures, as map-level examples ------------------------------------------

#: Figs. 4 and 5: six pages 0-5 holding A-F
FIG: Content = dict(enumerate("ABCDEF"))
#: 2026-11-25T10:00:00Z in unix milliseconds
T0 = 1_795_600_800_000


def four_servers(*more: Command) -> Pages:
    """s1-s4 up; volume db (2 partitions, 1 copy each) holding A-F in pages 0-5."""
    pages = Pages()
    pages.ok(*(cm.AddServer(f"s{i}", f"10.0.0.{i}:7000", 1) for i in range(1, 5)))
    pages.ok(CreateVolume("db", 6 << 20, replicas=1, stripe=2), *more)
    for page, data in FIG.items():
        pages.write("db", page, data)
    return pages


def test_fig4_migration_moves_every_page_up_then_retires_the_old_layer() -> None:
    """Fig. 4: the old layer migrates page by page into a new layer on other servers; the
    volume reads A-F throughout, a moved page leaves the old layer, and once it is empty
    the old layer is retired and the volume lies on the new servers only."""
    pages = four_servers()
    (old,) = pages.stack("db")
    new_servers = tuple(sorted(set(pages.cmap.servers) - servers_of(pages.cmap, [old])))
    pages.ok(MigrateVolume("db", new_servers))
    new = pages.cmap.layers[old].migrates_to
    assert new is not None
    # 4A: the new layer is transparent; every page reads through to the old one
    assert pages.stack("db") == (old, new)
    assert pages.cmap.layers[old].role == "migration_source"
    assert pages.cmap.layers[new].role == "live"
    assert servers_of(pages.cmap, [new]) == set(new_servers)
    assert (pages.held[old], pages.held[new], pages.content("db")) == (FIG, {}, FIG)
    # 4B: page 1 (B) moved: it is in the new layer and tombstoned in the old one
    pages.move(old, [1])
    assert pages.held[new] == {1: "B"}
    assert pages.held[old] == {p: d for p, d in FIG.items() if p != 1}
    assert pages.content("db") == FIG
    # a client write meanwhile copies its page up first and tombstones it below [0049]
    pages.write("db", 4, "e")
    assert 4 not in pages.held[old]
    assert pages.content("db") == {**FIG, 4: "e"}
    # 4C: every page moved; the new layer is opaque, the old one empty
    pages.move(old)
    assert pages.held[old] == {}
    assert pages.held[new] == pages.content("db") == {**FIG, 4: "e"}
    assert validate(pages.cmap, MigrationDone(new)) == f"layer {new} is not migrating"
    pages.ok(MigrationDone(old))
    db = pages.cmap.volumes["db"]
    assert (db.layers, db.migration) == ((new,), ())
    assert pages.content("db") == {**FIG, 4: "e"}
    assert servers_of(pages.cmap, db.layers) == set(new_servers)
    assert old not in pages.cmap.layers


def test_fig5_snapshot_keeps_its_pages_while_the_volume_moves_on() -> None:
    """Fig. 5: a snapshot freezes the layer holding A-F under a new empty top on the same
    servers; copy-ups fill the top without taking anything from the snapshot layer, writes
    change the volume only, and the snapshot reads A-F throughout."""
    pages = four_servers()
    (base,) = pages.stack("db")
    pages.ok(CreateSnapshot("db", "fig5", T0))
    # 5A: the top is new, empty and on the snapshot layer's servers
    _, top = pages.stack("db")
    assert pages.stack("db") == (base, top)
    assert pages.cmap.layers[top].placement == pages.cmap.layers[base].placement
    assert (pages.cmap.layers[base].role, pages.cmap.layers[top].role) == ("snapshot", "live")
    assert pages.held[top] == {}
    assert pages.content("db") == pages.content("db", "fig5") == FIG
    # 5B: page 1 copied up to the top; the snapshot layer keeps B [0059]
    pages.copy_up("db", 1)
    assert pages.held[top] == {1: "B"}
    assert pages.held[base] == FIG
    pages.write("db", 1, "b")  # the copied-up page may be modified
    assert pages.content("db") == {**FIG, 1: "b"}
    assert pages.content("db", "fig5") == FIG
    # 5C: every page copied up; the snapshot still reads, and holds, A-F [0060]
    for page in FIG:
        pages.copy_up("db", page)
    assert pages.held[top] == {**FIG, 1: "b"}
    assert pages.held[base] == pages.content("db", "fig5") == FIG
    # deleting the snapshot merges its layer up: nothing it holds is newer than the top
    pages.ok(cm.DeleteSnapshot("db", "fig5"))
    assert pages.cmap.layers[base].migrates_to == top
    pages.move(base)
    pages.ok(MigrationDone(base))
    assert pages.stack("db") == (top,)
    assert pages.content("db") == {**FIG, 1: "b"}


# --- rejections, by example ------------------------------------------------------------------


def layered() -> Pages:
    """four_servers' db with snapshots a and b, and c, a clone of db@a."""
    return four_servers(
        CreateSnapshot("db", "a", T0),
        CloneVolume("db", "a", "c"),
        CreateSnapshot("db", "b", T0 + 1),
    )


def test_rejection_reasons_by_example() -> None:
    """Each layer command that may not apply says why, naming what is in the way."""
    pages = layered()
    lock = cm.AcquireLock("db", "abc", "web-1", 7, T0)
    locked = apply(pages.cmap, lock)
    migrating = apply(pages.cmap, MigrateVolume("db", ("s3", "s4")))
    down = apply(pages.cmap, cm.SetServerState("s3", cm.ServerState.DOWN))
    examples: list[tuple[ClusterMap, Command, str]] = [
        (pages.cmap, CreateSnapshot("db", "a", T0), "volume db already has a snapshot a"),
        (pages.cmap, cm.DeleteSnapshot("db", "a"), "snapshot a of volume db is the origin of c"),
        (pages.cmap, cm.DeleteVolume("db"), "volume db is the origin of c"),
        (pages.cmap, RollbackVolume("db", "a"), "snapshot(s) b of volume db are newer than a"),
        (locked, RollbackVolume("db", "b"), "volume db is attached by host web-1 pid 7"),
        (migrating, MigrateVolume("db", ("s1",)), "volume db is migrating"),
        (migrating, RollbackVolume("db", "b"), "volume db is migrating"),
        (pages.cmap, cm.FlattenVolume("db"), "volume db shares no layer with another volume"),
        (pages.cmap, FlattenDone("c"), "volume c is not being flattened"),
        (pages.cmap, AbortMigration("db"), "volume db is not migrating"),
        (pages.cmap, MigrateVolume("db", ("s9",)), "unknown server s9"),
        (down, MigrateVolume("db", ("s3", "s4")), "server s3 is down, not up"),
        (pages.cmap, MigrateVolume("db", ("s3",), replicas=2), "need 2 servers, only 1"),
        (pages.cmap, CloneVolume("db", "zz", "d"), "volume db has no snapshot zz"),
        (pages.cmap, CloneVolume("db", "a", "c"), "volume c already exists"),
        (pages.cmap, MigrationDone(99), "unknown layer 99"),
    ]
    for cmap, cmd, words in examples:
        reason = validate(cmap, cmd)
        assert reason is not None, cmd
        assert words in reason, (cmd, reason)
        assert affected_volumes(cmap, cmd) == frozenset()
    # the reasons stay valid: once the obstacle is gone, the command applies
    assert validate(apply(locked, cm.ReleaseLock("db", "abc")), RollbackVolume("db", "b")) is None


def test_a_layer_is_retired_only_once_nothing_migrates_into_it() -> None:
    """A snapshot deleted during a migration makes a chain (the old layer into the moved
    snapshot's layer, that into the next source): each link is retired only once the one
    below it is gone, and the migration ends with the last."""
    pages = four_servers(CreateSnapshot("db", "a", T0))
    low, top = pages.stack("db")
    pages.ok(MigrateVolume("db", ("s3", "s4")), cm.DeleteSnapshot("db", "a"))
    moved_low = pages.cmap.layers[low].migrates_to
    moved_top = pages.cmap.layers[top].migrates_to
    assert moved_low is not None
    assert moved_top is not None
    assert pages.stack("db") == (low, moved_low, top, moved_top)
    assert pages.cmap.layers[moved_low].migrates_to == top  # the deleted snapshot merges up
    for layer, below in ((moved_low, low), (top, moved_low)):
        reason = validate(pages.cmap, MigrationDone(layer))
        assert reason == f"layer {layer} still receives pages from layer(s) {below}"
    for source in (low, moved_low, top):
        assert pages.cmap.volumes["db"].migration
        pages.move(source)
        pages.ok(MigrationDone(source))
        check_map(pages.cmap)
        assert pages.content("db") == FIG
    assert pages.stack("db") == (moved_top,)
    assert pages.cmap.volumes["db"].migration == ()
    assert servers_of(pages.cmap, [moved_top]) == {"s3", "s4"}


def fill_up(pages: Pages, name: str) -> str:
    """Snapshot ``name`` until its stack holds MAX_STACK layers; the refusal's reason."""
    for i in range(MAX_STACK):
        reason = pages.run(CreateSnapshot(name, f"n{i}", T0 + i))
        if reason is not None:
            assert len(pages.stack(name)) == MAX_STACK
            return reason
    raise AssertionError("no limit")


def test_no_stack_grows_past_the_limit() -> None:
    """A volume stacks at most MAX_STACK layers: a snapshot, a migration or an abort that
    would stack more, in the volume or in a clone sharing its layers, is refused."""
    pages = four_servers(CreateSnapshot("db", "a", T0), CloneVolume("db", "a", "c"))
    assert "the most a volume may have" in fill_up(pages, "c")
    reason = validate(pages.cmap, MigrateVolume("c", ("s3", "s4")))
    assert reason == "volume c has too many layers to migrate: delete snapshots"
    # db's own stack is short, but its moved layer would push c's past the limit
    reason = validate(pages.cmap, MigrateVolume("db", ("s3", "s4")))
    assert reason == (
        "clone c of volume db would stack too many layers: flatten it or delete its snapshots first"
    )
    # the same for an abort: the migration started while c had room
    pages = four_servers(CreateSnapshot("db", "a", T0), CloneVolume("db", "a", "c"))
    pages.ok(MigrateVolume("db", ("s3", "s4")))
    fill_up(pages, "c")
    reason = validate(pages.cmap, AbortMigration("db"))
    assert reason is not None
    assert reason.startswith("clone c of volume db would stack too many layers")
    check_map(pages.cmap)


# --- what a layer command affects ------------------------------------------------------------


def stacks_changed(before: ClusterMap, after: ClusterMap) -> set[int]:
    """Ids of the volumes whose stack is new or different in ``after``."""
    return {
        v.id
        for name, v in after.volumes.items()
        if name not in before.volumes or before.volumes[name].layers != v.layers
    }


def test_affected_volumes_are_those_whose_stacks_change() -> None:
    """With c sharing db's lower layer, a snapshot of db changes db's stack only, while a
    migration of db and the retirement of the shared source change both stacks: each
    affects (and fences) exactly the volumes whose stacks it changed."""
    pages = layered()
    db, c = pages.cmap.volumes["db"].id, pages.cmap.volumes["c"].id
    changes: list[tuple[Command, set[int]]] = [
        (CreateSnapshot("db", "x", T0 + 9), {db}),
        (CreateSnapshot("c", "x", T0 + 9), {c}),
        (MigrateVolume("db", ("s3", "s4")), {db, c}),
    ]
    for cmd, expected in changes:
        before = pages.cmap
        after = apply(before, cmd)
        assert affected_volumes(before, cmd) == expected == stacks_changed(before, after), cmd
        for v in after.volumes.values():
            assert (v.fence_epoch == after.epoch) == (v.id in expected)
    pages.ok(MigrateVolume("db", ("s3", "s4")))
    shared = pages.stack("c")[0]
    assert pages.cmap.layers[shared].migrates_to is not None
    pages.move(shared)
    done = MigrationDone(shared)
    after = apply(pages.cmap, done)
    assert affected_volumes(pages.cmap, done) == {db, c} == stacks_changed(pages.cmap, after)


def test_affected_servers_of_a_migration_cover_both_placements() -> None:
    """SET_EPOCH for a migration, its abort and its end goes to the servers of the old
    placement and of the new one."""
    pages = four_servers()
    cmd = MigrateVolume("db", ("s3", "s4"))
    old = servers_of(pages.cmap, pages.stack("db"))
    assert old == {"s1", "s2"}
    assert affected_servers(pages.cmap, cmd) == {"s1", "s2", "s3", "s4"}
    pages.ok(cmd)
    (source, target) = pages.stack("db")
    assert servers_of(pages.cmap, [target]) == {"s3", "s4"}
    assert affected_servers(pages.cmap, AbortMigration("db")) == {"s1", "s2", "s3", "s4"}
    pages.move(source)
    assert affected_servers(pages.cmap, MigrationDone(source)) == {"s1", "s2", "s3", "s4"}
    pages.ok(MigrationDone(source))
    assert affected_servers(pages.cmap, CreateSnapshot("db", "x", T0)) == {"s3", "s4"}

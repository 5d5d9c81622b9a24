"""The cluster map's state machine (lamina.mgmt.clustermap).

Most properties run over random command logs (tests/unit/mgmt_strategies.py) replayed
the way every manager replays the Raft log: validate each command, apply it if
``validate`` says ``None``, keep the map otherwise.  :func:`replay` records every step
(map before, command, reason, map after) and each test checks one property over the
steps.  Expectations are computed here from the map itself, not with the module's own
helpers (``affected_volumes`` is checked against this file's model, not used as one).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.errors import BadRequest, ProtocolError
from lamina.mgmt import clustermap as cm
from lamina.mgmt.clustermap import (
    AcquireLock,
    AddServer,
    ClusterMap,
    Command,
    CreateVolume,
    DeleteVolume,
    InvalidCommand,
    Lock,
    Publish,
    ReleaseLock,
    RemoveServer,
    ResizeVolume,
    ServerState,
    SetServerState,
    affected_servers,
    affected_volumes,
    apply,
    check_map,
    decode_command,
    empty_map,
    encode_command,
    fences,
    map_from_dict,
    map_to_dict,
    validate,
)
from tests.unit.mgmt_strategies import any_commands, command_logs

LOGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=400, deadline=None)
FUZZ_STRUCTURED = settings(FUZZ, max_examples=150)


@dataclass(frozen=True)
class Step:
    before: ClusterMap
    cmd: Command
    reason: str | None
    after: ClusterMap


def replay(log: list[Command], start: ClusterMap | None = None) -> list[Step]:
    """Validate-then-apply every command of ``log``, as a manager applies the Raft log."""
    cmap = empty_map() if start is None else start
    steps = []
    for cmd in log:
        reason = validate(cmap, cmd)
        after = apply(cmap, cmd) if reason is None else cmap
        steps.append(Step(cmap, cmd, reason, after))
        cmap = after
    return steps


def final(log: list[Command]) -> ClusterMap:
    steps = replay(log)
    return steps[-1].after if steps else empty_map()


def copies_on(cmap: ClusterMap, server_id: str) -> bool:
    return any(server_id in part for layer in cmap.layers.values() for part in layer.placement)


def fenced_names(step: Step) -> set[str]:
    """Volumes of the map after ``step`` whose fence the command must raise (the model)."""
    before, cmd = step.before, step.cmd
    if step.reason is not None:
        return set()
    if isinstance(cmd, CreateVolume | ResizeVolume | AcquireLock | ReleaseLock):
        return {cmd.name}
    # a volume's own layers: a clone reads the layers it shares under their owner's id,
    # so the owner's fence covers them
    if isinstance(cmd, cm.ServerStarted):
        server = before.servers[cmd.id]
        if cm.started_state(server, cmd.incarnation) == server.state:
            return set()  # only recorded
    # a restart (or a down server's return) changes its state: fenced like SetServerState
    if isinstance(cmd, SetServerState | RemoveServer | cm.Rereplicate | cm.ServerStarted):
        return {
            v.name
            for v in before.volumes.values()
            for lid in v.layers
            for part in before.layers[lid].placement
            if cmd.id in part and before.layers[lid].volume_id == v.id
        }
    if isinstance(cmd, cm.FillDone):
        return {
            v.name for v in before.volumes.values() if before.layers[cmd.layer].volume_id == v.id
        }
    if isinstance(cmd, LAYER_COMMANDS):
        # the volume it names (a clone: the new one) and every volume whose stack changed
        named = {cmd.name} if not isinstance(cmd, cm.MigrationDone) else set()
        return named | {
            name
            for name, v in step.after.volumes.items()
            if name not in before.volumes or before.volumes[name].layers != v.layers
        }
    return set()


LAYER_COMMANDS = (
    cm.CreateSnapshot,
    cm.DeleteSnapshot,
    cm.RollbackVolume,
    cm.CloneVolume,
    cm.FlattenVolume,
    cm.FlattenDone,
    cm.MigrateVolume,
    cm.AbortMigration,
    cm.MigrationDone,
)


# --- the log properties -----------------------------------------------------------------


@LOGS
@given(command_logs())
def test_validate_then_apply_never_raises_and_keeps_the_map_consistent(log: list[Command]) -> None:
    """Replaying any log never raises, and every map reached passes check_map."""
    for step in replay(log):
        check_map(step.after)


@LOGS
@given(command_logs())
def test_rejected_commands_carry_a_reason_and_change_nothing(log: list[Command]) -> None:
    """A rejected command has a non-empty reason, apply refuses it, and it affects nothing."""
    rejected = 0
    for step in replay(log):
        if step.reason is None:
            continue
        rejected += 1
        assert isinstance(step.reason, str)
        assert step.reason.strip()
        assert step.after is step.before
        with pytest.raises(InvalidCommand) as info:
            apply(step.before, step.cmd)
        assert info.value.message == step.reason
        assert isinstance(info.value, ValueError)
        assert affected_volumes(step.before, step.cmd) == frozenset()
        assert affected_servers(step.before, step.cmd) == set()
        assert map_to_dict(step.before) == map_to_dict(step.after)


@LOGS
@given(command_logs())
def test_epoch_rises_by_exactly_one_per_applied_change(log: list[Command]) -> None:
    """Each applied command but Publish raises epoch by one; Publish and rejections keep it."""
    for step in replay(log):
        if step.reason is None and not isinstance(step.cmd, Publish):
            assert step.after.epoch == step.before.epoch + 1
        else:
            assert step.after.epoch == step.before.epoch


@LOGS
@given(command_logs())
def test_published_epoch_never_passes_epoch(log: list[Command]) -> None:
    """published_epoch <= epoch always, never falls, and moves only by an applied Publish."""
    for step in replay(log):
        after, before = step.after, step.before
        assert 0 <= after.published_epoch <= after.epoch
        if step.reason is None and isinstance(step.cmd, Publish):
            assert before.published_epoch < after.published_epoch == step.cmd.epoch
        else:
            assert after.published_epoch == before.published_epoch


@LOGS
@given(command_logs())
def test_fences_rise_for_exactly_the_affected_volumes(log: list[Command]) -> None:
    """A command sets the fence of every volume it affects to the new epoch and no other."""
    for step in replay(log):
        expected = fenced_names(step)
        for name, volume in step.after.volumes.items():
            assert volume.fence_epoch <= step.after.epoch
            if name in expected:
                assert volume.fence_epoch == step.after.epoch
            else:
                assert volume.fence_epoch == step.before.volumes[name].fence_epoch
        assert fences(step.after) == sorted(
            (v.id, v.fence_epoch) for v in step.after.volumes.values()
        )
        # affected_volumes names the same volumes (plus a deleted one)
        ids = {step.after.volumes[n].id for n in expected}
        if step.reason is None and isinstance(step.cmd, DeleteVolume):
            ids.add(step.before.volumes[step.cmd.name].id)
        assert affected_volumes(step.before, step.cmd) == ids


@LOGS
@given(command_logs())
def test_affected_servers_hold_the_affected_volumes(log: list[Command]) -> None:
    """affected_servers is every server holding a layer of an affected volume, or retired
    from one, before or after."""
    for step in replay(log):
        volume_ids = affected_volumes(step.before, step.cmd)
        expected = {
            sid
            for cmap in (step.before, step.after)
            for layer in cmap.layers.values()
            if layer.volume_id in volume_ids
            for sid in (*(s for part in layer.placement for s in part), *layer.retired)
        }
        got = affected_servers(step.before, step.cmd)
        assert got == expected
        cmd = step.cmd
        if step.reason is None and isinstance(cmd, SetServerState):
            assert (cmd.id in got) == copies_on(step.before, cmd.id)


@LOGS
@given(command_logs())
def test_no_partition_holds_two_copies_on_one_server(log: list[Command]) -> None:
    """Partitions hold distinct known servers; a new layer sits on up servers, zones apart."""
    for step in replay(log):
        for layer in step.after.layers.values():
            for part in layer.placement:
                assert len(set(part)) == len(part)
                assert set(part) <= set(step.after.servers)
        cmd = step.cmd
        if step.reason is None and isinstance(cmd, CreateVolume):
            volume = step.after.volumes[cmd.name]
            (lid,) = volume.layers
            placement = step.after.layers[lid].placement
            up = {s.id: s.zone for s in step.before.servers.values() if s.state == "up"}
            assert len(placement) == cmd.stripe
            for part in placement:
                assert len(part) == cmd.replicas
                assert set(part) <= set(up)
                if any(up.values()):
                    assert len({up[sid] for sid in part}) == len(part)


@LOGS
@given(command_logs())
def test_removing_a_server_that_holds_copies_is_rejected(log: list[Command]) -> None:
    """RemoveServer, or a move to out, of a server holding copies is rejected: drain it first."""
    for step in replay(log):
        cmd = step.cmd
        if not isinstance(cmd, RemoveServer | SetServerState):
            continue
        emptying = isinstance(cmd, RemoveServer) or cmd.state == "out"
        if emptying and copies_on(step.before, cmd.id):
            assert step.reason is not None
            assert step.reason.startswith(f"{cmd.id} holds copies of layer ")
            assert step.reason.endswith(": drain it first")
        if step.reason is None and isinstance(cmd, RemoveServer):
            assert cmd.id not in step.after.servers


@LOGS
@given(command_logs(max_size=40))
def test_volume_and_layer_ids_are_never_reused(log: list[Command]) -> None:
    """A new volume and its layer get ids never seen before, even after deletes."""
    seen_volumes: set[int] = set()
    seen_layers: set[int] = set()
    for step in replay(log):
        assert step.after.next_volume_id >= step.before.next_volume_id
        assert step.after.next_layer_id >= step.before.next_layer_id
        cmd = step.cmd
        if step.reason is None and isinstance(cmd, CreateVolume):
            volume = step.after.volumes[cmd.name]
            assert volume.id not in seen_volumes
            assert not set(volume.layers) & seen_layers
        seen_volumes.update(v.id for v in step.after.volumes.values())
        seen_layers.update(step.after.layers)
        assert all(v < step.after.next_volume_id for v in seen_volumes)
        assert all(lid < step.after.next_layer_id for lid in seen_layers)


@LOGS
@given(command_logs())
def test_locks_change_only_by_lock_commands_and_by_their_rules(log: list[Command]) -> None:
    """A volume's lock changes only through AcquireLock/ReleaseLock on that volume; a
    second session gets it only by takeover; a refresh keeps ``since``; a locked volume
    is never deleted."""
    for step in replay(log):
        cmd, before, after = step.cmd, step.before, step.after
        for name, volume in after.volumes.items():
            old = before.volumes[name].lock if name in before.volumes else None
            touched = isinstance(cmd, AcquireLock | ReleaseLock) and cmd.name == name
            if not (touched and step.reason is None):
                assert volume.lock == old
        if isinstance(cmd, DeleteVolume) and cmd.name in before.volumes:
            gone = before.volumes[cmd.name]
            shared = any(
                before.layers[lid].volume_id == gone.id
                for v in before.volumes.values()
                if v.name != gone.name
                for lid in v.layers
            )  # a volume with clones is not deleted either
            assert (step.reason is None) == (gone.lock is None and not shared)
        if not isinstance(cmd, AcquireLock) or cmd.name not in before.volumes:
            continue
        held = before.volumes[cmd.name].lock
        if held is not None and held.session != cmd.session and not cmd.takeover:
            assert step.reason == f"volume {cmd.name} is locked by {cm.describe_lock(held)}"
            continue
        assert step.reason is None
        got = after.volumes[cmd.name].lock
        assert got is not None
        assert (got.session, got.host, got.pid) == (cmd.session, cmd.host, cmd.pid)
        refresh = held is not None and held.session == cmd.session
        assert got.since == (held.since if held is not None and refresh else cmd.since)


@LOGS
@given(log=command_logs(), data=st.data())
def test_replicas_applying_one_log_reach_equal_maps(
    log: list[Command], data: st.DataObject
) -> None:
    """Replicas replaying the encoded log, one from a mid-log snapshot, agree on every step."""
    reference = replay(log)
    decoded = replay([decode_command(encode_command(cmd)) for cmd in log])
    assert [s.reason for s in decoded] == [s.reason for s in reference]
    assert [s.after for s in decoded] == [s.after for s in reference]
    cut = data.draw(st.integers(0, len(log)))
    snapshot = json.loads(json.dumps(map_to_dict(reference[cut - 1].after if cut else empty_map())))
    restored = replay(log[cut:], start=map_from_dict(snapshot))
    end = reference[-1].after if reference else empty_map()
    assert (restored[-1].after if restored else map_from_dict(snapshot)) == end
    assert [s.reason for s in restored] == [s.reason for s in reference[cut:]]
    assert map_to_dict(final(log)) == map_to_dict(end)


# --- serialization -------------------------------------------------------------------------


@settings(max_examples=300)
@given(any_commands)
def test_commands_round_trip_through_bytes(cmd: Command) -> None:
    """decode_command(encode_command(cmd)) == cmd, field types included."""
    data = encode_command(cmd)
    back = decode_command(data)
    assert back == cmd
    assert type(back) is type(cmd)
    for f in dataclasses.fields(cmd):
        assert type(getattr(back, f.name)) is type(getattr(cmd, f.name))
    assert encode_command(back) == data
    assert decode_command(bytearray(data)) == cmd


@LOGS
@given(command_logs())
def test_map_round_trips_through_a_dict_and_json(log: list[Command]) -> None:
    """map_from_dict(map_to_dict(m)) == m, through JSON too, with a stable key order."""
    for cmap in [empty_map(), *(step.after for step in replay(log)[-3:])]:
        d = map_to_dict(cmap)
        assert map_from_dict(d) == cmap
        text = json.dumps(d)
        assert map_from_dict(json.loads(text)) == cmap
        assert json.dumps(map_to_dict(map_from_dict(json.loads(text)))) == text
        assert list(d["servers"]) == sorted(d["servers"])
        assert list(d["volumes"]) == sorted(d["volumes"])
        assert [int(k) for k in d["layers"]] == sorted(int(k) for k in d["layers"])


@contextmanager
def only_protocol_errors(what: str, data: object) -> Iterator[None]:
    """Swallow ProtocolError; turn any other exception into a failure naming the input."""
    try:
        yield
    except ProtocolError:
        pass
    except Exception as exc:
        pytest.fail(f"{what} raised {type(exc).__name__}: {exc} on input {data!r}")


def decoded_or_protocol_error(data: bytes) -> None:
    with only_protocol_errors("decode_command", data):
        cmd = decode_command(data)
        assert type(cmd) in cm.COMMAND_TYPES
        assert decode_command(encode_command(cmd)) == cmd


@FUZZ
@given(st.binary(max_size=64))
def test_decode_random_bytes_raises_only_protocol_error(data: bytes) -> None:
    """Random bytes decode to a valid command or raise ProtocolError, nothing else."""
    decoded_or_protocol_error(data)


@FUZZ
@given(cmd=any_commands, data=st.data())
def test_decode_damaged_commands_raises_only_protocol_error(
    cmd: Command, data: st.DataObject
) -> None:
    """A truncated, extended or bit-flipped encoding decodes validly or raises ProtocolError."""
    raw = bytearray(encode_command(cmd))
    how = data.draw(st.sampled_from(["truncate", "extend", "flip"]))
    if how == "truncate":
        damaged = bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif how == "extend":
        damaged = bytes(raw) + data.draw(st.binary(min_size=1, max_size=8))
    else:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
        damaged = bytes(raw)
    decoded_or_protocol_error(damaged)


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=70)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=10,
)


@FUZZ_STRUCTURED
@given(
    tag=st.sampled_from([cls.TAG for cls in cm.COMMAND_TYPES]) | st.text(max_size=8),
    version=st.sampled_from([cm.COMMAND_FORMAT]) | plain,
    fields=st.lists(plain | st.sampled_from(["s1", "up", 4096, 1 << 20, 2]), max_size=6),
)
def test_decode_wrong_shapes_raises_only_protocol_error(
    tag: str, version: Any, fields: list[Any]
) -> None:
    """Well-formed msgpack of the wrong shape or field types raises only ProtocolError."""
    data = msgpack.packb([version, tag, *fields], use_bin_type=True)
    decoded_or_protocol_error(data)
    decoded_or_protocol_error(msgpack.packb({"type": tag, "fields": fields}))


def test_decode_refuses_non_bytes_and_oversized_input() -> None:
    """decode_command refuses non-bytes and inputs above MAX_COMMAND_BYTES unread."""
    with pytest.raises(ProtocolError, match="bytes"):
        decode_command("not bytes")  # type: ignore[arg-type]
    big = msgpack.packb([1, "remove_server", "x" * cm.MAX_COMMAND_BYTES])
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_command(big)
    with pytest.raises(ProtocolError, match="format"):
        decode_command(msgpack.packb([2, "remove_server", "s1"]))


Mutation = Callable[[dict[str, Any]], None]


def mutations() -> st.SearchStrategy[Callable[[dict[str, Any]], None]]:
    """Damage to a map's dict form: a key dropped, added or given a junk value, anywhere."""

    @st.composite
    def damage(draw: st.DrawFn) -> Mutation:
        junk = draw(plain | st.sampled_from([0, -1, 1, "up", "s1", [["s1", "s1"]], None]))
        kind = draw(st.sampled_from(["drop", "add", "set"]))
        path_seed = draw(st.lists(st.integers(0, 50), min_size=1, max_size=4))

        def mutate(d: dict[str, Any]) -> None:
            node: Any = d
            for i, seed in enumerate(path_seed):
                keys = list(node) if isinstance(node, dict) else list(range(len(node)))
                if not keys:
                    return
                key = keys[seed % len(keys)]
                child = node[key]
                last = i == len(path_seed) - 1 or not isinstance(child, dict | list) or not child
                if last:
                    if kind == "drop" and isinstance(node, dict):
                        del node[key]
                    elif kind == "add" and isinstance(node, dict):
                        node[f"extra{seed}"] = junk
                    else:
                        node[key] = junk
                    return
                node = child

        return mutate

    return damage()


@FUZZ_STRUCTURED
@given(log=command_logs(), mutate=mutations())
def test_map_from_dict_raises_only_protocol_error_on_damage(
    log: list[Command], mutate: Mutation
) -> None:
    """A damaged map dict loads as a consistent map or raises ProtocolError, nothing else."""
    d = json.loads(json.dumps(map_to_dict(final(log))))
    mutate(d)
    with only_protocol_errors("map_from_dict", d):
        check_map(map_from_dict(d))


LOCK_DICT = {"session": "abc", "host": "h", "pid": 123, "since": 1_795_600_800_000}


def add_orphan_layer(d: dict[str, Any]) -> None:
    d["layers"]["2"] = d["layers"]["1"]
    d["next_layer_id"] = 3


def test_map_from_dict_rejects_inconsistent_maps() -> None:
    """Dangling references and epochs out of order are refused with ProtocolError."""
    cmap = final(
        [
            AddServer("s1", "h:1", 1),
            AddServer("s2", "h:2", 1),
            CreateVolume("db", 1 << 20, replicas=2, stripe=2),
        ]
    )
    cases: list[tuple[str, Mutation]] = [
        ("published", lambda d: d.update(published_epoch=d["epoch"] + 1)),
        ("unknown layer", lambda d: d["volumes"]["db"].update(layers=[7])),
        ("unknown server", lambda d: d["layers"]["1"].update(placement=[["s1", "s9"]])),
        ("two copies", lambda d: d["layers"]["1"].update(placement=[["s1", "s1"]])),
        ("own layers are not the top", lambda d: d["layers"]["1"].update(volume_id=9)),
        ("not in its volume.s stack", add_orphan_layer),
        ("fence epoch", lambda d: d["volumes"]["db"].update(fence_epoch=d["epoch"] + 1)),
        ("next layer id", lambda d: d.update(next_layer_id=1)),
        ("unexpected keys", lambda d: d["servers"]["s1"].update(extra=1)),
        ("state", lambda d: d["servers"]["s1"].update(state="gone")),
        ("format", lambda d: d.update(format=2)),
        ("migrates", lambda d: d["layers"]["1"].update(migrates_to=1)),
        ("lock of volume db", lambda d: d["volumes"]["db"].update(lock="me")),
        ("lock of volume db", lambda d: d["volumes"]["db"].update(lock={"session": "a"})),
        ("session", lambda d: d["volumes"]["db"].update(lock=dict(LOCK_DICT, session="a b"))),
        ("host", lambda d: d["volumes"]["db"].update(lock=dict(LOCK_DICT, host=""))),
        ("pid", lambda d: d["volumes"]["db"].update(lock=dict(LOCK_DICT, pid=-1))),
        ("since", lambda d: d["volumes"]["db"].update(lock=dict(LOCK_DICT, since=1.5))),
    ]
    for words, mutate in cases:
        d = map_to_dict(cmap)
        mutate(d)
        with pytest.raises(ProtocolError, match=words):
            map_from_dict(d)


# --- single rules, by example ---------------------------------------------------------------


def cluster(*more: Command) -> ClusterMap:
    """s1, s2 up holding volume db (2 x 2 copies); s3 up holding nothing."""
    return final(
        [
            AddServer("s1", "10.0.0.1:7000", 1),
            AddServer("s2", "10.0.0.2:7000", 1),
            CreateVolume("db", 1 << 30, replicas=2, stripe=2),
            AddServer("s3", "10.0.0.3:7000", 1),
            *more,
        ]
    )


#: the transition table of the module docstring, written out again: (from, to) -> condition
EXPECTED_TRANSITIONS = {
    ("up", "down"): "always",
    ("up", "recovering"): "always",
    ("up", "out"): "empty",
    ("down", "recovering"): "always",
    ("down", "out"): "empty",
    ("recovering", "up"): "always",
    ("recovering", "down"): "always",
    ("recovering", "out"): "empty",
    ("out", "up"): "always",
}


@pytest.mark.parametrize("holds", [True, False])
@pytest.mark.parametrize("to", list(ServerState))
@pytest.mark.parametrize("frm", list(ServerState))
def test_server_state_transitions_follow_the_table(
    frm: ServerState, to: ServerState, holds: bool
) -> None:
    """SetServerState is accepted exactly for the table's transitions and conditions."""
    cmap = cluster()
    sid = "s1" if holds else "s3"
    server = dataclasses.replace(cmap.servers[sid], state=frm)
    cmap = dataclasses.replace(cmap, servers={**cmap.servers, sid: server})
    reason = validate(cmap, SetServerState(sid, to))
    rule = EXPECTED_TRANSITIONS.get((frm.value, to.value))
    assert (reason is None) == (rule == "always" or (rule == "empty" and not holds)), reason
    if reason is None:
        after = apply(cmap, SetServerState(sid, to))
        assert after.servers[sid].state is to
    elif frm == to:
        assert "already" in reason


def test_rejection_reasons_by_example() -> None:
    """Each rejection names what is wrong, in words an operator understands."""
    cmap = cluster()
    examples: list[tuple[Command, str]] = [
        (RemoveServer("s1"), "s1 holds copies of layer 1 (volume db): drain it first"),
        (SetServerState("s2", ServerState.OUT), "s2 holds copies of layer 1 (volume db)"),
        (RemoveServer("s9"), "unknown server s9"),
        (AddServer("s1", "h:1", 1), "server s1 already exists"),
        (AddServer("s4", "10.0.0.1:7000", 1), "already used by server s1"),
        (CreateVolume("db", 4096), "volume db already exists"),
        (CreateVolume("big", 4096, replicas=4), "needs 4 up servers"),
        (ResizeVolume("db", 4096), "volumes only grow"),
        (ResizeVolume("db", 1 << 30), "already"),
        (ResizeVolume("nope", 4096), "unknown volume nope"),
        (DeleteVolume("nope"), "unknown volume nope"),
        (SetServerState("s1", ServerState.UP), "already"),
        (Publish(cmap.epoch + 1), "the map is at epoch"),
        (Publish(0), "not above the published epoch"),
    ]
    for cmd, words in examples:
        reason = validate(cmap, cmd)
        assert reason is not None, cmd
        assert words in reason, (cmd, reason)


def test_zones_limit_replicas() -> None:
    """With zones, a volume needs as many zones among up servers as it has copies."""
    cmap = final(
        [
            AddServer("s1", "h:1", 1, "a"),
            AddServer("s2", "h:2", 1, "a"),
            AddServer("s3", "h:3", 1),
        ]
    )
    assert validate(cmap, CreateVolume("v", 4096, replicas=2)) is None
    reason = validate(cmap, CreateVolume("v", 4096, replicas=3))
    assert reason is not None
    assert "needs 3 zones" in reason
    assert "'', 'a'" in reason
    down = apply(cmap, SetServerState("s3", ServerState.DOWN))
    assert validate(down, CreateVolume("v", 4096, replicas=2)) is not None


def test_lifecycle_example() -> None:
    """A short history: epochs, fences and published epoch move as the docstring says."""
    cmap = cluster()
    assert cmap.epoch == 4
    db = cmap.volumes["db"]
    assert (db.id, db.layers, db.fence_epoch) == (1, (1,), 3)
    down = apply(cmap, SetServerState("s2", ServerState.DOWN))
    assert down.epoch == 5
    assert down.volumes["db"].fence_epoch == 5
    assert affected_servers(cmap, SetServerState("s2", ServerState.DOWN)) == {"s1", "s2"}
    assert affected_servers(cmap, SetServerState("s3", ServerState.DOWN)) == set()
    published = apply(down, Publish(5))
    assert (published.epoch, published.published_epoch) == (5, 5)
    gone = apply(published, DeleteVolume("db"))
    assert gone.volumes == {}
    assert gone.layers == {}
    again = apply(gone, CreateVolume("db", 4096, replicas=1, stripe=1))
    assert again.volumes["db"].id == 2
    assert again.volumes["db"].layers == (2,)
    assert fences(again) == [(2, 7)]
    assert apply(apply(again, RemoveServer("s3")), AddServer("s3", "h:3", 1)).epoch == 9


@pytest.mark.parametrize(
    "build",
    [
        lambda: AddServer("", "h:1", 1),
        lambda: AddServer("s" * 65, "h:1", 1),
        lambda: AddServer("s 1", "h:1", 1),
        lambda: AddServer("s1", "h", 1),
        lambda: AddServer("s1", "h:0", 1),
        lambda: AddServer("s1", "h:65536", 1),
        lambda: AddServer("s1", ":7000", 1),
        lambda: AddServer("s1", "[::g]:7000", 1),
        lambda: AddServer("s1", "h_1:7000", 1),
        lambda: AddServer("s1", "h:1", 0),
        lambda: AddServer("s1", "h:1", True),
        lambda: AddServer("s1", "h:1", 1, "zone a"),
        lambda: SetServerState("s1", "up"),  # type: ignore[arg-type]
        lambda: CreateVolume("v", 0),
        lambda: CreateVolume("v", 4095),
        lambda: CreateVolume("v", 4096 + 512),
        lambda: CreateVolume("v", cm.MAX_VOLUME_SIZE + 4096),
        lambda: CreateVolume("v", 4096, replicas=0),
        lambda: CreateVolume("v", 4096, replicas=9),
        lambda: CreateVolume("v", 4096, stripe=0),
        lambda: CreateVolume("v", 4096, stripe=65),
        lambda: CreateVolume("v", 4096, page_size=32 * 1024),
        lambda: CreateVolume("v", 4096, page_size=3 << 20),
        lambda: CreateVolume("v", 4096, page_size=32 << 20),
        lambda: ResizeVolume("v", -4096),
        lambda: DeleteVolume("v/1"),
        lambda: Publish(-1),
        lambda: Publish(1.0),  # type: ignore[arg-type]
        lambda: AcquireLock("v", "", "h", 1, 0),
        lambda: AcquireLock("v", "s" * 65, "h", 1, 0),
        lambda: AcquireLock("v", "a/b", "h", 1, 0),
        lambda: AcquireLock("v", "s", "", 1, 0),
        lambda: AcquireLock("v", "s", "h" * 256, 1, 0),
        lambda: AcquireLock("v", "s", "line\nbreak", 1, 0),
        lambda: AcquireLock("v", "s", "h", -1, 0),
        lambda: AcquireLock("v", "s", "h", True, 0),
        lambda: AcquireLock("v", "s", "h", 1, -1),
        lambda: AcquireLock("v", "s", "h", 1, cm.MAX_SINCE_MS + 1),
        lambda: AcquireLock("v", "s", "h", 1, 0, takeover=1),  # type: ignore[arg-type]
        lambda: ReleaseLock("v", "s s"),
        lambda: ReleaseLock("v v", "s"),
    ],
)
def test_commands_check_their_fields_when_built(build: Callable[[], object]) -> None:
    """A command with an out-of-range or ill-typed field cannot be built (BadRequest)."""
    with pytest.raises(BadRequest):
        build()


def test_valid_addresses_and_defaults() -> None:
    """Host names, IPv4 and bracketed IPv6 addresses are accepted; defaults are as documented."""
    for addr in ("store-1.example.org:7000", "10.0.0.1:1", "[::1]:65535", "H:80"):
        assert AddServer("s1", addr, 1).addr == addr
    cmd = CreateVolume("v", 4096)
    assert (cmd.replicas, cmd.stripe, cmd.page_size) == (2, 4, 1 << 20)
    assert AddServer("s1", "h:1", 1).zone == ""


def test_map_is_read_only_and_shares_unchanged_entries() -> None:
    """Maps cannot be changed in place, and a change shares the entries it leaves alone."""
    cmap = cluster()
    with pytest.raises(TypeError):
        cmap.servers["s9"] = cmap.servers["s1"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cmap.epoch = 9  # type: ignore[misc]
    source = dict(cmap.servers)
    copy = ClusterMap(0, 0, source, {}, {}, 1, 1)
    source.clear()
    assert set(copy.servers) == {"s1", "s2", "s3"}
    after = apply(cmap, ResizeVolume("db", 2 << 30))
    assert after.servers is cmap.servers
    assert after.layers is cmap.layers


# --- volume locks, by example ---------------------------------------------------------------

#: 2026-11-25T10:00:00Z in unix milliseconds
T0 = 1_795_600_800_000


def grab(session: str = "abc", *, host: str = "h", pid: int = 123, since: int = T0,
         takeover: bool = False) -> AcquireLock:  # fmt: skip
    return AcquireLock("db", session, host, pid, since, takeover)


def test_acquire_a_free_lock_then_refuse_a_second_holder() -> None:
    """A free lock goes to the first session; another is refused with the holder named;
    both raise the epoch and fence the volume only when applied."""
    cmap = cluster()
    assert validate(cmap, grab()) is None
    assert affected_volumes(cmap, grab()) == {cmap.volumes["db"].id}
    assert affected_servers(cmap, grab()) == {"s1", "s2"}
    locked = apply(cmap, grab())
    assert locked.epoch == cmap.epoch + 1
    assert locked.volumes["db"].fence_epoch == locked.epoch
    assert locked.volumes["db"].lock == Lock("abc", "h", 123, T0)
    assert locked.servers is cmap.servers
    reason = validate(locked, grab("xyz", host="other", pid=9, since=T0 + 5000))
    assert reason == (
        "volume db is locked by host h pid 123 since 2026-11-25T10:00:00Z (session abc)"
    )
    with pytest.raises(InvalidCommand, match="locked by host h pid 123"):
        apply(locked, grab("xyz"))


def test_the_same_session_refreshes_its_lock_and_keeps_since() -> None:
    """A second AcquireLock by the holder's session applies, keeps ``since`` and fences."""
    locked = apply(cluster(), grab())
    again = apply(locked, grab(pid=124, since=T0 + 60_000))
    assert again.volumes["db"].lock == Lock("abc", "h", 124, T0)
    assert again.epoch == locked.epoch + 1
    assert again.volumes["db"].fence_epoch == again.epoch


def test_takeover_replaces_the_holder_and_raises_the_fence() -> None:
    """takeover hands the lock to the new session with its own ``since``, at a new
    epoch that fences the old holder's writes."""
    locked = apply(cluster(), grab())
    taken = apply(locked, grab("xyz", host="h2", pid=7, since=T0 + 1, takeover=True))
    assert taken.volumes["db"].lock == Lock("xyz", "h2", 7, T0 + 1)
    assert taken.volumes["db"].fence_epoch == taken.epoch == locked.epoch + 1
    assert validate(taken, ReleaseLock("db", "abc")) is not None  # the old holder lost it
    free = apply(cluster(), grab(takeover=True))  # takeover of a free lock: a plain grant
    assert free.volumes["db"].lock == Lock("abc", "h", 123, T0)


def test_release_by_the_holder_only() -> None:
    """Only the holder's session releases; the release fences the volume; a free or
    unknown volume cannot be released."""
    cmap = cluster()
    assert validate(cmap, ReleaseLock("db", "abc")) == "volume db is not locked"
    assert validate(cmap, ReleaseLock("nope", "abc")) == "unknown volume nope"
    assert validate(cmap, grab().__class__("nope", "abc", "h", 1, T0)) == "unknown volume nope"
    locked = apply(cmap, grab())
    assert validate(locked, ReleaseLock("db", "xyz")) == (
        "volume db is locked by host h pid 123 since 2026-11-25T10:00:00Z (session abc), "
        "not by session xyz"
    )
    released = apply(locked, ReleaseLock("db", "abc"))
    assert released.volumes["db"].lock is None
    assert released.volumes["db"].fence_epoch == released.epoch == locked.epoch + 1
    assert affected_servers(locked, ReleaseLock("db", "abc")) == {"s1", "s2"}


def test_a_locked_volume_is_not_deleted() -> None:
    """DeleteVolume of a locked volume is refused with the holder named; once released,
    it goes."""
    locked = apply(cluster(), grab())
    reason = validate(locked, DeleteVolume("db"))
    assert reason is not None
    assert reason.startswith("volume db is locked by host h pid 123 since 2026-11-25T10:00:00Z")
    assert validate(apply(locked, ReleaseLock("db", "abc")), DeleteVolume("db")) is None


def test_lock_commands_round_trip_through_bytes() -> None:
    """Both lock commands, takeover included, survive encode/decode with their types."""
    for cmd in (grab(), grab("x-1", host="a b", pid=0, since=0, takeover=True),
                ReleaseLock("db", "abc")):  # fmt: skip
        back = decode_command(encode_command(cmd))
        assert back == cmd
        if isinstance(cmd, AcquireLock):
            assert isinstance(back, AcquireLock)
            assert type(back.takeover) is bool
    bad = msgpack.packb([cm.COMMAND_FORMAT, "acquire_lock", "db", "abc", "h", 1, T0, 1])
    with pytest.raises(ProtocolError, match="takeover"):
        decode_command(bad)


def test_a_lock_round_trips_through_a_dict_and_old_dicts_load() -> None:
    """The lock travels in the volume's dict (null when free); a dict saved before locks
    existed, without the key, loads as unlocked."""
    locked = apply(cluster(), grab())
    d = json.loads(json.dumps(map_to_dict(locked)))
    assert d["volumes"]["db"]["lock"] == {
        "session": "abc",
        "host": "h",
        "pid": 123,
        "since": T0,
    }
    assert map_from_dict(d) == locked
    free = json.loads(json.dumps(map_to_dict(cluster())))
    assert free["volumes"]["db"]["lock"] is None
    del free["volumes"]["db"]["lock"]
    old = map_from_dict(free)
    assert old == cluster()
    assert old.volumes["db"].lock is None


def test_lock_times_show_as_utc() -> None:
    """``since`` reads as ISO 8601 UTC to the second, up to the last representable time."""
    assert cm.format_since(T0 + 999) == "2026-11-25T10:00:00Z"
    assert cm.format_since(0) == "1970-01-01T00:00:00Z"
    assert cm.format_since(cm.MAX_SINCE_MS) == "9999-12-31T23:59:59Z"


def test_rereplicate_moves_a_down_servers_copies_to_filling_copies() -> None:
    """Every copy the down server held goes to the up server outside the partition with
    the lowest fill, marked filling; FillDone ends that; every step fences the volume."""
    before = cluster(SetServerState("s1", ServerState.DOWN))
    assert validate(before, cm.Rereplicate("s2")) == "server s2 is up, not down"
    assert validate(before, cm.Rereplicate("s3")) == "server s3 is up, not down"
    after = apply(before, cm.Rereplicate("s1"))
    (old,) = before.layers.values()
    (layer,) = after.layers.values()
    # in place: the copy order (the bit order of the masks) is kept
    assert layer.placement == tuple(
        tuple("s3" if sid == "s1" else sid for sid in part) for part in old.placement
    )
    assert not after.layers_on("s1")  # it holds nothing now: it may be removed
    assert sorted(layer.filling) == [(0, "s3"), (1, "s3")]
    assert after.volumes["db"].fence_epoch == after.epoch
    assert validate(after, cm.Rereplicate("s1")) == "server s1 holds no partition copy"
    done = apply(after, cm.FillDone(layer.id, 0, "s3"))
    assert done.layers[layer.id].filling == ((1, "s3"),)
    assert done.volumes["db"].fence_epoch == done.epoch
    assert "is not being filled" in str(validate(done, cm.FillDone(layer.id, 0, "s3")))
    assert cm.map_from_dict(json.loads(json.dumps(cm.map_to_dict(after)))) == after


def test_a_retired_server_gets_no_copy_of_the_layer_until_it_is_reclaimed() -> None:
    """Rereplicate retires the down server from the layer; while it is retired no copy of
    that layer goes back to it (the rejection says why), ReclaimDone ends that once, and
    RemoveServer does not (the server's disk may come back under its id)."""
    cmap = final(
        [
            AddServer("s1", "10.0.0.1:7000", 1),
            AddServer("s2", "10.0.0.2:7000", 1),
            CreateVolume("db", 1 << 30, replicas=2, stripe=1),
            AddServer("s3", "10.0.0.3:7000", 1),
            SetServerState("s2", ServerState.DOWN),
            cm.Rereplicate("s2"),
        ]
    )
    (lid,) = cmap.layers
    assert cmap.layers[lid].placement == (("s1", "s3"),)
    assert cmap.layers[lid].retired == ("s2",)
    for cmd in (
        SetServerState("s2", ServerState.RECOVERING),
        SetServerState("s2", ServerState.UP),
        cm.FillDone(lid, 0, "s3"),
        SetServerState("s3", ServerState.DOWN),
    ):
        cmap = apply(cmap, cmd)
    reason = validate(cmap, cm.Rereplicate("s3"))
    assert reason is not None
    assert "s2 still hold(s) an old copy of the layer, not yet reclaimed" in reason
    assert validate(cmap, cm.ReclaimDone(lid, "s3")) == (
        f"server s3 holds no retired copy of layer {lid}"
    )
    reclaimed = apply(cmap, cm.ReclaimDone(lid, "s2"))
    assert reclaimed.layers[lid].retired == ()
    assert reclaimed.epoch == cmap.epoch + 1
    assert reclaimed.volumes["db"].fence_epoch == cmap.volumes["db"].fence_epoch  # no fence
    assert validate(reclaimed, cm.ReclaimDone(lid, "s2")) is not None
    back = apply(reclaimed, cm.Rereplicate("s3"))
    assert back.layers[lid].placement == (("s1", "s2"),)
    assert back.layers[lid].filling == ((0, "s2"),)
    assert back.layers[lid].retired == ("s3",)
    assert cm.map_from_dict(json.loads(json.dumps(cm.map_to_dict(back)))) == back
    # the retired server is fenced with the others
    assert affected_servers(back, AcquireLock("db", "abc", "h", 1, T0)) == {"s1", "s2", "s3"}
    # removed, it stays retired: a server added again under its id may bring the disk back
    gone = apply(back, RemoveServer("s3"))
    assert gone.layers[lid].retired == ("s3",)
    again = apply(gone, AddServer("s3", "10.0.0.3:7000", 1))
    assert cm.holders(again, {again.volumes["db"].id}) == {"s1", "s2", "s3"}
    assert apply(again, cm.ReclaimDone(lid, "s3")).layers[lid].retired == ()
    doc = cm.map_to_dict(back)
    doc["layers"][str(lid)]["retired"] = ["s1"]  # placed there: not retired
    with pytest.raises(ProtocolError, match="retires"):
        cm.map_from_dict(doc)


def test_rereplicate_never_moves_the_only_copy_a_new_one_could_be_filled_from() -> None:
    """A down server's copy stays where it is while its partition has no other copy that
    is up and not being filled: the new copy would have no source, and the old one may
    be the only one with the data (it is reclaimed once retired)."""
    both = cluster(SetServerState("s1", ServerState.DOWN), SetServerState("s2", ServerState.DOWN))
    reason = validate(both, cm.Rereplicate("s1"))
    assert reason is not None
    assert "has no other up copy that is not being filled: s1 keeps its copy" in reason
    moved = apply(cluster(SetServerState("s1", ServerState.DOWN)), cm.Rereplicate("s1"))
    (layer,) = moved.layers.values()
    assert layer.filling == ((0, "s3"), (1, "s3"))
    # s2 is the source of both fills: while they run, it is not re-replicated either
    down = apply(moved, SetServerState("s2", ServerState.DOWN))
    assert "s2 keeps its copy" in str(validate(down, cm.Rereplicate("s2")))
    done = apply(apply(down, cm.FillDone(layer.id, 0, "s3")), cm.FillDone(layer.id, 1, "s3"))
    assert "no up server can take" in str(validate(done, cm.Rereplicate("s2")))  # s1 is down


def test_rereplicate_without_a_free_server_says_why() -> None:
    cmap = final(
        [
            AddServer("s1", "10.0.0.1:7000", 1),
            AddServer("s2", "10.0.0.2:7000", 1),
            CreateVolume("db", 1 << 30, replicas=2, stripe=1),
            SetServerState("s1", ServerState.DOWN),
        ]
    )
    reason = validate(cmap, cm.Rereplicate("s1"))
    assert reason is not None
    assert "no up server can take the copy of partition 0" in reason


def test_the_map_remembers_when_each_server_stopped_being_up() -> None:
    """``up_until``: the epoch a server left ``up`` (down, or recovering after a restart);
    kept while it is not up, kept when it comes back up, and in the map's JSON."""
    cmap = cluster()
    assert cmap.servers["s2"].up_until == 0
    down = apply(cmap, SetServerState("s2", ServerState.DOWN))
    assert down.servers["s2"].up_until == down.epoch
    back = apply(down, SetServerState("s2", ServerState.RECOVERING))
    assert back.servers["s2"].up_until == down.epoch  # not up in between
    up = apply(back, SetServerState("s2", ServerState.UP))
    assert up.servers["s2"].up_until == down.epoch
    restarted = apply(up, cm.ServerStarted("s2", 7))
    restarted = apply(restarted, cm.ServerStarted("s2", 8))  # a new incarnation: recovering
    assert restarted.servers["s2"].state is ServerState.RECOVERING
    assert restarted.servers["s2"].up_until == restarted.epoch
    assert cm.map_from_dict(cm.map_to_dict(restarted)) == restarted

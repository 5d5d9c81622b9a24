"""Snapshots, clones, flatten, rollback and migration through the CLI (`lamina snapshot
...`, `lamina volume clone/flatten/migrate`) and the managers' HTTP API, against one real
local cluster (1 manager, 3 storage servers, started with `lamina up`).  Each test makes
its own volumes; data goes in and comes back out through the driver."""

from __future__ import annotations

import json
import subprocess
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest

from lamina.client.sync import connect
from tests.integration.test_managers import api
from tests.integration.volumes import LocalCluster, MiB, local_cluster

pytestmark = pytest.mark.integration

#: seconds any single command may take, waits included
CLI_TIMEOUT = 30


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("snapshots") / "cluster"
    with local_cluster(root, 1, 3) as cluster:
        yield cluster


def run(lc: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return lc.cli(*args, timeout=CLI_TIMEOUT)


def ok(lc: LocalCluster, *args: str) -> Any:
    """Run a command with --json that must succeed; its decoded output."""
    done = run(lc, *args, "--json")
    assert done.returncode == 0, (args, done.stderr)
    return json.loads(done.stdout)


def fails(lc: LocalCluster, *args: str, code: int = 1) -> str:
    """Run a command that must fail with exit ``code``; its stderr."""
    done = run(lc, *args)
    assert done.returncode == code, (args, done.returncode, done.stdout, done.stderr)
    assert done.stdout == "", (args, done.stdout)
    return done.stderr


def manager(lc: LocalCluster) -> tuple[str, str]:
    """The first manager's URL and the admin token."""
    with lc.cluster_file.open("rb") as f:
        url = tomllib.load(f)["cluster"]["managers"][0]
    return url, (lc.root / "admin.token").read_text().strip()


def write_pages(lc: LocalCluster, name: str, pages: range, stamp: int) -> None:
    """Write 4 KiB at the start of each page of ``pages``: byte ``stamp + page``."""
    with connect(lc.cluster_file) as cluster, cluster.open(name) as volume:
        for page in pages:
            volume.write(page * MiB, bytes([stamp + page]) * 4096)
        volume.flush()


def read_stamps(lc: LocalCluster, name: str, pages: range) -> list[int]:
    """The first byte of each page of ``pages`` of ``name`` (``VOLUME@SNAPSHOT`` too)."""
    with connect(lc.cluster_file) as cluster, cluster.open(name, read_only=True) as volume:
        return [volume.read(page * MiB, 1)[0] for page in pages]


def test_snapshot_create_list_delete_round_trip(lc: LocalCluster) -> None:
    """A snapshot is listed once taken, a second one of the same name is refused with the
    managers' reason, and a deleted one is no longer listed."""
    lc.create_volume("rt", 16 * MiB)
    snap = ok(lc, "snapshot", "create", "rt", "first")
    assert snap["name"] == "first"
    assert snap["clones"] == []
    assert isinstance(snap["layer"], int)
    assert snap["since"] > 1_700_000_000_000
    assert ok(lc, "snapshot", "list", "rt") == [snap]
    table = run(lc, "snapshot", "list", "rt").stdout
    assert "first" in table
    assert "T" in table  # the time as ISO 8601
    assert "Z" in table

    err = fails(lc, "snapshot", "create", "rt", "first")
    assert "volume rt already has a snapshot first" in err
    assert "CONFLICT" in err

    second = ok(lc, "snapshot", "create", "rt", "second")
    assert [s["name"] for s in ok(lc, "snapshot", "list", "rt")] == ["first", "second"]
    info = ok(lc, "volume", "info", "rt")
    assert [s["name"] for s in info["snapshots"]] == ["first", "second"]
    assert info["layers"][-1]["id"] not in (snap["layer"], second["layer"])

    deleted = ok(lc, "snapshot", "delete", "rt", "first")
    assert (deleted["name"], deleted["snapshot"]) == ("rt", "first")
    assert [s["name"] for s in ok(lc, "snapshot", "list", "rt")] == ["second"]


def test_unknown_volumes_and_snapshots_are_named(lc: LocalCluster) -> None:
    """An unknown volume or snapshot is a one-line NOT_FOUND error naming it."""
    lc.create_volume("known", 16 * MiB)
    for args in (
        ("snapshot", "create", "nosuch", "s"),
        ("snapshot", "list", "nosuch"),
        ("volume", "clone", "nosuch@s", "x"),
    ):
        err = fails(lc, *args)
        assert "no volume 'nosuch'" in err, (args, err)
        assert "NOT_FOUND" in err
    for args in (
        ("snapshot", "delete", "known", "nosnap"),
        ("snapshot", "rollback", "known", "nosnap"),
        ("volume", "clone", "known@nosnap", "x"),
    ):
        err = fails(lc, *args)
        assert "volume 'known' has no snapshot 'nosnap'" in err, (args, err)
    err = fails(lc, "snapshot", "create", "known", "bad name!")
    assert "snapshot name must be" in err


def test_usage_errors_are_caught_before_anything_is_sent(lc: LocalCluster) -> None:
    """`volume clone` needs exactly one '@' in its source, and `volume migrate --abort`
    takes no placement: click usage errors (exit 2)."""
    for bad in ("nosnapshot", "a@b@c", "@s", "v@"):
        err = fails(lc, "volume", "clone", bad, "new", code=2)
        assert "VOLUME@SNAPSHOT" in err, (bad, err)
    err = fails(lc, "volume", "migrate", "any", "--abort", "--replicas", "2", code=2)
    assert "--abort" in err
    assert "--replicas" in err
    err = fails(lc, "volume", "migrate", "any", "--servers", "s1,,s2", code=2)
    assert "--servers" in err


def test_a_clone_shares_its_origin_until_flattened(lc: LocalCluster) -> None:
    """A clone names its origin and reads the snapshot's data; the snapshot cannot be
    deleted while the clone stacks it (the refusal names the clone); once the clone is
    flattened it keeps the data, drops the origin, and the snapshot can go."""
    lc.create_volume("base", 16 * MiB)
    write_pages(lc, "base", range(4), 10)
    ok(lc, "snapshot", "create", "base", "gold")
    write_pages(lc, "base", range(2), 50)  # after the snapshot: not in the clone

    clone = ok(lc, "volume", "clone", "base@gold", "copy")
    assert clone["name"] == "copy"
    assert clone["origin"] == "base@gold"
    info = ok(lc, "volume", "info", "copy")
    assert info["origin"] == "base@gold"
    assert len(info["layers"]) == 2
    assert info["layers"][0]["volume_id"] != info["id"]  # shared with base
    assert read_stamps(lc, "copy", range(5)) == [10, 11, 12, 13, 0]
    assert read_stamps(lc, "base@gold", range(5)) == [10, 11, 12, 13, 0]
    (listed,) = ok(lc, "snapshot", "list", "base")
    assert listed["clones"] == ["copy"]

    err = fails(lc, "snapshot", "delete", "base", "gold")
    assert "snapshot gold of volume base is the origin of copy" in err
    err = fails(lc, "volume", "clone", "base@gold", "copy")
    assert "volume copy already exists" in err

    flattened = ok(lc, "volume", "flatten", "copy", "--wait", "--timeout", "20")
    assert flattened["done"] is True
    info = ok(lc, "volume", "info", "copy")
    assert info["origin"] == ""
    assert info["flattening"] is False
    assert all(layer["volume_id"] == info["id"] for layer in info["layers"])
    ok(lc, "snapshot", "delete", "base", "gold")
    assert read_stamps(lc, "copy", range(5)) == [10, 11, 12, 13, 0]
    assert read_stamps(lc, "base", range(5)) == [50, 51, 12, 13, 0]


def test_rollback_is_refused_while_locked_then_restores_the_snapshot(lc: LocalCluster) -> None:
    """A rollback of a volume someone has open read-write is refused naming the holder;
    once it is closed, the rollback makes the volume read as the snapshot."""
    lc.create_volume("rb", 16 * MiB)
    write_pages(lc, "rb", range(3), 20)
    ok(lc, "snapshot", "create", "rb", "before")
    with connect(lc.cluster_file) as cluster, cluster.open("rb") as volume:
        volume.write(0, bytes([99]) * 4096)
        volume.flush()
        err = fails(lc, "snapshot", "rollback", "rb", "before")
        assert "volume rb is attached by host" in err
        assert f"pid {cluster.cluster.pid}" in err
    assert read_stamps(lc, "rb", range(3)) == [99, 21, 22]
    after = ok(lc, "snapshot", "rollback", "rb", "before")
    assert after["name"] == "rb"
    assert read_stamps(lc, "rb", range(3)) == [20, 21, 22]


def test_migrate_wait_moves_every_layer_to_the_given_servers(lc: LocalCluster) -> None:
    """`volume migrate --servers s1,s2 --wait` returns once the migration is over: every
    own layer (the snapshot's too) is then on s1 and s2 only, and the data is intact."""
    created = lc.create_volume("mv", 16 * MiB, replicas=2, stripe=3)
    used = {sid for part in created["layers"][0]["placement"] for sid in part}
    assert "s3" in used  # 6 copies spread over 3 servers
    write_pages(lc, "mv", range(6), 30)
    ok(lc, "snapshot", "create", "mv", "old")
    write_pages(lc, "mv", range(0, 6, 2), 60)

    done = run(lc, "volume", "migrate", "mv", "--servers", "s1,s2", "--wait", "--timeout", "25")
    assert done.returncode == 0, done.stderr
    assert "volume mv migrated" in done.stdout
    assert "now on s1, s2" in done.stdout

    info = ok(lc, "volume", "info", "mv")
    assert info["migration"] == []
    own = [layer for layer in info["layers"] if layer["volume_id"] == info["id"]]
    assert len(own) == 2
    for layer in own:
        assert layer["migrates_to"] is None
        assert {sid for part in layer["placement"] for sid in part} <= {"s1", "s2"}, layer
    (snap,) = info["snapshots"]
    assert snap["layer"] == own[0]["id"]
    assert read_stamps(lc, "mv", range(7)) == [60, 31, 62, 33, 64, 35, 0]
    assert read_stamps(lc, "mv@old", range(7)) == [30, 31, 32, 33, 34, 35, 0]
    progress = ok(lc, "status")["layer_jobs"]
    assert all(job["volume"] != "mv" for job in progress), progress


def test_malformed_migrate_bodies_are_400(lc: LocalCluster) -> None:
    """The migrate endpoint answers 400 naming the field for a body of the wrong shape,
    and changes nothing."""
    lc.create_volume("shape", 16 * MiB)
    url, token = manager(lc)
    path = "/api/v1/volumes/shape/migrate"
    for body, needle in (
        ({"servers": "s1,s2"}, "'servers' must be list"),
        ({"servers": ["s1", 2]}, "'servers' must list server ids"),
        ({"replicas": "2"}, "'replicas' must be int"),
        ({"abort": True, "stripe": 2}, "an abort takes no placement"),
        ({"to": ["s1"]}, "unknown field(s): to"),
    ):
        status, answer = api(url, "POST", path, body, token)
        assert status == 400, (body, answer)
        assert answer["error"] == "BAD_REQUEST"
        assert needle in answer["message"], (body, answer)
    status, answer = api(url, "GET", "/api/v1/volumes/shape/migration")
    assert status == 200
    assert (answer["migrating"], answer["flattening"], answer["layers"]) == (False, False, [])
    assert answer["leader"] is True
    status, answer = api(url, "POST", path, {"abort": True}, token)
    assert status == 409
    assert "volume shape is not migrating" in answer["message"]

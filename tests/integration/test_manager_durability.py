"""Real `lamina manager` processes killed and restarted: what a restarted manager serves."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lamina.clusterctl import ManagerClient, load_cluster_file
from lamina.errors import LaminaError
from lamina.localcluster import _write_cluster_file, http_json
from tests.integration.test_managers import Managers, api, group, leader_of, wait_for
from tests.integration.test_resync import (
    read_whole,
    restart_alone,
    scrub,
    status,
    wait_state,
    write_whole,
)
from tests.integration.test_up import alive, lamina, pids, up
from tests.integration.volumes import LocalCluster, MiB, local_cluster

pytestmark = pytest.mark.integration
__all__ = ["group"]  # the fixture of test_managers, shared
GiB = 1 << 30
SERVERS = 40
VOLUMES = 10


def _get(url: str) -> tuple[int, Any] | None:
    """One GET without retries: (status, body), or None if nothing listens yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _sizes(path: str, body: Any) -> tuple[int, ...]:
    """How much of the map one answer shows: (servers or volumes,) or, for a whole map,
    (epoch, published epoch, servers, volumes)."""
    if path.startswith("/api/v1/map"):
        return body["epoch"], body["published_epoch"], len(body["servers"]), len(body["volumes"])
    return (len(body),)


def test_a_restarted_manager_never_answers_an_empty_or_older_map(group: Managers) -> None:
    """A manager killed with -9 and restarted, polled from the moment it listens, answers
    map reads with 503 until it has caught up, never 200 with fewer servers or volumes
    than the cluster had before the kill."""
    leader = wait_for(lambda: leader_of(group), "a leader")
    for i in range(SERVERS):
        status, body = api(
            leader.url, "POST", "/api/v1/servers",
            {"id": f"s{i}", "addr": f"127.0.0.1:{9000 + i}", "capacity": GiB}, group.token,
        )  # fmt: skip
        assert status == 201, body
    for i in range(VOLUMES):
        status, body = api(
            leader.url, "POST", "/api/v1/volumes", {"name": f"v{i}", "size": GiB}, group.token
        )
        assert status == 201, body
    victim = next(p for p in group.procs if p is not leader)
    paths = ["/api/v1/servers", "/api/v1/volumes", "/api/v1/map", "/api/v1/map?current=1"]
    wait_for(
        lambda: len(api(victim.url, "GET", "/api/v1/volumes")[1]) == VOLUMES,
        f"{victim.id} to apply every change",
    )
    before = {}
    for path in paths:
        status, body = api(victim.url, "GET", path)
        assert status == 200, body
        before[path] = _sizes(path, body)
    assert before["/api/v1/servers"] == (SERVERS,)
    victim.kill()
    starting = threading.Thread(target=victim.start)
    starting.start()
    answers: dict[int, int] = {}
    full = 0
    deadline = time.monotonic() + 60
    k = 0
    try:
        while full < 20 and time.monotonic() < deadline:
            path = paths[k % len(paths)]
            k += 1
            got = _get(victim.url + path)
            if got is None:
                continue
            status, body = got
            answers[status] = answers.get(status, 0) + 1
            if status == 503:
                assert body.get("caught_up") is False, body
                continue
            assert status == 200, (path, body)
            seen = _sizes(path, body)
            assert all(a >= b for a, b in zip(seen, before[path], strict=True)), (path, seen)
            full += 1
    finally:
        starting.join(timeout=60)
    assert full == 20, f"{victim.id} never served its whole map (answers: {answers})"


def test_the_cli_client_asks_another_manager_while_one_catches_up(
    group: Managers, tmp_path: Path
) -> None:
    """The client of the `lamina` commands, given a cluster file that names a manager
    just restarted first, gets the whole server list from the moment that manager
    listens: its 503 (not caught up) sends the client to the next manager."""
    leader = wait_for(lambda: leader_of(group), "a leader")
    for i in range(SERVERS):
        status, body = api(
            leader.url, "POST", "/api/v1/servers",
            {"id": f"s{i}", "addr": f"127.0.0.1:{9000 + i}", "capacity": GiB}, group.token,
        )  # fmt: skip
        assert status == 201, body
    victim = next(p for p in group.procs if p is not leader)
    wait_for(
        lambda: len(api(victim.url, "GET", "/api/v1/servers")[1]) == SERVERS,
        f"{victim.id} to apply every change",
    )
    others = [p.url for p in group.procs if p is not victim]
    _write_cluster_file(tmp_path, [victim.url, *others])
    client = ManagerClient(load_cluster_file(tmp_path / "cluster.toml"), timeout=5)
    victim.kill()
    starting = threading.Thread(target=victim.start)
    starting.start()
    answers = 0
    deadline = time.monotonic() + 60
    try:
        while _get(victim.url + "/api/v1/openapi.json") is None:  # until it listens
            assert time.monotonic() < deadline, f"{victim.id} never listened"
        for _ in range(30):
            servers = client.get("/servers")
            assert len(servers) == SERVERS, f"{len(servers)} servers after the restart"
            answers += 1
    finally:
        starting.join(timeout=60)
    assert answers == 30


def test_up_after_kill_9_of_the_first_manager(tmp_path: Path) -> None:
    """`lamina up` after kill -9 of manager m1 restarts it and succeeds: it does not take
    the restarted manager's empty map for a cluster without storage servers."""
    root = tmp_path / "cluster"
    try:
        up(root)
        os.kill(pids(root)["m1"], signal.SIGKILL)
        again = lamina("up", "--dir", str(root), "--managers", "3", "--servers", "2", "--json")
        assert again.returncode == 0, again.stderr
        report = json.loads(again.stdout)
        assert report["started"] == ["m1"]
        assert report["registered"] == []
    finally:
        if (root / "run").is_dir():
            lamina("down", "--dir", str(root))


def _states_seen(lc: LocalCluster, sid: str) -> set[str]:
    """The states every manager that answers gives ``sid`` right now."""
    layout = json.loads((lc.root / "run" / "layout.json").read_text())
    seen = set()
    for _, port, _, _ in layout["managers"]:
        try:
            code, servers = http_json(f"http://127.0.0.1:{port}", "GET", "/api/v1/servers")
        except OSError:
            continue
        if code == 200:
            seen |= {s["state"] for s in servers if s["id"] == sid}
    return seen


def test_a_storage_server_restarted_across_a_leader_change_goes_recovering(
    tmp_path: Path,
) -> None:
    """kill -9 of the manager leader and, at the same time, kill -9 and restart of storage
    server s1: the new leader, which never granted s1 a lease before, still sees that s1
    restarted (its incarnation is in the map), so s1 goes recovering and is resynced
    before it is up again; the data written before reads back and a scrub finds the
    copies equal."""
    with local_cluster(tmp_path / "cluster", 3, 2) as lc:
        lc.create_volume("v", 8 * MiB, replicas=2, stripe=2)
        data = random.Random(7).randbytes(8 * MiB)
        write_whole(lc, "v", data)
        wait_state(lc, "s1", "up")
        old = status(lc)["leader"]["id"]
        os.kill(int((lc.root / "run" / f"{old}.pid").read_text()), signal.SIGKILL)
        os.kill(lc.storage_pid("s1"), signal.SIGKILL)
        s1 = restart_alone(lc, "s1")
        try:
            seen: set[str] = set()
            deadline = time.monotonic() + 30
            while "recovering" not in seen and time.monotonic() < deadline:
                seen |= _states_seen(lc, "s1")
                time.sleep(0.02)
            assert "recovering" in seen, f"s1 restarted but was only ever {sorted(seen)}"
            leader = wait_for(lambda: (status(lc)["leader"] or {}).get("id"), "a new leader")
            assert leader != old
            wait_state(lc, "s1", "up", timeout=60)
            assert read_whole(lc, "v", len(data)) == data
            report = scrub(lc, "v")
            assert (report["mismatches"], report["corrupt"], report["errors"]) == (0, 0, 0)
        finally:
            s1.stop()


# -- every manager loses power ----------------------------------------------------------
#
# The managers run with the test-only LAMINA_TEST_POWERCUT=1: SIGUSR2 puts each one's Raft
# journal back as its last sync left it, between two Raft ticks, and ends the process
# (lamina.mgmt.powerloss).  `lamina up` then starts them again on what their disks kept.


def _manager_pids(lc: LocalCluster) -> dict[str, int]:
    return {k: v for k, v in pids(lc.root).items() if k.startswith("m")}


def _power_cut_every_manager(lc: LocalCluster) -> None:
    """SIGUSR2 to every manager at once; returns once all of them are gone and each one's
    log says it lost power."""
    managers = _manager_pids(lc)
    assert len(managers) == 3, managers
    for pid in managers.values():
        os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in managers.values()):
        assert time.monotonic() < deadline, "a manager outlived its power cut by 60 s"
        time.sleep(0.05)
    for mid in managers:
        text = (lc.root / "log" / f"{mid}.log").read_text(errors="replace")
        assert "TEST ONLY: power cut" in text, f"{mid} exited without a power cut:\n{text[-2000:]}"


def _volumes(lc: LocalCluster) -> dict[str, dict[str, Any]]:
    done = lc.cli("volume", "list", "--json")
    assert done.returncode == 0, done.stderr
    return {v["name"]: v for v in json.loads(done.stdout)}


def _layers(volumes: dict[str, dict[str, Any]]) -> dict[int, int]:
    """Layer id -> lineage token, over ``volumes``."""
    return {int(la["id"]): int(la["lineage"]) for v in volumes.values() for la in v["layers"]}


def test_acknowledged_changes_survive_a_power_cut_of_every_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Volumes created and a snapshot taken, each acknowledged, then every manager loses
    power at once: after `lamina up` the map holds every one of them with the same ids,
    layers and lineages, the data written before reads back, a scrub finds the copies
    equal, and a new volume gets ids never given before."""
    monkeypatch.setenv("LAMINA_TEST_POWERCUT", "1")
    with local_cluster(tmp_path / "cluster", 3, 2) as lc:
        for k in range(6):
            lc.create_volume(f"v{k}", 4 * MiB, replicas=2, stripe=1)
        data = random.Random(8).randbytes(4 * MiB)
        write_whole(lc, "v0", data)
        snap = lc.cli("snapshot", "create", "v0", "before")
        assert snap.returncode == 0, snap.stderr
        before = _volumes(lc)
        assert sorted(before) == [f"v{k}" for k in range(6)]
        assert len(before["v0"]["layers"]) == 2

        _power_cut_every_manager(lc)
        report = lc.up(3, 2)
        assert sorted(report["started"]) == ["m1", "m2", "m3"], report
        assert report["registered"] == [], report

        after = _volumes(lc)
        assert {n: (v["id"], v["layers"]) for n, v in after.items()} == {
            n: (v["id"], v["layers"]) for n, v in before.items()
        }
        assert read_whole(lc, "v0", len(data)) == data
        report = scrub(lc, "v0")
        assert (report["mismatches"], report["corrupt"], report["errors"]) == (0, 0, 0), report
        new = lc.create_volume("new", 4 * MiB, replicas=2, stripe=1)
        assert new["id"] > max(v["id"] for v in before.values())
        assert not {int(la["id"]) for la in new["layers"]} & set(_layers(before))


def test_a_create_in_flight_when_every_manager_loses_power(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lamina volume create` one after another while every manager loses power: after
    `lamina up` every create that succeeded is there; of those in flight, each is there
    or not, never half (its layers are in the map exactly when it is); and no volume or
    layer id is given twice."""
    monkeypatch.setenv("LAMINA_TEST_POWERCUT", "1")
    with local_cluster(tmp_path / "cluster", 3, 2) as lc:
        acked: list[str] = []
        tried: list[str] = []
        stop = threading.Event()

        def creator() -> None:
            for k in range(200):
                if stop.is_set():
                    return
                name = f"c{k}"
                tried.append(name)
                done = lc.cli(
                    "volume", "create", name, "--size", str(MiB), "--replicas", "2",
                    "--stripe", "1", "--json", timeout=60,
                )  # fmt: skip
                if done.returncode == 0:
                    acked.append(name)

        thread = threading.Thread(target=creator, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while len(acked) < 4:
            assert thread.is_alive(), acked
            assert time.monotonic() < deadline, acked
            time.sleep(0.01)
        _power_cut_every_manager(lc)
        stop.set()
        thread.join(timeout=120)
        assert not thread.is_alive()
        lc.up(3, 2)
        after = _volumes(lc)
        missing = [n for n in acked if n not in after]
        assert missing == [], f"acknowledged creates lost: {missing}"
        assert set(after) <= set(tried)
        ids = [v["id"] for v in after.values()]
        assert len(ids) == len(set(ids))
        for name in set(tried) - set(acked):  # in flight: wholly there or not at all
            assert name not in after or after[name]["layers"], after.get(name)
        new = lc.create_volume("new", MiB, replicas=2, stripe=1)
        assert new["id"] not in ids
        assert not {int(la["id"]) for la in new["layers"]} & set(_layers(after))


def test_a_layer_of_a_lost_map_is_never_served_as_the_new_maps_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The managers' disks roll back (every manager's Raft directory put back as it was
    before volume b was created, after b was written: what losing journal entries would
    do).  The new map gives b's ids to volume c; the storage servers still hold b's layer
    file under that id, recorded with b's lineage, and never serve it as c's: c's I/O is
    refused naming both lineages, never answered with b's bytes."""
    monkeypatch.setenv("LAMINA_TEST_POWERCUT", "1")
    with local_cluster(tmp_path / "cluster", 3, 2) as lc:
        lc.create_volume("a", 4 * MiB, replicas=2, stripe=1)
        managers = sorted(_manager_pids(lc))
        # a copy of what each manager's disk holds now: the next power cut brings it back
        for mid in managers:
            lc.root.joinpath(f"{mid}.saved").mkdir()
        _power_cut_every_manager(lc)
        for mid in managers:
            shutil.copytree(lc.root / mid / "raft", lc.root / f"{mid}.saved" / "raft")
        lc.up(3, 2)
        b = lc.create_volume("b", 4 * MiB, replicas=2, stripe=1)
        secret = random.Random(9).randbytes(4 * MiB)
        write_whole(lc, "b", secret)
        lost_epoch = status(lc)["epoch"]
        _power_cut_every_manager(lc)
        for mid in managers:  # the disks roll back
            shutil.rmtree(lc.root / mid / "raft")
            shutil.copytree(lc.root / f"{mid}.saved" / "raft", lc.root / mid / "raft")
        lc.up(3, 2)
        assert "b" not in _volumes(lc)
        c = lc.create_volume("c", 4 * MiB, replicas=2, stripe=1)
        assert (c["id"], [la["id"] for la in c["layers"]]) == (
            b["id"], [la["id"] for la in b["layers"]]
        )  # fmt: skip
        assert c["layers"][0]["lineage"] != b["layers"][0]["lineage"]
        # the storage servers saw the lost map's epochs: the new map must pass them before
        # they take its requests (each create is one more epoch)
        for k in range(20):
            if status(lc)["epoch"] > lost_epoch:
                break
            lc.create_volume(f"pad{k}", MiB, replicas=2, stripe=1)
        assert status(lc)["epoch"] > lost_epoch
        with pytest.raises(LaminaError) as refused:  # never b's bytes, nor zeros
            read_whole(lc, "c", len(secret))
        assert "another cluster map" in str(refused.value), repr(refused.value)


def test_a_power_cut_switch_of_another_value_is_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manager started with LAMINA_TEST_POWERCUT set to anything but 1 stops at once
    with an error naming the variable; `lamina up` fails and says so."""
    monkeypatch.setenv("LAMINA_TEST_POWERCUT", "yes")
    root = tmp_path / "cluster"
    try:
        done = lamina("up", "--dir", str(root), "--managers", "1", "--servers", "1")
        assert done.returncode != 0
        assert "LAMINA_TEST_POWERCUT='yes'" in done.stderr, done.stderr
        assert "only 1" in done.stderr, done.stderr
    finally:
        if (root / "run").is_dir():
            monkeypatch.delenv("LAMINA_TEST_POWERCUT")
            lamina("down", "--dir", str(root))

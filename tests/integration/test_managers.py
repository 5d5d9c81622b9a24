"""Three real `lamina manager` processes: Raft, the HTTP API, failover."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lamina.localcluster import ManagerProcess, ensure_key, ensure_token, managers

pytestmark = pytest.mark.integration
GiB = 1 << 30


@dataclass
class Managers:
    procs: list[ManagerProcess]
    token: str

    def alive(self) -> list[ManagerProcess]:
        return [p for p in self.procs if p.alive()]


def api(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """One HTTP call: (status, decoded JSON body)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_for(check: Any, what: str, timeout: float = 15.0) -> Any:
    """Poll ``check()`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, urllib.error.URLError):
            last = None
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def leader_of(group: Managers) -> ManagerProcess | None:
    """The manager every live member names as leader, if they agree on one."""
    named = set()
    for p in group.alive():
        _, status = api(p.url, "GET", "/api/v1/status")
        named.add(status["raft"]["leader"])
    if len(named) != 1 or None in named:
        return None
    (addr,) = named
    return next((p for p in group.alive() if p.raft == addr), None)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Managers]:
    ensure_key(tmp_path / "cluster.key")
    token = ensure_token(tmp_path / "admin.token")
    procs = managers(tmp_path, 3, lease_duration=60)  # the servers here are only names
    try:
        for p in procs:
            p.start()
        g = Managers(procs, token)
        wait_for(lambda: leader_of(g), "a leader")
        yield g
    finally:
        for p in procs:
            p.stop()


def test_changes_through_any_manager_reach_every_manager(group: Managers) -> None:
    """A change accepted by any manager is committed through Raft and read from all."""
    a, b, c = group.procs
    for i, via in enumerate((a, b), start=1):
        status, body = api(
            via.url, "POST", "/api/v1/servers",
            {"id": f"s{i}", "addr": f"127.0.0.1:{9000 + i}", "capacity": 10 * GiB},
            group.token,
        )  # fmt: skip
        assert status == 201, body
    status, vol = api(c.url, "POST", "/api/v1/volumes", {"name": "db", "size": GiB}, group.token)
    assert status == 201, vol
    assert vol["replicas"] == 2
    for part in vol["layers"][0]["placement"]:
        assert sorted(part) == ["s1", "s2"]
    epoch = vol["fence_epoch"]
    for p in group.procs:
        got = wait_for(
            lambda p=p: (
                (m := api(p.url, "GET", "/api/v1/map?current=1")[1])["epoch"] >= epoch and m
            ),
            f"{p.id} to apply epoch {epoch}",
        )
        assert set(got["servers"]) == {"s1", "s2"}
        assert list(got["volumes"]) == ["db"]


def test_leader_kill_9_elects_a_new_leader_and_loses_nothing(group: Managers) -> None:
    """kill -9 of the leader: a new leader within seconds, committed changes kept, and
    the survivors keep accepting changes."""
    for i in (1, 2, 3):
        status, _ = api(
            group.procs[0].url, "POST", "/api/v1/servers",
            {"id": f"s{i}", "addr": f"127.0.0.1:{9000 + i}", "capacity": GiB}, group.token,
        )  # fmt: skip
        assert status == 201
    status, _ = api(
        group.procs[0].url, "POST", "/api/v1/volumes", {"name": "v1", "size": GiB}, group.token
    )
    assert status == 201
    old = leader_of(group)
    assert old is not None
    old.kill()
    started = time.monotonic()
    new = wait_for(
        lambda: (ld := leader_of(group)) is not None and ld is not old and ld, "a new leader"
    )
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"new leader after {elapsed:.1f}s"
    survivor = group.alive()[0]
    status, body = api(
        survivor.url, "POST", "/api/v1/volumes", {"name": "v2", "size": GiB}, group.token
    )
    assert status == 201, body
    for p in group.alive():
        names = wait_for(
            lambda p=p: (
                (v := api(p.url, "GET", "/api/v1/map?current=1")[1]["volumes"])
                and len(v) == 2
                and v
            ),
            f"{p.id} to see both volumes",
        )
        assert sorted(names) == ["v1", "v2"]
    assert new.alive()
    old.start()  # it comes back and catches up from the journal and the leader
    wait_for(
        lambda: (
            (got := api(old.url, "GET", "/api/v1/map?current=1"))[0] == 200  # 503: catching up
            and len(got[1]["volumes"]) == 2
        ),
        "the old leader to catch up",
    )


def test_bad_requests_get_clear_http_errors_and_change_nothing(group: Managers) -> None:
    """No token 401, malformed JSON/unknown field/wrong type 400, unknown name 404, a
    rejected proposal 409 with the managers' reason; the map does not move."""
    url = group.procs[1].url
    api(
        url,
        "POST",
        "/api/v1/servers",
        {"id": "s1", "addr": "127.0.0.1:9001", "capacity": GiB},
        group.token,
    )
    before = wait_for(  # once published, nothing but a change moves the map
        lambda: (
            (x := api(url, "GET", "/api/v1/map?current=1")[1])["published_epoch"] == x["epoch"]
            and x
        ),
        "publication of s1",
    )
    cases: list[tuple[int, str, str, Any, str | None, bytes | None]] = [
        (401, "POST", "/api/v1/volumes", {"name": "v", "size": GiB}, None, None),
        (
            401,
            "POST",
            "/api/v1/volumes",
            {"name": "v", "size": GiB},
            "wrong-token-wrong-token",
            None,
        ),
        (400, "POST", "/api/v1/volumes", None, group.token, b"{not json"),
        (
            400,
            "POST",
            "/api/v1/volumes",
            {"name": "v", "size": GiB, "colour": 1},
            group.token,
            None,
        ),
        (400, "POST", "/api/v1/volumes", {"name": "v", "size": "big"}, group.token, None),
        (400, "POST", "/api/v1/volumes", {"name": "v", "size": True}, group.token, None),
        (400, "POST", "/api/v1/volumes", {"name": "v", "size": 1000}, group.token, None),
        (400, "POST", "/api/v1/volumes", {"name": "bad name!", "size": GiB}, group.token, None),
        (
            409,
            "POST",
            "/api/v1/volumes",
            {"name": "v", "size": GiB, "replicas": 3},
            group.token,
            None,
        ),
        (404, "GET", "/api/v1/volumes/nope", None, None, None),
        (404, "DELETE", "/api/v1/volumes/nope", None, group.token, None),
        (404, "DELETE", "/api/v1/servers/nope", None, group.token, None),
        (
            409,
            "POST",
            "/api/v1/servers",
            {"id": "s1", "addr": "127.0.0.1:9009", "capacity": 1},
            group.token,
            None,
        ),
    ]
    for expected, method, path, body, token, raw in cases:
        status, answer = api(url, method, path, body, token, raw)
        assert status == expected, (method, path, body, answer)
        assert answer["message"], answer
    _, after = api(url, "GET", "/api/v1/map?current=1")
    assert after == before
    status, spec = api(url, "GET", "/api/v1/openapi.json")
    assert status == 200
    assert "/api/v1/volumes" in spec["paths"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--peers", "127.0.0.1:2"], "1, 3 or 5"),
        (["--listen", "nowhere"], "HOST:PORT"),
    ],
)
def test_manager_bad_arguments_are_one_line_errors(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    """A manager started with bad arguments exits non-zero with a one-line message."""
    key = tmp_path / "cluster.key"
    ensure_key(key)
    ensure_token(tmp_path / "admin.token")
    base = [
        "--id",
        "m1",
        "--raft",
        "127.0.0.1:1",
        "--data",
        str(tmp_path / "m1"),
        "--key",
        str(key),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "lamina", "manager", *base, *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert needle in lines[0]


def test_a_paused_manager_never_serves_a_map_behind_what_clients_have_seen(
    group: Managers,
) -> None:
    """A leader paused with SIGSTOP loses its role; changes go on through the others; once
    resumed it answers a client that has seen epoch N either 503 or a map at least that
    new, never an older one, and what it commits is what the majority has."""
    old = leader_of(group)
    assert old is not None
    assert old.proc is not None
    old.proc.send_signal(signal.SIGSTOP)
    try:
        others = [p for p in group.procs if p is not old]
        wait_for(lambda: api(others[0].url, "GET", "/api/v1/status")[1]["raft"]["is_leader"]
                 or api(others[1].url, "GET", "/api/v1/status")[1]["raft"]["is_leader"],
                 "a leader among the others")  # fmt: skip
        for i in (1, 2, 3):
            status, body = api(
                others[0].url, "POST", "/api/v1/servers",
                {"id": f"s{i}", "addr": f"127.0.0.1:{9100 + i}", "capacity": GiB}, group.token,
            )  # fmt: skip
            assert status == 201, body
        seen = wait_for(
            lambda: (
                (x := api(others[0].url, "GET", "/api/v1/map")[1])["published_epoch"] >= 3
                and x["published_epoch"]
            ),
            "publication of the new servers",
        )
    finally:
        old.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    answered = False
    while time.monotonic() < deadline:
        status, body = api(old.url, "GET", f"/api/v1/map?min_epoch={seen}")
        if status == 200:
            assert body["published_epoch"] >= seen
            assert set(body["servers"]) == {"s1", "s2", "s3"}
            answered = True
            break
        assert status == 503, body
        time.sleep(0.05)
    assert answered, "the resumed manager never caught up"
    status, body = api(
        old.url, "POST", "/api/v1/servers",
        {"id": "s4", "addr": "127.0.0.1:9104", "capacity": GiB}, group.token,
    )  # fmt: skip
    assert status == 201, body  # committed through the current leader
    for p in others:
        wait_for(
            lambda p=p: "s4" in api(p.url, "GET", "/api/v1/map?current=1")[1]["servers"],
            f"{p.id} to have s4",
        )

"""The client commands (`lamina status`, `lamina volume ...`, `lamina server ...`) run as
real processes against three real managers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lamina.localcluster import ensure_key, ensure_token, free_ports, managers
from tests.integration.test_managers import Managers, api, leader_of, wait_for

pytestmark = pytest.mark.integration
GiB = 1 << 30


def write_cluster_file(path: Path, urls: Sequence[str], token: str = "admin.token") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[cluster]\n"
        f"managers = [{', '.join(json.dumps(u) for u in urls)}]\n"
        'key = "cluster.key"\n'
        f"admin_token = {json.dumps(token)}\n"
    )
    return path


@dataclass
class Cli:
    """Runs `python -m lamina` in ``cwd`` with LAMINA_CLUSTER set to ``cluster`` (if any)."""

    cwd: Path
    cluster: Path | None

    def run(self, *args: str, env_cluster: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "LAMINA_CLUSTER"}
        chosen = env_cluster if env_cluster is not None else self.cluster
        if chosen is not None:
            env["LAMINA_CLUSTER"] = str(chosen)
        return subprocess.run(
            [sys.executable, "-m", "lamina", *args],
            cwd=self.cwd, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def fails(self, *args: str, code: int = 1, env_cluster: str | None = None) -> str:
        """Run a command that must fail: exit ``code``, nothing on stdout, one stderr line."""
        done = self.run(*args, env_cluster=env_cluster)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == code, (args, done.returncode, done.stderr)
        assert len(lines) == 1, (args, done.stderr)
        assert lines[0].startswith("error: "), lines[0]
        assert done.stdout == "", (args, done.stdout)
        return lines[0]


@dataclass
class Env:
    group: Managers
    cli: Cli

    @property
    def url(self) -> str:
        return self.group.procs[0].url

    def map(self) -> Any:
        return api(self.url, "GET", "/api/v1/map?current=1")[1]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    ensure_key(tmp_path / "cluster.key")
    token = ensure_token(tmp_path / "admin.token")
    procs = managers(tmp_path, 3, lease_duration=60)  # the servers here are only names
    try:
        for p in procs:
            p.start()
        group = Managers(procs, token)
        wait_for(lambda: leader_of(group), "a leader")
        cluster = write_cluster_file(tmp_path / "cluster.toml", [p.url for p in procs])
        work = tmp_path / "work"  # no lamina-data/ here: only LAMINA_CLUSTER finds the file
        work.mkdir()
        yield Env(group, Cli(work, cluster))
    finally:
        for p in procs:
            p.stop()


def add_servers(cli: Cli, count: int) -> None:
    for i in range(1, count + 1):
        cli.ok("server", "add", f"s{i}", "--addr", f"127.0.0.1:{9000 + i}")


def test_servers_and_volumes_through_their_whole_life(env: Env) -> None:
    """Servers are added, volumes created, listed, inspected, grown and deleted, and a
    server that holds nothing is removed, each visible in the JSON the CLI prints."""
    cli = env.cli
    add_servers(cli, 2)
    added = cli.json("server", "add", "s3", "--addr", "127.0.0.1:9003", "--capacity", "512G")
    assert added["id"] == "s3"
    servers = cli.json("server", "list")
    assert [(s["id"], s["capacity"], s["copies"]) for s in servers] == [
        ("s1", 1 << 40, 0), ("s2", 1 << 40, 0), ("s3", 512 * GiB, 0),
    ]  # fmt: skip

    status = cli.json("status")
    assert [(s["id"], s["addr"], s["state"]) for s in status["servers"]] == [
        (f"s{i}", f"127.0.0.1:{9000 + i}", "up") for i in (1, 2, 3)
    ]
    assert all(m["reachable"] for m in status["managers"])
    assert status["leader"] is not None
    assert status["problems"] == []
    assert status["epoch"] >= 3

    db = cli.json("volume", "create", "db", "--size", "10G", "--replicas", "2", "--stripe", "4")
    assert (db["name"], db["size"], db["replicas"], db["stripe"]) == ("db", 10 * GiB, 2, 4)
    (layer,) = db["layers"]
    assert len(layer["placement"]) == 4
    for part in layer["placement"]:
        assert len(set(part)) == 2
        assert set(part) <= {"s1", "s2", "s3"}
    out = cli.ok("volume", "create", "logs", "--size", "512M", "--page-size", "64K")
    assert "created volume logs" in out

    listed = cli.json("volume", "list")
    assert [(v["name"], v["size"]) for v in listed] == [("db", 10 * GiB), ("logs", 512 << 20)]
    assert listed[1]["page_size"] == 64 << 10
    info = cli.json("volume", "info", "db")
    assert info.pop("lost_pages") == []  # what the leader's worker found, beside the map
    assert info == db
    table = cli.ok("volume", "list")
    assert "db" in table
    assert "10 GiB" in table
    assert sum(s["copies"] for s in cli.json("server", "list")) == 4 * 2 + 4 * 2

    grown = cli.json("volume", "resize", "db", "--size", "20G")
    assert grown["size"] == 20 * GiB
    assert grown["fence_epoch"] > db["fence_epoch"]
    assert cli.json("volume", "info", "db")["size"] == 20 * GiB

    assert "deleted volume db" in cli.ok("volume", "delete", "db")
    assert cli.json("volume", "delete", "logs")["name"] == "logs"
    assert cli.json("volume", "list") == []
    assert "removed server s3" in cli.ok("server", "remove", "s3")
    assert [s["id"] for s in cli.json("server", "list")] == ["s1", "s2"]
    assert "healthy" in cli.ok("status")


def test_errors_are_one_line_and_change_nothing(env: Env, tmp_path: Path) -> None:
    """Bad sizes, unknown names, duplicates, impossible placements, removing a server
    that holds copies and a wrong token each print one line, exit 1 and change nothing."""
    cli = env.cli
    add_servers(cli, 2)
    cli.ok("volume", "create", "db", "--size", "1G")
    before = env.map()
    before.pop("published_epoch")  # publication runs on its own; the errors must change the rest
    cases: list[tuple[list[str], str]] = [
        (["volume", "create", "v", "--size", "10X"], "bad size '10X'"),
        (["volume", "create", "v", "--size", "1G", "--page-size", "big"], "bad page size 'big'"),
        (["volume", "resize", "db", "--size", "-5G"], "bad size '-5G'"),
        (
            ["server", "add", "s9", "--addr", "127.0.0.1:9009", "--capacity", "1Q"],
            "bad capacity '1Q'",
        ),
        (["volume", "info", "nope"], "(NOT_FOUND)"),
        (["volume", "resize", "nope", "--size", "2G"], "(NOT_FOUND)"),
        (["volume", "delete", "nope"], "(NOT_FOUND)"),
        (["server", "remove", "nope"], "(NOT_FOUND)"),
        (["volume", "create", "db", "--size", "1G"], "already exists"),
        (["server", "add", "s1", "--addr", "127.0.0.1:9009"], "already exists"),
        (["volume", "create", "v", "--size", "1G", "--replicas", "3"], "3 up servers"),
        (["server", "remove", "s1"], "holds copies"),
        (["volume", "resize", "db", "--size", "512M"], "only grow"),
        (["volume", "create", "v", "--size", "5000"], "multiple of 4096"),
        (["volume", "create", "bad/name", "--size", "1G"], "(BAD_REQUEST)"),
    ]
    for args, needle in cases:
        assert needle in cli.fails(*args), args
    (tmp_path / "wrong.token").write_text("not-the-admin-token-at-all\n")
    wrong = write_cluster_file(
        tmp_path / "wrong.toml", [p.url for p in env.group.procs], "wrong.token"
    )
    line = cli.fails("volume", "delete", "db", env_cluster=str(wrong))
    assert "(AUTH_FAILED)" in line
    missing = write_cluster_file(
        tmp_path / "missing.toml", [p.url for p in env.group.procs], "absent.token"
    )
    assert "absent.token" in cli.fails("volume", "delete", "db", env_cluster=str(missing))
    after = env.map()
    after.pop("published_epoch")
    assert after == before


def test_missing_or_malformed_cluster_files_are_one_line_errors(tmp_path: Path) -> None:
    """No cluster file (default path, LAMINA_CLUSTER, --cluster) or a malformed one is a
    one-line error naming the file, exit 1."""
    cli = Cli(tmp_path, None)
    assert "lamina-data/cluster.toml" in cli.fails("status")
    assert "from LAMINA_CLUSTER" in cli.fails("volume", "list", env_cluster="/nowhere/c.toml")
    assert "/nowhere/x.toml" in cli.fails("server", "list", "--cluster", "/nowhere/x.toml")
    bad = {
        "syntax.toml": "[cluster\n",
        "table.toml": '[cluster]\nmanagers = ["http://127.0.0.1:1"]\n[extra]\n',
        "key.toml": '[cluster]\nmanagers = ["http://127.0.0.1:1"]\ncolour = "red"\n',
        "empty.toml": "[cluster]\nmanagers = []\n",
        "url.toml": '[cluster]\nmanagers = ["127.0.0.1:7301"]\n',
        "notable.toml": "",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        line = cli.fails("status", "--cluster", str(tmp_path / name))
        assert name in line, line


def test_unreachable_managers_exit_3_and_bad_sizes_are_caught_first(tmp_path: Path) -> None:
    """A cluster file pointing at closed ports gives exit 3 with one line; a bad size is
    refused before any manager is asked (exit 1); the default cluster file is found."""
    urls = [f"http://127.0.0.1:{port}" for port in free_ports(3)]
    write_cluster_file(tmp_path / "lamina-data" / "cluster.toml", urls)
    ensure_token(tmp_path / "lamina-data" / "admin.token")
    cli = Cli(tmp_path, None)  # found at ./lamina-data/cluster.toml
    line = cli.fails("status", code=3)
    assert "no manager reachable" in line
    assert "connection refused" in line
    assert "(UNAVAILABLE)" in cli.fails("volume", "list", code=3)
    assert "(UNAVAILABLE)" in cli.fails("server", "add", "s1", "--addr", "h:1", code=3)
    assert "'10X'" in cli.fails("volume", "create", "v", "--size", "10X", code=1)
    given = write_cluster_file(tmp_path / "given.toml", urls)
    assert "no manager reachable" in cli.fails(
        "volume", "list", "--cluster", str(given), code=3, env_cluster="/nowhere/c.toml"
    )


def test_status_and_changes_survive_a_killed_manager(env: Env, tmp_path: Path) -> None:
    """kill -9 of one manager: status reports it unreachable and exits 0, and reads and
    changes go to the next manager in the cluster file."""
    add_servers(env.cli, 2)
    leader = leader_of(env.group)
    assert leader is not None
    victim = next(p for p in env.group.procs if p is not leader)
    victim.kill()
    first = [victim, *(p for p in env.group.procs if p is not victim)]
    cli = Cli(env.cli.cwd, write_cluster_file(tmp_path / "c2.toml", [p.url for p in first]))
    status = cli.json("status")
    by_url = {m["url"]: m for m in status["managers"]}
    assert by_url[victim.url]["reachable"] is False
    assert by_url[victim.url]["error"] == "connection refused"
    assert all(by_url[p.url]["reachable"] for p in first[1:])
    assert status["leader"]["url"] == leader.url
    assert any("unreachable" in p for p in status["problems"])
    assert [s["id"] for s in status["servers"]] == ["s1", "s2"]
    text = cli.ok("status")
    assert "unreachable" in text
    assert "degraded" in text
    cli.ok("volume", "create", "db", "--size", "1G")
    assert [v["name"] for v in cli.json("volume", "list")] == ["db"]

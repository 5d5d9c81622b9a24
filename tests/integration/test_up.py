"""`lamina up` / `lamina down`: a local cluster of background daemons."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lamina.localcluster import down, http_json

pytestmark = pytest.mark.integration


def lamina(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lamina", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").read_bytes() != b""


def pids(root: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in sorted((root / "run").glob("*.pid"))}


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "cluster"
    try:
        yield where
    finally:
        if (where / "run").is_dir():
            down(where)


def up(root: Path) -> dict[str, Any]:
    done = lamina("up", "--dir", str(root), "--managers", "3", "--servers", "2", "--json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_up_starts_everything_then_only_what_is_missing(root: Path) -> None:
    """`lamina up` starts 3 managers and 2 storage servers, registers the servers and
    writes cluster.toml; run again after kill -9 of one of each, it restarts exactly
    those; `lamina down` stops them all."""
    first = up(root)
    assert sorted(first["started"]) == ["m1", "m2", "m3", "s1", "s2"]
    assert sorted(first["registered"]) == ["s1", "s2"]
    assert (root / "cluster.toml").exists()
    running = pids(root)
    assert all(alive(pid) for pid in running.values())
    url = next(line for line in (root / "cluster.toml").read_text().split('"') if "http" in line)
    status, servers = http_json(url, "GET", "/api/v1/servers")
    assert status == 200
    assert [s["id"] for s in servers] == ["s1", "s2"]

    for daemon in ("m2", "s1"):
        os.kill(running[daemon], signal.SIGKILL)
    second = up(root)
    assert sorted(second["started"]) == ["m2", "s1"]
    assert sorted(second["running"]) == ["m1", "m3", "s2"]
    assert second["registered"] == []  # s1 is known already
    for daemon, pid in pids(root).items():
        assert alive(pid), daemon

    stopping = pids(root)
    done = lamina("down", "--dir", str(root), "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(done.stdout)["stopped"]) == ["m1", "m2", "m3", "s1", "s2"]
    assert not any(alive(pid) for pid in stopping.values())
    assert pids(root) == {}


def test_up_refuses_a_different_shape_and_down_an_empty_dir(tmp_path: Path, root: Path) -> None:
    """A second `up` asking for another number of daemons, and `down` where no cluster
    is, are one-line errors."""
    up(root)
    done = lamina("up", "--dir", str(root), "--managers", "1", "--servers", "2")
    assert done.returncode != 0
    assert "lamina down" in done.stderr
    done = lamina("down", "--dir", str(tmp_path / "nothing"))
    assert done.returncode != 0
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1

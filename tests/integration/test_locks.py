"""Volume locks, sessions and failure reports against a real local cluster (`lamina up`:
three managers, two storage servers, a 2 s session timeout), over HTTP as a driver
calls them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lamina.clusterctl import load_cluster_file
from lamina.localcluster import down, up
from tests.integration.support import tail
from tests.integration.test_managers import api, wait_for

pytestmark = pytest.mark.integration
GiB = 1 << 30
SESSION_TIMEOUT = 2.0


@dataclass
class Local:
    root: Path
    urls: list[str]
    token: str

    def call(self, method: str, path: str, body: Any = None, url: str | None = None) -> Any:
        """One admin call to ``url`` (default: the first manager): (status, answer)."""
        return api(url or self.urls[0], method, "/api/v1" + path, body, self.token)

    def volume(self, name: str) -> dict[str, Any]:
        status, body = self.call("GET", f"/volumes/{name}")
        assert status == 200, body
        return dict(body)

    def create(self, name: str) -> None:
        status, body = self.call("POST", "/volumes", {"name": name, "size": GiB, "stripe": 2})
        assert status == 201, body

    def acquire(self, name: str, session: str, takeover: bool = False, **who: Any) -> Any:
        body = {"session": session, "host": who.get("host", f"host-{session}"),
                "pid": who.get("pid", 100), "takeover": takeover}  # fmt: skip
        return self.call("POST", f"/volumes/{name}/lock", body)

    def lamina(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lamina", *args, "--cluster", str(self.root / "cluster.toml")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Local]:
    root = tmp_path_factory.mktemp("locks") / "cluster"
    try:
        up(root, 3, 2, say=lambda _: None, session_timeout=SESSION_TIMEOUT)
        cluster = load_cluster_file(root / "cluster.toml")
        yield Local(root, list(cluster.managers), cluster.token())
    finally:
        if (root / "run").is_dir():
            down(root)
        for log in sorted((root / "log").glob("*.log")):
            print(f"--- {log.name} ---\n{tail(log, 2500)}")


@contextmanager
def keepalives(local: Local, session: str, period: float = 0.4) -> Iterator[None]:
    """Keep ``session`` alive at every manager (as a driver does) while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            for url in local.urls:
                with suppress(OSError):  # a manager down for a moment: the next beat
                    local.call("POST", f"/sessions/{session}/keepalive", url=url)
            stop.wait(period)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=20)


def published(local: Local, epoch: int, url: str) -> dict[str, Any] | None:
    status, body = api(url, "GET", f"/api/v1/map?min_epoch={epoch}")
    return dict(body) if status == 200 else None


def test_one_holder_at_a_time_refresh_and_takeover(local: Local) -> None:
    """A free lock is granted; a second session gets 409 naming the holder; the holder
    may take it again (since kept); takeover hands it over at a higher epoch that every
    manager publishes with the new holder; release needs the holder's session."""
    local.create("db")
    with keepalives(local, "sess-a"), keepalives(local, "sess-b"):
        status, first = local.acquire("db", "sess-a", host="web-1", pid=4242)
        assert status == 200, first
        lock = first["lock"]
        assert {k: lock[k] for k in ("session", "host", "pid")} == {
            "session": "sess-a", "host": "web-1", "pid": 4242,
        }  # fmt: skip
        assert abs(lock["since"] / 1000 - time.time()) < 60
        assert local.volume("db")["lock"] == lock

        status, refused = local.acquire("db", "sess-b")
        assert status == 409, refused
        assert refused["error"] == "CONFLICT"
        assert "volume db is locked by host web-1 pid 4242 since " in refused["message"]
        assert refused["message"].endswith("Z (session sess-a)")
        assert refused["holder"] == lock

        status, again = local.acquire("db", "sess-a", host="web-1", pid=4243)
        assert status == 200, again
        assert again["epoch"] > first["epoch"]
        assert again["lock"] == {**lock, "pid": 4243}  # refreshed, since kept

        status, taken = local.acquire("db", "sess-b", takeover=True, host="web-2", pid=7)
        assert status == 200, taken
        assert taken["epoch"] > again["epoch"]
        assert taken["lock"]["session"] == "sess-b"
        for url in local.urls:
            seen = wait_for(lambda url=url: published(local, taken["epoch"], url),
                            f"epoch {taken['epoch']} published at {url}")  # fmt: skip
            assert seen["volumes"]["db"]["lock"] == taken["lock"]
            assert seen["volumes"]["db"]["fence_epoch"] >= taken["epoch"]

        status, body = local.call("DELETE", "/volumes/db/lock?session=sess-a")
        assert status == 409, body
        assert body["holder"]["session"] == "sess-b"
        status, body = local.call("DELETE", "/volumes/db")
        assert status == 409, body
        assert "locked by host web-2 pid 7" in body["message"]
        status, body = local.call("DELETE", "/volumes/db/lock?session=sess-b")
        assert status == 200, body
        assert body["epoch"] > taken["epoch"]
        assert local.volume("db")["lock"] is None
        status, body = local.call("DELETE", "/volumes/db/lock?session=sess-b")
        assert status == 409, body
        assert "not locked" in body["message"]


def test_bad_lock_requests_get_clear_errors(local: Local) -> None:
    """Unknown volume 404, malformed fields 400, no admin token 401, from every manager."""
    local.create("bad")
    cases: list[tuple[int, str, str, Any]] = [
        (404, "POST", "/volumes/nope/lock", {"session": "s", "host": "h", "pid": 1}),
        (404, "DELETE", "/volumes/nope/lock?session=s", None),
        (400, "POST", "/volumes/bad/lock", {"session": "a b", "host": "h", "pid": 1}),
        (400, "POST", "/volumes/bad/lock", {"session": "s", "host": "", "pid": 1}),
        (400, "POST", "/volumes/bad/lock", {"session": "s", "host": "h", "pid": -1}),
        (400, "POST", "/volumes/bad/lock", {"session": "s", "host": "h", "pid": 1, "x": 1}),
        (400, "POST", "/volumes/bad/lock", {"session": "s", "host": "h", "pid": 1,
                                             "takeover": "yes"}),
        (400, "DELETE", "/volumes/bad/lock", None),
        (400, "POST", "/sessions/a%20b/keepalive", None),
    ]  # fmt: skip
    for url in local.urls:
        wait_for(lambda url=url: "bad" in api(url, "GET", "/api/v1/map?current=1")[1]["volumes"],
                 f"{url} to know the volume")  # fmt: skip
        for expected, method, path, body in cases:
            status, answer = local.call(method, path, body, url=url)
            assert status == expected, (url, method, path, answer)
            assert answer["message"]
    status, answer = api(local.urls[1], "POST", "/api/v1/sessions/s/keepalive")
    assert status == 401, answer
    assert local.volume("bad")["lock"] is None


def test_keepalives_keep_a_lock_and_silence_releases_it(local: Local) -> None:
    """While keepalives come, the lock stays and every manager lists it; once they stop,
    the leader releases it within the session timeout and a few seconds, fencing the
    volume at a new epoch."""
    local.create("ka")
    with keepalives(local, "sess-k"):
        status, grant = local.acquire("ka", "sess-k")
        assert status == 200, grant
        for url in local.urls:
            status, answer = local.call("POST", "/sessions/sess-k/keepalive", url=url)
            assert status == 200, answer
            assert answer["timeout"] == SESSION_TIMEOUT
            wait_for(lambda url=url: local.call("POST", "/sessions/sess-k/keepalive",
                                                url=url)[1]["locks"] == ["ka"],
                     f"{url} to list the lock")  # fmt: skip
        time.sleep(2 * SESSION_TIMEOUT)
        assert local.volume("ka")["lock"] is not None
        silent = time.monotonic()
    deadline = silent + SESSION_TIMEOUT + 6
    while local.volume("ka")["lock"] is not None:
        assert time.monotonic() < deadline, "the lock outlived its session"
        time.sleep(0.1)
    assert time.monotonic() - silent >= SESSION_TIMEOUT * 0.5
    volume = local.volume("ka")
    assert volume["fence_epoch"] > grant["epoch"]
    status, answer = local.call("POST", "/sessions/sess-k/keepalive")
    assert (status, answer["locks"]) == (200, [])


def test_volume_info_shows_the_holder_and_unlock_breaks_the_lock(local: Local) -> None:
    """`lamina volume info` names the holder; `lamina volume unlock` releases the lock
    whoever holds it and says who did; afterwards info shows none."""
    local.create("cli")
    with keepalives(local, "sess-c"):
        status, grant = local.acquire("cli", "sess-c", host="vm-host", pid=31337)
        assert status == 200, grant
        done = local.lamina("volume", "info", "cli")
        assert done.returncode == 0, done.stderr
        assert "lock: host vm-host pid 31337 since " in done.stdout
        assert "(session sess-c)" in done.stdout
        done = local.lamina("volume", "unlock", "cli")
        assert done.returncode == 0, done.stderr
        assert "unlocked volume cli, held by host vm-host pid 31337" in done.stdout
    assert local.volume("cli")["lock"] is None
    done = local.lamina("volume", "info", "cli", "--json")
    assert done.returncode == 0, done.stderr
    assert '"lock": null' in done.stdout
    done = local.lamina("volume", "unlock", "cli")
    assert done.returncode == 0, done.stderr
    assert "volume cli is not locked" in done.stdout
    done = local.lamina("volume", "unlock", "nope")
    assert done.returncode == 1
    assert "NOT_FOUND" in done.stderr


def report(local: Local, sid: str) -> tuple[int, Any]:
    """Report ``sid`` the way a driver does: managers in turn until one is not 503;
    every 503 names the leader it knows."""
    answers = []
    for url in local.urls:
        status, body = local.call("POST", f"/servers/{sid}/report", {"reason": "timeout"}, url)
        if status != 503:
            return status, body
        assert "not the leader" in body["message"], body
        assert "leader" in body
        answers.append(body)
    return 503, answers


def epochs(local: Local) -> list[int]:
    return [api(url, "GET", "/api/v1/map?current=1")[1]["epoch"] for url in local.urls]


def test_reports_mark_a_dead_server_down_and_leave_a_live_one_up(local: Local) -> None:
    """A reported server that answers PING stays up; one killed with kill -9 is marked
    down by the report itself (no waiting for its lease), and a second report changes
    nothing; an unknown server is 404."""
    status, body = wait_for(lambda: (a := report(local, "s1"))[0] == 200 and a, "a report")
    assert body == {"state": "up", "checked": "reachable"}
    assert report(local, "s9")[0] == 404
    pid = int((local.root / "run" / "s2.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    status, body = report(local, "s2")
    assert (status, body) == (200, {"state": "down", "checked": "unreachable"})
    assert time.monotonic() - started < 2.5
    for url in local.urls:
        wait_for(lambda url=url: api(url, "GET", "/api/v1/map?current=1")[1]["servers"]["s2"]
                 ["state"] == "down", f"s2 down at {url}")  # fmt: skip
    wait_for(lambda: len(set(epochs(local))) == 1, "the managers to agree on the epoch")
    before = epochs(local)
    status, body = report(local, "s2")
    assert (status, body) == (200, {"state": "down", "checked": "unreachable"})
    assert epochs(local) == before

"""Client commands of the management cluster: ``lamina status``, ``lamina volume ...``,
``lamina snapshot ...`` and ``lamina server ...``.

Theory of operation
-------------------
A command finds the managers through a *cluster file* (``--cluster FILE``, else the
environment variable ``LAMINA_CLUSTER``, else ``./lamina-data/cluster.toml``; ``lamina
up`` writes one), then calls the managers' HTTP API (:mod:`lamina.mgmt.http`) with the
standard library only.  :class:`ManagerClient` tries the managers in the file's order
until one answers: a manager that cannot be reached (connection refused, timeout) is
skipped, while an HTTP error answer is final and is turned back into the
:class:`~lamina.errors.LaminaError` it stands for, so the CLI prints one line and exits
with the code of that error (see ``docs/cli.md``).  Changes carry the admin token
(``Authorization: Bearer TOKEN``) read from the file the cluster file names; a change
whose manager took the request but never answered is not sent again elsewhere, because
it may have been applied.

Arguments lamina checks itself (sizes, the cluster file) are checked before anything is
sent; everything else (names, ranges, placement) is left to the managers, whose reasons
come back in the error message.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import re
import socket
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec

import click
from rich.table import Table

from lamina.errors import (
    ErrorCode,
    InternalError,
    LaminaError,
    LocalError,
    Unavailable,
    error_from_code,
)

#: the environment variable naming the cluster file when --cluster is not given
CLUSTER_ENV = "LAMINA_CLUSTER"
#: the cluster file used when neither --cluster nor LAMINA_CLUSTER is given
DEFAULT_CLUSTER_FILE = Path("lamina-data") / "cluster.toml"
#: seconds to wait for a manager to accept a connection, and again for its answer
TIMEOUT = 10.0
API_PREFIX = "/api/v1"
#: an answer longer than this is not a manager's (the whole map is far smaller)
MAX_ANSWER = 64 << 20

P = ParamSpec("P")

_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE_RE = re.compile(r"\s*([0-9]+)\s*(?:([KMGT])(?:I?B)?|B)?\s*", re.IGNORECASE)
_HTTP_CODES = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.AUTH_FAILED,
    403: ErrorCode.AUTH_FAILED,
    404: ErrorCode.NOT_FOUND,
    409: ErrorCode.CONFLICT,
    503: ErrorCode.UNAVAILABLE,
    507: ErrorCode.NO_SPACE,
}


# --- sizes -------------------------------------------------------------------------------


def parse_size(text: str, what: str = "size") -> int:
    """``"10G"`` -> bytes: a whole number with an optional K/M/G/T suffix (powers of 1024;
    ``KiB``/``KB`` style spellings and a bare ``B`` are accepted too)."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise LocalError(
            f"bad {what} {text!r:.40}: give a whole number of bytes with an optional "
            "K, M, G or T suffix (powers of 1024), e.g. 10G, 512M, 64K"
        )
    return int(m.group(1)) << (10 * _UNITS[(m.group(2) or "").upper()])


def format_size(n: int) -> str:
    """Bytes for people: ``10 GiB``, ``1.5 MiB``, ``1000 B``."""
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        scale = 1 << (10 * power)
        if n >= scale:
            return f"{n // scale} {unit}" if n % scale == 0 else f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_ms(ms: int) -> str:
    """Unix milliseconds as ISO 8601 UTC to the second: ``2026-11-25T10:00:00Z``."""
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_lock(lock: dict[str, Any] | None) -> str:
    """A volume lock as the API gives it, for people: ``host h pid 123 since
    2026-11-25T10:00:00Z (session abc)``, or ``none``."""
    if lock is None:
        return "none"
    since = format_ms(lock["since"])
    return f"host {lock['host']} pid {lock['pid']} since {since} (session {lock['session']})"


# --- the cluster file --------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterFile:
    """A parsed cluster file; ``key`` and ``admin_token`` are resolved against its
    directory."""

    path: Path
    managers: tuple[str, ...]
    key: Path
    admin_token: Path

    def token(self) -> str:
        """The admin token (read when a change needs it, so reads work without it)."""
        try:
            token = self.admin_token.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise LocalError(
                f"admin token file {self.admin_token} does not exist (changes need it)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise LocalError(
                f"admin token file {self.admin_token} is unreadable: {reason}"
            ) from None
        if not token or any(c.isspace() for c in token):
            raise LocalError(f"admin token file {self.admin_token} holds no valid token")
        return token


_CLUSTER_KEYS = {"managers", "key", "admin_token"}


def _manager_url(value: Any, where: str) -> str:
    bad = LocalError(
        f"{where}: manager {value!r:.60} must be an http:// or https:// URL such as "
        "http://127.0.0.1:7301"
    )
    if type(value) is not str:
        raise bad
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise bad from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise bad
    return f"{parts.scheme}://{parts.netloc}"


def load_cluster_file(path: str | os.PathLike[str]) -> ClusterFile:
    """Parse a cluster file; unknown tables or keys and bad values are LocalErrors with a
    one-line message naming the file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise LocalError(f"cluster file {p} does not exist") from None
    except OSError as exc:
        raise LocalError(f"cluster file {p} is unreadable: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise LocalError(f"cluster file {p}: {exc}") from None
    except UnicodeDecodeError:
        raise LocalError(f"cluster file {p} is not UTF-8 text") from None
    unknown_tables = sorted(set(doc) - {"cluster"})
    if unknown_tables:
        raise LocalError(f"cluster file {p}: unknown table or key(s) {unknown_tables}")
    table = doc.get("cluster")
    if not isinstance(table, dict):
        raise LocalError(f"cluster file {p} has no [cluster] table")
    unknown = sorted(set(table) - _CLUSTER_KEYS)
    if unknown:
        raise LocalError(f"cluster file {p}: unknown key(s) in [cluster]: {', '.join(unknown)}")
    raw = table.get("managers")
    if not isinstance(raw, list) or not raw:
        raise LocalError(f"cluster file {p}: 'managers' must be a non-empty list of URLs")
    managers = tuple(_manager_url(v, f"cluster file {p}") for v in raw)
    if len(set(managers)) != len(managers):
        raise LocalError(f"cluster file {p}: a manager is listed twice")
    files: dict[str, Path] = {}
    for name, default in (("key", "cluster.key"), ("admin_token", "admin.token")):
        value = table.get(name, default)
        if type(value) is not str or not value:
            raise LocalError(f"cluster file {p}: {name!r} must be a file name, not {value!r:.40}")
        files[name] = p.parent / value
    return ClusterFile(p, managers, files["key"], files["admin_token"])


def find_cluster_file(option: str | None) -> ClusterFile:
    """The cluster file named by ``--cluster``, else ``$LAMINA_CLUSTER``, else the default."""
    if option:
        path, origin = Path(option), "given by --cluster"
    elif os.environ.get(CLUSTER_ENV):
        path, origin = Path(os.environ[CLUSTER_ENV]), f"from {CLUSTER_ENV}"
    else:
        path, origin = DEFAULT_CLUSTER_FILE, "the default"
    if not path.exists():
        hint = "" if option else f"; give --cluster FILE or set {CLUSTER_ENV}"
        raise LocalError(f"no cluster file {path} ({origin}{hint})")
    return load_cluster_file(path)


# --- the HTTP client ---------------------------------------------------------------------


class ManagerUnreachable(Unavailable):
    """A manager gave no answer: ``sent`` is True when it may have taken the request."""

    def __init__(self, url: str, reason: str, sent: bool) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason
        self.sent = sent


def _reason(exc: BaseException | str, timeout: float) -> str:
    if isinstance(exc, str):
        return exc
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError):
        return "connection closed before an answer"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class NotCaughtUp(ManagerUnreachable):
    """A manager answered 503 with ``caught_up: false``: it restarted and has not caught up
    with the Raft log yet, so it took nothing; another manager (or it, a moment later) can
    answer."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(url, message, False)


#: how long a call keeps asking managers that have not caught up (one just restarted)
CATCH_UP_WAIT = 10.0


def _http_error(url: str, err: urllib.error.HTTPError) -> LaminaError:
    """The lamina error an HTTP error answer stands for."""
    try:
        body = json.loads(err.read(MAX_ANSWER))
    except (OSError, ValueError, http.client.HTTPException):
        body = None
    if isinstance(body, dict) and body.get("caught_up") is False:
        return NotCaughtUp(url, str(body.get("message", "not caught up with the raft log")))
    fallback = _HTTP_CODES.get(err.code, ErrorCode.INTERNAL)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        name = body.get("error")
        code = ErrorCode.__members__.get(name, fallback) if isinstance(name, str) else fallback
        return error_from_code(code, body["message"])
    return error_from_code(fallback, f"{url} answered HTTP {err.code} {err.reason}")


class ManagerClient:
    """Calls the managers of one cluster file (``/api/v1`` paths, JSON in and out)."""

    def __init__(self, cluster: ClusterFile, timeout: float = TIMEOUT) -> None:
        self.cluster = cluster
        self.timeout = timeout
        # managers are reached directly: a proxy from the environment has no business here
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call_one(
        self, url: str, method: str, path: str, body: Any = None, token: str | None = None
    ) -> Any:
        """One request to the manager at ``url``: its decoded answer, the LaminaError of
        an error answer, or :class:`ManagerUnreachable`."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url + API_PREFIX + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read(MAX_ANSWER)
        except urllib.error.HTTPError as err:
            raise _http_error(url, err) from None
        except urllib.error.URLError as err:  # no connection: the request never arrived
            raise ManagerUnreachable(url, _reason(err.reason, self.timeout), False) from None
        except (OSError, http.client.HTTPException) as exc:  # sent, but no (whole) answer
            raise ManagerUnreachable(url, _reason(exc, self.timeout), True) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise InternalError(f"{url} answered {path} with something not JSON") from None

    def call(self, method: str, path: str, body: Any = None, *, admin: bool = False) -> Any:
        """Ask the managers in order until one answers.  ``admin``: a change, sent with
        the admin token and never repeated to another manager once one may have taken it.
        A manager that has not caught up with the Raft log (just restarted) took
        nothing: the next one is asked, and while no manager answers but some are still
        catching up, the round is repeated for up to :data:`CATCH_UP_WAIT` seconds."""
        token = self.cluster.token() if admin else None
        deadline = time.monotonic() + CATCH_UP_WAIT
        while True:
            failed: list[ManagerUnreachable] = []
            for url in self.cluster.managers:
                try:
                    return self.call_one(url, method, path, body, token)
                except ManagerUnreachable as exc:
                    if admin and exc.sent:
                        raise Unavailable(
                            f"{url} took the change but gave no answer ({exc.reason}); it "
                            "may or may not be applied: check with `lamina status`"
                        ) from None
                    failed.append(exc)
            if not any(isinstance(exc, NotCaughtUp) for exc in failed):
                break
            if time.monotonic() + 0.2 > deadline:
                break
            time.sleep(0.2)
        raise no_manager_reachable(failed)

    def get(self, path: str) -> Any:
        return self.call("GET", path)


def no_manager_reachable(failed: list[ManagerUnreachable]) -> Unavailable:
    reasons = {exc.reason for exc in failed}
    if len(reasons) == 1:
        urls = ", ".join(exc.url for exc in failed)
        return Unavailable(f"no manager reachable: {urls} ({reasons.pop()})")
    return Unavailable("no manager reachable: " + "; ".join(str(exc.message) for exc in failed))


def _path(*parts: str) -> str:
    return "".join("/" + urllib.parse.quote(part, safe="") for part in parts)


# --- status ------------------------------------------------------------------------------


def _manager_status(client: ManagerClient, url: str) -> tuple[dict[str, Any], Any]:
    """One manager's line of ``lamina status`` and its whole status answer (None when it
    gave none)."""
    entry: dict[str, Any] = {"url": url, "reachable": False}
    try:
        st = client.call_one(url, "GET", "/status")
        raft = st["raft"]
        entry.update(
            reachable=True,
            id=st["manager"],
            raft=raft["self_addr"],
            leader=raft["leader"],
            term=raft["term"],
            is_leader=raft["is_leader"],
            has_quorum=raft["has_quorum"],
            epoch=st["epoch"],
        )
    except ManagerUnreachable as exc:
        entry["error"] = exc.reason
        return entry, None
    except LaminaError as exc:
        entry["error"] = exc.message
        return entry, None
    except (KeyError, TypeError):
        entry["error"] = "a malformed status answer"
        return entry, None
    return entry, st


def cluster_status(client: ManagerClient) -> dict[str, Any]:
    """What ``lamina status --json`` prints: every manager's view, and the map as the
    leader (or, without a reachable leader, the first manager that answers) has it.
    The managers are asked at once, so an unresponsive one costs one timeout."""
    urls = client.cluster.managers
    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        results = list(pool.map(functools.partial(_manager_status, client), urls))
    managers = [entry for entry, _ in results]
    answers = {entry["url"]: st for entry, st in results if st is not None}
    failed = [ManagerUnreachable(m["url"], m["error"], False) for m in managers if "error" in m]
    if not answers:
        raise no_manager_reachable(failed)
    leaders = sorted(
        (m for m in managers if m.get("is_leader")), key=lambda m: m["term"], reverse=True
    )
    leader = leaders[0] if leaders else None
    source = leader["url"] if leader is not None else next(iter(answers))
    st = answers[source]
    try:
        volumes = client.call_one(source, "GET", "/volumes")
    except ManagerUnreachable:
        volumes = client.get("/volumes")
    problems = [f"manager {m['url']} unreachable ({m['error']})" for m in managers if "error" in m]
    problems += [
        f"manager {m.get('id')} ({m['url']}) has no quorum"
        for m in managers
        if m["reachable"] and not m["has_quorum"]
    ]
    if leader is None:
        problems.append("no raft leader among the reachable managers")
    failures = st.get("server_failures", {})
    problems += [
        f"server {s['id']} is {s['state']}"
        + (f" ({failures[s['id']]})" if s["id"] in failures else "")
        for s in st["servers"]
        if s["state"] != "up"
    ]
    problems += [
        f"cannot re-replicate server {sid}: {reason}"
        for sid, reason in sorted(st.get("rereplication_problems", {}).items())
    ]
    worker = st.get("worker") if leader is not None else None
    lost = list((worker or {}).get("lost") or ())
    problems += [describe_lost(page) for page in lost]
    return {
        "managers": managers,
        "leader": None if leader is None else {"id": leader["id"], "url": leader["url"]},
        "source": source,
        "epoch": st["epoch"],
        "published_epoch": st["published_epoch"],
        "servers": [
            {**s, "failure": failures[s["id"]]} if s["id"] in failures else s for s in st["servers"]
        ],
        "volumes": [
            {k: v[k] for k in ("name", "id", "size", "replicas", "stripe", "page_size")}
            for v in volumes
        ],
        "resync": st.get("worker") if leader is not None else None,
        "layer_jobs": layer_jobs(volumes, worker),
        "lost_pages": lost,
        "problems": problems,
    }


def describe_lost(page: dict[str, Any]) -> str:
    """One line about a lost page (``Progress.lost`` of the leader's worker)."""
    end = page["offset"] + page["length"] - 1
    copies = ", ".join(f"{sid} {state}" for sid, state in sorted(page["copies"].items()))
    return (
        f"volume {page['volume']}: bytes {page['offset']}..{end} (page {page['page']} of layer "
        f"{page['layer']}) are lost, corrupt on every copy ({copies}): {page['advice']}"
    )


def lost_pages(client: ManagerClient, volume: str) -> list[dict[str, Any]] | None:
    """The pages of ``volume`` the leader's worker found lost (None: no leader answered)."""
    for url in client.cluster.managers:
        _, st = _manager_status(client, url)
        if st is not None and st["raft"]["is_leader"]:
            worker = st.get("worker") or {}
            return [p for p in worker.get("lost") or () if p["volume"] == volume]
    return None


def layer_jobs(
    volumes: list[dict[str, Any]], worker: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The running migrations, merges of deleted snapshots and flattens, one per volume
    and kind, with the leader's worker's figures (``None`` where it has none yet):
    ``{"volume", "kind", "moved", "left"}``; a flatten counts only the pages left."""
    moved = worker.get("moved", []) if worker else []
    flattening = worker.get("flattening", {}) if worker else {}
    jobs: list[dict[str, Any]] = []
    for v in volumes:
        stack = {layer["id"] for layer in v.get("layers", [])}  # the last round's may be gone
        entries = [e for e in moved if e.get("volume") == v["name"] and e["layer"] in stack]
        if v.get("migration") or entries:
            jobs.append(
                {
                    "volume": v["name"],
                    "kind": "migration" if v.get("migration") else "merge",
                    "moved": sum(e["moved"] for e in entries) if entries else None,
                    "left": sum(e.get("left", 0) for e in entries) if entries else None,
                }
            )
        if v.get("flattening"):
            left = flattening.get(v["name"])
            jobs.append({"volume": v["name"], "kind": "flatten", "moved": None, "left": left})
    return jobs


def describe_job(job: dict[str, Any]) -> str:
    """One line of ``lamina status`` about a job of :func:`layer_jobs`."""
    what = {
        "migration": f"migration of volume {job['volume']}",
        "merge": f"merge of a deleted snapshot of volume {job['volume']}",
        "flatten": f"flatten of volume {job['volume']}",
    }[job["kind"]]
    if job["left"] is None:
        return f"{what}: starting"
    if job["moved"] is None:
        return f"{what}: {job['left']} shared pages left"
    return f"{what}: {job['moved']} pages moved, {job['left']} left"


# --- plumbing shared by the commands -------------------------------------------------------


def _fail(exc: LaminaError) -> None:
    from lamina import cli

    cli._fail(exc)


def _print(*objects: Any) -> None:
    from lamina.cli import console

    console.print(*objects, soft_wrap=True, highlight=False)


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def _answer(as_json: bool, value: Any, text: str) -> None:
    """``value`` as JSON with --json, else the line ``text``."""
    if as_json:
        _emit_json(value)
    else:
        _print(text)


def _reports_errors(f: Callable[P, None]) -> Callable[P, None]:
    """Run a command body; a LaminaError becomes one line on stderr and an exit code."""

    @functools.wraps(f)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            f(*args, **kwargs)
        except LaminaError as exc:
            _fail(exc)

    return wrapper


def _client(cluster: str | None) -> ManagerClient:
    return ManagerClient(find_cluster_file(cluster))


_cluster_option = click.option(
    "--cluster",
    "cluster",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help=f"Cluster file. [${CLUSTER_ENV}, else {DEFAULT_CLUSTER_FILE}]",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _common(f: Callable[P, None]) -> Callable[P, None]:
    """--cluster, --json and one-line error reporting."""
    return _cluster_option(_json_option(_reports_errors(f)))


def _table(title: str | None, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    for col in columns:
        table.add_column(col)
    return table


# --- lamina status -------------------------------------------------------------------------


@click.command()
@_common
def status(cluster: str | None, as_json: bool) -> None:
    """Show the managers, the Raft leader, epochs, storage servers and volumes.

    Exits 0 as long as one manager answers; what is degraded is highlighted (and listed
    under "problems" in --json).
    """
    report = cluster_status(_client(cluster))
    if as_json:
        _emit_json(report)
        return
    table = _table("managers", "url", "id", "role", "term", "quorum")
    for m in report["managers"]:
        if not m["reachable"]:
            table.add_row(m["url"], "", f"[red]unreachable: {m['error']}[/]", "", "")
            continue
        role = "leader" if m["is_leader"] else "follower" if m["leader"] else "[red]no leader[/]"
        quorum = "yes" if m["has_quorum"] else "[red]no[/]"
        table.add_row(m["url"], m["id"], role, str(m["term"]), quorum)
    _print(table)
    behind = report["published_epoch"] < report["epoch"]
    published = f"[yellow]{report['published_epoch']}[/]" if behind else report["published_epoch"]
    leader = report["leader"]
    _print(
        f"epoch {report['epoch']} (published {published}), leader "
        + (f"{leader['id']}" if leader else "[red]none[/]")
    )
    _servers_table(report["servers"])
    _volumes_table(report["volumes"])
    resync = report.get("resync")
    if resync and resync["rounds"]:
        _print(
            f"resync: {resync['pages_left']} of {resync['pages_found']} dirty pages left in the "
            f"last round, {resync['pages_resynced']} resynchronised, "
            f"{format_size(resync['bytes_copied'])} copied, "
            f"{format_size(int(resync['copy_rate']))}/s"
        )
    for job in report.get("layer_jobs", []):
        _print(describe_job(job))
    if report["problems"]:
        _print("[bold red]degraded:[/] " + "; ".join(report["problems"]))
    else:
        _print("[green]healthy[/]")


def _servers_table(servers: list[dict[str, Any]], copies: dict[str, int] | None = None) -> None:
    if not servers:
        _print("[dim]no storage servers[/]")
        return
    cols = ["id", "addr", "state", "capacity", "zone"] + (["copies"] if copies is not None else [])
    table = _table("storage servers", *cols)
    for s in servers:
        state = s["state"] if s["state"] == "up" else f"[red]{s['state']}[/]"
        row = [s["id"], s["addr"], state, format_size(s["capacity"]), s.get("zone") or ""]
        if copies is not None:
            row.append(str(copies.get(s["id"], 0)))
        table.add_row(*row)
    _print(table)


def _volumes_table(volumes: list[dict[str, Any]]) -> None:
    if not volumes:
        _print("[dim]no volumes[/]")
        return
    table = _table("volumes", "name", "id", "size", "replicas", "stripe", "page size")
    for v in volumes:
        table.add_row(
            v["name"], str(v["id"]), format_size(v["size"]), str(v["replicas"]),
            str(v["stripe"]), format_size(v["page_size"]),
        )  # fmt: skip
    _print(table)


# --- lamina volume ... -----------------------------------------------------------------------


@click.group()
def volume() -> None:
    """Create, list, inspect, grow, unlock, scrub, clone, flatten, migrate and delete volumes."""


@volume.command("create")
@click.argument("name")
@click.option("--size", required=True, help="Size, e.g. 10G (K/M/G/T: powers of 1024).")
@click.option("--replicas", type=int, help="Copies of every partition (1-8). [2]")
@click.option("--stripe", type=int, help="Partitions the volume is striped over (1-64). [4]")
@click.option("--page-size", help="Page size, a power of two in 64K..16M. [1M]")
@_common
def volume_create(
    name: str,
    size: str,
    replicas: int | None,
    stripe: int | None,
    page_size: str | None,
    cluster: str | None,
    as_json: bool,
) -> None:
    """Create volume NAME, placed over the storage servers that are up."""
    body: dict[str, Any] = {"name": name, "size": parse_size(size)}
    if replicas is not None:
        body["replicas"] = replicas
    if stripe is not None:
        body["stripe"] = stripe
    if page_size is not None:
        body["page_size"] = parse_size(page_size, "page size")
    v = _client(cluster).call("POST", "/volumes", body, admin=True)
    if as_json:
        _emit_json(v)
        return
    _print(
        f"created volume {v['name']} (id {v['id']}): {format_size(v['size'])}, "
        f"{v['replicas']} replicas, stripe {v['stripe']}, {format_size(v['page_size'])} pages "
        f"[dim](epoch {v['fence_epoch']})[/]"
    )


@volume.command("list")
@_common
def volume_list(cluster: str | None, as_json: bool) -> None:
    """List the volumes."""
    volumes = _client(cluster).get("/volumes")
    if as_json:
        _emit_json(volumes)
        return
    _volumes_table(volumes)


@volume.command("info")
@click.argument("name")
@_common
def volume_info(name: str, cluster: str | None, as_json: bool) -> None:
    """Show volume NAME with its layers and where their partitions are."""
    client = _client(cluster)
    v = client.get(_path("volumes", name))
    v["lost_pages"] = lost_pages(client, name)
    if as_json:
        _emit_json(v)
        return
    _print(
        f"volume {v['name']} (id {v['id']}): {format_size(v['size'])} ({v['size']} bytes), "
        f"{v['replicas']} replicas, stripe {v['stripe']}, {format_size(v['page_size'])} pages, "
        f"fence epoch {v['fence_epoch']}"
    )
    _print(f"lock: {describe_lock(v.get('lock'))}")
    if v.get("origin"):
        _print(f"origin: {v['origin']} (it shares that snapshot's layers)")
    if v.get("flattening"):
        _print("flattening: copying the shared layers into its own (lamina status shows how far)")
    if v.get("migration"):
        targets = ", ".join(str(m["layer"]) for m in v["migration"])
        _print(
            f"migrating: into layer(s) {targets} (lamina status shows how far; abort with "
            f"lamina volume migrate {v['name']} --abort)"
        )
    if v["lost_pages"] is None:
        _print("[yellow]lost pages: unknown (no manager leader answered)[/]")
    for page in v["lost_pages"] or ():
        _print("[bold red]lost:[/] " + describe_lost(page))
    if v.get("snapshots"):
        _snapshots_table(v["snapshots"])
    table = _table("layers", "layer", "role", "partition", "copies on")
    for layer in v["layers"]:
        role = layer["role"]
        if layer.get("migrates_to") is not None:
            role += f" -> layer {layer['migrates_to']}"
        for i, part in enumerate(layer["placement"]):
            first = i == 0
            table.add_row(
                str(layer["id"]) if first else "", role if first else "", str(i), ", ".join(part)
            )
    _print(table)


@volume.command("resize")
@click.argument("name")
@click.option("--size", required=True, help="New size, e.g. 20G (volumes only grow).")
@_common
def volume_resize(name: str, size: str, cluster: str | None, as_json: bool) -> None:
    """Grow volume NAME to --size."""
    body = {"size": parse_size(size)}
    v = _client(cluster).call("PATCH", _path("volumes", name), body, admin=True)
    if as_json:
        _emit_json(v)
        return
    _print(f"volume {v['name']} is now {format_size(v['size'])} [dim](epoch {v['fence_epoch']})[/]")


@volume.command("unlock")
@click.argument("name")
@_common
def volume_unlock(name: str, cluster: str | None, as_json: bool) -> None:
    """Break the lock of volume NAME: release it for whichever session holds it.

    The holder's pending writes are fenced (refused STALE) once the new epoch is
    published; its driver fails them instead of retrying.
    """
    client = _client(cluster)
    lock = client.get(_path("volumes", name)).get("lock")
    if lock is None:
        if as_json:
            _emit_json({"name": name, "released": None, "epoch": None})
        else:
            _print(f"volume {name} is not locked")
        return
    query = "?session=" + urllib.parse.quote(lock["session"], safe="")
    out = client.call("DELETE", _path("volumes", name, "lock") + query, admin=True)
    if as_json:
        _emit_json({"name": name, "released": lock, "epoch": out["epoch"]})
        return
    _print(f"unlocked volume {name}, held by {describe_lock(lock)} [dim](epoch {out['epoch']})[/]")


@volume.command("scrub")
@click.argument("name")
@click.option(
    "--timeout", type=click.FloatRange(1), default=3600, show_default=True,
    help="Seconds to wait for the scrub to finish.",
)  # fmt: skip
@_common
def volume_scrub(name: str, timeout: float, cluster: str | None, as_json: bool) -> None:
    """Compare every copy of every page of volume NAME and repair the pages whose copies
    differ (from the authoritative copy).  Exits 0 when the scrub completed, whatever it
    found; --json has the counts (mismatches, repaired, corrupt, errors)."""
    client = _client(cluster)
    token = client.cluster.token()
    path = _path("volumes", name, "scrub")
    failures: list[str] = []
    for url in client.cluster.managers:  # only the leader scrubs: find it
        try:
            report = client.call_one(url, "POST", path, {}, token)
            break
        except Unavailable as exc:
            failures.append(exc.message)
    else:
        raise Unavailable("no manager took the scrub: " + "; ".join(failures))
    deadline = time.monotonic() + timeout
    with contextlib.ExitStack() as stack:
        if not as_json:
            from lamina.cli import console

            status = stack.enter_context(console.status(f"scrubbing volume {name}"))
        while not report["done"]:
            if time.monotonic() > deadline:
                raise Unavailable(f"the scrub of {name} did not finish within {timeout:g} s")
            time.sleep(0.5)
            report = client.call_one(url, "GET", path)
            if not as_json:
                status.update(
                    f"scrubbing volume {name}: {report['pages_checked']}/{report['pages_total']}"
                    f" pages, {report['mismatches']} mismatches"
                )
    if as_json:
        _emit_json(report)
    else:
        _print(
            f"scrubbed volume {name}: {report['pages_checked']} pages compared, "
            f"{report['mismatches']} mismatches, {report['repaired']} repaired, "
            f"{report['corrupt']} corrupt copies, {report['errors']} pages not compared"
        )
    if report.get("error"):
        raise Unavailable(f"the scrub of {name} stopped early: {report['error']}")


@volume.command("delete")
@click.argument("name")
@_common
def volume_delete(name: str, cluster: str | None, as_json: bool) -> None:
    """Delete volume NAME from the cluster map."""
    out = _client(cluster).call("DELETE", _path("volumes", name), admin=True)
    if as_json:
        _emit_json(out)
        return
    _print(f"deleted volume {out['name']} [dim](epoch {out['epoch']})[/]")


def _snapshots_table(snapshots: list[dict[str, Any]]) -> None:
    """Snapshots as the API gives them (``clones`` shown when the answer has it)."""
    if not snapshots:
        _print("[dim]no snapshots[/]")
        return
    clones = any("clones" in snap for snap in snapshots)
    table = _table("snapshots", "name", "layer", "taken", *(["clones"] if clones else []))
    for snap in snapshots:
        row = [snap["name"], str(snap["layer"]), format_ms(snap["since"])]
        if clones:
            row.append(", ".join(snap.get("clones", [])))
        table.add_row(*row)
    _print(table)


def _split_snapshot(value: str) -> tuple[str, str]:
    """``VOLUME@SNAPSHOT`` -> (volume, snapshot); a usage error for anything else."""
    volume_name, at, snapshot = value.partition("@")
    if not at or not volume_name or not snapshot or "@" in snapshot:
        raise click.BadParameter(
            f"{value!r:.60} is not VOLUME@SNAPSHOT (one '@' between a volume and one of its "
            "snapshots, e.g. db@nightly)",
            param_hint="'VOLUME@SNAPSHOT'",
        )
    return volume_name, snapshot


@volume.command("clone")
@click.argument("source", metavar="VOLUME@SNAPSHOT")
@click.argument("new_name", metavar="NEW")
@_common
def volume_clone(source: str, new_name: str, cluster: str | None, as_json: bool) -> None:
    """Create volume NEW from snapshot SNAPSHOT of VOLUME: it shares the snapshot's layers
    (nothing is copied) and takes its own writes in a new layer on top."""
    volume_name, snapshot = _split_snapshot(source)
    body = {"name": new_name, "snapshot": snapshot}
    v = _client(cluster).call("POST", _path("volumes", volume_name, "clone"), body, admin=True)
    _answer(
        as_json,
        v,
        f"cloned volume {v['name']} (id {v['id']}) from {v['origin']}: "
        f"{format_size(v['size'])}, {v['replicas']} replicas, stripe {v['stripe']} "
        f"[dim](epoch {v['fence_epoch']})[/]",
    )


_wait_option = click.option(
    "--wait", is_flag=True, help="Show the progress and return once the pages are moved."
)
_timeout_option = click.option(
    "--timeout", type=click.FloatRange(1), default=3600, show_default=True,
    help="With --wait: seconds to wait before giving up (the work goes on).",
)  # fmt: skip


class _Watch:
    """Polls ``GET /volumes/NAME/migration``, asking the leader (which alone knows the
    worker's progress) once it has found it, and turns the answers into pages done out of
    pages known.  An answer from a manager whose map is older than ``epoch`` (the change
    being watched) is not believed."""

    def __init__(self, client: ManagerClient, name: str, epoch: int) -> None:
        self.client = client
        self.path = _path("volumes", name, "migration")
        self.epoch = epoch
        self.leader: str | None = None
        self.layers: dict[int, tuple[int, int]] = {}  # source layer -> (moved, left)
        self.most_left = 0  # flatten: the most shared pages seen left

    def poll(self) -> dict[str, Any] | None:
        """The leader's answer, else another manager's; None while none is up to date."""
        urls = list(self.client.cluster.managers)
        if self.leader is not None:
            urls.remove(self.leader)
            urls.insert(0, self.leader)
        failed: list[ManagerUnreachable] = []
        fallback = None
        answered = False
        for url in urls:
            try:
                answer: dict[str, Any] = self.client.call_one(url, "GET", self.path)
            except ManagerUnreachable as exc:
                failed.append(exc)
                continue
            answered = True
            if answer["epoch"] < self.epoch:
                continue
            if answer["leader"]:
                self.leader = url
                self._learn(answer)
                return answer
            fallback = fallback or answer
        if not answered:
            raise no_manager_reachable(failed)
        return fallback

    def _learn(self, answer: dict[str, Any]) -> None:
        now = {e["layer"]: (e["moved"], e.get("left", 0)) for e in answer["layers"]}
        for lid, (moved, _) in self.layers.items():
            if lid not in now:  # retired: everything it held has moved
                now[lid] = (moved, 0)
        self.layers = now
        if answer.get("flatten_left") is not None:
            self.most_left = max(self.most_left, answer["flatten_left"])
            self.layers[0] = (self.most_left - answer["flatten_left"], answer["flatten_left"])

    def pages(self) -> tuple[int, int]:
        """(pages done, pages known) so far."""
        done = sum(moved for moved, _ in self.layers.values())
        return done, done + sum(left for _, left in self.layers.values())


def _wait_until_done(
    client: ManagerClient,
    name: str,
    epoch: int,
    flag: str,
    what: str,
    timeout: float,
    quiet: bool,
) -> None:
    """Poll until the migration answer's ``flag`` is false (in a map at ``epoch`` or
    later), with a progress bar of the pages moved (unless ``quiet``); Unavailable after
    ``timeout`` seconds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from lamina.cli import console

    watch = _Watch(client, name, epoch)
    deadline = time.monotonic() + timeout
    columns = (
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        "pages",
        TimeElapsedColumn(),
    )
    shown = not quiet and console.is_terminal  # a pipe or a log gets the last line only
    with Progress(*columns, console=console, disable=not shown, transient=True) as bar:
        task = bar.add_task(f"{what} volume {name}", total=None)
        while (answer := watch.poll()) is None or answer[flag]:
            done, known = watch.pages()
            bar.update(task, completed=done, total=known or None)
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"{what} volume {name} did not finish within {timeout:g} s; it goes on "
                    f"in the background (lamina volume info {name} shows it)"
                )
            time.sleep(0.5)


def _placement_summary(v: dict[str, Any]) -> str:
    own = [layer for layer in v["layers"] if layer["volume_id"] == v["id"]]
    servers = sorted({sid for layer in own for part in layer["placement"] for sid in part})
    ids = ", ".join(str(layer["id"]) for layer in own)
    return (
        f"on {', '.join(servers)}: {v['replicas']} replicas, stripe {v['stripe']} (layer(s) {ids})"
    )


@volume.command("flatten")
@click.argument("name")
@_wait_option
@_timeout_option
@_common
def volume_flatten(
    name: str, wait: bool, timeout: float, cluster: str | None, as_json: bool
) -> None:
    """Copy what clone NAME still shares with its origin into its own layers, so it no
    longer depends on the origin's snapshot (the manager leader does it in the
    background; --wait shows it and returns when it is done)."""
    client = _client(cluster)
    out = client.call("POST", _path("volumes", name, "flatten"), {}, admin=True)
    if wait:
        _wait_until_done(client, name, out["epoch"], "flattening", "flattening", timeout, as_json)
    if as_json:
        _emit_json({**out, "done": wait})
    elif wait:
        _print(f"volume {name} flattened: it shares no layer any more")
    else:
        _print(
            f"flattening volume {name} in the background [dim](epoch {out['epoch']})[/]; "
            f"lamina volume info {name} shows when it is done"
        )


@volume.command("migrate")
@click.argument("name")
@click.option("--servers", metavar="ID,ID...", help="Storage servers to move to. [every up one]")
@click.option("--replicas", type=int, help="New number of copies (1-8). [unchanged]")
@click.option("--stripe", type=int, help="New number of partitions (1-64). [unchanged]")
@click.option("--abort", is_flag=True, help="Send the running migration back where it came from.")
@_wait_option
@_timeout_option
@_common
def volume_migrate(
    name: str,
    servers: str | None,
    replicas: int | None,
    stripe: int | None,
    abort: bool,
    wait: bool,
    timeout: float,
    cluster: str | None,
    as_json: bool,
) -> None:
    """Move volume NAME's own layers to a new placement, online: each gets a new layer on
    the new servers that takes the writes, and the manager leader moves the pages up into
    it in the background.  --abort sends a running migration back."""
    body: dict[str, Any] = {}
    if abort:
        given = [o for o, v in (("--servers", servers), ("--replicas", replicas),
                                ("--stripe", stripe)) if v is not None]  # fmt: skip
        if given:
            raise click.UsageError(f"--abort takes no placement: drop {', '.join(given)}")
        body["abort"] = True
    if servers is not None:
        body["servers"] = [sid.strip() for sid in servers.split(",")]
        if not all(body["servers"]):
            raise click.BadParameter(
                f"{servers!r:.60} is not a comma-separated list of server ids",
                param_hint="'--servers'",
            )
    if replicas is not None:
        body["replicas"] = replicas
    if stripe is not None:
        body["stripe"] = stripe
    client = _client(cluster)
    out = client.call("POST", _path("volumes", name, "migrate"), body, admin=True)
    what = "aborting the migration of" if abort else "migrating"
    if wait:
        _wait_until_done(client, name, out["epoch"], "migrating", what, timeout, as_json)
        out["volume"] = client.get(_path("volumes", name))
    if as_json:
        _emit_json({**out, "done": wait})
        return
    if wait:
        done = f"the migration of volume {name} aborted" if abort else f"volume {name} migrated"
        _print(done)
        _print(f"volume {name} is now {_placement_summary(out['volume'])}")
    else:
        _print(
            f"{what} volume {name} in the background [dim](epoch {out['epoch']})[/]; "
            f"lamina status shows how far it got, lamina volume info {name} when it is done"
        )


# --- lamina snapshot ... ---------------------------------------------------------------------


@click.group()
def snapshot() -> None:
    """Take, list, delete and roll back to snapshots of a volume."""


@snapshot.command("create")
@click.argument("volume_name", metavar="VOLUME")
@click.argument("name", metavar="SNAPSHOT")
@_common
def snapshot_create(volume_name: str, name: str, cluster: str | None, as_json: bool) -> None:
    """Take snapshot SNAPSHOT of VOLUME (instant: nothing is copied).  Returns once every
    storage server refuses writes made before it."""
    path = _path("volumes", volume_name, "snapshots")
    snap = _client(cluster).call("POST", path, {"name": name}, admin=True)
    _answer(
        as_json,
        snap,
        f"took snapshot {snap['name']} of volume {volume_name} at {format_ms(snap['since'])} "
        f"[dim](layer {snap['layer']})[/]; read it with lamina nbd {volume_name}@{snap['name']}"
        " --read-only",
    )


@snapshot.command("list")
@click.argument("volume_name", metavar="VOLUME")
@_common
def snapshot_list(volume_name: str, cluster: str | None, as_json: bool) -> None:
    """List the snapshots of VOLUME, oldest first, with the volumes cloned from each."""
    snaps = _client(cluster).get(_path("volumes", volume_name, "snapshots"))
    if as_json:
        _emit_json(snaps)
        return
    _snapshots_table(snaps)


@snapshot.command("delete")
@click.argument("volume_name", metavar="VOLUME")
@click.argument("name", metavar="SNAPSHOT")
@_common
def snapshot_delete(volume_name: str, name: str, cluster: str | None, as_json: bool) -> None:
    """Delete snapshot SNAPSHOT of VOLUME (refused while a clone uses it); its pages are
    merged into the next layer up in the background."""
    path = _path("volumes", volume_name, "snapshots", name)
    out = _client(cluster).call("DELETE", path, admin=True)
    _answer(
        as_json,
        out,
        f"deleted snapshot {name} of volume {volume_name}; its pages are merged in the "
        f"background [dim](epoch {out['epoch']})[/]",
    )


@snapshot.command("rollback")
@click.argument("volume_name", metavar="VOLUME")
@click.argument("name", metavar="SNAPSHOT")
@_common
def snapshot_rollback(volume_name: str, name: str, cluster: str | None, as_json: bool) -> None:
    """Make VOLUME read as snapshot SNAPSHOT again: every write since is dropped.  Refused
    while the volume is attached (locked) or has snapshots newer than SNAPSHOT."""
    path = _path("volumes", volume_name, "rollback")
    v = _client(cluster).call("POST", path, {"snapshot": name}, admin=True)
    back = f"rolled volume {volume_name} back to snapshot {name}"
    _answer(as_json, v, f"{back} [dim](epoch {v['fence_epoch']})[/]")


# --- lamina server ... -----------------------------------------------------------------------


@click.group()
def server() -> None:
    """Add, list and remove storage servers in the cluster map."""


@server.command("list")
@_common
def server_list(cluster: str | None, as_json: bool) -> None:
    """List the storage servers and how many partition copies each holds."""
    cmap = _client(cluster).get("/map?current=1")  # administrators see every change
    copies: dict[str, int] = {}
    for layer in cmap["layers"].values():
        for part in layer["placement"]:
            for sid in part:
                copies[sid] = copies.get(sid, 0) + 1
    servers = [{"id": sid, **s, "copies": copies.get(sid, 0)} for sid, s in cmap["servers"].items()]
    if as_json:
        _emit_json(servers)
        return
    _servers_table(servers, copies)


@server.command("add")
@click.argument("server_id", metavar="ID")
@click.option("--addr", required=True, help="HOST:PORT the storage server listens on.")
@click.option("--capacity", default="1T", show_default=True, help="Capacity, e.g. 500G.")
@click.option("--zone", help="Failure zone: copies of a partition go to distinct zones.")
@click.option(
    "--rebalance/--no-rebalance", default=True, show_default=True,
    help="Migrate volumes onto the new server.",
)  # fmt: skip
@_common
def server_add(
    server_id: str,
    addr: str,
    capacity: str,
    zone: str | None,
    rebalance: bool,
    cluster: str | None,
    as_json: bool,
) -> None:
    """Admit storage server ID at --addr; it starts up."""
    body: dict[str, Any] = {
        "id": server_id,
        "addr": addr,
        "capacity": parse_size(capacity, "capacity"),
    }
    if zone is not None:
        body["zone"] = zone
    client = _client(cluster)
    out = client.call("POST", "/servers", body, admin=True)
    if rebalance:
        out["rebalance"] = client.call("POST", "/rebalance", admin=True)["migrating"]
    if as_json:
        _emit_json(out)
        return
    _print(
        f"added server {out['id']} at {addr} ({format_size(body['capacity'])}) "
        f"[dim](epoch {out['epoch']})[/]"
    )
    if out.get("rebalance"):
        _print(
            f"migrating {', '.join(out['rebalance'])} to spread them onto it "
            "(watch with lamina status)"
        )


@server.command("rebalance")
@_common
def server_rebalance(cluster: str | None, as_json: bool) -> None:
    """Migrate volumes onto the servers that hold few copies (throttled like the resync)."""
    out = _client(cluster).call("POST", "/rebalance", admin=True)
    if as_json:
        _emit_json(out)
        return
    moving = out["migrating"]
    _print(f"migrating {', '.join(moving)}" if moving else "balanced: nothing to move")


@server.command("drain")
@click.argument("server_id", metavar="ID")
@click.option("--undo", is_flag=True, help="Stop draining: the server takes copies again.")
@click.option("--wait", is_flag=True, help="Return once the server holds no copy.")
@click.option(
    "--timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
    help="Seconds --wait waits.",
)  # fmt: skip
@_common
def server_drain(
    server_id: str, undo: bool, wait: bool, timeout: float, cluster: str | None, as_json: bool
) -> None:
    """Move every copy off storage server ID (its volumes migrate to the other servers);
    then `lamina server remove ID` succeeds.  Refused, with the volume named, when some
    volume's copies would have no place to go."""
    if undo and wait:
        raise click.UsageError("--undo and --wait do not go together")
    client = _client(cluster)
    out = client.call("POST", _path("servers", server_id, "drain"), {"undo": undo}, admin=True)
    if wait:
        deadline = time.monotonic() + timeout
        while (held := _copies_on(client, server_id)) > 0:
            if time.monotonic() > deadline:
                _print(
                    f"server {server_id} still holds {held} partition copies after {timeout:g} s"
                )
                raise SystemExit(3)
            time.sleep(0.5)
        out["copies"] = 0
    if as_json:
        _emit_json(out)
        return
    if undo:
        _print(f"server {server_id} takes copies again")
    elif wait:
        _print(f"server {server_id} holds nothing: remove it with lamina server remove {server_id}")
    else:
        _print(f"draining server {server_id}: its volumes migrate away (watch with lamina status)")


def _copies_on(client: ManagerClient, server_id: str) -> int:
    doc = client.get("/map?current=1")
    return sum(
        part.count(server_id) for layer in doc["layers"].values() for part in layer["placement"]
    )


@server.command("remove")
@click.argument("server_id", metavar="ID")
@_common
def server_remove(server_id: str, cluster: str | None, as_json: bool) -> None:
    """Remove storage server ID (only once it holds no partition copy)."""
    out = _client(cluster).call("DELETE", _path("servers", server_id), admin=True)
    if as_json:
        _emit_json(out)
        return
    _print(f"removed server {out['id']} [dim](epoch {out['epoch']})[/]")


#: the commands to register on ``lamina.cli.main``
COMMANDS: list[click.Command] = [status, volume, snapshot, server]

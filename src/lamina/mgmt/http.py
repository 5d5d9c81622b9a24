"""The manager's HTTP API (aiohttp): JSON under versioned paths ``/api/v1/...``.

Theory of operation
-------------------
Handlers only decode, call and encode: a request body is checked against a small schema
(unknown fields, wrong types and missing fields are 400 with the reason), turned into a
command of :mod:`lamina.mgmt.clustermap` (whose own checks also answer 400), submitted
through :class:`~lamina.mgmt.service.ManagerService`, and the outcome is encoded.
Changes need the admin token (``Authorization: Bearer TOKEN``; 401 without it).  Errors
are converted to HTTP statuses in one place, :func:`_error_response`.  Any manager
answers: changes go through Raft from wherever they arrive (PySyncObj forwards them to
the leader), reads are served from this manager's copy of the map.

Volume locks: ``POST /api/v1/volumes/{name}/lock`` proposes AcquireLock with this
manager's wall clock as ``since`` and answers the epoch at which the grant applied; the
driver uses the volume only once that epoch is published (``GET
/api/v1/map?min_epoch=E``), which is when the previous holder's writes are fenced.  An
acquire and ``POST /api/v1/sessions/{session}/keepalive`` are recorded by the manager
that receives them, in memory (:mod:`lamina.mgmt.sessions`); drivers send keepalives to
every manager.  ``POST /api/v1/servers/{id}/report`` is the leader's to answer (it
checks the server itself, :meth:`~lamina.mgmt.leader.LeaderDuties.check_report`): any
other manager answers 503 naming the leader's Raft address if it knows it, and the
driver asks the next manager.  Some error answers carry a field beside ``error`` and
``message``: ``holder`` (the lock's holder) on a 409 about a lock held by another
session, ``leader`` on that 503.

Layers: a snapshot, a rollback, a clone and a migration (or its abort) are answered only
once their epoch is published (:meth:`~lamina.mgmt.service.ManagerService.wait_published`):
a snapshot is taken when every storage server of the volume refuses the writes made
before it, and a client told of a clone or a rollback finds it in the map it reads.
Deleting a snapshot and flattening a clone answer 202 at once: the leader's worker merges
or copies the pages in the background, and ``GET /api/v1/volumes/{name}/migration``
reports how far it got (only the leader knows: elsewhere ``layers`` is empty).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from lamina import __version__
from lamina.errors import (
    AuthFailed,
    BadRequest,
    Conflict,
    ErrorCode,
    LaminaError,
    NotFound,
    Unavailable,
)
from lamina.mgmt import clustermap as cm
from lamina.mgmt.leader import LeaderDuties
from lamina.mgmt.service import ManagerService, Outcome, Rejected
from lamina.mgmt.worker import Worker

log = logging.getLogger(__name__)

#: longest ``GET /api/v1/map?wait=S`` holds its answer for a publication, in seconds
MAX_MAP_WAIT = 2.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVICE = web.AppKey("service", ManagerService)
DUTIES = web.AppKey("duties", LeaderDuties)
TOKEN = web.AppKey("token", str)
StatusFn = Callable[[], dict[str, Any]]
STATUS: web.AppKey[StatusFn] = web.AppKey("status")
CaughtUpFn = Callable[[], bool]
CAUGHT_UP: web.AppKey[CaughtUpFn] = web.AppKey("caught_up")
#: what a manager that has not caught up with the Raft log still answers
ANSWERED_WHILE_CATCHING_UP = frozenset({"/api/v1/openapi.json"})

_HTTP_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.AUTH_FAILED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.NO_SPACE: 507,
}
MAX_BODY = 64 * 1024


class LockHeld(Conflict):
    """409: another session holds the lock; the answer names it in ``holder`` too."""

    def __init__(self, message: str, holder: cm.Lock) -> None:
        super().__init__(message)
        self.fields = {"holder": cm.lock_to_dict(holder)}


class NotLeader(Unavailable):
    """503: only the leader does this; the answer has its Raft address in ``leader``."""

    def __init__(self, message: str, leader: str | None) -> None:
        super().__init__(message)
        self.fields = {"leader": leader}


class NotCaughtUp(Unavailable):
    """503: this manager has not caught up with the Raft log since it started, so its map
    may be older than one it or another manager served; ask another manager (or again
    after ``Retry-After``).  ``caught_up: false`` in the answer tells it from other 503s;
    ``/status`` adds this manager's ``raft`` view."""

    headers = {"Retry-After": "1"}

    def __init__(self, message: str, raft: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.fields: dict[str, Any] = {"caught_up": False}
        if raft is not None:
            self.fields["raft"] = raft


def _error_response(exc: LaminaError) -> web.Response:
    status = _HTTP_STATUS.get(exc.code, 500)
    body: dict[str, Any] = {"error": exc.code.name, "message": exc.message}
    fields: dict[str, Any] = getattr(exc, "fields", {})
    body.update(fields)
    return web.json_response(body, status=status, headers=getattr(exc, "headers", None))


@web.middleware
async def _catching_up(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer nothing from the map until this manager has caught up with the Raft log: a
    manager just restarted would otherwise serve an empty or older map for a moment."""
    if request.path in ANSWERED_WHILE_CATCHING_UP or request.app[CAUGHT_UP]():
        return await handler(request)
    svc = request.app[SERVICE]
    message = f"manager {svc.manager_id} has not caught up with the raft log yet; ask another"
    raft = None
    if request.path == "/api/v1/status":
        try:
            raft = request.app[STATUS]()
        except LaminaError:
            raft = None
    raise NotCaughtUp(message, raft)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except LaminaError as exc:
        return _error_response(exc)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.exception("internal error on %s %s", request.method, request.path)
        return web.json_response({"error": "INTERNAL", "message": repr(exc)}, status=500)


def _require_admin(request: web.Request) -> None:
    got = request.headers.get("Authorization", "")
    expected = "Bearer " + request.app[TOKEN]
    if not hmac.compare_digest(got.encode(), expected.encode()):
        raise AuthFailed("this change needs the admin token (Authorization: Bearer TOKEN)")


Schema = dict[str, tuple[type, bool]]  # field -> (type, required)


async def _body(request: web.Request, schema: Schema) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BadRequest(f"request body over {MAX_BODY} bytes")
    raw = await request.read()
    if len(raw) > MAX_BODY:
        raise BadRequest(f"request body over {MAX_BODY} bytes")
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    for name, (typ, required) in schema.items():
        if name not in data:
            if required:
                raise BadRequest(f"missing field {name!r}")
            continue
        value = data[name]
        if (isinstance(value, bool) and typ is not bool) or not isinstance(value, typ):
            raise BadRequest(f"field {name!r} must be {typ.__name__}, not {value!r:.40}")
    return data


def _volume_json(cmap: cm.ClusterMap, name: str) -> dict[str, Any]:
    volume = cmap.volumes.get(name)
    if volume is None:
        raise NotFound(f"no volume {name!r}")
    d = cm.map_to_dict(cmap)
    out: dict[str, Any] = {"name": name, **d["volumes"][name]}
    out["layers"] = [{"id": lid, **d["layers"][str(lid)]} for lid in volume.layers]
    return out


def _servers_json(cmap: cm.ClusterMap) -> list[dict[str, Any]]:
    return [{"id": sid, **s} for sid, s in cm.map_to_dict(cmap)["servers"].items()]


# --- handlers ------------------------------------------------------------------------


def _worker_json(request: web.Request) -> dict[str, Any] | None:
    """The background worker's progress on this manager (it works on the leader only)."""
    worker = request.app[DUTIES].worker
    return None if worker is None else dict(worker.progress.as_dict())


async def get_status(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    cmap = svc.map
    return web.json_response(
        {
            "manager": svc.manager_id,
            "version": __version__,
            "raft": request.app[STATUS](),
            "epoch": cmap.epoch,
            "published_epoch": cmap.published_epoch,
            "servers": _servers_json(cmap),
            "volumes": sorted(cmap.volumes),
            "worker": _worker_json(request),
            "rereplication_problems": dict(request.app[DUTIES].rereplication_problems),
            "server_failures": dict(request.app[DUTIES].server_failures),
        }
    )


async def get_map(request: web.Request) -> web.Response:
    """The published map (what clients may use); ``?current=1``: the latest committed one.
    ``?min_epoch=N``: 503 unless this manager's published epoch is at least N, so a
    client never gets a map older than one it has already seen; with ``&wait=S`` (at
    most 2 s), after waiting up to S seconds for it."""
    svc = request.app[SERVICE]
    if request.query.get("current") in ("1", "true"):
        return web.json_response(cm.map_to_dict(svc.map))
    try:
        min_epoch = int(request.query.get("min_epoch", "0"))
        wait = min(float(request.query.get("wait", "0")), MAX_MAP_WAIT)
    except ValueError:
        raise BadRequest("min_epoch must be an integer, wait a number of seconds") from None
    # ?wait=S: hold the answer up to S seconds for the publication (a client that got
    # STALE learns the new map the moment it is published, not a poll later)
    deadline = time.monotonic() + wait
    while (
        svc.published is None or svc.published.published_epoch < min_epoch
    ) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    published = svc.published
    if published is None:
        raise Unavailable(f"manager {svc.manager_id} has no published map yet")
    if published.published_epoch < min_epoch:
        raise Unavailable(
            f"manager {svc.manager_id} has published epoch {published.published_epoch}, "
            f"behind {min_epoch}"
        )
    return web.json_response(cm.map_to_dict(published))


async def list_servers(request: web.Request) -> web.Response:
    return web.json_response(_servers_json(request.app[SERVICE].map))


async def add_server(request: web.Request) -> web.Response:
    _require_admin(request)
    body = await _body(
        request,
        {"id": (str, True), "addr": (str, True), "capacity": (int, True), "zone": (str, False)},
    )
    outcome = await request.app[SERVICE].submit(cm.AddServer(**body))
    return web.json_response({"id": body["id"], "epoch": outcome.epoch}, status=201)


async def remove_server(request: web.Request) -> web.Response:
    _require_admin(request)
    sid = request.match_info["id"]
    if sid not in request.app[SERVICE].map.servers:
        raise NotFound(f"no server {sid!r}")
    outcome = await request.app[SERVICE].submit(cm.RemoveServer(sid))
    return web.json_response({"id": sid, "epoch": outcome.epoch})


async def drain_server(request: web.Request) -> web.Response:
    """Start (or with ``{"undo": true}`` stop) draining a server: no new copy goes there
    and the leader migrates every volume with a copy there away (409 with the reason if
    some volume's copies would have no place to go)."""
    _require_admin(request)
    sid = request.match_info["id"]
    body = await _body(request, {"undo": (bool, False)})
    svc = request.app[SERVICE]
    if sid not in svc.map.servers:
        raise NotFound(f"no server {sid!r}")
    outcome = await svc.submit(cm.DrainServer(sid, body.get("undo", False)))
    return web.json_response(
        {"id": sid, "draining": svc.map.servers[sid].draining, "epoch": outcome.epoch},
        status=202,
    )


async def rebalance(request: web.Request) -> web.Response:
    """Propose the migrations of :func:`lamina.mgmt.clustermap.rebalance_plan` (volumes
    spread onto servers holding few copies); the volumes whose migration started."""
    _require_admin(request)
    svc = request.app[SERVICE]
    started = []
    for cmd in cm.rebalance_plan(svc.map):
        try:
            await svc.submit(cmd)
        except Rejected as exc:  # the map moved on meanwhile: the next call sees it
            log.info("rebalance of %s: %s", cmd.name, exc.message)
            continue
        started.append(cmd.name)
    return web.json_response({"migrating": started}, status=202)


async def list_volumes(request: web.Request) -> web.Response:
    cmap = request.app[SERVICE].map
    return web.json_response([_volume_json(cmap, name) for name in sorted(cmap.volumes)])


async def get_volume(request: web.Request) -> web.Response:
    return web.json_response(_volume_json(request.app[SERVICE].map, request.match_info["name"]))


async def create_volume(request: web.Request) -> web.Response:
    _require_admin(request)
    body = await _body(
        request,
        {
            "name": (str, True),
            "size": (int, True),
            "replicas": (int, False),
            "stripe": (int, False),
            "page_size": (int, False),
        },
    )
    svc = request.app[SERVICE]
    await svc.submit(cm.CreateVolume(**body))
    return web.json_response(_volume_json(svc.map, body["name"]), status=201)


def _volume_exists(svc: ManagerService, name: str) -> None:
    if name not in svc.map.volumes:
        raise NotFound(f"no volume {name!r}")


async def resize_volume(request: web.Request) -> web.Response:
    _require_admin(request)
    name = request.match_info["name"]
    body = await _body(request, {"size": (int, True)})
    svc = request.app[SERVICE]
    _volume_exists(svc, name)
    await svc.submit(cm.ResizeVolume(name, body["size"]))
    return web.json_response(_volume_json(svc.map, name))


async def delete_volume(request: web.Request) -> web.Response:
    _require_admin(request)
    name = request.match_info["name"]
    svc = request.app[SERVICE]
    _volume_exists(svc, name)
    outcome = await svc.submit(cm.DeleteVolume(name))
    return web.json_response({"name": name, "epoch": outcome.epoch})


def _lock_refused(svc: ManagerService, name: str, session: str, reason: str) -> LaminaError:
    """The error for a lock command the managers refused: 404 if the volume is gone, 409
    naming the holder if another session holds the lock, else 409 with the reason."""
    volume = svc.map.volumes.get(name)
    if volume is None:
        return NotFound(f"no volume {name!r}")
    if volume.lock is not None and volume.lock.session != session:
        return LockHeld(reason, volume.lock)
    return Rejected(reason)


async def acquire_lock(request: web.Request) -> web.Response:
    """Take (or refresh, or with ``takeover`` revoke and take) a volume's lock."""
    _require_admin(request)
    name = request.match_info["name"]
    body = await _body(
        request,
        {
            "session": (str, True),
            "host": (str, True),
            "pid": (int, True),
            "takeover": (bool, False),
        },
    )
    svc, duties = request.app[SERVICE], request.app[DUTIES]
    _volume_exists(svc, name)
    since = int(time.time() * 1000)
    cmd = cm.AcquireLock(
        name, body["session"], body["host"], body["pid"], since, body.get("takeover", False)
    )
    duties.keepalive(cmd.session)
    try:
        outcome = await svc.submit(cmd)
    except Rejected as exc:
        raise _lock_refused(svc, name, cmd.session, exc.message) from None
    duties.keepalive(cmd.session)
    volume = svc.map.volumes.get(name)
    lock = None if volume is None else volume.lock
    if lock is None or lock.session != cmd.session:  # revoked in the meantime
        reason = f"the lock of volume {name} was granted at epoch {outcome.epoch}, then "
        if lock is None:
            raise Rejected(reason + "released")
        raise LockHeld(reason + f"taken by {cm.describe_lock(lock)}", lock)
    return web.json_response({"epoch": outcome.epoch, "lock": cm.lock_to_dict(lock)})


async def release_lock(request: web.Request) -> web.Response:
    """Release a volume's lock: ``?session=S`` must be the holder's session."""
    _require_admin(request)
    name = request.match_info["name"]
    session = request.query.get("session")
    if session is None:
        raise BadRequest("missing query parameter 'session'")
    svc = request.app[SERVICE]
    _volume_exists(svc, name)
    cmd = cm.ReleaseLock(name, session)
    try:
        outcome = await svc.submit(cmd)
    except Rejected as exc:
        raise _lock_refused(svc, name, session, exc.message) from None
    return web.json_response({"epoch": outcome.epoch})


async def keepalive(request: web.Request) -> web.Response:
    """A session is alive: recorded by this manager; the locks it holds in this
    manager's map, and the session timeout."""
    _require_admin(request)
    session = request.match_info["session"]
    cm.check_id("session", session)
    duties = request.app[DUTIES]
    locks = duties.keepalive(session)
    return web.json_response({"locks": locks, "timeout": duties.sessions.timeout})


async def report_server(request: web.Request) -> web.Response:
    """A driver saw a storage server fail a request: the leader checks it (PING) and marks
    it down if it does not answer."""
    _require_admin(request)
    sid = request.match_info["id"]
    body = await _body(request, {"reason": (str, True)})
    svc, duties = request.app[SERVICE], request.app[DUTIES]
    if not duties.leading():
        try:
            leader = request.app[STATUS]().get("leader")
        except LaminaError:
            leader = None
        where = f"the leader is at raft address {leader}" if leader else "no leader is known"
        raise NotLeader(
            f"manager {svc.manager_id} is not the leader ({where}); report to another manager",
            leader,
        )
    if sid not in svc.map.servers:
        raise NotFound(f"no server {sid!r}")
    state, answered = await duties.check_report(sid, body["reason"])
    checked = "reachable" if answered else "unreachable"
    return web.json_response({"state": state.value, "checked": checked})


def _require_leader(request: web.Request) -> None:
    svc, duties = request.app[SERVICE], request.app[DUTIES]
    if duties.leading() and duties.worker is not None:
        return
    try:
        leader = request.app[STATUS]().get("leader")
    except LaminaError:
        leader = None
    where = f"the leader is at raft address {leader}" if leader else "no leader is known"
    raise NotLeader(f"manager {svc.manager_id} is not the leader ({where})", leader)


async def start_scrub(request: web.Request) -> web.Response:
    """Start comparing every copy of the volume's pages (leader only); the report so far."""
    _require_admin(request)
    name = request.match_info["name"]
    _volume_exists(request.app[SERVICE], name)
    _require_leader(request)
    report = request.app[DUTIES].worker.start_scrub(name)
    return web.json_response(report.as_dict(), status=202)


async def get_scrub(request: web.Request) -> web.Response:
    """The report of the volume's latest scrub on this leader (done or running)."""
    name = request.match_info["name"]
    _volume_exists(request.app[SERVICE], name)
    _require_leader(request)
    report = request.app[DUTIES].worker.scrubs.get(name)
    if report is None:
        raise NotFound(f"no scrub of volume {name!r} on this leader (start one with POST)")
    return web.json_response(report.as_dict())


# --- layers: snapshots, clones, flatten, rollback, migration ----------------------------


def _snapshot_layer(svc: ManagerService, name: str, snapshot: str) -> int:
    """The layer of snapshot ``snapshot`` of volume ``name``; NotFound if either is unknown."""
    volume = svc.map.volumes.get(name)
    if volume is None:
        raise NotFound(f"no volume {name!r}")
    lid = volume.snapshot_layer(snapshot)
    if lid is None:
        raise NotFound(f"volume {name!r} has no snapshot {snapshot!r}")
    return lid


def _snapshots_json(cmap: cm.ClusterMap, volume: cm.Volume) -> list[dict[str, Any]]:
    """The volume's snapshots, oldest first, each with the other volumes stacking it."""
    return [
        {
            "name": snap,
            "layer": lid,
            "since": since,
            "clones": [v.name for v in cmap.stacking(lid) if v.id != volume.id],
        }
        for snap, lid, since in volume.snapshots
    ]


async def _submit_published(svc: ManagerService, cmd: cm.Command) -> Outcome:
    """Commit ``cmd`` and return once its epoch is published: every storage server of the
    volumes it changed knows their new fences, and clients may see the change."""
    outcome = await svc.submit(cmd)
    await svc.wait_published(outcome.epoch)
    return outcome


async def create_snapshot(request: web.Request) -> web.Response:
    """Take a snapshot: answered once its epoch is published, when no write made before
    it can land in the snapshot's layer any more."""
    _require_admin(request)
    name = request.match_info["name"]
    body = await _body(request, {"name": (str, True)})
    svc = request.app[SERVICE]
    _volume_exists(svc, name)
    cmd = cm.CreateSnapshot(name, body["name"], int(time.time() * 1000))
    await _submit_published(svc, cmd)
    volume = svc.map.volumes.get(name)
    layer = None if volume is None else volume.snapshot_layer(cmd.snapshot)
    if layer is not None:
        await _settle(request, layer)
    for snap in [] if volume is None else _snapshots_json(svc.map, volume):
        if snap["name"] == cmd.snapshot:
            return web.json_response(snap, status=201)
    raise Rejected(f"snapshot {cmd.snapshot} of volume {name} was deleted meanwhile")


async def _settle(request: web.Request, layer: int) -> None:
    """Make the copies of the frozen layer agree before the snapshot counts as taken
    (:meth:`lamina.mgmt.worker.Worker.settle`), with a worker of this request's own."""
    svc, duties = request.app[SERVICE], request.app[DUTIES]
    if duties.key is None:
        return
    worker = Worker(svc, duties.key, lambda: True, svc.submit)
    try:
        if not await worker.settle(layer):
            raise Unavailable(
                f"the copies of snapshot layer {layer} could not be made equal in time "
                "(a storage server failing?); the snapshot exists: read it once the "
                "resync has run, or delete it"
            )
    finally:
        worker.close()


async def list_snapshots(request: web.Request) -> web.Response:
    cmap = request.app[SERVICE].map
    volume = cmap.volumes.get(request.match_info["name"])
    if volume is None:
        raise NotFound(f"no volume {request.match_info['name']!r}")
    return web.json_response(_snapshots_json(cmap, volume))


async def delete_snapshot(request: web.Request) -> web.Response:
    """Forget a snapshot; its layer is merged into the one above it in the background."""
    _require_admin(request)
    name, snapshot = request.match_info["name"], request.match_info["snapshot"]
    svc = request.app[SERVICE]
    _snapshot_layer(svc, name, snapshot)
    outcome = await svc.submit(cm.DeleteSnapshot(name, snapshot))
    return web.json_response(
        {"name": name, "snapshot": snapshot, "epoch": outcome.epoch}, status=202
    )


async def rollback_volume(request: web.Request) -> web.Response:
    _require_admin(request)
    name = request.match_info["name"]
    body = await _body(request, {"snapshot": (str, True)})
    svc = request.app[SERVICE]
    _snapshot_layer(svc, name, body["snapshot"])
    await _submit_published(svc, cm.RollbackVolume(name, body["snapshot"]))
    return web.json_response(_volume_json(svc.map, name))


async def clone_volume(request: web.Request) -> web.Response:
    _require_admin(request)
    source = request.match_info["name"]
    body = await _body(request, {"name": (str, True), "snapshot": (str, True)})
    svc = request.app[SERVICE]
    _snapshot_layer(svc, source, body["snapshot"])
    await _submit_published(svc, cm.CloneVolume(source, body["snapshot"], body["name"]))
    return web.json_response(_volume_json(svc.map, body["name"]), status=201)


async def flatten_volume(request: web.Request) -> web.Response:
    """Start copying what a clone shares into its own layers (the leader's worker does)."""
    _require_admin(request)
    name = request.match_info["name"]
    svc = request.app[SERVICE]
    _volume_exists(svc, name)
    outcome = await svc.submit(cm.FlattenVolume(name))
    return web.json_response({"name": name, "epoch": outcome.epoch}, status=202)


async def migrate_volume(request: web.Request) -> web.Response:
    """Start moving a volume's own layers to a new placement, or (``abort``) send a
    running migration back; answered once the change is published."""
    _require_admin(request)
    name = request.match_info["name"]
    body = await _body(
        request,
        {
            "servers": (list, False),
            "replicas": (int, False),
            "stripe": (int, False),
            "abort": (bool, False),
        },
    )
    servers = body.get("servers", [])
    for sid in servers:
        if not isinstance(sid, str):
            raise BadRequest(f"field 'servers' must list server ids, not {sid!r:.40}")
    cmd: cm.MigrateVolume | cm.AbortMigration
    if body.get("abort"):
        placed = sorted(set(body) & {"servers", "replicas", "stripe"})
        if placed:
            raise BadRequest(f"an abort takes no placement: drop {', '.join(placed)}")
        cmd = cm.AbortMigration(name)
    else:
        cmd = cm.MigrateVolume(name, tuple(servers), body.get("replicas", 0), body.get("stripe", 0))
    svc = request.app[SERVICE]
    _volume_exists(svc, name)
    outcome = await _submit_published(svc, cmd)
    volume = _volume_json(svc.map, name)
    return web.json_response({"epoch": outcome.epoch, "volume": volume}, status=202)


async def get_migration(request: web.Request) -> web.Response:
    """Whether the volume is migrating or being flattened, and, on the leader, how far
    its worker got (pages moved and left per layer, shared pages left to copy)."""
    name = request.match_info["name"]
    svc, duties = request.app[SERVICE], request.app[DUTIES]
    volume = svc.map.volumes.get(name)
    if volume is None:
        raise NotFound(f"no volume {name!r}")
    worker = duties.worker if duties.leading() else None
    layers: list[dict[str, Any]] = []
    flatten_left = None
    if worker is not None:
        moved = worker.progress.moved
        layers = [dict(moved[lid]) for lid in sorted(moved) if moved[lid]["volume"] == name]
        flatten_left = worker.progress.flattening.get(name)
    return web.json_response(
        {
            "migrating": bool(volume.migration),
            "flattening": volume.flattening,
            "layers": layers,
            "flatten_left": flatten_left,
            "leader": worker is not None,
            "epoch": svc.map.epoch,
        }
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


def make_app(
    service: ManagerService,
    token: str,
    status: Callable[[], dict[str, Any]],
    duties: LeaderDuties,
    caught_up: CaughtUpFn = lambda: True,
) -> web.Application:
    """The API of one manager; ``caught_up`` tells whether its map may be served yet
    (:attr:`lamina.mgmt.raft.ReplicatedLog.caught_up`)."""
    app = web.Application(middlewares=[_errors, _catching_up], client_max_size=MAX_BODY)
    app[SERVICE] = service
    app[DUTIES] = duties
    app[TOKEN] = token
    app[STATUS] = status
    app[CAUGHT_UP] = caught_up
    app.router.add_get("/api/v1/status", get_status)
    app.router.add_get("/api/v1/map", get_map)
    app.router.add_get("/api/v1/servers", list_servers)
    app.router.add_post("/api/v1/servers", add_server)
    app.router.add_delete("/api/v1/servers/{id}", remove_server)
    app.router.add_post("/api/v1/servers/{id}/report", report_server)
    app.router.add_post("/api/v1/servers/{id}/drain", drain_server)
    app.router.add_post("/api/v1/rebalance", rebalance)
    app.router.add_get("/api/v1/volumes", list_volumes)
    app.router.add_post("/api/v1/volumes", create_volume)
    app.router.add_get("/api/v1/volumes/{name}", get_volume)
    app.router.add_patch("/api/v1/volumes/{name}", resize_volume)
    app.router.add_delete("/api/v1/volumes/{name}", delete_volume)
    app.router.add_post("/api/v1/volumes/{name}/lock", acquire_lock)
    app.router.add_delete("/api/v1/volumes/{name}/lock", release_lock)
    app.router.add_post("/api/v1/volumes/{name}/scrub", start_scrub)
    app.router.add_get("/api/v1/volumes/{name}/scrub", get_scrub)
    app.router.add_get("/api/v1/volumes/{name}/snapshots", list_snapshots)
    app.router.add_post("/api/v1/volumes/{name}/snapshots", create_snapshot)
    app.router.add_delete("/api/v1/volumes/{name}/snapshots/{snapshot}", delete_snapshot)
    app.router.add_post("/api/v1/volumes/{name}/rollback", rollback_volume)
    app.router.add_post("/api/v1/volumes/{name}/clone", clone_volume)
    app.router.add_post("/api/v1/volumes/{name}/flatten", flatten_volume)
    app.router.add_post("/api/v1/volumes/{name}/migrate", migrate_volume)
    app.router.add_get("/api/v1/volumes/{name}/migration", get_migration)
    app.router.add_post("/api/v1/sessions/{session}/keepalive", keepalive)
    app.router.add_get("/api/v1/openapi.json", openapi)
    return app


_ERR = {"$ref": "#/components/schemas/Error"}


def _op(
    summary: str,
    ok: str,
    *,
    admin: bool = False,
    body: str | None = None,
    answer: str | None = None,
    query: dict[str, str] | None = None,
) -> dict[str, Any]:
    success: dict[str, Any] = {"description": "success"}
    if answer:
        ref = {"$ref": f"#/components/schemas/{answer}"}
        success["content"] = {"application/json": {"schema": ref}}
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            ok: success,
            "400": {
                "description": "bad request",
                "content": {"application/json": {"schema": _ERR}},
            },
            "404": {
                "description": "unknown name",
                "content": {"application/json": {"schema": _ERR}},
            },
        },
    }
    if admin:
        op["security"] = [{"admin": []}]
        op["responses"]["401"] = {"description": "admin token missing or wrong"}
        op["responses"]["409"] = {
            "description": "the managers rejected the change (the reason is in the message)",
            "content": {"application/json": {"schema": _ERR}},
        }
        op["responses"]["503"] = {"description": "no quorum of managers"}
    op["responses"].setdefault(
        "503",
        {
            "description": "this manager has not caught up with the raft log yet "
            "('caught_up': false, Retry-After): ask another",
            "content": {"application/json": {"schema": _ERR}},
        },
    )
    if query:
        op["parameters"] = [
            {
                "name": k,
                "in": "query",
                "required": True,
                "description": d,
                "schema": {"type": "string"},
            }
            for k, d in query.items()
        ]
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    return op


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "lamina manager API", "version": "1"},
    "paths": {
        "/api/v1/status": {"get": _op("manager, raft and cluster summary", "200")},
        "/api/v1/map": {
            "get": _op(
                "the published cluster map (?current=1: the latest committed; "
                "?min_epoch=N: 503 unless published at least N)",
                "200",
            )
        },
        "/api/v1/servers": {
            "get": _op("storage servers", "200"),
            "post": _op("add a storage server", "201", admin=True, body="NewServer"),
        },
        "/api/v1/servers/{id}": {
            "delete": _op("remove a storage server that holds nothing", "200", admin=True)
        },
        "/api/v1/servers/{id}/report": {
            "post": _op(
                "report that a storage server failed a request: the leader PINGs it (1 s) "
                "and marks it down if it does not answer; 503 (naming the leader's raft "
                "address in 'leader') from any other manager",
                "200",
                admin=True,
                body="Report",
                answer="ReportAnswer",
            )
        },
        "/api/v1/servers/{id}/drain": {
            "post": _op(
                "start draining a server ({'undo': true}: stop): no new copy goes there and "
                "its volumes migrate away; 409 if some volume's copies would have no place",
                "202",
                admin=True,
            )
        },
        "/api/v1/rebalance": {
            "post": _op(
                "migrate volumes onto servers that hold few copies (a new server); "
                "answers the volumes whose migration started",
                "202",
                admin=True,
            )
        },
        "/api/v1/volumes": {
            "get": _op("volumes", "200"),
            "post": _op("create a volume", "201", admin=True, body="NewVolume"),
        },
        "/api/v1/volumes/{name}": {
            "get": _op("one volume with its layers", "200"),
            "patch": _op("grow a volume", "200", admin=True, body="Resize"),
            "delete": _op("delete a volume (refused while it is locked)", "200", admin=True),
        },
        "/api/v1/volumes/{name}/lock": {
            "post": _op(
                "take the volume's exclusive lock (refresh it for the same session; takeover "
                "revokes another session's); use the volume once epoch E is published "
                "(GET /api/v1/map?min_epoch=E); 409 names the holder in 'holder'",
                "200",
                admin=True,
                body="LockRequest",
                answer="LockGrant",
            ),
            "delete": _op(
                "release the volume's lock held by ?session=S",
                "200",
                admin=True,
                answer="Epoch",
                query={"session": "the holder's session id"},
            ),
        },
        "/api/v1/volumes/{name}/scrub": {
            "post": _op(
                "start a scrub of the volume on the leader (503 elsewhere): every copy of "
                "every page compared, differing pages repaired; answers the report so far "
                "(poll GET until 'done')",
                "202",
                admin=True,
            ),
            "get": _op(
                "the report of the volume's latest scrub on the leader: pages_total, "
                "pages_checked, mismatches, repaired, corrupt, errors, done",
                "200",
            ),
        },
        "/api/v1/volumes/{name}/snapshots": {
            "get": _op(
                "the volume's snapshots, oldest first, each with the volumes cloned from it",
                "200",
                answer="Snapshots",
            ),
            "post": _op(
                "take a snapshot (O(1): the top layer is frozen, a new one pushed); answered "
                "once the change is published, when every storage server of the volume "
                "refuses writes older than the snapshot",
                "201",
                admin=True,
                body="SnapshotRequest",
                answer="Snapshot",
            ),
        },
        "/api/v1/volumes/{name}/snapshots/{snapshot}": {
            "delete": _op(
                "forget a snapshot (refused while a clone stacks it); its layer is merged "
                "into the layer above in the background",
                "202",
                admin=True,
                answer="SnapshotDeleted",
            )
        },
        "/api/v1/volumes/{name}/rollback": {
            "post": _op(
                "make the volume read as one of its snapshots again (refused while it is "
                "locked or newer snapshots exist); answered once published, with the volume",
                "200",
                admin=True,
                body="RollbackRequest",
            )
        },
        "/api/v1/volumes/{name}/clone": {
            "post": _op(
                "create a writable volume sharing the layers of one of this volume's "
                "snapshots; answered once published, with the new volume",
                "201",
                admin=True,
                body="CloneRequest",
            )
        },
        "/api/v1/volumes/{name}/flatten": {
            "post": _op(
                "start copying what a clone shares with its origin into its own layers "
                "(the leader's worker does it; watch GET .../migration)",
                "202",
                admin=True,
                answer="VolumeEpoch",
            )
        },
        "/api/v1/volumes/{name}/migrate": {
            "post": _op(
                "start moving the volume's own layers to a new placement (servers: those "
                "servers, else every up one; replicas, stripe: 0 or absent keeps the "
                "volume's), or with abort send a running migration back; answered once "
                "published",
                "202",
                admin=True,
                body="MigrateRequest",
                answer="MigrateAnswer",
            )
        },
        "/api/v1/volumes/{name}/migration": {
            "get": _op(
                "whether the volume is migrating or being flattened and, on the leader, "
                "the worker's progress (pages moved and left per layer)",
                "200",
                answer="Migration",
            )
        },
        "/api/v1/sessions/{session}/keepalive": {
            "post": _op(
                "keep a lock session alive at this manager (send to every manager); the "
                "locks it holds in this manager's map and the session timeout in seconds",
                "200",
                admin=True,
                answer="Keepalive",
            )
        },
    },
    "components": {
        "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "properties": {
                    "error": {"type": "string"},
                    "message": {"type": "string"},
                    "holder": {"$ref": "#/components/schemas/Lock"},
                    "leader": {"type": "string", "nullable": True},
                    "caught_up": {
                        "type": "boolean",
                        "description": "false: this manager is still catching up",
                    },
                },
                "required": ["error", "message"],
            },
            "Lock": {
                "type": "object",
                "required": ["session", "host", "pid", "since"],
                "properties": {
                    "session": {"type": "string"},
                    "host": {"type": "string"},
                    "pid": {"type": "integer", "minimum": 0},
                    "since": {"type": "integer", "description": "unix time in milliseconds"},
                },
            },
            "LockRequest": {
                "type": "object",
                "additionalProperties": False,
                "required": ["session", "host", "pid"],
                "properties": {
                    "session": {"type": "string", "description": "1-64 letters, digits, - or _"},
                    "host": {"type": "string", "description": "1-255 printable characters"},
                    "pid": {"type": "integer", "minimum": 0},
                    "takeover": {"type": "boolean", "default": False},
                },
            },
            "LockGrant": {
                "type": "object",
                "required": ["epoch", "lock"],
                "properties": {
                    "epoch": {"type": "integer"},
                    "lock": {"$ref": "#/components/schemas/Lock"},
                },
            },
            "Epoch": {
                "type": "object",
                "required": ["epoch"],
                "properties": {"epoch": {"type": "integer"}},
            },
            "Keepalive": {
                "type": "object",
                "required": ["locks", "timeout"],
                "properties": {
                    "locks": {"type": "array", "items": {"type": "string"}},
                    "timeout": {"type": "number", "description": "session timeout in seconds"},
                },
            },
            "Report": {
                "type": "object",
                "additionalProperties": False,
                "required": ["reason"],
                "properties": {"reason": {"type": "string"}},
            },
            "ReportAnswer": {
                "type": "object",
                "required": ["state", "checked"],
                "properties": {
                    "state": {"type": "string", "enum": ["up", "recovering", "down", "out"]},
                    "checked": {"type": "string", "enum": ["reachable", "unreachable"]},
                },
            },
            "NewServer": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "addr", "capacity"],
                "properties": {
                    "id": {"type": "string"},
                    "addr": {"type": "string", "description": "HOST:PORT"},
                    "capacity": {"type": "integer", "minimum": 1},
                    "zone": {"type": "string"},
                },
            },
            "NewVolume": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "size"],
                "properties": {
                    "name": {"type": "string"},
                    "size": {"type": "integer", "description": "bytes, a multiple of 4096"},
                    "replicas": {"type": "integer", "minimum": 1, "maximum": 8},
                    "stripe": {"type": "integer", "minimum": 1, "maximum": 64},
                    "page_size": {"type": "integer"},
                },
            },
            "SnapshotRequest": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "description": "1-64 letters, digits, - or _"}
                },
            },
            "Snapshot": {
                "type": "object",
                "required": ["name", "layer", "since", "clones"],
                "properties": {
                    "name": {"type": "string"},
                    "layer": {"type": "integer", "description": "the frozen layer"},
                    "since": {"type": "integer", "description": "unix time in milliseconds"},
                    "clones": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "volumes whose stack holds the snapshot's layer",
                    },
                },
            },
            "Snapshots": {"type": "array", "items": {"$ref": "#/components/schemas/Snapshot"}},
            "SnapshotDeleted": {
                "type": "object",
                "required": ["name", "snapshot", "epoch"],
                "properties": {
                    "name": {"type": "string"},
                    "snapshot": {"type": "string"},
                    "epoch": {"type": "integer"},
                },
            },
            "RollbackRequest": {
                "type": "object",
                "additionalProperties": False,
                "required": ["snapshot"],
                "properties": {"snapshot": {"type": "string"}},
            },
            "CloneRequest": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "snapshot"],
                "properties": {
                    "name": {"type": "string", "description": "the new volume"},
                    "snapshot": {"type": "string", "description": "a snapshot of {name}"},
                },
            },
            "VolumeEpoch": {
                "type": "object",
                "required": ["name", "epoch"],
                "properties": {"name": {"type": "string"}, "epoch": {"type": "integer"}},
            },
            "MigrateRequest": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "servers": {"type": "array", "items": {"type": "string"}},
                    "replicas": {"type": "integer", "minimum": 0, "maximum": 8},
                    "stripe": {"type": "integer", "minimum": 0, "maximum": 64},
                    "abort": {
                        "type": "boolean",
                        "default": False,
                        "description": "send the running migration back (no other field)",
                    },
                },
            },
            "MigrateAnswer": {
                "type": "object",
                "required": ["epoch", "volume"],
                "properties": {
                    "epoch": {"type": "integer"},
                    "volume": {"type": "object", "description": "the volume, as GET shows it"},
                },
            },
            "Migration": {
                "type": "object",
                "required": [
                    "migrating",
                    "flattening",
                    "layers",
                    "flatten_left",
                    "leader",
                    "epoch",
                ],
                "properties": {
                    "migrating": {"type": "boolean"},
                    "flattening": {"type": "boolean"},
                    "layers": {
                        "type": "array",
                        "description": "per layer moving pages: empty unless 'leader'",
                        "items": {
                            "type": "object",
                            "properties": {
                                "volume": {"type": "string"},
                                "layer": {"type": "integer"},
                                "to": {"type": "integer"},
                                "moved": {"type": "integer", "description": "pages, in all"},
                                "left": {"type": "integer", "description": "after the last round"},
                            },
                        },
                    },
                    "flatten_left": {
                        "type": "integer",
                        "nullable": True,
                        "description": "shared pages the last flatten round left",
                    },
                    "leader": {"type": "boolean", "description": "this manager leads"},
                    "epoch": {"type": "integer", "description": "of this manager's map"},
                },
            },
            "Resize": {
                "type": "object",
                "additionalProperties": False,
                "required": ["size"],
                "properties": {"size": {"type": "integer"}},
            },
        },
    },
}

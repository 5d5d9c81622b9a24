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
"""

from __future__ import annotations

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
from lamina.mgmt.service import ManagerService, Rejected

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVICE = web.AppKey("service", ManagerService)
DUTIES = web.AppKey("duties", LeaderDuties)
TOKEN = web.AppKey("token", str)
StatusFn = Callable[[], dict[str, Any]]
STATUS: web.AppKey[StatusFn] = web.AppKey("status")

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


def _error_response(exc: LaminaError) -> web.Response:
    status = _HTTP_STATUS.get(exc.code, 500)
    body: dict[str, Any] = {"error": exc.code.name, "message": exc.message}
    fields: dict[str, Any] = getattr(exc, "fields", {})
    body.update(fields)
    return web.json_response(body, status=status)


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
        }
    )


async def get_map(request: web.Request) -> web.Response:
    """The published map (what clients may use); ``?current=1``: the latest committed one.
    ``?min_epoch=N``: 503 unless this manager's published epoch is at least N, so a
    client never gets a map older than one it has already seen."""
    svc = request.app[SERVICE]
    if request.query.get("current") in ("1", "true"):
        return web.json_response(cm.map_to_dict(svc.map))
    try:
        min_epoch = int(request.query.get("min_epoch", "0"))
    except ValueError:
        raise BadRequest("min_epoch must be an integer") from None
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


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


def make_app(
    service: ManagerService,
    token: str,
    status: Callable[[], dict[str, Any]],
    duties: LeaderDuties,
) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
    app[SERVICE] = service
    app[DUTIES] = duties
    app[TOKEN] = token
    app[STATUS] = status
    app.router.add_get("/api/v1/status", get_status)
    app.router.add_get("/api/v1/map", get_map)
    app.router.add_get("/api/v1/servers", list_servers)
    app.router.add_post("/api/v1/servers", add_server)
    app.router.add_delete("/api/v1/servers/{id}", remove_server)
    app.router.add_post("/api/v1/servers/{id}/report", report_server)
    app.router.add_get("/api/v1/volumes", list_volumes)
    app.router.add_post("/api/v1/volumes", create_volume)
    app.router.add_get("/api/v1/volumes/{name}", get_volume)
    app.router.add_patch("/api/v1/volumes/{name}", resize_volume)
    app.router.add_delete("/api/v1/volumes/{name}", delete_volume)
    app.router.add_post("/api/v1/volumes/{name}/lock", acquire_lock)
    app.router.add_delete("/api/v1/volumes/{name}/lock", release_lock)
    app.router.add_post("/api/v1/volumes/{name}/scrub", start_scrub)
    app.router.add_get("/api/v1/volumes/{name}/scrub", get_scrub)
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
            "Resize": {
                "type": "object",
                "additionalProperties": False,
                "required": ["size"],
                "properties": {"size": {"type": "integer"}},
            },
        },
    },
}

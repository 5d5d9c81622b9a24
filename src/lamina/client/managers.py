"""The driver's side of the managers' HTTP API (asyncio, aiohttp).

The driver asks the managers for four things: the published map (``GET /api/v1/map``,
with ``min_epoch`` when it must not get one older than an epoch it has seen), the
exclusive lock of a volume and its release, keepalives of its session, and reports of a
storage server that failed a request.  Every call tries the managers in turn, starting
with the one that answered last; an error answer (409, 404 ...) is the typed
:class:`~lamina.errors.LaminaError` it stands for, and is not retried elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Any

import aiohttp

from lamina.errors import ErrorCode, InternalError, LaminaError, Unavailable, error_from_code

API = "/api/v1"
TIMEOUT = 5.0
_HTTP_CODES = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.AUTH_FAILED,
    404: ErrorCode.NOT_FOUND,
    409: ErrorCode.CONFLICT,
    503: ErrorCode.UNAVAILABLE,
    507: ErrorCode.NO_SPACE,
}


class ManagerLink:
    """HTTP calls to the managers of one cluster."""

    def __init__(self, urls: Sequence[str], token: str | None, timeout: float = TIMEOUT) -> None:
        if not urls:
            raise ValueError("no manager URL")
        self.urls = list(urls)
        self.token = token
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._first = 0

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout), trust_env=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call_one(self, url: str, method: str, path: str, body: Any = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            async with self._http().request(
                method, url + API + path, json=body, headers=headers
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Unavailable(f"manager {url}: {exc or type(exc).__name__}") from None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if status >= 400:
            code = _HTTP_CODES.get(status, ErrorCode.INTERNAL)
            if isinstance(doc, dict) and isinstance(doc.get("message"), str):
                name = doc.get("error")
                if isinstance(name, str) and name in ErrorCode.__members__:
                    code = ErrorCode[name]
                err = error_from_code(code, doc["message"])
            else:
                err = error_from_code(code, f"manager {url} answered HTTP {status}")
            raise err
        if doc is None:
            raise InternalError(f"manager {url} answered {path} with something not JSON")
        return doc

    async def call(
        self, method: str, path: str, body: Any = None, *, retry_unavailable: bool = True
    ) -> Any:
        """Ask the managers in turn until one answers.  UNAVAILABLE answers (a manager
        that is behind, or not the leader) move on to the next manager too."""
        errors: list[str] = []
        n = len(self.urls)
        for k in range(n):
            i = (self._first + k) % n
            try:
                doc = await self.call_one(self.urls[i], method, path, body)
            except Unavailable as exc:
                if not retry_unavailable:
                    raise
                errors.append(exc.message)
                continue
            self._first = i
            return doc
        raise Unavailable("no manager answered: " + "; ".join(errors))

    # -- what the driver asks ----------------------------------------------------------

    async def get_map(self, min_epoch: int = 0, *, current: bool = False) -> dict[str, Any]:
        """The published map (``current``: the newest committed one, not for I/O)."""
        if current:
            path = "/map?current=1"
        else:
            path = "/map" if min_epoch <= 0 else f"/map?min_epoch={min_epoch}&wait=1"
        doc: dict[str, Any] = await self.call("GET", path)
        return doc

    async def wait_map(self, min_epoch: int, deadline: float) -> dict[str, Any]:
        """The published map once its epoch reaches ``min_epoch`` (polling until the
        loop time ``deadline``, then UNAVAILABLE)."""
        loop = asyncio.get_running_loop()
        delay = 0.02
        while True:
            try:
                return await self.get_map(min_epoch)
            except Unavailable:
                if loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def lock(self, volume: str, session: str, host: str, pid: int, takeover: bool) -> Any:
        body = {"session": session, "host": host, "pid": pid, "takeover": takeover}
        return await self.call("POST", f"/volumes/{volume}/lock", body)

    async def unlock(self, volume: str, session: str) -> Any:
        return await self.call("DELETE", f"/volumes/{volume}/lock?session={session}")

    async def keepalive(self, session: str) -> list[Any]:
        """Send a keepalive to every manager; the answers of those that answered."""

        async def one(url: str) -> Any:
            try:
                return await self.call_one(url, "POST", f"/sessions/{session}/keepalive")
            except LaminaError:
                return None

        answers = await asyncio.gather(*(one(url) for url in self.urls))
        return [a for a in answers if a is not None]

    async def report(self, server_id: str, reason: str) -> None:
        """Tell the managers that ``server_id`` failed a request (best effort)."""
        with contextlib.suppress(LaminaError):
            await self.call("POST", f"/servers/{server_id}/report", {"reason": reason[:200]})

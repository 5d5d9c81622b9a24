"""A client's newer connection makes the storage server drop its older ones, with
whatever they still carry: a request of a connection the client gave up can never be
applied after the client redid it on a new one."""

from __future__ import annotations

import asyncio

import pytest

from lamina.errors import AuthFailed, Unavailable
from lamina.localcluster import StorageProcess
from lamina.wire import messages as m
from lamina.wire.connection import Client
from tests.integration.support import run

pytestmark = pytest.mark.integration


async def connect(server: StorageProcess, key: bytes, client: str, generation: int) -> Client:
    return await Client.connect(
        "127.0.0.1", server.port, key, client_id=client, generation=generation
    )


def test_a_newer_connection_drops_the_older_and_a_stale_one_is_refused(
    server: StorageProcess, key: bytes
) -> None:
    async def main() -> None:
        old = await connect(server, key, "session-a", 1)
        other = await connect(server, key, "session-b", 1)  # another client: untouched
        assert isinstance(await old.call(m.PingRequest()), m.PingResponse)
        new = await connect(server, key, "session-a", 2)
        async with asyncio.timeout(5):
            await old.wait_closed()  # the server dropped it
        with pytest.raises(Unavailable):
            await old.call(m.PingRequest())
        assert isinstance(await new.call(m.PingRequest()), m.PingResponse)
        assert isinstance(await other.call(m.PingRequest()), m.PingResponse)
        with pytest.raises(AuthFailed, match="newer connection"):
            await connect(server, key, "session-a", 1)  # late and stale: refused
        assert isinstance(await new.call(m.PingRequest()), m.PingResponse)
        anonymous = [await Client.connect("127.0.0.1", server.port, key) for _ in range(2)]
        for c in anonymous:  # connections that name no client are never dropped
            assert isinstance(await c.call(m.PingRequest()), m.PingResponse)
        for c in (new, other, *anonymous):
            c.close()

    run(main())

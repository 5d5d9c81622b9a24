"""ServerConnection and Client over real loopback sockets, in process."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest

from lamina.errors import (
    AuthFailed,
    BadRequest,
    ErrorCode,
    InternalError,
    LaminaError,
    StaleEpoch,
    Unavailable,
)
from lamina.wire import handshake as hs
from lamina.wire import messages as m
from lamina.wire.connection import MAX_WAITING_REQUESTS, Client, Reply, ServerConnection
from lamina.wire.framing import (
    MAGIC,
    MAX_PAYLOAD,
    PREAUTH_MAX_HEADER,
    PREFIX,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    Kind,
    encode_frame,
)

KEY = b"k" * 32
WRONG_KEY = b"w" * 32
EPOCH = 17
TIMEOUT = 10.0

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
    """Run one test coroutine on a fresh event loop, bounded by ``timeout`` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def page_bytes(msg: m.ReadRequest) -> bytes:
    """The bytes the test handler serves for a read: a pattern of page and offset."""
    pattern = f"{msg.page}:{msg.offset};".encode()
    return (pattern * (msg.length // len(pattern) + 1))[: msg.length]


class Handler:
    """A RequestHandler: PING answers at once, READ after a short random sleep."""

    server_id = "test-server"

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.finished: list[int] = []  # pages of reads, in the order they completed

    def current_epoch(self) -> int:
        return EPOCH

    def handle(
        self, msg: m.Message, payload: bytes | bytearray
    ) -> Reply | Coroutine[Any, Any, Reply]:
        if isinstance(msg, m.PingRequest):
            return m.PingResponse(self.server_id, EPOCH, True, 1000, 10, 3), b""
        if isinstance(msg, m.ReadRequest):
            return self._read(msg, self.rng.uniform(0.0, 0.03))
        if isinstance(msg, m.FlushRequest):
            if msg.epoch < EPOCH:
                raise StaleEpoch(f"epoch {msg.epoch} is older than {EPOCH}", EPOCH)
            return self._fail_later()
        if isinstance(msg, m.RestoreRequest):
            raise RuntimeError("handler bug")
        raise BadRequest(f"{type(msg).__name__} is not served here")

    async def _read(self, msg: m.ReadRequest, delay: float) -> Reply:
        await asyncio.sleep(delay)
        self.finished.append(msg.page)
        return m.ReadResponse(m.PageState.PRESENT, msg.page, m.FULL_MASK), page_bytes(msg)

    async def _fail_later(self) -> Reply:
        await asyncio.sleep(0)
        raise StaleEpoch("fenced while flushing", EPOCH + 1)


@contextlib.asynccontextmanager
async def serving(handler: Handler | None = None) -> AsyncIterator[int]:
    """A listening ServerConnection server on 127.0.0.1; yields its port."""
    the_handler = handler if handler is not None else Handler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ServerConnection(the_handler, KEY), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


class RawPeer:
    """A hand-driven client: writes any bytes and reads whole frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()

    @classmethod
    async def open(cls, port: int) -> RawPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, op: int, rid: int, header: bytes, payload: bytes = b"") -> None:
        self.writer.writelines(encode_frame(Kind.REQUEST, op, 0, rid, header, payload))
        await self.writer.drain()

    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> Frame | None:
        """The next frame, or None once the server has closed the connection."""
        while (frame := self.decoder.next_frame()) is None:
            try:
                data = await self.reader.read(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.decoder.feed(data)
        return frame

    async def recv_reply(self, rid: int) -> m.Message:
        frame = await self.recv()
        assert frame is not None, "connection closed instead of a reply"
        assert (frame.kind, frame.status, frame.request_id) == (Kind.RESPONSE, 0, rid)
        return m.decode_response(frame.op, frame.header)

    async def recv_error(self, rid: int) -> LaminaError:
        frame = await self.recv()
        assert frame is not None, "connection closed instead of an error reply"
        assert frame.kind == Kind.RESPONSE
        assert frame.request_id == rid
        return m.decode_error(frame.status, frame.header)

    async def assert_closed(self) -> None:
        frame = await self.recv()
        assert frame is None, f"expected the server to close, got {frame}"

    async def handshake(self, key: bytes = KEY) -> m.Message:
        nonce = hs.new_nonce()
        await self.send(m.Op.HELLO, 1, m.HelloRequest(1, 1, nonce, "raw").encode())
        hello = await self.recv_reply(1)
        assert isinstance(hello, m.HelloResponse)
        await self.send(
            m.Op.AUTH, 2, m.AuthRequest(hs.client_proof(key, hello.nonce, nonce)).encode()
        )
        return await self.recv_reply(2)

    def close(self) -> None:
        self.writer.close()


def raw_prefix(op: int, rid: int, header_len: int, payload_len: int) -> bytes:
    return PREFIX.pack(
        MAGIC, PROTOCOL_VERSION, Kind.REQUEST, op, 0, 0, rid, header_len, payload_len
    )


async def ping_works(port: int) -> None:
    async with await Client.connect("127.0.0.1", port, KEY) as client:
        reply = await client.call(m.PingRequest())
        assert isinstance(reply, m.PingResponse)
        assert reply.server_id == "test-server"


# --- tests -------------------------------------------------------------------------------


def test_connect_and_ping() -> None:
    """Client.connect completes the handshake and learns the server id and epoch."""

    async def main() -> None:
        async with serving() as port, await Client.connect("127.0.0.1", port, KEY) as client:
            assert client.connected
            assert (client.server_id, client.epoch_at_connect) == ("test-server", EPOCH)
            reply = await client.call(m.PingRequest())
            assert reply == m.PingResponse("test-server", EPOCH, True, 1000, 10, 3)

    run(main())


def test_pipelined_requests_match_their_answers() -> None:
    """64 pipelined requests answered out of order each get their own answer."""
    handler = Handler(seed=1)

    async def main() -> None:
        async with serving(handler) as port, await Client.connect("127.0.0.1", port, KEY) as client:
            reads = [
                m.ReadRequest(1, EPOCH, 2, page, m.MIN_PAGE_SIZE, page * 7, 1 + page * 13)
                for page in range(60)
            ]
            calls: list[m.Message] = [*reads[:30], *[m.PingRequest()] * 4, *reads[30:]]
            replies = await asyncio.gather(*(client.call_with_payload(c) for c in calls))
            for request, (reply, payload) in zip(calls, replies, strict=True):
                if isinstance(request, m.ReadRequest):
                    assert reply == m.ReadResponse(m.PageState.PRESENT, request.page, m.FULL_MASK)
                    assert payload == page_bytes(request)
                else:
                    assert isinstance(reply, m.PingResponse)
                    assert payload == b""

    run(main())
    assert sorted(handler.finished) == list(range(60))
    assert handler.finished != list(range(60)), "answers should have completed out of order"


def test_handler_errors_reach_the_caller_typed() -> None:
    """Handler errors, raised at once or from a coroutine, arrive as typed errors with detail."""

    async def main() -> None:
        async with serving() as port, await Client.connect("127.0.0.1", port, KEY) as client:
            with pytest.raises(StaleEpoch) as stale:
                await client.call(m.FlushRequest(1, EPOCH - 1))
            assert stale.value.current_epoch == EPOCH
            with pytest.raises(StaleEpoch) as later:
                await client.call(m.FlushRequest(1, EPOCH))
            assert later.value.current_epoch == EPOCH + 1
            with pytest.raises(BadRequest, match="not served here"):
                await client.call(m.DeleteLayerRequest(1, EPOCH, 3))
            with pytest.raises(InternalError, match="handler bug"):
                await client.call(m.RestoreRequest((1,)))
            assert isinstance(await client.call(m.PingRequest()), m.PingResponse)

    run(main())


def test_wrong_key_fails_and_server_stays_usable() -> None:
    """A client with the wrong key gets AuthFailed; a correct client is served afterwards."""

    async def main() -> None:
        async with serving() as port:
            with pytest.raises(AuthFailed):
                await Client.connect("127.0.0.1", port, WRONG_KEY)
            await ping_works(port)

    run(main())


def test_wrong_client_proof_is_refused_and_closed() -> None:
    """An AUTH with a proof made from the wrong key gets AUTH_FAILED and the connection closes."""

    async def main() -> None:
        async with serving() as port:
            peer = await RawPeer.open(port)
            nonce = hs.new_nonce()
            await peer.send(m.Op.HELLO, 5, m.HelloRequest(1, 1, nonce, "raw").encode())
            hello = await peer.recv_reply(5)
            assert isinstance(hello, m.HelloResponse)
            hs.check_proof(hs.server_proof(KEY, nonce, hello.nonce), hello.proof)
            bad = hs.client_proof(WRONG_KEY, hello.nonce, nonce)
            await peer.send(m.Op.AUTH, 6, m.AuthRequest(bad).encode())
            assert isinstance(await peer.recv_error(6), AuthFailed)
            await peer.assert_closed()
            peer.close()
            await ping_works(port)

    run(main())


def test_raw_handshake_then_requests() -> None:
    """A hand-made HELLO/AUTH exchange authenticates and unlocks data requests."""

    async def main() -> None:
        async with serving() as port:
            peer = await RawPeer.open(port)
            assert await peer.handshake() == m.AuthResponse("test-server", EPOCH)
            await peer.send(m.Op.PING, 3, m.PingRequest().encode())
            assert isinstance(await peer.recv_reply(3), m.PingResponse)
            peer.close()

    run(main())


@pytest.mark.parametrize(
    "request_msg",
    [m.PingRequest(), m.ReadRequest(1, 1, 1, 0, m.MIN_PAGE_SIZE, 0, 10), m.AuthRequest(bytes(32))],
    ids=["ping", "read", "auth-before-hello"],
)
def test_request_before_handshake_closes(request_msg: m.Message) -> None:
    """A request other than HELLO before the handshake gets BAD_REQUEST, then the server closes."""

    async def main() -> None:
        async with serving() as port:
            peer = await RawPeer.open(port)
            await peer.send(request_msg.OP, 9, request_msg.encode())
            err = await peer.recv_error(9)
            assert err.code == ErrorCode.BAD_REQUEST
            await peer.assert_closed()
            peer.close()
            await ping_works(port)

    run(main())


def test_payload_before_handshake_closes() -> None:
    """A frame with a payload before the handshake is too large and closes the connection."""

    async def main() -> None:
        async with serving() as port:
            peer = await RawPeer.open(port)
            write = m.WriteRequest(1, 1, 1, 0, m.MIN_PAGE_SIZE, 0, 0, 0, False)
            await peer.send(m.Op.WRITE, 4, write.encode(), b"x" * 10)
            err = await peer.recv_error(0)
            assert err.code == ErrorCode.TOO_LARGE
            await peer.assert_closed()
            peer.close()

    run(main())


def test_oversize_header_before_handshake_closes() -> None:
    """A header over the pre-authentication limit closes the connection at once."""

    async def main() -> None:
        async with serving() as port:
            peer = await RawPeer.open(port)
            await peer.send_bytes(raw_prefix(m.Op.HELLO, 1, PREAUTH_MAX_HEADER + 1, 0))
            assert (await peer.recv_error(0)).code == ErrorCode.TOO_LARGE
            await peer.assert_closed()
            peer.close()

    run(main())


def test_unsupported_version_is_answered_then_closed() -> None:
    """A HELLO offering no common version gets UNSUPPORTED_VERSION for that request, then EOF."""

    async def main() -> None:
        async with serving() as port:
            peer = await RawPeer.open(port)
            await peer.send(m.Op.HELLO, 77, m.HelloRequest(2, 9, bytes(32), "future").encode())
            err = await peer.recv_error(77)
            assert err.code == ErrorCode.UNSUPPORTED_VERSION
            await peer.assert_closed()
            peer.close()

    run(main())


def test_invalid_header_after_handshake_gets_bad_request() -> None:
    """After the handshake an invalid header gets BAD_REQUEST and the connection stays usable."""

    async def main() -> None:
        async with serving() as port:
            peer = await RawPeer.open(port)
            await peer.handshake()
            bad_headers = [
                (m.Op.READ, b"\xc1"),  # not msgpack
                (m.Op.READ, m.PingRequest().encode()),  # wrong field count
                (m.Op.READ, m.PingResponse("x", 1, True, 1, 1, 1).encode()),  # wrong types
                (200, m.PingRequest().encode()),  # unknown operation
                (m.Op.HELLO, m.HelloRequest(1, 1, bytes(32), "again").encode()),  # handshake twice
            ]
            for rid, (op, header) in enumerate(bad_headers, start=100):
                await peer.send(op, rid, header)
                assert (await peer.recv_error(rid)).code == ErrorCode.BAD_REQUEST
            write = m.WriteRequest(1, EPOCH, 1, 0, m.MIN_PAGE_SIZE, m.MIN_PAGE_SIZE - 1, 0, 0, True)
            await peer.send(m.Op.WRITE, 200, write.encode(), b"two")  # payload past the page
            assert (await peer.recv_error(200)).code == ErrorCode.BAD_REQUEST
            await peer.send(m.Op.PING, 201, m.PingRequest().encode())
            assert isinstance(await peer.recv_reply(201), m.PingResponse)
            peer.close()

    run(main())


def test_broken_frame_after_handshake_closes() -> None:
    """After the handshake a frame with bad magic closes the connection."""

    async def main() -> None:
        async with serving() as port:
            peer = await RawPeer.open(port)
            await peer.handshake()
            await peer.send_bytes(b"XX" + raw_prefix(m.Op.PING, 1, 0, 0)[2:])
            assert (await peer.recv_error(0)).code == ErrorCode.BAD_REQUEST
            await peer.assert_closed()
            peer.close()

    run(main())


def test_oversize_frame_closes_the_connection() -> None:
    """After the handshake a payload over MAX_PAYLOAD gets TOO_LARGE and the connection closes."""

    async def main() -> None:
        async with serving() as port:
            peer = await RawPeer.open(port)
            await peer.handshake()
            await peer.send_bytes(raw_prefix(m.Op.WRITE, 5, 10, MAX_PAYLOAD + 1))
            assert (await peer.recv_error(0)).code == ErrorCode.TOO_LARGE
            await peer.assert_closed()
            peer.close()
            await ping_works(port)

    run(main())


def test_client_sees_the_close_after_an_oversize_frame() -> None:
    """A Client whose connection was closed for an oversize frame fails calls with Unavailable."""

    async def main() -> None:
        async with serving() as port, await Client.connect("127.0.0.1", port, KEY) as client:
            client.send_raw(raw_prefix(m.Op.WRITE, 999, 0, MAX_PAYLOAD + 1))
            await client.wait_closed()
            assert not client.connected
            with pytest.raises(Unavailable):
                await client.call(m.PingRequest())

    run(main())


class GateHandler(Handler):
    """READ waits until the test opens the gate; counts how many wait at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = 0
        self.most_waiting = 0

    def handle(
        self, msg: m.Message, payload: bytes | bytearray
    ) -> Reply | Coroutine[Any, Any, Reply]:
        if isinstance(msg, m.ReadRequest):
            return self._gated(msg)
        return super().handle(msg, payload)

    async def _gated(self, msg: m.ReadRequest) -> Reply:
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        return m.ReadResponse(m.PageState.PRESENT, msg.page, m.FULL_MASK), page_bytes(msg)


def test_waiting_requests_per_connection_are_bounded() -> None:
    """A client pipelining more slow requests than MAX_WAITING_REQUESTS gets them all
    answered, but the server never holds more than that many waiting at once."""
    handler = GateHandler()
    total = 3 * MAX_WAITING_REQUESTS

    async def main() -> None:
        async with serving(handler) as port, await Client.connect("127.0.0.1", port, KEY) as client:
            reads = [
                m.ReadRequest(1, EPOCH, 2, page, m.MIN_PAGE_SIZE, 0, 16) for page in range(total)
            ]
            calls = [asyncio.ensure_future(client.call_with_payload(r)) for r in reads]
            for _ in range(200):  # let the server read all it is willing to
                await asyncio.sleep(0.005)
                if handler.waiting >= MAX_WAITING_REQUESTS:
                    break
            await asyncio.sleep(0.05)
            assert handler.waiting == MAX_WAITING_REQUESTS
            handler.gate.set()
            replies = await asyncio.gather(*calls)
            for read, (reply, payload) in zip(reads, replies, strict=True):
                assert reply == m.ReadResponse(m.PageState.PRESENT, read.page, m.FULL_MASK)
                assert payload == page_bytes(read)

    run(main())
    assert handler.most_waiting == MAX_WAITING_REQUESTS


def test_a_peer_that_never_authenticates_is_disconnected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that does not complete the handshake in time is closed by the server."""
    monkeypatch.setattr(ServerConnection, "handshake_timeout", 0.2)

    async def main() -> None:
        async with serving() as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                async with asyncio.timeout(5):
                    assert await reader.read() == b""  # EOF: the server hung up
            finally:
                writer.close()
            await ping_works(port)  # others are still served

    run(main())

"""Asyncio transports for the wire protocol: they only move bytes.

Theory of operation
-------------------
:class:`ServerConnection` is an ``asyncio.Protocol``: bytes go into a
:class:`~lamina.wire.framing.FrameDecoder`; each complete frame is decoded into a typed
message and handed to a :class:`RequestHandler`.  A handler answers either at once (the
hot path: no task, no await) or with a coroutine, which runs as a task; so answers leave
in whatever order they complete.  A frame that breaks framing closes the connection (its
boundaries are lost); a frame whose header is invalid gets a BAD_REQUEST answer and the
connection goes on.  Until the handshake is done only HELLO and AUTH are accepted, with
tiny frame limits.  When the transport's write buffer is full we stop reading, so a
client that pipelines reads but never drains them cannot grow our memory.

:class:`Client` is the requester side: ``await client.call(msg, payload)`` with any
number of calls in flight, matched to answers by request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol, TypeVar, cast

from lamina.errors import (
    AuthFailed,
    FrameTooLarge,
    InternalError,
    LaminaError,
    ProtocolError,
    Unavailable,
    UnsupportedVersion,
)
from lamina.wire import handshake as hs
from lamina.wire import messages as m
from lamina.wire.framing import (
    PREAUTH_MAX_HEADER,
    PREAUTH_MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    Kind,
    Payload,
    encode_frame,
)

log = logging.getLogger(__name__)

Reply = tuple[m.Message, Payload]

#: requests of one connection that may wait for an answer before reading pauses
MAX_WAITING_REQUESTS = 128
M = TypeVar("M", bound=m.Message)


class RequestHandler(Protocol):
    """What a server role implements; the connection only decodes, calls and encodes."""

    server_id: str

    def current_epoch(self) -> int: ...

    def handle(self, msg: m.Message, payload: Payload) -> Reply | Coroutine[Any, Any, Reply]: ...


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


#: per request handler (one server), the newest authenticated connection of each client
#: that names itself in HELLO: client -> (generation, connection)
_NEWEST: dict[int, dict[str, tuple[int, ServerConnection]]] = {}


class ServerConnection(asyncio.BufferedProtocol):
    """One accepted connection of a server role."""

    #: a peer that has not authenticated by then is disconnected
    handshake_timeout = 10.0

    def __init__(self, handler: RequestHandler, key: bytes) -> None:
        self._handler = handler
        self._key = key
        self._decoder = FrameDecoder(PREAUTH_MAX_HEADER, PREAUTH_MAX_PAYLOAD)
        self._transport: asyncio.Transport | None = None
        self._authenticated = False
        self._client_nonce: bytes | None = None
        self._claim: tuple[str, int] = ("", 0)  # (client, generation) named in HELLO
        self._server_nonce = hs.new_nonce()
        self._tasks: set[asyncio.Task[None]] = set()
        self._peer = "?"
        self._out: list[Payload] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._output_full = False
        self._reading_paused = False

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        _nodelay(transport)
        self._peer = str(transport.get_extra_info("peername"))
        self._deadline = asyncio.get_running_loop().call_later(
            self.handshake_timeout, self._handshake_too_slow
        )

    def _handshake_too_slow(self) -> None:
        if not self._authenticated:
            log.info("closing connection from %s: no handshake within %ss", self._peer,
                     self.handshake_timeout)  # fmt: skip
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._transport = None
        for task in self._tasks:
            task.cancel()
        client = self._claim[0]
        newest = _NEWEST.get(id(self._handler), {})
        if client and newest.get(client, (0, None))[1] is self:
            del newest[client]

    def _supersede(self) -> bool:
        """Register this connection as its client's newest; drop (abort: unread input
        is discarded, requests waiting are cancelled) an older one.  False if a newer
        connection of the client is already open: this one is stale."""
        client, generation = self._claim
        if not client:
            return True
        newest = _NEWEST.setdefault(id(self._handler), {})
        known = newest.get(client)
        if known is not None and known[1] is not self:
            if known[0] > generation:
                log.warning("refused a stale connection of %s (%d < %d)", client, generation,
                            known[0])  # fmt: skip
                return False
            log.info("connection %d of %s replaces %d", generation, client, known[0])
            known[1].abort()
        newest[client] = (generation, self)
        return True

    def abort(self) -> None:
        """Drop the connection at once, unread input and waiting requests included."""
        transport = self._transport
        self._transport = None
        for task in self._tasks:
            task.cancel()
        if transport is not None:
            transport.abort()

    # Reading pauses while the peer does not drain our answers, and while too many of
    # its requests wait (each may hold a payload of up to 16 MiB).

    def pause_writing(self) -> None:
        self._output_full = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._output_full = False
        self._update_reading()

    def _update_reading(self) -> None:
        if self._transport is None:
            return
        pause = self._output_full or len(self._tasks) >= MAX_WAITING_REQUESTS
        if pause and not self._reading_paused:
            self._transport.pause_reading()
        elif not pause and self._reading_paused:
            self._transport.resume_reading()
        self._reading_paused = pause

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._reading_paused and len(self._tasks) < MAX_WAITING_REQUESTS:
            self._process()  # frames already received but held back
            self._update_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._decoder.buffer_updated(nbytes)
        self._process()

    def data_received(self, data: bytes) -> None:
        """The same as a received chunk (for transports that do not fill buffers)."""
        self._decoder.feed(data)
        self._process()

    def _process(self) -> None:
        # Answers produced while handling this chunk leave in one writev, not one each.
        out: list[Payload] = []
        self._out = out
        try:
            while self._transport is not None and len(self._tasks) < MAX_WAITING_REQUESTS:
                frame = self._decoder.next_frame()
                if frame is None:
                    break
                self._frame_received(frame)
        except ProtocolError as exc:
            log.info("closing connection from %s: %s", self._peer, exc)
            self._send_error(0, 0, exc)
            self._flush_out()
            self._close()
        finally:
            self._flush_out()
            if self._out is out:
                self._out = None

    def _flush_out(self) -> None:
        out = self._out
        if out and self._transport is not None:
            self._transport.writelines(out)
        if out:
            out.clear()

    def _write(self, bufs: list[Payload]) -> None:
        if self._out is not None:
            self._out.extend(bufs)
        elif self._transport is not None:
            self._transport.writelines(bufs)

    # -- frames ----------------------------------------------------------------------------

    def _frame_received(self, frame: Frame) -> None:
        if frame.kind != Kind.REQUEST:
            raise ProtocolError("a server accepts only requests")
        if not self._authenticated:
            try:
                self._handshake(frame)
            except ProtocolError as exc:
                # answer the handshake request itself (so the client sees why), then hang up
                log.info("closing connection from %s: %s", self._peer, exc)
                self._send_error(frame.op, frame.request_id, exc)
                self._close()
            return
        try:
            msg = m.decode_request(frame.op, frame.header, len(frame.payload))
            if isinstance(msg, m.HelloRequest | m.AuthRequest):
                raise ProtocolError("handshake already done")
            result = self._handler.handle(msg, frame.payload)
        except LaminaError as exc:
            self._send_error(frame.op, frame.request_id, exc)
            return
        except Exception as exc:
            log.exception("internal error handling op %s", frame.op)
            self._send_error(frame.op, frame.request_id, InternalError(repr(exc)))
            return
        if isinstance(result, tuple):
            self._send_reply(frame.op, frame.request_id, result)
        else:
            task = asyncio.ensure_future(self._finish(frame.op, frame.request_id, result))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
            if len(self._tasks) >= MAX_WAITING_REQUESTS:
                self._update_reading()

    async def _finish(self, op: int, rid: int, pending: Awaitable[Reply]) -> None:
        try:
            reply = await pending
        except LaminaError as exc:
            self._send_error(op, rid, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("internal error handling op %s", op)
            self._send_error(op, rid, InternalError(repr(exc)))
        else:
            self._send_reply(op, rid, reply)

    def _handshake(self, frame: Frame) -> None:
        msg = m.decode_request(frame.op, frame.header, len(frame.payload))
        if isinstance(msg, m.HelloRequest) and self._client_nonce is None:
            version = hs.choose_version(msg.min_version, msg.max_version)
            if version is None:
                raise UnsupportedVersion(
                    f"peer speaks versions {msg.min_version}..{msg.max_version}, "
                    f"this server {hs.SUPPORTED_VERSIONS[0]}..{hs.SUPPORTED_VERSIONS[1]}"
                )
            self._client_nonce = msg.nonce
            self._claim = (msg.client, msg.generation)
            proof = hs.server_proof(self._key, msg.nonce, self._server_nonce)
            reply = m.HelloResponse(version, self._server_nonce, proof, self._handler.server_id)
            self._send_reply(frame.op, frame.request_id, (reply, b""))
        elif isinstance(msg, m.AuthRequest) and self._client_nonce is not None:
            expected = hs.client_proof(self._key, self._server_nonce, self._client_nonce)
            try:
                hs.check_proof(expected, msg.proof)
            except AuthFailed as exc:
                log.warning("refused %s: %s", self._peer, exc.message)
                self._send_error(frame.op, frame.request_id, exc)
                self._close()
                return
            if not self._supersede():
                self._send_error(frame.op, frame.request_id, AuthFailed(
                    "a newer connection of this client is open: this one is stale"
                ))  # fmt: skip
                self._close()
                return
            self._authenticated = True
            if self._deadline is not None:
                self._deadline.cancel()
            self._decoder.max_header = FrameDecoder().max_header
            self._decoder.max_payload = FrameDecoder().max_payload
            epoch = self._handler.current_epoch()
            reply2 = m.AuthResponse(self._handler.server_id, epoch)
            self._send_reply(frame.op, frame.request_id, (reply2, b""))
        else:
            raise ProtocolError("expected HELLO then AUTH before anything else")

    def _send_reply(self, op: int, rid: int, reply: Reply) -> None:
        if self._transport is None:
            return
        msg, payload = reply
        self._write(encode_frame(Kind.RESPONSE, op, 0, rid, msg.encode(), payload))

    def _send_error(self, op: int, rid: int, exc: LaminaError) -> None:
        if self._transport is None:
            return
        self._write(encode_frame(Kind.RESPONSE, op & 0xFF, int(exc.code), rid, m.encode_error(exc)))

    def _close(self) -> None:
        self._flush_out()  # answers queued in this chunk (e.g. the error that closes) go first
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class _ClientProtocol(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future[Frame]] = {}
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._out: list[Payload] = []
        #: monotonic time of the last answer, or of the request that ended a quiet spell
        self.progress = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(transport)

    def queue(self, bufs: list[Payload]) -> None:
        """Write ``bufs`` at the end of this loop iteration, with every other frame queued
        meanwhile: one system call for many requests."""
        if not self._out:
            asyncio.get_running_loop().call_soon(self.flush_out)
        self._out.extend(bufs)

    def flush_out(self) -> None:
        out, self._out = self._out, []
        if out and self.transport is not None:
            self.transport.writelines(out)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.decoder.buffer_updated(nbytes)
        self._process()

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        self._process()

    def _process(self) -> None:
        self.progress = time.monotonic()
        try:
            while True:
                frame = self.decoder.next_frame()
                if frame is None:
                    return
                if frame.kind != Kind.RESPONSE:
                    raise ProtocolError("server sent a request")
                fut = self.pending.pop(frame.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
        except ProtocolError as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.close()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._can_write.set()
        self._fail(Unavailable(f"connection lost: {exc or 'closed by peer'}"))

    def _fail(self, exc: LaminaError) -> None:
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
        if not self.closed.done():
            self.closed.set_result(None)


class Client:
    """A requester connection: many calls in flight, answers matched by request id."""

    def __init__(self, proto: _ClientProtocol, server_id: str, epoch: int) -> None:
        self._proto = proto
        self._ids = itertools.count(1)
        self.server_id = server_id
        self.epoch_at_connect = epoch

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        key: bytes,
        peer: str = "client",
        timeout: float = 10.0,
        client_id: str = "",
        generation: int = 0,
    ) -> Client:
        """Connect and run the handshake; raises AuthFailed, Unavailable, ProtocolError."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, proto = await loop.create_connection(_ClientProtocol, host, port)
        except (OSError, TimeoutError) as exc:
            raise Unavailable(f"cannot connect to {host}:{port}: {exc}") from None
        client = cls(proto, "?", 0)
        try:
            async with asyncio.timeout(timeout):
                my_nonce = hs.new_nonce()
                lo, hi = hs.SUPPORTED_VERSIONS
                hello = await client.call(
                    m.HelloRequest(lo, hi, my_nonce, peer[:64], client_id, generation)
                )
                assert isinstance(hello, m.HelloResponse)
                hs.check_proof(hs.server_proof(key, my_nonce, hello.nonce), hello.proof)
                proof = hs.client_proof(key, hello.nonce, my_nonce)
                auth = await client.call(m.AuthRequest(proof))
                assert isinstance(auth, m.AuthResponse)
        except TimeoutError:
            client.close()
            raise Unavailable(f"handshake with {host}:{port} timed out") from None
        except BaseException:
            client.close()
            raise
        client.server_id = auth.server_id
        client.epoch_at_connect = auth.epoch
        return client

    @property
    def connected(self) -> bool:
        return self._proto.transport is not None

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._proto.pending)

    def stalled_for(self, now: float) -> float:
        """Seconds requests have been waiting with no answer at all (0 when none wait)."""
        return now - self._proto.progress if self._proto.pending else 0.0

    async def drain(self) -> None:
        """Wait while the transport's write buffer is full (flow control)."""
        if not self._proto._can_write.is_set():
            await self._proto._can_write.wait()

    async def call(self, msg: m.Message, payload: Payload = b"") -> m.Message:
        reply, _ = await self.call_with_payload(msg, payload)
        return reply

    async def call_with_payload(self, msg: m.Message, payload: Payload = b"") -> Reply:
        """Send one request; its typed answer and payload, or the typed error raised."""
        fut = self.send(msg, payload)
        if not self._proto._can_write.is_set():
            await self._proto._can_write.wait()
        frame = await fut
        return self.unpack(frame)

    def send(self, msg: m.Message, payload: Payload = b"") -> asyncio.Future[Frame]:
        """Write a request now; the future resolves to the raw answer frame."""
        proto = self._proto
        if proto.transport is None:
            raise Unavailable("connection is closed")
        rid = next(self._ids)
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        if not proto.pending:
            proto.progress = time.monotonic()
        proto.pending[rid] = fut
        proto.queue(encode_frame(Kind.REQUEST, msg.OP, 0, rid, msg.encode(), payload))
        return fut

    @staticmethod
    def unpack(frame: Frame) -> Reply:
        if frame.status:
            raise m.decode_error(frame.status, frame.header)
        return m.decode_response(frame.op, frame.header), frame.payload

    def send_raw(self, data: bytes) -> None:
        """Write arbitrary bytes (tests of malformed input only)."""
        if self._proto.transport is None:
            raise Unavailable("connection is closed")
        self._proto.flush_out()
        self._proto.transport.write(data)

    async def wait_closed(self) -> None:
        await self._proto.closed

    def close(self) -> None:
        if self._proto.transport is not None:
            self._proto.transport.close()

    def abandon(self) -> None:
        """Drop the connection *and every byte not yet delivered*: the socket is reset
        (SO_LINGER 0), so the kernel neither retransmits requests queued in it nor lets
        them reach the server late.  For a connection given up with requests in flight:
        a write the server had not received must never land after it was redone."""
        transport = self._proto.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Client", "FrameTooLarge", "Reply", "RequestHandler", "ServerConnection"]

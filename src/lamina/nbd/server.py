"""The asyncio transport around the pure NBD state machine.

Theory of operation
-------------------
:class:`NbdConnection` is an ``asyncio.Protocol`` that only moves bytes: received chunks
go into a :class:`~lamina.nbd.protocol.NbdServer`; every :class:`Request` event runs as
a task against the export's :class:`BlockBackend`, so requests are served concurrently
and answered in whatever order they complete (NBD matches replies by handle).  Replies
the state machine produces itself (negotiation, invalid requests) are written as soon as
it produces them.

Flow control: while the transport's write buffer is full, or while too many requests
are in flight, we neither read from the socket nor take further requests out of the
state machine's buffer; so a client that pipelines reads but never drains the answers
cannot grow our memory.

NBD_CMD_DISC stops reading; the connection closes once the requests in flight are
answered.  A protocol error or NBD_OPT_ABORT writes what the machine still holds and
closes at once; requests in flight are cancelled when the connection is lost.

Errors from a backend are mapped here, in one place: :class:`~lamina.errors.NoSpace` to
ENOSPC, :class:`~lamina.errors.BadRequest` to EINVAL, anything else to EIO (logged).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from typing import Any, Protocol, cast, runtime_checkable

from lamina.errors import BadRequest, LaminaError, NoSpace
from lamina.nbd.protocol import (
    NEED_DATA,
    Abort,
    Command,
    CommandFlag,
    Disconnect,
    ExportChosen,
    ExportInfo,
    NbdErrno,
    NbdProtocolError,
    NbdServer,
    Request,
    reply,
)
from lamina.wire.connection import _nodelay
from lamina.wire.framing import Payload

log = logging.getLogger(__name__)

#: requests of one connection in flight before we stop taking more
MAX_INFLIGHT_REQUESTS = 64


class BlockBackend(Protocol):
    """The storage behind one export."""

    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def fast_zero(self) -> bool:
        """Whether zeroing is faster than writing zeros (else FAST_ZERO gets ENOTSUP)."""
        ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, fua: bool) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int) -> None: ...

    async def write_zeroes(self, offset: int, length: int, fua: bool) -> None: ...


@runtime_checkable
class FastBackend(Protocol):
    """A backend that also starts reads and writes as futures, so the connection serves
    them without a task each (the hot path); errors as in :class:`BlockBackend`."""

    def start_read(self, offset: int, length: int) -> asyncio.Future[Payload]: ...

    def start_write(self, offset: int, data: bytes, fua: bool) -> asyncio.Future[None]: ...


_FUA = int(CommandFlag.FUA)


class MemoryBackend:
    """A volatile export held in a bytearray (tests, and serving from memory)."""

    def __init__(self, size: int, read_only: bool = False) -> None:
        if size < 0:
            raise ValueError(f"size {size} is negative")
        self._data = bytearray(size)
        self._read_only = read_only

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def read_only(self) -> bool:
        return self._read_only

    fast_zero = True

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > len(self._data):
            raise BadRequest(f"range {offset}+{length} outside {len(self._data)} bytes")

    def _check_writable(self, offset: int, length: int) -> None:
        if self._read_only:
            raise BadRequest("export is read-only")
        if offset < 0 or length < 0:
            raise BadRequest(f"range {offset}+{length} is negative")
        if offset + length > len(self._data):
            raise NoSpace(f"range {offset}+{length} outside {len(self._data)} bytes")

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self._data[offset : offset + length])

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        self._check_writable(offset, len(data))
        self._data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        return None

    async def trim(self, offset: int, length: int) -> None:
        self._check_writable(offset, length)
        self._data[offset : offset + length] = bytes(length)

    async def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        self._check_writable(offset, length)
        self._data[offset : offset + length] = bytes(length)


def _errno_of(exc: Exception) -> NbdErrno:
    """The NBD error a failed backend call is answered with."""
    if isinstance(exc, NoSpace):
        return NbdErrno.ENOSPC
    if isinstance(exc, BadRequest):
        return NbdErrno.EINVAL
    if isinstance(exc, LaminaError | OSError):
        log.error("NBD backend error: %s", exc)
    else:
        log.exception("unexpected error in an NBD backend", exc_info=exc)
    return NbdErrno.EIO


class NbdConnection(asyncio.Protocol):
    """One accepted NBD connection."""

    def __init__(self, exports: Mapping[str, BlockBackend]) -> None:
        self._backends = dict(exports)
        self._machine = NbdServer(
            {name: ExportInfo(b.size, b.read_only) for name, b in self._backends.items()}
        )
        self._backend: BlockBackend | None = None
        self._fast: FastBackend | None = None
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._peer = "?"
        self._output_full = False
        self._reading_paused = False
        self._disconnecting = False
        self._out: list[bytes] = []

    # -- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        _nodelay(transport)
        self._peer = str(transport.get_extra_info("peername"))
        self._transport.write(self._machine.initial_bytes())

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._disconnecting:
            return
        try:
            self._machine.receive_data(data)
        except NbdProtocolError as exc:
            self._fail(exc)
            return
        self._process()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for task in self._tasks:
            task.cancel()

    def pause_writing(self) -> None:
        self._output_full = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._output_full = False
        self._process()

    # -- events ----------------------------------------------------------------------------

    def _busy(self) -> bool:
        return self._output_full or len(self._tasks) >= MAX_INFLIGHT_REQUESTS

    def _process(self) -> None:
        """Take events out of the machine while we may, then decide whether to read on."""
        machine = self._machine
        try:
            while self._transport is not None and not self._disconnecting and not self._busy():
                event = machine.next_event()
                self._send(machine.data_to_send())
                if event is NEED_DATA:
                    break
                if isinstance(event, Request):
                    self._start(event)
                elif isinstance(event, ExportChosen):
                    self._backend = self._backends[event.name]
                    if isinstance(self._backend, FastBackend):
                        self._fast = self._backend
                    log.debug("%s uses NBD export %r", self._peer, event.name)
                elif isinstance(event, Disconnect):
                    self._disconnecting = True
                    self._close_when_idle()
                elif isinstance(event, Abort):
                    self._close()
        except NbdProtocolError as exc:
            self._fail(exc)
            return
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None:
            return
        pause = self._busy() or self._disconnecting
        if pause and not self._reading_paused:
            transport.pause_reading()
        elif not pause and self._reading_paused:
            transport.resume_reading()
        self._reading_paused = pause

    def _start(self, request: Request) -> None:
        fast = self._fast
        cmd = request.cmd
        fut: asyncio.Future[Any]
        # The hot path: a backend that offers futures serves READ and WRITE without a task.
        if cmd is Command.READ and fast is not None:
            fut = fast.start_read(request.offset, request.length)
            fut.add_done_callback(functools.partial(self._answered, request))
        elif cmd is Command.WRITE and fast is not None:
            fut = fast.start_write(request.offset, request.data, bool(request.flags & _FUA))
            fut.add_done_callback(functools.partial(self._answered, request))
        else:
            fut = asyncio.ensure_future(self._serve(request))
            fut.add_done_callback(self._task_done)
        self._tasks.add(fut)

    def _answered(self, request: Request, fut: asyncio.Future[Any]) -> None:
        """A hot-path request completed: its reply, then what any completion does."""
        if not fut.cancelled():
            exc = fut.exception()
            if exc is not None:
                err = _errno_of(exc) if isinstance(exc, Exception) else NbdErrno.EIO
                self._send(reply(request.handle, err))
            elif request.cmd is Command.READ:
                data = fut.result()
                if len(data) == request.length:
                    self._send(reply(request.handle), data)
                else:
                    log.error(
                        "backend returned %d bytes for a read of %d", len(data), request.length
                    )
                    self._send(reply(request.handle, NbdErrno.EIO))
            else:
                self._send(reply(request.handle))
        self._task_done(fut)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if self._disconnecting:
            self._close_when_idle()
        elif self._reading_paused:
            self._process()  # requests already received but held back

    async def _serve(self, request: Request) -> None:
        backend = self._backend
        assert backend is not None
        fua = bool(request.flags & _FUA)
        data = b""
        try:
            cmd = request.cmd
            if cmd is Command.READ:
                data = await backend.read(request.offset, request.length)
                if len(data) != request.length:
                    raise LaminaError(
                        f"backend returned {len(data)} bytes for a read of {request.length}"
                    )
            elif cmd is Command.WRITE:
                await backend.write(request.offset, request.data, fua)
            elif cmd is Command.FLUSH:
                await backend.flush()
            elif cmd is Command.TRIM:
                await backend.trim(request.offset, request.length)
                if fua:
                    await backend.flush()
            elif cmd is Command.WRITE_ZEROES:
                if request.flags & CommandFlag.FAST_ZERO and not backend.fast_zero:
                    self._send(reply(request.handle, NbdErrno.ENOTSUP))
                    return
                await backend.write_zeroes(request.offset, request.length, fua)
            else:  # DISC never reaches here; anything new is refused
                self._send(reply(request.handle, NbdErrno.EINVAL))
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._send(reply(request.handle, _errno_of(exc)))
            return
        if data:
            self._send(reply(request.handle), data)
        else:
            self._send(reply(request.handle))

    # -- output and closing ----------------------------------------------------------------

    def _send(self, *chunks: bytes) -> None:
        """Queue ``chunks``; everything queued in one loop iteration goes out in one
        write (one system call for many replies)."""
        if self._transport is None:
            return
        if not self._out:
            if len(chunks) == 1 and not chunks[0]:
                return
            asyncio.get_running_loop().call_soon(self._flush_out)
        self._out.extend(chunks)

    def _flush_out(self) -> None:
        out, self._out = self._out, []
        if out and self._transport is not None:
            self._transport.writelines(out)

    def _fail(self, exc: NbdProtocolError) -> None:
        log.info("closing NBD connection from %s: %s", self._peer, exc)
        self._close()

    def _close_when_idle(self) -> None:
        if not self._tasks:
            self._close()

    def _close(self) -> None:
        transport = self._transport
        if transport is None:
            return
        self._send(self._machine.data_to_send())
        self._flush_out()
        transport.close()
        self._transport = None


async def serve_nbd(exports: Mapping[str, BlockBackend], host: str, port: int) -> asyncio.Server:
    """Serve ``exports`` over NBD on ``host:port`` (0 picks a free port)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: NbdConnection(exports), host, port)


async def serve_nbd_unix(exports: Mapping[str, BlockBackend], path: str) -> asyncio.Server:
    """Serve ``exports`` over NBD on the unix socket ``path``."""
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: NbdConnection(exports), path)


__all__ = [
    "BlockBackend",
    "MemoryBackend",
    "NbdConnection",
    "serve_nbd",
    "serve_nbd_unix",
]

"""Frames of the lamina wire protocol, as pure code.

Theory of operation
-------------------
Every message travels in one frame::

    offset size field
    0      2    magic        b"LM"
    2      1    version      protocol version (1)
    3      1    kind         1 = request, 2 = response
    4      1    op           operation code (:class:`lamina.wire.messages.Op`)
    5      1    status       0 on requests and successful responses, else an ErrorCode
    6      2    flags        reserved, must be 0
    8      8    request_id   chosen by the requester, echoed by the response
    16     4    header_len   bytes of msgpack header that follow
    20     4    payload_len  bytes of raw payload after the header

All integers are big-endian.  The header is a msgpack array (the message's fields); the
payload is raw bytes (page data) that are never re-encoded.  :class:`FrameDecoder` is fed
bytes as they arrive and yields complete frames; it never touches a socket.  Every size
is checked against the decoder's limits before anything is buffered for it, so a peer
cannot make us allocate more than ``max_header + max_payload``.  Any violation raises
:class:`lamina.errors.ProtocolError` (or its subclass ``FrameTooLarge``); after that the
decoder is unusable and the connection must be closed, because frame boundaries are lost.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

from lamina.errors import FrameTooLarge, ProtocolError, UnsupportedVersion

MAGIC = b"LM"
PROTOCOL_VERSION = 1
PREFIX = struct.Struct(">2sBBBBHQII")
PREFIX_SIZE = PREFIX.size  # 24

MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 16 * 1024 * 1024
#: limits before the handshake completes: an unauthenticated peer gets almost nothing.
PREAUTH_MAX_HEADER = 1024
PREAUTH_MAX_PAYLOAD = 0
MAX_REQUEST_ID = 2**64 - 1


class Kind(IntEnum):
    REQUEST = 1
    RESPONSE = 2


_KINDS = {int(k): k for k in Kind}


#: a payload as received: bytes, or for a large one the buffer it was received into
Payload = bytes | bytearray


class Frame(NamedTuple):
    """One decoded frame; ``header`` is msgpack bytes, ``payload`` raw bytes.  (A named
    tuple: one is built per request, and a tuple is the cheapest immutable record.)"""

    kind: Kind
    op: int
    status: int
    request_id: int
    header: bytes
    payload: Payload


def encode_prefix(
    kind: Kind, op: int, status: int, request_id: int, header_len: int, payload_len: int
) -> bytes:
    """The 24-byte frame prefix; callers send ``prefix + header`` and ``payload`` as is."""
    if header_len > MAX_HEADER:
        raise FrameTooLarge(f"header of {header_len} bytes exceeds {MAX_HEADER}")
    if payload_len > MAX_PAYLOAD:
        raise FrameTooLarge(f"payload of {payload_len} bytes exceeds {MAX_PAYLOAD}")
    try:  # struct checks the ranges of op (u8), status (u8) and request id (u64)
        return PREFIX.pack(
            MAGIC, PROTOCOL_VERSION, kind, op, status, 0, request_id, header_len, payload_len
        )
    except struct.error:
        raise ProtocolError(
            f"op {op}, status {status} or request id {request_id} out of range"
        ) from None


def encode_frame(
    kind: Kind, op: int, status: int, request_id: int, header: bytes, payload: Payload = b""
) -> list[Payload]:
    """A frame as buffers for ``transport.writelines``; the payload is not copied."""
    head = encode_prefix(kind, op, status, request_id, len(header), len(payload)) + header
    return [head, payload] if payload else [head]


#: payloads at least this large are received straight into their own buffer
LARGE_PAYLOAD = 64 * 1024
STAGING_SIZE = 256 * 1024


class FrameDecoder:
    """Incremental decoder: bytes in, frames out, no socket.

    Two ways to give it bytes: ``feed(data)``, or, with ``asyncio.BufferedProtocol``,
    ``get_buffer()`` (where the transport should receive into) and ``buffer_updated(n)``.
    Then ``next_frame()`` until it returns None.  Small frames are received into a
    staging buffer; a payload of LARGE_PAYLOAD bytes or more gets a buffer of its own
    as soon as its header is known and is received straight into it, so a 1 MiB write
    is copied once by the kernel and never again here.
    """

    __slots__ = (
        "_broken",
        "_fill",
        "_filled",
        "_head",
        "_r",
        "_ready",
        "_stage",
        "_w",
        "max_header",
        "max_payload",
    )

    def __init__(self, max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD) -> None:
        self._stage = bytearray(STAGING_SIZE)
        self._r = 0  # unparsed bytes are self._stage[_r:_w]
        self._w = 0
        self._fill: bytearray | None = None  # the large payload being received
        self._filled = 0
        self._head: tuple[int, int, int, int, bytes] | None = None  # its frame's fields
        self._ready: Frame | None = None  # a large frame received completely
        self._broken = False
        self.max_header = max_header
        self.max_payload = max_payload

    # -- input ---------------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should go (at least one byte of room)."""
        if self._broken:
            raise ProtocolError("decoder already failed; the connection must be closed")
        fill = self._fill
        if fill is not None and self._ready is None and self._filled < len(fill):
            return memoryview(fill)[self._filled :]
        stage = self._stage
        want = max(sizehint, 1)
        if len(stage) - self._w < want and self._r:
            n = self._w - self._r
            stage[:n] = stage[self._r : self._w]
            self._r, self._w = 0, n
        if len(stage) - self._w < want:
            stage.extend(bytes(max(want, len(stage))))
        return memoryview(stage)[self._w :]

    def buffer_updated(self, nbytes: int) -> None:
        fill = self._fill
        if fill is not None and self._ready is None and self._filled < len(fill):
            self._filled += nbytes
            if self._filled == len(fill):
                kind, op, status, rid, header = self._head  # type: ignore[misc]
                self._ready = Frame(_KINDS[kind], op, status, rid, header, fill)
                self._fill = self._head = None
        else:
            self._w += nbytes

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            buf = self.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._w - self._r + (self._filled if self._fill is not None else 0)

    # -- output --------------------------------------------------------------------------

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed."""
        if self._ready is not None:
            frame, self._ready = self._ready, None
            return frame
        if self._fill is not None:
            return None
        r, w = self._r, self._w
        if w - r < PREFIX_SIZE:
            return None
        stage = self._stage
        try:
            magic, version, kind, op, status, flags, rid, hlen, plen = PREFIX.unpack_from(stage, r)
            if magic != MAGIC:
                raise ProtocolError(f"bad magic {magic!r}")
            if version != PROTOCOL_VERSION:
                raise UnsupportedVersion(
                    f"frame version {version}, this peer speaks {PROTOCOL_VERSION}"
                )
            if kind not in (Kind.REQUEST, Kind.RESPONSE):
                raise ProtocolError(f"bad frame kind {kind}")
            if flags != 0:
                raise ProtocolError(f"reserved flags set: {flags:#x}")
            if hlen > self.max_header:
                raise FrameTooLarge(f"header of {hlen} bytes exceeds {self.max_header}")
            if plen > self.max_payload:
                raise FrameTooLarge(f"payload of {plen} bytes exceeds {self.max_payload}")
            if kind == Kind.REQUEST and status != 0:
                raise ProtocolError(f"request with status {status}")
        except ProtocolError:
            self._broken = True
            raise
        hstart = r + PREFIX_SIZE
        hend = hstart + hlen
        end = hend + plen
        if w >= end:
            header = bytes(stage[hstart:hend])
            payload = bytes(stage[hend:end]) if plen else b""
            self._r = end
            if end == w:
                self._r = self._w = 0
            return Frame(_KINDS[kind], op, status, rid, header, payload)
        if plen < LARGE_PAYLOAD or w < hend:
            return None
        # A large payload: give it its own buffer now and receive the rest straight into it.
        fill = bytearray(plen)
        have = w - hend
        fill[:have] = stage[hend:w]
        self._fill, self._filled = fill, have
        self._head = (kind, op, status, rid, bytes(stage[hstart:hend]))
        self._r = self._w = 0
        return None

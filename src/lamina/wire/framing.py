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
from dataclasses import dataclass
from enum import IntEnum

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


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame; ``header`` is msgpack bytes, ``payload`` raw bytes."""

    kind: Kind
    op: int
    status: int
    request_id: int
    header: bytes
    payload: bytes


def encode_prefix(
    kind: Kind, op: int, status: int, request_id: int, header_len: int, payload_len: int
) -> bytes:
    """The 24-byte frame prefix; callers send ``prefix + header`` and ``payload`` as is."""
    if not 0 <= op <= 255 or not 0 <= status <= 255:
        raise ProtocolError(f"op {op} or status {status} out of range")
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise ProtocolError(f"request id {request_id} out of range")
    if header_len > MAX_HEADER:
        raise FrameTooLarge(f"header of {header_len} bytes exceeds {MAX_HEADER}")
    if payload_len > MAX_PAYLOAD:
        raise FrameTooLarge(f"payload of {payload_len} bytes exceeds {MAX_PAYLOAD}")
    return PREFIX.pack(
        MAGIC, PROTOCOL_VERSION, kind, op, status, 0, request_id, header_len, payload_len
    )


def encode_frame(
    kind: Kind, op: int, status: int, request_id: int, header: bytes, payload: bytes = b""
) -> list[bytes]:
    """A frame as buffers for ``transport.writelines``; the payload is not copied."""
    head = encode_prefix(kind, op, status, request_id, len(header), len(payload)) + header
    return [head, payload] if payload else [head]


class FrameDecoder:
    """Incremental decoder: ``feed(data)`` then ``next_frame()`` until it returns None."""

    __slots__ = ("_broken", "_buf", "max_header", "max_payload")

    def __init__(self, max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._broken = False
        self.max_header = max_header
        self.max_payload = max_payload

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._broken:
            raise ProtocolError("decoder already failed; the connection must be closed")
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed."""
        buf = self._buf
        if len(buf) < PREFIX_SIZE:
            return None
        try:
            magic, version, kind, op, status, flags, rid, hlen, plen = PREFIX.unpack_from(buf)
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
        end = PREFIX_SIZE + hlen + plen
        if len(buf) < end:
            return None
        hend = PREFIX_SIZE + hlen
        header = bytes(buf[PREFIX_SIZE:hend])
        payload = bytes(buf[hend:end]) if plen else b""
        del buf[:end]
        return Frame(Kind(kind), op, status, rid, header, payload)

"""The server side of the NBD protocol (fixed newstyle), as pure code.

Theory of operation
-------------------
:class:`NbdServer` is one connection's state machine.  It never touches a socket: the
transport sends :meth:`NbdServer.initial_bytes`, hands every received chunk to
:meth:`NbdServer.receive_data`, calls :meth:`NbdServer.next_event` until it returns
:data:`NEED_DATA`, and after each call writes whatever :meth:`NbdServer.data_to_send`
returns.  Replies the protocol layer can give by itself (option replies during the
handshake, error replies to invalid requests) are queued there; everything else reaches
the caller as an event:

* :class:`ExportChosen`: negotiation finished (NBD_OPT_GO or NBD_OPT_EXPORT_NAME); the
  connection is now in transmission.
* :class:`Request`: a valid transmission request, already checked against the export's
  size, flags and read-only bit.  The caller answers with :func:`reply`, in any order:
  the machine does not serialize requests.
* :class:`Disconnect` (NBD_CMD_DISC) and :class:`Abort` (NBD_OPT_ABORT): the connection
  is over; the caller flushes :meth:`data_to_send` and closes.

The whole state machine is the table :data:`TRANSITIONS`::

    AWAIT_CLIENT_FLAGS --client flags--> OPTIONS --option--> OPTIONS
    OPTIONS --export chosen--> TRANSMISSION --request--> TRANSMISSION
    OPTIONS --abort--> CLOSED          TRANSMISSION --disconnect--> CLOSED
    any state --protocol failure--> CLOSED

A move not in the table raises :class:`NbdProtocolError`.  So does anything after which
the connection must be closed (bad magic, missing NBD_FLAG_C_FIXED_NEWSTYLE, an unknown
name in NBD_OPT_EXPORT_NAME, an oversized option or write): the machine is then CLOSED,
and the caller flushes :meth:`data_to_send` and closes the connection.  Every size is
checked before anything is buffered for it, so a peer cannot make us hold more than
``MAX_OPTION_LENGTH`` or ``MAX_PAYLOAD`` bytes plus a header.  All integers are
big-endian.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum, IntFlag
from typing import Final, Literal

from lamina.errors import ErrorCode, ProtocolError

# -- constants (doc/proto.md of the NBD project) -------------------------------------------

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698

#: longest option payload accepted; a longer one closes the connection
MAX_OPTION_LENGTH: Final = 4096
#: longest export name (proto.md: strings MUST be no longer than 4096 bytes)
MAX_NAME_LENGTH: Final = 4096
#: largest READ or WRITE payload; advertised as the maximum block size
MAX_PAYLOAD: Final = 32 * 1024 * 1024
MIN_BLOCK_SIZE: Final = 1
PREFERRED_BLOCK_SIZE: Final = 4096
#: bytes of padding after the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES was agreed
EXPORT_NAME_PADDING: Final = 124


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1
    NO_ZEROES = 2


class ClientFlag(IntFlag):
    C_FIXED_NEWSTYLE = 1
    C_NO_ZEROES = 2


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8


class OptionReply(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    ERR_UNSUP = 2**31 + 1
    ERR_POLICY = 2**31 + 2
    ERR_INVALID = 2**31 + 3
    ERR_UNKNOWN = 2**31 + 6


class InfoType(IntEnum):
    EXPORT = 0
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1
    READ_ONLY = 2
    SEND_FLUSH = 4
    SEND_FUA = 8
    SEND_TRIM = 32
    SEND_WRITE_ZEROES = 64
    CAN_MULTI_CONN = 256  # never set: writes are not coherent across connections
    SEND_FAST_ZERO = 2048


class Command(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    WRITE_ZEROES = 6


class CommandFlag(IntFlag):
    FUA = 1
    NO_HOLE = 2
    FAST_ZERO = 16


class NbdErrno(IntEnum):
    """Error values of simple replies (0 is success)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


#: command flags each command may carry; any other bit gets EINVAL
#: (plain ints: ``~`` on an IntFlag keeps only defined bits, and must not here)
ALLOWED_FLAGS: Final[Mapping[Command, int]] = {
    Command.READ: 0,
    Command.WRITE: int(CommandFlag.FUA),
    Command.DISC: 0,
    Command.FLUSH: 0,
    Command.TRIM: int(CommandFlag.FUA),
    Command.WRITE_ZEROES: int(CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO),
}
_KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
_COMMANDS: Final = {int(c): c for c in Command}
_MUTATING: Final = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
#: out-of-range errors (proto.md: ENOSPC for writes, EINVAL for reads and trims)
_RANGE_ERROR: Final = {
    Command.READ: NbdErrno.EINVAL,
    Command.WRITE: NbdErrno.ENOSPC,
    Command.TRIM: NbdErrno.EINVAL,
    Command.WRITE_ZEROES: NbdErrno.ENOSPC,
}

_GREETING: Final = struct.Struct(">QQH")
_CLIENT_FLAGS: Final = struct.Struct(">I")
_OPTION_HEADER: Final = struct.Struct(">QII")
_OPTION_REPLY: Final = struct.Struct(">QIII")
_REQUEST: Final = struct.Struct(">IHHQQI")
_SIMPLE_REPLY: Final = struct.Struct(">IIQ")
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_INFO_EXPORT: Final = struct.Struct(">HQH")
_INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")
_EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
REQUEST_HEADER_SIZE: Final = _REQUEST.size  # 28


class NbdProtocolError(ProtocolError):
    """The peer broke the NBD protocol, or asked for something that closes the connection."""

    code = ErrorCode.BAD_REQUEST


# -- exports and events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the NBD front end knows about one export."""

    size: int
    read_only: bool

    def __post_init__(self) -> None:
        if not 0 <= self.size < 2**63:
            raise ValueError(f"export size {self.size} out of range")

    @property
    def transmission_flags(self) -> int:
        """Flags sent with the export (never CAN_MULTI_CONN)."""
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
        if self.read_only:
            return int(flags | TransmissionFlag.READ_ONLY)
        return int(
            flags
            | TransmissionFlag.SEND_TRIM
            | TransmissionFlag.SEND_WRITE_ZEROES
            | TransmissionFlag.SEND_FAST_ZERO
        )


@dataclass(frozen=True, slots=True)
class ExportChosen:
    """Negotiation is over: the client uses export ``name``."""

    name: str
    info: ExportInfo


@dataclass(frozen=True, slots=True)
class Request:
    """A valid transmission request; ``data`` is the payload of a WRITE, else empty."""

    handle: int
    cmd: Command
    flags: int
    offset: int
    length: int
    data: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.handle < 2**64:
            raise ValueError(f"handle {self.handle} out of range")
        if not 0 <= self.offset < 2**64 or not 0 <= self.length < 2**32:
            raise ValueError(f"offset {self.offset} or length {self.length} out of range")
        if self.flags & ~ALLOWED_FLAGS[self.cmd]:
            raise ValueError(f"flags {self.flags:#x} not allowed on {self.cmd.name}")
        if self.cmd != Command.WRITE and self.data:
            raise ValueError("only a WRITE carries data")
        if self.cmd == Command.WRITE and len(self.data) != self.length:
            raise ValueError(f"WRITE of {self.length} bytes carries {len(self.data)}")


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client sent NBD_CMD_DISC: answer outstanding requests, then close."""


@dataclass(frozen=True, slots=True)
class Abort:
    """The client sent NBD_OPT_ABORT during negotiation: close after flushing the ACK."""


Event = ExportChosen | Request | Disconnect | Abort


class _Sentinel(Enum):
    NEED_DATA = "NEED_DATA"


#: returned by :meth:`NbdServer.next_event` when more bytes are needed
NEED_DATA: Final = _Sentinel.NEED_DATA
NeedData = Literal[_Sentinel.NEED_DATA]


# -- the state table ---------------------------------------------------------------------


class State(Enum):
    AWAIT_CLIENT_FLAGS = "AWAIT_CLIENT_FLAGS"
    OPTIONS = "OPTIONS"
    TRANSMISSION = "TRANSMISSION"
    CLOSED = "CLOSED"


class Transition(Enum):
    CLIENT_FLAGS = "client flags"
    OPTION = "option"
    EXPORT_CHOSEN = "export chosen"
    ABORT = "abort"
    REQUEST = "request"
    DISCONNECT = "disconnect"
    FAILURE = "protocol failure"


TRANSITIONS: Final[Mapping[tuple[State, Transition], State]] = {
    (State.AWAIT_CLIENT_FLAGS, Transition.CLIENT_FLAGS): State.OPTIONS,
    (State.AWAIT_CLIENT_FLAGS, Transition.FAILURE): State.CLOSED,
    (State.OPTIONS, Transition.OPTION): State.OPTIONS,
    (State.OPTIONS, Transition.EXPORT_CHOSEN): State.TRANSMISSION,
    (State.OPTIONS, Transition.ABORT): State.CLOSED,
    (State.OPTIONS, Transition.FAILURE): State.CLOSED,
    (State.TRANSMISSION, Transition.REQUEST): State.TRANSMISSION,
    (State.TRANSMISSION, Transition.DISCONNECT): State.CLOSED,
    (State.TRANSMISSION, Transition.FAILURE): State.CLOSED,
}


# -- encoders ------------------------------------------------------------------------------


def reply(handle: int, error: int = 0, data: bytes = b"") -> bytes:
    """A simple reply; ``data`` only on a successful READ (its length must match)."""
    if error and data:
        raise ValueError("an error reply carries no data")
    try:
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle) + data
    except struct.error:
        raise ValueError(f"handle {handle} or error {error} out of range") from None


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """One fixed-newstyle option reply."""
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def info_export(info: ExportInfo) -> bytes:
    return _INFO_EXPORT.pack(InfoType.EXPORT, info.size, info.transmission_flags)


def info_block_size() -> bytes:
    return _INFO_BLOCK_SIZE.pack(
        InfoType.BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD
    )


# -- the connection ------------------------------------------------------------------------


class NbdServer:
    """One NBD connection, server side: bytes in, events and bytes out, no socket."""

    __slots__ = ("_buf", "_export", "_exports", "_out", "_pos", "no_zeroes", "state")

    def __init__(self, exports: Mapping[str, ExportInfo]) -> None:
        self._exports = dict(exports)
        self._buf = bytearray()
        self._pos = 0  # unparsed bytes are self._buf[_pos:]
        self._out = bytearray()
        self._export: ExportInfo | None = None
        self.no_zeroes = False
        self.state = State.AWAIT_CLIENT_FLAGS

    # -- I/O -------------------------------------------------------------------------------

    @staticmethod
    def initial_bytes() -> bytes:
        """The greeting the server sends as soon as the connection is up."""
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, flags)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state is State.CLOSED:
            raise NbdProtocolError("data received on a closed NBD connection")
        self._buf += data

    def data_to_send(self) -> bytes:
        """Replies the protocol layer produced itself; the caller writes them in order."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def export(self) -> ExportInfo | None:
        """The export chosen, once in transmission."""
        return self._export

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA; raises NbdProtocolError if the peer broke the rules."""
        try:
            while True:
                state = self.state
                if state is State.AWAIT_CLIENT_FLAGS:
                    if not self._client_flags():
                        return NEED_DATA
                elif state is State.OPTIONS:
                    event = self._option()
                    if event is not None:
                        return event
                elif state is State.TRANSMISSION:
                    return self._request()
                else:
                    return NEED_DATA
        except NbdProtocolError:
            self._move(Transition.FAILURE)
            raise

    # -- helpers ---------------------------------------------------------------------------

    def _move(self, transition: Transition) -> None:
        try:
            self.state = TRANSITIONS[self.state, transition]
        except KeyError:
            raise NbdProtocolError(
                f"illegal transition {transition.value!r} in state {self.state.name}"
            ) from None

    def _has(self, n: int) -> bool:
        return len(self._buf) - self._pos >= n

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= 64 * 1024:
            del self._buf[: self._pos]
            self._pos = 0
        return data

    # -- handshake -------------------------------------------------------------------------

    def _client_flags(self) -> bool:
        if not self._has(_CLIENT_FLAGS.size):
            return False
        (flags,) = _CLIENT_FLAGS.unpack(self._take(_CLIENT_FLAGS.size))
        if not flags & ClientFlag.C_FIXED_NEWSTYLE:
            raise NbdProtocolError("client did not set NBD_FLAG_C_FIXED_NEWSTYLE")
        if flags & ~_KNOWN_CLIENT_FLAGS:
            raise NbdProtocolError(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self._move(Transition.CLIENT_FLAGS)
        return True

    def _option(self) -> Event | NeedData | None:
        """Handle one complete option: None if negotiation goes on, else an event."""
        if not self._has(_OPTION_HEADER.size):
            return NEED_DATA
        magic, option, length = _OPTION_HEADER.unpack_from(self._buf, self._pos)
        if magic != IHAVEOPT:
            raise NbdProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            raise NbdProtocolError(f"option of {length} bytes exceeds {MAX_OPTION_LENGTH}")
        if not self._has(_OPTION_HEADER.size + length):
            return NEED_DATA
        self._take(_OPTION_HEADER.size)
        data = self._take(length)
        if option == Option.EXPORT_NAME:
            return self._export_name(data)
        if option == Option.ABORT:
            self._out += option_reply(option, OptionReply.ACK)
            self._move(Transition.ABORT)
            return Abort()
        if option in (Option.INFO, Option.GO):
            return self._info_or_go(option, data)
        if option == Option.LIST:
            self._list(data)
        else:  # STRUCTURED_REPLY and anything unknown
            self._out += option_reply(option, OptionReply.ERR_UNSUP)
        self._move(Transition.OPTION)
        return None

    def _export_name(self, data: bytes) -> Event:
        name = _decode_name(data)
        info = self._exports.get(name) if name is not None else None
        if name is None or info is None:
            raise NbdProtocolError(f"NBD_OPT_EXPORT_NAME for unknown export {data[:64]!r}")
        self._out += _EXPORT_NAME_REPLY.pack(info.size, info.transmission_flags)
        if not self.no_zeroes:
            self._out += bytes(EXPORT_NAME_PADDING)
        return self._choose(name, info)

    def _choose(self, name: str, info: ExportInfo) -> Event:
        self._export = info
        self._move(Transition.EXPORT_CHOSEN)
        return ExportChosen(name, info)

    def _list(self, data: bytes) -> None:
        if data:
            self._out += option_reply(Option.LIST, OptionReply.ERR_INVALID)
            return
        for name in self._exports:
            raw = name.encode()
            self._out += option_reply(Option.LIST, OptionReply.SERVER, _U32.pack(len(raw)) + raw)
        self._out += option_reply(Option.LIST, OptionReply.ACK)

    def _info_or_go(self, option: int, data: bytes) -> Event | None:
        parsed = _parse_info_request(data)
        if parsed is None:
            self._out += option_reply(option, OptionReply.ERR_INVALID)
        else:
            info = self._exports.get(parsed)
            if info is None:
                self._out += option_reply(option, OptionReply.ERR_UNKNOWN)
            else:
                # Block sizes are sent whether or not requested (proto.md allows it).
                self._out += option_reply(option, OptionReply.INFO, info_export(info))
                self._out += option_reply(option, OptionReply.INFO, info_block_size())
                self._out += option_reply(option, OptionReply.ACK)
                if option == Option.GO:
                    return self._choose(parsed, info)
        self._move(Transition.OPTION)
        return None

    # -- transmission ----------------------------------------------------------------------

    def _request(self) -> Event | NeedData:
        """The next valid request; invalid ones are answered here and skipped."""
        export = self._export
        assert export is not None
        while self._has(REQUEST_HEADER_SIZE):
            magic, flags, ctype, handle, offset, length = _REQUEST.unpack_from(self._buf, self._pos)
            if magic != REQUEST_MAGIC:
                raise NbdProtocolError(f"bad request magic {magic:#x}")
            cmd = _COMMANDS.get(ctype)
            payload = length if cmd is Command.WRITE else 0
            if payload > MAX_PAYLOAD:
                raise NbdProtocolError(f"WRITE of {length} bytes exceeds {MAX_PAYLOAD}")
            if not self._has(REQUEST_HEADER_SIZE + payload):
                return NEED_DATA
            self._take(REQUEST_HEADER_SIZE)
            data = self._take(payload) if payload else b""
            if cmd is Command.DISC:
                self._move(Transition.DISCONNECT)
                return Disconnect()
            self._move(Transition.REQUEST)
            error = _check(export, cmd, flags, offset, length)
            if error is not None:
                self._out += reply(handle, error)
            elif length == 0 and cmd is not Command.FLUSH:
                self._out += reply(handle)  # nothing to do: success
            else:
                assert cmd is not None
                return Request(handle, cmd, flags, offset, length, data)
        return NEED_DATA


def _check(
    export: ExportInfo, cmd: Command | None, flags: int, offset: int, length: int
) -> NbdErrno | None:
    """The error a request gets before reaching storage, or None if it is valid."""
    if cmd is None or flags & ~ALLOWED_FLAGS[cmd]:
        return NbdErrno.EINVAL
    if cmd is Command.FLUSH:
        return None
    if cmd in _MUTATING and export.read_only:
        return NbdErrno.EPERM
    if offset + length > export.size:
        return _RANGE_ERROR[cmd]
    if cmd is Command.READ and length > MAX_PAYLOAD:
        return NbdErrno.EINVAL
    return None


def _decode_name(data: bytes) -> str | None:
    if len(data) > MAX_NAME_LENGTH or b"\0" in data:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def _parse_info_request(data: bytes) -> str | None:
    """The export name of an NBD_OPT_INFO / NBD_OPT_GO payload, or None if malformed."""
    if len(data) < _U32.size:
        return None
    (name_len,) = _U32.unpack_from(data)
    end = _U32.size + name_len
    if len(data) < end + _U16.size:
        return None
    (count,) = _U16.unpack_from(data, end)
    if len(data) != end + _U16.size + count * _U16.size:
        return None
    return _decode_name(data[_U32.size : end])

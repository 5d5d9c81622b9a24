"""Typed messages of the lamina wire protocol, as pure code.

Theory of operation
-------------------
Each operation has a request and a response class: frozen, slotted dataclasses whose
fields are declared with a wire type (``w_u64()``, ``w_flag()``, ``w_u64_list(max)`` ...).
The header of a frame is the msgpack array of the fields in declaration order; the
page data travels separately as the frame's payload.  Building a message validates
every field (type and range), so a message object that exists is a valid one; decoding
(:func:`decode_request`, :func:`decode_response`) maps any msgpack or validation failure
to :class:`lamina.errors.ProtocolError`.  Requests that carry a payload check its size
with ``check_payload``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

import msgpack

from lamina.errors import ErrorCode, LaminaError, ProtocolError, error_from_code

MIN_PAGE_SIZE = 64 * 1024
MAX_PAGE_SIZE = 16 * 1024 * 1024
FULL_MASK = 0xFFFFFFFF
MAX_LIST = 1024
# Caps chosen so that a header at every cap, with the largest values, fits in MAX_HEADER.
MAX_FENCES = 2048
#: layer lineage tokens a SET_EPOCH or LEASE answer carries (with MAX_FENCES fences, the
#: header still fits in MAX_HEADER)
MAX_LINEAGES = 1024
MAX_ENUMERATE = 4096
MAX_TEXT = 4096
#: a layer addresses at most 16 TiB (the largest file ext4 holds with 4 KiB blocks)
MAX_LAYER_BYTES = 1 << 44
NONCE_SIZE = 32


class Op(IntEnum):
    HELLO = 1
    AUTH = 2
    PING = 3
    READ = 10
    WRITE = 11
    RESTORE = 12
    CREATE_IF_ABSENT = 13
    STATUS = 14
    ENUMERATE = 15
    MARK_CLEAN = 16
    TOMBSTONE = 17
    DELETE_LAYER = 18
    SET_EPOCH = 19
    FLUSH = 20
    CHECKSUM = 21
    LEASE = 30


class PageState(IntEnum):
    """State of one copy of a page in one layer."""

    ABSENT = 0
    PRESENT = 1
    ZERO = 2  # whiteout: reads as zeros, holds no data
    TOMBSTONE = 3  # moved up: "look again"
    QUARANTINED = 4  # failed its checksum; holds no trusted data


#: STATUS and CHECKSUM ``flags``: a client write is in flight on this copy of the page (its
#: token is unconfirmed, it is of the volume's current fence or newer, and it arrived less
#: than ``syncmask.IN_FLIGHT`` seconds ago).  A resynchronisation must not overwrite the
#: copy then: the other copies may not have that write yet, and its confirmation would
#: later vouch for this copy holding it.
WRITING = 1


class EnumerateWhat(IntEnum):
    DIRTY = 1  # pages whose sync mask is not full, or quarantined
    PRESENT = 2  # pages holding data or zeros (not absent, not tombstoned)


# --- field types ---------------------------------------------------------------------

Check = Callable[[Any], Any]


def _show(v: Any) -> str:
    """A short description of a bad value; never the repr of a (possibly deep) container."""
    if isinstance(v, list | tuple | dict):
        return f"a {type(v).__name__} of {len(v)} items"
    return f"{v!r:.40}"


def _uint(bits: int) -> Check:
    hi = 1 << bits

    def check(v: Any) -> Any:
        if type(v) is not int and isinstance(v, int) and not isinstance(v, bool):
            v = int(v)  # an IntEnum member (PageState, EnumerateWhat ...) travels as its int
        if type(v) is not int or not 0 <= v < hi:
            raise ProtocolError(f"expected u{bits}, got {_show(v)}")
        return v

    return check


def _bool(v: Any) -> Any:
    if type(v) is not bool:
        raise ProtocolError(f"expected bool, got {_show(v)}")
    return v


def _bytes_exact(n: int) -> Check:
    def check(v: Any) -> Any:
        if type(v) is not bytes or len(v) != n:
            raise ProtocolError(f"expected {n} bytes, got {_show(v)}")
        return v

    return check


def _text(max_len: int) -> Check:
    def check(v: Any) -> Any:
        if type(v) is not str or len(v) > max_len:
            raise ProtocolError(f"expected text of at most {max_len} chars, got {_show(v)}")
        return v

    return check


def _list(item: Check, max_len: int) -> Check:
    def check(v: Any) -> Any:
        if type(v) not in (list, tuple) or len(v) > max_len:
            raise ProtocolError(f"expected a list of at most {max_len} items")
        return tuple(item(x) for x in v)

    return check


def _record(*items: Check) -> Check:
    def check(v: Any) -> Any:
        if type(v) not in (list, tuple) or len(v) != len(items):
            raise ProtocolError(f"expected a record of {len(items)} fields")
        return tuple(c(x) for c, x in zip(items, v, strict=True))

    return check


def _page_size(v: Any) -> Any:
    _U32(v)
    if v < MIN_PAGE_SIZE or v > MAX_PAGE_SIZE or v & (v - 1):
        raise ProtocolError(f"page size {v} is not a power of two in 64 KiB..16 MiB")
    return v


_U8, _U32, _U64 = _uint(8), _uint(32), _uint(64)


def _f(check: Check, fast: str, default: Any = dataclasses.MISSING) -> Any:
    """A field validated by ``check``; ``fast`` is an expression over ``v`` that is true
    when the value is valid as it is (the compiled fast path, see ``_compile``)."""
    return field(default=default, metadata={"check": check, "fast": fast})


def _fast_uint(bits: int) -> str:
    return f"v.__class__ is int and 0 <= v < {1 << bits}"


def w_u8() -> Any:
    return _f(_U8, _fast_uint(8))


def w_u32() -> Any:
    return _f(_U32, _fast_uint(32))


def w_u64(default: Any = dataclasses.MISSING) -> Any:
    return _f(_U64, _fast_uint(64), default)


def w_flag(default: Any = dataclasses.MISSING) -> Any:
    return _f(_bool, "v.__class__ is bool", default)


def w_page_size() -> Any:
    return _f(
        _page_size,
        f"v.__class__ is int and {MIN_PAGE_SIZE} <= v <= {MAX_PAGE_SIZE} and not v & (v - 1)",
    )


def w_text(max_len: int = 64, default: Any = dataclasses.MISSING) -> Any:
    return _f(_text(max_len), f"v.__class__ is str and len(v) <= {max_len}", default)


def w_nonce() -> Any:
    return _f(_bytes_exact(NONCE_SIZE), f"v.__class__ is bytes and len(v) == {NONCE_SIZE}")


def w_u64_list(max_len: int = MAX_LIST) -> Any:
    return _f(_list(_U64, max_len), "v == ()", ())


def w_records(*items: Check, max_len: int) -> Any:
    return _f(_list(_record(*items), max_len), "v == ()", ())


# --- the message base ----------------------------------------------------------------


class Message:
    """Base of all messages: field validation and msgpack header encoding."""

    __slots__ = ()
    OP: ClassVar[Op]
    _CHECKS: ClassVar[tuple[tuple[str, Check], ...]] = ()
    _from_values: ClassVar[Callable[[tuple[Any, ...]], Any]]

    def __post_init__(self) -> None:  # replaced per class by _compile
        for name, check in self._CHECKS:
            value = getattr(self, name)
            checked = check(value)
            if checked is not value:
                object.__setattr__(self, name, checked)
        self._validate()

    def _validate(self) -> None:
        """Cross-field checks; subclasses override."""

    def check_payload(self, size: int) -> None:
        """Raise ProtocolError unless a payload of ``size`` bytes fits this message."""
        if size:
            raise ProtocolError(f"{type(self).__name__} carries no payload, got {size} bytes")

    def fields(self) -> list[Any]:
        return [getattr(self, name) for name, _ in self._CHECKS]

    def encode(self) -> bytes:  # replaced per class by _compile
        header: bytes = msgpack.packb(self.fields(), use_bin_type=True)
        return header


M = TypeVar("M", bound=Message)

REQUESTS: dict[int, type[Message]] = {}
RESPONSES: dict[int, type[Message]] = {}


def _register(op: Op, table: dict[int, type[Message]]) -> Callable[[type[M]], type[M]]:
    def wrap(cls: type[M]) -> type[M]:
        cls.OP = op
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        cls._CHECKS = tuple((f.name, f.metadata["check"]) for f in fields)
        post_init, from_values, encode = _compile(cls, fields)
        cls.__post_init__ = post_init  # type: ignore[method-assign,assignment]
        cls.encode = encode  # type: ignore[method-assign,assignment]
        cls._from_values = staticmethod(from_values)
        table[op] = cls
        return cls

    return wrap


def _compile(
    cls: type[Message], fields: tuple[dataclasses.Field[Any], ...]
) -> tuple[Callable[[Any], None], Callable[[tuple[Any, ...]], Any], Callable[[Any], bytes]]:
    """Two functions with every field's check inlined: a ``__post_init__`` for messages
    built in code, and ``_from_values`` that builds one straight from a decoded header
    (the hot path of decoding: no ``__init__`` storing fields only to read them back).
    Values valid as they are cost one expression; others go through their full check,
    which converts (an IntEnum to its int, a list to a tuple) or raises ProtocolError."""
    namespace: dict[str, Any] = {"_set": object.__setattr__, "_new": object.__new__, "cls": cls}
    post = ["def __post_init__(self):"]
    build = ["def _from_values(values):", "    self = _new(cls)"]
    for i, f in enumerate(fields):
        namespace[f"_check_{f.name}"] = f.metadata["check"]
        fast = f.metadata["fast"]
        post += [
            f"    v = self.{f.name}",
            f"    if not ({fast}):",
            f"        _set(self, {f.name!r}, _check_{f.name}(v))",
        ]
        build += [
            f"    v = values[{i}]",
            f"    _set(self, {f.name!r}, v if {fast} else _check_{f.name}(v))",
        ]
    post.append("    self._validate()")
    build += ["    self._validate()", "    return self"]
    values = "".join(f"self.{f.name}, " for f in fields)
    encode = ["def encode(self):", f"    return _pack(({values}))"]
    namespace["_pack"] = msgpack.packb  # a shared Packer would not be thread-safe
    exec("\n".join(post + build + encode), namespace)  # built from our own field table
    post_init: Callable[[Any], None] = namespace["__post_init__"]
    post_init.__qualname__ = f"{cls.__name__}.__post_init__"
    namespace["encode"].__qualname__ = f"{cls.__name__}.encode"
    return post_init, namespace["_from_values"], namespace["encode"]


def request(op: Op) -> Callable[[type[M]], type[M]]:
    return _register(op, REQUESTS)


def response(op: Op) -> Callable[[type[M]], type[M]]:
    return _register(op, RESPONSES)


def _unpack(header: bytes) -> tuple[Any, ...]:
    try:
        values = msgpack.unpackb(header, use_list=False, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise ProtocolError(f"undecodable header: {exc.__class__.__name__}") from None
    if type(values) is not tuple:
        raise ProtocolError("header is not a msgpack array")
    return values


def _build(cls: type[Message], values: tuple[Any, ...]) -> Message:
    if len(values) != len(cls._CHECKS):
        raise ProtocolError(
            f"{cls.__name__} has {len(cls._CHECKS)} fields, header has {len(values)}"
        )
    try:
        msg: Message = cls._from_values(values)
        return msg
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"bad {cls.__name__}: {exc}") from None


def decode_request(op: int, header: bytes, payload_size: int = 0) -> Message:
    """The request of ``op`` in ``header``; raises ProtocolError on anything invalid."""
    cls = REQUESTS.get(op)
    if cls is None:
        raise ProtocolError(f"unknown operation {op}")
    msg = _build(cls, _unpack(header))
    msg.check_payload(payload_size)
    return msg


def decode_response(op: int, header: bytes) -> Message:
    cls = RESPONSES.get(op)
    if cls is None:
        raise ProtocolError(f"unknown operation {op}")
    return _build(cls, _unpack(header))


def encode_error(err: LaminaError) -> bytes:
    """Header of an error response: ``[message, detail]``."""
    header: bytes = msgpack.packb([err.message[:MAX_TEXT], err.detail], use_bin_type=True)
    return header


def decode_error(status: int, header: bytes) -> LaminaError:
    values = _unpack(header)
    if len(values) != 2:
        raise ProtocolError("error header must be [message, detail]")
    message, detail = values
    _text(MAX_TEXT)(message)
    if detail is not None:
        _U64(detail)
    if status == ErrorCode.OK:
        raise ProtocolError("error response with status 0")
    return error_from_code(status, message, detail)


# --- volume data addressing shared by the data requests -----------------------------


class DataRequest(Message):
    """A request about one volume at one epoch (checked by the epoch comparator)."""

    __slots__ = ()
    volume_id: int
    epoch: int


def _check_page(page: int, page_size_: int) -> None:
    if (page + 1) * page_size_ > MAX_LAYER_BYTES:
        raise ProtocolError(
            f"page {page} of {page_size_} bytes lies beyond the {MAX_LAYER_BYTES >> 40} TiB "
            "a layer can address"
        )


def _check_range(page_size_: int, offset: int, length: int) -> None:
    if length < 1 or offset + length > page_size_:
        raise ProtocolError(
            f"range offset={offset} length={length} outside page of {page_size_} bytes"
        )


# --- handshake -------------------------------------------------------------------------


@request(Op.HELLO)
@dataclass(frozen=True, slots=True)
class HelloRequest(Message):
    """``client`` and ``generation``: a client that reconnects names itself and numbers
    its connections; once a newer one has authenticated, the server drops the older
    ones and whatever they still carry ("" : no such claim)."""

    min_version: int = w_u8()
    max_version: int = w_u8()
    nonce: bytes = w_nonce()
    peer: str = w_text()
    client: str = w_text(default="")
    generation: int = w_u64(0)


@response(Op.HELLO)
@dataclass(frozen=True, slots=True)
class HelloResponse(Message):
    version: int = w_u8()
    nonce: bytes = w_nonce()
    proof: bytes = w_nonce()
    server_id: str = w_text()


@request(Op.AUTH)
@dataclass(frozen=True, slots=True)
class AuthRequest(Message):
    proof: bytes = w_nonce()


@response(Op.AUTH)
@dataclass(frozen=True, slots=True)
class AuthResponse(Message):
    server_id: str = w_text()
    epoch: int = w_u64()


# --- operations ------------------------------------------------------------------------


@request(Op.PING)
@dataclass(frozen=True, slots=True)
class PingRequest(Message):
    pass


@response(Op.PING)
@dataclass(frozen=True, slots=True)
class PingResponse(Message):
    server_id: str = w_text()
    epoch: int = w_u64()
    lease_valid: bool = w_flag()
    capacity: int = w_u64()
    used: int = w_u64()
    pages: int = w_u64()


@request(Op.READ)
@dataclass(frozen=True, slots=True)
class ReadRequest(DataRequest):
    volume_id: int = w_u64()
    epoch: int = w_u64()
    layer_id: int = w_u64()
    page: int = w_u64()
    page_size: int = w_page_size()
    offset: int = w_u32()
    length: int = w_u32()
    restore: tuple[int, ...] = w_u64_list()

    def _validate(self) -> None:
        _check_page(self.page, self.page_size)
        _check_range(self.page_size, self.offset, self.length)


@response(Op.READ)
@dataclass(frozen=True, slots=True)
class ReadResponse(Message):
    """Payload: the bytes when ``state`` is PRESENT, else empty."""

    state: int = w_u8()
    generation: int = w_u64()
    mask: int = w_u32()


@request(Op.WRITE)
@dataclass(frozen=True, slots=True)
class WriteRequest(DataRequest):
    """Payload: the bytes to write at ``offset``.  ``conditional``: apply only if the
    page copy is at generation ``if_generation`` (0: absent) and no other write of it is
    in progress, else CONFLICT (a resynchronisation must not overwrite a newer write)."""

    volume_id: int = w_u64()
    epoch: int = w_u64()
    layer_id: int = w_u64()
    page: int = w_u64()
    page_size: int = w_page_size()
    offset: int = w_u32()
    clear_mask: int = w_u32()
    restore_mask: int = w_u32()
    fua: bool = w_flag()
    restore: tuple[int, ...] = w_u64_list()
    conditional: bool = w_flag(False)
    if_generation: int = w_u64(0)

    def check_payload(self, size: int) -> None:
        _check_range(self.page_size, self.offset, size)

    def _validate(self) -> None:
        _check_page(self.page, self.page_size)


@response(Op.WRITE)
@dataclass(frozen=True, slots=True)
class WriteResponse(Message):
    token: int = w_u64()
    generation: int = w_u64()


@request(Op.RESTORE)
@dataclass(frozen=True, slots=True)
class RestoreRequest(Message):
    tokens: tuple[int, ...] = w_u64_list()


@response(Op.RESTORE)
@dataclass(frozen=True, slots=True)
class RestoreResponse(Message):
    restored: int = w_u32()


@request(Op.CREATE_IF_ABSENT)
@dataclass(frozen=True, slots=True)
class CreateRequest(DataRequest):
    """Payload: the full page, or nothing when ``zero`` (a page that reads as zeros)."""

    volume_id: int = w_u64()
    epoch: int = w_u64()
    layer_id: int = w_u64()
    page: int = w_u64()
    page_size: int = w_page_size()
    mask: int = w_u32()
    zero: bool = w_flag()
    restore: tuple[int, ...] = w_u64_list()

    def check_payload(self, size: int) -> None:
        expected = 0 if self.zero else self.page_size
        if size != expected:
            raise ProtocolError(f"CREATE_IF_ABSENT needs {expected} payload bytes, got {size}")

    def _validate(self) -> None:
        _check_page(self.page, self.page_size)


@response(Op.CREATE_IF_ABSENT)
@dataclass(frozen=True, slots=True)
class CreateResponse(Message):
    created: bool = w_flag()
    generation: int = w_u64()


@request(Op.STATUS)
@dataclass(frozen=True, slots=True)
class StatusRequest(DataRequest):
    volume_id: int = w_u64()
    epoch: int = w_u64()
    layer_id: int = w_u64()
    pages: tuple[int, ...] = w_u64_list()


StatusEntry = tuple[int, int, int, int, int]  # page, state, mask, generation, flags


@response(Op.STATUS)
@dataclass(frozen=True, slots=True)
class StatusResponse(Message):
    """``flags``: :data:`WRITING` or 0."""

    entries: tuple[StatusEntry, ...] = w_records(_U64, _U8, _U32, _U64, _U8, max_len=MAX_LIST)


@request(Op.ENUMERATE)
@dataclass(frozen=True, slots=True)
class EnumerateRequest(DataRequest):
    volume_id: int = w_u64()
    epoch: int = w_u64()
    layer_id: int = w_u64()
    what: int = w_u8()
    start: int = w_u64()
    limit: int = w_u32()

    def _validate(self) -> None:
        if self.what not in EnumerateWhat.__members__.values():
            raise ProtocolError(f"unknown enumerate kind {self.what}")
        if not 1 <= self.limit <= MAX_ENUMERATE:
            raise ProtocolError(f"enumerate limit {self.limit} not in 1..{MAX_ENUMERATE}")


@response(Op.ENUMERATE)
@dataclass(frozen=True, slots=True)
class EnumerateResponse(Message):
    next_start: int = w_u64()
    done: bool = w_flag()
    pages: tuple[int, ...] = w_u64_list(MAX_ENUMERATE)


@request(Op.MARK_CLEAN)
@dataclass(frozen=True, slots=True)
class MarkCleanRequest(DataRequest):
    volume_id: int = w_u64()
    epoch: int = w_u64()
    layer_id: int = w_u64()
    page: int = w_u64()
    generation: int = w_u64()
    mask: int = w_u32()


@response(Op.MARK_CLEAN)
@dataclass(frozen=True, slots=True)
class MarkCleanResponse(Message):
    generation: int = w_u64()


@request(Op.TOMBSTONE)
@dataclass(frozen=True, slots=True)
class TombstoneRequest(DataRequest):
    volume_id: int = w_u64()
    epoch: int = w_u64()
    layer_id: int = w_u64()
    page: int = w_u64()
    page_size: int = w_page_size()

    def _validate(self) -> None:
        _check_page(self.page, self.page_size)


@response(Op.TOMBSTONE)
@dataclass(frozen=True, slots=True)
class TombstoneResponse(Message):
    generation: int = w_u64()


@request(Op.DELETE_LAYER)
@dataclass(frozen=True, slots=True)
class DeleteLayerRequest(DataRequest):
    volume_id: int = w_u64()
    epoch: int = w_u64()
    layer_id: int = w_u64()


@response(Op.DELETE_LAYER)
@dataclass(frozen=True, slots=True)
class DeleteLayerResponse(Message):
    pages_removed: int = w_u64()


Fence = tuple[int, int]  # volume id, fence epoch


@request(Op.SET_EPOCH)
@dataclass(frozen=True, slots=True)
class SetEpochRequest(Message):
    epoch: int = w_u64()
    fences: tuple[Fence, ...] = w_records(_U64, _U64, max_len=MAX_FENCES)
    #: (layer id, lineage token) of the layers the map places on the server
    lineages: tuple[tuple[int, int], ...] = w_records(_U64, _U64, max_len=MAX_LINEAGES)

    def _validate(self) -> None:
        for volume_id, fence in self.fences:
            if fence > self.epoch:
                raise ProtocolError(
                    f"fence epoch {fence} of volume {volume_id} above epoch {self.epoch}"
                )


@response(Op.SET_EPOCH)
@dataclass(frozen=True, slots=True)
class SetEpochResponse(Message):
    epoch: int = w_u64()


@request(Op.CHECKSUM)
@dataclass(frozen=True, slots=True)
class ChecksumRequest(DataRequest):
    """The crc32c of a whole page copy, computed where it is stored: its data is read and
    verified against its block checksums first (a mismatch: CORRUPT, the page is then
    quarantined), and only the digest crosses the network (scrub: checksums first)."""

    volume_id: int = w_u64()
    epoch: int = w_u64()
    layer_id: int = w_u64()
    page: int = w_u64()
    page_size: int = w_page_size()

    def _validate(self) -> None:
        _check_page(self.page, self.page_size)


@response(Op.CHECKSUM)
@dataclass(frozen=True, slots=True)
class ChecksumResponse(Message):
    """``crc`` is the crc32c of the page's bytes (a ZERO page: of page_size zero bytes;
    an ABSENT or TOMBSTONE page: 0); ``flags``: :data:`WRITING` or 0."""

    state: int = w_u8()
    generation: int = w_u64()
    mask: int = w_u32()
    crc: int = w_u32()
    flags: int = w_u8()


@request(Op.FLUSH)
@dataclass(frozen=True, slots=True)
class FlushRequest(DataRequest):
    volume_id: int = w_u64()
    epoch: int = w_u64()


@response(Op.FLUSH)
@dataclass(frozen=True, slots=True)
class FlushResponse(Message):
    pass


@request(Op.LEASE)
@dataclass(frozen=True, slots=True)
class LeaseRequest(Message):
    """A storage server asks the manager leader for its lease; ``epoch`` is the latest
    epoch it knows (the leader reads it as the acknowledgement of that epoch)."""

    server_id: str = w_text()
    epoch: int = w_u64()
    incarnation: int = w_u64()  # bumped at every start: a change tells a restart


@response(Op.LEASE)
@dataclass(frozen=True, slots=True)
class LeaseResponse(Message):
    """The lease lasts ``duration_ms`` from the moment the server *sent* its request; the
    map's epoch and the fence epochs of the volumes with a layer on the server come along,
    so the server knows them before it serves anything."""

    duration_ms: int = w_u32()
    epoch: int = w_u64()
    fences: tuple[Fence, ...] = w_records(_U64, _U64, max_len=MAX_FENCES)
    #: (layer id, lineage token) of the layers the map places on the server
    lineages: tuple[tuple[int, int], ...] = w_records(_U64, _U64, max_len=MAX_LINEAGES)

    def _validate(self) -> None:
        for volume_id, fence in self.fences:
            if fence > self.epoch:
                raise ProtocolError(
                    f"fence epoch {fence} of volume {volume_id} above epoch {self.epoch}"
                )


def restore_tokens(msg: Message) -> Sequence[int]:
    """Tokens piggybacked on a data request [0043] (empty for other messages)."""
    return getattr(msg, "restore", ())

"""Typed wire messages: encoding, decoding and validation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lamina.errors import (
    AuthFailed,
    BadRequest,
    Conflict,
    Corrupt,
    Deleted,
    ErrorCode,
    FrameTooLarge,
    InternalError,
    LaminaError,
    NoLease,
    NoSpace,
    NotFound,
    ProtocolError,
    StaleEpoch,
    StorageIOError,
    Unavailable,
    UnsupportedVersion,
    error_from_code,
)
from lamina.wire import messages as m
from lamina.wire.framing import MAX_HEADER
from tests.strategies import (
    check_params,
    field_checks,
    messages_of,
    requests_with_payload_size,
    responses,
    u64,
)

ALL_CLASSES = [*m.REQUESTS.values(), *m.RESPONSES.values()]
CLASSES_WITH_FIELDS = [cls for cls in ALL_CLASSES if field_checks(cls)]


def pack(values: Any) -> bytes:
    header: bytes = msgpack.packb(values, use_bin_type=True)
    return header


def decode(cls: type[m.Message], header: bytes, payload_size: int = 0) -> m.Message:
    """Decode ``header`` the way a peer would for ``cls`` (as a request or a response)."""
    if m.REQUESTS.get(cls.OP) is cls:
        return m.decode_request(cls.OP, header, payload_size)
    return m.decode_response(cls.OP, header)


# --- value generators for validators ---------------------------------------------------


def minimal(check: m.Check) -> Any:
    """The smallest value a field validator accepts."""
    if check is m._bool:
        return False
    if check is m._page_size:
        return m.MIN_PAGE_SIZE
    factory, env = check_params(check)
    if factory == "_uint":
        return 0
    if factory == "_text":
        return ""
    if factory == "_bytes_exact":
        return bytes(env["n"])
    if factory == "_list":
        return ()
    if factory == "_record":
        return tuple(minimal(c) for c in env["items"])
    raise TypeError(f"unknown validator {check.__qualname__}")


_wrong_types: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.floats(allow_nan=False),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(0, 9), max_size=2),
)


def bad_values(check: m.Check) -> st.SearchStrategy[Any]:
    """Values a field validator must reject: wrong type, bool for int, out of range, too long."""
    if check is m._bool:
        return st.integers() | st.none() | st.text(max_size=3) | st.lists(st.booleans())
    if check is m._page_size:
        not_power = st.integers(m.MIN_PAGE_SIZE, m.MAX_PAGE_SIZE).filter(lambda v: v & (v - 1))
        small = st.sampled_from([0, 1, 512, 4096, m.MIN_PAGE_SIZE // 2, m.MIN_PAGE_SIZE - 1])
        big = st.sampled_from([m.MAX_PAGE_SIZE * 2, 2**31, 2**32, 2**40])
        return not_power | small | big | st.booleans() | st.integers(max_value=-1) | _wrong_types
    factory, env = check_params(check)
    if factory == "_uint":
        hi = 1 << env["bits"]
        return (
            st.integers(max_value=-1)
            | st.integers(min_value=hi, max_value=2**64 + 5)
            | st.booleans()
            | st.lists(st.integers(0, 3), max_size=2)
            | _wrong_types
        )
    if factory == "_text":
        n = env["max_len"]
        too_long = st.sampled_from(["x" * (n + 1), "\u00e9" * (n + 1), "\U0001f600" * (n + 5)])
        return too_long | st.binary(max_size=4) | st.integers() | st.none() | st.booleans()
    if factory == "_bytes_exact":
        n = env["n"]
        return (
            st.binary(max_size=n + 4).filter(lambda b: len(b) != n)
            | st.text(min_size=n, max_size=n)
            | st.integers()
            | st.none()
        )
    if factory == "_list":
        n, item = env["max_len"], env["item"]
        too_long = st.just([minimal(item)] * (n + 1))
        one_bad = bad_values(item).map(lambda v: [minimal(item), v])
        return too_long | one_bad | st.integers() | st.text(max_size=2) | st.none()
    if factory == "_record":
        items = env["items"]
        good = [minimal(c) for c in items]
        wrong_len = st.sampled_from([good[:-1], [*good, 0], []])
        one_bad = st.integers(0, len(items) - 1).flatmap(
            lambda i: bad_values(items[i]).map(lambda v: [*good[:i], v, *good[i + 1 :]])
        )
        return wrong_len | one_bad | st.integers() | st.none()
    raise TypeError(f"unknown validator {check.__qualname__}")


# --- tables ----------------------------------------------------------------------------


def test_every_operation_has_a_request_and_a_response() -> None:
    """Each Op has exactly one request class and one response class, tagged with that Op."""
    assert set(m.REQUESTS) == set(m.Op) == set(m.RESPONSES)
    for op in m.Op:
        assert op == m.REQUESTS[op].OP
        assert op == m.RESPONSES[op].OP


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_a_strategy(cls: type[m.Message]) -> None:
    """Every field of every message has a validator the strategies understand."""
    for _, check in field_checks(cls):
        minimal(check)
    assert [name for name, _ in cls._CHECKS] == [name for name, _ in field_checks(cls)]


# --- round trips -----------------------------------------------------------------------


@given(requests_with_payload_size())
def test_request_round_trip(case: tuple[m.Message, int]) -> None:
    """Every valid request decodes from its encoding to an equal message."""
    msg, payload_size = case
    got = m.decode_request(msg.OP, msg.encode(), payload_size)
    assert type(got) is type(msg)
    assert got == msg


@given(responses())
def test_response_round_trip(msg: m.Message) -> None:
    """Every valid response decodes from its encoding to an equal message."""
    got = m.decode_response(msg.OP, msg.encode())
    assert type(got) is type(msg)
    assert got == msg


@given(messages_of(m.ReadRequest))
def test_header_is_msgpack_array_of_fields(msg: m.Message) -> None:
    """The header is the msgpack array of the fields in declaration order."""
    expected = [list(v) if isinstance(v, tuple) else v for v in msg.fields()]
    assert msgpack.unpackb(msg.encode()) == expected


def test_lists_and_enums_are_normalised() -> None:
    """List fields are stored as tuples and IntEnum members as plain ints."""
    msg = m.StatusResponse([[1, m.PageState.PRESENT, 3, 4, m.WRITING]])  # type: ignore[arg-type]
    assert msg.entries == ((1, 1, 3, 4, 1),)
    assert type(msg.entries[0][1]) is int
    read = m.ReadResponse(m.PageState.ZERO, 1, m.FULL_MASK)
    assert type(read.state) is int
    assert m.decode_response(m.Op.READ, read.encode()) == read
    enum = m.EnumerateRequest(1, 2, 3, m.EnumerateWhat.DIRTY, 0, 10)
    assert type(enum.what) is int


# --- invalid fields --------------------------------------------------------------------


@given(st.data())
def test_invalid_field_value_raises_protocol_error(data: st.DataObject) -> None:
    """One field set to a wrong type, bool for int, out of range or too long is refused."""
    cls = data.draw(st.sampled_from(CLASSES_WITH_FIELDS), label="class")
    msg = data.draw(messages_of(cls), label="valid message")
    checks = field_checks(cls)
    index = data.draw(st.integers(0, len(checks) - 1), label="field")
    bad = data.draw(bad_values(checks[index][1]), label="bad value")
    values = msg.fields()
    values[index] = bad
    with pytest.raises(ProtocolError):
        cls(*values)
    try:
        header = pack(values)
    except OverflowError:
        return  # an integer msgpack cannot carry: refusing to build it is all there is
    with pytest.raises(ProtocolError):
        decode(cls, header)


@given(st.data())
def test_wrong_field_count_raises_protocol_error(data: st.DataObject) -> None:
    """A header with one field too many or too few is refused."""
    cls = data.draw(st.sampled_from(ALL_CLASSES), label="class")
    values = data.draw(messages_of(cls), label="valid message").fields()
    drop = bool(values) and data.draw(st.booleans(), label="drop a field")
    values = values[:-1] if drop else [*values, 0]
    with pytest.raises(ProtocolError, match="fields"):
        decode(cls, pack(values))


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "header",
    [b"", b"\xc1", b"\x93\x01", pack(7), pack({"a": 1}), pack("x"), pack(None)],
    ids=["empty", "reserved byte", "truncated", "int", "map", "str", "nil"],
)
def test_header_that_is_not_a_field_array_raises(cls: type[m.Message], header: bytes) -> None:
    """A header that is not a complete msgpack array is refused for every message."""
    with pytest.raises(ProtocolError):
        decode(cls, header)


@pytest.mark.parametrize("op", [0, 4, 9, 22, 255])
def test_unknown_operation_raises(op: int) -> None:
    """An operation code without a message class is refused."""
    with pytest.raises(ProtocolError, match="unknown operation"):
        m.decode_request(op, pack([]))
    with pytest.raises(ProtocolError, match="unknown operation"):
        m.decode_response(op, pack([]))


def test_deeply_nested_field_raises_protocol_error() -> None:
    """A field nested a thousand arrays deep is refused with ProtocolError, not RecursionError."""
    deep = b"\x91" * 1000 + b"\x01"
    with pytest.raises(ProtocolError):
        m.decode_error(ErrorCode.STALE, b"\x92" + deep + b"\xc0")
    with pytest.raises(ProtocolError):
        m.decode_response(m.Op.RESTORE, b"\x91" + deep)
    with pytest.raises(ProtocolError):
        m.decode_request(m.Op.RESTORE, b"\x91\x91" + deep)


@pytest.mark.parametrize("size", [m.MIN_PAGE_SIZE, 2**20, m.MAX_PAGE_SIZE])
def test_read_range_must_lie_inside_the_page(size: int) -> None:
    """A READ range is valid iff 1 <= length and offset + length <= page_size."""
    m.ReadRequest(1, 1, 1, 0, size, 0, size)
    m.ReadRequest(1, 1, 1, 0, size, size - 1, 1)
    for offset, length in ((0, 0), (0, size + 1), (1, size), (size, 1), (size - 1, 2)):
        with pytest.raises(ProtocolError, match="outside page"):
            m.ReadRequest(1, 1, 1, 0, size, offset, length)
        with pytest.raises(ProtocolError, match="outside page"):
            m.decode_request(m.Op.READ, pack([1, 1, 1, 0, size, offset, length, []]))


@given(messages_of(m.WriteRequest))
def test_write_payload_must_fit_the_page(msg: m.Message) -> None:
    """A WRITE needs a non-empty payload ending inside the page."""
    assert isinstance(msg, m.WriteRequest)
    room = msg.page_size - msg.offset
    m.decode_request(m.Op.WRITE, msg.encode(), room)
    for size in (0, room + 1):
        with pytest.raises(ProtocolError):
            m.decode_request(m.Op.WRITE, msg.encode(), size)


@given(messages_of(m.CreateRequest))
def test_create_payload_is_a_full_page_or_nothing_when_zero(msg: m.Message) -> None:
    """CREATE_IF_ABSENT needs exactly page_size payload bytes, or none when ``zero``."""
    assert isinstance(msg, m.CreateRequest)
    expected = 0 if msg.zero else msg.page_size
    m.decode_request(m.Op.CREATE_IF_ABSENT, msg.encode(), expected)
    for size in {0, 1, expected - 1, expected + 1, msg.page_size} - {expected, -1}:
        with pytest.raises(ProtocolError, match="payload"):
            m.decode_request(m.Op.CREATE_IF_ABSENT, msg.encode(), size)


@given(st.data())
def test_messages_without_payload_refuse_one(data: st.DataObject) -> None:
    """Requests other than WRITE and CREATE_IF_ABSENT refuse any payload bytes."""
    ops = [op for op in m.REQUESTS if op not in (m.Op.WRITE, m.Op.CREATE_IF_ABSENT)]
    msg = data.draw(messages_of(m.REQUESTS[data.draw(st.sampled_from(ops))]))
    size = data.draw(st.integers(1, m.MAX_PAGE_SIZE))
    with pytest.raises(ProtocolError, match="carries no payload"):
        m.decode_request(msg.OP, msg.encode(), size)


def test_enumerate_kind_and_limit_are_checked() -> None:
    """ENUMERATE accepts only the known kinds and a limit in 1..MAX_ENUMERATE."""
    for kind in m.EnumerateWhat:
        m.EnumerateRequest(1, 1, 1, kind, 0, 1)
    m.EnumerateRequest(1, 1, 1, m.EnumerateWhat.PRESENT, 0, m.MAX_ENUMERATE)
    for what, limit in ((0, 10), (3, 10), (255, 10), (1, 0), (2, m.MAX_ENUMERATE + 1)):
        with pytest.raises(ProtocolError):
            m.decode_request(m.Op.ENUMERATE, pack([1, 1, 1, what, 0, limit]))


_epoch_and_higher = st.integers(0, 2**64 - 2).flatmap(
    lambda e: st.tuples(st.just(e), st.integers(e + 1, 2**64 - 1))
)


@given(_epoch_and_higher, u64)
def test_set_epoch_fences_may_not_exceed_the_epoch(epochs: tuple[int, int], volume: int) -> None:
    """SET_EPOCH accepts fences up to its epoch and refuses any fence above it."""
    epoch, fence = epochs
    assert m.SetEpochRequest(epoch, ((volume, epoch), (volume, 0))).fences[0] == (volume, epoch)
    with pytest.raises(ProtocolError, match="above epoch"):
        m.decode_request(m.Op.SET_EPOCH, pack([epoch, [[volume, 0], [volume, fence]], []]))


@pytest.mark.parametrize(
    ("cls", "make"),
    [
        (m.RestoreRequest, lambda n: [[0] * n]),
        (m.StatusRequest, lambda n: [1, 1, 1, [0] * n]),
        (m.StatusResponse, lambda n: [[[0, 0, 0, 0, 0]] * n]),
        (m.EnumerateResponse, lambda n: [0, True, [0] * n]),
        (m.SetEpochRequest, lambda n: [5, [[0, 5]] * n, []]),
        (m.ReadRequest, lambda n: [1, 1, 1, 0, m.MIN_PAGE_SIZE, 0, 1, [0] * n]),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_list_caps_are_exact(cls: type[m.Message], make: Any) -> None:
    """A list field accepts exactly its cap of items and refuses one more."""
    cap = {
        m.EnumerateResponse: m.MAX_ENUMERATE,
        m.SetEpochRequest: m.MAX_FENCES,
    }.get(cls, m.MAX_LIST)
    decode(cls, pack(make(cap)))
    with pytest.raises(ProtocolError, match="at most"):
        decode(cls, pack(make(cap + 1)))


def test_headers_at_their_caps_fit_in_a_frame() -> None:
    """Every capped list, filled with the largest values, still fits in MAX_HEADER."""
    top = 2**64 - 1
    biggest = [
        m.EnumerateResponse(top, False, (top,) * m.MAX_ENUMERATE),
        m.SetEpochRequest(top, ((top, top),) * m.MAX_FENCES, ((top, top),) * m.MAX_LINEAGES),
        m.LeaseResponse(
            2**32 - 1, top, ((top, top),) * m.MAX_FENCES, ((top, top),) * m.MAX_LINEAGES
        ),
        m.StatusResponse(((top, 255, 2**32 - 1, top, 255),) * m.MAX_LIST),
        m.StatusRequest(top, top, top, (top,) * m.MAX_LIST),
        m.WriteRequest(top, top, top, 2**20, m.MIN_PAGE_SIZE, 0, 0, 0, True, (top,) * m.MAX_LIST),
    ]
    for msg in biggest:
        assert len(msg.encode()) <= MAX_HEADER, type(msg).__name__


@given(st.sampled_from([m.MIN_PAGE_SIZE, 1 << 20, m.MAX_PAGE_SIZE]), st.integers(0, 2**64 - 1))
def test_page_index_must_lie_within_a_layer(size: int, page: int) -> None:
    """Requests naming a page past the 16 TiB a layer addresses are refused, others pass."""
    fits = (page + 1) * size <= m.MAX_LAYER_BYTES
    builders: list[Callable[[], m.Message]] = [
        lambda: m.ReadRequest(1, 1, 1, page, size, 0, 1),
        lambda: m.WriteRequest(1, 1, 1, page, size, 0, 0, 0, False),
        lambda: m.CreateRequest(1, 1, 1, page, size, 0, True),
        lambda: m.TombstoneRequest(1, 1, 1, page, size),
    ]
    for build in builders:
        if fits:
            build()
        else:
            with pytest.raises(ProtocolError, match="beyond"):
                build()


def test_restore_tokens_of_data_requests() -> None:
    """restore_tokens returns a data request's piggybacked tokens, and () for other messages."""
    read = m.ReadRequest(1, 1, 1, 0, m.MIN_PAGE_SIZE, 0, 1, (7, 8))
    assert tuple(m.restore_tokens(read)) == (7, 8)
    assert tuple(m.restore_tokens(m.PingRequest())) == ()


# --- error headers ---------------------------------------------------------------------

ERROR_CLASSES: dict[ErrorCode, type[LaminaError]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.STALE: StaleEpoch,
    ErrorCode.NO_LEASE: NoLease,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.DELETED: Deleted,
    ErrorCode.CORRUPT: Corrupt,
    ErrorCode.NO_SPACE: NoSpace,
    ErrorCode.CONFLICT: Conflict,
    ErrorCode.AUTH_FAILED: AuthFailed,
    ErrorCode.UNSUPPORTED_VERSION: UnsupportedVersion,
    ErrorCode.TOO_LARGE: FrameTooLarge,
    ErrorCode.IO_ERROR: StorageIOError,
    ErrorCode.INTERNAL: InternalError,
    ErrorCode.UNAVAILABLE: Unavailable,
}


def test_every_error_code_has_a_class() -> None:
    """Every error code except OK maps to an exception class carrying that code."""
    assert set(ERROR_CLASSES) == set(ErrorCode) - {ErrorCode.OK}
    for code, cls in ERROR_CLASSES.items():
        assert cls.code == code


@pytest.mark.parametrize("code", list(ERROR_CLASSES), ids=lambda c: c.name)
@given(message=st.text(max_size=300), detail=st.none() | u64)
def test_error_round_trip(code: ErrorCode, message: str, detail: int | None) -> None:
    """An error header decodes to the code's exception class with its message and detail."""
    err = error_from_code(code, message, detail)
    got = m.decode_error(code, m.encode_error(err))
    assert type(got) is ERROR_CLASSES[code]
    assert got.code == code
    assert got.message == message
    assert got.detail == detail
    assert str(got) == f"{code.name}: {message}"


def test_stale_and_conflict_details() -> None:
    """STALE carries the current epoch and CONFLICT the current generation as detail."""
    stale = m.decode_error(ErrorCode.STALE, m.encode_error(StaleEpoch("old epoch", 42)))
    assert isinstance(stale, StaleEpoch)
    assert stale.current_epoch == 42
    conflict = m.decode_error(ErrorCode.CONFLICT, m.encode_error(Conflict("lost", 9)))
    assert isinstance(conflict, Conflict)
    assert conflict.detail == 9


def test_long_error_message_is_truncated() -> None:
    """An error message longer than MAX_TEXT is truncated to MAX_TEXT on encoding."""
    got = m.decode_error(ErrorCode.INTERNAL, m.encode_error(InternalError("y" * 10_000)))
    assert got.message == "y" * m.MAX_TEXT


@pytest.mark.parametrize("status", [14 + 1, 100, 255])
def test_unknown_error_status_becomes_internal_error(status: int) -> None:
    """An unknown error status decodes to InternalError naming the code."""
    got = m.decode_error(status, pack(["boom", 3]))
    assert type(got) is InternalError
    assert f"unknown error code {status}" in got.message
    assert got.detail == 3


@pytest.mark.parametrize(
    ("status", "header"),
    [
        (0, pack(["not an error", None])),
        (2, pack(["only one field"])),
        (2, pack(["three", None, 1])),
        (2, pack([b"bytes", None])),
        (2, pack([None, None])),
        (2, pack(["x" * (m.MAX_TEXT + 1), None])),
        (2, pack(["negative", -1])),
        (2, pack(["bool", True])),
        (2, pack(["text", "1"])),
        (2, pack({"message": "x"})),
        (2, b"\xc1"),
    ],
)
def test_malformed_error_header_raises(status: int, header: bytes) -> None:
    """A malformed error header, or an error with status 0, raises ProtocolError."""
    with pytest.raises(ProtocolError):
        m.decode_error(status, header)

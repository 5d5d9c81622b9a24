"""Hypothesis strategies for the wire protocol: valid messages, errors and frames.

Message strategies are derived from each message class's dataclass fields: every field
carries its validator in ``metadata["check"]`` and :func:`strategy_for_check` turns a
validator into a strategy of values it accepts.  Rules that tie fields together (a read
range inside its page, fences not above the epoch, ...) are explicit overrides below.
Lists are kept much shorter than the protocol caps so examples stay small; tests of the
caps themselves build their boundary values directly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from lamina.errors import ErrorCode, LaminaError, error_from_code
from lamina.wire import messages as m
from lamina.wire.framing import MAX_REQUEST_ID, Frame, Kind, encode_frame

#: list fields hold at most this many items in generated messages
LIST_SIZE = 8
#: largest payload generated for a WRITE (the protocol allows up to the page size)
WRITE_PAYLOAD = 512

PAGE_SIZES = tuple(1 << shift for shift in range(16, 25))  # 64 KiB .. 16 MiB

u8 = st.integers(0, 2**8 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
request_ids = st.integers(0, MAX_REQUEST_ID)
page_sizes = st.sampled_from(PAGE_SIZES)
page_states = st.sampled_from(m.PageState).map(int)
enumerate_whats = st.sampled_from(m.EnumerateWhat).map(int)

MessageStrategy = st.SearchStrategy[m.Message]


def check_params(check: m.Check) -> tuple[str, dict[str, Any]]:
    """The factory a field validator came from and the values it was built with."""
    code = check.__code__
    cells = check.__closure__ or ()
    env = {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells, strict=True)}
    return check.__qualname__.split(".", 1)[0], env


def strategy_for_check(check: m.Check) -> st.SearchStrategy[Any]:
    """Values that the field validator ``check`` accepts."""
    if check is m._bool:
        return st.booleans()
    if check is m._page_size:
        return page_sizes
    factory, env = check_params(check)
    if factory == "_uint":
        return st.integers(0, (1 << env["bits"]) - 1)
    if factory == "_text":
        return st.text(max_size=env["max_len"])
    if factory == "_bytes_exact":
        return st.binary(min_size=env["n"], max_size=env["n"])
    if factory == "_list":
        item = strategy_for_check(env["item"])
        return st.lists(item, max_size=min(env["max_len"], LIST_SIZE)).map(tuple)
    if factory == "_record":
        return st.tuples(*(strategy_for_check(c) for c in env["items"]))
    raise TypeError(f"no strategy for field validator {check.__qualname__}")


def field_checks(cls: type[m.Message]) -> list[tuple[str, m.Check]]:
    """(name, validator) of every field of a message class, in wire order."""
    return [(f.name, f.metadata["check"]) for f in dataclasses.fields(cls)]  # type: ignore[arg-type]


_GENERIC: dict[type[m.Message], dict[str, st.SearchStrategy[Any]]] = {}


def _generic_fields(cls: type[m.Message]) -> dict[str, st.SearchStrategy[Any]]:
    if cls not in _GENERIC:
        _GENERIC[cls] = {name: strategy_for_check(check) for name, check in field_checks(cls)}
    return _GENERIC[cls]


@st.composite
def fields_of(draw: st.DrawFn, /, cls: type[m.Message], **fixed: Any) -> m.Message:
    """A message of ``cls`` with the ``fixed`` field values and every other field generic."""
    generic = _generic_fields(cls)
    if unknown := set(fixed) - set(generic):
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    return cls(**{name: fixed[name] if name in fixed else draw(s) for name, s in generic.items()})


# --- cross-field rules -----------------------------------------------------------------


@st.composite
def page_ranges(draw: st.DrawFn, max_length: int | None = None) -> tuple[int, int, int]:
    """(page_size, offset, length) with 1 <= length and offset + length <= page_size."""
    size = draw(page_sizes)
    top = size if max_length is None else min(size, max_length)
    length = draw(st.integers(1, top))
    offset = draw(st.integers(0, size - length))
    return size, offset, length


def pages_of(size: int) -> st.SearchStrategy[int]:
    """Page indexes a layer with pages of ``size`` bytes can address."""
    return st.integers(0, m.MAX_LAYER_BYTES // size - 1)


@st.composite
def _read_requests(draw: st.DrawFn) -> m.Message:
    size, offset, length = draw(page_ranges())
    page = draw(pages_of(size))
    return draw(fields_of(m.ReadRequest, page=page, page_size=size, offset=offset, length=length))


@st.composite
def _write_requests(draw: st.DrawFn) -> m.Message:
    # the payload is what must fit (see payload_size_for): only the offset is tied here
    size = draw(page_sizes)
    offset = draw(st.integers(0, size - 1))
    page = draw(pages_of(size))
    return draw(fields_of(m.WriteRequest, page=page, page_size=size, offset=offset))


@st.composite
def _paged_requests(draw: st.DrawFn, cls: type[m.Message]) -> m.Message:
    size = draw(page_sizes)
    return draw(fields_of(cls, page=draw(pages_of(size)), page_size=size))


@st.composite
def _enumerate_requests(draw: st.DrawFn) -> m.Message:
    what = draw(enumerate_whats)
    limit = draw(st.integers(1, m.MAX_ENUMERATE))
    return draw(fields_of(m.EnumerateRequest, what=what, limit=limit))


@st.composite
def _set_epoch_requests(draw: st.DrawFn) -> m.Message:
    epoch = draw(u64)
    fences = draw(st.lists(st.tuples(u64, st.integers(0, epoch)), max_size=LIST_SIZE))
    return m.SetEpochRequest(epoch, tuple(fences))


@st.composite
def _lease_responses(draw: st.DrawFn) -> m.Message:
    epoch = draw(u64)
    fences = draw(st.lists(st.tuples(u64, st.integers(0, epoch)), max_size=LIST_SIZE))
    return m.LeaseResponse(draw(u32), epoch, tuple(fences))


_status_entries = st.lists(st.tuples(u64, page_states, u32, u64, u8), max_size=LIST_SIZE)

_OVERRIDES: dict[type[m.Message], Callable[[], MessageStrategy]] = {
    m.ReadRequest: _read_requests,
    m.WriteRequest: _write_requests,
    m.CreateRequest: lambda: _paged_requests(m.CreateRequest),
    m.TombstoneRequest: lambda: _paged_requests(m.TombstoneRequest),
    m.ChecksumRequest: lambda: _paged_requests(m.ChecksumRequest),
    m.EnumerateRequest: _enumerate_requests,
    m.SetEpochRequest: _set_epoch_requests,
    m.LeaseResponse: _lease_responses,
    m.ReadResponse: lambda: st.builds(m.ReadResponse, state=page_states, generation=u64, mask=u32),
    m.StatusResponse: lambda: st.builds(m.StatusResponse, entries=_status_entries.map(tuple)),
}


_MESSAGES: dict[type[m.Message], MessageStrategy] = {}


def messages_of(cls: type[m.Message]) -> MessageStrategy:
    """Valid messages of one class."""
    if cls not in _MESSAGES:
        override = _OVERRIDES.get(cls)
        _MESSAGES[cls] = override() if override is not None else fields_of(cls)
    return _MESSAGES[cls]


@functools.cache
def requests() -> MessageStrategy:
    """A valid request of any operation."""
    return st.one_of([messages_of(cls) for cls in m.REQUESTS.values()])


@functools.cache
def responses() -> MessageStrategy:
    """A valid response of any operation."""
    return st.one_of([messages_of(cls) for cls in m.RESPONSES.values()])


@st.composite
def payload_size_for(draw: st.DrawFn, msg: m.Message) -> int:
    """A payload size that ``msg`` accepts (small for WRITE, exact for CREATE_IF_ABSENT)."""
    if isinstance(msg, m.WriteRequest):
        return draw(st.integers(1, min(WRITE_PAYLOAD, msg.page_size - msg.offset)))
    if isinstance(msg, m.CreateRequest):
        return 0 if msg.zero else msg.page_size
    return 0


def requests_with_payload_size() -> st.SearchStrategy[tuple[m.Message, int]]:
    """A valid request together with a payload size it accepts."""
    return requests().flatmap(lambda msg: st.tuples(st.just(msg), payload_size_for(msg)))


# --- errors ------------------------------------------------------------------------------

error_codes = st.sampled_from([code for code in ErrorCode if code != ErrorCode.OK])


@st.composite
def errors(draw: st.DrawFn, max_message: int = m.MAX_TEXT) -> LaminaError:
    """A typed error as a peer would rebuild it: any non-OK code, message and detail."""
    code = draw(error_codes)
    message = draw(st.text(max_size=max_message))
    detail = draw(st.none() | u64)
    return error_from_code(code, message, detail)


# --- frames -------------------------------------------------------------------------------


@st.composite
def frames(draw: st.DrawFn, max_header: int = 256, max_payload: int = 256) -> Frame:
    """An arbitrary well-framed frame (the header need not be a valid message)."""
    kind = draw(st.sampled_from(Kind))
    status = 0 if kind == Kind.REQUEST else draw(u8)
    return Frame(
        kind=kind,
        op=draw(u8),
        status=status,
        request_id=draw(request_ids),
        header=draw(st.binary(max_size=max_header)),
        payload=draw(st.binary(max_size=max_payload)),
    )


def frame_bytes(frame: Frame) -> bytes:
    """The wire encoding of a frame."""
    return b"".join(
        encode_frame(
            frame.kind, frame.op, frame.status, frame.request_id, frame.header, frame.payload
        )
    )


@st.composite
def message_frames(draw: st.DrawFn) -> Frame:
    """A frame a correct peer could send: a request, a response or an error response."""
    choice = draw(st.sampled_from(["request", "response", "error"]))
    rid = draw(request_ids)
    if choice == "request":
        msg = draw(requests())
        if isinstance(msg, m.CreateRequest) and not msg.zero:
            msg = dataclasses.replace(msg, page_size=m.MIN_PAGE_SIZE)  # keep full pages small
        size = draw(payload_size_for(msg))
        payload = (
            bytes(size) if size > WRITE_PAYLOAD else draw(st.binary(min_size=size, max_size=size))
        )
        return Frame(Kind.REQUEST, msg.OP, 0, rid, msg.encode(), payload)
    if choice == "response":
        msg = draw(responses())
        payload = draw(st.binary(max_size=64)) if isinstance(msg, m.ReadResponse) else b""
        return Frame(Kind.RESPONSE, msg.OP, 0, rid, msg.encode(), payload)
    err = draw(errors(max_message=64))
    return Frame(
        Kind.RESPONSE, draw(st.sampled_from(m.Op)), err.code, rid, m.encode_error(err), b""
    )

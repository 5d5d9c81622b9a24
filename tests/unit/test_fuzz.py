"""Fuzzing the decoding path: hostile bytes may only ever raise ProtocolError.

Everything a peer sends goes through FrameDecoder and then, for each frame that comes
out, through decode_request / decode_response / decode_error.  Whatever the input, the
only exception allowed out of that path is :class:`lamina.errors.ProtocolError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.errors import ProtocolError
from lamina.wire import messages as m
from lamina.wire.framing import (
    MAGIC,
    MAX_HEADER,
    MAX_PAYLOAD,
    PREAUTH_MAX_HEADER,
    PREAUTH_MAX_PAYLOAD,
    PREFIX,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    Kind,
)
from tests.strategies import frame_bytes, message_frames, messages_of

# raw inputs are cheap to generate; structured ones cost hypothesis ~2 ms each, so fewer of
# them keep the whole file around ten seconds
FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_STRUCTURED = settings(FUZZ, max_examples=600)

LIMITS = [(MAX_HEADER, MAX_PAYLOAD), (PREAUTH_MAX_HEADER, PREAUTH_MAX_PAYLOAD)]
ALL_CLASSES = [*m.REQUESTS.values(), *m.RESPONSES.values()]


@contextmanager
def only_protocol_errors(what: str, data: object) -> Iterator[None]:
    """Swallow ProtocolError; turn any other exception into a failure naming the input."""
    try:
        yield
    except ProtocolError:
        pass
    except Exception as exc:
        pytest.fail(f"{what} raised {type(exc).__name__}: {exc} on input {data!r}")


def decode_everything(frame: Frame) -> None:
    """Run a frame through every message decoder, as either side of a connection might."""
    decoders: list[tuple[str, Callable[[], object]]] = [
        ("decode_request", lambda: m.decode_request(frame.op, frame.header, len(frame.payload))),
        ("decode_response", lambda: m.decode_response(frame.op, frame.header)),
        ("decode_error", lambda: m.decode_error(frame.status, frame.header)),
    ]
    for name, decode in decoders:
        with only_protocol_errors(name, frame):
            decode()


def run_decoder(chunks: list[bytes]) -> int:
    """Feed chunks to decoders with full and pre-auth limits; the number of frames seen."""
    seen = 0
    for max_header, max_payload in LIMITS:
        decoder = FrameDecoder(max_header, max_payload)
        with only_protocol_errors("FrameDecoder", chunks):
            for chunk in chunks:
                decoder.feed(chunk)
                while (frame := decoder.next_frame()) is not None:
                    seen += 1
                    decode_everything(frame)
    return seen


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of the given sizes, the rest in one last piece."""
    out, pos = [], 0
    for size in sizes:
        if pos >= len(data):
            break
        out.append(data[pos : pos + size])
        pos += size
    if pos < len(data):
        out.append(data[pos:])
    return out


# --- raw bytes ---------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=512), st.lists(st.integers(1, 64), max_size=8))
def test_random_bytes(data: bytes, sizes: list[int]) -> None:
    """Arbitrary bytes in arbitrary chunks raise nothing but ProtocolError."""
    run_decoder(chunked(data, sizes))


@st.composite
def plausible_frames(draw: st.DrawFn) -> bytes:
    """A correct prefix (random op, status, lengths) followed by random bytes."""
    header = draw(st.binary(max_size=96))
    payload_len = draw(st.integers(0, 64))
    fields = (
        MAGIC,
        PROTOCOL_VERSION,
        draw(st.sampled_from([1, 2])),
        draw(st.sampled_from(list(m.Op)) | st.integers(0, 255)),
        draw(st.just(0) | st.integers(0, 255)),
        0,
        draw(st.integers(0, 2**64 - 1)),
        len(header),
        payload_len,
    )
    tail = draw(st.binary(max_size=payload_len + 32))
    return PREFIX.pack(*fields) + header + tail


@FUZZ_STRUCTURED
@given(st.lists(plausible_frames(), min_size=1, max_size=3), st.lists(st.integers(1, 64)))
def test_random_frames_with_valid_prefixes(frames: list[bytes], sizes: list[int]) -> None:
    """Well-framed random headers and payloads raise nothing but ProtocolError."""
    run_decoder(chunked(b"".join(frames), sizes))


# --- mutations of valid frames -----------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes flipped, inserted or deleted, possibly truncated."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if action == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and buf:
            buf[pos] = draw(st.integers(0, 255))
        elif action == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif action == "delete" and buf:
            del buf[pos]
        elif action == "truncate":
            del buf[pos:]
    return bytes(buf)


@FUZZ_STRUCTURED
@given(st.data())
def test_mutated_valid_frames(data: st.DataObject) -> None:
    """Valid frames with bytes flipped, inserted, deleted or cut raise nothing but ProtocolError."""
    good = [data.draw(message_frames(), label="frame") for _ in range(data.draw(st.integers(1, 2)))]
    wire = data.draw(mutated(b"".join(frame_bytes(f) for f in good)), label="mutated bytes")
    sizes = data.draw(st.lists(st.integers(1, 4096), max_size=4), label="chunk sizes")
    run_decoder(chunked(wire, sizes))


@settings(FUZZ, max_examples=300)
@given(message_frames())
def test_truncated_valid_frames(frame: Frame) -> None:
    """A valid frame cut short anywhere yields no frame and no error."""
    data = frame_bytes(frame)
    step = max(1, len(data) // 512)
    for cut in range(0, len(data), step):
        assert run_decoder([data[:cut]]) == 0


# --- structured headers --------------------------------------------------------------------

msgpack_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=20,
)


ops = st.sampled_from(list(m.Op)) | st.integers(0, 255)


@FUZZ_STRUCTURED
@given(ops, st.integers(0, 255), msgpack_values, st.integers(0, 2**24))
def test_random_msgpack_headers(op: int, status: int, value: Any, payload_size: int) -> None:
    """Any msgpack value as a header raises nothing but ProtocolError in every decoder."""
    header = msgpack.packb(value, use_bin_type=True)
    decode_everything(Frame(Kind.RESPONSE, op, status, 0, header, bytes(min(payload_size, 64))))
    with only_protocol_errors("decode_request", header):
        m.decode_request(op, header, payload_size)


@FUZZ_STRUCTURED
@given(st.data())
def test_valid_messages_with_one_random_field(data: st.DataObject) -> None:
    """A valid message with one field set to any msgpack value decodes or raises ProtocolError."""
    cls = data.draw(st.sampled_from(ALL_CLASSES), label="class")
    values = data.draw(messages_of(cls), label="valid message").fields()
    if values:
        values[data.draw(st.integers(0, len(values) - 1), label="field")] = data.draw(
            msgpack_values, label="value"
        )
    header = msgpack.packb(values, use_bin_type=True)
    size = data.draw(st.integers(0, m.MAX_PAGE_SIZE), label="payload size")
    with only_protocol_errors(cls.__name__, header):
        if m.REQUESTS.get(cls.OP) is cls:
            m.decode_request(cls.OP, header, size)
        else:
            m.decode_response(cls.OP, header)


def test_deep_nesting_in_every_position() -> None:
    """Arrays nested up to the msgpack depth limit in any field raise only ProtocolError."""
    for depth in (100, 900, 990, 1000, 1023, 1100):
        deep = b"\x91" * depth + b"\x01"
        for cls in ALL_CLASSES:
            n = len(cls._CHECKS)
            for index in range(max(n, 1)):
                header = bytes([0x90 | max(n, 1)]) + b"\xc0" * index + deep
                header += b"\xc0" * (max(n, 1) - index - 1)
                decode_everything(Frame(Kind.RESPONSE, cls.OP, 2, 0, header, b""))
        decode_everything(Frame(Kind.RESPONSE, 1, 2, 0, b"\x92" + deep + b"\xc0", b""))

"""Frame encoding and the incremental frame decoder."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.errors import FrameTooLarge, ProtocolError, UnsupportedVersion
from lamina.wire.framing import (
    LARGE_PAYLOAD,
    MAGIC,
    MAX_HEADER,
    MAX_PAYLOAD,
    MAX_REQUEST_ID,
    PREFIX,
    PREFIX_SIZE,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    Kind,
    encode_frame,
    encode_prefix,
)
from tests.strategies import frame_bytes, frames


def decode_chunks(decoder: FrameDecoder, chunks: list[bytes]) -> list[Frame]:
    """Feed ``chunks`` one by one, draining every complete frame after each."""
    out: list[Frame] = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def prefix(
    *,
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
    kind: int = Kind.REQUEST,
    op: int = 3,
    status: int = 0,
    flags: int = 0,
    request_id: int = 1,
    header_len: int = 0,
    payload_len: int = 0,
) -> bytes:
    """A raw 24-byte prefix with any field value, valid or not."""
    return PREFIX.pack(magic, version, kind, op, status, flags, request_id, header_len, payload_len)


# --- round trips ------------------------------------------------------------------------


@given(st.lists(frames(), min_size=1, max_size=5), st.lists(st.integers(0, 10**6)))
def test_frames_round_trip_in_any_chunking(batch: list[Frame], cuts: list[int]) -> None:
    """Back-to-back frames split at arbitrary points decode to exactly the frames sent."""
    data = b"".join(frame_bytes(f) for f in batch)
    assert decode_chunks(FrameDecoder(), split_at(data, cuts)) == batch


@settings(max_examples=50)
@given(st.lists(frames(max_header=64, max_payload=64), min_size=1, max_size=3))
def test_frames_round_trip_byte_at_a_time(batch: list[Frame]) -> None:
    """Frames fed one byte at a time decode to exactly the frames sent."""
    data = b"".join(frame_bytes(f) for f in batch)
    chunks = [data[i : i + 1] for i in range(len(data))]
    assert decode_chunks(FrameDecoder(), chunks) == batch


@given(frames())
def test_incomplete_frame_yields_nothing_and_keeps_bytes(frame: Frame) -> None:
    """Every strict prefix of a frame yields no frame and stays buffered."""
    data = frame_bytes(frame)
    decoder = FrameDecoder()
    decoder.feed(data[:-1])
    assert decoder.next_frame() is None
    assert decoder.buffered == len(data) - 1
    decoder.feed(data[-1:])
    assert decoder.next_frame() == frame
    assert decoder.buffered == 0
    assert decoder.next_frame() is None


@given(frames())
def test_encode_frame_layout(frame: Frame) -> None:
    """The encoding is the 24-byte big-endian prefix, the header, then the payload."""
    buffers = encode_frame(
        frame.kind, frame.op, frame.status, frame.request_id, frame.header, frame.payload
    )
    data = b"".join(buffers)
    assert data[:PREFIX_SIZE] == prefix(
        kind=frame.kind,
        op=frame.op,
        status=frame.status,
        request_id=frame.request_id,
        header_len=len(frame.header),
        payload_len=len(frame.payload),
    )
    assert data[PREFIX_SIZE:] == frame.header + frame.payload
    assert len(buffers) == (2 if frame.payload else 1)


def test_frames_at_exact_limits_are_accepted() -> None:
    """A header and payload exactly at the decoder's limits decode normally."""
    decoder = FrameDecoder(max_header=10, max_payload=20)
    frame = Frame(Kind.RESPONSE, 10, 0, MAX_REQUEST_ID, b"h" * 10, b"p" * 20)
    assert decode_chunks(decoder, [frame_bytes(frame)]) == [frame]


# --- limits --------------------------------------------------------------------------------


@given(st.integers(0, 4096), st.integers(1, 2**32 - 1 - 4096))
def test_header_over_limit_fails_on_the_prefix_alone(limit: int, excess: int) -> None:
    """A header length above the limit raises FrameTooLarge as soon as the prefix arrives."""
    decoder = FrameDecoder(max_header=limit, max_payload=0)
    decoder.feed(prefix(header_len=limit + excess))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    assert decoder.buffered == PREFIX_SIZE


@given(st.integers(0, 4096), st.integers(1, 2**32 - 1 - 4096))
def test_payload_over_limit_fails_on_the_prefix_alone(limit: int, excess: int) -> None:
    """A payload length above the limit raises FrameTooLarge as soon as the prefix arrives."""
    decoder = FrameDecoder(max_header=0, max_payload=limit)
    decoder.feed(prefix(payload_len=limit + excess))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    assert decoder.buffered == PREFIX_SIZE


def test_default_limits_reject_one_byte_more() -> None:
    """The default decoder rejects a header of MAX_HEADER + 1 and a payload of MAX_PAYLOAD + 1."""
    for data in (prefix(header_len=MAX_HEADER + 1), prefix(payload_len=MAX_PAYLOAD + 1)):
        decoder = FrameDecoder()
        decoder.feed(data)
        with pytest.raises(FrameTooLarge):
            decoder.next_frame()


def test_encode_prefix_enforces_limits_and_ranges() -> None:
    """encode_prefix refuses oversize lengths (FrameTooLarge) and out-of-range fields."""
    with pytest.raises(FrameTooLarge):
        encode_prefix(Kind.REQUEST, 3, 0, 1, MAX_HEADER + 1, 0)
    with pytest.raises(FrameTooLarge):
        encode_prefix(Kind.REQUEST, 3, 0, 1, 0, MAX_PAYLOAD + 1)
    for op, status, rid in ((256, 0, 1), (-1, 0, 1), (3, 256, 1), (3, -1, 1), (3, 0, -1)):
        with pytest.raises(ProtocolError):
            encode_prefix(Kind.RESPONSE, op, status, rid, 0, 0)
    with pytest.raises(ProtocolError):
        encode_prefix(Kind.RESPONSE, 3, 0, MAX_REQUEST_ID + 1, 0, 0)
    assert len(encode_prefix(Kind.RESPONSE, 255, 255, MAX_REQUEST_ID, MAX_HEADER, 0)) == 24


# --- malformed prefixes -----------------------------------------------------------------

BAD_PREFIXES = {
    "bad magic": prefix(magic=b"XX"),
    "bad magic case": prefix(magic=b"lm"),
    "kind 0": prefix(kind=0),
    "kind 3": prefix(kind=3),
    "flags": prefix(flags=1),
    "high flags": prefix(flags=0x8000),
    "request with status": prefix(kind=Kind.REQUEST, status=1),
}


@pytest.mark.parametrize("data", BAD_PREFIXES.values(), ids=BAD_PREFIXES.keys())
def test_malformed_prefix_raises_protocol_error(data: bytes) -> None:
    """Bad magic, bad kind, nonzero flags or a request with a status raise ProtocolError."""
    decoder = FrameDecoder()
    decoder.feed(data)
    with pytest.raises(ProtocolError):
        decoder.next_frame()


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 255])
def test_other_version_raises_unsupported_version(version: int) -> None:
    """A frame of another protocol version raises UnsupportedVersion (a ProtocolError)."""
    decoder = FrameDecoder()
    decoder.feed(prefix(version=version))
    with pytest.raises(UnsupportedVersion):
        decoder.next_frame()


def test_response_may_carry_a_status() -> None:
    """A response frame with a nonzero status is well formed."""
    frame = Frame(Kind.RESPONSE, 10, 255, 7, b"\x92\xa0\xc0", b"")
    assert decode_chunks(FrameDecoder(), [frame_bytes(frame)]) == [frame]


@pytest.mark.parametrize("data", BAD_PREFIXES.values(), ids=BAD_PREFIXES.keys())
def test_decoder_refuses_input_after_an_error(data: bytes) -> None:
    """Once a frame was rejected the decoder refuses any further input."""
    decoder = FrameDecoder()
    decoder.feed(data)
    with pytest.raises(ProtocolError):
        decoder.next_frame()
    good = frame_bytes(Frame(Kind.REQUEST, 3, 0, 1, b"\x90", b""))
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(good)


def test_error_after_good_frames_still_delivers_them() -> None:
    """Frames before a malformed one are delivered; the malformed one then raises."""
    good = Frame(Kind.REQUEST, 3, 0, 1, b"\x90", b"")
    decoder = FrameDecoder()
    decoder.feed(frame_bytes(good) + prefix(magic=b"NO"))
    assert decoder.next_frame() == good
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_short_input_waits_for_the_whole_prefix() -> None:
    """Fewer than 24 bytes never raise or yield, even if they are already invalid."""
    decoder = FrameDecoder()
    decoder.feed(b"XX" + bytes(PREFIX_SIZE - 3))
    assert decoder.next_frame() is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 3 * LARGE_PAYLOAD), min_size=1, max_size=4),
    st.integers(1000, 200_000),
    st.integers(0, 2**32),
)
def test_large_payloads_are_received_in_place(sizes: list[int], chunk: int, seed: int) -> None:
    """Receiving through get_buffer/buffer_updated, as the transports do, yields every frame
    intact whatever the chunking, and a large payload arriving in pieces is received in
    its own buffer."""
    rnd = random.Random(seed)
    frames = [Frame(Kind.REQUEST, 11, 0, i, b"\x90", rnd.randbytes(n)) for i, n in enumerate(sizes)]
    wire = b"".join(
        b"".join(encode_frame(f.kind, f.op, f.status, f.request_id, f.header, f.payload))
        for f in frames
    )
    dec = FrameDecoder()
    got: list[Frame] = []
    pos = 0
    while pos < len(wire):
        buf = dec.get_buffer(chunk)
        n = min(len(buf), chunk, len(wire) - pos)
        buf[:n] = wire[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
        while (frame := dec.next_frame()) is not None:
            got.append(frame)
    assert [(f.request_id, bytes(f.payload)) for f in got] == [
        (f.request_id, f.payload) for f in frames
    ]
    if chunk < LARGE_PAYLOAD:  # no large payload can then arrive whole in one chunk
        for f in got:
            if len(f.payload) >= LARGE_PAYLOAD:
                assert isinstance(f.payload, bytearray)
    assert dec.buffered == 0

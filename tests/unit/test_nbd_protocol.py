"""The NBD server-side protocol: handshake, option haggling and transmission parsing."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lamina.errors import ErrorCode
from lamina.nbd.protocol import (
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    NBDMAGIC,
    NEED_DATA,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    Abort,
    Command,
    CommandFlag,
    Disconnect,
    Event,
    ExportChosen,
    ExportInfo,
    InfoType,
    NbdErrno,
    NbdProtocolError,
    NbdServer,
    Option,
    OptionReply,
    Request,
    State,
    TransmissionFlag,
    reply,
)

SIZE = 1 << 20
EXPORTS = {"vol": ExportInfo(SIZE, read_only=False), "ro": ExportInfo(SIZE, read_only=True)}
FIXED, NO_ZEROES = 1, 2


# -- client-side encoders and a reply parser ------------------------------------------------


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def req(
    cmd: int, handle: int, offset: int, length: int, flags: int = 0, data: bytes = b""
) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


def parse_option_replies(out: bytes) -> list[tuple[int, int, bytes]]:
    replies, pos = [], 0
    while pos < len(out):
        magic, option, rtype, length = struct.unpack_from(">QIII", out, pos)
        assert magic == OPTION_REPLY_MAGIC
        pos += 20
        replies.append((option, rtype, out[pos : pos + length]))
        pos += length
    return replies


def parse_simple_replies(out: bytes) -> list[tuple[int, int]]:
    """(handle, error) of each data-less simple reply in ``out``."""
    assert len(out) % 16 == 0
    result = []
    for pos in range(0, len(out), 16):
        magic, error, handle = struct.unpack_from(">IIQ", out, pos)
        assert magic == SIMPLE_REPLY_MAGIC
        result.append((handle, error))
    return result


def drive(server: NbdServer, data: bytes, cuts: list[int] | None = None) -> list[Event]:
    """Feed ``data`` split at ``cuts`` and collect every event."""
    bounds = sorted({c % (len(data) + 1) for c in cuts or []} | {0, len(data)})
    events: list[Event] = []
    for a, b in itertools.pairwise(bounds):
        server.receive_data(data[a:b])
        while (event := server.next_event()) is not NEED_DATA:
            assert not isinstance(event, type(NEED_DATA))
            events.append(event)
    return events


def in_transmission(name: str = "vol") -> NbdServer:
    server = NbdServer(EXPORTS)
    events = drive(server, struct.pack(">I", FIXED | NO_ZEROES) + opt(Option.GO, go_data(name)))
    assert events == [ExportChosen(name, EXPORTS[name])]
    server.data_to_send()
    return server


# -- handshake -----------------------------------------------------------------------------


def test_greeting() -> None:
    """The greeting is NBDMAGIC, IHAVEOPT and the FIXED_NEWSTYLE|NO_ZEROES flags."""
    assert NbdServer.initial_bytes() == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)


def test_go_flow() -> None:
    """GO answers export and block-size infos then ACK, and enters transmission."""
    server = NbdServer(EXPORTS)
    events = drive(server, struct.pack(">I", FIXED) + opt(Option.GO, go_data("vol", (3,))))
    assert events == [ExportChosen("vol", EXPORTS["vol"])]
    assert server.state is State.TRANSMISSION
    replies = parse_option_replies(server.data_to_send())
    assert [r[:2] for r in replies] == [
        (Option.GO, OptionReply.INFO),
        (Option.GO, OptionReply.INFO),
        (Option.GO, OptionReply.ACK),
    ]
    itype, size, flags = struct.unpack(">HQH", replies[0][2])
    assert (itype, size) == (InfoType.EXPORT, SIZE)
    assert flags & TransmissionFlag.HAS_FLAGS
    assert not flags & (TransmissionFlag.READ_ONLY | TransmissionFlag.CAN_MULTI_CONN)
    assert struct.unpack(">HIII", replies[1][2]) == (InfoType.BLOCK_SIZE, 1, 4096, MAX_PAYLOAD)


def test_info_then_go() -> None:
    """INFO answers like GO but stays in options; a following GO enters transmission."""
    server = NbdServer(EXPORTS)
    drive(server, struct.pack(">I", FIXED) + opt(Option.INFO, go_data("ro")))
    assert server.state is State.OPTIONS
    replies = parse_option_replies(server.data_to_send())
    assert [r[1] for r in replies] == [OptionReply.INFO, OptionReply.INFO, OptionReply.ACK]
    assert struct.unpack(">HQH", replies[0][2])[2] & TransmissionFlag.READ_ONLY
    assert drive(server, opt(Option.GO, go_data("ro"))) == [ExportChosen("ro", EXPORTS["ro"])]
    assert server.export == EXPORTS["ro"]


def test_list() -> None:
    """LIST answers one SERVER reply per export, then ACK."""
    server = NbdServer(EXPORTS)
    assert drive(server, struct.pack(">I", FIXED) + opt(Option.LIST)) == []
    replies = parse_option_replies(server.data_to_send())
    assert [r[1] for r in replies] == [OptionReply.SERVER, OptionReply.SERVER, OptionReply.ACK]
    names = {r[2][4:].decode() for r in replies[:2]}
    assert names == set(EXPORTS)
    assert all(struct.unpack_from(">I", r[2])[0] == len(r[2]) - 4 for r in replies[:2])


def test_list_with_data_is_invalid() -> None:
    """LIST carrying data gets ERR_INVALID and negotiation goes on."""
    server = NbdServer(EXPORTS)
    drive(server, struct.pack(">I", FIXED) + opt(Option.LIST, b"x"))
    assert parse_option_replies(server.data_to_send()) == [
        (Option.LIST, OptionReply.ERR_INVALID, b"")
    ]
    assert server.state is State.OPTIONS


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name(no_zeroes: bool) -> None:
    """EXPORT_NAME answers size and flags, padded with 124 zeroes unless NO_ZEROES."""
    server = NbdServer(EXPORTS)
    flags = FIXED | (NO_ZEROES if no_zeroes else 0)
    events = drive(server, struct.pack(">I", flags) + opt(Option.EXPORT_NAME, b"vol"))
    assert events == [ExportChosen("vol", EXPORTS["vol"])]
    out = server.data_to_send()
    assert len(out) == 10 + (0 if no_zeroes else EXPORT_NAME_PADDING)
    assert struct.unpack_from(">QH", out) == (SIZE, EXPORTS["vol"].transmission_flags)
    assert out[10:] == bytes(len(out) - 10)
    assert server.state is State.TRANSMISSION


def test_export_name_unknown_closes() -> None:
    """EXPORT_NAME for an unknown export closes the connection."""
    server = NbdServer(EXPORTS)
    with pytest.raises(NbdProtocolError):
        drive(server, struct.pack(">I", FIXED) + opt(Option.EXPORT_NAME, b"nope"))
    assert server.state is State.CLOSED


def test_abort() -> None:
    """ABORT is acknowledged and closes the connection."""
    server = NbdServer(EXPORTS)
    assert drive(server, struct.pack(">I", FIXED) + opt(Option.ABORT)) == [Abort()]
    assert parse_option_replies(server.data_to_send()) == [(Option.ABORT, OptionReply.ACK, b"")]
    assert server.state is State.CLOSED
    with pytest.raises(NbdProtocolError):
        server.receive_data(b"more")


@pytest.mark.parametrize("option", [Option.GO, Option.INFO])
def test_unknown_export(option: Option) -> None:
    """GO or INFO for an unknown export gets ERR_UNKNOWN and negotiation goes on."""
    server = NbdServer(EXPORTS)
    assert drive(server, struct.pack(">I", FIXED) + opt(option, go_data("nope"))) == []
    assert parse_option_replies(server.data_to_send()) == [(option, OptionReply.ERR_UNKNOWN, b"")]
    assert server.state is State.OPTIONS


@pytest.mark.parametrize(
    "data", [b"", b"\0\0\0", go_data("vol")[:-1], go_data("vol") + b"\0", go_data("vol", (3,))[:-2]]
)
def test_malformed_go(data: bytes) -> None:
    """A malformed GO payload gets ERR_INVALID and negotiation goes on."""
    server = NbdServer(EXPORTS)
    assert drive(server, struct.pack(">I", FIXED) + opt(Option.GO, data)) == []
    assert parse_option_replies(server.data_to_send()) == [
        (Option.GO, OptionReply.ERR_INVALID, b"")
    ]
    assert server.state is State.OPTIONS


@pytest.mark.parametrize("option", [Option.STRUCTURED_REPLY, 4, 9, 0xFFFF])
def test_unknown_option(option: int) -> None:
    """Structured replies and unknown options get ERR_UNSUP and negotiation goes on."""
    server = NbdServer(EXPORTS)
    drive(server, struct.pack(">I", FIXED) + opt(option, b"abc"))
    assert parse_option_replies(server.data_to_send()) == [(option, OptionReply.ERR_UNSUP, b"")]
    assert server.state is State.OPTIONS


@pytest.mark.parametrize("flags", [0, NO_ZEROES, FIXED | 4])
def test_bad_client_flags(flags: int) -> None:
    """Client flags without FIXED_NEWSTYLE, or with unknown bits, close the connection."""
    server = NbdServer(EXPORTS)
    with pytest.raises(NbdProtocolError) as info:
        drive(server, struct.pack(">I", flags))
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert server.state is State.CLOSED


def test_option_too_long() -> None:
    """An option longer than the limit closes the connection before it is buffered."""
    server = NbdServer(EXPORTS)
    header = struct.pack(">I", FIXED) + struct.pack(">QII", IHAVEOPT, 99, MAX_OPTION_LENGTH + 1)
    with pytest.raises(NbdProtocolError):
        drive(server, header)


def test_bad_option_magic() -> None:
    """An option without IHAVEOPT closes the connection."""
    server = NbdServer(EXPORTS)
    with pytest.raises(NbdProtocolError):
        drive(server, struct.pack(">I", FIXED) + struct.pack(">QII", NBDMAGIC, 7, 0))


@given(st.lists(st.integers(0, 200), max_size=20))
@settings(max_examples=50, deadline=None)
def test_handshake_chunking(cuts: list[int]) -> None:
    """A whole negotiation gives the same events and bytes however the input is split."""
    data = (
        struct.pack(">I", FIXED)
        + opt(Option.LIST)
        + opt(Option.INFO, go_data("vol"))
        + opt(Option.GO, go_data("vol", (0, 3)))
    )
    whole, split = NbdServer(EXPORTS), NbdServer(EXPORTS)
    assert drive(whole, data) == drive(split, data, cuts)
    assert whole.data_to_send() == split.data_to_send()


# -- transmission --------------------------------------------------------------------------

COMMANDS = [
    Request(1, Command.READ, 0, 4096, 512),
    Request(2, Command.WRITE, CommandFlag.FUA, 100, 5, b"hello"),
    Request(3, Command.FLUSH, 0, 0, 0),
    Request(4, Command.TRIM, CommandFlag.FUA, 0, SIZE),
    Request(5, Command.WRITE_ZEROES, CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO, 8192, 4096),
    Request(2**64 - 1, Command.READ, 0, SIZE - 1, 1),
]


def encode(r: Request) -> bytes:
    return req(r.cmd, r.handle, r.offset, r.length, r.flags, r.data)


@given(st.lists(st.integers(0, 400), max_size=40), st.booleans())
@settings(max_examples=100, deadline=None)
def test_commands_parsed_with_any_chunking(cuts: list[int], byte_at_a_time: bool) -> None:
    """Every command parses to the same requests however the input is split."""
    data = b"".join(map(encode, COMMANDS)) + req(Command.DISC, 9, 0, 0)
    if byte_at_a_time:
        cuts = list(range(len(data)))
    server = in_transmission()
    assert drive(server, data, cuts) == [*COMMANDS, Disconnect()]
    assert server.state is State.CLOSED
    assert server.data_to_send() == b""


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (req(Command.READ, 7, SIZE - 1, 2), NbdErrno.EINVAL),
        (req(Command.READ, 7, 2**64 - 1, 1), NbdErrno.EINVAL),
        (req(Command.TRIM, 7, SIZE, 1), NbdErrno.EINVAL),
        (req(Command.WRITE, 7, SIZE - 2, 4, data=b"abcd"), NbdErrno.ENOSPC),
        (req(Command.WRITE_ZEROES, 7, SIZE + 1, 0), NbdErrno.ENOSPC),
        (req(Command.READ, 7, 0, MAX_PAYLOAD + 1), NbdErrno.EINVAL),
        (req(5, 7, 0, 0), NbdErrno.EINVAL),
        (req(99, 7, 0, 4096), NbdErrno.EINVAL),
        (req(Command.READ, 7, 0, 4096, flags=CommandFlag.FUA), NbdErrno.EINVAL),
        (req(Command.WRITE, 7, 0, 2, flags=CommandFlag.NO_HOLE, data=b"ab"), NbdErrno.EINVAL),
        (req(Command.WRITE_ZEROES, 7, 0, 4096, flags=4), NbdErrno.EINVAL),
        (req(Command.FLUSH, 7, 0, 0, flags=0x8000), NbdErrno.EINVAL),
    ],
)
def test_invalid_request_answered_and_stream_in_sync(bad: bytes, error: NbdErrno) -> None:
    """An invalid request is answered with its error and the next request still parses."""
    server = in_transmission()
    events = drive(server, bad + encode(COMMANDS[0]))
    assert events == [COMMANDS[0]]
    assert parse_simple_replies(server.data_to_send()) == [(7, error)]


@pytest.mark.parametrize(
    "bad",
    [
        req(Command.WRITE, 7, 0, 3, data=b"abc"),
        req(Command.TRIM, 7, 0, 4096),
        req(Command.WRITE_ZEROES, 7, 0, 4096),
    ],
)
def test_read_only_refuses_writes(bad: bytes) -> None:
    """WRITE, TRIM and WRITE_ZEROES on a read-only export get EPERM; READ still works."""
    server = in_transmission("ro")
    assert drive(server, bad + encode(COMMANDS[0])) == [COMMANDS[0]]
    assert parse_simple_replies(server.data_to_send()) == [(7, NbdErrno.EPERM)]


def test_zero_length_succeeds_without_an_event() -> None:
    """Zero-length READ/WRITE/TRIM/WRITE_ZEROES are answered with success directly."""
    server = in_transmission()
    data = b"".join(req(c, i, 64, 0) for i, c in enumerate(Command) if c is not Command.DISC)
    events = drive(server, data)
    assert events == [Request(3, Command.FLUSH, 0, 64, 0)]
    assert parse_simple_replies(server.data_to_send()) == [(0, 0), (1, 0), (4, 0), (5, 0)]


def test_bad_magic_raises() -> None:
    """A request with the wrong magic is a protocol error that closes the connection."""
    server = in_transmission()
    with pytest.raises(NbdProtocolError):
        drive(server, b"\x00" * 28)
    assert server.state is State.CLOSED
    with pytest.raises(NbdProtocolError):
        server.receive_data(b"x")


def test_oversized_write_closes() -> None:
    """A WRITE larger than the maximum payload closes the connection before buffering."""
    server = in_transmission()
    with pytest.raises(NbdProtocolError):
        drive(server, req(Command.WRITE, 1, 0, MAX_PAYLOAD + 1))


def test_reply_encoding() -> None:
    """Simple replies are magic, error, handle and the read data."""
    assert reply(5) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 5)
    assert reply(2**64 - 1, NbdErrno.EIO) == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 5, 2**64 - 1)
    assert reply(1, data=b"abc")[16:] == b"abc"
    with pytest.raises(ValueError, match="no data"):
        reply(1, NbdErrno.EIO, b"x")
    with pytest.raises(ValueError, match="out of range"):
        reply(2**64)


def test_request_validated_when_built() -> None:
    """A Request with flags, data or ranges its command does not allow cannot be built."""
    with pytest.raises(ValueError, match="flags"):
        Request(1, Command.READ, CommandFlag.FUA, 0, 1)
    with pytest.raises(ValueError, match="carries"):
        Request(1, Command.WRITE, 0, 0, 2, b"x")
    with pytest.raises(ValueError, match="data"):
        Request(1, Command.READ, 0, 0, 1, b"x")


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=10))
@settings(max_examples=300, deadline=None)
def test_fuzz_transmission(junk: bytes, cuts: list[int]) -> None:
    """Random bytes after the handshake raise nothing but NbdProtocolError."""
    server = in_transmission()
    try:
        drive(server, junk, cuts)
    except NbdProtocolError:
        assert server.state is State.CLOSED


@given(st.binary(max_size=300), st.sampled_from([FIXED, FIXED | NO_ZEROES]))
@settings(max_examples=200, deadline=None)
def test_fuzz_options(junk: bytes, flags: int) -> None:
    """Random bytes during option haggling raise nothing but NbdProtocolError."""
    server = NbdServer(EXPORTS)
    try:
        drive(server, struct.pack(">I", flags) + junk)
    except NbdProtocolError:
        assert server.state is State.CLOSED


@given(
    st.sampled_from(sorted(Option)),
    st.binary(max_size=40),
    st.sampled_from(["vol", "ro", "nope", "é"]),
)
@settings(max_examples=200, deadline=None)
def test_fuzz_well_framed_options(option: int, payload: bytes, name: str) -> None:
    """Well-framed options with random payloads leave the machine in a legal state."""
    server = NbdServer(EXPORTS)
    data = struct.pack(">I", FIXED) + opt(option, payload) + opt(Option.GO, go_data(name))
    try:
        events = drive(server, data)
    except NbdProtocolError:
        assert server.state is State.CLOSED
        return
    if name in EXPORTS or any(isinstance(e, ExportChosen | Abort) for e in events):
        assert server.state in (State.TRANSMISSION, State.CLOSED)
    else:
        assert server.state is State.OPTIONS

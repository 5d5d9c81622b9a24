"""Malformed frames, bad keys and out-of-range requests never hurt the server or its data."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import pytest

from lamina.errors import AuthFailed, BadRequest, ErrorCode, ProtocolError
from lamina.localcluster import StorageProcess
from lamina.wire import messages as m
from lamina.wire.framing import (
    MAGIC,
    MAX_HEADER,
    MAX_PAYLOAD,
    PREAUTH_MAX_HEADER,
    PREFIX,
    PROTOCOL_VERSION,
    Kind,
)
from lamina.wire.handshake import new_nonce
from tests.integration.support import (
    EPOCH,
    GARBAGE_STATUSES,
    PAGE_SIZE,
    VOLUME,
    RawConn,
    connect,
    create_req,
    enumerate_pages,
    read_page,
    read_req,
    run,
    status,
    write_req,
)

pytestmark = pytest.mark.integration

LAYER = 41
CASES = 1000
CONCURRENCY = 32
OK = 0
BAD = int(ErrorCode.BAD_REQUEST)
TOO_LARGE = int(ErrorCode.TOO_LARGE)
UNSUPPORTED = int(ErrorCode.UNSUPPORTED_VERSION)
UNKNOWN_OPS = (0, 4, 9, 21, 99, 200, 255)


def prefix(
    op: int,
    header_len: int,
    payload_len: int = 0,
    *,
    rid: int = 1,
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
    kind: int = Kind.REQUEST,
    status: int = 0,
    flags: int = 0,
) -> bytes:
    """A frame prefix with any field, valid or not."""
    return PREFIX.pack(magic, version, kind, op, status, flags, rid, header_len, payload_len)


def frame(
    op: int,
    header: bytes,
    payload: bytes = b"",
    *,
    rid: int = 1,
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
    kind: int = Kind.REQUEST,
    status: int = 0,
    flags: int = 0,
) -> bytes:
    """A whole frame with any prefix field, valid or not."""
    head = prefix(
        op, len(header), len(payload),
        rid=rid, magic=magic, version=version, kind=kind, status=status, flags=flags,
    )  # fmt: skip
    return head + header + payload


def garbage_header(rng: random.Random, op: int) -> bytes:
    """A header that no request of ``op`` accepts (so no garbage can change anything)."""
    cls = m.REQUESTS.get(op)
    n_fields = len(cls._CHECKS) if cls is not None else 0
    kind = rng.randrange(5)
    if kind == 0:  # 0xc1 is never used by msgpack
        return b"\xc1" + rng.randbytes(rng.randrange(40))
    if kind == 1:  # valid msgpack, but not an array
        value = rng.choice([None, True, 1.5, "text", b"bin", 7, {"a": 1}])
        return bytes(msgpack.packb(value, use_bin_type=True))
    if kind == 2 or n_fields == 0:  # an array of the wrong length
        return bytes(msgpack.packb([rng.randrange(256)] * (n_fields + rng.randint(1, 3))))
    if kind == 3:  # the right length, every field a string
        return bytes(msgpack.packb(["x"] * n_fields))
    # one msgpack integer followed by trailing bytes
    return bytes([rng.randrange(0x80)]) + rng.randbytes(rng.randrange(1, 40))


def valid_header(op: int) -> bytes:
    """The header of a valid request of ``op`` (used before the handshake)."""
    msgs: dict[int, m.Message] = {
        m.Op.PING: m.PingRequest(),
        m.Op.READ: read_req(LAYER, 0, 0, 4096),
        m.Op.STATUS: m.StatusRequest(VOLUME, EPOCH, LAYER, (0, 1)),
        m.Op.RESTORE: m.RestoreRequest((1, 2, 3)),
        m.Op.AUTH: m.AuthRequest(new_nonce()),
        m.Op.SET_EPOCH: m.SetEpochRequest(9, ((VOLUME, 9),)),
        m.Op.DELETE_LAYER: m.DeleteLayerRequest(VOLUME, EPOCH, LAYER),
    }
    return msgs[op].encode()


def hello(min_version: int = 1, max_version: int = 1) -> bytes:
    return m.HelloRequest(min_version, max_version, new_nonce(), "fuzz").encode()


@dataclass
class Case:
    """One connection's worth of bad input and what the server must answer to it."""

    name: str
    data: bytes
    authenticated: bool = False
    statuses: list[int] | None = None  # exact answer statuses expected, or any errors
    hang_up: bool = False  # send, then close at once without reading


def pre_auth_case(rng: random.Random) -> Case:
    pick = rng.randrange(9)
    if pick == 0:
        return Case("random bytes", rng.randbytes(rng.randrange(200)))
    if pick == 1:
        op = rng.choice([m.Op.HELLO, m.Op.AUTH, m.Op.PING, *UNKNOWN_OPS])
        return Case("garbage header", frame(op, garbage_header(rng, op), rid=5), statuses=[BAD])
    if pick == 2:
        if rng.random() < 0.5:
            big = prefix(m.Op.HELLO, rng.randint(PREAUTH_MAX_HEADER + 1, 2**32 - 1))
        else:
            big = prefix(m.Op.HELLO, 10, rng.randint(1, 2**32 - 1))
        return Case("oversize", big, statuses=[TOO_LARGE])
    if pick == 3:
        magic = rng.choice([b"ML", b"\0\0", b"LN", b"lm", rng.randbytes(2)])
        magic = magic if magic != MAGIC else b"XX"
        return Case("wrong magic", frame(m.Op.HELLO, hello(), magic=magic), statuses=[BAD])
    if pick == 4:
        which = rng.randrange(4)
        body = hello()
        if which == 0:
            data = frame(m.Op.HELLO, body, version=rng.choice([0, 2, 255]))
            return Case("bad version", data, statuses=[UNSUPPORTED])
        if which == 1:
            data = frame(m.Op.HELLO, body, kind=rng.choice([0, Kind.RESPONSE, 3, 255]))
            return Case("bad kind", data, statuses=[BAD])
        if which == 2:
            data = frame(m.Op.HELLO, body, flags=rng.randint(1, 0xFFFF))
            return Case("bad flags", data, statuses=[BAD])
        data = frame(m.Op.HELLO, body, status=rng.randint(1, 255))
        return Case("bad status", data, statuses=[BAD])
    if pick == 5:
        whole = frame(m.Op.HELLO, hello())
        return Case("truncated", whole[: rng.randrange(1, len(whole))], hang_up=True)
    if pick == 6:
        op = rng.choice(
            [
                m.Op.PING,
                m.Op.READ,
                m.Op.STATUS,
                m.Op.RESTORE,
                m.Op.AUTH,
                m.Op.SET_EPOCH,
                m.Op.DELETE_LAYER,
            ]
        )
        return Case("request before handshake", frame(op, valid_header(op), rid=9), statuses=[BAD])
    if pick == 7:
        lo = rng.randint(2, 255)
        data = frame(m.Op.HELLO, hello(lo, rng.randint(lo, 255)))
        return Case("unsupported version", data, statuses=[UNSUPPORTED])
    whole = frame(m.Op.HELLO, hello()) + frame(m.Op.HELLO, hello(), rid=2)
    return Case("hello twice", whole, statuses=[OK, BAD])


def post_auth_case(rng: random.Random) -> Case:
    ping = frame(m.Op.PING, b"\x90", rid=999)
    pick = rng.randrange(6)
    if pick == 0:
        return Case("random bytes", rng.randbytes(rng.randrange(1, 300)), authenticated=True)
    if pick in (1, 2):  # the connection survives a bad header and answers the next request
        op = rng.choice([*m.REQUESTS, *UNKNOWN_OPS])
        data = frame(op, garbage_header(rng, op), rid=7) + ping
        return Case("garbage header", data, authenticated=True, statuses=[BAD, OK])
    if pick == 3:
        if rng.random() < 0.5:
            big = prefix(m.Op.READ, rng.randint(MAX_HEADER + 1, 2**32 - 1))
        else:
            big = prefix(m.Op.WRITE, 10, rng.randint(MAX_PAYLOAD + 1, 2**32 - 1))
        return Case("oversize", big, authenticated=True, statuses=[TOO_LARGE])
    if pick == 4:
        kind = rng.choice([Kind.RESPONSE, 0, 7])
        return Case("not a request", frame(m.Op.PING, b"\x90", kind=kind), True, [BAD])
    whole = frame(m.Op.PING, b"\x90") + frame(m.Op.READ, read_req(LAYER, 0).encode())
    return Case("truncated", whole[: rng.randrange(1, len(whole))], True, hang_up=True)


async def run_case(port: int, key: bytes, case: Case) -> list[int]:
    conn = await RawConn.open(port)
    try:
        if case.authenticated:
            auth = await conn.handshake(key)
            assert auth.status == OK
        conn.send_bytes(case.data)
        if case.hang_up:
            await conn.half_close()
            return []
        await conn.half_close()
        frames = await conn.frames_until_closed()
    finally:
        conn.close()
    got = [f.status for f in frames]
    assert all(f.kind == Kind.RESPONSE for f in frames), case.name
    if case.statuses is not None:
        assert got == case.statuses, f"{case.name}: {got} != {case.statuses}"
    else:
        assert set(got) <= GARBAGE_STATUSES, f"{case.name}: answered {got}"
    return got


async def check_service(proc: StorageProcess, key: bytes, page: int, data: bytes) -> None:
    """A correct client can write ``data`` to ``page`` and read it back."""
    client = await connect(proc, key)
    try:
        reply = await client.call(write_req(LAYER, page, 0), data)
        assert isinstance(reply, m.WriteResponse)
        _, got = await read_page(client, LAYER, page)
        assert got == data
    finally:
        client.close()


def test_a_thousand_malformed_connections_leave_the_server_serving(
    server: StorageProcess, key: bytes
) -> None:
    """1,000 connections of garbage get only error answers and the server keeps serving."""
    rng = random.Random(5)
    makers: list[Callable[[random.Random], Case]] = [pre_auth_case, post_auth_case]
    cases = [makers[i % 2](rng) for i in range(CASES)]
    before = rng.randbytes(PAGE_SIZE)
    after = rng.randbytes(PAGE_SIZE)
    run(check_service(server, key, 0, before))

    async def main() -> dict[str, int]:
        gate = asyncio.Semaphore(CONCURRENCY)
        seen: dict[str, int] = {}

        async def one(case: Case) -> None:
            async with gate:
                await run_case(server.port, key, case)
            seen[case.name] = seen.get(case.name, 0) + 1

        await asyncio.gather(*(one(c) for c in cases))
        return seen

    seen = run(main(), 120)
    assert sum(seen.values()) == CASES
    print(seen)
    assert len(seen) >= 12, seen
    assert server.alive()

    async def afterwards() -> None:
        client = await connect(server, key)
        try:
            _, got = await read_page(client, LAYER, 0)
            assert got == before, "garbage changed a page"
        finally:
            client.close()
        await check_service(server, key, 1, after)

    run(afterwards())
    assert "Traceback" not in server.log.read_text(), "garbage caused an internal error"


def test_wrong_key_is_refused_and_disconnected(server: StorageProcess, key: bytes) -> None:
    """A peer without the cluster key gets AUTH_FAILED, is cut off, and others carry on."""
    wrong = bytes(b ^ 0x5A for b in key)

    async def main() -> None:
        with pytest.raises(AuthFailed):  # the client sees the server cannot prove our key
            await connect(server, wrong)
        conn = await RawConn.open(server.port)
        try:
            answer = await conn.handshake(key, proof_key=wrong)
            assert answer.status == ErrorCode.AUTH_FAILED
            assert await conn.frames_until_closed() == []  # hung up without our EOF
        finally:
            conn.close()

    run(main())
    assert server.alive()
    run(check_service(server, key, 2, random.Random(6).randbytes(PAGE_SIZE)))


def test_bad_header_after_handshake_gets_bad_request_and_connection_goes_on(
    server: StorageProcess, key: bytes
) -> None:
    """An undecodable header on an authenticated connection is answered BAD_REQUEST only."""
    data = random.Random(7).randbytes(PAGE_SIZE)

    async def main() -> None:
        conn = await RawConn.open(server.port)
        try:
            await conn.handshake(key)
            for header in (b"\xc1\xc1", msgpack.packb([1, 2]), b"\x93\x01"):
                rid = conn.send(m.Op.READ, bytes(header), rid=4242)
                answer = await conn.next_frame()
                assert answer is not None
                assert answer.request_id == rid
                assert answer.status == BAD
                assert isinstance(m.decode_error(answer.status, answer.header), BadRequest)
            created = await conn.call(create_req(LAYER, 3, zero=False), data)
            assert created.status == OK
            answer = await conn.call(read_req(LAYER, 3))
            assert answer.status == OK
            assert answer.payload == data
        finally:
            conn.close()

    run(main())


def test_out_of_range_requests_get_bad_request_and_change_nothing(
    server: StorageProcess, key: bytes
) -> None:
    """Ranges past the page, odd page sizes and wrong payload sizes are refused BAD_REQUEST."""
    data = random.Random(8).randbytes(PAGE_SIZE)
    ps = PAGE_SIZE
    v, e, lay = VOLUME, EPOCH, LAYER
    full = m.FULL_MASK
    bad: list[tuple[str, int, list[object], bytes]] = [
        ("read past the page", m.Op.READ, [v, e, lay, 0, ps, ps - 10, 100, []], b""),
        ("read at the page end", m.Op.READ, [v, e, lay, 0, ps, ps, 1, []], b""),
        ("read of nothing", m.Op.READ, [v, e, lay, 0, ps, 0, 0, []], b""),
        ("offset over u32", m.Op.READ, [v, e, lay, 0, ps, 2**32, 1, []], b""),
        ("page size 3 * 2^18", m.Op.READ, [v, e, lay, 0, 3 << 18, 0, 10, []], b""),
        ("page size 2^20 + 1", m.Op.READ, [v, e, lay, 0, ps + 1, 0, 10, []], b""),
        ("page size 32 KiB", m.Op.READ, [v, e, lay, 0, 1 << 15, 0, 10, []], b""),
        ("page size 32 MiB", m.Op.READ, [v, e, lay, 0, 1 << 25, 0, 10, []], b""),
        ("write past the page", m.Op.WRITE, [v, e, lay, 0, ps, ps - 8, full, full, False, []],
         b"z" * 16),
        ("write of nothing", m.Op.WRITE, [v, e, lay, 0, ps, 0, full, full, False, []], b""),
        ("write, odd page size", m.Op.WRITE, [v, e, lay, 0, ps - 1, 0, full, full, False, []],
         b"z" * 16),
        ("create, short payload", m.Op.CREATE_IF_ABSENT, [v, e, lay, 5, ps, full, False, []],
         b"z" * (ps - 1)),
        ("create, long payload", m.Op.CREATE_IF_ABSENT, [v, e, lay, 5, ps, full, False, []],
         b"z" * (ps + 1)),
        ("zero create with payload", m.Op.CREATE_IF_ABSENT, [v, e, lay, 5, ps, full, True, []],
         b"z"),
        ("layer's page size differs", m.Op.WRITE,
         [v, e, lay, 0, 2 * ps, 0, full, full, False, []], b"z" * 16),
        ("layer's volume differs", m.Op.WRITE, [v + 1, e, lay, 0, ps, 0, full, full, False, []],
         b"z" * 16),
        ("layer's page size differs, create", m.Op.CREATE_IF_ABSENT,
         [v, e, lay, 5, 2 * ps, full, True, []], b""),
        ("enumerate nothing", m.Op.ENUMERATE, [v, e, lay, 1, 0, 0], b""),
        ("enumerate unknown kind", m.Op.ENUMERATE, [v, e, lay, 9, 0, 10], b""),
        ("fence above epoch", m.Op.SET_EPOCH, [5, [[v, 6]]], b""),
    ]  # fmt: skip

    async def main() -> None:
        conn = await RawConn.open(server.port)
        try:
            await conn.handshake(key)
            created = await conn.call(create_req(LAYER, 0, zero=False), data)
            assert created.status == OK
            client = await connect(server, key)
            try:
                before = await status(client, LAYER, [0, 5])
                present = await enumerate_pages(client, LAYER, m.EnumerateWhat.PRESENT)
                for name, op, fields, payload in bad:
                    header = bytes(msgpack.packb(fields, use_bin_type=True))
                    rid = conn.send(op, header, payload)
                    answer = await conn.next_frame()
                    assert answer is not None, f"{name}: connection closed"
                    assert answer.request_id == rid
                    assert answer.status == BAD, f"{name}: status {answer.status}"
                    pong = await conn.call(m.PingRequest())  # the connection still works
                    assert pong.status == OK
                _, got = await read_page(client, LAYER, 0)
                assert got == data
                assert await status(client, LAYER, [0, 5]) == before
                assert await enumerate_pages(client, LAYER, m.EnumerateWhat.PRESENT) == present
                reply = await client.call(m.PingRequest())
                assert isinstance(reply, m.PingResponse)
                assert reply.epoch == EPOCH
            finally:
                client.close()
        finally:
            conn.close()

    run(main())
    assert server.alive()


@pytest.mark.parametrize("page", [2**43, 2**64 - 1])
def test_page_index_past_any_file_offset_is_bad_request(
    server: StorageProcess, key: bytes, page: int
) -> None:
    """A page past the bytes a layer can address is refused BAD_REQUEST, leaving no page."""
    data = random.Random(9).randbytes(PAGE_SIZE)
    v, e, full = VOLUME, EPOCH, m.FULL_MASK
    create = [v, e, LAYER, page, PAGE_SIZE, full, False, []]
    write = [v, e, LAYER, page, PAGE_SIZE, 0, full, full, False, []]
    # the client library refuses to build these; the server must refuse them on the wire
    with pytest.raises(ProtocolError, match="beyond"):
        m.CreateRequest(v, e, LAYER, page, PAGE_SIZE, full, False)

    async def main() -> None:
        conn = await RawConn.open(server.port)
        try:
            await conn.handshake(key)
            for op, fields in ((m.Op.CREATE_IF_ABSENT, create), (m.Op.WRITE, write)):
                rid = conn.send(op, bytes(msgpack.packb(fields, use_bin_type=True)), data)
                answer = await conn.next_frame()
                assert answer is not None
                assert answer.request_id == rid
                assert answer.status == BAD
            client = await connect(server, key)
            try:
                pages = await enumerate_pages(client, LAYER, m.EnumerateWhat.PRESENT)
                assert pages == [], "a refused write left a page behind"
            finally:
                client.close()
        finally:
            conn.close()

    run(main())
    assert server.alive()

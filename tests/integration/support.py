"""Helpers shared by the integration tests: connections, raw frames and page models."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from lamina.localcluster import StorageProcess, ensure_key, storage_servers
from lamina.storage.syncmask import FULL, clear_mask, restore_mask
from lamina.wire import handshake as hs
from lamina.wire import messages as m
from lamina.wire.connection import Client
from lamina.wire.framing import Frame, FrameDecoder, Kind, encode_frame

T = TypeVar("T")

VOLUME = 1
EPOCH = 1
PAGE_SIZE = 1 << 20
BLOCK = 4096
#: the masks copy 0 of a 2-copy layout sends: clear copy 1's bit, restore both
CLEAR_2 = clear_mask(0, 2)
RESTORE_2 = restore_mask({0, 1}, 2)
ZERO_PAGE = bytes(PAGE_SIZE)
#: statuses a server may answer garbage with; anything else (INTERNAL ...) is a defect
GARBAGE_STATUSES = frozenset({1, 9, 10, 11})


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run ``coro`` on a fresh event loop, failing it after ``timeout`` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


async def connect(proc: StorageProcess, key: bytes, timeout: float = 10.0) -> Client:
    return await Client.connect("127.0.0.1", proc.port, key, peer="itest", timeout=timeout)


def write_req(
    layer: int,
    page: int,
    offset: int,
    *,
    clear: int = FULL,
    restore: int = FULL,
    fua: bool = False,
) -> m.WriteRequest:
    return m.WriteRequest(VOLUME, EPOCH, layer, page, PAGE_SIZE, offset, clear, restore, fua)


def read_req(layer: int, page: int, offset: int = 0, length: int = PAGE_SIZE) -> m.ReadRequest:
    return m.ReadRequest(VOLUME, EPOCH, layer, page, PAGE_SIZE, offset, length)


def create_req(layer: int, page: int, *, zero: bool, mask: int = FULL) -> m.CreateRequest:
    return m.CreateRequest(VOLUME, EPOCH, layer, page, PAGE_SIZE, mask, zero)


async def read_page(client: Client, layer: int, page: int) -> tuple[m.ReadResponse, bytes]:
    """A whole page as the server reports it; ABSENT and ZERO pages read as zeros."""
    reply, data = await client.call_with_payload(read_req(layer, page))
    assert isinstance(reply, m.ReadResponse)
    if reply.state in (m.PageState.ABSENT, m.PageState.ZERO):
        assert data == b""
        return reply, ZERO_PAGE
    assert reply.state == m.PageState.PRESENT, reply
    assert len(data) == PAGE_SIZE
    return reply, bytes(data)


async def status(client: Client, layer: int, pages: list[int]) -> dict[int, m.StatusEntry]:
    out: dict[int, m.StatusEntry] = {}
    for i in range(0, len(pages), m.MAX_LIST):
        chunk = tuple(pages[i : i + m.MAX_LIST])
        reply = await client.call(m.StatusRequest(VOLUME, EPOCH, layer, chunk))
        assert isinstance(reply, m.StatusResponse)
        out.update({entry[0]: entry for entry in reply.entries})
    return out


async def enumerate_pages(client: Client, layer: int, what: m.EnumerateWhat) -> list[int]:
    """Every page ENUMERATE lists (bounded: at most 100 batches)."""
    found: list[int] = []
    start = 0
    for _ in range(100):
        reply = await client.call(m.EnumerateRequest(VOLUME, EPOCH, layer, int(what), start, 1000))
        assert isinstance(reply, m.EnumerateResponse)
        found.extend(reply.pages)
        if reply.done:
            return found
        start = reply.next_start
    raise AssertionError("ENUMERATE did not finish within 100 batches")


def tail(path: os.PathLike[str] | str, size: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"


class Cluster:
    """Storage processes under one root, sharing one cluster key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key_path = root / "cluster.key"
        self.key = ensure_key(self.key_path)
        self.procs: list[StorageProcess] = []

    def server(self, extra_args: list[str] | None = None, start: bool = True) -> StorageProcess:
        """A new storage server s<N> (started unless ``start`` is False)."""
        n = len(self.procs) + 1
        proc = storage_servers(self.root, n, extra_args)[-1]
        self.procs.append(proc)
        if start:
            proc.start()
        return proc

    def shutdown(self) -> None:
        for proc in self.procs:
            try:
                proc.stop(timeout=10)
            finally:
                proc.kill()
            print(f"--- {proc.id} log tail ({proc.log}) ---\n{tail(proc.log)}")


class RawConn:
    """A bare TCP connection that sends any bytes and decodes whatever frames come back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.ids = itertools.count(1)

    @classmethod
    async def open(cls, port: int, timeout: float = 10.0) -> RawConn:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, op: int, header: bytes, payload: bytes = b"", rid: int | None = None) -> int:
        """Send a request frame with any header; its request id."""
        rid = next(self.ids) if rid is None else rid
        self.writer.writelines(encode_frame(Kind.REQUEST, op, 0, rid, header, payload))
        return rid

    async def next_frame(self, timeout: float = 10.0) -> Frame | None:
        """The next frame from the server, or None once it closed the connection."""
        async with asyncio.timeout(timeout):
            for _ in range(100_000):  # 6.5 GB at most: far more than any answer
                frame = self.decoder.next_frame()
                if frame is not None:
                    return frame
                try:
                    data = await self.reader.read(1 << 16)
                except ConnectionError:
                    return None
                if not data:
                    return None
                self.decoder.feed(data)
        raise AssertionError("no complete frame in 100,000 reads")

    async def call(self, msg: m.Message, payload: bytes = b"", timeout: float = 10.0) -> Frame:
        """Send a valid request and return the answer frame with its request id."""
        rid = self.send(msg.OP, msg.encode(), payload)
        frame = await self.next_frame(timeout)
        assert frame is not None, "server closed the connection"
        assert frame.kind == Kind.RESPONSE
        assert frame.request_id == rid
        return frame

    async def handshake(self, key: bytes, proof_key: bytes | None = None) -> Frame:
        """HELLO then AUTH; AUTH's proof is made with ``proof_key`` (default ``key``)."""
        nonce = hs.new_nonce()
        lo, hi = hs.SUPPORTED_VERSIONS
        frame = await self.call(m.HelloRequest(lo, hi, nonce, "raw"))
        hello = m.decode_response(frame.op, frame.header)
        assert isinstance(hello, m.HelloResponse)
        hs.check_proof(hs.server_proof(key, nonce, hello.nonce), hello.proof)
        proof = hs.client_proof(proof_key or key, hello.nonce, nonce)
        return await self.call(m.AuthRequest(proof))

    async def frames_until_closed(self, timeout: float = 10.0) -> list[Frame]:
        """Every frame until the server closes the connection (bounded by ``timeout``)."""
        frames: list[Frame] = []
        async with asyncio.timeout(timeout):
            for _ in range(1000):
                frame = await self.next_frame(timeout)
                if frame is None:
                    return frames
                frames.append(frame)
        raise AssertionError("server sent 1000 frames without closing")

    async def half_close(self) -> None:
        """Tell the server we are done sending (it closes its side when it sees EOF)."""
        with contextlib.suppress(OSError):
            await self.writer.drain()
            if self.writer.can_write_eof():
                self.writer.write_eof()

    def close(self) -> None:
        self.writer.close()

"""The asyncio NBD server over a memory backend, driven by real NBD clients.

The server runs on its own event loop in a background thread; nbdinfo, qemu-io, qemu-img
and a few raw sockets talk to it from this thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from lamina.errors import NoSpace, StorageIOError
from lamina.nbd.protocol import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    ClientFlag,
    Command,
    NbdErrno,
    Option,
    OptionReply,
)
from lamina.nbd.server import BlockBackend, MemoryBackend, serve_nbd

pytestmark = pytest.mark.integration

SIZE = 64 * 1024 * 1024
NAME = "vol"
TIMEOUT = 20.0
T = TypeVar("T")


class FailingBackend(MemoryBackend):
    """Writes at offset 0 run out of space; reads at offset 0 fail with an I/O error."""

    async def read(self, offset: int, length: int) -> bytes:
        if offset == 0:
            raise StorageIOError("disk on fire")
        return await super().read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        if offset == 0:
            raise NoSpace("disk full")
        await super().write(offset, data, fua)


class NbdThread:
    """An NBD server on 127.0.0.1, port 0, served by an event loop in its own thread."""

    def __init__(self, exports: dict[str, BlockBackend]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(serve_nbd(exports, "127.0.0.1", 0))
        self.port: int = self.server.sockets[0].getsockname()[1]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def url(self, name: str = NAME) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await asyncio.wait_for(self.server.wait_closed(), TIMEOUT)

        try:
            self.run(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(TIMEOUT)
            self.loop.close()


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend(SIZE)


@pytest.fixture
def nbd(backend: MemoryBackend) -> Iterator[NbdThread]:
    srv = NbdThread({NAME: backend})
    try:
        yield srv
    finally:
        srv.stop()


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def qemu_io(url: str, *commands: str) -> subprocess.CompletedProcess[str]:
    cmd = [tool("qemu-io"), "-f", "raw", url]
    for c in commands:
        cmd += ["-c", c]
    return run(*cmd)


# -- a minimal raw client, for what real clients check before sending -------------------


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "server closed the connection"
        buf += chunk
    return bytes(buf)


def raw_connect(port: int, name: str = NAME) -> socket.socket:
    """Connect and negotiate with NBD_OPT_GO; the socket is then in transmission."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    magic, opt_magic, _flags = struct.unpack(">QQH", recv_exactly(sock, 18))
    assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
    sock.sendall(struct.pack(">I", ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES))
    raw = name.encode()
    payload = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", IHAVEOPT, Option.GO, len(payload)) + payload)
    while True:
        rmagic, _opt, rtype, rlen = struct.unpack(">QIII", recv_exactly(sock, 20))
        assert rmagic == OPTION_REPLY_MAGIC
        recv_exactly(sock, rlen)
        if rtype == OptionReply.ACK:
            return sock
        assert rtype == OptionReply.INFO, rtype


def send_request(
    sock: socket.socket, handle: int, cmd: Command, offset: int, length: int, data: bytes = b""
) -> None:
    sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, handle, offset, length) + data)


def recv_reply(sock: socket.socket) -> tuple[int, int]:
    """(handle, error) of the next simple reply."""
    magic, error, handle = struct.unpack(">IIQ", recv_exactly(sock, 16))
    assert magic == SIMPLE_REPLY_MAGIC
    return handle, error


# -- tests ---------------------------------------------------------------------------------


def test_nbdinfo_shows_size_and_export_name(nbd: NbdThread) -> None:
    """nbdinfo --json reports the export's name and its 64 MiB size."""
    done = run(tool("nbdinfo"), "--json", nbd.url())
    assert done.returncode == 0, done.stderr
    exports = json.loads(done.stdout)["exports"]
    assert len(exports) == 1
    assert exports[0]["export-name"] == NAME
    assert exports[0]["export-size"] == SIZE
    assert exports[0]["is_read_only"] is False


def test_qemu_io_unaligned_write_then_read_matches_backend(
    nbd: NbdThread, backend: MemoryBackend
) -> None:
    """An unaligned qemu-io write reads back, its neighbours stay zero, and the backend agrees."""
    done = qemu_io(
        nbd.url(),
        "write -P 0xab 1000 5000",
        "read -P 0xab 1000 5000",
        "read -P 0 0 1000",
        "read -P 0 6000 2192",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Pattern verification failed" not in done.stdout
    stored = nbd.run(backend.read(0, 8192))
    assert stored == bytes(1000) + b"\xab" * 5000 + bytes(8192 - 6000)


def test_qemu_img_convert_round_trip_is_bit_exact(
    nbd: NbdThread, backend: MemoryBackend, tmp_path: Path
) -> None:
    """A 16 MiB random image converted into the export and back out is unchanged."""
    qemu_img = tool("qemu-img")
    src = tmp_path / "src.raw"
    data = os.urandom(16 * 1024 * 1024)
    src.write_bytes(data)
    done = run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), nbd.url())
    assert done.returncode == 0, done.stderr
    assert nbd.run(backend.read(0, len(data))) == data
    out = tmp_path / "out.raw"
    done = run(qemu_img, "convert", "-f", "raw", "-O", "raw", nbd.url(), str(out))
    assert done.returncode == 0, done.stderr
    copied = out.read_bytes()
    assert len(copied) == SIZE
    assert copied[: len(data)] == data
    assert copied[len(data) :] == bytes(SIZE - len(data))


def test_qemu_io_read_past_end_fails_and_server_keeps_serving(nbd: NbdThread) -> None:
    """qemu-io reports an error for a read past the end, and later clients are still served."""
    done = qemu_io(nbd.url(), f"read {SIZE - 512} 1024")
    assert done.returncode != 0 or "read failed" in done.stdout, done.stdout + done.stderr
    assert "error" in (done.stdout + done.stderr).lower(), done.stdout + done.stderr
    done = qemu_io(nbd.url(), "write -P 0x5a 0 512", "read -P 0x5a 0 512")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Pattern verification failed" not in done.stdout


def test_raw_read_past_end_gets_einval_and_connection_goes_on(nbd: NbdThread) -> None:
    """A read past the end sent on the wire gets EINVAL, and the same connection still reads."""
    with raw_connect(nbd.port) as sock:
        send_request(sock, 1, Command.READ, SIZE - 512, 1024)
        assert recv_reply(sock) == (1, NbdErrno.EINVAL)
        send_request(sock, 2, Command.READ, SIZE - 512, 512)
        assert recv_reply(sock) == (2, 0)
        assert recv_exactly(sock, 512) == bytes(512)
        send_request(sock, 3, Command.DISC, 0, 0)
        assert sock.recv(1) == b""


def test_backend_errors_map_to_nbd_errors() -> None:
    """NoSpace from the backend becomes ENOSPC and an I/O error EIO, without closing."""
    srv = NbdThread({NAME: FailingBackend(1 << 20)})
    try:
        with raw_connect(srv.port) as sock:
            send_request(sock, 7, Command.WRITE, 0, 4, b"abcd")
            assert recv_reply(sock) == (7, NbdErrno.ENOSPC)
            send_request(sock, 8, Command.READ, 0, 4)
            assert recv_reply(sock) == (8, NbdErrno.EIO)
            send_request(sock, 9, Command.WRITE, 4096, 4, b"abcd")
            assert recv_reply(sock) == (9, 0)
            send_request(sock, 10, Command.FLUSH, 0, 0)
            assert recv_reply(sock) == (10, 0)
    finally:
        srv.stop()


def test_pipelined_requests_are_all_answered(nbd: NbdThread) -> None:
    """Two hundred requests sent at once on one connection each get exactly one reply."""
    n = 200
    with raw_connect(nbd.port) as sock:
        batch = b"".join(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Command.WRITE, h, h * 4096, 4096)
            + bytes([h % 256]) * 4096
            for h in range(n)
        )
        sock.sendall(batch)
        handles = set()
        for _ in range(n):
            handle, error = recv_reply(sock)
            assert error == 0
            handles.add(handle)
        assert handles == set(range(n))
        send_request(sock, n, Command.READ, 199 * 4096, 4096)
        assert recv_reply(sock) == (n, 0)
        assert recv_exactly(sock, 4096) == bytes([199]) * 4096


def test_undrained_large_reads_pause_and_resume(nbd: NbdThread, backend: MemoryBackend) -> None:
    """Ninety-six 1 MiB reads sent before any reply is read all arrive, intact."""
    n, chunk = 96, 1 << 20
    pattern = bytes(range(256)) * (chunk // 256)
    nbd.run(backend.write(5 * chunk, pattern, fua=False))
    with raw_connect(nbd.port) as sock:
        sock.sendall(
            b"".join(
                struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Command.READ, h, 5 * chunk, chunk)
                for h in range(n)
            )
        )
        time.sleep(0.3)  # let the server's write buffer fill up before anything is read
        handles = set()
        for _ in range(n):
            handle, error = recv_reply(sock)
            assert error == 0
            assert recv_exactly(sock, chunk) == pattern
            handles.add(handle)
        assert handles == set(range(n))

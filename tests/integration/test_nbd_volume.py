"""`lamina nbd` on a real local cluster, driven by real NBD clients.

One cluster (one manager, two storage servers) serves the whole module; each test makes
its own volumes (two replicas, striped over two partitions, 1 MiB pages: every page
boundary is a stripe boundary) and exports them with `lamina nbd` processes.  qemu-img,
qemu-io, fio, nbdinfo, nbdcopy and the e2fsprogs move and check the bytes; a raw socket
checks the NBD error codes the clients never let through.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.nbd.protocol import Command, NbdErrno
from tests.integration.test_nbd_memory import (
    raw_connect,
    recv_exactly,
    recv_reply,
    send_request,
    tool,
)
from tests.integration.volumes import Exporter, LocalCluster, MiB, local_cluster

pytestmark = pytest.mark.integration

TIMEOUT = 180.0


@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with local_cluster(tmp_path_factory.mktemp("nbdvol"), 1, 2) as cluster:
        yield cluster


# -- helpers -------------------------------------------------------------------------------


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=TIMEOUT, check=False,
        cwd=cwd,
    )  # fmt: skip


def ok(done: subprocess.CompletedProcess[str]) -> str:
    """The output of a command that must have succeeded."""
    assert done.returncode == 0, f"{done.args} exited {done.returncode}: {done.stdout}{done.stderr}"
    return done.stdout


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [tool("qemu-io"), *(["-r"] if read_only else []), "-f", "raw", uri]
    for c in commands:
        cmd += ["-c", c]
    return run(*cmd)


def qemu_io_ok(uri: str, *commands: str, read_only: bool = False) -> None:
    out = ok(qemu_io(uri, *commands, read_only=read_only))
    assert "Pattern verification failed" not in out, out
    assert "failed" not in out, out


def copy_out(uri: str, dest: Path) -> bytes:
    """The whole export, read with qemu-img convert."""
    ok(run(tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", uri, dest))
    return dest.read_bytes()


def copy_in(src: Path, uri: str) -> None:
    ok(run(tool("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", src, uri))


def random_bytes_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        for _ in range(0, size, MiB):
            f.write(os.urandom(MiB))
    return path


def assert_same(actual: bytes, expected: bytes) -> None:
    """Equal bytes; on a difference, the first offset that differs (not a huge diff)."""
    assert len(actual) == len(expected), f"{len(actual)} bytes, expected {len(expected)}"
    if actual != expected:
        first = next(i for i, (a, b) in enumerate(zip(actual, expected, strict=True)) if a != b)
        raise AssertionError(
            f"bytes differ from offset {first}: "
            f"{actual[first : first + 16].hex()} != {expected[first : first + 16].hex()}"
        )


def nbdinfo(uri: str) -> dict[str, object]:
    """nbdinfo --json of the one export ``uri`` names."""
    exports = json.loads(ok(run(tool("nbdinfo"), "--json", uri)))["exports"]
    assert len(exports) == 1, exports
    info: dict[str, object] = exports[0]
    return info


@contextlib.contextmanager
def exported(
    lc: LocalCluster, volume: str, *extra: str, socket: Path | None = None
) -> Iterator[Exporter]:
    """`lamina nbd VOLUME` for the block; afterwards it must stop cleanly on SIGTERM."""
    exporter = lc.export(volume, *extra, socket=socket)
    try:
        yield exporter
    except BaseException:
        exporter.kill()
        raise
    code = exporter.stop()
    assert code == 0, f"lamina nbd exited {code}: {exporter.log_text()}"


class Model:
    """What a volume should hold: runs of one byte value, painted by the writes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.runs: list[tuple[int, int, int]] = [(0, size, 0)]  # (start, end, byte)

    def paint(self, offset: int, length: int, byte: int) -> None:
        end = offset + length
        out: list[tuple[int, int, int]] = []
        for s, e, b in self.runs:
            if e <= offset or s >= end:
                out.append((s, e, b))
                continue
            if s < offset:
                out.append((s, offset, b))
            if e > end:
                out.append((end, e, b))
        out.append((offset, end, byte))
        self.runs = sorted(out)

    def bytes(self) -> bytes:
        return b"".join(bytes([b]) * (e - s) for s, e, b in self.runs)

    def read_checks(self) -> list[str]:
        """qemu-io commands that read every run back with its pattern."""
        return [f"read -P {b:#04x} {s} {e - s}" for s, e, b in self.runs]


# -- bulk copies ---------------------------------------------------------------------------


def test_qemu_img_convert_256mib_round_trip_is_bit_exact(lc: LocalCluster, tmp_path: Path) -> None:
    """256 MiB of random data converted into a striped, two-replica volume and back out
    into a new file is bit-exact."""
    size = 256 * MiB
    lc.create_volume("bulk", size, replicas=2, stripe=2)
    src = random_bytes_file(tmp_path / "src.raw", size)
    out = tmp_path / "out.raw"
    try:
        with exported(lc, "bulk") as exp:
            copy_in(src, exp.uri)
            ok(run(tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", exp.uri, out))
        assert out.stat().st_size == size
        done = run("cmp", src, out)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        src.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


def test_never_written_areas_read_as_zeros(lc: LocalCluster, tmp_path: Path) -> None:
    """A volume written in two places reads back (nbdcopy) as zeros everywhere else."""
    size = 64 * MiB
    lc.create_volume("sparse", size)
    model = Model(size)
    with exported(lc, "sparse") as exp:
        qemu_io_ok(exp.uri, f"write -P 0x5c {10 * MiB} {MiB}", f"write -P 0x3d {size - 5000} 3000")
        model.paint(10 * MiB, MiB, 0x5C)
        model.paint(size - 5000, 3000, 0x3D)
        out = tmp_path / "sparse.raw"
        ok(run(tool("nbdcopy"), exp.uri, out))
    assert_same(out.read_bytes(), model.bytes())


# -- unaligned I/O ---------------------------------------------------------------------------


def test_qemu_io_unaligned_patterns_across_page_and_stripe_boundaries(
    lc: LocalCluster, tmp_path: Path
) -> None:
    """Unaligned writes, some across one or several page (= stripe) boundaries, some
    overlapping, and zeroing writes read back with qemu-io patterns and as a whole."""
    size = 16 * MiB
    lc.create_volume("unaligned", size)
    model = Model(size)
    writes = [
        (0xAB, 4097, 12345),
        (0xCD, MiB - 6, 20),  # pages 0 and 1: the two partitions of the stripe
        (0x5E, 3 * MiB - 3, 2 * MiB + 7),  # pages 2, 3 and 4, partial at both ends
        (0x19, 4100, 3),  # inside the first write
        (0x2F, MiB + 10, 100),
        (0xE1, MiB + 50, 5000),  # overlaps the one before
        (0x77, size - 777, 777),  # up to the end of the volume
    ]
    with exported(lc, "unaligned") as exp:
        commands = []
        for byte, offset, length in writes:
            commands.append(f"write -P {byte:#04x} {offset} {length}")
            model.paint(offset, length, byte)
        commands.append(f"write -z {4 * MiB - 100} 300")  # WRITE_ZEROES across a boundary
        model.paint(4 * MiB - 100, 300, 0)
        qemu_io_ok(exp.uri, *commands)
        qemu_io_ok(exp.uri, *model.read_checks())

        # a wrong pattern must be reported, so the checks above can fail
        wrong = qemu_io(exp.uri, "read -P 0xac 4103 12339")
        assert wrong.returncode != 0, wrong.stdout
        assert "Pattern verification failed" in wrong.stdout, wrong.stdout + wrong.stderr
        wrong = qemu_io(exp.uri, f"read -P 0 {MiB - 10} 20")  # 0xcd from MiB - 6
        assert "Pattern verification failed" in wrong.stdout, wrong.stdout + wrong.stderr

        assert_same(copy_out(exp.uri, tmp_path / "unaligned.raw"), model.bytes())


# -- fio -------------------------------------------------------------------------------------


def fio(uri: str, cwd: Path, *extra: str) -> tuple[int, dict[str, object]]:
    """fio's nbd engine: random writes of 4-64 KiB, 16 in flight, over 64 MiB, verified
    by crc32c; the exit status and the job's JSON report."""
    report = cwd / "fio.json"
    report.unlink(missing_ok=True)
    done = run(
        tool("fio"), "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
        "--bsrange=4k-64k", "--iodepth=16", "--size=64M", "--verify=crc32c",
        "--verify_fatal=1", "--verify_state_save=0", "--output-format=json",
        f"--output={report}", *extra, cwd=cwd,
    )  # fmt: skip
    assert report.exists(), done.stdout + done.stderr
    job: dict[str, object] = json.loads(report.read_text())["jobs"][0]
    return done.returncode, job


def io_bytes(job: dict[str, object], direction: str) -> int:
    stats = job[direction]
    assert isinstance(stats, dict)
    return int(stats["io_bytes"])


def test_fio_random_writes_verify(lc: LocalCluster, tmp_path: Path) -> None:
    """fio writes 64 MiB at random (4-64 KiB, queue depth 16) and verifies it; a new
    exporter verifies it again; and the verification does catch changed data."""
    lc.create_volume("fio", 64 * MiB)
    with exported(lc, "fio") as exp:
        code, job = fio(exp.uri, tmp_path, "--do_verify=1")
        assert code == 0, job
        assert job["error"] == 0, job
        assert io_bytes(job, "write") == 64 * MiB
        assert io_bytes(job, "read") == 64 * MiB  # the verification pass
    with exported(lc, "fio") as exp:
        code, job = fio(exp.uri, tmp_path, "--verify_only")
        assert (code, job["error"]) == (0, 0), job
        assert io_bytes(job, "read") == 64 * MiB
        qemu_io_ok(exp.uri, f"write -P 0x11 {8 * MiB} {MiB}")
        code, job = fio(exp.uri, tmp_path, "--verify_only")
        assert code != 0, job
        assert job["error"] != 0, job


# -- what clients see ------------------------------------------------------------------------


def test_nbdinfo_shows_size_and_read_only_flag(lc: LocalCluster) -> None:
    """nbdinfo shows the volume's size, under both export names, and the read-only bit
    of a --read-only export beside a read-write one."""
    size = 40 * MiB
    lc.create_volume("info", size)  # a read-only export of it at once: no wait needed
    with exported(lc, "info", "--read-only") as ro, exported(lc, "info") as rw:
        info = nbdinfo(ro.uri)
        assert (info["export-size"], info["is_read_only"]) == (size, True), info
        info = nbdinfo(rw.uri)
        assert (info["export-size"], info["is_read_only"]) == (size, False), info
        info = nbdinfo(f"{rw.uri}/info")
        assert (info["export-name"], info["export-size"]) == ("info", size), info
        assert nbdinfo(f"{ro.uri}/info")["is_read_only"] is True
        missing = run(tool("nbdinfo"), "--json", f"{rw.uri}/other")
        assert missing.returncode != 0, missing.stdout


def test_ext4_image_round_trip_fsck_clean_and_bit_exact(lc: LocalCluster, tmp_path: Path) -> None:
    """An ext4 image with files in it, copied into a volume and back out through a new
    (read-only) exporter, is bit-exact, fsck-clean and its files read back."""
    size = 128 * MiB
    image = tmp_path / "fs.img"
    ok(run("truncate", "-s", str(size), image))
    ok(run(tool("mkfs.ext4"), "-F", "-q", image))
    payload = random_bytes_file(tmp_path / "payload.bin", 3 * MiB)
    (tmp_path / "hello.txt").write_text("hello from lamina\n")
    for name in ("payload.bin", "hello.txt"):
        done = run(tool("debugfs"), "-w", "-R", f"write {tmp_path / name} {name}", image)
        ok(done)
        assert "rror" not in done.stderr, done.stderr
    ok(run(tool("e2fsck"), "-fn", image))

    lc.create_volume("ext4", size)
    with exported(lc, "ext4") as exp:
        copy_in(image, exp.uri)
    back = tmp_path / "back.img"
    with exported(lc, "ext4", "--read-only") as exp:
        copy_out(exp.uri, back)
    fsck = run(tool("e2fsck"), "-fn", back)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert_same(back.read_bytes(), image.read_bytes())
    dumped = tmp_path / "dumped.bin"
    ok(run(tool("debugfs"), "-R", f"dump payload.bin {dumped}", back))
    assert_same(dumped.read_bytes(), payload.read_bytes())


# -- the exclusive lock ----------------------------------------------------------------------


def test_second_writer_is_refused_naming_the_holder_and_readers_attach(lc: LocalCluster) -> None:
    """A second read-write `lamina nbd` exits 1 naming the holder's host and pid; a
    --read-only export attaches meanwhile and sees the holder's writes; once the holder
    stops, a new writer attaches."""
    lc.create_volume("excl", 16 * MiB)
    with exported(lc, "excl") as holder:
        qemu_io_ok(holder.uri, f"write -P 0x42 0 {MiB}")
        second = lc.cli("nbd", "excl", "--listen", "127.0.0.1:0", timeout=60)
        assert second.returncode == 1, second.stdout + second.stderr
        message = second.stderr
        assert "locked" in message, message
        assert socket.gethostname() in message, message
        assert f"pid {holder.proc.pid}" in message, message
        assert "Traceback" not in message, message

        with exported(lc, "excl", "--read-only") as reader:
            assert nbdinfo(reader.uri)["is_read_only"] is True
            qemu_io_ok(reader.uri, f"read -P 0x42 0 {MiB}", read_only=True)
            qemu_io_ok(holder.uri, f"write -P 0x43 {MiB - 512} 1024")
            qemu_io_ok(reader.uri, f"read -P 0x43 {MiB - 512} 1024", read_only=True)
    with exported(lc, "excl") as writer:
        qemu_io_ok(writer.uri, "read -P 0x42 0 512", "write -P 0x44 0 512", "read -P 0x44 0 512")


def test_takeover_makes_the_old_exports_writes_fail(lc: LocalCluster) -> None:
    """`lamina nbd --takeover` attaches while another export holds the volume; the old
    export's writes then fail, its reads go on, and the new holder's writes land."""
    lc.create_volume("taken", 8 * MiB)
    with exported(lc, "taken") as old:
        qemu_io_ok(old.uri, "write -P 0x61 0 4096")
        with exported(lc, "taken", "--takeover") as new:
            refused = qemu_io(old.uri, "write -P 0x62 0 4096")
            assert refused.returncode != 0, refused.stdout
            assert "write failed" in refused.stdout + refused.stderr, refused.stdout
            qemu_io_ok(old.uri, "read -P 0x61 0 4096", read_only=True)
            qemu_io_ok(new.uri, "read -P 0x61 0 4096", "write -P 0x63 0 4096")
            qemu_io_ok(old.uri, "read -P 0x63 0 4096", read_only=True)


# -- errors over NBD -------------------------------------------------------------------------


def test_errors_over_nbd_leave_the_export_usable(lc: LocalCluster, tmp_path: Path) -> None:
    """A read past the end gets EINVAL and a write past it ENOSPC, on a connection that
    goes on; a --read-only export answers EPERM to every change and changes nothing."""
    size = 8 * MiB
    lc.create_volume("errors", size)
    tail = bytes(range(256)) * 2
    with exported(lc, "errors") as exp:
        with raw_connect(exp.port, "errors") as sock:
            send_request(sock, 1, Command.WRITE, size - 512, 512, tail)
            assert recv_reply(sock) == (1, 0)
            send_request(sock, 2, Command.READ, size - 512, 1024)
            assert recv_reply(sock) == (2, NbdErrno.EINVAL)
            send_request(sock, 3, Command.WRITE, size - 256, 512, bytes(512))
            assert recv_reply(sock) == (3, NbdErrno.ENOSPC)
            send_request(sock, 4, Command.READ, size - 512, 512)
            assert recv_reply(sock) == (4, 0)
            assert recv_exactly(sock, 512) == tail
            send_request(sock, 5, Command.DISC, 0, 0)
            assert sock.recv(1) == b""
        past = qemu_io(exp.uri, f"read {size - 512} 1024")
        assert past.returncode != 0, past.stdout
        assert "read failed" in past.stdout + past.stderr, past.stdout + past.stderr
        qemu_io_ok(exp.uri, "write -P 0x21 0 4096", "read -P 0x21 0 4096")

    with exported(lc, "errors", "--read-only") as ro:
        with raw_connect(ro.port, "errors") as sock:
            send_request(sock, 1, Command.WRITE, 0, 4096, b"\xee" * 4096)
            assert recv_reply(sock) == (1, NbdErrno.EPERM)
            send_request(sock, 2, Command.WRITE_ZEROES, size - 512, 512)
            assert recv_reply(sock) == (2, NbdErrno.EPERM)
            send_request(sock, 3, Command.TRIM, 0, 4096)
            assert recv_reply(sock) == (3, NbdErrno.EPERM)
            send_request(sock, 4, Command.READ, 0, 4096)
            assert recv_reply(sock) == (4, 0)
            assert recv_exactly(sock, 4096) == b"\x21" * 4096
            send_request(sock, 5, Command.READ, size - 512, 512)
            assert recv_reply(sock) == (5, 0)
            assert recv_exactly(sock, 512) == tail
        junk = tmp_path / "junk.raw"
        junk.write_bytes(b"\xee" * size)
        refused = run(tool("nbdcopy"), junk, ro.uri)
        assert refused.returncode != 0, refused.stdout + refused.stderr
        qemu_io_ok(ro.uri, "read -P 0x21 0 4096", read_only=True)


# -- the command line ------------------------------------------------------------------------


def test_bad_nbd_arguments_fail_clearly(lc: LocalCluster, tmp_path: Path) -> None:
    """An unknown volume exits 1 naming it; contradictory options are usage errors (2)."""
    readers: list[tuple[str, ...]] = [(), ("--read-only",)]
    for extra in readers:
        done = lc.cli("nbd", "no-such-volume", "--listen", "127.0.0.1:0", *extra, timeout=60)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "no-such-volume" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
    usage = [
        ("--listen", "127.0.0.1:0", "--socket", str(tmp_path / "s.sock")),
        ("--read-only", "--takeover"),
        ("--listen", "nowhere"),
    ]
    for extra in usage:
        done = lc.cli("nbd", "any-volume", *extra, timeout=60)
        assert done.returncode == 2, (extra, done.stdout + done.stderr)
        assert "Usage:" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "s.sock").exists()


def test_unix_socket_export(lc: LocalCluster, tmp_path: Path) -> None:
    """`lamina nbd --socket PATH` serves nbd+unix clients and removes the socket on exit."""
    size = 24 * MiB
    lc.create_volume("unix", size)
    path = tmp_path / "unix.sock"
    with exported(lc, "unix", socket=path) as exp:
        assert exp.uri == f"nbd+unix:///?socket={path}"
        info = nbdinfo(exp.uri)
        assert (info["export-size"], info["is_read_only"]) == (size, False), info
        info = nbdinfo(f"nbd+unix:///unix?socket={path}")
        assert (info["export-name"], info["export-size"]) == ("unix", size), info
        qemu_io_ok(exp.uri, f"write -P 0x9a {MiB - 100} 200", f"read -P 0x9a {MiB - 100} 200")
    assert not path.exists()

"""The disk that can lose power (lamina.storage.powerloss): what survives a power cut."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lamina.storage.files import OS_FILES
from lamina.storage.powerloss import BLOCK, PowerLossFiles, seed_keeping

RW = os.O_RDWR | os.O_CREAT


def disk(tmp: Path) -> tuple[PowerLossFiles, Path]:
    root = tmp / "d"
    root.mkdir(parents=True, exist_ok=True)
    return PowerLossFiles(tmp / "trash"), root


def blocks_of(data: bytes) -> list[bytes]:
    return [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]


def test_reads_see_unsynced_writes_and_the_real_file_does_not(tmp_path: Path) -> None:
    """Before a sync, reads see every write (at any alignment) but the real file holds none."""
    files, root = disk(tmp_path)
    fd = files.open(root / "f", RW)
    files.pwrite(fd, b"a" * 3 * BLOCK, 0)
    files.fdatasync(fd)
    files.pwrite(fd, b"xyz", BLOCK - 1)
    files.pwrite(fd, b"tail", 3 * BLOCK + 10)
    files.punch(fd, 2 * BLOCK, BLOCK)
    expected = bytearray(b"a" * 3 * BLOCK + bytes(10) + b"tail")
    expected[BLOCK - 1 : BLOCK + 2] = b"xyz"
    expected[2 * BLOCK : 3 * BLOCK] = bytes(BLOCK)
    assert files.size(fd) == len(expected)
    assert files.pread(fd, len(expected) + 100, 0) == expected
    assert files.pread(fd, 7, BLOCK - 3) == expected[BLOCK - 3 : BLOCK + 4]
    assert (root / "f").read_bytes() == b"a" * 3 * BLOCK
    files.fdatasync(fd)
    assert (root / "f").read_bytes() == expected
    files.close(fd)


def test_synced_data_survives_and_unsynced_is_dropped_by_a_cut_that_keeps_nothing(
    tmp_path: Path,
) -> None:
    """A power cut never loses synced blocks; one that keeps nothing drops every other write."""
    seed = seed_keeping(0.0, 0.0)
    files, root = disk(tmp_path)
    fd = files.open(root / "f", RW)
    files.pwrite(fd, b"s" * 2 * BLOCK, 0)
    files.fdatasync(fd)
    files.fsync_dir(root)
    files.pwrite(fd, b"u" * BLOCK, BLOCK)
    assert files.unsynced_blocks() == 1
    files.power_cut(seed)
    assert (root / "f").read_bytes() == b"s" * 2 * BLOCK


@settings(max_examples=40, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, 6 * BLOCK), st.integers(1, 3 * BLOCK), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(0, 2**32),
)
def test_a_cut_keeps_each_block_whole_from_one_of_its_versions(
    tmp_path_factory: pytest.TempPathFactory,
    writes: list[tuple[int, int, int]],
    seed: int,
) -> None:
    """After a cut every 4 KiB block holds one version it had since the last sync, whole."""
    files, root = disk(tmp_path_factory.mktemp("cut"))
    size = 10 * BLOCK
    fd = files.open(root / "f", RW)
    files.pwrite(fd, bytes(size), 0)
    files.fdatasync(fd)
    files.fsync_dir(root)
    image = bytearray(size)
    versions = [{bytes(BLOCK)} for _ in range(size // BLOCK)]
    for offset, length, byte in writes:
        files.pwrite(fd, bytes([byte]) * length, offset)
        image[offset : offset + length] = bytes([byte]) * length
        for b in range(offset // BLOCK, -(-(offset + length) // BLOCK)):
            versions[b].add(bytes(image[b * BLOCK : (b + 1) * BLOCK]))
    # only the block as it last stood is in the cache (a page cache holds no history)
    last = [bytes(image[b * BLOCK : (b + 1) * BLOCK]) for b in range(size // BLOCK)]
    files.power_cut(seed)
    after = (root / "f").read_bytes()
    assert len(after) == size
    for b, blk in enumerate(blocks_of(after)):
        assert blk in (bytes(BLOCK), last[b]), b
        assert blk in versions[b]


def test_a_created_name_not_dir_synced_may_vanish_and_a_synced_one_stays(tmp_path: Path) -> None:
    """A file created but not covered by a directory fsync is lost by some cuts, kept by
    others; once the directory is fsynced, every cut keeps it."""
    outcomes = set()
    for seed in range(30):
        files, root = disk(tmp_path / str(seed))
        fd = files.open(root / "new", RW)
        files.pwrite(fd, b"data", 0)
        files.fdatasync(fd)
        files.close(fd)
        fd = files.open(root / "kept", RW)
        files.fsync_dir(root)
        files.close(fd)
        fd = files.open(root / "lost-or-not", RW)
        files.close(fd)
        files.power_cut(seed)
        assert (root / "new").read_bytes() == b"data"
        assert (root / "kept").exists()
        outcomes.add((root / "lost-or-not").exists())
    assert outcomes == {True, False}


def test_rename_and_unlink_are_undone_unless_dir_synced(tmp_path: Path) -> None:
    """An unsynced rename over a file and an unsynced unlink are each either done or undone,
    in order (a prefix of the changes survives), with the replaced contents intact."""
    seen = set()
    for seed in range(40):
        files, root = disk(tmp_path / str(seed))
        for name, text in (("old", b"old"), ("victim", b"victim")):
            files.write_file(root / name, text, durable=True)
        files.fsync_dir(root)
        files.write_file(root / "old.tmp", b"new", durable=True)
        files.replace(root / "old.tmp", root / "old")
        files.unlink(root / "victim")
        assert sorted(p.name for p in root.iterdir()) == ["old"]
        files.power_cut(seed)
        names = tuple(sorted(p.name for p in root.iterdir()))
        content = (root / "old").read_bytes()
        # changes: create old.tmp, rename it over old, unlink victim; a prefix survives
        if "victim" not in names:  # all three
            assert (names, content) == (("old",), b"new")
        elif "old.tmp" in names:  # only the create
            assert content == b"old"
            assert (root / "old.tmp").read_bytes() == b"new"
        else:  # none, or the create and the rename
            assert content in (b"old", b"new")
        if "victim" in names:
            assert (root / "victim").read_bytes() == b"victim"
        seen.add((names, content))
    assert len(seen) == 4
    assert not any(p.is_file() for p in (tmp_path / "0" / "trash").iterdir())


def test_after_a_cut_every_call_fails(tmp_path: Path) -> None:
    """Once the power is off, nothing the process still does reaches the files."""
    files, root = disk(tmp_path)
    fd = files.open(root / "f", RW)
    files.power_cut(1)
    for call in (
        lambda: files.pwrite(fd, b"x", 0),
        lambda: files.pread(fd, 1, 0),
        lambda: files.fdatasync(fd),
        lambda: files.open(root / "g", RW),
        lambda: files.unlink(root / "f"),
    ):
        with pytest.raises(OSError, match="power is off") as exc:
            call()
        assert exc.value.errno == errno.EIO
    files.close(fd)  # closing is harmless
    assert not (root / "g").exists()


def test_failed_sync_raises_eio_and_drops_the_cached_blocks(tmp_path: Path) -> None:
    """With fail_syncs, fdatasync fails with EIO and the unsynced blocks are gone for good,
    as Linux drops the pages of a failed writeback."""
    files, root = disk(tmp_path)
    fd = files.open(root / "f", RW)
    files.pwrite(fd, b"a" * BLOCK, 0)
    files.fdatasync(fd)
    files.pwrite(fd, b"b" * BLOCK, 0)
    files.fail_syncs = True
    with pytest.raises(OSError, match="injected") as exc:
        files.fdatasync(fd)
    assert exc.value.errno == errno.EIO
    assert files.pread(fd, BLOCK, 0) == b"a" * BLOCK
    assert OS_FILES.read_file(root / "f") == b"a" * BLOCK

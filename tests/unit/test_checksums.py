"""Block checksums (lamina.storage.checksums)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from lamina.storage.checksums import BLOCK, ZERO_BLOCK_CRC, block_crcs, crc, zero_crcs


def _block(seed: int, head: bytes) -> bytes:
    """A block: pseudo-random bytes from ``seed`` (0: zeros) with ``head`` at its start."""
    body = random.Random(seed).randbytes(BLOCK) if seed else bytes(BLOCK)
    return head + body[len(head) :]


# whole 4 KiB blocks are too big for hypothesis to draw byte by byte: seed them instead
blocks = st.builds(_block, st.integers(0, 2**32 - 1), st.binary(max_size=16))


def test_crc_is_crc32c() -> None:
    """crc is CRC-32C (Castagnoli): the standard check value of "123456789" is 0xE3069283."""
    assert crc(b"123456789") == 0xE3069283
    assert crc(b"") == 0


@given(st.lists(blocks, max_size=6))
def test_block_crcs_of_concatenation_is_per_block_crc(parts: list[bytes]) -> None:
    """block_crcs of concatenated blocks equals the crc of each block, in order."""
    data = b"".join(parts)
    assert list(block_crcs(data)) == [crc(p) for p in parts]
    assert list(block_crcs(memoryview(data))) == [crc(p) for p in parts]


@given(st.integers(min_value=0, max_value=64))
def test_zero_crcs_match_zero_blocks(n: int) -> None:
    """zero_crcs(n) equals block_crcs of n zero blocks."""
    assert zero_crcs(n) == block_crcs(bytes(n * BLOCK))
    assert len(zero_crcs(n)) == n
    assert crc(bytes(BLOCK)) == ZERO_BLOCK_CRC


@given(st.lists(blocks, min_size=1, max_size=4), st.data())
def test_single_flipped_bit_changes_only_its_block(parts: list[bytes], data: st.DataObject) -> None:
    """Flipping one bit changes the crc of the block holding it and of no other block."""
    raw = bytearray(b"".join(parts))
    bit = data.draw(st.integers(min_value=0, max_value=len(raw) * 8 - 1))
    before = block_crcs(bytes(raw))
    raw[bit // 8] ^= 1 << (bit % 8)
    after = block_crcs(bytes(raw))
    hit = bit // 8 // BLOCK
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        assert (a != b) == (i == hit), i

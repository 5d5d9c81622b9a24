"""Block checksums: crc32c over each 4 KiB block of a page."""

from __future__ import annotations

from array import array

import crc32c

BLOCK = 4096
ZERO_BLOCK_CRC: int = crc32c.crc32c(bytes(BLOCK))


def block_crcs(data: bytes | bytearray | memoryview) -> array[int]:
    """The crc32c of each whole block of ``data`` (its length a multiple of BLOCK)."""
    view = memoryview(data)
    fn = crc32c.crc32c
    return array("I", [fn(view[i : i + BLOCK]) for i in range(0, len(view), BLOCK)])


def crc(data: bytes | memoryview) -> int:
    return int(crc32c.crc32c(data))


def zero_crcs(blocks: int) -> array[int]:
    return array("I", [ZERO_BLOCK_CRC]) * blocks

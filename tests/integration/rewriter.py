"""A writer that overwrites the same blocks again and again and remembers what was
acknowledged, for fault tests where fio's write-once verification cannot see a lost
update (an old write landing after a newer one of the same block).

    python tests/integration/rewriter.py write CLUSTER_FILE VOLUME STATE SWITCH STOP SETTLE
    python tests/integration/rewriter.py check CLUSTER_FILE VOLUME STATE

``write``: 8 writers write round after round over the *main* blocks (4 KiB each, 16 in
each of the first 4 pages); once the file SWITCH exists they go on over the *side* blocks
(16 others in the same pages) instead, so those pages stay busy while the main blocks
keep their last acknowledged round; once STOP exists (or after 60 s) they stop.  Block b
holds (round, b) repeated; the last acknowledged round of every block goes to the JSON
file STATE.  SETTLE seconds later (when anything still on its way to a server has
landed) every block is read back.  ``check``: read every block back against STATE.
Both print a JSON report ``{"rounds": ..., "errors": [...], "wrong": [[block, expected
round, found round], ...]}`` and exit 0 (the test judges the report).  Runs as its own
process, so a test can start it inside a network namespace.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time
from pathlib import Path

from lamina.client import Cluster
from lamina.client.driver import Volume

BLOCK = 4096
PAGES = 4
PER_PAGE = 16  # main blocks in each page, and as many side blocks between them
MAIN = PAGES * PER_PAGE  # blocks 0..MAIN-1 are main, MAIN..2*MAIN-1 side
WRITERS = 8
MiB = 1 << 20
STRIDE = MiB // PER_PAGE


def offset(block: int) -> int:
    side, b = divmod(block, MAIN)
    page, i = divmod(b, PER_PAGE)
    return page * MiB + i * STRIDE + side * (STRIDE // 2)


def content(round_: int, block: int) -> bytes:
    return struct.pack(">II", round_, block) * (BLOCK // 8)


def found_round(data: bytes, block: int) -> int:
    """The round a block's bytes were written in (-1: not any round's bytes)."""
    if data == bytes(BLOCK):
        return 0
    round_, b = struct.unpack(">II", data[:8])
    return round_ if b == block and data == content(round_, block) else -1


async def read_back(vol: Volume, acked: dict[int, int]) -> list[list[int]]:
    wrong = []
    for block, expected in sorted(acked.items()):
        got = found_round(await vol.read(offset(block), BLOCK), block)
        if got != expected:
            wrong.append([block, expected, got])
    return wrong


async def appeared(path: Path, deadline: float) -> None:
    while time.monotonic() < deadline and not await asyncio.to_thread(path.exists):
        await asyncio.sleep(0.05)


async def write(
    cluster_file: str, volume: str, state: Path, switch: Path, stop: Path, settle: float
) -> dict[str, object]:
    acked = dict.fromkeys(range(2 * MAIN), 0)
    errors: list[str] = []
    rounds = 0
    deadline = time.monotonic() + 60
    switched, stopped = asyncio.Event(), asyncio.Event()

    async def watch() -> None:
        await appeared(switch, deadline)
        switched.set()
        await appeared(stop, deadline)
        stopped.set()

    async with await Cluster.connect(cluster_file) as cluster:
        vol = await cluster.open(volume)

        async def writer(w: int) -> None:
            nonlocal rounds
            round_ = 0
            while not stopped.is_set() and not errors:
                round_ += 1
                first = MAIN if switched.is_set() else 0
                for block in range(first + w, first + MAIN, WRITERS):
                    try:
                        await vol.write(offset(block), content(round_, block))
                    except Exception as exc:  # the report says what went wrong
                        errors.append(f"write of block {block}: {type(exc).__name__}: {exc}")
                        return
                    acked[block] = round_
                rounds = max(rounds, round_)

        watcher = asyncio.ensure_future(watch())
        await asyncio.gather(*(writer(w) for w in range(WRITERS)))
        watcher.cancel()
        await asyncio.to_thread(state.write_text, json.dumps(acked))
        await asyncio.sleep(settle)
        wrong = await read_back(vol, acked)
        await vol.close()
    return {"rounds": rounds, "errors": errors, "wrong": wrong}


async def check(cluster_file: str, volume: str, state: Path) -> dict[str, object]:
    text = await asyncio.to_thread(state.read_text)
    acked = {int(k): v for k, v in json.loads(text).items()}
    async with await Cluster.connect(cluster_file) as cluster:
        vol = await cluster.open(volume, read_only=True)
        wrong = await read_back(vol, acked)
        await vol.close()
    return {"rounds": max(acked.values()), "errors": [], "wrong": wrong}


def main(argv: list[str]) -> None:
    mode, cluster_file, volume, state = argv[:4]
    if mode == "write":
        switch, stop, settle = Path(argv[4]), Path(argv[5]), float(argv[6])
        report = asyncio.run(write(cluster_file, volume, Path(state), switch, stop, settle))
    else:
        report = asyncio.run(check(cluster_file, volume, Path(state)))
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])

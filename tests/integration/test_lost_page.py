"""A page corrupt on every copy is lost, and the volume goes on: qemu-io, through a
writable `lamina nbd` export of a `lamina up` cluster, gets EIO at once for that page
(reads, and writes that do not cover it whole) while every other page is served; the
leader's worker reports it in `lamina status` and `lamina volume info`, with what to do,
and stops repairing it; a write of the whole page makes it whole again."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_driver import volume_info
from tests.integration.test_layers import wait_for
from tests.integration.volumes import LocalCluster, local_cluster

pytestmark = pytest.mark.integration

PAGE = 64 * 1024
PAGES = 8
BAD = 3
IO_TIMEOUT = 60
#: a failure "at once": well under the export's io_timeout, with room for a slow machine
PROMPT = 15.0


def qemu_io(uri: str, *commands: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run qemu-io commands on ``uri``; the finished process and how long it took."""
    args = ["qemu-io", "-f", "raw", uri]
    for c in commands:
        args += ["-c", c]
    started = time.monotonic()
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=2 * IO_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"qemu-io {commands} still ran after {2 * IO_TIMEOUT} s") from None
    return done, time.monotonic() - started


def failed(done: subprocess.CompletedProcess[str]) -> bool:
    return "Input/output error" in done.stdout + done.stderr


def served(uri: str, *commands: str) -> None:
    """Run qemu-io commands that must all succeed."""
    done, _ = qemu_io(uri, *commands)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not failed(done), done.stdout


def rot(lc: LocalCluster, sid: str, layer: int, page: int, offset: int) -> None:
    """Invert one byte of ``page`` in server ``sid``'s file of ``layer`` (in place)."""
    path = lc.root / sid / "layers" / f"{layer}.data"
    with open(path, "r+b") as f:
        f.seek(page * PAGE + offset)
        old = f.read(1)[0]
        f.seek(page * PAGE + offset)
        f.write(bytes([old ^ 0xFF]))


def worker(lc: LocalCluster) -> dict[str, Any]:
    """The leader's worker's figures, from `lamina status --json`."""
    st = lc.cli("status", "--json")
    assert st.returncode == 0, st.stderr
    figures: dict[str, Any] = json.loads(st.stdout)["resync"]
    return figures


def lost(lc: LocalCluster) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str, str]:
    """The lost pages `lamina volume info v --json` and `lamina status --json` list,
    with the text of `lamina volume info v` and of `lamina status`."""
    info = volume_info(lc, "v")
    st = lc.cli("status", "--json")
    assert st.returncode == 0, st.stderr
    text = lc.cli("volume", "info", "v")
    plain = lc.cli("status")
    return info["lost_pages"] or [], json.loads(st.stdout)["lost_pages"], text.stdout, plain.stdout


def test_a_page_corrupt_on_every_copy_fails_at_once_and_is_reported(tmp_path: Path) -> None:
    """Rot one byte of page 3 on both copies: its reads and a 4 KiB write into it fail
    with EIO well under io_timeout, every other page reads back, `lamina status` and
    `lamina volume info` list it as lost (both copies quarantined) with the advice; a
    whole-page write heals it, the report clears and a scrub finds nothing wrong."""
    with local_cluster(tmp_path / "cluster", 1, 2) as lc:
        lc.create_volume("v", PAGES * PAGE, replicas=2, stripe=1, page_size=PAGE)
        exporter = lc.export("v", "--io-timeout", str(IO_TIMEOUT))
        fill = [f"write -P {k + 1} {k * PAGE} {PAGE}" for k in range(PAGES)]
        served(exporter.uri, *fill, "flush")
        (layer,) = volume_info(lc, "v")["layers"]
        copies = layer["placement"][0]
        assert len(copies) == 2
        for k, sid in enumerate(copies):
            rot(lc, sid, layer["id"], BAD, 1000 + 7 * k)

        read, took = qemu_io(exporter.uri, f"read -P {BAD + 1} {BAD * PAGE} {PAGE}")
        assert failed(read), f"a read of the rotten page did not fail: {read.stdout}"
        assert took < PROMPT, f"the read of the rotten page took {took:.1f} s"
        others = [f"read -P {k + 1} {k * PAGE} {PAGE}" for k in range(PAGES) if k != BAD]
        served(exporter.uri, *others)
        partial, took = qemu_io(exporter.uri, f"write -P 0x77 {BAD * PAGE + 4096} 4096")
        assert failed(partial), f"a partial write to the lost page did not fail: {partial.stdout}"
        assert took < PROMPT, f"the partial write to the lost page took {took:.1f} s"
        assert exporter.proc.poll() is None, exporter.log_text()

        wait_for("the lost page to be reported", lambda: lost(lc)[0] != [], timeout=60)
        in_info, in_status, text, plain = lost(lc)
        assert in_info == in_status, (in_info, in_status)
        (entry,) = in_info
        assert (entry["volume"], entry["layer"], entry["page"]) == ("v", layer["id"], BAD)
        assert (entry["offset"], entry["length"]) == (BAD * PAGE, PAGE)
        assert entry["copies"] == dict.fromkeys(copies, "quarantined")
        assert "write the whole page again" in entry["advice"]
        span = f"bytes {BAD * PAGE}..{(BAD + 1) * PAGE - 1}"
        for shown in (text, plain):
            assert "lost" in shown, shown
            assert span in shown, shown
        # the worker no longer works on it: rounds go by with nothing found to repair
        rounds = worker(lc)["rounds"]
        wait_for("two more rounds", lambda: worker(lc)["rounds"] >= rounds + 2, timeout=60)
        figures = worker(lc)
        assert (figures["pages_found"], figures["pages_left"]) == (0, 0), figures

        served(
            exporter.uri, f"write -P 0x55 {BAD * PAGE} {PAGE}", "flush",
            f"read -P 0x55 {BAD * PAGE} {PAGE}",
        )  # fmt: skip
        wait_for("the lost page to be cleared", lambda: lost(lc)[:2] == ([], []), timeout=60)
        scrub = lc.cli("volume", "scrub", "v", "--json")
        assert scrub.returncode == 0, scrub.stderr
        report = json.loads(scrub.stdout)
        assert (report["mismatches"], report["corrupt"]) == (0, 0), report
        served(exporter.uri, *others, f"read -P 0x55 {BAD * PAGE} {PAGE}")

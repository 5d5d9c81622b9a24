"""A storage server dies under load: the export goes on, and no read trusts it again
until it is resynchronised."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.volumes import MiB, local_cluster

pytestmark = pytest.mark.integration


def fio(uri: str, where: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "fio", "--name=load", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bsrange=4k-64k", "--size=48M", "--iodepth=16", "--verify=crc32c",
            "--verify_fatal=1", "--output-format=json", *extra,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=where,  # fio leaves state files
    )  # fmt: skip


def finish(proc: subprocess.Popen[bytes], timeout: float = 180) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"fio hung: {err.decode()[-2000:]}") from None
    assert proc.returncode == 0, err.decode()[-2000:] + out.decode()[-2000:]
    doc: dict[str, Any] = json.loads(out[out.index(b"{") :])
    return doc


def server_state(cluster_file: Path, sid: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "lamina", "server", "list", "--json", "--cluster",
         str(cluster_file)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    servers = json.loads(done.stdout)
    return next(str(s["state"]) for s in servers if s["id"] == sid)


def test_a_storage_server_killed_under_fio_load(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "cluster", 1, 2) as lc:
        info = lc.create_volume("load", 64 * MiB, replicas=2, stripe=2)
        exporter = lc.export(info["name"])
        # 48 MiB of verified random writes, rate-limited so the kill lands mid-run
        job = fio(exporter.uri, tmp_path, "--rate=12m", "--do_verify=1")
        time.sleep(1.5)
        assert job.poll() is None, "fio ended before the kill"
        os.kill(lc.storage_pid("s2"), signal.SIGKILL)
        doc = finish(job)
        (result,) = doc["jobs"]
        assert result["error"] == 0
        assert result["write"]["io_bytes"] >= 48 * MiB
        assert result["read"]["io_bytes"] >= 48 * MiB  # the verify pass read it all back
        assert server_state(lc.cluster_file, "s2") == "down"
        log = exporter.log_text()
        assert "Traceback" not in log, log

        # back with `lamina up`: recovering, and not one read is served from its stale copy
        lc.up(1, 2)
        deadline = time.monotonic() + 30
        while server_state(lc.cluster_file, "s2") != "recovering":
            assert time.monotonic() < deadline, "s2 did not come back as recovering"
            time.sleep(0.2)
        finish(fio(exporter.uri, tmp_path, "--verify_only"))
        exporter.stop()

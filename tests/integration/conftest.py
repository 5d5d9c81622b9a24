"""Fixtures that run real `lamina storage` processes in a temporary directory.

Every process a test starts is stopped (SIGTERM, then SIGKILL) in teardown, whatever the
test did to it, and the tail of its log is printed so a failure shows what the server saw.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.localcluster import StorageProcess
from tests.integration.support import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture
def server(cluster: Cluster) -> StorageProcess:
    """One standalone storage server, listening."""
    return cluster.server()


@pytest.fixture
def key(cluster: Cluster) -> bytes:
    return cluster.key


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs mounted at ``tmp_path/s1`` (the first server's data directory)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "s1"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mnt
    finally:
        umount = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30, check=False)
        if umount.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30, check=False)

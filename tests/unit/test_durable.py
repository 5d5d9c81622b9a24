"""First-start files (cluster key, admin token, cluster layout) are durable once written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.localcluster import _write_cluster_file, ensure_key, ensure_token
from lamina.wire.handshake import load_key


def test_first_start_files_and_their_names_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster key, the admin token and cluster.toml are fsynced, and so is the
    directory holding their names, before the call that writes them returns."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", fsync)
    key = ensure_key(tmp_path / "cluster.key")
    assert synced == [str(tmp_path / "cluster.key"), str(tmp_path)]
    assert load_key(tmp_path / "cluster.key") == key
    synced.clear()
    token = ensure_token(tmp_path / "admin.token")
    assert synced == [str(tmp_path / "admin.token"), str(tmp_path)]
    assert (tmp_path / "admin.token").read_text().strip() == token
    synced.clear()
    _write_cluster_file(tmp_path, ["http://127.0.0.1:1"])
    # written beside its name, then renamed over it: the file, then the directory
    assert synced == [str(tmp_path / "cluster.toml.tmp"), str(tmp_path)]
    assert "127.0.0.1:1" in (tmp_path / "cluster.toml").read_text()

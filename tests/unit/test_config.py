"""Daemon configuration: the samples load, mistakes are loud."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.config import (
    ConfigError,
    load_manager_config,
    load_nbd_config,
    load_storage_config,
)

ETC = Path(__file__).resolve().parents[2] / "etc"


def test_the_sample_configs_load() -> None:
    """etc/storage.toml and etc/manager.toml are valid configurations."""
    storage = load_storage_config(str(ETC / "storage.toml"), {})
    assert storage.id == "s1"
    manager = load_manager_config(str(ETC / "manager.toml"), {})
    assert len(manager.peers) == 3
    nbd = load_nbd_config(str(ETC / "nbd.toml"), {})
    assert (nbd.volume, nbd.read_only, nbd.listen) == ("db", False, "127.0.0.1:10809")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            '[storage]\nid = "s1"\ndata = "d"\nkey = "k"\nlisten_port = 1\n',
            "unknown storage config key",
        ),
        ('[storage]\nid = "s1"\ndata = "d"\nkey = "k"\ncheckpoint_bytes = "big"\n', "wrong type"),
        ('[storage]\nid = "s1"\ndata = "d"\nkey = "k"\nmask_sync_interval = true\n', "wrong type"),
        ('[storge]\nid = "s1"\n', "unknown table"),
        ('[storage]\nid = "s 1"\ndata = "d"\nkey = "k"\n', "server id"),
        ('[storage]\ndata = "d"\nkey = "k"\n', "needs 'id'"),
        ("[storage\n", "config file"),
    ],
)
def test_storage_config_mistakes_are_errors(tmp_path: Path, text: str, needle: str) -> None:
    """A misspelt key, a wrong type, a bad value or broken TOML is a ConfigError saying so."""
    path = tmp_path / "storage.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_storage_config(str(path), {})


def test_command_line_overrides_the_file_and_is_checked_too(tmp_path: Path) -> None:
    """Options given on the command line win over the file and are validated alike."""
    path = tmp_path / "manager.toml"
    path.write_text('[manager]\nid = "m1"\ndata = "d"\nkey = "k"\nraft = "127.0.0.1:1"\n')
    cfg = load_manager_config(str(path), {"listen": "127.0.0.1:9", "id": None})
    assert (cfg.listen, cfg.id) == ("127.0.0.1:9", "m1")
    with pytest.raises(ConfigError, match="1, 3 or 5"):
        load_manager_config(str(path), {"peers": ["127.0.0.1:2"]})
    with pytest.raises(ConfigError, match="does not exist"):
        load_manager_config(str(tmp_path / "missing.toml"), {})


def test_session_timeout_defaults_to_10_and_is_bounded(tmp_path: Path) -> None:
    """session_timeout is 10 s unless given, and must lie within 1..300 seconds."""
    path = tmp_path / "manager.toml"
    path.write_text('[manager]\nid = "m1"\ndata = "d"\nkey = "k"\nraft = "127.0.0.1:1"\n')
    assert load_manager_config(str(path), {}).session_timeout == 10
    assert load_manager_config(str(path), {"session_timeout": 2.5}).session_timeout == 2.5
    for bad in (0.5, 301):
        with pytest.raises(ConfigError, match="session_timeout"):
            load_manager_config(str(path), {"session_timeout": bad})
    with pytest.raises(ConfigError, match="wrong type"):
        load_manager_config(str(path), {"session_timeout": "10"})


@pytest.mark.parametrize(
    ("text", "overrides", "needle"),
    [
        ('[nbd]\nvolume = "db"\nread_only = "yes"\n', {}, "wrong type"),
        ('[nbd]\nvolume = "db"\nio_timeout = 0\n', {}, "io_timeout"),
        ('[nbd]\nvolume = "db"\nlisten = "nowhere"\n', {}, "listen address"),
        ('[nbd]\nvolume = "db"\nsocket = "/s"\n', {"listen": "127.0.0.1:1"}, "exclude"),
        ('[nbd]\nvolume = "db"\nread_only = true\n', {"takeover": True}, "takeover"),
        ('[nbd]\nlisten = "127.0.0.1:1"\n', {}, "needs 'volume'"),
        ('[nbd]\nvolume = "db"\nexport = "x"\n', {}, "unknown nbd config key"),
    ],
)
def test_nbd_config_mistakes_are_errors(
    tmp_path: Path, text: str, overrides: dict[str, object], needle: str
) -> None:
    """The export's config is checked like the daemons' (the command line wins)."""
    path = tmp_path / "nbd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_nbd_config(str(path), overrides)


def test_nbd_command_line_flags_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nbd.toml"
    path.write_text('[nbd]\nvolume = "db"\nread_only = true\n')
    assert load_nbd_config(str(path), {"read_only": None}).read_only is True
    assert load_nbd_config(str(path), {"volume": "other"}).volume == "other"
    cfg = load_nbd_config(None, {"volume": "v", "takeover": True})
    assert (cfg.takeover, cfg.io_timeout, cfg.cluster) == (True, 120.0, None)

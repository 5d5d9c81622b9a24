"""Daemon configuration: the samples load, mistakes are loud."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.config import ConfigError, load_manager_config, load_storage_config

ETC = Path(__file__).resolve().parents[2] / "etc"


def test_the_sample_configs_load() -> None:
    """etc/storage.toml and etc/manager.toml are valid configurations."""
    storage = load_storage_config(str(ETC / "storage.toml"), {})
    assert storage.id == "s1"
    manager = load_manager_config(str(ETC / "manager.toml"), {})
    assert len(manager.peers) == 3


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

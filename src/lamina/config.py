"""Typed daemon configuration: TOML files whose unknown keys are errors.

Command-line options override the file.  A commented sample per daemon is in ``etc/``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamina.errors import LocalError


class ConfigError(LocalError):
    pass


def parse_addr(text: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with a clear error."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class StorageConfig:
    id: str
    data: str
    key: str
    listen: str = "127.0.0.1:7400"
    managers: tuple[str, ...] = ()
    checkpoint_bytes: int = 64 << 20
    mask_sync_interval: float = 5.0
    log_level: str = "INFO"
    port_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.id or len(self.id) > 64 or not self.id.replace("-", "").isalnum():
            raise ConfigError(f"server id {self.id!r} must be 1-64 letters, digits or '-'")
        parse_addr(self.listen, "listen address")
        for addr in self.managers:
            parse_addr(addr, "manager address")
        if self.checkpoint_bytes < 1 << 20:
            raise ConfigError("checkpoint_bytes must be at least 1 MiB")
        if not 0.01 <= self.mask_sync_interval <= 60:
            raise ConfigError("mask_sync_interval must be within 0.01..60 seconds")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level {self.log_level!r} is not DEBUG/INFO/WARNING/ERROR")

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_addr(self.listen)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "data": str,
    "key": str,
    "listen": str,
    "port_file": str,
    "managers": (list, tuple),
    "checkpoint_bytes": int,
    "mask_sync_interval": (int, float),
    "log_level": str,
}


def _load(
    path: str | None,
    table: str,
    cls: type[Any],
    types: dict[str, type | tuple[type, ...]],
    lists: tuple[str, ...],
    required: tuple[str, ...],
    overrides: dict[str, Any],
) -> Any:
    """The file's ``[table]`` (if any), then the non-None overrides, type-checked."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        unknown_tables = set(doc) - {table}
        if unknown_tables:
            raise ConfigError(f"config file {path}: unknown table(s) {sorted(unknown_tables)}")
        values = dict(doc.get(table, {}))
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown {table} config key(s): {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    for name, value in values.items():
        expected = types[name]
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
            raise ConfigError(f"{table} config key {name!r} has the wrong type: {value!r}")
    for name in lists:
        if name in values:
            values[name] = tuple(values[name])
            if not all(isinstance(a, str) for a in values[name]):
                raise ConfigError(f"{table} config key {name!r} must be a list of HOST:PORT")
    for name in required:
        if name not in values:
            opt = name.replace("_", "-")
            raise ConfigError(f"{table} config needs {name!r} (option --{opt})")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"bad {table} config: {exc}") from None


def load_storage_config(path: str | None, overrides: dict[str, Any]) -> StorageConfig:
    """The file's ``[storage]`` table (if any), then the non-None overrides."""
    cfg: StorageConfig = _load(
        path, "storage", StorageConfig, _TYPES, ("managers",), ("id", "data", "key"), overrides
    )
    return cfg


@dataclass(frozen=True)
class ManagerConfig:
    id: str
    data: str
    key: str
    raft: str
    listen: str = "127.0.0.1:7300"
    peers: tuple[str, ...] = ()
    admin_token: str | None = None
    storage_listen: str = "127.0.0.1:7350"
    lease_duration: float = 3.0
    session_timeout: float = 10.0
    resync_rate: int = 64 << 20  # bytes/s the background worker may copy; 0: no limit
    resync_parallel: int = 4  # pages the worker resynchronises at once
    scrub_interval: float = 7 * 86400.0  # seconds between background scrubs; 0: never
    rereplicate_after: float = 600.0  # seconds down before a server's copies move
    port_file: str | None = None
    log_level: str = "INFO"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.id or len(self.id) > 64 or not self.id.replace("-", "").isalnum():
            raise ConfigError(f"manager id {self.id!r} must be 1-64 letters, digits or '-'")
        if self.resync_rate < 0:
            raise ConfigError("resync_rate must be 0 (no limit) or a positive number of bytes/s")
        if not 1 <= self.resync_parallel <= 64:
            raise ConfigError("resync_parallel must be within 1..64")
        if self.rereplicate_after < 1:
            raise ConfigError("rereplicate_after must be at least 1 second")
        if self.scrub_interval < 0:
            raise ConfigError("scrub_interval must be 0 (never) or a number of seconds")
        parse_addr(self.listen, "listen address")
        parse_addr(self.storage_listen, "storage listen address")
        if not 0.5 <= self.lease_duration <= 60:
            raise ConfigError("lease_duration must be within 0.5..60 seconds")
        if not 1 <= self.session_timeout <= 300:
            raise ConfigError("session_timeout must be within 1..300 seconds")
        parse_addr(self.raft, "raft address")
        for addr in self.peers:
            parse_addr(addr, "peer address")
        if len({*self.peers, self.raft}) not in (1, 3, 5):
            raise ConfigError("a manager group has 1, 3 or 5 members (--raft plus --peers)")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level {self.log_level!r} is not DEBUG/INFO/WARNING/ERROR")

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_addr(self.listen)

    @property
    def token_path(self) -> Path:
        """The admin token file: given, or ``admin.token`` beside the cluster key."""
        return Path(self.admin_token) if self.admin_token else Path(self.key).parent / "admin.token"


_MANAGER_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "data": str,
    "key": str,
    "raft": str,
    "listen": str,
    "peers": (list, tuple),
    "admin_token": str,
    "storage_listen": str,
    "lease_duration": (int, float),
    "session_timeout": (int, float),
    "resync_rate": int,
    "resync_parallel": int,
    "scrub_interval": (int, float),
    "rereplicate_after": (int, float),
    "port_file": str,
    "log_level": str,
}


def load_manager_config(path: str | None, overrides: dict[str, Any]) -> ManagerConfig:
    """The file's ``[manager]`` table (if any), then the non-None overrides."""
    cfg: ManagerConfig = _load(
        path,
        "manager",
        ManagerConfig,
        _MANAGER_TYPES,
        ("peers",),
        ("id", "data", "key", "raft"),
        overrides,
    )
    return cfg


@dataclass(frozen=True)
class NbdConfig:
    """``lamina nbd``: one volume exported over NBD."""

    volume: str
    cluster: str | None = None  # cluster file; None: $LAMINA_CLUSTER or the default
    listen: str | None = None  # HOST:PORT (default 127.0.0.1:10809) ...
    socket: str | None = None  # ... or a unix socket path
    read_only: bool = False
    takeover: bool = False
    port_file: str | None = None
    io_timeout: float = 120.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.volume:
            raise ConfigError("nbd config needs a volume name")
        if self.listen is not None and self.socket is not None:
            raise ConfigError("listen and socket exclude each other")
        if self.listen is not None:
            parse_addr(self.listen, "listen address")
        if self.read_only and self.takeover:
            raise ConfigError("takeover needs a read-write export")
        if not 1 <= self.io_timeout <= 3600:
            raise ConfigError("io_timeout must be within 1..3600 seconds")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level {self.log_level!r} is not DEBUG/INFO/WARNING/ERROR")


_NBD_TYPES: dict[str, type | tuple[type, ...]] = {
    "volume": str,
    "cluster": str,
    "listen": str,
    "socket": str,
    "read_only": bool,
    "takeover": bool,
    "port_file": str,
    "io_timeout": (int, float),
    "log_level": str,
}


def load_nbd_config(path: str | None, overrides: dict[str, Any]) -> NbdConfig:
    """The file's ``[nbd]`` table (if any), then the non-None overrides."""
    cfg: NbdConfig = _load(path, "nbd", NbdConfig, _NBD_TYPES, (), ("volume",), overrides)
    return cfg

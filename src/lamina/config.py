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


def load_storage_config(path: str | None, overrides: dict[str, Any]) -> StorageConfig:
    """The file's ``[storage]`` table (if any), then the non-None overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        unknown_tables = set(doc) - {"storage"}
        if unknown_tables:
            raise ConfigError(f"config file {path}: unknown table(s) {sorted(unknown_tables)}")
        values = dict(doc.get("storage", {}))
    names = {f.name for f in dataclasses.fields(StorageConfig)} - {"extra"}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown storage config key(s): {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    for name, value in values.items():
        expected = _TYPES[name]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ConfigError(f"storage config key {name!r} has the wrong type: {value!r}")
    if "managers" in values:
        values["managers"] = tuple(values["managers"])
        if not all(isinstance(a, str) for a in values["managers"]):
            raise ConfigError("storage config key 'managers' must be a list of HOST:PORT")
    for required in ("id", "data", "key"):
        if required not in values:
            raise ConfigError(f"storage config needs {required!r} (option --{required})")
    try:
        return StorageConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"bad storage config: {exc}") from None

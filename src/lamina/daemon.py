"""What every lamina daemon does the same way: its event loop and its port file."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any


def write_port_file(path: str, port: int) -> None:
    """Publish the port actually bound (atomically: readers never see half a number)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a daemon's main coroutine on uvloop."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    asyncio.run(main)

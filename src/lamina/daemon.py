"""What every lamina daemon does the same way: its event loop, its port file, and the
test-only power-cut switch."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, Final

from lamina.config import ConfigError

#: TEST ONLY: "1" makes a daemon keep what it writes as a disk that can lose power would,
#: and makes SIGUSR2 a power failure (docs/testing.md); any other value is refused
POWERCUT_ENV: Final = "LAMINA_TEST_POWERCUT"
#: the exit status of a daemon whose power was cut
POWERCUT_EXIT: Final = 99


def powercut_enabled(what: str) -> bool:
    """Whether this daemon runs with the test-only power cut (``LAMINA_TEST_POWERCUT=1``);
    a ConfigError for any other non-empty value, so it is never switched on by accident.
    ``what`` says in the warning what loses power."""
    value = os.environ.get(POWERCUT_ENV)
    if value is None or value == "":
        return False
    if value != "1":
        raise ConfigError(f"{POWERCUT_ENV}={value!r}: only 1 (test-only power cuts) is known")
    logging.getLogger(__name__).warning(
        "TEST ONLY: %s=1: %s loses what is not synced at SIGUSR2; never run a real "
        "daemon like this",
        POWERCUT_ENV,
        what,
    )
    return True


def flush_logs() -> None:
    """Write out every log handler (before a test-only power cut ends the process)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


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

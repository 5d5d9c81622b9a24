"""Helpers shared by the contract suites: backends and an event loop per test."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec

from lamina.storage.pagestore import PageStore

P = ParamSpec("P")
MakeStore = Callable[[], PageStore]
#: "powerloss" is the on-disk store on the disk that can lose power, with the power kept on
BACKENDS = ("mem", "disk", "powerloss")


def in_loop(fn: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test body to completion on a fresh event loop."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run

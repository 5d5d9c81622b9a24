"""Fixtures of the contract suites: one factory of empty stores per backend."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.storage.diskstore import DiskPageStore
from lamina.storage.files import OS_FILES
from lamina.storage.memstore import MemPageStore
from lamina.storage.pagestore import PageStore
from lamina.storage.powerloss import PowerLossFiles
from tests.contract.stores import BACKENDS, MakeStore


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStore]:
    """A factory of empty stores of one backend; every store it made is closed afterwards."""
    made: list[PageStore] = []
    dirs = itertools.count()

    def make() -> PageStore:
        store: PageStore
        n = next(dirs)
        if request.param == "mem":
            store = MemPageStore()
        else:
            files = (
                PowerLossFiles(tmp_path / f"trash{n}") if request.param == "powerloss" else OS_FILES
            )
            disk = DiskPageStore(tmp_path / f"store{n}", "s1", files=files)
            disk.open()
            store = disk
        made.append(store)
        return store

    yield make

    async def close_all() -> None:
        for store in made:
            await store.close()

    # bounded: after a failed test a store may still wait on the loop that test ran on
    asyncio.run(asyncio.wait_for(close_all(), 10))

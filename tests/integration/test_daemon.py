"""The `lamina storage` and `lamina ping` commands as an operator runs them."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lamina.errors import NoLease
from lamina.localcluster import StorageProcess
from lamina.wire import messages as m
from tests.integration.support import (
    PAGE_SIZE,
    Cluster,
    connect,
    create_req,
    read_page,
    read_req,
    run,
    status,
    write_req,
)

pytestmark = pytest.mark.integration

LAYER = 61
LAMINA = [sys.executable, "-m", "lamina"]


def lamina(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the CLI as an operator would, with no terminal-width hints in the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [*LAMINA, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def storage_args(cluster: Cluster, data: Path, *extra: str, id_: str = "d1") -> list[str]:
    return [
        "storage", "--id", id_, "--listen", "127.0.0.1:0", "--data", str(data),
        "--key", str(cluster.key_path), *extra,
    ]  # fmt: skip


def assert_one_line_error(done: subprocess.CompletedProcess[str], needle: str) -> None:
    assert done.returncode != 0, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{done.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    assert needle in lines[0], lines[0]


def test_missing_key_file_is_a_one_line_error(cluster: Cluster, tmp_path: Path) -> None:
    """A --key file that does not exist stops the daemon with one error line."""
    missing = tmp_path / "keys-kept-elsewhere" / "this-cluster-key-file-does-not-exist.key"
    args = storage_args(cluster, tmp_path / "data")
    args[args.index("--key") + 1] = str(missing)
    assert_one_line_error(lamina(*args), "does not exist")


@pytest.mark.parametrize("listen", ["nohost", "127.0.0.1:99999", "127.0.0.1:port", ":7400"])
def test_bad_listen_address_is_a_one_line_error(
    cluster: Cluster, tmp_path: Path, listen: str
) -> None:
    """A --listen that is not HOST:PORT stops the daemon with one error line."""
    args = storage_args(cluster, tmp_path / "data")
    args[args.index("--listen") + 1] = listen
    assert_one_line_error(lamina(*args), "listen")


def test_unknown_config_key_is_a_one_line_error(cluster: Cluster, tmp_path: Path) -> None:
    """An unknown key in the TOML --config stops the daemon with one error line naming it."""
    config = tmp_path / "storage.toml"
    config.write_text('[storage]\nlisten = "127.0.0.1:0"\ncheckpoint_megabytes = 5\n')
    done = lamina(*storage_args(cluster, tmp_path / "data", "--config", str(config)))
    assert_one_line_error(done, "checkpoint_megabytes")


def test_data_dir_of_another_server_is_a_one_line_error(
    cluster: Cluster, server: StorageProcess
) -> None:
    """A data directory that belongs to another server id is refused with one error line."""
    assert server.stop() == 0
    done = lamina(*storage_args(cluster, server.data, id_="someone-else"))
    assert_one_line_error(done, "belongs to storage server")


def test_without_a_lease_data_requests_get_no_lease_but_ping_works(
    cluster: Cluster, key: bytes
) -> None:
    """A server told to wait for managers refuses data requests NO_LEASE and answers PING."""
    proc = cluster.server(["--managers", "127.0.0.1:1"])
    requests: list[tuple[m.Message, bytes]] = [
        (read_req(LAYER, 0), b""),
        (write_req(LAYER, 0, 0), bytes(PAGE_SIZE)),
        (create_req(LAYER, 0, zero=True), b""),
        (m.StatusRequest(1, 1, LAYER, (0,)), b""),
        (m.EnumerateRequest(1, 1, LAYER, int(m.EnumerateWhat.PRESENT), 0, 10), b""),
        (m.FlushRequest(1, 1), b""),
    ]

    async def main() -> None:
        client = await connect(proc, key)
        try:
            pong = await client.call(m.PingRequest())
            assert isinstance(pong, m.PingResponse)
            assert pong.server_id == proc.id
            assert not pong.lease_valid
            for req, payload in requests:
                with pytest.raises(NoLease):
                    await client.call(req, payload)
            pong = await client.call(m.PingRequest())
            assert isinstance(pong, m.PingResponse)
            assert pong.pages == 0
        finally:
            client.close()

    run(main())
    assert proc.alive()


def test_sigterm_exits_0_and_a_restart_serves_the_same_data(
    server: StorageProcess, key: bytes
) -> None:
    """SIGTERM stops the daemon with exit status 0 and the restarted one serves the same pages."""
    rng = random.Random(12)
    pages = {page: rng.randbytes(PAGE_SIZE) for page in range(4)}

    async def write() -> dict[int, m.StatusEntry]:
        client = await connect(server, key)
        try:
            for page, data in pages.items():
                reply = await client.call(write_req(LAYER, page, 0), data)
                assert isinstance(reply, m.WriteResponse)
            return await status(client, LAYER, list(pages))
        finally:
            client.close()

    before = run(write())
    assert server.stop() == 0
    server.start()

    async def check() -> None:
        client = await connect(server, key)
        try:
            for page, data in pages.items():
                _, got = await read_page(client, LAYER, page)
                assert got == data
            # state, mask, generation (not flags: no write is in flight after a restart)
            after = await status(client, LAYER, list(pages))
            assert {p: e[:4] for p, e in after.items()} == {p: e[:4] for p, e in before.items()}
        finally:
            client.close()

    run(check())
    assert server.stop() == 0


def test_ping_json_reports_the_server_id(cluster: Cluster, server: StorageProcess) -> None:
    """`lamina ping ADDR --key K --json` prints JSON naming the server, and flags a dead one."""
    done = lamina("ping", server.addr, "--key", str(cluster.key_path), "--json")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["id"] == server.id
    assert row["addr"] == server.addr
    assert row["lease"] is True
    assert "error" not in row

    done = lamina("ping", "127.0.0.1:1", "--key", str(cluster.key_path), "--json")
    assert done.returncode == 3
    (row,) = json.loads(done.stdout)
    assert row["addr"] == "127.0.0.1:1"
    assert "error" in row

"""The `lamina` command line.  Errors are turned into a message and an exit code here."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from lamina import __version__
from lamina.errors import ErrorCode, LaminaError

F = TypeVar("F", bound=Callable[..., Any])
# Not a terminal (a pipe, a log, CI): rich would assume 80 columns and cut table cells.
console = Console() if sys.stdout.isatty() else Console(width=120)
err_console = Console(stderr=True)

#: exit codes: 1 for errors of lamina, 2 for bad usage (click's own), 3 when unreachable.
EXIT_ERROR = 1
EXIT_UNAVAILABLE = 3


def _fail(exc: LaminaError) -> None:
    err_console.print(
        f"[bold red]error:[/] {exc.message} [dim]({exc.code.name})[/]", soft_wrap=True
    )
    code = EXIT_UNAVAILABLE if exc.code == ErrorCode.UNAVAILABLE else EXIT_ERROR
    sys.exit(code)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lamina")
def main() -> None:
    """lamina: distributed block storage with translucent layers."""


@main.command()
@click.option("--id", "id_", help="Server id (letters, digits, '-').")
@click.option("--listen", help="HOST:PORT to listen on (port 0: pick one). [127.0.0.1:7400]")
@click.option("--data", type=click.Path(file_okay=False), help="Data directory.")
@click.option("--key", type=click.Path(dir_okay=False), help="Cluster key file.")
@click.option(
    "--managers",
    help="Comma-separated manager HOST:PORTs; without it the server runs standalone.",
)
@click.option("--config", type=click.Path(dir_okay=False), help="TOML config (see etc/).")
@click.option("--port-file", type=click.Path(dir_okay=False), help="Write the bound port here.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def storage(
    id_: str | None,
    listen: str | None,
    data: str | None,
    key: str | None,
    managers: str | None,
    config: str | None,
    port_file: str | None,
    log_level: str | None,
) -> None:
    """Run a storage server."""
    from lamina.config import load_storage_config
    from lamina.storage import server

    overrides = {
        "id": id_,
        "listen": listen,
        "data": data,
        "key": key,
        "managers": _addr_list(managers),
        "port_file": port_file,
        "log_level": log_level,
    }
    _run_daemon(lambda: load_storage_config(config, overrides), server.run)


def _addr_list(text: str | None) -> list[str] | None:
    return [a for a in text.split(",") if a] if text else None


def _run_daemon(load: Callable[[], Any], run: Callable[[Any], None]) -> None:
    """Load a daemon's config and run it; every error a one-line message and exit code."""
    try:
        cfg = load()
        _setup_logging(cfg.log_level)
        run(cfg)
    except LaminaError as exc:
        _fail(exc)
    except OSError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(EXIT_ERROR)


@main.command()
@click.option("--id", "id_", help="Manager id (letters, digits, '-').")
@click.option("--listen", help="HOST:PORT of the HTTP API (port 0: pick one). [127.0.0.1:7300]")
@click.option("--raft", help="HOST:PORT this manager's Raft member listens on.")
@click.option("--peers", help="Comma-separated Raft HOST:PORTs of the other managers.")
@click.option("--data", type=click.Path(file_okay=False), help="Data directory (Raft journal).")
@click.option("--key", type=click.Path(dir_okay=False), help="Cluster key file.")
@click.option(
    "--admin-token", type=click.Path(dir_okay=False),
    help="Admin token file. [admin.token beside the key]",
)  # fmt: skip
@click.option("--storage-listen", help="HOST:PORT where storage servers ask for leases.")
@click.option("--lease-duration", type=float, help="Storage-server lease in seconds. [3]")
@click.option(
    "--session-timeout", type=float,
    help="Seconds without keepalive before a volume lock is released (1-300). [10]",
)  # fmt: skip
@click.option(
    "--rereplicate-after", type=float,
    help="Seconds a storage server may stay down before its copies move elsewhere. [600]",
)  # fmt: skip
@click.option("--config", type=click.Path(dir_okay=False), help="TOML config (see etc/).")
@click.option("--port-file", type=click.Path(dir_okay=False), help="Write the API port here.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def manager(
    id_: str | None,
    listen: str | None,
    raft: str | None,
    peers: str | None,
    data: str | None,
    key: str | None,
    admin_token: str | None,
    storage_listen: str | None,
    lease_duration: float | None,
    session_timeout: float | None,
    rereplicate_after: float | None,
    config: str | None,
    port_file: str | None,
    log_level: str | None,
) -> None:
    """Run a manager: a member of the Raft group that keeps the cluster map."""
    from lamina.config import load_manager_config
    from lamina.mgmt import server

    overrides = {
        "id": id_,
        "listen": listen,
        "raft": raft,
        "peers": _addr_list(peers),
        "data": data,
        "key": key,
        "admin_token": admin_token,
        "storage_listen": storage_listen,
        "lease_duration": lease_duration,
        "session_timeout": session_timeout,
        "rereplicate_after": rereplicate_after,
        "port_file": port_file,
        "log_level": log_level,
    }
    _run_daemon(lambda: load_manager_config(config, overrides), server.run)


@main.command()
@click.option(
    "--dir", "root", default="./lamina-data", show_default=True,
    type=click.Path(file_okay=False), help="Where the cluster keeps its data.",
)  # fmt: skip
@click.option(
    "--managers", "n_managers", default=3, show_default=True, type=click.Choice(["1", "3", "5"])
)
@click.option("--servers", "n_servers", default=3, show_default=True, type=click.IntRange(1, 16))
@click.option(
    "--session-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(1, 300),
    help="Seconds a volume lock's session may go without keepalive (managers started now).",
)
@click.option(
    "--rereplicate-after", default=600.0, show_default=True, type=click.FloatRange(1),
    help="Seconds a storage server may stay down before its copies move elsewhere.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def up(
    root: str,
    n_managers: str,
    n_servers: int,
    session_timeout: float,
    rereplicate_after: float,
    as_json: bool,
) -> None:
    """Start a local cluster on 127.0.0.1 (or the daemons of it that are not running)."""
    from lamina.localcluster import up as start

    base = Path(root).resolve()
    try:
        with console.status("starting the cluster...") as status:
            report = start(
                base, int(n_managers), n_servers, say=status.update,
                session_timeout=session_timeout, rereplicate_after=rereplicate_after,
            )  # fmt: skip
    except LaminaError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps({"dir": str(base), **vars(report)}, indent=2))
        return
    if report.started:
        console.print(f"started {', '.join(report.started)}")
    if report.running:
        console.print(f"already running: {', '.join(report.running)}")
    console.print(f"leader: {report.leader}; cluster file: {base / 'cluster.toml'}")
    console.print(f"logs in {base / 'log'}; stop with: lamina down --dir {root}")


@main.command()
@click.option(
    "--dir", "root", default="./lamina-data", show_default=True,
    type=click.Path(file_okay=False), help="The cluster's directory.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def down(root: str, as_json: bool) -> None:
    """Stop the daemons of the local cluster in DIR."""
    from lamina.localcluster import down as stop

    base = Path(root).resolve()
    if not (base / "run").is_dir():
        _fail(LaminaError(f"{base} holds no local cluster"))
    stopped = stop(base)
    if as_json:
        click.echo(json.dumps({"stopped": stopped}))
    else:
        console.print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
def keygen(path: str) -> None:
    """Create a new cluster key file (never overwrites one)."""
    from lamina.wire.handshake import write_new_key

    try:
        write_new_key(path)
    except FileExistsError:
        _fail(LaminaError(f"{path} exists; refusing to overwrite a cluster key"))
    console.print(f"wrote a new cluster key to {path}")


@main.command()
@click.argument("addrs", nargs=-1, required=True)
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="Cluster key file.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ping(addrs: tuple[str, ...], key: str, as_json: bool) -> None:
    """PING storage servers at HOST:PORT and show what they report."""
    from lamina.config import parse_addr
    from lamina.localcluster import ping as ping_one
    from lamina.wire.handshake import load_key

    try:
        secret = load_key(key)
        for addr in addrs:
            parse_addr(addr)
    except LaminaError as exc:
        _fail(exc)

    async def run() -> list[dict[str, Any]]:
        rows = []
        for addr in addrs:
            t0 = time.perf_counter()
            try:
                r = await ping_one(addr, secret)
            except LaminaError as exc:
                rows.append({"addr": addr, "error": str(exc)})
                continue
            rows.append(_ping_row(addr, r, time.perf_counter() - t0))
        return rows

    rows = asyncio.run(run())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        _ping_table(rows)
    if any("error" in r for r in rows):
        sys.exit(EXIT_UNAVAILABLE)


def _ping_row(addr: str, r: Any, rtt: float) -> dict[str, Any]:
    return {
        "addr": addr,
        "id": r.server_id,
        "epoch": r.epoch,
        "lease": r.lease_valid,
        "pages": r.pages,
        "used": r.used,
        "capacity": r.capacity,
        "rtt_ms": round(rtt * 1000, 2),
    }


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def _ping_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="storage servers")
    for col in ("id", "addr", "epoch", "lease", "pages", "used", "capacity", "rtt"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row("?", r["addr"], "", "", "", "", "", f"[red]{r['error']}[/]")
            continue
        table.add_row(
            r["id"],
            r["addr"],
            str(r["epoch"]),
            "standalone/valid" if r["lease"] else "[red]none[/]",
            str(r["pages"]),
            _human(r["used"]),
            _human(r["capacity"]),
            f"{r['rtt_ms']} ms" if r["rtt_ms"] else "",
        )
    console.print(table)


@main.command()
@click.option(
    "--dir", "root", default="./lamina-demo", show_default=True,
    type=click.Path(file_okay=False), help="Where the demo keeps its data.",
)  # fmt: skip
@click.option("--servers", default=2, show_default=True, type=click.IntRange(1, 8))
def demo(root: str, servers: int) -> None:
    """Start storage servers, write and read pages through them, show them, stop them."""
    from lamina.localcluster import ensure_key, storage_servers

    base = Path(root).resolve()
    key = ensure_key(base / "cluster.key")
    procs = storage_servers(base, servers)
    try:
        with console.status("starting storage servers..."):
            for p in procs:
                p.start()
        console.print(f"started {servers} storage servers under {base}")
        rows = asyncio.run(_demo_io(procs, key))
        table = Table(title="page I/O through each server (1 MiB pages, 4 KiB writes)")
        for col in ("server", "addr", "pages written", "verified", "write ops/s", "read ops/s"):
            table.add_column(col)
        for row in rows:
            table.add_row(*[str(v) for v in row])
        console.print(table)
        from lamina.localcluster import ping as ping_one

        async def pings() -> list[dict[str, Any]]:
            out = []
            for p in procs:
                r = await ping_one(p.addr, key)
                out.append(_ping_row(p.addr, r, 0.0))
            return out

        _ping_table(asyncio.run(pings()))
    except LaminaError as exc:
        for p in procs:
            p.kill()
        _fail(exc)
    finally:
        for p in procs:
            code = p.stop()
            if code not in (0, None):
                err_console.print(f"[yellow]{p.id} exited with {code}; see {p.log}[/]")
    console.print("stopped the storage servers cleanly; data and logs are in", str(base))


async def _demo_io(procs: list[Any], key: bytes) -> list[tuple[Any, ...]]:
    from lamina.storage.syncmask import FULL
    from lamina.wire import messages as m
    from lamina.wire.connection import Client

    rows = []
    page_size = 1 << 20
    layer = int.from_bytes(secrets.token_bytes(4), "big")
    for p in procs:
        client = await Client.connect("127.0.0.1", p.port, key, peer=f"lamina-demo/{os.getpid()}")
        try:
            written: dict[tuple[int, int], bytes] = {}
            t0 = time.perf_counter()
            futs = []
            for page in range(8):
                await client.call(m.CreateRequest(1, 1, layer, page, page_size, FULL, True))
                for block in range(0, 64):
                    data = secrets.token_bytes(4096)
                    written[(page, block)] = data
                    req = m.WriteRequest(
                        1, 1, layer, page, page_size, block * 4096, FULL, FULL, False
                    )
                    futs.append(client.call(req, data))
            await asyncio.gather(*futs)
            wdt = time.perf_counter() - t0
            t0 = time.perf_counter()
            reads = [
                client.call_with_payload(m.ReadRequest(1, 1, layer, pg, page_size, b * 4096, 4096))
                for (pg, b) in written
            ]
            got = await asyncio.gather(*reads)
            rdt = time.perf_counter() - t0
            ok = all(
                data == expect for (_, data), expect in zip(got, written.values(), strict=True)
            )
            await client.call(m.FlushRequest(1, 1))
            rows.append(
                (p.id, p.addr, 8, "yes" if ok else "[red]NO[/]",
                 f"{len(written) / wdt:,.0f}", f"{len(written) / rdt:,.0f}")
            )  # fmt: skip
            if not ok:
                raise LaminaError(f"data read back from {p.id} differs from what was written")
        finally:
            client.close()
    return rows


@main.command()
@click.argument("volume", required=False)
@click.option("--listen", metavar="HOST:PORT", help="TCP address to serve on. [127.0.0.1:10809]")
@click.option("--socket", "sock", metavar="PATH", help="Unix socket to serve on instead.")
@click.option("--read-only", is_flag=True, default=None, help="Export read-only (no lock).")
@click.option("--takeover", is_flag=True, default=None, help="Revoke the current writer first.")
@click.option("--cluster", metavar="FILE", type=click.Path(dir_okay=False), help="Cluster file.")
@click.option("--port-file", type=click.Path(dir_okay=False), help="Write the bound port here.")
@click.option(
    "--io-timeout",
    type=float,
    help="Seconds an I/O may wait for the cluster before it fails with EIO (1-3600). [120]",
)
@click.option("--config", type=click.Path(dir_okay=False), help="TOML config (see etc/nbd.toml).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def nbd(
    volume: str | None,
    listen: str | None,
    sock: str | None,
    read_only: bool | None,
    takeover: bool | None,
    cluster: str | None,
    port_file: str | None,
    io_timeout: float | None,
    config: str | None,
    log_level: str | None,
) -> None:
    """Export VOLUME over NBD (qemu, nbd-client, nbdkit tools, the kernel)."""
    from lamina import daemon
    from lamina.config import load_nbd_config
    from lamina.nbd.export import run_export

    if listen and sock:
        raise click.UsageError("--listen and --socket exclude each other")
    if read_only and takeover:
        raise click.UsageError("--takeover needs a read-write export")
    if listen:
        from lamina.config import parse_addr

        try:
            parse_addr(listen, "--listen")
        except LaminaError as exc:
            raise click.BadParameter(exc.message, param_hint="--listen") from None
    overrides = {
        "volume": volume, "cluster": cluster, "listen": listen, "socket": sock,
        "read_only": read_only, "takeover": takeover, "port_file": port_file,
        "io_timeout": io_timeout, "log_level": log_level,
    }  # fmt: skip
    _run_daemon(lambda: load_nbd_config(config, overrides), lambda cfg: daemon.run(run_export(cfg)))


def _register_cluster_commands() -> None:
    """`status`, `volume ...`, `snapshot ...` and `server ...` live in lamina.clusterctl."""
    from lamina import clusterctl

    for cmd in clusterctl.COMMANDS:
        main.add_command(cmd)


_register_cluster_commands()

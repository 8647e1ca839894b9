"""`club-agent`: run, demo, sandbox, config check, members import/show, devices hash-password,
broker export-mosquitto, store recover.

Exit codes: 0 ok, 2 usage or configuration error, 1 runtime failure. Errors are one clear line; `--debug`
shows the traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from . import __version__
from .config import DEFAULT_CONFIG_PATH, Config, load_config
from .errors import AgentError, ConfigError
from .logs import configure
from .loop import run_async
from .store import repo
from .store.db import Database, recover
from .store.members import apply_members, read_member_file

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Club edge agent: embedded MQTT broker, offline-first check-ins, durable sync.",
)
config_app = typer.Typer(no_args_is_help=True, help="Check configuration files.")
members_app = typer.Typer(no_args_is_help=True, help="The local member cache.")
devices_app = typer.Typer(no_args_is_help=True, help="Device credentials.")
store_app = typer.Typer(no_args_is_help=True, help="The SQLite store.")
broker_app = typer.Typer(no_args_is_help=True, help="The MQTT broker.")
app.add_typer(config_app, name="config")
app.add_typer(members_app, name="members")
app.add_typer(devices_app, name="devices")
app.add_typer(store_app, name="store")
app.add_typer(broker_app, name="broker")

# soft_wrap: a hash or a path piped to a file must stay on one line, whatever the terminal width.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
_debug = False

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Agent config file (TOML).")]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    global _debug
    _debug = debug
    if version:
        out.print(f"club-agent {__version__}")
        raise typer.Exit(0)


def _load(path: Path) -> Config:
    return load_config(path)


@app.command()
def run(config: ConfigOpt = DEFAULT_CONFIG_PATH) -> None:
    """Run broker, decisions and API until SIGTERM or Ctrl-C."""
    import signal

    from .app import Agent

    cfg = _load(config)
    configure(level="debug" if _debug else "info")

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await Agent(cfg).run()

    run_async(main())


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="Stop after this many seconds (0: until Ctrl-C).")] = 0,
    pace: Annotated[float, typer.Option(help="Mean seconds between simulated taps.")] = 1.0,
    members: Annotated[int, typer.Option(help="Demo members to seed.", min=20, max=100_000)] = 60,
) -> None:
    """Everything on loopback with seeded members and simulated readers, button and tablet."""
    from .demo import run_demo

    configure(json=False, level="debug" if _debug else "warning")
    try:
        run_async(run_demo(duration or None, pace, members, out))
    except KeyboardInterrupt:
        out.print("stopped")


@app.command()
def sandbox(
    host: Annotated[
        str, typer.Option(help="Address to listen on. /_sandbox/ has no authentication: keep loopback on shared LANs.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).", min=0, max=65535)] = 8900,
    faults: Annotated[
        Path | None, typer.Option(help='Fault plan to start with: JSON list of rules, or {"rules": [...], "seed": n}.')
    ] = None,
    members: Annotated[int, typer.Option(help="Deterministic members to seed.", min=0, max=1_000_000)] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the members (and of fault rates, unless the plan has one).")] = 1,
    token_ttl: Annotated[float, typer.Option("--token-ttl", help="Access-token lifetime in seconds.", min=1)] = 300,
) -> None:
    """Serve a sandbox Ziggy and club cloud (with fault injection) for dry runs and tests, until Ctrl-C."""
    import signal

    from .sandbox import SandboxOptions, SandboxServer, load_plan_file

    rules: list[Any] = []
    fault_seed = None
    if faults is not None:
        try:
            rules, fault_seed = load_plan_file(faults)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--faults") from exc
    options = SandboxOptions(
        members=members, seed=seed, token_ttl_s=token_ttl, faults=tuple(rules), fault_seed=fault_seed
    )
    configure(json=False, level="debug" if _debug else "warning")

    def show(entry: dict[str, Any]) -> None:
        fault = f" [fault {entry['fault']}]" if entry.get("fault") else ""
        if entry["kind"] == "event":
            line = f"#{entry['n']} event {entry['type']} {entry['device_id']} seq {entry['seq']}{fault}"
        else:
            outcome = "replayed" if entry["replayed"] else "acted" if entry["acted"] else entry["error"] or "no effect"
            line = f"#{entry['n']} {entry['route']} {entry['status'] or 'no answer'} {outcome}{fault}"
        out.print(line, markup=False, highlight=False)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        async with contextlib.AsyncExitStack() as stack:
            try:
                server = await stack.enter_async_context(SandboxServer(options, host=host, port=port))
            except OSError as exc:
                raise AgentError(f"sandbox cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
            settings = server.settings
            base = server.url
            faults_text = f"{len(rules)} fault rule(s) from {faults}" if faults else "no faults"
            out.print(
                f"sandbox cloud on {base}: {members} members (seed {seed}), tokens live {token_ttl:g} s, "
                f"{faults_text}. Ctrl-C stops it.\n\n"
                f"# agent.toml\n{settings.config_toml()}\n"
                f"# secrets.toml (chmod 600)\n{settings.secrets_toml()}\n"
                f"realm {settings.realm}; signing: X-Timestamp + X-Signature = hex(HMAC-SHA256(cloud_signing_secret, "
                f'"{{timestamp}}.{{body}}"))\n'
                f"oracle and controls: {base}/_sandbox/health, received, faults (GET/PUT), clock, members, reset\n"
                f"contracts: {base}/_sandbox/contracts/cloud.openapi.yaml, ziggy.openapi.yaml\n",
                markup=False,
                highlight=False,
            )
            if host not in ("127.0.0.1", "::1", "localhost"):
                err.print(f"warning: anyone who can reach {host}:{server.port} can drive /_sandbox/", markup=False)
            server.sandbox.listeners.append(show)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()

    try:
        run_async(main())
    except KeyboardInterrupt:
        out.print("stopped")


@config_app.command("check")
def config_check(path: Annotated[Path, typer.Argument(help="Config file to validate.")]) -> None:
    """Validate a config file (and its secrets file); exit 2 naming the key if it is wrong."""
    cfg = _load(path)
    summary = (
        f" {path}: club {cfg.agent.club_id}, agent {cfg.agent.agent_id}, {len(cfg.courts)} courts, "
        f"{len(cfg.devices)} devices, destinations: {', '.join(cfg.destinations) or 'none'}"
    )
    out.print(Text.assemble(("OK", "green"), summary))


@members_app.command("import")
def members_import(
    file: Annotated[Path, typer.Argument(help='CSV (header row) or JSON (list, or {"members": [...]}).')],
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
    replace: Annotated[
        bool, typer.Option(help="Replace the whole list (members not in the file are removed).")
    ] = False,
    fmt: Annotated[str, typer.Option("--format", help="auto, csv or json.")] = "auto",
    synced: Annotated[bool, typer.Option(help="Mark the list as freshly synced (resets the cache age).")] = False,
) -> None:
    """Import members into the local cache, atomically, bumping the member-list version."""
    if fmt not in ("auto", "csv", "json"):
        raise typer.BadParameter("expected auto, csv or json", param_hint="--format")
    cfg = _load(config)
    records = read_member_file(file, fmt)  # type: ignore[arg-type]

    async def main() -> None:
        async with Database(cfg.db_path) as db:
            with Progress(
                TextColumn("importing"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err,
                transient=True,
            ) as progress:
                task = progress.add_task("import", total=len(records))
                result = await apply_members(
                    db,
                    records,
                    tz=cfg.domain_policy().timezone,
                    source=f"import:{file.name}",
                    replace=replace,
                    synced_at=datetime.now(UTC) if synced else None,
                    progress=lambda n: progress.advance(task, n),
                )
        out.print(
            f"[green]imported[/] {result.upserted} members, {result.deleted} removed; "
            f"{result.members} in cache; member list version {result.version}"
        )

    run_async(main())


@members_app.command("show")
def members_show(
    key: Annotated[str, typer.Argument(help="A card id (any separators) or a member id.")],
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
) -> None:
    """Show one member: status, cards, credits with unconfirmed local spending, open session."""
    from .domain.decide import effective_credits
    from .domain.model import normalize_card_id

    cfg = _load(config)

    async def main() -> int:
        async with Database(cfg.db_path) as db:
            found = None
            with contextlib.suppress(ValueError):  # not a card id: try it as a member id below
                found = await repo.lookup(db.reader, card_id=normalize_card_id(key))
            if found is None or found.member is None:
                found = await repo.lookup(db.reader, member_id=key)
            if found.member is None:
                err.print(f"no member with card or id '{key}' (member list v{found.cache.version})", markup=False)
                return 1
            m = found.member
            cards = await repo.cards_of(db.reader, m.member_id)
            table = Table(show_header=False, box=None)
            table.add_row("member", f"{m.member_id}  {m.first_name}")
            table.add_row("status", m.status.value)
            table.add_row("cards", ", ".join(cards) or "-")
            table.add_row("valid", f"{m.valid_from or '-'} .. {m.valid_until or '-'}")
            credits = effective_credits(m, found.state)
            table.add_row(
                "credits",
                "-" if credits is None else f"{credits} (synced {m.credits}, local {found.state.pending_credits:+d})",
            )
            table.add_row("groups", ", ".join(sorted(m.groups)) or "-")
            s = found.state.open_session
            table.add_row(
                "session",
                f"open on {s.court_id} since {s.started_at:%Y-%m-%d %H:%M} ({s.session_id})" if s else "none open",
            )
            table.add_row("list", f"version {found.cache.version}, synced {found.cache.synced_at or 'never'}")
            out.print(table)
            return 0

    code = run_async(main())
    if code:
        raise typer.Exit(code)


@devices_app.command("hash-password")
def devices_hash_password(
    generate: Annotated[bool, typer.Option(help="Generate a random password and print it with its hash.")] = False,
    scheme: Annotated[
        str,
        typer.Option(
            help="argon2 (embedded broker only) or pbkdf2 (mosquitto's format: works with both brokers; "
            "needed for broker.mode = external).",
        ),
    ] = "argon2",
) -> None:
    """Print the hash to put in a device's password_hash."""
    from .lan.auth import hash_password

    if scheme not in ("argon2", "pbkdf2"):
        raise typer.BadParameter("expected argon2 or pbkdf2", param_hint="--scheme")

    if generate:
        password = secrets.token_urlsafe(18)
        out.print(f"password: {password}")
    else:
        password = getpass.getpass("device password: ") if sys.stdin.isatty() else sys.stdin.readline().strip()
        if len(password) < 12:
            raise typer.BadParameter("use at least 12 characters (or --generate)", param_hint="password")
    out.print(f'password_hash = "{hash_password(password, "pbkdf2" if scheme == "pbkdf2" else "argon2")}"')


@broker_app.command("export-mosquitto")
def broker_export_mosquitto(
    directory: Annotated[Path, typer.Argument(help="Where to write club-agent.conf, passwd and acl.")],
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
) -> None:
    """Write mosquitto's config, password and access files from the agent's devices (broker.mode = external)."""
    from .lan.mosquitto import export_mosquitto

    files = export_mosquitto(_load(config), directory)
    for path in (files.conf, files.passwd, files.acl):
        out.print(f"wrote {path}", markup=False)
    out.print(
        f"next: sudo ln -sf {files.conf.resolve()} /etc/mosquitto/conf.d/club-agent.conf && "
        f"sudo chgrp mosquitto {files.passwd.resolve()} && sudo systemctl restart mosquitto",
        markup=False,
    )


@store_app.command("recover")
def store_recover(config: ConfigOpt = DEFAULT_CONFIG_PATH) -> None:
    """Move a corrupt database aside and salvage every readable row into a fresh one (agent stopped)."""
    cfg = _load(config)
    report = run_async(recover(cfg.db_path))
    for table, result in report.items():
        out.print(f"{table:<16} {result}", markup=False)


def main() -> None:
    """Entry point: typer handles usage errors (exit 2); our errors become one line."""
    try:
        app()
    except ConfigError as exc:
        if _debug:
            raise
        err.print(Text.assemble(("config error", "red"), f": {exc}"), highlight=False)
        sys.exit(2)
    except AgentError as exc:
        if _debug:
            raise
        err.print(Text.assemble(("error", "red"), f": {exc}"), highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()

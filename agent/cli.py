"""`club-agent`: run, demo, sandbox, config check, members import/show, devices hash-password,
broker export-mosquitto, store recover, outbox status/dead/requeue/purge/audit.

Exit codes: 0 ok, 2 usage or configuration error, 1 runtime failure. Errors are one clear line; `--debug`
shows the traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

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
    invoke_without_command=True,  # so that `club-agent --version` needs no command
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
T = TypeVar("T")


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    global _debug
    _debug = debug
    if version:
        out.print(f"club-agent {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())
        raise typer.Exit(2)


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Our errors become one line and an exit code (2: the configuration, 1: anything else); --debug shows
    them whole."""
    try:
        yield
    except ConfigError as exc:
        if _debug:
            raise
        err.print(Text.assemble(("config error", "red"), f": {exc}"), highlight=False)
        raise typer.Exit(2) from None
    except AgentError as exc:
        if _debug:
            raise
        err.print(Text.assemble(("error", "red"), f": {exc}"), highlight=False)
        raise typer.Exit(1) from None


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
                f"oracle and controls: {base}/_sandbox/health, received, faults (GET/PUT), clock, members, clips,"
                " reset\n"
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


_DOCTOR_STYLES = {"OK": "green", "WARN": "yellow", "FAIL": "bold red", "SKIP": "dim"}


@app.command()
def doctor(
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (ok, checks) for machines.")] = False,
    user: Annotated[
        str, typer.Option("--user", help="The service user whose access to devices and files is checked.")
    ] = "club-agent",  # agent.doctor.SERVICE_USER, the unit's User=
) -> None:
    """Check this box: config, secrets, database, disk, clock, readers, NFC drivers, ports, cloud, Ziggy, cameras.

    Each line is OK, WARN, FAIL or SKIP, with the fix to apply under each WARN and FAIL. Exit 0 when nothing
    failed (warnings allowed), 1 when a check failed, 2 when the config cannot be loaded (the checks that need it
    are skipped) or on a usage error. When the --user does not exist on this machine, the user running the doctor
    is checked in its place, and the lines say so.
    """
    import json

    from .doctor import run_doctor

    report = run_async(run_doctor(config, user=user))
    if as_json:
        typer.echo(json.dumps(report.to_json(), ensure_ascii=False))
        raise typer.Exit(report.exit_code)
    table = _table("check", "status", "detail")
    for check in report.checks:
        table.add_row(
            Text(check.name), Text(check.status.value, style=_DOCTOR_STYLES[check.status.value]), Text(check.detail)
        )
        if check.fix and check.status.value in ("WARN", "FAIL"):
            table.add_row("", "", Text(f"fix: {check.fix}", style="cyan"))
    out.print(table)
    counts = {s: sum(c.status.value == s for c in report.checks) for s in _DOCTOR_STYLES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    out.print(Text.assemble(("healthy" if report.ok else "not ready", "green" if report.ok else "red"), f": {summary}"))
    raise typer.Exit(report.exit_code)


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
                found = await db.read(repo.lookup, card_id=normalize_card_id(key))
            if found is None or found.member is None:
                found = await db.read(repo.lookup, member_id=key)
            if found.member is None:
                err.print(f"no member with card or id '{key}' (member list v{found.cache.version})", markup=False)
                return 1
            m = found.member
            cards = await db.read(repo.cards_of, m.member_id)
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


@members_app.command("sync")
def members_sync(
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
    full: Annotated[
        bool, typer.Option("--full", help="Pull the whole list, not only changes; members not in it are removed.")
    ] = False,
) -> None:
    """Pull member changes from the club cloud now; applied in one transaction (a failure keeps the list)."""
    from .sync.members import MemberSync

    configure(json=False, level="debug" if _debug else "warning")  # skipped records are warned about

    async def main(cfg: Config) -> str:
        # No integrity scan: the running agent did one at its start, and this may run beside it (WAL).
        async with Database(cfg.db_path, check=False) as db:
            sync = MemberSync.from_config(cfg, db)
            try:
                with Progress(
                    TextColumn("syncing members"),
                    BarColumn(),
                    TextColumn("{task.completed:,} received"),
                    TimeElapsedColumn(),
                    console=err,
                    transient=True,
                    disable=not err.is_terminal,  # a pipe or a log gets the summary line alone
                ) as progress:
                    task = progress.add_task("sync", total=None)
                    result = await sync.run(full=full, progress=lambda n: progress.update(task, completed=n))
            finally:
                await sync.aclose()
        return result.summary()

    with _one_line_errors():
        summary = run_async(main(_load(config)))
    out.print(Text.assemble(("synced", "green"), f" {summary}"), highlight=False)


@members_app.command("status")
def members_status(config: ConfigOpt = DEFAULT_CONFIG_PATH) -> None:
    """The member list decisions use: version, source, size, last sync, cursor age, last sync error."""
    from .sync.members import sync_status

    cfg, s = _outbox(config, lambda cfg, db: sync_status(db))
    now = _now_ms()
    table = Table(show_header=False, box=None)
    table.add_row("version", str(s.version))
    table.add_row("source", Text(s.source))
    table.add_row("members", f"{s.members:,}")
    synced = "never" if s.synced_at is None else f"{_when(cfg, s.synced_at)} ({_ago(s.synced_at, now)})"
    table.add_row("last sync", synced)
    if s.cursor is None:
        cursor = "none: the next sync pulls the whole list"
    elif not s.cursor_current:
        cursor = "stale (the list was changed by other means since): the next sync pulls the whole list"
    else:
        cursor = f"age {_age(now - (s.cursor_at or now))}"
    table.add_row("cursor", cursor)
    table.add_row("last attempt", _ago(s.last_attempt_at, now))
    if s.last_error is not None and (s.last_success_at or 0) <= (s.last_error_at or 0):
        table.add_row("last error", Text(f"{_ago(s.last_error_at, now)}: {s.last_error}", style="red"))
    entries = "entry" if s.pending_ledger == 1 else "entries"
    table.add_row("credit ledger", f"{s.pending_ledger} {entries} awaiting the cloud's confirmation")
    out.print(table)


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


# -- outbox ----------------------------------------------------------------------------------------------------

outbox_app = typer.Typer(no_args_is_help=True, help="The outbox: delivery state, dead letters, operator actions.")
app.add_typer(outbox_app, name="outbox")

DestinationOpt = Annotated[
    str | None, typer.Option("--destination", "-d", help="Only this destination (ziggy, cloud); default: all.")
]
SeqsArg = Annotated[list[int] | None, typer.Argument(help="Seqs of dead letters (see 'outbox dead').")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every dead letter (of --destination, or of all).")]


def _outbox(config: Path, work: Callable[[Config, Database], Awaitable[T]]) -> tuple[Config, T]:
    """Run `work` on the agent's database, opened beside a running agent (WAL; no integrity scan, which would
    read the whole file); our errors become one line and an exit code here, so that the commands say the same
    through `main` and through typer's test runner."""

    async def main() -> T:
        path = cfg.db_path
        if not path.exists():
            raise AgentError(f"no database at {path}: has the agent run with this config (agent.data_dir)?")
        async with Database(path, check=False) as db:
            return await work(cfg, db)

    with _one_line_errors():
        cfg = _load(config)
        return cfg, run_async(main())


def _usage(message: str) -> typer.Exit:
    err.print(Text.assemble(("usage error", "red"), f": {message}"), highlight=False)
    return typer.Exit(2)


def _age(ms: float) -> str:
    s = max(0, int(ms // 1000))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def _when(cfg: Config, ms: int | None) -> str:
    """A stored time in the club's time zone."""
    if ms is None:
        return "never"
    return f"{datetime.fromtimestamp(ms / 1000, UTC).astimezone(cfg.domain_policy().timezone):%Y-%m-%d %H:%M:%S}"


def _ago(ms: int | None, now_ms: int) -> str:
    return "never" if ms is None else f"{_age(now_ms - ms)} ago"


def _table(*columns: str) -> Table:
    """Short cells never wrap; the last column (an error, a reason) takes what the terminal has left."""
    from rich import box

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    numbers = ("seq", "pending", "dead", "attempts")
    for column in columns[:-1]:
        table.add_column(column, justify="right" if column in numbers else "left", no_wrap=True)
    table.add_column(columns[-1], overflow="fold", ratio=1)
    return table


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


@outbox_app.command("status")
def outbox_status(config: ConfigOpt = DEFAULT_CONFIG_PATH) -> None:
    """Per destination: pending, dead letters, oldest pending, last success and error, breaker; the pull feed."""
    from .sync import feed, retention, status

    async def work(cfg: Config, db: Database) -> tuple[Any, ...]:
        names = sorted(set(cfg.destinations) | set(await status.known_destinations(db)))
        pruned = await db.read(repo.get_kv, retention.PRUNED_TOTAL_KEY)
        pruned_at = await db.read(repo.get_kv, retention.PRUNED_AT_KEY)
        return await status.destination_states(db, names), await feed.state(db), pruned, pruned_at

    cfg, (states, feed_state, pruned, pruned_at) = _outbox(config, work)
    now = _now_ms()
    table = _table("destination", "pending", "dead", "oldest", "last ok", "breaker", "last error")
    errors = []
    for s in states:
        name = s.destination if s.destination in cfg.destinations else f"{s.destination} (disabled)"
        table.add_row(
            Text(name),
            str(s.pending),
            Text(str(s.dead), style="red" if s.dead else ""),
            "-" if s.oldest_pending_ms is None else _age(now - s.oldest_pending_ms),
            _ago(s.last_success_ms, now),
            Text(s.breaker or "-", style="" if s.breaker in (None, "closed") else "red"),
            "-" if s.last_error is None else _ago(s.last_error_ms, now),
        )
        if s.last_error is not None:  # below the table: an error text needs the whole width
            errors.append(f"{s.destination} last error ({_when(cfg, s.last_error_ms)}): {s.last_error}")
    if states:
        out.print(table)
    else:
        out.print("outbox: no destination configured and no delivery rows")
    for line in errors:
        out.print(line, markup=False, highlight=False)
    if cfg.secrets.cloud_pull_token is None:
        out.print("pull feed: not configured (no cloud_pull_token); retention does not wait for its acks")
    else:
        out.print(
            f"pull feed: acked seq {feed_state.acked_upto} of {feed_state.newest_seq} "
            f"(lag {_n(feed_state.lag, 'event')}), last ack {_ago(feed_state.acked_at_ms, now)}",
            markup=False,
        )
    last = _ago(None if pruned_at is None else int(pruned_at), now)
    out.print(
        f"retention: {cfg.sync.retention_days:g} days; {_n(int(pruned or 0), 'event')} pruned, last {last}",
        markup=False,
    )


@outbox_app.command("dead")
def outbox_dead(
    destination: DestinationOpt = None,
    limit: Annotated[int, typer.Option(help="Show at most this many.", min=1, max=100_000)] = 50,
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
) -> None:
    """List dead letters: events a destination refused for good, with the reason."""
    from .sync import operator, status

    async def work(cfg: Config, db: Database) -> tuple[list[status.DeadLetter], int]:
        names = await operator.check_destination(db, destination, cfg.destinations)
        total = sum(s.dead for s in await status.destination_states(db, names))
        return await status.dead_letters(db, destination, limit), total

    cfg, (letters, total) = _outbox(config, work)
    where = f" on {destination}" if destination else ""
    if not letters:
        out.print(f"no dead letters{where}", markup=False)
        return
    table = _table("seq", "destination", "event", "occurred", "attempts", "reason")
    for d in letters:
        table.add_row(
            str(d.seq),
            Text(d.destination),
            Text(d.type),
            _when(cfg, d.occurred_at_ms),
            str(d.attempts),
            Text(d.reason or "-"),
        )
    out.print(table)
    more = f"; showing the first {len(letters)} (--limit)" if total > len(letters) else ""
    out.print(f"{_n(total, 'dead letter')}{where}{more}", markup=False)


def _selection(seqs: list[int] | None, all_: bool) -> list[int] | None:
    if all_ and seqs:
        raise _usage("give seqs or --all, not both")
    if not all_ and not seqs:
        raise _usage("give the seqs of dead letters (see 'club-agent outbox dead'), or --all")
    if seqs and min(seqs) < 1:
        raise _usage("seqs are positive integers")
    return None if all_ else seqs


def _dead_action(action: Any, config: Path, destination: str | None, seqs: list[int] | None) -> dict[str, int]:
    from .sync import operator

    async def work(cfg: Config, db: Database) -> dict[str, int]:
        names = await operator.check_destination(db, destination, cfg.destinations)
        return await operator.apply(db, action, names, seqs, who=operator.actor(), now_ms=_now_ms())

    return _outbox(config, work)[1]


def _done(verb: str, done: dict[str, int]) -> str:
    if not done:
        return "no dead letters: nothing changed"
    per = ", ".join(f"{name} {n}" for name, n in done.items())
    return f"{verb} {_n(sum(done.values()), 'dead letter')} ({per})"


@outbox_app.command("requeue")
def outbox_requeue(
    seqs: SeqsArg = None,
    all_: AllOpt = False,
    destination: DestinationOpt = None,
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
) -> None:
    """Send dead letters again: dead -> pending, attempts reset. A running agent picks them up within 30 s."""
    selected = _selection(seqs, all_)
    done = _dead_action("requeue", config, destination, selected)
    out.print(_done("requeued", done) + ("; the agent sends them within 30 s" if done else ""), markup=False)


@outbox_app.command("purge")
def outbox_purge(
    seqs: SeqsArg = None,
    all_: AllOpt = False,
    destination: DestinationOpt = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm: those destinations will never get these events.")
    ] = False,
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
) -> None:
    """Give up on dead letters: their delivery rows are deleted (the events stay in the log), and it is audited."""
    selected = _selection(seqs, all_)
    if not yes:
        raise _usage("purge gives up on delivering these events to the destination for good: add --yes")
    out.print(_done("purged", _dead_action("purge", config, destination, selected)), markup=False)


@outbox_app.command("audit")
def outbox_audit(
    limit: Annotated[int, typer.Option(help="Show the newest this many.", min=1, max=100_000)] = 50,
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
) -> None:
    """Every requeue and purge: when, who, what."""
    import json

    from .sync import operator

    async def work(cfg: Config, db: Database) -> list[operator.AuditEntry]:
        return await operator.audit_log(db, limit)

    cfg, entries = _outbox(config, work)
    if not entries:
        out.print("no operator actions recorded")
        return
    table = _table("when", "actor", "action", "destination", "what")
    for e in entries:
        try:
            detail = json.loads(e.detail)
            what = f"{detail['count']} ({detail['seqs']})"
            if detail.get("reasons"):
                what += ": " + "; ".join(f"{reason or '-'} x{n}" for reason, n in detail["reasons"].items())
        except (ValueError, KeyError, TypeError):
            what = e.detail
        table.add_row(_when(cfg, e.at_ms), Text(e.actor), e.action, Text(e.destination or "-"), Text(what))
    out.print(table)


provision_app = typer.Typer(no_args_is_help=True, help="Setting a box up: claim it for its club.")
app.add_typer(provision_app, name="provision")


@provision_app.command("claim")
def provision_claim(
    token: Annotated[
        str,
        typer.Option(
            "--token",
            envvar="CLUB_AGENT_CLAIM_TOKEN",
            help="The one-time claim token from the club's cloud account (or $CLUB_AGENT_CLAIM_TOKEN, which keeps it"
            " out of the process list).",
        ),
    ],
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
    cloud_url: Annotated[
        str | None, typer.Option(help="The club cloud's address, if the config does not have it yet.")
    ] = None,
) -> None:
    """Trade a claim token for this box's credentials: secrets into the secrets file (0600), ids and courts
    into the config. Exit 2 when the cloud refuses the token (used, expired, unknown), 1 when it cannot be asked."""
    from .provision import ClaimRefused, claim

    try:
        claimed = run_async(claim(config, token, cloud_url=cloud_url, version=__version__))
    except ClaimRefused as exc:
        err.print(Text.assemble(("claim refused", "red"), f": {exc}"), highlight=False)
        raise typer.Exit(2) from None
    except FileNotFoundError as exc:
        err.print(Text.assemble(("error", "red"), f": {exc.filename} does not exist"), highlight=False)
        raise typer.Exit(1) from None
    except AgentError as exc:
        err.print(Text.assemble(("error", "red"), f": {exc}"), highlight=False)
        raise typer.Exit(1) from None
    courts = ", ".join(f"{court_id} ({name})" for court_id, name in claimed.courts) or "none listed"
    out.print(
        f"claimed: club {claimed.club_id}, agent {claimed.agent_id} ({claimed.site_name}); courts: {courts}\n"
        f"config: {claimed.config_path}\nsecrets: {claimed.secrets_path} (mode 0600)",
        highlight=False,
    )


def main() -> None:
    """Entry point: typer handles usage errors (exit 2); our errors become one line."""
    try:
        with _one_line_errors():
            app()
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

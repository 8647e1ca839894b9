"""`club-agent doctor`: is this box ready to run the agent, and if not, what to do about it.

Each check is a small function returning a `Check(name, status, detail, fix)`; status OK, WARN, FAIL or SKIP:

    config          load_config: the config file and everything it names (ConfigError's message, key path)
    secrets         the secrets file: exists, mode (no world access, not group-writable), readable by the service
                    user, parses, holds the secrets of the enabled destinations
    database        read-only open and `PRAGMA quick_check`, schema version; the data directory writable
    disk            free space on the data directory's file system against what media.budget_mb still needs;
                    current usage (agent.media.budget.measure) against the budget's levels
    clock           synced (the kernel's NTP state, else timesyncd's flag)
    serial:<id>     each attached reader's device exists and is readable and writable by the service user
    nfc             kernel NFC drivers (pn533 and friends) loaded while an NFC reader is attached
    port:<name>     the broker's and the API's listening ports are free, or held by a running `club-agent run`
    cloud           a client-credentials token from the token endpoint, then GET /edge/members?limit=1
    ziggy           GET /access/sessions/active with the API key
    camera:<id>     a TCP connect and an RTSP OPTIONS to each camera
    ffmpeg          on the PATH when cameras are configured

All run concurrently: the network checks as coroutines with a timeout each (the constants below), the blocking
ones (files, devices, psutil) on threads; the whole run is bounded by TOTAL_TIMEOUT_S. When the config cannot be
loaded, the checks that need it are skipped and say why. Nothing here prints a secret: camera URLs are masked,
secrets are named, never shown. The service user's access is judged from the mode bits and its groups (root
passes them all; ACLs are not read), or by the kernel (os.access) when it is this process's own user.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import functools
import grp
import os
import pwd
import shutil
import socket
import sqlite3
import stat
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs in [dev]: types-psutil would give them

from . import config as config_module
from .clock import _TIMESYNCD_FLAG, _kernel_clock_synced
from .config import Config, ReaderConfig, check_secrets_mode, load_config, parse_config
from .errors import ConfigError
from .media.budget import Level, Usage, measure
from .media.recorder import mask_url
from .store.db import migrations
from .sync.cloud import CloudClient, TokenSource
from .sync.delivery import Permanent, Transient, Unauthorized, judge

SERVICE_USER = "club-agent"  # the user systemd runs the agent as
SERVICE = "club-agent"  # the unit's name, in fixes
PROC_MODULES = Path("/proc/modules")

TOTAL_TIMEOUT_S = 10.0  # the whole run; every check below has its own, shorter limit
CLOUD_TIMEOUT_S = 8.0  # token request plus one authenticated call
ZIGGY_TIMEOUT_S = 6.0  # Ziggy's own call timeout is 5 s (agent/sync/ziggy.py)
CAMERA_TIMEOUT_S = 4.0  # TCP connect plus the OPTIONS answer's status line
BROKER_CONNECT_TIMEOUT_S = 4.0  # broker.mode = external: the site's broker
DATABASE_TIMEOUT_S = 8.0  # quick_check of a large database on an SD card; interrupted after this
DISK_TIMEOUT_S = 6.0  # walking the clips and the ring

DISK_MARGIN = 0.10  # of the budget: less free space than the budget still needs plus this is a warning
RTSP_DEFAULT_PORT = 554
RTSPS_DEFAULT_PORT = 322
RTSP_LINE_MAX = 512  # the status line of an OPTIONS answer; anything longer is not a camera talking
# Kernel drivers that claim NFC readers before nfcpy can (pn533_usb binds the USB device), in unload order.
NFC_MODULES = ("pn533_usb", "pn532_uart", "port100", "pn533", "nfc")
MB = 1024 * 1024


class Status(enum.StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True, slots=True)
class Report:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return not any(c.status is Status.FAIL for c in self.checks)

    @property
    def exit_code(self) -> int:
        """0: nothing failed (warnings allowed); 2: the config could not be loaded, so most checks did not run
        (the CLI's configuration-error code); 1: any other check failed."""
        if any(c.name == "config" and c.status is Status.FAIL for c in self.checks):
            return 2
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.to_json() for c in self.checks]}


@dataclass(frozen=True, slots=True)
class Host:
    """Where the doctor looks at the machine. Tests point these at files of their own."""

    proc_modules: Path = PROC_MODULES
    timesyncd_flag: Path = _TIMESYNCD_FLAG
    kernel_clock_synced: Callable[[], bool | None] = _kernel_clock_synced
    search_path: str | None = None  # the PATH ffmpeg is looked up in; None: this process's


# -- the service user --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    """The user whose access to files and devices is checked: the service user, or this process's user when
    the service user does not exist on this machine (a developer's laptop, before setup.sh ran)."""

    name: str
    uid: int
    gids: frozenset[int]
    stand_in_for: str | None = None  # the service user this account stands in for

    @classmethod
    def resolve(cls, name: str) -> Account:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            uid = os.geteuid()
            groups = frozenset(os.getgroups()) | {os.getegid()}
            try:
                own = pwd.getpwuid(uid).pw_name
            except KeyError:  # a uid with no passwd entry (a container's, a systemd DynamicUser's)
                own = str(uid)
            return cls(own, uid, groups, stand_in_for=name)
        return cls(entry.pw_name, entry.pw_uid, frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid)))

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    @property
    def label(self) -> str:
        if self.stand_in_for is not None:
            return f"{self.name} (user {self.stand_in_for} does not exist here)"
        return self.name

    @property
    def fix_user(self) -> str:
        """The user a fix should name: the service user, even when someone else stood in for it."""
        return self.stand_in_for or self.name

    def may(self, path: Path, want: int) -> bool:
        """Whether this user may access `path` as `want` (os.R_OK | os.W_OK | os.X_OK). For this process's own
        user the kernel answers (ACLs included); for another user, the owner/group/other mode bits do, as the
        kernel applies them (the owner's bits alone for the owner, the group's alone for a member)."""
        if self.is_self:
            return os.access(path, want)
        if self.uid == 0:
            return True
        st = path.stat()
        if st.st_uid == self.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in self.gids:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return bits & want == want


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


# -- config and secrets ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Loaded:
    """What loading the config gave: the config (None when it is invalid), the config check, where the secrets
    file is, and load_config's refusal when it was the secrets file alone that load_config refused."""

    cfg: Config | None
    check: Check
    secrets_path: Path | None = None
    secrets_error: ConfigError | None = None


def load(path: Path, environ: Mapping[str, str] | None = None) -> Loaded:
    """load_config's verdict; when it refuses only because of the secrets file, the config without its secrets,
    so that the other checks still run and the secrets check says what is wrong with that file."""
    env = os.environ if environ is None else environ
    try:
        cfg = load_config(path, env)
    except ConfigError as exc:
        refused = exc
    else:
        return Loaded(cfg, _config_ok(path, cfg, ""), _secrets_path(path, cfg.agent.secrets_file))
    try:
        raw = config_module._read_toml(path, "config file")
        origins = config_module._apply_env(raw, env)
        agent = raw.get("agent")
        secrets_file = agent.pop("secrets_file", None) if isinstance(agent, dict) else None
        cfg = parse_config(raw, source=str(path), base_dir=path.parent.resolve(), from_env=origins)
    except ConfigError:
        return Loaded(None, Check("config", Status.FAIL, str(refused), _config_fix(path, refused)))
    if not isinstance(secrets_file, str):  # not about the secrets file after all
        return Loaded(None, Check("config", Status.FAIL, str(refused), _config_fix(path, refused)))
    return Loaded(
        cfg,
        _config_ok(path, cfg, "; its secrets file is refused (see secrets)"),
        _secrets_path(path, Path(secrets_file)),
        refused,
    )


def _secrets_path(config_path: Path, secrets_file: Path | None) -> Path | None:
    if secrets_file is None or secrets_file.is_absolute():
        return secrets_file
    return config_path.parent.resolve() / secrets_file


def _config_ok(path: Path, cfg: Config, note: str) -> Check:
    destinations = ", ".join(cfg.destinations) or "none"
    return Check(
        "config",
        Status.OK,
        f"{path}: club {cfg.agent.club_id}, agent {cfg.agent.agent_id}, {len(cfg.courts)} courts, "
        f"{len(cfg.all_devices)} devices, {len(cfg.cameras)} cameras, destinations: {destinations}{note}",
    )


def _config_fix(path: Path, exc: ConfigError) -> str:
    text = str(exc)
    if "not found" in text and str(path) in text:
        return f"create {path} from provisioning/agent.example.toml"
    where = f" at {exc.key}" if exc.key else ""
    return f"edit {path}{where}, then re-check with: club-agent config check {path}"


def _needed_secrets(cfg: Config) -> list[tuple[str, str]]:
    """(secrets key, what needs it) for the secrets the agent cannot work without."""
    needed = []
    if "ziggy" in cfg.destinations:
        needed.append(("ziggy_api_key", "[ziggy]"))
    if "cloud" in cfg.destinations:
        needed += [("cloud_client_secret", "[cloud]"), ("cloud_signing_secret", "[cloud]")]
    if cfg.broker.mode == "external":
        needed.append(("broker_password", 'broker.mode = "external"'))
    return needed


def check_secrets(loaded: Loaded, account: Account) -> Check:
    cfg = loaded.cfg
    assert cfg is not None
    path = loaded.secrets_path
    needed = _needed_secrets(cfg)
    example = "provisioning/secrets.example.toml"
    owner = account.fix_user
    if path is None:
        if not needed:
            return Check("secrets", Status.OK, "no secrets file configured, and nothing enabled needs one")
        keys = ", ".join(k for k, _ in needed)
        return Check(
            "secrets",
            Status.FAIL,
            f"agent.secrets_file is not set, but {keys} are needed",
            f"create /etc/club-agent/secrets.toml from {example} (chown {owner}, chmod 600) and set "
            f'agent.secrets_file = "secrets.toml" in the config',
        )
    try:
        st = path.stat()
    except FileNotFoundError:
        return Check(
            "secrets",
            Status.FAIL,
            f"secrets file not found: {path}",
            f"create it from {example}, then: chown {owner} {path} && chmod 600 {path}",
        )
    mode = stat.S_IMODE(st.st_mode)
    try:
        check_secrets_mode(path)
    except ConfigError:
        loose = "world-accessible" if mode & stat.S_IRWXO else "group-writable"
        return Check("secrets", Status.FAIL, f"{path}: mode {mode:04o} is {loose}", f"chmod 600 {path}")
    if not account.may(path, os.R_OK):
        return Check(
            "secrets",
            Status.FAIL,
            f"{path}: not readable by {account.label} (owner {_user_name(st.st_uid)}, mode {mode:04o})",
            f"chown {owner} {path} && chmod 600 {path}",
        )
    if loaded.secrets_error is not None:
        return Check("secrets", Status.FAIL, str(loaded.secrets_error), f"edit {path} (see {example})")
    missing = [(key, by) for key, by in needed if getattr(cfg.secrets, key) is None]
    if missing:
        return Check(
            "secrets",
            Status.FAIL,
            f"{path}: missing " + ", ".join(f"{key} (needed by {by})" for key, by in missing),
            f"add {', '.join(key for key, _ in missing)} to {path}",
        )
    tokens = [f"api_tokens.{c.name}" for c in cfg.api.clients if c.name not in cfg.secrets.api_tokens]
    passwords = [
        f"camera_passwords.{c.id}"
        for c in cfg.cameras
        if c.username is not None and c.id not in cfg.secrets.camera_passwords
    ]
    if tokens or passwords:
        effects = [f"no {', '.join(tokens)}: those API clients cannot call"] if tokens else []
        effects += [f"no {', '.join(passwords)}: those cameras cannot log in"] if passwords else []
        return Check(
            "secrets", Status.WARN, f"{path}: {'; '.join(effects)}", f"add {', '.join(tokens + passwords)} to {path}"
        )
    held = ", ".join(k for k, _ in needed) or "nothing required"
    return Check("secrets", Status.OK, f"{path}: mode {mode:04o}, owner {_user_name(st.st_uid)}; holds {held}")


# -- database and disk -------------------------------------------------------------------------------------------


def _database_access(cfg: Config, account: Account) -> Check | None:
    """The data directory writable by the service user, and the database there; None: go on to quick_check."""
    path = cfg.db_path
    data_dir = _existing(cfg.agent.data_dir)
    if not account.may(data_dir, os.W_OK | os.X_OK):
        target = cfg.agent.data_dir
        return Check(
            "database",
            Status.FAIL,
            f"{data_dir} is not writable by {account.label}: the agent cannot create or grow {path.name} there",
            f"install -d -o {account.fix_user} -g {account.fix_user} -m 750 {target}"
            if data_dir != target
            else f"chown -R {account.fix_user}: {target}",
        )
    if not path.exists():
        return Check("database", Status.WARN, f"no database at {path} yet: the agent creates it at its first start")
    return None


def _quick_check(path: Path, opened: list[sqlite3.Connection]) -> tuple[list[str], int, int]:
    """On a thread: quick_check's lines, the schema version and the size, read-only. The connection goes into
    `opened` so that the loop can interrupt() a scan that takes too long."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    opened.append(conn)
    try:
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    finally:
        conn.close()
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    return problems, int(version), size


async def check_database(cfg: Config, config_path: Path, account: Account) -> Check:
    path = cfg.db_path
    found = await asyncio.to_thread(_database_access, cfg, account)
    if found is not None:
        return found
    recover = f"systemctl stop {SERVICE} && club-agent store recover --config {config_path}"
    opened: list[sqlite3.Connection] = []
    work = asyncio.ensure_future(asyncio.to_thread(_quick_check, path, opened))
    try:
        problems, version, size = await asyncio.wait_for(asyncio.shield(work), DATABASE_TIMEOUT_S)
    except TimeoutError:
        for conn in opened:
            conn.interrupt()
        with contextlib.suppress(sqlite3.Error):
            await work
        return Check(
            "database",
            Status.WARN,
            f"{path}: quick_check did not finish within {DATABASE_TIMEOUT_S:g} s (a large database on a slow "
            "card?); the agent runs it in full at its start",
        )
    except sqlite3.Error as exc:
        if "malformed" in str(exc) or "not a database" in str(exc):
            return Check("database", Status.FAIL, f"{path}: corrupt or not a database ({exc})", recover)
        return Check("database", Status.FAIL, f"{path}: cannot read it: {exc}", f"check the permissions of {path}")
    except BaseException:  # cancelled: stop the scan on its thread
        for conn in opened:
            conn.interrupt()
        raise
    if problems != ["ok"]:
        return Check("database", Status.FAIL, f"{path}: quick_check failed: {'; '.join(problems[:3])}", recover)
    known = len(migrations())
    if version > known:
        return Check(
            "database",
            Status.FAIL,
            f"{path}: schema version {version} is newer than this build knows ({known})",
            "upgrade the agent (a downgrade cannot read this database)",
        )
    pending = "" if version == known else f"; migrations {version + 1}..{known} run at the next start"
    return Check("database", Status.OK, f"{path}: quick_check ok, schema {version}, {size / MB:.1f} MB{pending}")


def _disk_numbers(cfg: Config, budget: int) -> tuple[Usage, Path, int]:
    """Blocking: what the budget holds now, where the data directory's file system is, and its free bytes."""
    usage = measure(cfg.db_path, cfg.clips_path, cfg.ring_path, budget)
    where = _existing(cfg.agent.data_dir)
    return usage, where, shutil.disk_usage(where).free


async def check_disk(cfg: Config, config_path: Path) -> Check:
    media = cfg.media
    budget = media.budget_mb * MB
    usage, where, free = await asyncio.wait_for(asyncio.to_thread(_disk_numbers, cfg, budget), DISK_TIMEOUT_S)
    still_needed = max(0, budget - usage.total)
    level = usage.level(media.warn_pct, media.critical_pct)
    detail = (
        f"{free / MB:,.0f} MB free on the file system of {where}; budget {media.budget_mb:,} MB "
        f"(media.budget_mb), {usage.total / MB:,.0f} MB used ({usage.pct:.0f}%: database {usage.database / MB:,.0f}, "
        f"clips {usage.clips / MB:,.0f}, ring {usage.ring / MB:,.0f})"
    )
    lower = f"or lower media.budget_mb in {config_path} to at most {(usage.total + free) // MB:,}"
    if free < still_needed:
        return Check(
            "disk",
            Status.FAIL,
            f"{detail}: the budget still needs {still_needed / MB:,.0f} MB",
            f"free {(still_needed - free) / MB:,.0f} MB on that file system (or use a bigger card), {lower}",
        )
    if level is Level.OVER:
        return Check(
            "disk",
            Status.FAIL,
            f"{detail}: over the budget",
            f"raise media.budget_mb in {config_path}, or let the agent evict clips (uploaded first); "
            "check 'club-agent outbox status' for what waits to be sent",
        )
    if free < still_needed + budget * DISK_MARGIN:
        return Check(
            "disk",
            Status.WARN,
            f"{detail}: less than {DISK_MARGIN:.0%} of the budget to spare beyond it",
            f"free space on that file system, {lower}",
        )
    if level is not Level.OK:
        return Check(
            "disk",
            Status.WARN,
            f"{detail}: at the {level.value} level ({media.warn_pct}%/{media.critical_pct}%)",
            "clips are evicted, uploaded ones first; check 'club-agent outbox status' for clips waiting to be "
            "sent, or raise media.budget_mb",
        )
    return Check("disk", Status.OK, detail)


# -- clock -------------------------------------------------------------------------------------------------------


def check_clock(trust_clock: bool, kernel_synced: bool | None, timesyncd_flag: Path) -> Check:
    if trust_clock:
        return Check("clock", Status.OK, "agent.trust_clock = true: the wall clock is taken as synced")
    if kernel_synced is None:
        synced, source = timesyncd_flag.exists(), f"timesyncd ({timesyncd_flag})"
    else:
        synced, source = kernel_synced, "the kernel's NTP state"
    if synced:
        return Check("clock", Status.OK, f"synced ({source})")
    return Check(
        "clock",
        Status.WARN,
        f"not synced ({source}): decisions still work; events are stamped clock_synced = false and "
        "corrected once the clock syncs",
        "timedatectl set-ntp true (then timedatectl timesync-status: is an NTP server reachable?)",
    )


# -- attached readers --------------------------------------------------------------------------------------------


_RW = os.R_OK | os.W_OK


def _device_of(reader: ReaderConfig) -> tuple[str, str, int] | None:
    """(device path, the group that usually owns it, the access the agent needs) of a reader attached to the
    box; None when there is no device node to check (a pyserial URL, nfcpy's usb or udp paths)."""
    if reader.kind in config_module._SERIAL_KINDS and reader.port:
        return (reader.port, "dialout", _RW) if reader.port.startswith("/") else None
    if reader.kind == "keywedge" and reader.path:
        return reader.path, "input", os.R_OK  # read, and grabbed with an ioctl on the same descriptor
    if reader.kind == "nfc" and reader.path and reader.path.startswith("tty:"):
        return f"/dev/tty{reader.path.split(':')[1]}", "dialout", _RW
    return None


def check_serial(reader: ReaderConfig, account: Account) -> Check:
    name = f"serial:{reader.id}"
    found = _device_of(reader)
    if found is None:
        where = reader.port or reader.path
        return Check(name, Status.SKIP, f"{where}: not a device node (nothing to check here)")
    device, usual_group, want = found
    needs = "readable and writable" if want == _RW else "readable"
    path = Path(device)
    stable = f"/dev/club-reader-{reader.id}"
    if not path.exists():
        if device == stable:
            naming = (
                f"if it is attached, the udev rule that names it {stable} does not match it: compare the rule with "
                "'udevadm info -q property /dev/ttyUSB0' (the reader's own device)"
            )
        else:
            naming = f"the udev rules give each reader a stable name ({stable}): use it as its port"
        return Check(
            name,
            Status.FAIL,
            f"{device} not found ({reader.kind} reader {reader.id})",
            f"check the reader's cable and power; 'ls -l /dev/serial/by-id/' lists what is attached; {naming}",
        )
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    group = _group_name(st.st_gid)
    shown = f"{device} (mode {mode:04o}, {_user_name(st.st_uid)}:{group})"
    if not stat.S_ISCHR(st.st_mode):
        return Check(name, Status.FAIL, f"{shown} is not a character device", "point readers.port at the device")
    if account.may(path, want):
        return Check(name, Status.OK, f"{shown}: {needs} by {account.label}")
    user = account.fix_user
    if (mode >> 3) & want == want:  # the group may: the user is not in it
        fix = f"usermod -aG {group} {user} && systemctl restart {SERVICE}"
    else:
        fix = (
            f'the device\'s mode gives its group no access: a udev rule with GROUP="{usual_group}", '
            f'MODE="0660" and SYMLINK+="club-reader-{reader.id}", then usermod -aG {usual_group} {user}'
        )
    return Check(name, Status.FAIL, f"{shown}: not {needs} by {account.label}", fix)


def check_nfc(cfg: Config, proc_modules: Path) -> Check:
    readers = [r for r in cfg.readers if r.kind == "nfc" and r.path and not r.path.startswith("udp")]
    if not readers:
        return Check("nfc", Status.SKIP, "no NFC reader attached")
    try:
        text = proc_modules.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return Check("nfc", Status.WARN, f"cannot read {proc_modules} ({exc.strerror}): kernel NFC drivers not checked")
    loaded = {line.split(maxsplit=1)[0] for line in text.splitlines() if line.strip()}
    conflicting = [m for m in NFC_MODULES if m in loaded]
    ids = ", ".join(r.id for r in readers)
    if not conflicting:
        return Check("nfc", Status.OK, f"no kernel NFC driver loaded (readers {ids} are nfcpy's)")
    mods = " ".join(conflicting)
    return Check(
        "nfc",
        Status.FAIL,
        f"kernel NFC driver(s) loaded: {', '.join(conflicting)}: they claim the reader ({ids}) before nfcpy can",
        f"printf 'blacklist %s\\n' {mods} > /etc/modprobe.d/club-agent-nfc.conf && modprobe -r {mods} "
        f"&& systemctl restart {SERVICE}",
    )


# -- listening ports ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    key: str  # the config key of its port
    host: str
    port: int


def listeners(cfg: Config) -> list[Listener]:
    out = []
    if cfg.broker.mode == "embedded":
        b = cfg.broker
        for name, key, port in (
            ("broker", "broker.port", b.port),
            ("broker-ws", "broker.ws_port", b.ws_port),
            ("broker-tls", "broker.tls_port", b.tls_port),
        ):
            if port:
                out.append(Listener(name, key, b.host, port))
    if cfg.api.enabled and cfg.api.port:
        out.append(Listener("api", "api.port", cfg.api.host, cfg.api.port))
    return out


def _try_bind(host: str, port: int) -> None:
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the broker does: TIME_WAIT is no holder
        sock.bind(address)


def _is_agent_run(cmdline: list[str]) -> bool:
    """`club-agent run`, as the unit starts it (the console script) or as `python -m agent.cli run`."""
    script = any(Path(arg).name == "club-agent" for arg in cmdline[:2])
    module = "agent.cli" in cmdline[1:3]
    return (script or module) and "run" in cmdline


def _holder(port: int) -> tuple[str, bool]:
    """Who listens on `port`: a description, and whether it is a running club-agent."""
    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return "another process (run the doctor as root to name it)", False
    pids = {c.pid for c in connections if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN}
    for pid in sorted(p for p in pids if p is not None):
        try:
            process = psutil.Process(pid)
            cmdline = process.cmdline()
            name = process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if _is_agent_run(cmdline):
            return f"the running club-agent (pid {pid})", True
        shown = " ".join(" ".join(cmdline).split())[:80] or name  # one line, whatever the arguments hold
        return f"{name} (pid {pid}: {shown})", False
    return "another process (run the doctor as root to name it)", False


def check_listener(listener: Listener, config_path: Path) -> Check:
    name = f"port:{listener.name}"
    where = f"{listener.host}:{listener.port} ({listener.key})"
    try:
        _try_bind(listener.host, listener.port)
    except socket.gaierror as exc:
        return Check(name, Status.FAIL, f"{listener.host}: not an address ({exc.strerror})", f"fix it in {config_path}")
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            holder, ours = _holder(listener.port)
            if ours:
                return Check(name, Status.OK, f"{where}: held by {holder}")
            return Check(
                name,
                Status.FAIL,
                f"{where}: taken by {holder}",
                f"stop that process (Debian's mosquitto: systemctl disable --now mosquitto), or set {listener.key} "
                f"to a free port in {config_path}",
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return Check(
                name,
                Status.FAIL,
                f"{where}: {listener.host} is not an address of this machine",
                f"set the listener's host to this box's LAN address, or 0.0.0.0, in {config_path}",
            )
        if exc.errno == errno.EACCES:
            return Check(
                name,
                Status.FAIL,
                f"{where}: ports below 1024 need a privilege",
                "use a port from 1024 up, or AmbientCapabilities=CAP_NET_BIND_SERVICE in the unit",
            )
        return Check(name, Status.FAIL, f"{where}: cannot listen: {exc.strerror or exc}")
    return Check(name, Status.OK, f"{where}: free")


async def check_external_broker(cfg: Config) -> Check:
    b = cfg.broker
    where = f"{b.external_host}:{b.external_port}"
    try:
        async with asyncio.timeout(BROKER_CONNECT_TIMEOUT_S):
            _, writer = await asyncio.open_connection(b.external_host, b.external_port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return Check(
            "port:broker",
            Status.FAIL,
            f'broker.mode = "external": the site\'s broker at {where}: {why}',
            "systemctl status mosquitto (and see 'club-agent broker export-mosquitto')",
        )
    return Check("port:broker", Status.OK, f'broker.mode = "external": the site\'s broker at {where} answers')


# -- cloud and Ziggy ---------------------------------------------------------------------------------------------


def _network_fix(url: str, reason: str) -> str:
    host = urlsplit(url).hostname or url
    if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate" in reason.lower():
        return f"TLS to {host} failed: check the clock (timedatectl) and any proxy in between"
    return f"check the box's internet connection and DNS (getent hosts {host}), and the URL in the config"


async def check_cloud(cfg: Config) -> Check:
    section = cfg.cloud
    if section is None:
        return Check("cloud", Status.SKIP, "no [cloud] section")
    if not section.enabled:
        return Check("cloud", Status.SKIP, "cloud.enabled = false")
    secret = cfg.secrets.cloud_client_secret
    if secret is None:
        return Check("cloud", Status.SKIP, "no cloud_client_secret loaded (see secrets)")
    signing = cfg.secrets.cloud_signing_secret
    credentials_fix = (
        f"check cloud.client_id ('{section.client_id}') in the config and cloud_client_secret in the secrets"
    )
    async with httpx.AsyncClient() as client:
        try:
            await TokenSource(client, section.token_url, section.client_id, secret.get_secret_value()).token()
        except Transient as exc:
            if isinstance(exc.__cause__, Unauthorized):
                return Check(
                    "cloud",
                    Status.FAIL,
                    f"token endpoint {section.token_url} refused client '{section.client_id}': {exc.__cause__}",
                    credentials_fix,
                )
            return Check(
                "cloud",
                Status.FAIL,
                f"token endpoint {section.token_url}: {exc.reason}",
                _network_fix(section.token_url, exc.reason),
            )
        except Permanent as exc:
            return Check("cloud", Status.FAIL, f"token endpoint {section.token_url}: {exc.reason}", credentials_fix)
        cloud = CloudClient(section, secret.get_secret_value(), signing.get_secret_value() if signing else "", client)
        url = f"{section.base_url.rstrip('/')}/edge/members?limit=1"
        try:
            await cloud.request("GET", "/edge/members", params={"limit": 1})
        except Transient as exc:
            fix = credentials_fix if isinstance(exc.__cause__, Unauthorized) else _network_fix(url, exc.reason)
            return Check("cloud", Status.FAIL, f"token accepted; GET {url}: {exc.reason}", fix)
        except Permanent as exc:
            return Check(
                "cloud", Status.FAIL, f"token accepted; GET {url}: {exc.reason}", "check cloud.base_url in the config"
            )
    return Check("cloud", Status.OK, f"client '{section.client_id}' got a token; GET {url} answered")


async def check_ziggy(cfg: Config) -> Check:
    section = cfg.ziggy
    if section is None:
        return Check("ziggy", Status.SKIP, "no [ziggy] section")
    if not section.enabled:
        return Check("ziggy", Status.SKIP, "ziggy.enabled = false")
    key = cfg.secrets.ziggy_api_key
    if key is None:
        return Check("ziggy", Status.SKIP, "no ziggy_api_key loaded (see secrets)")
    url = f"{section.base_url.rstrip('/')}/access/sessions/active"
    headers = {"Authorization": f"Bearer {key.get_secret_value()}", "X-Client-Id": section.client_id}
    async with httpx.AsyncClient() as client:
        try:
            response = await client.get(url, headers=headers, timeout=ZIGGY_TIMEOUT_S)
        except httpx.HTTPError as exc:
            reason = f"{exc.__class__.__name__}: {exc}"[:200]
            return Check("ziggy", Status.FAIL, f"GET {url}: {reason}", _network_fix(url, reason))
    try:
        answer = judge(response)
    except Unauthorized as exc:
        return Check(
            "ziggy",
            Status.FAIL,
            f"GET {url}: HTTP 401: {exc}",
            f"check ziggy_api_key in the secrets and ziggy.client_id ('{section.client_id}') in the config",
        )
    except (Transient, Permanent) as exc:
        return Check("ziggy", Status.FAIL, f"GET {url}: {exc.reason}", "check ziggy.base_url in the config")
    count = f"{len(answer)} active sessions" if isinstance(answer, list) else "answered"
    return Check("ziggy", Status.OK, f"client '{section.client_id}': GET {url}: {count}")


# -- cameras -----------------------------------------------------------------------------------------------------


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def check_camera(cfg: Config, index: int) -> Check:
    camera = cfg.cameras[index]
    name = f"camera:{camera.id}"
    parts = urlsplit(camera.url)
    host = parts.hostname or ""
    secure = parts.scheme == "rtsps"
    port = parts.port or (RTSPS_DEFAULT_PORT if secure else RTSP_DEFAULT_PORT)
    shown = mask_url(camera.url)
    unreachable_fix = (
        f"check the camera's power and network (ping {host}) and its address and RTSP port in cameras[{index}].url"
    )
    try:
        async with asyncio.timeout(CAMERA_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port, limit=RTSP_LINE_MAX)
            try:
                if secure:
                    line = b""
                else:
                    request = (
                        f"OPTIONS {_without_userinfo(camera.url)} RTSP/1.0\r\nCSeq: 1\r\n"
                        f"User-Agent: club-agent-doctor\r\n\r\n"
                    )
                    writer.write(request.encode())
                    await writer.drain()
                    line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return Check(name, Status.FAIL, f"{shown}: no answer within {CAMERA_TIMEOUT_S:g} s", unreachable_fix)
    except (OSError, ValueError) as exc:  # ValueError: a status line longer than RTSP_LINE_MAX
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or exc.__class__.__name__
        return Check(name, Status.FAIL, f"{shown}: {host}:{port}: {why}", unreachable_fix)
    if secure:
        return Check(name, Status.OK, f"{shown}: TCP connect ok (rtsps: the RTSP answer is not checked)")
    words = line.decode("latin-1").split()
    if len(words) < 2 or not words[0].startswith("RTSP/") or not words[1].isdigit():
        return Check(
            name,
            Status.FAIL,
            f"{shown}: {host}:{port} answers, but not as an RTSP server ({line[:40]!r})",
            f"check the port in cameras[{index}].url (RTSP is usually {RTSP_DEFAULT_PORT})",
        )
    code = int(words[1])
    if code == 401 and camera.username is None:
        return Check(
            name,
            Status.WARN,
            f"{shown}: answers RTSP 401: the camera asks for a login",
            f"set cameras[{index}].username and camera_passwords.{camera.id} in the secrets file",
        )
    if code in (200, 401):
        return Check(name, Status.OK, f"{shown}: answers RTSP {code} to OPTIONS")
    return Check(name, Status.WARN, f"{shown}: answers RTSP {' '.join(words[1:])} to OPTIONS")


def check_ffmpeg(cfg: Config, search_path: str | None) -> Check:
    if not cfg.cameras:
        return Check("ffmpeg", Status.SKIP, "no cameras configured")
    found = shutil.which("ffmpeg", path=search_path)
    if found is None:
        return Check(
            "ffmpeg",
            Status.FAIL,
            f"ffmpeg not found on the PATH, and {len(cfg.cameras)} camera(s) are configured",
            "apt-get install ffmpeg",
        )
    return Check("ffmpeg", Status.OK, found)


# -- the run -----------------------------------------------------------------------------------------------------

DEPENDENT = ("secrets", "database", "disk", "serial", "nfc", "ports", "cloud", "ziggy", "cameras")


async def _guarded(name: str, work: Awaitable[Check], limit_s: float | None, fix: str | None) -> Check:
    """A check within its own time limit; one that raises unexpectedly fails alone, the others still report."""
    try:
        async with asyncio.timeout(limit_s):
            return await work
    except TimeoutError:
        return Check(name, Status.FAIL, f"no answer within {limit_s:g} s" if limit_s else "timed out", fix)
    except Exception as exc:
        return Check(name, Status.FAIL, f"the doctor could not check this: {exc.__class__.__name__}: {exc}")


@dataclass(slots=True)
class _Plan:
    """The checks in report order, each a task: blocking ones (stat, psutil, a config file) on a thread, so
    that nothing blocks the loop the network checks share."""

    tasks: list[tuple[str, asyncio.Task[Check]]] = field(default_factory=list)

    def blocking(self, name: str, work: Callable[[], Check]) -> None:
        self.later(name, asyncio.to_thread(work))

    def later(
        self, name: str, work: Coroutine[Any, Any, Check], limit_s: float | None = None, fix: str | None = None
    ) -> None:
        self.tasks.append((name, asyncio.create_task(_guarded(name, work, limit_s, fix))))

    async def report(self, *before: Check) -> Report:
        """Every check, those not done within TOTAL_TIMEOUT_S failed as such."""
        _, pending = await asyncio.wait([task for _, task in self.tasks], timeout=TOTAL_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        checks = list(before)
        for name, task in self.tasks:
            if task.cancelled():
                checks.append(Check(name, Status.FAIL, f"no answer within the doctor's {TOTAL_TIMEOUT_S:g} s"))
            else:
                checks.append(task.result())
        return Report(checks)


def _start(config_path: Path, environ: Mapping[str, str] | None) -> tuple[Path, Loaded]:
    config_path = config_path.absolute()  # the fixes name it, to be run from anywhere
    return config_path, load(config_path, environ)


async def run_doctor(
    config_path: Path,
    *,
    user: str = SERVICE_USER,
    host: Host | None = None,
    environ: Mapping[str, str] | None = None,
) -> Report:
    """Every check, concurrently, within TOTAL_TIMEOUT_S; in a fixed order in the report."""
    host = host or Host()
    config_path, loaded = await asyncio.to_thread(_start, config_path, environ)
    cfg = loaded.cfg
    trust_clock = cfg is not None and cfg.agent.trust_clock

    def clock() -> Check:
        return check_clock(trust_clock, host.kernel_clock_synced(), host.timesyncd_flag)

    plan = _Plan()
    if cfg is None:
        why = "the config could not be loaded (see config)"
        for name in DEPENDENT:
            if name == "serial":
                plan.blocking("clock", clock)
            plan.later(name, _skipped(name, why))
        return await plan.report(loaded.check)

    account = await asyncio.to_thread(Account.resolve, user)
    plan.blocking("secrets", functools.partial(check_secrets, loaded, account))
    plan.later("database", check_database(cfg, config_path, account))
    plan.later("disk", check_disk(cfg, config_path))
    plan.blocking("clock", clock)
    attached = [r for r in cfg.readers if r.kind != "nfc" or _device_of(r) is not None]
    for reader in attached:
        plan.blocking(f"serial:{reader.id}", functools.partial(check_serial, reader, account))
    if not attached:
        plan.later("serial", _skipped("serial", "no reader attached to a serial port"))
    plan.blocking("nfc", functools.partial(check_nfc, cfg, host.proc_modules))
    if cfg.broker.mode == "external":
        plan.later("port:broker", check_external_broker(cfg))
    for listener in listeners(cfg):
        plan.blocking(f"port:{listener.name}", functools.partial(check_listener, listener, config_path))
    cloud_url = cfg.cloud.token_url if cfg.cloud is not None else ""
    plan.later("cloud", check_cloud(cfg), CLOUD_TIMEOUT_S, _network_fix(cloud_url, ""))
    ziggy_url = cfg.ziggy.base_url if cfg.ziggy is not None else ""
    plan.later("ziggy", check_ziggy(cfg), ZIGGY_TIMEOUT_S, _network_fix(ziggy_url, ""))
    for i, camera in enumerate(cfg.cameras):
        plan.later(f"camera:{camera.id}", check_camera(cfg, i))
    plan.blocking("ffmpeg", functools.partial(check_ffmpeg, cfg, host.search_path))
    return await plan.report(loaded.check)


async def _skipped(name: str, why: str) -> Check:
    return Check(name, Status.SKIP, why)

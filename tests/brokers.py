"""Brokers under test: the agent's embedded broker and a real mosquitto, started on loopback by the tests.

mosquitto is the oracle for the conformance tests: a test that fails against it is wrong, not the broker.

Fixtures (a pytest plugin: `pytest_plugins = ("tests.brokers",)` in the test module):

- `broker_factory`, parametrized `embedded` / `mosquitto`: `await broker_factory(max_packet_bytes=2048,
  allow_anonymous=True)` starts a broker of that kind with those settings; every broker started is stopped at
  teardown. `broker` is `await broker_factory()` with the defaults.
- `tls_files`: a self-signed certificate for 127.0.0.1/localhost, made once per session.

Outside the fixtures, both kinds are async context managers:

    async with Mosquitto(tmp_path / "mq", password_file=pw, acl_file=acl, tls=tls) as mq:  # pw/acl: write_auth_files
        ... mq.port, mq.ws_port, mq.tls_port ...
        await mq.restart()

    async with Embedded(tmp_path / "embedded", tls=tls, max_packet_bytes=2048) as broker:
        ... broker.port ...  # devices and passwords from tests.conftest, the agent's password AGENT_PASSWORD

PYTEST_DONT_REWRITE: test modules import helpers from here before `pytest_plugins` loads it as a plugin, so
pytest must not try to rewrite its (nonexistent) assertions then.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import pytest

from agent.config import AGENT_USERNAME, BrokerSection, DeviceConfig
from agent.errors import BrokerStartError
from agent.lan.auth import EVERYTHING, DeviceDirectory, Rules, rules_for
from agent.lan.broker import EmbeddedBroker
from tests.conftest import PASSWORDS, make_config

HOST = "127.0.0.1"
AGENT_PASSWORD = "agent-secret-0123"
KINDS = ("embedded", "mosquitto")
MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = Path(shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd")
DYNSEC_PLUGIN = next(iter(sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))), None)  # Debian's path
DYNSEC_ITERATIONS = 101  # mosquitto_passwd's and dynsec's PBKDF2 default
# How the broker_factory fixture gives mosquitto its accounts: "dynsec" (default: refuses SUBSCRIBEs outside the
# access list with 0x80, like the embedded broker) or "acl_file" (password_file + acl_file, as a site would).
MOSQUITTO_ACCESS = os.environ.get("MOSQUITTO_ACCESS", "dynsec")
WS_PATH = "/mqtt"  # paho's default; mosquitto (libwebsockets) and amqtt (websockets) accept any path
START_TIMEOUT_S = 5.0
START_ATTEMPTS = 3  # free ports are picked before the broker binds them: another process may win the race
STOP_TIMEOUT_S = 5.0


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (bind to 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def wait_listening(host: str, port: int, within: float = START_TIMEOUT_S) -> None:
    """Return once `port` accepts TCP connections; TimeoutError after `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


# --- TLS -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path

    @property
    def ca(self) -> Path:
        """Self-signed: the certificate is its own CA."""
        return self.cert


def make_self_signed(directory: Path) -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "cert.pem", directory / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(files.key), "-out", str(files.cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return files


# --- accounts and access list --------------------------------------------------------------------------------


def device_configs(data_dir: Path) -> list[DeviceConfig]:
    """The devices of tests.conftest (r1, t1, ...), as the agent configures them."""
    return list(make_config(data_dir).devices)


def accounts() -> dict[str, str]:
    """username -> password: every test device plus the agent's own account."""
    return {**PASSWORDS, AGENT_USERNAME: AGENT_PASSWORD}


def write_password_file(path: Path, users: Mapping[str, str]) -> Path:
    """A mosquitto password file made by mosquitto_passwd itself."""
    path.unlink(missing_ok=True)
    for i, (username, password) in enumerate(users.items()):
        create = ["-c"] if i == 0 else []
        subprocess.run([str(MOSQUITTO_PASSWD), "-b", *create, str(path), username, password], check=True)
    return path


def acl_text(devices: Iterable[DeviceConfig], *, anonymous: bool = False) -> str:
    """The agent's access list (agent.lan.auth.rules_for) in mosquitto's acl_file syntax.

    Lines before the first `user` line apply to anonymous clients: with `anonymous`, they may do anything, as
    DeviceDirectory(allow_anonymous=True) allows.
    """
    lines = ["# generated from agent.lan.auth.rules_for"]
    if anonymous:
        lines += ["topic readwrite #"]
    for device in devices:
        rules = rules_for(device)
        lines += ["", f"user {device.id}"]
        lines += [f"topic write {t}" for t in rules.publish]
        lines += [f"topic read {t}" for t in rules.subscribe]
    lines += ["", f"user {AGENT_USERNAME}", "topic readwrite #", ""]
    return "\n".join(lines)


def dynsec_config(
    devices: Iterable[DeviceConfig], users: Mapping[str, str], *, anonymous: bool = False
) -> dict[str, Any]:
    """The same accounts and access list as a mosquitto dynamic-security plugin configuration.

    Unlike acl_file, whose subscribe check always succeeds (it grants any SUBSCRIBE and filters on delivery),
    dynsec refuses a subscription outside the access list with SUBACK 0x80, as the embedded broker does.
    Subscribe rules are `subscribePattern` (wildcards in the rule match any filter they cover).
    """

    def acls(rules: Rules) -> list[dict[str, Any]]:
        return [{"acltype": "publishClientSend", "topic": t, "allow": True} for t in rules.publish] + [
            {"acltype": "subscribePattern", "topic": t, "allow": True} for t in rules.subscribe
        ]

    roles = {AGENT_USERNAME: acls(EVERYTHING), **{d.id: acls(rules_for(d)) for d in devices}}
    config: dict[str, Any] = {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [_dynsec_client(u, p, [u] if u in roles else []) for u, p in users.items()],
        "groups": [],
        "roles": [{"rolename": name, "acls": role_acls} for name, role_acls in roles.items()],
    }
    if anonymous:
        config["roles"].append({"rolename": "anonymous", "acls": acls(EVERYTHING)})
        config["groups"].append({"groupname": "anonymous", "roles": [{"rolename": "anonymous"}]})
        config["anonymousGroup"] = "anonymous"
    return config


def _dynsec_client(username: str, password: str, roles: list[str]) -> dict[str, Any]:
    """dynsec stores base64(PBKDF2-HMAC-SHA512(password, salt, iterations)) and the base64 salt."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, DYNSEC_ITERATIONS)
    return {
        "username": username,
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": DYNSEC_ITERATIONS,
        "roles": [{"rolename": r} for r in roles],
    }


def write_dynsec_file(
    path: Path, devices: Iterable[DeviceConfig], users: Mapping[str, str], *, anonymous: bool = False
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dynsec_config(devices, users, anonymous=anonymous), indent=1))
    return path


def write_auth_files(
    directory: Path, devices: Iterable[DeviceConfig], users: Mapping[str, str], *, anonymous: bool = False
) -> tuple[Path, Path]:
    """(password_file, acl_file) for mosquitto in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    acl = directory / "acl"
    acl.write_text(acl_text(devices, anonymous=anonymous))
    return write_password_file(directory / "passwords", users), acl


# --- the brokers ---------------------------------------------------------------------------------------------


class BrokerUnderTest(Protocol):
    """What a conformance test needs from a running broker of either kind."""

    @property
    def kind(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def ws_port(self) -> int | None: ...
    @property
    def tls_port(self) -> int | None: ...
    @property
    def ca_file(self) -> Path | None: ...
    @property
    def keepalive_check_interval(self) -> float:
        """How late after 1.5 x keepalive the broker may notice a silent client (its sweep period)."""

    async def restart(self) -> None:
        """Stop and start again on the same state (and the same ports when they are free)."""


class MosquittoExited(RuntimeError):
    """mosquitto stopped before listening: a bad configuration, or a port taken since free_port picked it."""


class _Lifecycle:
    """start/stop as an async context manager, and restart: the same for both kinds of broker."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class Mosquitto(_Lifecycle):
    """A mosquitto process configured from scratch in `directory`; `async with` starts and stops it.

    Listeners: plain TCP on `port` (a free one by default), websockets when `websockets`, TLS when `tls`.
    Authentication and access come from `password_file` + `acl_file` (see write_auth_files) or from the
    dynamic-security plugin's `dynsec_file` (see write_dynsec_file); `allow_anonymous` lets clients without a
    username in (the acl_file's lines before any `user`, or dynsec's anonymousGroup, say what they may do).
    Persistence is on: `restart()` (SIGTERM, start again on the same configuration) keeps retained messages and
    persistent sessions, as mosquitto saves its database on shutdown.
    """

    kind = "mosquitto"
    # mosquitto 2.0 sweeps keepalives only when more than 5 s have passed since the last sweep
    # (src/keepalive.c, whole seconds): a silent client is cut up to ~6 s after its 1.5 x keepalive.
    keepalive_check_interval = 6.0

    def __init__(
        self,
        directory: Path,
        *,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        dynsec_file: Path | None = None,
        allow_anonymous: bool = False,
        tls: TlsFiles | None = None,
        websockets: bool = True,
        max_packet_size: int = 0,  # 0: mosquitto's default (no limit)
        persistence: bool = True,
        port: int | None = None,
        host: str = HOST,
        extra_config: str = "",
        binary: Path = MOSQUITTO,
    ) -> None:
        self.directory = directory
        self.host = host
        self._fixed_port = port
        self._websockets = websockets
        self.tls = tls
        self._pick_ports()
        self.password_file = password_file
        self.acl_file = acl_file
        self.dynsec_file = dynsec_file
        self.allow_anonymous = allow_anonymous
        self.max_packet_size = max_packet_size
        self.persistence = persistence
        self.extra_config = extra_config
        self.binary = binary
        self.config_path = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        self._process: asyncio.subprocess.Process | None = None

    def _pick_ports(self) -> None:
        self.port = self._fixed_port or free_port(self.host)
        self.ws_port = free_port(self.host) if self._websockets else None
        self.tls_port = free_port(self.host) if self.tls else None

    @property
    def ca_file(self) -> Path | None:
        return self.tls.ca if self.tls else None

    def config_text(self) -> str:
        lines = [
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"user {getpass.getuser()}",  # as root, mosquitto would otherwise drop to 'mosquitto' and lose tmp_path
            "log_dest stderr",
            "log_type all",
            "log_timestamp_format %H:%M:%S",
        ]
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        if self.dynsec_file:
            if DYNSEC_PLUGIN is None:
                raise RuntimeError("mosquitto_dynamic_security.so is not installed")
            lines += [f"plugin {DYNSEC_PLUGIN}", f"plugin_opt_config_file {self.dynsec_file}"]
        if self.max_packet_size:
            lines.append(f"max_packet_size {self.max_packet_size}")
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.directory}/"]
        if self.extra_config:
            lines.append(self.extra_config)
        lines.append(f"listener {self.port} {self.host}")
        if self.ws_port:
            lines += [f"listener {self.ws_port} {self.host}", "protocol websockets"]
        if self.tls and self.tls_port:
            lines += [f"listener {self.tls_port} {self.host}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
        return "\n".join(lines) + "\n"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _open_log(self) -> int:
        return os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def start(self) -> None:
        """Start on the current ports; if one was taken meanwhile (free_port races other processes), on new ones."""
        for attempt in range(START_ATTEMPTS):
            try:
                await self._start()
                return
            except MosquittoExited:
                if attempt == START_ATTEMPTS - 1:
                    raise
                self._pick_ports()

    async def _start(self) -> None:
        if self._process is not None:
            raise RuntimeError("mosquitto is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        log = self._open_log()
        try:
            self._process = await asyncio.create_subprocess_exec(
                str(self.binary), "-c", str(self.config_path), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        finally:
            os.close(log)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                for port in (self.port, self.ws_port, self.tls_port):
                    if port:
                        await self._wait_port(port)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, MosquittoExited):
                raise MosquittoExited(f"mosquitto exited at start:\n{self.log_text()}") from None
            raise RuntimeError(f"mosquitto did not start:\n{self.log_text()}") from exc

    async def _wait_port(self, port: int) -> None:
        process = self._process
        while process is not None and process.returncode is None:
            try:
                await wait_listening(self.host, port, within=0.1)
            except TimeoutError:
                continue
            return
        raise MosquittoExited("mosquitto exited")

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            if process is not None:
                await process.wait()
            return
        process.send_signal(signal.SIGTERM)  # mosquitto saves its persistence file on SIGTERM
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class Embedded(_Lifecycle):
    """The agent's EmbeddedBroker on loopback with every listener, the test devices and persistence in `directory`.

    `restart()` leaves the EmbeddedBroker and enters a new one on the same state_path, on the same ports when
    they can be bound again (else on new ones: read the ports after a restart).
    """

    kind = "embedded"
    keepalive_check_interval = 0.0  # a timer per connection

    def __init__(
        self,
        directory: Path,
        *,
        tls: TlsFiles | None = None,
        max_packet_bytes: int = 65536,
        allow_anonymous: bool = False,
        websockets: bool = True,
        host: str = HOST,
    ) -> None:
        self.directory = directory
        self.host = host
        self.tls = tls
        directory.mkdir(parents=True, exist_ok=True)
        self.state_path = directory / "broker.db"
        self.section = BrokerSection(
            host=host,
            port=0,
            ws_port=free_port(host) if websockets else 0,  # 0 would mean "no listener" here
            tls_port=free_port(host) if tls else 0,
            tls_cert=tls.cert if tls else None,
            tls_key=tls.key if tls else None,
            max_packet_bytes=max_packet_bytes,
            allow_anonymous=allow_anonymous,
        )
        self.devices = DeviceDirectory(
            device_configs(directory), agent_password=AGENT_PASSWORD, allow_anonymous=allow_anonymous
        )
        self._broker: EmbeddedBroker | None = None

    @property
    def broker(self) -> EmbeddedBroker:
        if self._broker is None:
            raise RuntimeError("the embedded broker is not running")
        return self._broker

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def ws_port(self) -> int | None:
        return self.broker.ws_port

    @property
    def tls_port(self) -> int | None:
        return self.broker.tls_port

    @property
    def ca_file(self) -> Path | None:
        return self.tls.ca if self.tls else None

    async def start(self) -> None:
        """Start on the current ports; if one is taken (free_port races other processes), on new ones."""
        for attempt in range(START_ATTEMPTS):
            broker = EmbeddedBroker(self.section, self.devices, state_path=self.state_path)
            try:
                await broker.__aenter__()
            except BrokerStartError:
                if attempt == START_ATTEMPTS - 1:
                    raise
                s = self.section
                self.section = s.model_copy(
                    update={
                        "port": 0,
                        "ws_port": free_port(self.host) if s.ws_port else 0,
                        "tls_port": free_port(self.host) if s.tls_port else 0,
                    }
                )
                continue
            self._broker = broker
            # A restart binds the same ports again.
            self.section = self.section.model_copy(
                update={"port": broker.port, "ws_port": broker.ws_port or 0, "tls_port": broker.tls_port or 0}
            )
            return

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.__aexit__(None, None, None)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.stop()
        finally:
            self.devices.close()


# --- fixtures ------------------------------------------------------------------------------------------------


class BrokerFactory(Protocol):
    async def __call__(self, *, max_packet_bytes: int = ..., allow_anonymous: bool = ...) -> BrokerUnderTest: ...


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make a test certificate")
    return make_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(params=KINDS)
async def broker_factory(
    request: pytest.FixtureRequest, tmp_path: Path, tls_files: TlsFiles
) -> AsyncIterator[BrokerFactory]:
    """Start brokers of one kind with per-test settings; all are stopped at teardown."""
    kind: str = request.param
    if kind == "mosquitto" and not MOSQUITTO.exists():
        pytest.skip(f"mosquitto is not installed ({MOSQUITTO})")
    if kind == "mosquitto" and MOSQUITTO_ACCESS == "dynsec" and DYNSEC_PLUGIN is None:
        pytest.skip("mosquitto_dynamic_security.so is not installed (or set MOSQUITTO_ACCESS=acl_file)")
    started = 0
    async with contextlib.AsyncExitStack() as stack:

        async def start(*, max_packet_bytes: int = 65536, allow_anonymous: bool = False) -> BrokerUnderTest:
            nonlocal started
            started += 1
            directory = tmp_path / f"{kind}-{started}"
            if kind == "embedded":
                return await stack.enter_async_context(
                    Embedded(
                        directory, tls=tls_files, max_packet_bytes=max_packet_bytes, allow_anonymous=allow_anonymous
                    )
                )
            devices = device_configs(tmp_path)
            pw = acl = dynsec = None
            if MOSQUITTO_ACCESS == "acl_file":
                pw, acl = write_auth_files(directory, devices, accounts(), anonymous=allow_anonymous)
            else:
                dynsec = write_dynsec_file(directory / "dynsec.json", devices, accounts(), anonymous=allow_anonymous)
            mosquitto = Mosquitto(
                directory,
                password_file=pw,
                acl_file=acl,
                dynsec_file=dynsec,
                allow_anonymous=allow_anonymous,
                tls=tls_files,
                max_packet_size=max_packet_bytes,
            )
            return await stack.enter_async_context(mosquitto)

        yield start


@pytest.fixture
async def broker(broker_factory: BrokerFactory) -> BrokerUnderTest:
    """A broker of each kind with the default settings."""
    return await broker_factory()

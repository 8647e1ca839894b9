"""`club-agent doctor`, each check failing on purpose, for real: a config with a misspelt key, a secrets file
anyone can read, garbage where the database should be, a fake /proc/modules with pn533 loaded (its path is
the one thing injected), a reader's port that does not exist and a real pty the service user may not open
(checked for the real system user `nobody`, by the mode bits and group membership, since root bypasses them),
a broker port held by another listening socket, the sandbox cloud refusing credentials and a closed port
instead of it, cameras on a closed port, a silent one and an HTTP server, a 16 MB tmpfs under a 64 MB budget;
and one all-OK run against the sandbox (cloud + Ziggy), a pty reader and an RTSP server answering OPTIONS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from agent import doctor
from agent.cli import app
from agent.clock import _kernel_clock_synced
from agent.doctor import Host, Report, Status, check_clock, run_doctor
from agent.sandbox import SandboxServer
from agent.store.db import Database
from tests.cameras import SYSTEM_PYTHON, free_tcp_port
from tests.sandboxes import sandbox_overrides

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).with_name("club-agent")
AGENT_COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "agent.cli"]
CAMERA_PASSWORD = "cam-pw-never-shown-42"
ME = pwd.getpwuid(os.geteuid()).pw_name
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="changes a device's group: needs root")


# -- helpers -------------------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def toml(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, body in doc.items():
        for table in body if isinstance(body, list) else [body]:
            lines.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def write_config(tmp_path: Path, **sections: Any) -> Path:
    """agent.toml in tmp_path: a club with one court, its data under tmp_path, no listener unless asked, the
    clock trusted (the clock has tests of its own); `sections` are merged over that."""
    doc: dict[str, Any] = {
        "agent": {"data_dir": str(tmp_path / "data"), "trust_clock": True},
        "broker": {"host": "127.0.0.1", "port": 0},
        "api": {"enabled": False},
        "courts": [{"id": "c1"}],
    }
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "agent.toml"
    path.write_text(toml(doc), encoding="utf-8")
    return path


def write_secrets(tmp_path: Path, mode: int = 0o600, **values: Any) -> Path:
    path = tmp_path / "secrets.toml"
    scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in values.items() if isinstance(v, dict)}
    text = "".join(f"{k} = {_toml_value(v)}\n" for k, v in scalars.items()) + (toml(tables) if tables else "")
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def by_name(report: Report) -> dict[str, doctor.Check]:
    return {c.name: c for c in report.checks}


async def diagnose(config: Path, *, user: str = ME, host: Host | None = None) -> dict[str, doctor.Check]:
    report = await run_doctor(config, user=user, host=host, environ={})
    return by_name(report)


async def club_agent(*args: str) -> Result:
    """`club-agent ARGS` through typer's runner on a thread: the command runs its own event loop, while this
    test's loop keeps serving the sandbox and the cameras."""
    env = {"COLUMNS": "200", **{k: "" for k in os.environ if k.startswith("CLUB_AGENT_")}}
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


def words(text: str) -> str:
    return " ".join(text.split())


@contextlib.contextmanager
def pty_device(mode: int, gid: int = -1) -> Iterator[str]:
    """A real pty standing in for a USB-serial reader: its slave side's path, with that mode (and group)."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    try:
        os.chown(path, -1, gid)
        os.chmod(path, mode)
        yield path
    finally:
        os.close(master)
        os.close(slave)


class RtspCamera:
    """An RTSP-ish server on loopback: answers OPTIONS with `status` as a camera does; remembers requests."""

    def __init__(self, status: str = "200 OK", *, silent: bool = False) -> None:
        self.status = status
        self.silent = silent
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RtspCamera:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(request)
            if self.silent:
                await reader.read()  # holds the connection, says nothing
                return
            cseq = next(line for line in request.split(b"\r\n") if line.lower().startswith(b"cseq:"))
            writer.write(
                b"RTSP/1.0 " + self.status.encode() + b"\r\n" + cseq + b"\r\nPublic: OPTIONS, DESCRIBE\r\n\r\n"
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def url(self, path: str = "/stream1") -> str:
        return f"rtsp://127.0.0.1:{self.port}{path}"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    return free_tcp_port()


@pytest.fixture
def no_user() -> str:
    """A user name that does not exist here."""
    name = "club-agent-doctor-test-nobody-here"
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    return name


@pytest.fixture
def nobody() -> str:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no system user 'nobody' here")
    return "nobody"


# -- all OK --------------------------------------------------------------------------------------------------------


async def test_all_ok_against_the_sandbox_a_reader_and_a_camera(
    tmp_path: Path, sandbox_factory: Callable[..., Any]
) -> None:
    server: SandboxServer = await sandbox_factory()
    overrides = sandbox_overrides(server, tmp_path / "etc")
    secrets = Path(overrides["agent"]["secrets_file"])
    secrets.write_text(secrets.read_text() + f'[camera_passwords]\ncam-c1 = "{CAMERA_PASSWORD}"\n')
    async with Database(tmp_path / "data" / "agent.db"):  # a real, migrated database
        pass
    broker_port = free_tcp_port()
    async with RtspCamera() as camera:
        with pty_device(0o660) as port:
            config = write_config(
                tmp_path,
                agent={"secrets_file": str(secrets)},
                broker={"port": broker_port},
                ziggy=overrides["ziggy"],
                cloud=overrides["cloud"],
                readers=[{"id": "door-c1", "kind": "rdm6300", "port": port, "court": "c1"}],
                cameras=[{"id": "cam-c1", "court": "c1", "url": camera.url(), "username": "club"}],
            )
            result = await club_agent("doctor", "--config", str(config), "--json", "--user", ME)
            table = await club_agent("doctor", "--config", str(config), "--user", ME)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"ok", "checks"}
    assert report["ok"] is True
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail", "fix"}
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses == {
        "config": "OK",
        "secrets": "OK",
        "database": "OK",
        "disk": "OK",
        "clock": "OK",
        "serial:door-c1": "OK",
        "nfc": "SKIP",
        "port:broker": "OK",
        "cloud": "OK",
        "ziggy": "OK",
        "camera:cam-c1": "OK",
        "ffmpeg": "OK",
    }
    details = {c["name"]: c["detail"] for c in report["checks"]}
    assert "got a token" in details["cloud"]
    assert "0 active sessions" in details["ziggy"]
    assert "RTSP 200" in details["camera:cam-c1"]
    assert "quick_check ok" in details["database"]
    # The camera was asked OPTIONS on its own URL, without credentials; no secret reaches the output.
    assert camera.requests[0].startswith(f"OPTIONS {camera.url()} RTSP/1.0\r\n".encode())
    everything = result.stdout + table.stdout
    s = server.settings
    for secret in (CAMERA_PASSWORD, s.ziggy_api_key, s.cloud_client_secret, s.signing_secret):
        assert secret not in everything
    assert table.exit_code == 0
    assert "healthy" in words(table.stdout)
    assert "fix:" not in table.stdout


async def test_the_real_rtsp_server_of_the_simulated_camera_answers(tmp_path: Path) -> None:
    """GStreamer's RTSP server (as tests/cameras.py serves the simulated camera) answers the doctor's OPTIONS."""
    if (
        not SYSTEM_PYTHON.exists()
        or await (await asyncio.create_subprocess_exec(SYSTEM_PYTHON, "-c", "import gi")).wait()
    ):
        pytest.skip("GStreamer's RTSP server (python3-gi) is not installed")
    port = free_tcp_port()
    proc = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON,
        str(ROOT / "tests" / "rtsp_server.py"),
        f"--rtsp-port={port}",
        f"--udp-port={doctor_udp_port()}",
        "--path=/cam",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"ready"
        config = write_config(
            tmp_path, cameras=[{"id": "cam-c1", "court": "c1", "url": f"rtsp://127.0.0.1:{port}/cam"}]
        )
        checks = await diagnose(config)
    finally:
        proc.terminate()
        await proc.wait()
    assert checks["camera:cam-c1"].status is Status.OK, checks["camera:cam-c1"]
    assert "RTSP 200" in checks["camera:cam-c1"].detail


def doctor_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- config --------------------------------------------------------------------------------------------------------


async def test_a_misspelt_key_fails_the_config_and_skips_what_needs_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, broker={"prot": 1883})
    result = await club_agent("doctor", "--config", str(config), "--json")
    assert result.exit_code == 2, result.output  # the configuration error code: nothing else could be checked
    report = json.loads(result.stdout)
    assert report["ok"] is False
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["config"]["status"] == "FAIL"
    assert "broker.prot" in checks["config"]["detail"]
    assert "unknown key" in checks["config"]["detail"]
    assert (
        checks["config"]["fix"] == f"edit {config} at broker.prot, then re-check with: club-agent config check {config}"
    )
    skipped = [name for name, c in checks.items() if c["status"] == "SKIP"]
    assert skipped == ["secrets", "database", "disk", "serial", "nfc", "ports", "cloud", "ziggy", "cameras"]
    assert all("config could not be loaded" in checks[name]["detail"] for name in skipped)
    assert checks["clock"]["status"] in ("OK", "WARN")  # the clock needs no config


async def test_a_missing_config_file(tmp_path: Path) -> None:
    checks = await diagnose(tmp_path / "nope.toml")
    assert checks["config"].status is Status.FAIL
    assert "not found" in checks["config"].detail
    assert checks["config"].fix == f"create {tmp_path / 'nope.toml'} from provisioning/agent.example.toml"


# -- secrets -------------------------------------------------------------------------------------------------------


async def test_a_world_readable_secrets_file_fails_with_chmod_600(tmp_path: Path) -> None:
    secrets = write_secrets(tmp_path, mode=0o644, ziggy_api_key="k" * 20)
    config = write_config(
        tmp_path,
        agent={"secrets_file": "secrets.toml"},  # relative: next to the config
        ziggy={"base_url": f"http://127.0.0.1:{closed_port()}/api/v1", "client_id": "club"},
    )
    result = await club_agent("doctor", "--config", str(config))
    assert result.exit_code == 1, result.output
    text = words(result.stdout)
    assert f"secrets FAIL {secrets}: mode 0644 is world-accessible fix: chmod 600 {secrets}" in text
    assert "config OK" in text  # the config itself is fine: only its secrets file is refused
    assert "ziggy SKIP no ziggy_api_key loaded (see secrets)" in text

    secrets.chmod(0o620)
    checks = await diagnose(config)
    assert checks["secrets"].status is Status.FAIL
    assert "group-writable" in checks["secrets"].detail
    assert checks["secrets"].fix == f"chmod 600 {secrets}"

    secrets.chmod(0o640)  # tolerated, as the agent tolerates it
    checks = await diagnose(config)
    assert checks["secrets"].status is Status.OK
    assert checks["ziggy"].status is Status.FAIL  # now it is tried: and nothing listens there


async def test_a_secrets_file_that_does_not_parse(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('ziggy_api_key = "k"\nzigy_api_key = "typo"\n')
    secrets.chmod(0o600)
    config = write_config(tmp_path, agent={"secrets_file": str(secrets)})
    checks = await diagnose(config)
    assert checks["config"].status is Status.OK
    assert checks["secrets"].status is Status.FAIL
    assert "zigy_api_key: unknown key" in checks["secrets"].detail
    assert "typo" not in checks["secrets"].detail  # never a value from the secrets file


async def test_a_missing_secret_or_secrets_file_is_named(tmp_path: Path) -> None:
    cloud = {"base_url": "http://127.0.0.1:9", "token_url": "http://127.0.0.1:9/token", "client_id": "edge-01"}
    write_secrets(tmp_path, cloud_client_secret="s" * 20)
    config = write_config(tmp_path, agent={"secrets_file": "secrets.toml"}, cloud=cloud)
    checks = await diagnose(config)
    assert checks["secrets"].status is Status.FAIL
    assert "missing cloud_signing_secret (needed by [cloud])" in checks["secrets"].detail
    assert checks["secrets"].fix == f"add cloud_signing_secret to {tmp_path / 'secrets.toml'}"

    (tmp_path / "secrets.toml").unlink()
    checks = await diagnose(config)
    assert checks["secrets"].status is Status.FAIL
    assert checks["secrets"].detail == f"secrets file not found: {tmp_path / 'secrets.toml'}"
    assert "chmod 600" in (checks["secrets"].fix or "")

    checks = await diagnose(write_config(tmp_path, cloud=cloud))  # no agent.secrets_file at all
    assert checks["secrets"].status is Status.FAIL
    assert "agent.secrets_file is not set" in checks["secrets"].detail
    assert checks["cloud"].status is Status.SKIP


@as_root
async def test_a_secrets_file_the_service_user_cannot_read(tmp_path: Path, nobody: str) -> None:
    secrets = write_secrets(tmp_path, ziggy_api_key="k" * 20)  # root's, 0600
    config = write_config(tmp_path, agent={"secrets_file": str(secrets)})
    checks = await diagnose(config, user=nobody)
    assert checks["secrets"].status is Status.FAIL
    assert "not readable by nobody" in checks["secrets"].detail
    assert checks["secrets"].fix == f"chown nobody {secrets} && chmod 600 {secrets}"


# -- database and disk ---------------------------------------------------------------------------------------------


async def test_a_corrupt_database_fails_with_store_recover(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    checks = await diagnose(config)
    assert checks["database"].status is Status.WARN
    assert "the agent creates it at its first start" in checks["database"].detail

    db = tmp_path / "data" / "agent.db"
    db.parent.mkdir()
    db.write_bytes(os.urandom(64 * 1024))
    checks = await diagnose(config)
    assert checks["database"].status is Status.FAIL
    assert "corrupt or not a database" in checks["database"].detail
    assert checks["database"].fix == f"systemctl stop club-agent && club-agent store recover --config {config}"


async def test_a_database_with_a_damaged_page_fails_quick_check(tmp_path: Path) -> None:
    """A real database whose table page is overwritten: it opens, and quick_check finds the damage."""
    config = write_config(tmp_path)
    db = tmp_path / "data" / "agent.db"
    async with Database(db) as database, database.transaction() as conn:
        await conn.execute("CREATE TABLE filler (x BLOB)")
        for _ in range(50):
            await conn.execute("INSERT INTO filler VALUES (randomblob(3000))")
    with db.open("r+b") as fh:  # keep the header (page 1); scribble over the pages after it
        fh.seek(4096 * 3)
        fh.write(b"\xa5" * 4096 * 20)
    checks = await diagnose(config)
    assert checks["database"].status is Status.FAIL, checks["database"]
    assert "club-agent store recover" in (checks["database"].fix or "")


async def test_a_quick_check_that_takes_too_long_is_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path)
    async with Database(tmp_path / "data" / "agent.db") as database, database.transaction() as conn:
        await conn.execute("CREATE TABLE filler (x BLOB)")
        await conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) "
            "INSERT INTO filler SELECT randomblob(2000) FROM n"
        )
    monkeypatch.setattr(doctor, "DATABASE_TIMEOUT_S", 0.005)
    check = (await diagnose(config))["database"]
    assert check.status is Status.WARN, check
    assert "quick_check did not finish within 0.005 s" in check.detail


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path | None]:
    """A 16 MB tmpfs for the data directory; None where no tmpfs can be mounted."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mountpoint)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        yield None
        return
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


async def test_a_budget_bigger_than_the_free_space_fails(tmp_path: Path, small_disk: Path | None) -> None:
    if small_disk is not None:  # 16 MB of disk under the smallest budget there is
        config = write_config(tmp_path, agent={"data_dir": str(small_disk / "data")}, media={"budget_mb": 64})
    else:  # no tmpfs here: a budget no disk has
        config = write_config(tmp_path, media={"budget_mb": 1 << 40})
    checks = await diagnose(config)
    disk = checks["disk"]
    assert disk.status is Status.FAIL, disk
    assert "the budget still needs" in disk.detail
    assert "or lower media.budget_mb" in (disk.fix or "")
    if small_disk is not None:
        assert "budget 64 MB" in disk.detail
        assert f"lower media.budget_mb in {config} to at most 16" in (disk.fix or "")


async def test_usage_against_the_budget_levels(tmp_path: Path) -> None:
    config = write_config(tmp_path, media={"budget_mb": 64})
    clips = tmp_path / "data" / "clips"
    clips.mkdir(parents=True)
    with (clips / "h1.mp4").open("wb") as fh:  # sparse: measured by size, as the budget counts files
        fh.truncate(56 * doctor.MB)
    checks = await diagnose(config)
    assert checks["disk"].status is Status.WARN, checks["disk"]
    assert "at the warn level" in checks["disk"].detail
    with (clips / "h2.mp4").open("wb") as fh:
        fh.truncate(16 * doctor.MB)
    checks = await diagnose(config)
    assert checks["disk"].status is Status.FAIL
    assert "over the budget" in checks["disk"].detail


# -- clock ---------------------------------------------------------------------------------------------------------


async def test_the_clock_as_the_kernel_sees_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, agent={"trust_clock": False})
    checks = await diagnose(config)
    kernel = _kernel_clock_synced()
    if kernel is None:
        pytest.skip("the kernel does not say whether its clock is synced")
    assert checks["clock"].status is (Status.OK if kernel else Status.WARN)
    assert "the kernel's NTP state" in checks["clock"].detail


def test_an_unsynced_clock_warns_with_set_ntp(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"  # timesyncd's flag file, consulted when the kernel cannot tell
    check = check_clock(False, None, flag)
    assert check.status is Status.WARN
    assert "decisions still work" in check.detail
    assert (check.fix or "").startswith("timedatectl set-ntp true")
    assert check_clock(False, False, flag).status is Status.WARN
    flag.touch()
    assert check_clock(False, None, flag).status is Status.OK
    assert check_clock(True, False, tmp_path / "nope").status is Status.OK  # agent.trust_clock


# -- attached readers ----------------------------------------------------------------------------------------------


async def test_a_serial_port_that_does_not_exist(tmp_path: Path) -> None:
    readers = [
        {"id": "door-c1", "kind": "rdm6300", "port": "/dev/ttyUSB-not-here", "court": "c1"},
        {"id": "door-c2", "kind": "wiegand", "port": "/dev/club-reader-door-c2", "court": "c1"},
        {"id": "door-c3", "kind": "lines", "port": "socket://127.0.0.1:9", "court": "c1"},  # a pyserial URL
    ]
    checks = await diagnose(write_config(tmp_path, readers=readers))
    missing = checks["serial:door-c1"]
    assert missing.status is Status.FAIL
    assert missing.detail == "/dev/ttyUSB-not-here not found (rdm6300 reader door-c1)"
    assert "check the reader's cable" in (missing.fix or "")
    assert "/dev/club-reader-door-c1" in (missing.fix or "")
    unmatched = checks["serial:door-c2"]
    assert unmatched.status is Status.FAIL
    assert "udev rule that names it /dev/club-reader-door-c2 does not match" in (unmatched.fix or "")
    assert checks["serial:door-c3"].status is Status.SKIP


async def test_a_pty_the_service_user_may_not_open(tmp_path: Path, nobody: str) -> None:
    with pty_device(0o000) as port:
        config = write_config(tmp_path, readers=[{"id": "door-c1", "kind": "rdm6300", "port": port, "court": "c1"}])
        check = (await diagnose(config, user=nobody))["serial:door-c1"]
        assert check.status is Status.FAIL
        assert f"{port} (mode 0000" in check.detail
        assert "not readable and writable by nobody" in check.detail
        assert 'GROUP="dialout", MODE="0660"' in (check.fix or "")
        assert "usermod -aG dialout nobody" in (check.fix or "")

        os.chmod(port, 0o666)  # noqa: S103 - a device anyone may open: what the check should accept
        assert (await diagnose(config, user=nobody))["serial:door-c1"].status is Status.OK


@as_root
async def test_a_pty_in_a_group_the_service_user_is_not_in(tmp_path: Path, nobody: str) -> None:
    dialout = 20  # Debian's dialout group, which USB-serial adapters belong to
    with pty_device(0o660, gid=dialout) as port:
        config = write_config(tmp_path, readers=[{"id": "door-c1", "kind": "rdm6300", "port": port, "court": "c1"}])
        check = (await diagnose(config, user=nobody))["serial:door-c1"]
        assert check.status is Status.FAIL
        assert check.fix == "usermod -aG dialout nobody && systemctl restart club-agent"
        assert (await diagnose(config, user="root"))["serial:door-c1"].status is Status.OK


async def test_a_service_user_that_does_not_exist_here_checks_this_user(tmp_path: Path, no_user: str) -> None:
    with pty_device(0o600) as port:
        config = write_config(tmp_path, readers=[{"id": "door-c1", "kind": "rdm6300", "port": port, "court": "c1"}])
        check = (await diagnose(config, user=no_user))["serial:door-c1"]
    assert check.status is Status.OK
    assert f"by {ME} (user {no_user} does not exist here)" in check.detail


async def test_kernel_nfc_drivers_conflict_with_an_nfc_reader(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    modules.write_text(
        "pn533_usb 20480 0 - Live 0x0000000000000000\n"
        "pn533 45056 1 pn533_usb, Live 0x0000000000000000\n"
        "nfc 139264 1 pn533, Live 0x0000000000000000\n"
        "snd_hda_intel 57344 0 - Live 0x0000000000000000\n"
    )
    config = write_config(tmp_path, readers=[{"id": "nfc-1", "kind": "nfc", "path": "usb", "court": "c1"}])
    check = (await diagnose(config, host=Host(proc_modules=modules)))["nfc"]
    assert check.status is Status.FAIL
    assert "pn533_usb, pn533, nfc" in check.detail
    assert check.fix == (
        "printf 'blacklist %s\\n' pn533_usb pn533 nfc > /etc/modprobe.d/club-agent-nfc.conf "
        "&& modprobe -r pn533_usb pn533 nfc && systemctl restart club-agent"
    )

    modules.write_text("snd_hda_intel 57344 0 - Live 0x0000000000000000\n")
    assert (await diagnose(config, host=Host(proc_modules=modules)))["nfc"].status is Status.OK
    no_nfc = write_config(tmp_path)
    assert (await diagnose(no_nfc, host=Host(proc_modules=modules)))["nfc"].status is Status.SKIP


# -- ports ---------------------------------------------------------------------------------------------------------


async def test_a_broker_port_held_by_another_process(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = write_config(tmp_path, broker={"port": port}, api={"enabled": True, "host": "127.0.0.1", "port": port})
        checks = await diagnose(config)
    for name, key in (("port:broker", "broker.port"), ("port:api", "api.port")):
        check = checks[name]
        assert check.status is Status.FAIL
        assert f"127.0.0.1:{port} ({key}): taken by" in check.detail
        assert f"pid {os.getpid()}" in check.detail  # psutil names the holder: this test's process
        assert f"set {key} to a free port in {config}" in (check.fix or "")


async def test_a_broker_port_held_by_the_running_agent_is_ours(tmp_path: Path) -> None:
    port = free_tcp_port()
    config = write_config(tmp_path, broker={"port": port})
    proc = await asyncio.create_subprocess_exec(
        *AGENT_COMMAND,
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while b"agent_ready" not in (line := await proc.stdout.readline()):
                assert line, "the agent stopped before it was ready"
        checks = await diagnose(config)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.communicate(), 20)
    assert checks["port:broker"].status is Status.OK
    assert (
        checks["port:broker"].detail
        == f"127.0.0.1:{port} (broker.port): held by the running club-agent (pid {proc.pid})"
    )
    assert checks["database"].status is Status.OK  # read-only, beside the running agent


async def test_an_external_broker_that_does_not_answer(tmp_path: Path) -> None:
    secrets = write_secrets(tmp_path, broker_password="p" * 20)
    broker = {"mode": "external", "external_host": "127.0.0.1", "external_port": closed_port()}
    config = write_config(tmp_path, agent={"secrets_file": str(secrets)}, broker=broker)
    check = (await diagnose(config))["port:broker"]
    assert check.status is Status.FAIL
    assert "the site's broker at 127.0.0.1:" in check.detail
    assert (check.fix or "").startswith("systemctl status mosquitto")
    with socket.socket() as site:
        site.bind(("127.0.0.1", 0))
        site.listen()
        broker["external_port"] = site.getsockname()[1]
        config = write_config(tmp_path, agent={"secrets_file": str(secrets)}, broker=broker)
        assert (await diagnose(config))["port:broker"].status is Status.OK


# -- cloud and Ziggy -----------------------------------------------------------------------------------------------


async def test_the_sandbox_refusing_our_credentials(tmp_path: Path, sandbox_factory: Callable[..., Any]) -> None:
    server: SandboxServer = await sandbox_factory()
    overrides = sandbox_overrides(server, tmp_path / "etc")
    secrets = write_secrets(
        tmp_path, ziggy_api_key="not-the-key", cloud_client_secret="not-the-secret", cloud_signing_secret="x" * 20
    )
    config = write_config(
        tmp_path, agent={"secrets_file": str(secrets)}, ziggy=overrides["ziggy"], cloud=overrides["cloud"]
    )
    result = await club_agent("doctor", "--config", str(config), "--json")
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    cloud = checks["cloud"]
    assert cloud["status"] == "FAIL"
    assert f"token endpoint {server.settings.token_url} refused client 'edge-01'" in cloud["detail"]
    assert "invalid client or invalid client credentials" in cloud["detail"]
    assert "cloud_client_secret" in cloud["fix"]
    ziggy = checks["ziggy"]
    assert ziggy["status"] == "FAIL"
    assert "HTTP 401: invalid API key" in ziggy["detail"]
    assert "check ziggy_api_key" in ziggy["fix"]
    assert "not-the-key" not in result.stdout
    assert "not-the-secret" not in result.stdout


async def test_the_cloud_and_ziggy_unreachable(tmp_path: Path) -> None:
    port = closed_port()
    secrets = write_secrets(tmp_path, ziggy_api_key="k" * 20, cloud_client_secret="s" * 20, cloud_signing_secret="x")
    config = write_config(
        tmp_path,
        agent={"secrets_file": str(secrets)},
        ziggy={"base_url": f"http://127.0.0.1:{port}/ziggy/api/v1", "client_id": "club"},
        cloud={"base_url": f"http://127.0.0.1:{port}", "token_url": f"http://127.0.0.1:{port}/token", "client_id": "e"},
    )
    checks = await diagnose(config)
    assert checks["cloud"].status is Status.FAIL
    assert checks["cloud"].detail.startswith(f"token endpoint http://127.0.0.1:{port}/token: ConnectError")
    assert "check the box's internet connection and DNS (getent hosts 127.0.0.1)" in (checks["cloud"].fix or "")
    assert checks["ziggy"].status is Status.FAIL
    assert "ConnectError" in checks["ziggy"].detail


async def test_a_token_endpoint_that_never_answers_is_bounded(
    tmp_path: Path, sandbox_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "CLOUD_TIMEOUT_S", 0.5)
    server: SandboxServer = await sandbox_factory({"endpoint": "token", "kind": "timeout", "count": 1})
    overrides = sandbox_overrides(server, tmp_path / "etc")
    config = write_config(tmp_path, agent=overrides["agent"], cloud=overrides["cloud"])
    checks = await diagnose(config)
    assert checks["cloud"].status is Status.FAIL
    assert checks["cloud"].detail == "no answer within 0.5 s"
    assert "internet connection" in (checks["cloud"].fix or "")


async def test_disabled_destinations_are_skipped(tmp_path: Path) -> None:
    config = write_config(tmp_path, ziggy={"base_url": "http://127.0.0.1:9", "client_id": "c", "enabled": False})
    checks = await diagnose(config)
    assert (checks["ziggy"].status, checks["ziggy"].detail) == (Status.SKIP, "ziggy.enabled = false")
    assert (checks["cloud"].status, checks["cloud"].detail) == (Status.SKIP, "no [cloud] section")


# -- cameras -------------------------------------------------------------------------------------------------------


@pytest.fixture
async def http_server(sandbox_factory: Callable[..., Any]) -> int:
    server: SandboxServer = await sandbox_factory()
    return server.port


async def test_cameras_that_do_not_answer_rtsp(
    tmp_path: Path, http_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "CAMERA_TIMEOUT_S", 0.3)
    courts = [{"id": f"c{i}"} for i in range(1, 5)]
    async with RtspCamera(silent=True) as silent, RtspCamera("401 Unauthorized") as locked:
        config = write_config(
            tmp_path,
            courts=courts,
            cameras=[
                {
                    "id": "cam-closed",
                    "court": "c1",
                    "url": f"rtsp://user:{CAMERA_PASSWORD}@127.0.0.1:{closed_port()}/s",
                },
                {"id": "cam-silent", "court": "c2", "url": silent.url()},
                {"id": "cam-http", "court": "c3", "url": f"rtsp://127.0.0.1:{http_server}/stream1"},
                {"id": "cam-locked", "court": "c4", "url": locked.url()},
            ],
        )
        result = await club_agent("doctor", "--config", str(config), "--json")
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    closed = checks["camera:cam-closed"]
    assert closed["status"] == "FAIL"
    assert "rtsp://user:***@127.0.0.1" in closed["detail"]
    assert "Connection refused" in closed["detail"] or "Connect call failed" in closed["detail"]
    assert closed["fix"].startswith("check the camera's power and network (ping 127.0.0.1)")
    assert CAMERA_PASSWORD not in result.stdout
    assert checks["camera:cam-silent"]["status"] == "FAIL"
    assert checks["camera:cam-silent"]["detail"].endswith("no answer within 0.3 s")
    http = checks["camera:cam-http"]
    assert http["status"] == "FAIL"
    assert "answers, but not as an RTSP server (b'HTTP/1." in http["detail"]
    assert http["fix"] == "check the port in cameras[2].url (RTSP is usually 554)"
    assert checks["camera:cam-locked"]["status"] == "WARN"
    assert checks["camera:cam-locked"]["fix"] == (
        "set cameras[3].username and camera_passwords.cam-locked in the secrets file"
    )


async def test_the_whole_run_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "TOTAL_TIMEOUT_S", 0.3)  # shorter than the camera's own limit: the total stops it
    async with RtspCamera(silent=True) as silent:
        config = write_config(tmp_path, cameras=[{"id": "cam-c1", "court": "c1", "url": silent.url()}])
        checks = await diagnose(config)
    assert checks["camera:cam-c1"].status is Status.FAIL
    assert checks["camera:cam-c1"].detail == "no answer within the doctor's 0.3 s"
    assert checks["config"].status is Status.OK


async def test_cameras_without_ffmpeg(tmp_path: Path) -> None:
    async with RtspCamera() as camera:
        config = write_config(tmp_path, cameras=[{"id": "cam-c1", "court": "c1", "url": camera.url()}])
        empty = tmp_path / "bin"
        empty.mkdir()
        checks = await diagnose(config, host=Host(search_path=str(empty)))
    assert checks["camera:cam-c1"].status is Status.OK
    assert checks["ffmpeg"].status is Status.FAIL
    assert checks["ffmpeg"].fix == "apt-get install ffmpeg"
    assert (await diagnose(write_config(tmp_path), host=Host(search_path=str(empty))))["ffmpeg"].status is Status.SKIP


# -- the table -----------------------------------------------------------------------------------------------------


async def test_the_table_puts_each_fix_under_its_line(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "agent.db").write_bytes(b"not a database at all" * 100)
    config = write_config(tmp_path, readers=[{"id": "door-c1", "kind": "rdm6300", "port": "/dev/nope", "court": "c1"}])
    result = await club_agent("doctor", "--config", str(config))
    assert result.exit_code == 1
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    failing = [i for i, line in enumerate(lines) if " FAIL " in f" {line} "]
    assert [lines[i].split()[0] for i in failing] == ["database", "serial:door-c1"]
    for i in failing:
        assert lines[i + 1].startswith("fix: ")
    assert lines[-1] == "not ready: 4 OK, 2 FAIL, 4 SKIP"

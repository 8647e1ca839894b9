"""The chaos run's premises: the sandbox cloud, the agent as a subprocess, its config, the camera, the devices.

The processes are the crash rig's (tests/e2e/crash_rig.py): the sandbox cloud in a subprocess of its own (it
outlives every kill of the agent and is the oracle), the agent started with `club-agent run --config ...` and
restarted after each SIGKILL. Here the agent also gets the wall-clock library's environment (chaos_clock.py), a
data dir on the small disk (chaos_disk.py), an RDM6300 reader on a pty (`[[readers]]`), a camera on court 1
(tests/cameras.py), and compressed outbox timers so that a ten-minute run sees many retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # psutil ships no type information
from chaos_timeline import Timeline
from chaos_traffic import BUTTON, BUTTON_COURT, DESK, DOOR, DOOR_COURT, ENTRY_READERS, EXIT_READERS

from agent.lan.auth import hash_password
from agent.sandbox.options import AgentSettings, SandboxOptions
from tests.e2e.crash_rig import Child, free_ports, wait_http

HOST = "127.0.0.1"
COURTS = ("c1", "c2", "c3", "c4")
CAMERA, CAMERA_COURT = "cam1", BUTTON_COURT
FLOOD_READER, FLOOD_READER_COURT, FLOOD_TABLET = "fl1", "c4", "fl2"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
RESTART_SEC = 5.0  # systemd/club-agent.service
RESTART_PREVENT_EXIT = 2  # a configuration error: systemd does not restart it
START_TRIES = 5
ORPHAN_GRACE_S = 3.0  # a child still running this long after the agent died was left behind
ORPHAN_WAIT_S = 20.0  # given this long to notice by itself (ffmpeg's next write to its closed pipe) before a kill


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    kind: str  # reader, tablet, button
    court: str | None = None
    direction: str = "in"

    @property
    def password(self) -> str:
        return f"pw-{self.id}-chaos-0123456789"

    @property
    def reply_topic(self) -> str:
        if self.kind == "reader":
            return f"rfid/{self.id}/response"
        if self.kind == "button":
            return f"court/{self.court}/button/ack"
        return f"tablet/{self.id}/response"


DEVICES = (
    *(Device(r, "reader", c) for r, c in ENTRY_READERS.items()),
    *(Device(r, "reader", c, "out") for c, r in EXIT_READERS.items()),
    Device(DESK, "tablet"),
    Device(BUTTON, "button", BUTTON_COURT),
    Device(FLOOD_READER, "reader", FLOOD_READER_COURT),
    Device(FLOOD_TABLET, "tablet"),
)
PLAYER_DEVICES = tuple(d for d in DEVICES if d.id not in (FLOOD_READER, FLOOD_TABLET))


def member_cards(count: int) -> list[tuple[str, str]]:
    """(member_id, card): 10 hex digits, as an EM4100 card reads on the RDM6300 too."""
    return [(f"m-chaos-{n:04d}", f"CA{n:08X}") for n in range(1, count + 1)]


class EnvChild(Child):
    """crash_rig.Child with extra environment (the clock library) for the agent."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path, extra_env: dict[str, str]) -> None:
        super().__init__(name, argv, log, cwd)
        self.extra_env = extra_env

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLUB_AGENT_")} | self.extra_env
        with self.log.open("ab") as out:
            out.write(f"\n=== start {self.starts + 1} at {time.time():.3f}\n".encode())
            self.proc = subprocess.Popen(
                self.argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


@dataclass
class Layout:
    root: Path
    mount: Path  # the small disk
    sandbox_port: int
    broker_port: int
    api_port: int
    ring: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ring = self.root / "ring"  # RAM (tmpfs) in production: never on the data disk

    @property
    def data(self) -> Path:
        return self.mount / "data"

    @property
    def db(self) -> Path:
        return self.data / "agent.db"

    @property
    def config(self) -> Path:
        return self.root / "agent.toml"

    @property
    def serial_link(self) -> Path:
        return self.root / "ttyUSB-door"  # the stable name a udev rule gives a USB-serial adapter

    @property
    def sandbox_url(self) -> str:
        return f"http://{HOST}:{self.sandbox_port}"

    @property
    def ready_url(self) -> str:
        return f"http://{HOST}:{self.api_port}/readyz"

    @staticmethod
    def of(root: Path) -> Layout:
        sandbox_port, broker_port, api_port = free_ports(3)
        return Layout(root, root / "disk", sandbox_port, broker_port, api_port)


def _toml(value: str) -> str:
    return json.dumps(value)


def write_config(layout: Layout, camera_url: str, budget_mb: int) -> None:
    settings = AgentSettings.of(SandboxOptions(members=0), layout.sandbox_url)
    secrets = layout.root / "secrets.toml"
    secrets.write_text(settings.secrets_toml())
    secrets.chmod(0o600)
    with ThreadPoolExecutor(max_workers=2) as pool:  # argon2 releases the GIL
        hashes = list(pool.map(hash_password, [d.password for d in DEVICES]))
    lines = [
        "# Generated by benchmarks/chaos.py",
        "[agent]",
        f"data_dir = {_toml(str(layout.data))}",
        'club_id = "club-chaos"',
        'agent_id = "edge-chaos"',
        'language = "en"',  # the serial reader's feedback line names the action: "Welcome" / "See you"
        "trust_clock = true",
        f"secrets_file = {_toml(str(secrets))}",
        "[broker]",
        f"host = {_toml(HOST)}",
        f"port = {layout.broker_port}",
        "[api]",
        f"host = {_toml(HOST)}",
        f"port = {layout.api_port}",
        # Players tap in and out within seconds, many times over: no debounce nor second-tap grace. The scan
        # limit is far above what a player reader does here (a few a second) and far below a flood.
        "[policy]",
        "debounce_s = 0",
        "second_tap_grace_s = 0",
        "scan_rate_per_s = 20",
        "scan_burst = 40",
        # Compressed outbox timers: a ten-minute run sees the retries and breaker openings of hours.
        "[sync]",
        "backoff_base_s = 0.2",
        "backoff_cap_s = 5",
        "breaker_failures = 5",
        "breaker_open_s = 5",
        "[media]",
        f"ring_dir = {_toml(str(layout.ring))}",
        "segment_s = 1",
        "ring_keep_s = 60",
        f"budget_mb = {budget_mb}",
        settings.config_toml(),
    ]
    for court in COURTS:
        lines += ["[[courts]]", f"id = {_toml(court)}", f'name = "Court {court}"']
    for device, password_hash in zip(DEVICES, hashes, strict=True):
        lines += ["[[devices]]", f"id = {_toml(device.id)}", f"kind = {_toml(device.kind)}"]
        if device.court is not None:
            lines.append(f"court = {_toml(device.court)}")
        if device.kind == "reader":
            lines.append(f"direction = {_toml(device.direction)}")
        lines.append(f"password_hash = {_toml(password_hash)}")
    lines += [
        "[[readers]]",
        f"id = {_toml(DOOR)}",
        'kind = "rdm6300"',
        f"port = {_toml(str(layout.serial_link))}",
        f"court = {_toml(DOOR_COURT)}",
        'feedback = "line"',
        "[[cameras]]",
        f"id = {_toml(CAMERA)}",
        f"court = {_toml(CAMERA_COURT)}",
        f"url = {_toml(camera_url)}",
    ]
    layout.config.write_text("\n".join(lines) + "\n")


@dataclass
class AgentRuns:
    """Starts, kills and stops of the agent, and what they left behind."""

    starts: list[float] = field(default_factory=list)  # seconds to /readyz
    crashes: list[str] = field(default_factory=list)  # exits the run did not cause, with the error that ended them
    start_failures: list[str] = field(default_factory=list)  # exits during start-up (retried 5 s later)
    orphans: list[str] = field(default_factory=list)  # processes the agent started that outlived it
    exits: list[int] = field(default_factory=list)  # exit codes of clean stops


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        argv = proc.cmdline()
    except psutil.Error:
        argv = []
    shown = " ".join(a for a in argv[:12] if "://" not in a)  # no URLs (a camera's may carry credentials)
    return f"pid {proc.pid} ({shown[:140]})"


_ERROR_LINE = re.compile(r"^[\s|]*((?:[\w.]+\.)?\w*(?:Error|Exception)\b.*)$")


def _frame(line: str) -> str:
    """'File ".../agent/media/pipeline.py", line 299, in _upload_loop' -> 'media/pipeline.py:299 _upload_loop'."""
    match = re.search(r'/agent/([^"]+)", line (\d+), in (\S+)', line)
    return f"{match.group(1)}:{match.group(2)} {match.group(3)}" if match else line.strip(" |")[:80]


class Agent:
    """The agent subprocess, supervised as systemd supervises it (systemd/club-agent.service: Restart=on-failure,
    RestartSec=5, RestartPreventExitStatus=2): an exit the run did not cause is a crash, recorded with the error
    that ended it, and followed by a restart 5 s later."""

    def __init__(
        self, layout: Layout, command: list[str], extra_env: dict[str, str], timeline: Timeline | None = None
    ) -> None:
        self.layout = layout
        self.child = EnvChild("agent", [*command, "run", "--config", str(layout.config)], layout.root / "agent.log",
                              layout.root, extra_env)  # fmt: skip
        self.runs = AgentRuns()
        self.timeline = timeline
        self.up = False
        self.expected_exit = True  # nothing runs yet; set again by every kill and stop the run makes
        self._lock = asyncio.Lock()  # one start, kill or stop at a time (faults and the supervisor)
        self._log_mark = 0  # the log's size at the last start: where a crash's error is looked for
        self._reapers: set[asyncio.Task[None]] = set()  # watching what a dead agent left behind

    async def start(self) -> float:
        async with self._lock:
            return await self._start()

    async def _start(self) -> float:
        """Start and wait for /readyz; an exit during start-up is a crash, retried as systemd would."""
        for _ in range(START_TRIES):
            with contextlib.suppress(OSError):
                self._log_mark = self.child.log.stat().st_size
            self.child.start()
            self.expected_exit = False
            try:
                waited = await wait_http(self.child, self.layout.ready_url, START_TIMEOUT_S)
            except RuntimeError:  # it exited while starting (a read-only data dir, for one): not a crash
                code = self._exited(self.runs.start_failures)
                if code == RESTART_PREVENT_EXIT:
                    raise
                await asyncio.sleep(RESTART_SEC)
                continue
            self.runs.starts.append(waited)
            self.up = True
            return waited
        raise RuntimeError(f"the agent did not start in {START_TRIES} tries:\n{self.child.tail()}")

    def _exited(self, into: list[str]) -> int | None:
        """Record an exit the run did not cause (in `into`); its exit code."""
        code = self.child.proc.returncode if self.child.proc is not None else None
        self.up = False
        self.expected_exit = True  # seen: not recorded twice
        into.append(f"exit {code}: {self._last_error()}")
        return code

    def _last_error(self) -> str:
        """The last exception line the agent's log has since its last start, with the agent frame above it."""
        try:
            with self.child.log.open("rb") as f:
                f.seek(self._log_mark)
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        lines = [ln for ln in text.splitlines() if not ln.startswith("{")]  # tracebacks, not JSON log lines
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].startswith("error: "):  # the CLI's own one-line refusal
                return lines[i][:300]
            if match := _ERROR_LINE.match(lines[i]):
                begin = max((k for k in range(i) if "Traceback (most recent call last)" in lines[k]), default=0)
                frames = [_frame(ln) for ln in lines[begin:i] if "/agent/" in ln and ln.strip(" |").startswith("File")]
                return f"{match.group(1)[:300]} (in {' > '.join(frames[-5:])})"
        return "no traceback in the log"

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart=on-failure: notice an unexpected exit, record it, start again RESTART_SEC later."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
            proc = self.child.proc
            if stop.is_set() or self._lock.locked() or proc is None or self.expected_exit or proc.poll() is None:
                continue
            window = self.timeline.open("crash", f"pid {proc.pid}") if self.timeline is not None else None
            if self._exited(self.runs.crashes) == RESTART_PREVENT_EXIT:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RESTART_SEC)
            if stop.is_set():
                return
            async with self._lock:
                if not self.child.running:
                    with contextlib.suppress(RuntimeError, TimeoutError):  # recorded; tried again next round
                        await self._start()
            if window is not None and self.timeline is not None:
                self.timeline.healed(window)
                self.timeline.settled(window)

    def _descendants(self) -> list[psutil.Process]:
        pid = self.child.pid
        if pid is None or not self.child.running:
            return []
        with contextlib.suppress(psutil.Error):
            return list(psutil.Process(pid).children(recursive=True))
        return []

    async def _reap_orphans(self, children: list[psutil.Process], how: str) -> None:
        """Processes the agent started that outlive it by ORPHAN_GRACE_S (by pid, never by name): noted with
        their command line; those still alive ORPHAN_WAIT_S later are killed (and said so)."""
        await asyncio.sleep(ORPHAN_GRACE_S)
        alive = [(p, _describe(p)) for p in children if _alive(p)]
        if not alive:
            return
        waited = ORPHAN_GRACE_S
        while waited < ORPHAN_WAIT_S and any(_alive(p) for p, _ in alive):
            await asyncio.sleep(0.5)
            waited += 0.5
        for proc, described in alive:
            still = _alive(proc)
            fate = f"still running {ORPHAN_WAIT_S:g} s after, killed" if still else f"gone within {waited:g} s"
            self.runs.orphans.append(f"{how}: {described} outlived the agent ({fate})")
            if still:
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGKILL)

    async def kill(self) -> None:
        async with self._lock:
            self.expected_exit = True
            children = self._descendants()
            self.up = False
            self.child.kill()
            if self.child.proc is not None:
                await self.child.wait(10)
        self._watch(children, "SIGKILL")

    def _watch(self, children: list[psutil.Process], how: str) -> None:
        """Reap what the dead agent left in the background: a restart does not wait for it."""
        if children:
            task = asyncio.create_task(self._reap_orphans(children, how))
            self._reapers.add(task)
            task.add_done_callback(self._reapers.discard)

    async def reaped(self) -> None:
        """Wait for every background reaper (at the end, before the report)."""
        if self._reapers:
            await asyncio.gather(*self._reapers, return_exceptions=True)

    async def stop(self) -> int | None:
        """SIGTERM, SIGKILL after STOP_TIMEOUT_S; the exit code (None if it had to be killed)."""
        if self.child.proc is None:
            return None
        async with self._lock:
            self.expected_exit = True
            children = self._descendants()
            self.up = False
            code: int | None
            try:
                code = await self.child.stop(STOP_TIMEOUT_S)
                self.runs.exits.append(code)
            except TimeoutError:
                code = None
                self.runs.orphans.append(f"agent did not stop within {STOP_TIMEOUT_S:g} s of SIGTERM (killed)")
        self._watch(children, "SIGTERM")
        return code

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the agent process (its threads; not the ffmpeg it starts)."""
        pid = self.child.pid
        if pid is None:
            return None
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return None
        return float(t.user + t.system)

    def holds(self, path: str) -> bool:
        """Whether the agent has `path` open (its fds, any thread): the serial port after a replug."""
        pid = self.child.pid
        if pid is None:
            return False
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return False
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                    return True
        return False

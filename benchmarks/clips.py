"""Highlight clips: the ring recorder's CPU per camera and press -> clip time, with 4 cameras recorded at once.

    .venv/bin/python benchmarks/clips.py [--cameras 4] [--rounds 3] [--cpu-window 30] [--warmup 15]
                                         [--round-gap 32] [--upload-kbps 4000]
                                         [--data-parent /dev/shm] [--ring-parent DIR] [--keep]

1. `--cameras` SimulatedCameras (tests/cameras.py: ffmpeg's testsrc2 at 720p, 25 fps, GOP 25 = 1 s, 2 Mbit/s,
   encoded live and served by GStreamer's RTSP server; every frame has its wall time burned in as a barcode)
   and the sandbox cloud, in-process; everything on loopback.
2. The agent as a subprocess (`python -m agent.cli run --config ...`): 4 courts, a button per court (random
   MQTT passwords, argon2 hashes), a `[[cameras]]` per court, `[media] ring_dir` in a temporary directory
   (tmpfs /dev/shm by default) with `segment_s = 1`, the sandbox's cloud settings and secrets, a desk API
   client. The data dir (database, clips) is beside the ring unless `--ring-parent` puts the ring elsewhere.
3. Once the agent's /api/v1/devices shows every camera online: a warm-up (`--warmup` s), then the recorders'
   CPU: the agent's child processes named ffmpeg, their user + system CPU time over `--cpu-window` seconds,
   as % of one core, per camera.
4. `--rounds` times, every button pressed at the same moment over MQTT, rounds `--round-gap` s apart (so one
   round's windows [press - 10 s, press + 20 s] do not overlap the next's) plus 1/rounds of a segment (so the
   presses meet the cameras' keyframes at a different phase each round). Press -> clip is the local
   monotonic time from sending the press to a 50 ms poll of the agent's SQLite (read-only) seeing
   clip_state ready or uploaded; the database's clip_ready_at - pressed_at is reported beside it.
5. Each clip: the wall time burned into its first frame against the wanted start (start_at = press - 10 s):
   start error = wanted start - first frame (>= 0: the pre-roll is all there; the stream-copy cut starts on a
   keyframe, up to one segment early); a clip whose first frame is more than one frame late missed its
   pre-roll. Also its last frame against the wanted end (the stream copy lasts 30 s from its first frame, so it
   ends as much before the wanted end as it starts early), its duration (ffprobe: 30 s), and the sandbox's copy
   (tus, paced to `upload_kbps_open`, waited for within a bound) with a matching SHA-256.

Budget (DESIGN 5): the recorder <= 2% of a core per camera (the median camera), every clip ready <= 22 s after
its press. Prints tables; the very last line of stdout is one JSON object
`{"bench": "clips", "cpu_pct_per_camera": ..., "press_to_clip_s_max": ..., "start_error_s_max": ...}` (and
more). Exit 1 over budget, or when a clip is not ready, misses its pre-roll, is not 30 s long or does not reach
the sandbox intact.
Every loop is bounded in count and time; the cameras and the agent are stopped on any exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped]  # psutil ships no type information
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the repository, for tests/cameras.py
import tap_latency as tl  # the agent's config, start and stop are shared

from agent import sim
from agent.media.clips import probe
from agent.sandbox.options import SandboxOptions
from agent.sandbox.server import SandboxServer
from tests.cameras import SYSTEM_PYTHON, SimulatedCamera, burned_times

HOST = tl.HOST
BUDGET_CPU_PCT = 2.0
BUDGET_PRESS_TO_CLIP_S = 22.0
FPS = 25
GOP = 25
SEGMENT_S = 1  # the ring's segment_s: one GOP
BITRATE = "2M"
PRE_ROLL_S = 10.0
CLIP_S = 30.0
LENGTH_TOLERANCE_S = 0.15
FRAME_S = 1.0 / FPS
API_CLIENT = "bench-desk"
RECORDING_TIMEOUT_S = 60.0  # every camera online in the agent's device list
RECORDING_POLL_S = 0.5
POLL_S = 0.05  # the highlights table, while waiting for clips
READY_TIMEOUT_S = 60.0  # after a round's press: every clip ready (or given up on) by then
PRESS_REPLY_S = 10.0
UPLOAD_WAIT_MIN_S = 60.0
UPLOAD_WAIT_MAX_S = 900.0
UPLOAD_POLL_S = 0.5
LOG_EVENTS = (
    "clip_ready",
    "clip_uploaded",
    "clip_cut_failed",
    "clip_cut_crashed",
    "clip_missed",
    "clip_upload_retry",
    "camera_recorder_down",
    "storage_budget_high",
)
TERMINAL = ("missed", "failed", "evicted")
HIGHLIGHT_SQL = (
    "SELECT clip_state, clip_ready_at, pressed_at, clip_start_at, start_at, clip_path, clip_sha256, clip_bytes,"
    " clip_error FROM highlights WHERE highlight_id = ?"
)


# -- set-up ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    id: str
    court: str
    sim: SimulatedCamera


@dataclass(frozen=True)
class Bench:
    setup: tl.Setup
    buttons: list[tl.Device]
    cameras: list[Camera]
    desk_token: str
    db_path: Path


def write_agent_files(
    root: Path, ring_dir: Path, cameras: list[Camera], server: SandboxServer, upload_kbps: int
) -> Bench:
    """tap_latency's config (courts, buttons with argon2 hashes, loopback ports), plus the cameras, the media
    section, the sandbox's cloud settings and a desk API client; the sandbox's secrets in a 0600 file."""
    buttons = [tl.Device(f"b{n}", "button", c.court, secrets.token_urlsafe(18)) for n, c in enumerate(cameras, 1)]
    broker_port, api_port = tl.free_ports(2)
    data_dir = root / "data"
    config_path = root / "agent.toml"
    tl.write_config(config_path, data_dir, broker_port, api_port, buttons)

    desk_token = secrets.token_urlsafe(32)
    secrets_path = root / "secrets.toml"
    secrets_path.write_text(
        server.settings.secrets_toml() + f"\n[api_tokens]\n{API_CLIENT} = {tl.toml_str(desk_token)}\n",
        encoding="utf-8",
    )
    secrets_path.chmod(0o600)

    extra = [server.settings.config_toml(), "[[api.clients]]", f"name = {tl.toml_str(API_CLIENT)}", 'role = "desk"']
    for camera in cameras:
        extra += [
            "",
            "[[cameras]]",
            f"id = {tl.toml_str(camera.id)}",
            f"court = {tl.toml_str(camera.court)}",
            f"url = {tl.toml_str(camera.sim.url)}",
        ]
    extra += [
        "",
        "[media]",
        f"ring_dir = {tl.toml_str(str(ring_dir))}",
        f"segment_s = {SEGMENT_S}",
        f"upload_kbps_open = {upload_kbps}",
        "",
    ]
    text = config_path.read_text(encoding="utf-8")
    # The secrets file is a key of write_config's [agent] table; everything else is a table of its own, appended.
    text = text.replace("[agent]\n", f"[agent]\nsecrets_file = {tl.toml_str(str(secrets_path))}\n", 1)
    config_path.write_text(text + "\n" + "\n".join(extra), encoding="utf-8")
    setup = tl.Setup(
        root=root,
        config_path=config_path,
        members_path=root / "members.json",  # not used: no members are needed for buttons
        log_path=root / "agent.log",
        broker_port=broker_port,
        api_port=api_port,
        readers=[],
        tablets=[],
        cards=[],
        unknown_cards=[],
        tap_pool=[],
    )
    return Bench(setup, buttons, cameras, desk_token, data_dir / "agent.db")


# -- measurement -------------------------------------------------------------------------------------------------


@dataclass
class CameraCpu:
    camera: Camera
    pid: int | None
    cpu_pct: float | None  # None: no recorder, or it restarted within the window
    note: str = ""


@dataclass
class CpuResult:
    window_s: float
    cameras: list[CameraCpu]
    agent_pct: float  # the agent's own Python process
    encoders_pct: float  # the simulated cameras' encoders, for context (not the agent's cost)
    machine_pct: float  # of all cores together


@dataclass
class Press:
    round: int
    court: str
    highlight_id: str
    sent_mono: float
    sent_wall: datetime
    state: str = "pending"
    ready_s: float | None = None  # local: press sent -> poll saw the clip ready
    db_ready_s: float | None = None  # clip_ready_at - pressed_at
    start_at: datetime | None = None  # the wanted start
    clip_start_at: datetime | None = None  # the first frame's time as the agent believes it
    first_frame: datetime | None = None  # ... as the camera burned it in
    last_frame: datetime | None = None
    duration_s: float | None = None
    clip_path: Path | None = None
    clip_sha256: str | None = None
    clip_bytes: int = 0
    uploaded: bool = False
    sha_ok: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def start_error_s(self) -> float | None:
        """Wanted start - first frame: >= 0 when the clip holds the whole pre-roll."""
        if self.start_at is None or self.first_frame is None:
            return None
        return (self.start_at - self.first_frame).total_seconds()

    @property
    def wrong_length(self) -> bool:
        """ffprobe's duration is not CLIP_S, give or take LENGTH_TOLERANCE_S (a frame or two of rounding)."""
        return self.duration_s is None or abs(self.duration_s - CLIP_S) > LENGTH_TOLERANCE_S

    @property
    def end_error_s(self) -> float | None:
        """Last frame - wanted end (start + 30 s): minus the lead-in for a stream copy (see the module docstring)."""
        if self.start_at is None or self.last_frame is None:
            return None
        return (
            self.last_frame + timedelta(seconds=FRAME_S) - (self.start_at + timedelta(seconds=CLIP_S))
        ).total_seconds()

    @property
    def stamp_lag_s(self) -> float | None:
        """How much later the agent stamps the first frame than the camera made it (the stream's latency)."""
        if self.clip_start_at is None or self.first_frame is None:
            return None
        return (self.clip_start_at - self.first_frame).total_seconds()

    @property
    def missed_pre_roll(self) -> bool:
        error = self.start_error_s
        return error is None or error < -FRAME_S


def from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


async def wait_recording(bench: Bench, agent: subprocess.Popen[bytes]) -> float:
    """Seconds until the agent's device list shows every camera online (desk token, /api/v1/devices)."""
    url = f"http://{HOST}:{bench.setup.api_port}/api/v1/devices"
    headers = {"Authorization": f"Bearer {bench.desk_token}"}
    wanted = {c.id for c in bench.cameras}
    started = time.monotonic()
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for _ in range(int(RECORDING_TIMEOUT_S / RECORDING_POLL_S) + 1):
            if agent.poll() is not None:
                raise RuntimeError(f"the agent exited with {agent.returncode} during start-up (see its log)")
            if time.monotonic() - started > RECORDING_TIMEOUT_S:
                break
            try:
                async with http.get(url, headers=headers) as response:
                    if response.status == 200:
                        devices = (await response.json())["devices"]
                        online = {d["device_id"] for d in devices if d["kind"] == "camera" and d["state"] == "online"}
                        if wanted <= online:
                            return time.monotonic() - started
                        last = f"online: {sorted(online)}"
                    else:
                        last = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
                last = repr(exc)
            await asyncio.sleep(RECORDING_POLL_S)
    raise RuntimeError(f"the cameras were not all recording within {RECORDING_TIMEOUT_S:.0f} s ({last})")


def recorders(agent_pid: int, bench: Bench) -> dict[str, psutil.Process]:
    """The agent's ffmpeg children that record a camera, by camera id (its URL is ffmpeg's `-i`)."""
    by_url = {c.sim.url: c.id for c in bench.cameras}
    out: dict[str, psutil.Process] = {}
    for child in psutil.Process(agent_pid).children(recursive=True):
        try:
            if child.name() != "ffmpeg":
                continue
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        for arg in cmdline:
            if arg in by_url:
                out[by_url[arg]] = child
    return out


def cpu_s(proc: psutil.Process) -> float | None:
    try:
        return float(tl.cpu_seconds(proc))
    except psutil.Error:
        return None


async def measure_cpu(agent_pid: int, bench: Bench, window_s: float) -> CpuResult:
    agent = psutil.Process(agent_pid)
    encoders = []
    for c in bench.cameras:
        with contextlib.suppress(psutil.Error):
            if c.sim.encoder_pid is not None:
                encoders.append(psutil.Process(c.sim.encoder_pid))
    before = recorders(agent_pid, bench)
    start = {cam: cpu_s(p) for cam, p in before.items()}
    agent_0 = tl.cpu_seconds(agent)
    encoders_0 = [cpu_s(p) or 0.0 for p in encoders]
    psutil.cpu_percent(None)
    started = time.monotonic()
    await asyncio.sleep(window_s)
    wall = time.monotonic() - started
    machine = psutil.cpu_percent(None)
    agent_pct = 100.0 * (tl.cpu_seconds(agent) - agent_0) / wall
    encoders_pct = 100.0 * sum((cpu_s(p) or 0.0) - c0 for p, c0 in zip(encoders, encoders_0, strict=True)) / wall
    after = recorders(agent_pid, bench)
    rows: list[CameraCpu] = []
    for camera in bench.cameras:
        proc, now = before.get(camera.id), after.get(camera.id)
        c0 = start.get(camera.id)
        c1 = cpu_s(now) if now is not None else None
        if proc is None:
            rows.append(CameraCpu(camera, None, None, "no recorder ffmpeg at the start of the window"))
        elif now is None or now.pid != proc.pid or c0 is None or c1 is None:
            rows.append(CameraCpu(camera, proc.pid, None, "the recorder restarted within the window"))
        else:
            rows.append(CameraCpu(camera, proc.pid, 100.0 * (c1 - c0) / wall))
    return CpuResult(wall, rows, agent_pct, encoders_pct, machine)


def poll_highlight(conn: sqlite3.Connection, press: Press) -> None:
    """Read the highlight's clip columns; when it is ready, note when the poll saw it."""
    row = conn.execute(HIGHLIGHT_SQL, (press.highlight_id,)).fetchone()
    if row is None:
        return
    state, before = str(row["clip_state"]), press.state
    if state in ("ready", "uploaded") and press.ready_s is None:
        press.ready_s = time.monotonic() - press.sent_mono
    press.state = state
    press.start_at = from_ms(row["start_at"])
    if state in ("ready", "uploaded"):
        press.db_ready_s = (int(row["clip_ready_at"]) - int(row["pressed_at"])) / 1000
        press.clip_start_at = from_ms(row["clip_start_at"])
        press.clip_path = Path(str(row["clip_path"])) if row["clip_path"] else None
        press.clip_sha256 = row["clip_sha256"]
        press.clip_bytes = int(row["clip_bytes"] or 0)
        press.uploaded = state == "uploaded"
    elif state in TERMINAL and state != before:
        press.problems.append(f"clip {state}: {row['clip_error']}")


def connect_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    conn.row_factory = sqlite3.Row
    return conn


async def press_all(buttons: list[sim.SimButton], round_no: int) -> list[Press]:
    """Every button at the same moment; one Press per acknowledged highlight."""

    async def one(button: sim.SimButton) -> tuple[float, datetime, sim.Reply]:
        sent_mono, sent_wall = time.monotonic(), datetime.now(UTC)
        return sent_mono, sent_wall, await button.press(reply_within=PRESS_REPLY_S)

    replies = await asyncio.gather(*(one(b) for b in buttons))
    presses = []
    for button, (sent_mono, sent_wall, reply) in zip(buttons, replies, strict=True):
        highlight_id = reply.payload.get("highlight_id")
        if not highlight_id:
            raise RuntimeError(f"button {button.device_id}: no highlight in the acknowledgement {reply.payload}")
        presses.append(Press(round_no, button.court_id, str(highlight_id), sent_mono, sent_wall))
    return presses


async def wait_ready(conn: sqlite3.Connection, presses: list[Press]) -> None:
    """Poll every POLL_S until each clip is ready or given up on, at most READY_TIMEOUT_S after the press."""
    first = min(p.sent_mono for p in presses)
    for _ in range(int(READY_TIMEOUT_S / POLL_S) + 1):
        waiting = [p for p in presses if p.ready_s is None and p.state not in TERMINAL]
        if not waiting or time.monotonic() - first > READY_TIMEOUT_S:
            break
        for press in waiting:
            with contextlib.suppress(sqlite3.OperationalError):  # busy: the next poll reads it
                poll_highlight(conn, press)
        await asyncio.sleep(POLL_S)
    for press in presses:
        if press.ready_s is None and press.state not in TERMINAL:
            press.problems.append(f"not ready within {READY_TIMEOUT_S:.0f} s (state {press.state})")


async def inspect_clip(press: Press) -> None:
    """The burned-in times of the clip's first and last frames, and its duration (ffprobe)."""
    if press.clip_path is None:
        return
    try:
        first = await burned_times(press.clip_path, press.sent_wall, frames=1)
        last = await burned_times(press.clip_path, press.sent_wall, last_s=0.5)
        info = await probe(press.clip_path)
    except Exception as exc:  # a clip that cannot be read is a finding, not a crash of the benchmark
        press.problems.append(f"cannot read the clip: {exc}")
        return
    press.first_frame = first[0] if first else None
    press.last_frame = last[-1] if last else None
    with contextlib.suppress(KeyError, TypeError, ValueError):
        press.duration_s = float(info["format"]["duration"])
    if press.missed_pre_roll:
        press.problems.append(f"missed the pre-roll: start error {press.start_error_s}")
    if press.wrong_length:
        press.problems.append(f"lasts {press.duration_s} s, not {CLIP_S:g} s")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def wait_uploads(conn: sqlite3.Connection, server: SandboxServer, presses: list[Press], kbps: int) -> float:
    """Until every ready clip is uploaded and complete in the sandbox, within a bound from the bytes and the
    agent's upload pace; then each received copy's SHA-256 against the agent's. Seconds waited."""
    ready = [p for p in presses if p.ready_s is not None]
    total = sum(p.clip_bytes for p in ready)
    bound = min(UPLOAD_WAIT_MAX_S, max(UPLOAD_WAIT_MIN_S, 1.5 * total * 8 / (kbps * 1000) + 30))
    started = time.monotonic()
    for _ in range(int(bound / UPLOAD_POLL_S) + 1):
        for press in ready:
            if not press.uploaded:
                with contextlib.suppress(sqlite3.OperationalError):
                    poll_highlight(conn, press)
        complete = {u.metadata.highlight_id for u in server.sandbox.clips.complete()}
        if all(p.uploaded and p.highlight_id in complete for p in ready) or time.monotonic() - started > bound:
            break
        await asyncio.sleep(UPLOAD_POLL_S)
    for press in ready:
        upload = server.sandbox.clips.of_highlight(press.highlight_id)
        if not press.uploaded or upload is None or upload.status.value != "complete":
            press.uploaded = False
            press.problems.append(f"not uploaded within {bound:.0f} s")
            continue
        received = await asyncio.to_thread(sha256_of, upload.path)
        local = await asyncio.to_thread(sha256_of, press.clip_path) if press.clip_path else None
        press.sha_ok = received == press.clip_sha256 == upload.metadata.sha256 == local
        if not press.sha_ok:
            press.problems.append(f"SHA-256 differs: sandbox {received[:12]}, agent {str(press.clip_sha256)[:12]}")
    return time.monotonic() - started


@dataclass
class Result:
    recording_s: float
    cpu: CpuResult
    presses: list[Press]
    upload_wait_s: float
    agent_exit: int
    log_events: dict[str, int]


def count_log_events(path: Path) -> dict[str, int]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    return {name: text.count(name) for name in LOG_EVENTS if name in text}


async def stop(agent: subprocess.Popen[bytes], seen: list[psutil.Process]) -> int:
    """SIGTERM the agent (tap_latency's stop: kill after a timeout). Its ffmpegs run in sessions of their own:
    any still running after it (the agent was killed) are ended here, by their process objects."""
    with contextlib.suppress(psutil.Error):
        seen.extend(psutil.Process(agent.pid).children(recursive=True))
    code, _ = await asyncio.to_thread(tl.stop_agent, agent)
    for proc in seen:
        with contextlib.suppress(psutil.Error):
            if proc.is_running():  # the same process (psutil checks its start time), not a reused pid
                proc.kill()
    return code


async def run(args: argparse.Namespace, root: Path, ring_dir: Path, console: Console) -> Result:
    async with contextlib.AsyncExitStack() as stack:
        console.print(f"[dim]starting {args.cameras} simulated cameras and the sandbox cloud...[/]")
        cameras = []
        for n, court in enumerate(tl.COURTS[: args.cameras], 1):
            cam = SimulatedCamera(root / f"camera-{n}", fps=FPS, gop=GOP, bitrate=BITRATE)
            cameras.append(Camera(f"cam-{court}", court, await stack.enter_async_context(cam)))
        server = await stack.enter_async_context(SandboxServer(SandboxOptions(members=0), port=0))
        bench = await asyncio.to_thread(write_agent_files, root, ring_dir, cameras, server, args.upload_kbps)
        seen: list[psutil.Process] = []
        log = stack.enter_context(bench.setup.log_path.open("wb"))
        agent = tl.start_agent(bench.setup, log)
        try:
            recording_s = await wait_recording(bench, agent)
            console.print(
                f"[dim]every camera recording after {recording_s:.1f} s; warm-up {args.warmup:g} s, "
                f"then the recorders' CPU over {args.cpu_window:g} s...[/]"
            )
            await asyncio.sleep(args.warmup)
            cpu = await measure_cpu(agent.pid, bench, args.cpu_window)
            presses: list[Press] = []
            conn = stack.enter_context(contextlib.closing(connect_db(bench.db_path)))
            async with contextlib.AsyncExitStack() as devices:
                buttons = [
                    await devices.enter_async_context(
                        sim.button(HOST, bench.setup.broker_port, b.id, b.court, b.password)
                    )
                    for b in bench.buttons
                    if b.court is not None
                ]
                next_at = time.monotonic()
                for round_no in range(1, args.rounds + 1):
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    # A round later by a fraction of a segment each time: the presses meet the cameras' keyframes
                    # (and so the segment boundaries) at a different phase every round.
                    next_at = time.monotonic() + args.round_gap + SEGMENT_S / args.rounds
                    console.print(f"[dim]round {round_no}/{args.rounds}: {len(buttons)} buttons pressed at once[/]")
                    batch = await press_all(buttons, round_no)
                    await wait_ready(conn, batch)
                    for press in batch:
                        await inspect_clip(press)
                    presses += batch
            console.print("[dim]waiting for the uploads...[/]")
            upload_wait_s = await wait_uploads(conn, server, presses, args.upload_kbps)
        except BaseException:
            exit_code = await stop(agent, seen)
            console.print(f"[red]benchmark failed[/]; agent exit {exit_code}; agent log tail:")
            console.print(tl.log_tail(bench.setup.log_path), markup=False, highlight=False)
            raise
        exit_code = await stop(agent, seen)
    return Result(recording_s, cpu, presses, upload_wait_s, exit_code, count_log_events(bench.setup.log_path))


# -- report ------------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def report(console: Console, r: Result) -> tuple[bool, dict[str, Any]]:
    cpu_table = Table(title=f"ring recorder CPU over {r.cpu.window_s:.1f} s (% of one core)")
    for col in ("camera", "court", "ffmpeg pid", "CPU %", "note"):
        cpu_table.add_column(col)
    for row in r.cpu.cameras:
        cpu_table.add_row(row.camera.id, row.camera.court, str(row.pid or "-"), fmt(row.cpu_pct), row.note)
    console.print(cpu_table)
    console.print(
        f"agent (Python) {r.cpu.agent_pct:.2f} %; simulated cameras' encoders {r.cpu.encoders_pct:.1f} % (not the "
        f"agent's cost); whole machine {r.cpu.machine_pct:.1f} % of {psutil.cpu_count()} cores"
    )

    table = Table(title="press -> clip (every button pressed at once, each round)")
    for col in (
        "round",
        "court",
        "press->clip s",
        "db ready s",
        "start error s",
        "end error s",
        "stamp lag s",
        "duration s",
        "MB",
        "uploaded",
    ):
        table.add_column(col)
    for p in r.presses:
        table.add_row(
            str(p.round),
            p.court,
            fmt(p.ready_s) if p.ready_s is not None else f"[red]{p.state}[/]",
            fmt(p.db_ready_s),
            fmt(p.start_error_s, 3, signed=True),
            fmt(p.end_error_s, 3, signed=True),
            fmt(p.stamp_lag_s, 3, signed=True),
            fmt(p.duration_s),
            fmt(p.clip_bytes / 1e6, 1),
            ("sha256 ok" if p.sha_ok else "[red]sha256 differs[/]") if p.uploaded else "[red]no[/]",
        )
    console.print(table)
    for p in r.presses:
        for problem in p.problems:
            console.print(f"[yellow]round {p.round} {p.court} {p.highlight_id}: {problem}[/]", highlight=False)
    console.print(
        "start error = wanted start (press - 10 s) - the first frame's burned-in time (>= 0: pre-roll complete); "
        "end error = last frame - wanted end; stamp lag = the agent's clip_start_at - the burned-in time",
        style="dim",
    )

    cpus = [c.cpu_pct for c in r.cpu.cameras if c.cpu_pct is not None]
    ready = [p.ready_s for p in r.presses if p.ready_s is not None]
    errors = [abs(e) for p in r.presses if (e := p.start_error_s) is not None]
    cpu_median = statistics.median(cpus) if len(cpus) == len(r.cpu.cameras) and cpus else None
    cpu_max = max(cpus) if cpus else None
    press_max = max(ready) if len(ready) == len(r.presses) and ready else None
    press_median = statistics.median(ready) if ready else None
    pre_roll_missed = sum(p.missed_pre_roll for p in r.presses if p.ready_s is not None)
    uploaded = sum(p.uploaded and p.sha_ok for p in r.presses)
    ok_cpu = cpu_median is not None and cpu_median <= BUDGET_CPU_PCT
    ok_press = press_max is not None and press_max <= BUDGET_PRESS_TO_CLIP_S
    wrong_length = sum(p.wrong_length for p in r.presses if p.clip_path is not None)
    ok_clips = bool(r.presses) and not pre_roll_missed and not wrong_length and uploaded == len(r.presses)
    ok = ok_cpu and ok_press and ok_clips and r.agent_exit in (0, -signal.SIGTERM)
    console.print(
        f"budget recorder <= {BUDGET_CPU_PCT:g} % of a core per camera: {'PASS' if ok_cpu else 'FAIL'} "
        f"(median {fmt(cpu_median)}, max {fmt(cpu_max)}); press -> clip <= {BUDGET_PRESS_TO_CLIP_S:g} s: "
        f"{'PASS' if ok_press else 'FAIL'} (max {fmt(press_max)}, median {fmt(press_median)}); "
        f"clips {len(ready)}/{len(r.presses)} ready, {pre_roll_missed} missed the pre-roll, {wrong_length} not "
        f"{CLIP_S:g} s long, {uploaded} uploaded "
        f"intact (waited {r.upload_wait_s:.0f} s); cameras recording {r.recording_s:.1f} s after start; "
        f"agent exit {r.agent_exit}; agent log: {r.log_events}",
        highlight=False,
    )
    summary = {
        "bench": "clips",
        "cameras": len(r.cpu.cameras),
        "cpu_pct_per_camera": rounded(cpu_median, 2),
        "cpu_pct_per_camera_max": rounded(cpu_max, 2),
        "press_to_clip_s_max": rounded(press_max, 2),
        "press_to_clip_s_median": rounded(press_median, 2),
        "db_press_to_clip_s_max": rounded(max((p.db_ready_s for p in r.presses if p.db_ready_s), default=None), 2),
        "start_error_s_max": rounded(max(errors) if errors else None, 3),
        "pre_roll_missed": pre_roll_missed,
        "wrong_length": wrong_length,
        "clips": len(ready),
        "presses": len(r.presses),
        "uploaded": uploaded,
        "agent_cpu_pct": round(r.cpu.agent_pct, 2),
        "budget_cpu_pct": BUDGET_CPU_PCT,
        "budget_press_to_clip_s": BUDGET_PRESS_TO_CLIP_S,
    }
    return ok, summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--cameras", type=int, default=4, help="cameras, one per court (1..4)")
    p.add_argument("--rounds", type=int, default=3, help="times every button is pressed at once")
    p.add_argument("--cpu-window", type=float, default=30.0, help="seconds over which the recorders' CPU is measured")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of recording before the CPU window")
    p.add_argument("--round-gap", type=float, default=32.0, help="seconds between rounds (30: windows just apart)")
    p.add_argument("--upload-kbps", type=int, default=4000, help="the agent's media.upload_kbps_open")
    default_parent = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()  # noqa: S108
    p.add_argument("--data-parent", default=default_parent, help="where the temporary data dir goes")
    p.add_argument("--ring-parent", default=None, help="where the ring goes (default: in the data dir's folder)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories (config, log, clips)")
    args = p.parse_args(argv)
    for name, lo, hi in (
        ("cameras", 1, len(tl.COURTS)),
        ("rounds", 1, 20),
        ("cpu_window", 1, 600),
        ("warmup", 0, 600),
        ("round_gap", 1, 600),
        ("upload_kbps", 64, 1_000_000),
    ):
        if not lo <= getattr(args, name) <= hi:
            p.error(f"--{name.replace('_', '-')} must be {lo}..{hi}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing or not SYSTEM_PYTHON.exists():
        raise SystemExit(
            f"missing {', '.join(missing) or SYSTEM_PYTHON}: the simulated cameras need Debian's ffmpeg, python3-gi, "
            "gir1.2-gst-rtsp-server-1.0 and the GStreamer plugins (see tests/cameras.py)"
        )
    console = Console(width=max(120, shutil.get_terminal_size((120, 40)).columns))
    root = Path(tempfile.mkdtemp(prefix="clips-bench-", dir=args.data_parent))
    ring_root = Path(tempfile.mkdtemp(prefix="clips-ring-", dir=args.ring_parent)) if args.ring_parent else None
    ring_dir = (ring_root or root) / "ring"
    started = time.monotonic()
    try:
        console.print(f"[dim]set-up in {root} (ring {ring_dir})[/]")
        result = asyncio.run(run(args, root, ring_dir, console))
    finally:
        if args.keep:
            console.print(f"[dim]kept {root}{f' and {ring_root}' if ring_root else ''}[/]")
        else:
            shutil.rmtree(root, ignore_errors=True)
            if ring_root is not None:
                shutil.rmtree(ring_root, ignore_errors=True)
    ok, summary = report(console, result)
    console.print(f"[dim]runtime {time.monotonic() - started:.0f} s[/]")
    sys.stdout.flush()
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

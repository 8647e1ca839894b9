"""RingRecorder: one supervised ffmpeg per camera, copying its RTSP stream into a ring of short segments.

ffmpeg copies the stream (`-c copy`, about 1% of a core at 720p) into MPEG-TS segments under
`ring_dir/<run-id>/`, one directory per ffmpeg process ("run"), and tells us on a pipe each time it closes one.
The recorder stamps that moment with the injected wall clock: the camera's RTP timestamps start anywhere and
jump at every reconnect, so they cannot place footage in time. A segment's wall start is the previous segment's
close (the index of a run is contiguous) or, for the first of a run, its close minus the stream duration
ffmpeg reports.

Segments split only on the camera's keyframes, so a segment runs from one keyframe to the first keyframe at or
after the next multiple of `segment_s`.

Supervision: ffmpeg exits with status 0 when the camera drops the connection or stops answering (`-timeout`),
and hangs without a word when the camera keeps the connection but sends no frames. So every exit is followed
by a restart after a capped, jittered backoff, and ffmpeg's `-progress` output is watched: no advance for
`stall_s` seconds kills the process group. ffmpeg runs in its own session, and the group is killed whenever
the recorder stops, cancelled or not.

The index and the files are pruned together by age (`keep_s`, on the monotonic clock, so an NTP step neither
empties nor freezes the ring) and by count. The ring directory belongs to one recorder: run directories left
there by an earlier process are deleted at start, since their index died with it.

The camera URL, credentials included, is on ffmpeg's command line (ffmpeg has no other way to take them);
logs and `last_error` carry it with the password masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import math
import os
import random
import re
import secrets
import shutil
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from ..errors import AgentError
from ..logs import OnceLogger, get_logger
from ..loop import check_cancelled

log = get_logger("agent.media.recorder")

FFMPEG = "ffmpeg"
# ffmpeg's socket I/O timeout on RTSP: a camera that stops answering ends ffmpeg (with status 0) after this.
RTSP_TIMEOUT_S = 5.0
PROGRESS_PERIOD_S = 0.5  # ffmpeg -stats_period: how often -progress reports while media flows
WATCHDOG_TICK_S = 0.5
# Before a run's first packet, connecting and ffmpeg's stream probe (up to 5 s of analysis) may take this long
# whatever `stall_s` says.
STARTUP_GRACE_S = 10.0
# ffmpeg splits at the first keyframe at or after each multiple of segment_s, less this. Camera timestamps
# jitter by milliseconds; a GOP as long as segment_s whose keyframes fall just short of the multiples would
# otherwise make every segment twice as long as asked.
SEGMENT_TIME_DELTA_S = 0.1
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
# Each delay is drawn from [1 - BACKOFF_JITTER, 1] times the capped exponential one, so cameras that dropped
# together (a switch rebooting) do not all reconnect in the same instant.
BACKOFF_JITTER = 0.5
STABLE_RUN_S = 30.0  # a run that lasted this long starts the backoff over
STOP_GRACE_S = 2.0  # SIGTERM lets ffmpeg close the segment it is writing; SIGKILL after this
KILL_WAIT_S = 2.0
STDERR_TAIL_LINES = 20
# Segments of a run whose close times differ from their stream duration by more than this are not chained:
# the camera paused (or the wall clock stepped), and the index shows a gap rather than stretched footage.
CONTIGUITY_SLACK_S = 0.5
GAP_TOLERANCE_S = 0.25  # covering(): adjacent segments this far apart still count as contiguous

_RUN_DIR = re.compile(r"^run-\d{8}T\d{6}-[0-9a-f]{6}$")
_SEGMENT_PATTERN = "%08d.ts"
# What ffmpeg says that does not explain an exit: the muxer's complaints about camera timestamps, the stream
# listing and the closing statistics. Logged at debug, kept out of `last_error`.
_CHATTER = re.compile(
    r"^\s|^\[(segment|mpegts) @ [^]]*\] (Opening '|Non-monoton|Timestamps are unset)"
    r"|^(Input|Output) #|^Stream mapping:|^video:\d+kB"
)
_SECTION = re.compile(r"^(Input|Output) #\d+|^Stream mapping:")
_AUDIO_STREAM = re.compile(r"^\s*Stream #\d+:\d+.*?: Audio: ([\w-]+)")
# Audio that MPEG-TS can hold as it is. G.711 and G.726, which many cameras send, it would store as an opaque
# data stream, silently; such audio is encoded to AAC instead (a few kbit/s of 8 kHz mono: cheap).
TS_AUDIO = frozenset({"aac", "mp2", "mp3", "ac3", "eac3", "opus"})
AAC_ARGS = ("-c:a", "aac", "-b:a", "64k")


class RecorderError(AgentError):
    """The ring recorder was misused, or its segments could not be pinned."""


@dataclass(frozen=True, slots=True)
class Segment:
    """One closed ring segment. `start`/`end` are wall times (UTC); `duration_s` is ffmpeg's stream duration.

    The first segment of a run (`seq` 0) has no earlier close to start from, so its start is its end less its
    stream duration, and that duration is not to be trusted: it holds what ffmpeg buffered while it probed the
    stream, and the camera's timestamps often jump forward inside it when the first RTCP report re-syncs
    audio and video (by 0.85 s, in a third of the simulated camera's starts). Its start is then too early by
    the jump; `settled` is False, and `covering()` does not use it.
    """

    path: Path
    start: datetime
    end: datetime
    duration_s: float
    run_id: str
    seq: int

    @property
    def settled(self) -> bool:
        """Its wall start is the previous segment's close, not an estimate."""
        return self.seq > 0

    def overlaps(self, start: datetime, end: datetime) -> bool:
        return self.end > start and self.start < end


class RecorderState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass(slots=True)
class _Run:
    run_id: str
    directory: Path
    spawned_at: datetime
    ended: bool = False
    last: Segment | None = None
    count: int = 0


@dataclass(frozen=True, slots=True)
class _Entry:
    segment: Segment
    closed_mono: float


PresenceCallback = Callable[[str, bool, str], None]


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def backoff_delay(attempt: int) -> float:
    """The wait before restart number `attempt` (0-based) of a failing camera."""
    base = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2.0 ** min(attempt, 30))
    return base * (1.0 - BACKOFF_JITTER * random.random())


class RingRecorder:
    """Record one camera into `ring_dir` until stopped.

    `async with RingRecorder(...) as rec:` runs the supervisor in a task of its own; or await `run()` inside
    the agent's TaskGroup and cancel it to stop. Either way, a recorder runs once.

    `on_presence(camera_id, online, reason)` is called when media starts flowing (online) and when it stops
    (offline, with the reason: ffmpeg's exit and last error, a stall, a spawn failure).
    """

    def __init__(
        self,
        camera_id: str,
        url: str,
        ring_dir: Path,
        *,
        segment_s: float = 2.0,
        keep_s: float = 90.0,
        stall_s: float = 10.0,
        wall: Callable[[], datetime],
        on_presence: PresenceCallback | None = None,
        ffmpeg: str | None = None,
    ) -> None:
        if segment_s <= 0 or keep_s < segment_s or stall_s <= 0:
            raise ValueError(f"need 0 < segment_s <= keep_s and stall_s > 0 (got {segment_s}, {keep_s}, {stall_s})")
        self.camera_id = camera_id
        self._url = url
        self.ring_dir = ring_dir
        self.segment_s = segment_s
        self.keep_s = keep_s
        self.stall_s = stall_s
        self._wall = wall
        self._on_presence = on_presence
        self._ffmpeg = ffmpeg or FFMPEG
        self._state = RecorderState.NEW
        self._task: asyncio.Task[None] | None = None
        self._index: deque[_Entry] = deque()
        # Bounded whatever the stream does: a camera whose timestamps jump can make ffmpeg close tiny segments.
        self._max_segments = math.ceil(keep_s / segment_s) * 4 + 16
        self._runs: dict[str, _Run] = {}
        self._closed = asyncio.Condition()
        self._latest_end: datetime | None = None
        self._online = False
        self._last_advance = self._spawned_mono = 0.0
        self._stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._encode_audio = False
        self._restart_now: str | None = None
        self.restarts = 0
        self.last_error: str | None = None
        self.run_id: str | None = None
        self._once = OnceLogger(log)

    # -- public state ------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The camera URL with its password masked."""
        return mask_url(self._url)

    @property
    def state(self) -> RecorderState:
        return self._state

    @property
    def online(self) -> bool:
        """Media is flowing from the camera right now."""
        return self._online

    def segments(self) -> list[Segment]:
        """The closed segments still in the ring, oldest first."""
        return [e.segment for e in self._index]

    def overlapping(self, start: datetime, end: datetime) -> list[Segment]:
        """Every segment in the ring that overlaps [start, end), gaps and all: the best a clip can have."""
        return [e.segment for e in self._index if e.segment.overlaps(start, end)]

    def covering(self, start: datetime, end: datetime) -> list[Segment] | None:
        """The settled segments that together cover [start, end] without a gap, from one run; None if the ring
        has no such footage (not recorded yet, pruned, the camera was down in between, or the window reaches
        into the first segment after a (re)connect, whose start is only an estimate)."""
        found = self.overlapping(start, end)
        if not found or found[0].start > start or found[-1].end < end or not found[0].settled:
            return None
        for a, b in pairwise(found):
            if b.run_id != a.run_id or (b.start - a.end).total_seconds() > GAP_TOLERANCE_S:
                return None
        return found

    async def wait_closed_after(self, t: datetime, within: float) -> bool:
        """Wait until a segment ending at or after `t` has closed; False if none did within `within` s."""
        try:
            async with asyncio.timeout(within), self._closed:
                await self._closed.wait_for(lambda: self._latest_end is not None and self._latest_end >= t)
        except TimeoutError:
            return False
        return True

    def pin(self, segments: Iterable[Segment], dest_dir: Path) -> list[Segment]:
        """Hard-link `segments` into `dest_dir` (same filesystem as the ring) so pruning cannot delete them
        while a clip is cut; returns them with their paths there. The caller deletes `dest_dir` afterwards."""
        return pin_segments(segments, dest_dir)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._claim()
        self._task = asyncio.create_task(self._supervise(), name=f"ring-recorder-{self.camera_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we are being cancelled ourselves, not just our recorder task

    async def run(self) -> None:
        """Supervise ffmpeg until cancelled: restart it on every exit or stall, after a backoff."""
        self._claim()
        await self._supervise()

    def _claim(self) -> None:
        if self._state is not RecorderState.NEW:
            raise RecorderError(f"recorder {self.camera_id} is {self._state.value}; create a new one")
        self._state = RecorderState.RUNNING

    async def _supervise(self) -> None:
        log.info("recorder_started", camera=self.camera_id, url=self.url, ring_dir=str(self.ring_dir))
        try:
            await asyncio.to_thread(self._remove_stale_runs)
            attempt = 0
            while True:
                check_cancelled()
                began = time.monotonic()
                reason = await self._run_once()
                self._set_online(False, reason)
                self.restarts += 1
                if reason.startswith("audio:"):
                    continue  # not a failure: ffmpeg's options changed
                self.last_error = reason
                if time.monotonic() - began >= STABLE_RUN_S:
                    attempt = 0
                delay = backoff_delay(attempt)
                attempt += 1
                kind = reason.split(":", 1)[0]
                self._once.warning(
                    "camera_recorder_down",
                    f"{self.camera_id}:{kind}",
                    camera=self.camera_id,
                    reason=reason,
                    retry_in_s=round(delay, 2),
                    restarts=self.restarts,
                )
                await asyncio.sleep(delay)
        finally:
            self._state = RecorderState.STOPPED
            self._set_online(False, "recorder stopped")
            self._discard_ring()
            log.info("recorder_stopped", camera=self.camera_id, restarts=self.restarts)

    # -- one ffmpeg run ----------------------------------------------------------------------------------------

    def _command(self, run_dir: Path, list_fd: int) -> list[str]:
        network: list[str] = []
        if urlsplit(self._url).scheme.lower() in ("rtsp", "rtsps"):
            # TCP: one connection through NAT and lossy Wi-Fi; UDP would drop packets and mangle frames.
            network = ["-rtsp_transport", "tcp", "-timeout", str(int(RTSP_TIMEOUT_S * 1_000_000))]
        return [
            # info, not warning: the input's stream list says which audio codec the camera sends.
            self._ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "info",
            *network, "-i", self._url,
            "-map", "0:v:0", "-map", "0:a:0?", "-c:v", "copy", *(AAC_ARGS if self._encode_audio else ("-c:a", "copy")),
            "-f", "segment", "-segment_time", f"{self.segment_s:g}",
            "-segment_time_delta", f"{SEGMENT_TIME_DELTA_S:g}", "-segment_format", "mpegts",
            "-segment_list", f"pipe:{list_fd}", "-segment_list_type", "csv",
            "-progress", "pipe:1", "-stats_period", f"{PROGRESS_PERIOD_S:g}",
            "-y", str(run_dir / _SEGMENT_PATTERN),
        ]  # fmt: skip

    async def _run_once(self) -> str:
        """Start ffmpeg, follow it until it exits or stalls; the reason it ended."""
        now = self._wall()
        run_id = f"run-{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
        run = _Run(run_id, self.ring_dir / run_id, now)
        try:
            run.directory.mkdir(parents=True)
        except OSError as exc:
            return f"ring: cannot create {run.directory}: {exc}"
        self._runs[run_id] = run
        self.run_id = run_id
        self._stderr_tail.clear()
        self._restart_now = None
        read_fd, write_fd = os.pipe()
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._command(run.directory, write_fd),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    pass_fds=(write_fd,),
                    start_new_session=True,  # its own process group, so killpg reaches everything it starts
                )
            finally:
                os.close(write_fd)  # ffmpeg holds the only write end: its exit is our end of file
        except OSError as exc:
            os.close(read_fd)
            self._end_run(run)
            return f"spawn: cannot start {self._ffmpeg}: {exc}"
        log.debug("recorder_spawned", camera=self.camera_id, run=run_id, pid=proc.pid)
        self._spawned_mono = self._last_advance = time.monotonic()
        stalled: str | None = None
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        transport: asyncio.BaseTransport | None = None
        try:
            list_reader = asyncio.StreamReader()
            transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(list_reader), pipe
            )
            assert proc.stdout is not None
            assert proc.stderr is not None
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._follow_progress(proc.stdout))
                tg.create_task(self._follow_segments(list_reader, run))
                tg.create_task(self._follow_stderr(proc.stderr))
                exited = tg.create_task(proc.wait())
                stalled = await self._watch(exited)
                if stalled is not None:
                    await self._stop(proc)
        finally:
            if transport is None:
                pipe.close()
            else:
                transport.close()
            await self._stop(proc)
            self._end_run(run)
        if stalled is not None:
            return stalled
        detail = f": {self._stderr_tail[-1]}" if self._stderr_tail else ""
        if proc.returncode == 0:
            detail = f" (the camera ended the stream or stopped answering){detail}"
        return f"exited: ffmpeg ended with status {proc.returncode}{detail}"

    async def _watch(self, exited: asyncio.Task[int]) -> str | None:
        """Wait for ffmpeg to exit (None) or to stop making progress (the reason)."""
        while True:
            done, _ = await asyncio.wait({exited}, timeout=WATCHDOG_TICK_S)
            if done:
                return None
            if self._restart_now is not None:
                return self._restart_now
            quiet = time.monotonic() - self._last_advance
            starting = self._last_advance == self._spawned_mono
            if quiet > (max(self.stall_s, STARTUP_GRACE_S) if starting else self.stall_s):
                return f"stalled: no media from the camera for {quiet:.1f} s"

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        """Stop ffmpeg's whole process group: SIGTERM, then SIGKILL after STOP_GRACE_S."""
        if proc.returncode is not None:
            return
        _signal_group(proc, signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_GRACE_S):
                await proc.wait()
        except TimeoutError:
            pass
        finally:
            if proc.returncode is None:  # also when cancelled while waiting: never leave ffmpeg behind
                _signal_group(proc, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(KILL_WAIT_S):
                        await proc.wait()

    # -- what ffmpeg says --------------------------------------------------------------------------------------

    async def _follow_progress(self, stream: asyncio.StreamReader) -> None:
        """-progress prints key=value blocks ended by `progress=...`, only while packets are written."""
        block: dict[str, str] = {}
        previous: tuple[str, ...] | None = None
        async for line in _lines(stream):
            key, _, value = line.partition("=")
            if key != "progress":
                block[key] = value
                continue
            mark = (block.get("frame", ""), block.get("out_time_us", ""), block.get("total_size", ""))
            block = {}
            if mark != previous:
                previous = mark
                self._last_advance = time.monotonic()
                self._set_online(True, "receiving media")

    async def _follow_segments(self, stream: asyncio.StreamReader, run: _Run) -> None:
        """Each csv line `name,start,end` arrives as ffmpeg closes that segment."""
        async for line in _lines(stream):
            try:
                name, start, end = line.rsplit(",", 2)
                duration = max(0.0, float(end) - float(start))
            except ValueError:
                self._once.warning("segment_list_unparsed", self.camera_id, camera=self.camera_id, line=line)
                continue
            await self._closed_segment(run, name, duration)

    async def _follow_stderr(self, stream: asyncio.StreamReader) -> None:
        section = ""
        async for line in _lines(stream):
            line = self._scrub(line)
            if found := _SECTION.match(line):
                section = found.group(0)
            elif section.startswith("Input") and (audio := _AUDIO_STREAM.match(line)):
                self._check_audio(audio.group(1))
            if not _CHATTER.match(line):
                self._stderr_tail.append(line)
            log.debug("ffmpeg_says", camera=self.camera_id, line=line)

    def _check_audio(self, codec: str) -> None:
        if codec in TS_AUDIO or self._encode_audio:
            return
        self._encode_audio = True
        self._restart_now = f"audio: the camera sends {codec}, which the ring cannot hold; restarting to encode it"
        log.info("camera_audio_encoded", camera=self.camera_id, codec=codec, to="aac")

    def _scrub(self, text: str) -> str:
        """ffmpeg repeats the URL in its errors, password included."""
        password = urlsplit(self._url).password
        return text.replace(f":{password}@", ":***@") if password else text

    # -- the index ---------------------------------------------------------------------------------------------

    async def _closed_segment(self, run: _Run, name: str, duration_s: float) -> None:
        end = self._wall()
        naive_start = end - timedelta(seconds=duration_s)
        prev = run.last
        if prev is not None and abs((end - prev.end).total_seconds() - duration_s) <= CONTIGUITY_SLACK_S:
            start = prev.end
        else:
            start = max(naive_start, prev.end if prev is not None else run.spawned_at)
        start = min(start, end)  # the wall clock stepped back: a zero-length segment rather than a negative one
        segment = Segment(run.directory / name, start, end, duration_s, run.run_id, run.count)
        run.last = segment
        run.count += 1
        self._index.append(_Entry(segment, time.monotonic()))
        # After the probe, ffmpeg writes what it buffered at once: a segment can close before -progress speaks.
        self._last_advance = time.monotonic()
        self._set_online(True, "receiving media")
        self._prune()
        async with self._closed:
            self._latest_end = end if self._latest_end is None else max(self._latest_end, end)
            self._closed.notify_all()

    def _prune(self) -> None:
        # Unlinking a few files on tmpfs takes microseconds: not worth a thread.
        horizon = time.monotonic() - self.keep_s
        touched: set[str] = set()
        while self._index and (self._index[0].closed_mono < horizon or len(self._index) > self._max_segments):
            segment = self._index.popleft().segment
            try:
                segment.path.unlink(missing_ok=True)
            except OSError as exc:
                self._once.warning("ring_prune_failed", self.camera_id, camera=self.camera_id, error=str(exc))
            touched.add(segment.run_id)
        for run_id in touched:
            self._drop_run_if_done(run_id)

    def _end_run(self, run: _Run) -> None:
        run.ended = True
        self._drop_run_if_done(run.run_id)

    def _drop_run_if_done(self, run_id: str) -> None:
        """Delete the directory of an ended run once none of its segments is in the index (it may still hold
        the segment ffmpeg was writing when it died, which was never closed)."""
        run = self._runs.get(run_id)
        if run is None or not run.ended or any(e.segment.run_id == run_id for e in self._index):
            return
        del self._runs[run_id]
        shutil.rmtree(run.directory, ignore_errors=True)

    def _remove_stale_runs(self) -> None:
        try:
            self.ring_dir.mkdir(parents=True, exist_ok=True)
            for child in self.ring_dir.iterdir():
                if _RUN_DIR.match(child.name) and child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
        except OSError as exc:  # each run's mkdir will fail too, and be retried with the backoff
            log.warning("ring_dir_unusable", camera=self.camera_id, ring_dir=str(self.ring_dir), error=str(exc))

    def _discard_ring(self) -> None:
        """At stop: the index dies with us, so its files go too (pinned links survive)."""
        self._index.clear()
        for run in list(self._runs.values()):
            shutil.rmtree(run.directory, ignore_errors=True)
        self._runs.clear()

    def _set_online(self, online: bool, reason: str) -> None:
        if online == self._online:
            return
        self._online = online
        if online:
            log.info("camera_recording", camera=self.camera_id, run=self.run_id)
        if self._on_presence is not None:
            try:
                self._on_presence(self.camera_id, online, reason)
            except Exception:
                # A broken listener must not stop the recording; its traceback is in the journal.
                log.exception("presence_callback_failed", camera=self.camera_id)


def pin_segments(segments: Iterable[Segment], dest_dir: Path) -> list[Segment]:
    """Hard-link each segment into `dest_dir`; the links keep the data after the ring deletes its names."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    pinned: list[Segment] = []
    for i, segment in enumerate(segments):
        target = dest_dir / f"{i:04d}-{segment.run_id}-{segment.path.name}"
        try:
            os.link(segment.path, target)
        except FileNotFoundError as exc:
            raise RecorderError(f"segment {segment.path} was pruned before it could be pinned") from exc
        except OSError as exc:
            raise RecorderError(
                f"cannot pin {segment.path} into {dest_dir} (it must be on the ring's filesystem): {exc}"
            ) from exc
        pinned.append(dataclasses.replace(segment, path=target))
    return pinned


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    # Only while asyncio has not reaped it: after that the pid (and group id) may belong to someone else.
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[str]:
    """Decoded lines until end of file; an overlong line is skipped rather than ending the reader."""
    while True:
        try:
            raw = await stream.readline()
        except ValueError:
            continue
        if not raw:
            return
        yield raw.decode("utf-8", "replace").rstrip("\r\n")


__all__: Sequence[str] = [
    "RecorderError",
    "RecorderState",
    "RingRecorder",
    "Segment",
    "backoff_delay",
    "mask_url",
    "pin_segments",
]

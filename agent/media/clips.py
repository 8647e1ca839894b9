"""Cut a highlight clip out of ring segments into one MP4.

ffmpeg's concat protocol reads the segments as one MPEG-TS stream; by default the streams are copied, not
re-encoded, which costs a fraction of a second for 30 s of 720p. A copy can only start on a keyframe (an
`inpoint` is not honoured with stream copy), so the clip starts at the first segment's first frame, up to one
segment before `want_start`, and only its tail is trimmed (`-t`). The window slides back with its start: the clip
lasts `duration_s` from its first frame, so it ends as much before `want_start + duration_s` as it starts early
(with keyframes on whole seconds and a whole-second duration, exactly on a segment boundary: the cut need not
wait for one more segment to close). It says by how much it starts early:

    trim_start_s = want_start - start_at

- positive: the clip has that many seconds of lead-in before the wanted start; a player seeking to
  `trim_start_s` starts exactly on the wanted moment.
- negative: the ring did not reach back that far (the camera was down, or the footage was pruned); the clip
  starts `-trim_start_s` seconds late.

With `reencode=True` the clip is decoded and encoded again (libx264), starting on the exact frame: then
`trim_start_s` is 0 (negative only when the footage starts late). That costs seconds of CPU per clip on a Pi.

The clip is written to a temporary file beside `out`, checked with ffprobe, fsynced, renamed over `out` and
its directory fsynced: `out` is either absent or complete, also across a power cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ..errors import AgentError
from .recorder import Segment

FFMPEG = "ffmpeg"
FFPROBE = "ffprobe"
COPY_TIMEOUT_S = 60.0
REENCODE_TIMEOUT_S = 600.0  # 30 s of 720p through libx264 on a loaded Raspberry Pi
PROBE_TIMEOUT_S = 15.0
KILL_WAIT_S = 5.0
# The concat demuxer skips a segment it cannot read and still exits with status 0: a clip this much shorter
# than its segments promise is an error, not a clip.
SHORTFALL_TOLERANCE_S = 0.5
STDERR_TAIL_CHARS = 2000
# Audio the MP4 muxer takes as it is; anything else (G.711 from many cameras) is encoded to AAC, which is cheap.
MP4_AUDIO = frozenset({"aac", "mp2", "mp3", "opus", "alac", "flac", "ac3", "eac3"})
REENCODE_VIDEO = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p"]
AAC = ["-c:a", "aac", "-b:a", "96k"]
_HASH_CHUNK = 1 << 20


class ClipError(AgentError):
    """A clip could not be cut. The message names the step that failed and ends with ffmpeg's last words."""

    def __init__(self, message: str, *, stderr: str = "") -> None:
        super().__init__(f"{message}: {stderr}" if stderr else message)
        self.stderr = stderr


@dataclass(frozen=True, slots=True)
class Clip:
    """A finished clip. `start_at` is the wall time of its first frame; `trim_start_s` is `want_start -
    start_at` (see the module docstring); `duration_s` is what ffprobe measured."""

    path: Path
    sha256: str
    size: int
    start_at: datetime
    trim_start_s: float
    duration_s: float


async def cut_clip(
    segments: Sequence[Segment],
    want_start: datetime,
    duration_s: float,
    out: Path,
    *,
    reencode: bool = False,
    probe_audio: bool = True,
) -> Clip:
    """Join `segments` (in order, contiguous, of one recorder run; pinned, so the ring cannot prune them
    meanwhile) into the MP4 `out`, covering [want_start, want_start + duration_s] as closely as the mode allows.
    `probe_audio=False`: the caller knows the audio is one MP4 takes as it is (a RingRecorder's segments: it
    encodes anything else to AAC), which saves an ffprobe per cut."""
    if not segments:
        raise ClipError(f"no footage for {out.name}: no segments given")
    if duration_s <= 0:
        raise ClipError(f"duration_s must be positive, got {duration_s}")
    first_start = segments[0].start
    lead_s = (want_start - first_start).total_seconds()
    skip_s = max(0.0, lead_s) if reencode else 0.0
    want_end = want_start + timedelta(seconds=duration_s - max(0.0, lead_s - skip_s))  # the slide (see above)
    start_at = first_start + timedelta(seconds=skip_s)
    length_s = (want_end - start_at).total_seconds()
    if length_s <= 0:
        raise ClipError(f"segments start at {first_start.isoformat()}, after the wanted end {want_end.isoformat()}")
    window = ["-ss", f"{skip_s:.3f}", "-t", f"{length_s:.3f}"] if reencode else ["-t", f"{length_s:.3f}"]
    expected_s = min(length_s, sum(s.duration_s for s in segments) - skip_s)

    token = secrets.token_hex(4)
    partial = out.parent / f".{out.name}.{token}.part"
    try:
        joined = await asyncio.to_thread(_concat_input, segments)
        audio = await _first_audio_codec(segments[0].path) if probe_audio else None
        if reencode:
            codecs = [*REENCODE_VIDEO, *AAC]
        else:
            codecs = ["-c:v", "copy", *(["-c:a", "copy"] if audio is None or audio in MP4_AUDIO else AAC)]
        stderr = await _run(
            [
                FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error",
                "-i", joined,
                *window, "-map", "0:v:0", "-map", "0:a:0?", *codecs,
                "-movflags", "+faststart", "-f", "mp4", "-y", str(partial),
            ],
            what=f"ffmpeg cutting {out.name}",
            limit_s=REENCODE_TIMEOUT_S if reencode else COPY_TIMEOUT_S,
        )  # fmt: skip
        info = await probe(partial)
        measured = _duration(info)
        if measured is None or not any(s.get("codec_type") == "video" for s in info.get("streams", [])):
            raise ClipError(f"ffmpeg wrote {out.name} without a playable video stream", stderr=stderr)
        if measured < expected_s - SHORTFALL_TOLERANCE_S:
            raise ClipError(
                f"ffmpeg wrote {measured:.2f} s of the {expected_s:.2f} s wanted for {out.name}", stderr=stderr
            )
        sha256, size = await asyncio.to_thread(_seal, partial, out)
    finally:
        await asyncio.to_thread(_remove, partial)
    return Clip(out, sha256, size, start_at, lead_s - skip_s, measured)


async def probe(path: Path) -> dict[str, Any]:
    """ffprobe's JSON for `path`: `format` (with `duration`) and `streams`."""
    stdout, _ = await _run_tool(
        [FFPROBE, "-hide_banner", "-loglevel", "error", "-print_format", "json", "-show_format", "-show_streams",
         str(path)],
        what=f"ffprobe of {path.name}",
        limit_s=PROBE_TIMEOUT_S,
    )  # fmt: skip
    try:
        info = json.loads(stdout)
    except ValueError as exc:
        raise ClipError(f"ffprobe of {path.name} printed no JSON") from exc
    if not isinstance(info, dict):
        raise ClipError(f"ffprobe of {path.name} printed {type(info).__name__}, not an object")
    return info


def _duration(info: dict[str, Any]) -> float | None:
    try:
        value = float(info["format"]["duration"])
    except (KeyError, TypeError, ValueError):
        return None
    return value if value > 0 else None


async def _first_audio_codec(path: Path) -> str | None:
    info = await probe(path)
    for stream in info.get("streams", []):
        if stream.get("codec_type") == "audio":
            return str(stream.get("codec_name"))
    return None


def _concat_input(segments: Sequence[Segment]) -> str:
    # MPEG-TS segments of one run are one byte stream cut in pieces: ffmpeg's concat protocol reads them back to
    # back as one input, with continuous timestamps, and probes only the start (the concat demuxer probed every
    # segment: four times the CPU, which on a loaded box is what pushed press-to-clip over 22 s).
    paths = []
    for segment in segments:
        if not segment.path.is_file():
            raise ClipError(f"segment {segment.path} is gone (pruned before it was pinned?)")
        path = str(segment.path.resolve())
        if "|" in path:
            raise ClipError(f"segment path {path} contains '|', which the concat protocol cannot take")
        paths.append(path)
    return "concat:" + "|".join(paths)


def _seal(partial: Path, out: Path) -> tuple[str, int]:
    """Hash and fsync the finished file, rename it to `out`, fsync the directory; (sha256 hex, size)."""
    digest = hashlib.sha256()
    size = 0
    with partial.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    os.replace(partial, out)
    fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest(), size


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


async def _run(cmd: list[str], *, what: str, limit_s: float) -> str:
    """Run ffmpeg; the tail of what it said on stderr (it exits with 0 after some errors)."""
    _, stderr = await _run_tool(cmd, what=what, limit_s=limit_s)
    return stderr


async def _run_tool(cmd: list[str], *, what: str, limit_s: float) -> tuple[bytes, str]:
    """Run a tool in its own process group; its stdout and stderr's tail, or ClipError with that tail."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise ClipError(f"{what}: cannot start {cmd[0]}: {exc}") from exc
    try:
        async with asyncio.timeout(limit_s):
            stdout, stderr = await proc.communicate()
    except TimeoutError as exc:
        raise ClipError(f"{what} took longer than {limit_s:g} s") from exc
    finally:
        if proc.returncode is None:  # timed out or cancelled: never leave ffmpeg running
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_WAIT_S):
                    await proc.wait()
    tail = stderr.decode("utf-8", "replace").strip()[-STDERR_TAIL_CHARS:]
    if proc.returncode != 0:
        raise ClipError(f"{what} failed with status {proc.returncode}", stderr=tail)
    return stdout, tail

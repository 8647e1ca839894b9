"""Clips cut from the ring of a simulated RTSP camera (tests/cameras.py): real ffmpeg end to end.

One test makes the real thing, a 30 s clip around a button press, and measures how long after the press it is
ready; the others use 1 s segments and clips of a few seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.media import clips, recorder
from agent.media.clips import ClipError, cut_clip, probe
from agent.media.pipeline import wait_footage
from agent.media.recorder import RingRecorder, Segment
from tests.cameras import SimulatedCamera, burned_times

# From the camera making a frame to the recorder stamping its segment's close (about 0.2 s here).
LATENCY_BOUND_S = 0.6
FRAME_S = 1 / 25


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder, "BACKOFF_INITIAL_S", 0.2)
    monkeypatch.setattr(recorder, "BACKOFF_MAX_S", 1.0)


@pytest.fixture
async def camera(tmp_path: Path) -> AsyncIterator[SimulatedCamera]:
    async with SimulatedCamera(tmp_path / "camera") as cam:
        yield cam


async def until(condition: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.05)


async def decode_errors(path: Path) -> str:
    """Decode every frame of `path`; what ffmpeg complained about (empty: the file plays cleanly).

    The frames keep the file's own time base: in ffmpeg's default 1/25 two frames of a camera's jittery
    timestamps can round to the same tick, which the null muxer reports as an error of its own."""
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
        "-enc_time_base:v", "-1", "-f", "null", "-",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    return f"status {proc.returncode}: {err.decode()}" if proc.returncode or err else ""


def streams(info: dict[str, Any]) -> dict[str, str]:
    return {s["codec_type"]: s["codec_name"] for s in info["streams"]}


async def cut_from_ring(
    rec: RingRecorder, start: datetime, duration_s: float, out: Path, *, reencode: bool = False
) -> clips.Clip:
    """What the highlight flow does: covering segments, pinned, cut, pins removed."""
    end, segments = await wait_footage(
        rec, start, timedelta(seconds=duration_s), reencode=reencode, within=duration_s + 15
    )
    assert segments is not None, f"the ring covers {start}..{end}: {rec.segments()}"
    pins = out.parent / f"{out.stem}-pins"
    try:
        return await cut_clip(rec.pin(segments, pins), start, duration_s, out, reencode=reencode)
    finally:
        shutil.rmtree(pins)


@pytest.mark.deadline(120)
async def test_thirty_second_clip_around_a_press(camera: SimulatedCamera, tmp_path: Path) -> None:
    segment_s = 2.0  # the production default
    async with RingRecorder("c1", camera.url, tmp_path / "ring", segment_s=segment_s, wall=now) as rec:
        await until(
            lambda: len(rec.segments()) > 1 and rec.segments()[1].start < now() - timedelta(seconds=10.5), 30, "10 s"
        )
        await asyncio.sleep(random.uniform(0, segment_s))  # a press falls anywhere between two keyframes
        press = now()
        start = press - timedelta(seconds=10)
        await wait_footage(rec, start, timedelta(seconds=30), reencode=False, within=30)
        closed_s = (now() - press).total_seconds()
        clip = await cut_from_ring(rec, start, 30, tmp_path / "highlight.mp4")
        ready_s = (now() - press).total_seconds()

    # The clip starts on the keyframe before press - 10 s and lasts 30 s from there, so it ends as much before
    # press + 20 s: on a segment boundary, whose segment closes as the next keyframe arrives (the camera's
    # latency), then the cut.
    print(f"press to clip {ready_s:.2f} s (segment closed {closed_s:.2f}), trim_start_s {clip.trim_start_s:.3f}")
    assert 0 <= clip.trim_start_s <= segment_s + 0.3, "starts at most one segment before press - 10 s"
    assert 20 - clip.trim_start_s - 0.1 < ready_s < 20 - clip.trim_start_s + 1.5
    assert clip.start_at == press - timedelta(seconds=10 + clip.trim_start_s)
    assert clip.duration_s == pytest.approx(30, abs=0.15)

    data = clip.path.read_bytes()
    assert clip.size == len(data)
    assert clip.sha256 == hashlib.sha256(data).hexdigest()
    info = await probe(clip.path)
    assert streams(info) == {"video": "h264", "audio": "aac"}
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    assert (video["width"], video["height"]) == (1280, 720)
    assert float(info["format"]["duration"]) == clip.duration_s
    assert await decode_errors(clip.path) == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["camera", "highlight.mp4", "ring"], "no temporary files"
    assert not any((tmp_path / "ring").iterdir())

    # What the frames themselves say: the first was made at start_at (less latency), so the clip holds the
    # moment 10 s before the press; the last 30 s after the first.
    first = (await burned_times(clip.path, press, frames=1))[0]
    last = (await burned_times(clip.path, press, last_s=0.5))[-1]
    start_error = (clip.start_at - first).total_seconds()
    print(f"start error (indexed start - first frame's wall time) {start_error:.3f} s")
    assert -0.05 <= start_error <= LATENCY_BOUND_S
    assert first <= press - timedelta(seconds=10)
    assert abs((last - (clip.start_at + timedelta(seconds=30))).total_seconds()) <= LATENCY_BOUND_S


async def test_short_clips_stream_copy_and_frame_exact_reencode(camera: SimulatedCamera, tmp_path: Path) -> None:
    async with RingRecorder("c1", camera.url, tmp_path / "ring", segment_s=1, wall=now) as rec:
        await until(lambda: len(rec.segments()) >= 3, 15, "three segments")
        base = rec.segments()[1]  # not the first: it may hold the camera's start-up burst
        want = base.start + timedelta(seconds=0.4)
        copy = await cut_from_ring(rec, want, 1.5, tmp_path / "copy.mp4")
        exact = await cut_from_ring(rec, want, 1.5, tmp_path / "exact.mp4", reencode=True)

    # Stream copy: from the keyframe that starts `base`, 0.4 s before the wanted start, for the wanted length.
    assert copy.start_at == base.start
    assert copy.trim_start_s == pytest.approx(0.4)
    assert copy.duration_s == pytest.approx(1.5, abs=2 * FRAME_S + 0.02)
    first = (await burned_times(copy.path, want, frames=1))[0]
    assert -0.05 <= (copy.start_at - first).total_seconds() <= LATENCY_BOUND_S

    # Re-encoded: from the wanted frame itself, the very frame the copy shows 0.4 s in. (Its burned wall time
    # is about 0.4 s after the copy's first, give or take the camera's timestamp jitter.)
    assert exact.start_at == want
    assert exact.trim_start_s == 0
    assert exact.duration_s == pytest.approx(1.5, abs=2 * FRAME_S + 0.02)
    first_exact = (await burned_times(exact.path, want, frames=1))[0]
    assert first_exact == (await burned_times(copy.path, want, frames=1, skip_s=0.4))[0]
    assert (first_exact - first).total_seconds() == pytest.approx(0.4, abs=0.1)
    for clip in (copy, exact):
        assert streams(await probe(clip.path)) == {"video": "h264", "audio": "aac"}
        assert await decode_errors(clip.path) == ""


async def test_g711_audio_is_kept_by_encoding_it_to_aac(tmp_path: Path) -> None:
    # MPEG-TS cannot hold G.711; stream copy would store it as an opaque data stream, and the clip be silent.
    async with (
        SimulatedCamera(tmp_path / "camera", audio="pcma") as camera,
        RingRecorder("c1", camera.url, tmp_path / "ring", segment_s=1, wall=now) as rec,
    ):
        # The first run learns the codec from ffmpeg's stream listing, when it has already written a little.
        await until(lambda: len([s for s in rec.segments() if s.run_id == rec.run_id]) >= 3, 20, "three segments")
        assert rec.restarts == 1, "one restart, to encode the audio"
        assert rec.last_error is None, "that restart is no failure"
        second = [s for s in rec.segments() if s.run_id == rec.run_id][1]
        assert streams(await probe(second.path)) == {"video": "h264", "audio": "aac"}
        clip = await cut_from_ring(rec, second.start, 1.0, tmp_path / "clip.mp4")
    assert streams(await probe(clip.path)) == {"video": "h264", "audio": "aac"}


@pytest.fixture(scope="module")
def ts_segments(tmp_path_factory: pytest.TempPathFactory) -> list[Segment]:
    """Two 1 s MPEG-TS segments made straight from ffmpeg's test source (no camera needed)."""
    directory = tmp_path_factory.mktemp("segments")
    import subprocess

    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=2",
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-f", "segment", "-segment_time", "1",
         "-segment_format", "mpegts", str(directory / "%d.ts")],
        check=True, timeout=30,
    )  # fmt: skip
    t0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
    return [
        Segment(directory / f"{i}.ts", t0 + timedelta(seconds=i), t0 + timedelta(seconds=i + 1), 1.0, "run-x", i)
        for i in range(2)
    ]


async def test_cut_errors_name_what_failed(
    ts_segments: list[Segment], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = ts_segments[0].start
    out = tmp_path / "clip.mp4"
    clip = await cut_clip(ts_segments, start + timedelta(seconds=0.5), 1.0, out)
    assert clip.trim_start_s == 0.5
    assert clip.duration_s == pytest.approx(1.0, abs=0.1)
    out.unlink()

    with pytest.raises(ClipError, match="no segments"):
        await cut_clip([], start, 1.0, out)
    with pytest.raises(ClipError, match="after the wanted end"):
        await cut_clip(ts_segments, start - timedelta(seconds=5), 1.0, out)

    garbage = tmp_path / "garbage.ts"
    garbage.write_bytes(b"not a video" * 100)
    bad = [Segment(garbage, start, start + timedelta(seconds=1), 1.0, "run-x", 0)]
    with pytest.raises(ClipError, match=r"ffprobe of garbage\.ts failed with status 1: .*Invalid data"):
        await cut_clip(bad, start, 1.0, out)

    gone = Segment(tmp_path / "gone.ts", start, start, 1.0, "run-x", 1)
    with pytest.raises(ClipError, match=r"segment .*gone\.ts is gone"):
        await cut_clip([ts_segments[0], gone], start, 2.0, out)
    # A segment that is there but unreadable: the concat protocol skips bytes it cannot parse and ffmpeg ends
    # with status 0; only the clip's length tells.
    unreadable = Segment(garbage, start, start, 1.0, "run-x", 1)
    with pytest.raises(ClipError, match=r"ffmpeg wrote 1\.\d+ s of the 2\.00 s wanted for clip\.mp4"):
        await cut_clip([ts_segments[0], unreadable], start, 2.0, out)

    monkeypatch.setattr(clips, "FFMPEG", str(tmp_path / "no-ffmpeg"))
    with pytest.raises(ClipError, match=r"ffmpeg cutting clip\.mp4: cannot start .*no-ffmpeg"):
        await cut_clip(ts_segments, start, 1.0, out)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.ts"], "nothing half-written is left"

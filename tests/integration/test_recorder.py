"""The ring recorder against a simulated RTSP camera (tests/cameras.py): real ffmpeg, real GStreamer, loopback.

The camera burns each frame's wall time into the picture, so the index's wall times are checked against what
the frames themselves say. Backoff delays are patched short; everything else runs at the production values
unless a test says why not.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import psutil
import pytest
from structlog.testing import capture_logs

from agent.media import recorder
from agent.media.recorder import RecorderError, RecorderState, RingRecorder, Segment
from tests.cameras import SimulatedCamera, burned_times, free_tcp_port

# From the camera making a frame to the recorder stamping the close of its segment: encode, UDP, GStreamer,
# RTSP over TCP, ffmpeg's muxer and our pipe. About 0.2 s here; the bound leaves room for a loaded machine.
LATENCY_BOUND_S = 0.6


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder, "BACKOFF_INITIAL_S", 0.2)
    monkeypatch.setattr(recorder, "BACKOFF_MAX_S", 1.0)


def ffmpeg_using(path: Path) -> list[psutil.Process]:
    """Live processes whose command line mentions `path` (the recorder's ffmpeg names its ring directory)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(str(path) in arg for arg in cmdline):
            found.append(proc)
    return found


@pytest.fixture
def ring_dir(tmp_path: Path) -> Iterator[Path]:
    """The ring; after the test, no ffmpeg may still be writing into it."""
    ring = tmp_path / "ring"
    yield ring
    assert ffmpeg_using(ring) == []


@pytest.fixture
async def camera(tmp_path: Path) -> AsyncIterator[SimulatedCamera]:
    async with SimulatedCamera(tmp_path / "camera") as cam:
        yield cam


class Presence:
    def __init__(self) -> None:
        self.events: list[tuple[str, bool, str]] = []

    def __call__(self, camera_id: str, online: bool, reason: str) -> None:
        self.events.append((camera_id, online, reason))


async def until(condition: object, within: float, what: str) -> None:
    """Poll `condition()` (every 50 ms) until true; fail naming `what` after `within` seconds."""
    assert callable(condition)
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.05)


async def check_against_frames(segment: Segment) -> None:
    """The segment's first frame was made at its indexed start (less the camera-to-recorder latency)."""
    first = (await burned_times(segment.path, now(), frames=1))[0]
    lag = (segment.start - first).total_seconds()
    assert -0.05 <= lag <= LATENCY_BOUND_S, f"{segment.path.name}: first frame {first}, indexed {segment.start}"


async def test_segments_get_a_wall_clock_index_and_the_ring_is_pruned(
    camera: SimulatedCamera, ring_dir: Path, tmp_path: Path
) -> None:
    presence = Presence()
    keep_s = 4.0
    async with RingRecorder(
        "c1", camera.url, ring_dir, segment_s=1, keep_s=keep_s, wall=now, on_presence=presence
    ) as rec:
        assert rec.state is RecorderState.RUNNING
        await until(lambda: len(rec.segments()) >= 3, 15, "three segments")
        segments = rec.segments()
        assert len(segments) >= 3
        assert rec.online
        assert presence.events == [("c1", True, "receiving media")]
        for a, b in pairwise(segments):
            assert b.start == a.end, "one run's index is contiguous"
            assert b.seq == a.seq + 1
        for s in segments:
            assert s.path.is_file()
            assert s.path.parent == ring_dir / s.run_id
            if s.seq > 0:  # the first holds what ffmpeg buffered while it probed the stream, from any keyframe
                # a starved encoder (a loaded CI box) can miss one split point: two GOPs, never more
                assert 0.8 <= s.duration_s <= 2.3, "1 s segments from a camera with a 1 s GOP"
            assert abs((s.end - s.start).total_seconds() - s.duration_s) < 0.3
        later = [s.duration_s for s in segments if s.seq > 0]
        assert 0.8 <= statistics.median(later) <= 1.3, later
        assert (now() - segments[-1].end).total_seconds() < 1.5
        for s in segments[1:3]:
            await check_against_frames(s)

        oldest = segments[0]
        (pinned,) = rec.pin([oldest], tmp_path / "pins")
        assert pinned.start == oldest.start
        assert pinned.path != oldest.path
        size = pinned.path.stat().st_size

        await until(lambda: not oldest.path.exists(), keep_s + 5, "the oldest segment pruned")
        assert oldest not in rec.segments()
        assert pinned.path.stat().st_size == size > 0, "the pin keeps the footage"
        index = rec.segments()
        assert len(index) <= keep_s + 2
        on_disk = {p for p in (ring_dir / oldest.run_id).iterdir()}
        assert {s.path for s in index} <= on_disk
        assert len(on_disk - {s.path for s in index}) <= 1, "only the segment being written is unindexed"
        with pytest.raises(RecorderError, match="pruned"):
            rec.pin([oldest], tmp_path / "late-pins")
    assert rec.state is RecorderState.STOPPED
    assert not any(ring_dir.iterdir()), "the ring is deleted when the recorder stops"
    assert presence.events[-1] == ("c1", False, "recorder stopped")


async def test_camera_killed_and_restarted(camera: SimulatedCamera, ring_dir: Path) -> None:
    presence = Presence()
    async with RingRecorder("c1", camera.url, ring_dir, segment_s=1, wall=now, on_presence=presence) as rec:
        await until(lambda: len(rec.segments()) >= 3, 15, "three segments")
        first_run = rec.run_id
        died_at = now()
        await camera.kill()
        # ffmpeg sees the connection close and exits with status 0: the recorder must restart it anyway.
        await until(lambda: not rec.online, 10, "the recorder notices the camera is gone")
        assert (rec.last_error or "").startswith("exited: ffmpeg ended with status 0 (the camera ended the stream")
        await until(lambda: rec.restarts >= 3, 10, "the recorder keeps retrying while the camera is down")
        assert "Connection refused" in (rec.last_error or "")

        await camera.restart()
        back_at = now()
        await until(lambda: len([s for s in rec.segments() if s.run_id != first_run]) >= 2, 20, "new segments")
        assert rec.online
        assert rec.run_id != first_run
        after = [s for s in rec.segments() if s.run_id == rec.run_id]
        assert len(after) >= 2
        assert after[0].start >= died_at
        # Not the first segment: the camera's encoder has just started, and its first frames arrive late.
        await check_against_frames(after[-1])
        before = [s for s in rec.segments() if s.run_id == first_run]
        assert before, "the first run's footage is still in the ring"
        assert before[-1].end <= back_at
        assert rec.covering(died_at - timedelta(seconds=1), back_at + timedelta(seconds=1)) is None, "a gap"
        assert rec.covering(before[1].start, before[-1].end) == before[1:]
        assert rec.covering(before[0].start, before[-1].end) is None, "the first segment's start is an estimate"
        assert rec.overlapping(before[0].start, before[-1].end) == before
    onlines = [online for _, online, _ in presence.events]
    assert onlines[:3] == [True, False, True]
    assert presence.events[1][2].startswith("exited:")


async def test_frozen_camera_is_detected_as_a_stall_and_recovers(
    camera: SimulatedCamera, ring_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A frozen encoder leaves the RTSP connection open (the server still sends RTCP), so ffmpeg waits forever
    # without printing anything: only the recorder's watchdog can tell. A run started while the camera is
    # frozen hangs in ffmpeg's probe, and is killed after the startup grace.
    monkeypatch.setattr(recorder, "STARTUP_GRACE_S", 3.0)
    presence = Presence()
    stall_s = 2.0
    async with RingRecorder(
        "c1", camera.url, ring_dir, segment_s=1, stall_s=stall_s, wall=now, on_presence=presence
    ) as rec:
        await until(lambda: rec.online and len(rec.segments()) >= 1, 15, "recording")
        camera.freeze()
        frozen_at = time.monotonic()
        try:
            await until(lambda: not rec.online, stall_s + 4, "the stall detected")
            assert stall_s <= time.monotonic() - frozen_at
            assert (rec.last_error or "").startswith("stalled: no media from the camera for")
            assert presence.events[-1][1:] == (False, rec.last_error)
            restarts = rec.restarts
            await until(lambda: rec.restarts > restarts, 3.0 + 4, "a run started frozen is killed too")
            assert (rec.last_error or "").startswith("stalled: no media from the camera for 3.")
        finally:
            camera.thaw()
        thawed_at = now()
        assert await rec.wait_closed_after(thawed_at + timedelta(seconds=1), within=20)
        assert rec.online
        assert [s for s in rec.segments() if s.start >= thawed_at]


@pytest.mark.parametrize("kind", ["missing ffmpeg", "bad url"])
async def test_unusable_camera_is_retried_with_backoff_without_crashing(
    kind: str, ring_dir: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no" / "ffmpeg"
    url = f"rtsp://admin:s3cret@127.0.0.1:{free_tcp_port()}/cam"
    with capture_logs() as logs:
        async with RingRecorder(
            "c9", url, ring_dir, wall=now, ffmpeg=str(missing) if kind == "missing ffmpeg" else None
        ) as rec:
            await until(lambda: rec.restarts >= 3, 15, "three attempts")
            assert not rec.online
            assert rec.segments() == []
            assert rec.state is RecorderState.RUNNING, "still supervising"
            error = rec.last_error or ""
            if kind == "missing ffmpeg":
                assert error.startswith(f"spawn: cannot start {missing}: [Errno 2]")
            else:
                assert error.startswith("exited: ffmpeg ended with status 1:")
                assert "Connection refused" in error
            assert "s3cret" not in error
            assert "s3cret" not in rec.url
            with pytest.raises(RecorderError, match="running"):
                await rec.__aenter__()
    down = [e for e in logs if e["event"] == "camera_recorder_down"]
    assert [e["log_level"] for e in down[:3]] == ["warning", "debug", "debug"], "warned once, then quiet"
    assert all(e["retry_in_s"] <= 1.0 for e in down)
    assert down[0]["camera"] == "c9"
    assert not any("s3cret" in repr(e) for e in logs)


def test_backoff_is_capped_and_jittered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder, "BACKOFF_INITIAL_S", 1.0)
    monkeypatch.setattr(recorder, "BACKOFF_MAX_S", 30.0)
    monkeypatch.setattr(recorder, "BACKOFF_JITTER", 0.5)
    delays = [[recorder.backoff_delay(attempt) for _ in range(200)] for attempt in range(12)]
    for attempt, drawn in enumerate(delays):
        ceiling = min(30.0, 2.0**attempt)
        assert all(ceiling * 0.5 <= d <= ceiling for d in drawn)
        assert max(drawn) - min(drawn) > ceiling * 0.3, "jittered"
    assert max(delays[-1]) <= 30.0


async def test_cancel_stops_ffmpeg_even_when_it_hangs(camera: SimulatedCamera, ring_dir: Path) -> None:
    rec = RingRecorder("c1", camera.url, ring_dir, segment_s=1, wall=now)
    task = asyncio.create_task(rec.run())
    try:
        assert await rec.wait_closed_after(now(), within=15)
        (ffmpeg,) = ffmpeg_using(ring_dir)
        camera.freeze()  # ffmpeg now blocks on a silent socket
        await asyncio.sleep(0.5)
    finally:
        camera.thaw()
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert time.monotonic() - started < recorder.STOP_GRACE_S + 1
    assert not ffmpeg.is_running() or ffmpeg.status() == psutil.STATUS_ZOMBIE
    assert ffmpeg_using(ring_dir) == []
    assert rec.state is RecorderState.STOPPED
    assert not any(ring_dir.iterdir())
    with pytest.raises(RecorderError, match="stopped"):
        await rec.run()


async def test_stale_runs_of_an_earlier_process_are_removed(ring_dir: Path) -> None:
    stale = ring_dir / "run-20260302T150000-abcdef"
    stale.mkdir(parents=True)
    (stale / "00000001.ts").write_bytes(b"old")
    keep = ring_dir / "pins"
    keep.mkdir()
    async with RingRecorder("c1", f"rtsp://127.0.0.1:{free_tcp_port()}/cam", ring_dir, wall=now) as rec:
        await until(lambda: rec.restarts >= 1, 10, "one attempt")
        assert not stale.exists()
        assert keep.is_dir(), "only run directories are the recorder's to delete"
    assert os.listdir(ring_dir) == ["pins"]

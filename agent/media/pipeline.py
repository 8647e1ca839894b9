"""Highlights become clips: the court cameras' ring recorders, the cutter, the uploader and the storage budget.

A press on a court with a camera is recorded with `clip_state = 'pending'` in the decision's own transaction
(AccessService.button), so nothing here has to be told twice or survives on memory alone:

- the **cutter** waits for the end of the highlight's window (press + 20 s) and for the ring segment that covers
  it to close, pins the segments (hard links: the ring may prune meanwhile), joins them (`media.clips.cut_clip`,
  stream copy, fsync, atomic rename, SHA-256) and records the clip with its actual start (`trim_start_s`);
  footage that is not there (camera down, ring lost in a restart) or a cut that keeps failing is recorded as
  `missed`, and a `highlight.clip_unavailable` event tells the cloud to cut the clip from its own stream;
- the **uploader** sends ready clips oldest first over tus (`sync.clips.ClipUploader`), only while the cloud has
  no session, consumption or other event waiting (those go first), paced to `upload_kbps_open` while any court
  is open; the upload URL is stored before the first byte, so a restart resumes it; a clip the cloud refuses
  for good is `failed` (and the cloud told);
- the **budget** measures ring + clips + database every BUDGET_EVERY_S and after each clip; over the budget it
  deletes uploaded clips (oldest first), then the oldest clips not yet uploaded, with a warning and the event;
  sessions and consumption are never touched. Its level (ok, warn, critical, over) is in health, on the front
  desk and in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from ..access import AccessService
from ..clock import Clock
from ..config import Config
from ..domain.model import within
from ..errors import StoreError
from ..logs import OnceLogger, get_logger
from ..loop import check_cancelled
from ..metrics import Metrics
from ..store import repo
from ..store.db import Database
from ..sync.clips import ClipMetadata, ClipUploader
from ..sync.delivery import Permanent, Transient
from . import budget
from .clips import ClipError, cut_clip
from .recorder import GAP_TOLERANCE_S, PresenceCallback, RecorderError, RingRecorder, Segment

log = get_logger("agent.media")

CUT_POLL_S = 5.0  # the cutter looks for due highlights at least this often (a press wakes it at once)
CLOSE_GRACE_S = 6.0  # beyond two segments, how long to wait for the segment covering a clip's end to close
# A segment's wall times are stamped as ffmpeg reports each close, so a boundary that falls exactly on a clip's
# end is seen a few milliseconds either side of it: a segment ending this close before the end still covers it
# (the clip is then as much shorter; cut_clip accepts a shortfall up to SHORTFALL_TOLERANCE_S).
END_SLACK_S = 0.2
MAX_CUT_ATTEMPTS = 3
CUT_RETRY_S = 5.0
UPLOAD_POLL_S = 30.0
BUSY_POLL_S = 2.0  # while the cloud has events waiting, clips wait this long before looking again
UPLOAD_BACKOFF_S = (5.0, 15.0, 60.0, 300.0)
BUDGET_EVERY_S = 30.0
EVICT_TO_PCT = 90.0  # evicting over the budget frees down to this share of it, not just to the line
WORK_DIR = ".pins"  # under the ring directory: each cut's pinned segments, removed after the cut


async def wait_footage(
    recorder: RingRecorder, start: datetime, duration: timedelta, *, reencode: bool, within: float
) -> tuple[datetime, list[Segment] | None]:
    """Wait until the ring holds a clip of [start, start + duration]; the end waited for, and the segments that
    cover it (None: not in the ring, or not within `within` s).

    A stream copy starts on the keyframe before `start` and lasts `duration` from there (media/clips.py), so its
    last segment is the one ending then: up to one segment sooner than the one covering `start + duration`.
    "Lasts" is the segments' stream duration, not their wall-clock span: a camera whose clock runs slow by 1 %
    would otherwise give a clip 0.3 s short."""
    deadline = asyncio.get_running_loop().time() + within
    limit = start + duration
    head = None if reencode else recorder.covering(start, start)
    end = limit if head is None else min(limit, head[0].start + duration - timedelta(seconds=END_SLACK_S))
    while True:
        await recorder.wait_closed_after(end, within=max(0.0, deadline - asyncio.get_running_loop().time()))
        segments = recorder.covering(start, end)
        if head is None or segments is None or end >= limit:
            return end, segments
        short_s = duration.total_seconds() - sum(s.duration_s for s in segments)
        if short_s <= END_SLACK_S:
            return end, segments
        end = min(limit, segments[-1].end + timedelta(seconds=short_s))


def _best_stretch(segments: Sequence[Segment], press: datetime) -> list[Segment]:
    """When the ring cannot cover the whole window (the camera dropped in between), the contiguous stretch that
    holds the press, else the longest one: a shorter clip of the moment beats none."""
    stretches: list[list[Segment]] = []
    for segment in segments:
        last = stretches[-1][-1] if stretches else None
        contiguous = (
            last is not None
            and last.run_id == segment.run_id
            and (segment.start - last.end).total_seconds() <= GAP_TOLERANCE_S
        )
        if contiguous:
            stretches[-1].append(segment)
        else:
            stretches.append([segment])
    if not stretches:
        return []
    for stretch in stretches:
        if stretch[0].start <= press <= stretch[-1].end:
            return stretch
    return max(stretches, key=lambda s: (s[-1].end - s[0].start, s[0].start))


class ClipPipeline:
    def __init__(
        self,
        db: Database,
        config: Config,
        clock: Clock,
        service: AccessService,
        metrics: Metrics,
        *,
        uploader: ClipUploader | None = None,
        on_camera: PresenceCallback | None = None,
        ffmpeg: str | None = None,
    ) -> None:
        self._db, self._config, self._clock, self._service, self._metrics = db, config, clock, service, metrics
        self._media = config.media
        self._clips_dir = config.clips_path
        # Pins are hard links, so they live on the ring's filesystem (tmpfs), not beside the clips (the SD card).
        self._pins = config.ring_path / WORK_DIR
        self._uploader = uploader
        self._tz = ZoneInfo(config.agent.timezone)
        self._courts = config.domain_courts()
        self.recorders: dict[str, RingRecorder] = {
            camera.court: RingRecorder(
                camera.id,
                config.camera_url(camera),
                config.ring_path / camera.id,
                segment_s=self._media.segment_s,
                keep_s=self._media.ring_keep_s,
                wall=clock.wall,
                on_presence=on_camera,
                ffmpeg=ffmpeg,
            )
            for camera in config.cameras
        }
        self._wake_cut = asyncio.Event()
        self._wake_upload = asyncio.Event()
        self._wake_budget = asyncio.Event()
        self._in_flight: set[str] = set()
        self.usage: budget.Usage | None = None
        self._once = OnceLogger(log)

    # -- public -----------------------------------------------------------------------------------------------

    def pressed(self) -> None:
        """A highlight was recorded: look at the pending ones now."""
        self._wake_cut.set()

    def storage(self) -> dict[str, Any] | None:
        """The budget's last reading, for health and the front desk."""
        if self.usage is None:
            return None
        return self.usage.to_json(self._media.warn_pct, self._media.critical_pct)

    async def run(self) -> None:
        await asyncio.to_thread(self._prepare_dirs)
        async with asyncio.TaskGroup() as tg:
            for recorder in self.recorders.values():
                tg.create_task(recorder.run(), name=f"recorder-{recorder.camera_id}")
            tg.create_task(self._cutter(), name="clip-cutter")
            if self._uploader is not None:
                tg.create_task(self._upload_loop(), name="clip-uploader")
            tg.create_task(self._budget_loop(), name="storage-budget")

    def _prepare_dirs(self) -> None:
        self._clips_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._pins, ignore_errors=True)  # pins of cuts a stop interrupted
        for stray in self._clips_dir.glob(".*.part"):  # a cut interrupted before its rename
            stray.unlink(missing_ok=True)

    async def _update(self, sql: str, params: tuple[Any, ...]) -> int:
        """One UPDATE of a highlight's clip columns; how many rows it changed."""
        return await self._db.write("updating a clip", lambda conn: conn.execute(sql, params).rowcount)

    # -- the cutter -------------------------------------------------------------------------------------------

    async def _cutter(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                check_cancelled()
                self._wake_cut.clear()
                rows = await self._db.fetchall(
                    "SELECT highlight_id, court_id, session_id, pressed_at, start_at, duration_ms, clip_attempts"
                    " FROM highlights WHERE clip_state = 'pending' ORDER BY pressed_at LIMIT 64"
                )
                now_ms = repo.to_ms(self._clock.wall())
                next_due: int | None = None
                for row in rows:
                    highlight_id = str(row["highlight_id"])
                    # The earliest a clip can be cut (a stream copy's window slides back up to one segment);
                    # `_cut` waits for the exact segment from there.
                    due = int(row["start_at"]) + int(row["duration_ms"]) - round(self._media.segment_s * 1000)
                    if highlight_id in self._in_flight:
                        continue
                    if due > now_ms:
                        next_due = due if next_due is None else min(next_due, due)
                        continue
                    self._in_flight.add(highlight_id)
                    tg.create_task(self._cut_guarded(dict(row)), name=f"cut-{highlight_id}")
                wait_s = CUT_POLL_S if next_due is None else min(CUT_POLL_S, max(0.05, (next_due - now_ms) / 1000))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._wake_cut.wait()

    async def _cut_guarded(self, row: dict[str, Any]) -> None:
        try:
            await self._cut(row)
        except Exception:  # one clip's trouble never stops the cutter; the row stays pending and is retried
            log.exception("clip_cut_crashed", highlight=row["highlight_id"])
            await asyncio.sleep(CUT_RETRY_S)
        finally:
            self._in_flight.discard(str(row["highlight_id"]))
            self._wake_cut.set()

    async def _cut(self, row: dict[str, Any]) -> None:
        highlight_id = str(row["highlight_id"])
        recorder = self.recorders.get(str(row["court_id"]))
        if recorder is None:
            await self._missed(highlight_id, "no_footage", "the court has no camera configured any more")
            return
        start = repo.from_ms(int(row["start_at"]))
        duration = timedelta(milliseconds=int(row["duration_ms"]))
        pressed = repo.from_ms(int(row["pressed_at"]))
        within = 2 * recorder.segment_s + CLOSE_GRACE_S
        end, covering = await wait_footage(recorder, start, duration, reencode=self._media.reencode, within=within)
        segments = covering or _best_stretch(recorder.overlapping(start, end), pressed)
        if not segments:
            why = "the camera was offline" if not recorder.online else "the footage is no longer in the ring"
            await self._missed(highlight_id, "no_footage", f"no footage for {start.isoformat()}: {why}")
            return
        work = self._pins / highlight_id
        out = self._clips_dir / f"{highlight_id}.mp4"
        try:
            pinned = await asyncio.to_thread(recorder.pin, segments, work)
            clip = await cut_clip(
                pinned, start, duration.total_seconds(), out, reencode=self._media.reencode, probe_audio=False
            )
        except (ClipError, RecorderError, OSError) as exc:
            attempts = int(row["clip_attempts"]) + 1
            log.warning("clip_cut_failed", highlight=highlight_id, attempt=attempts, error=str(exc)[-300:])
            if attempts >= MAX_CUT_ATTEMPTS:
                await self._missed(highlight_id, "cut_failed", str(exc))
            else:
                await self._update(
                    "UPDATE highlights SET clip_attempts = ?, clip_error = ? WHERE highlight_id = ?",
                    (attempts, str(exc)[-500:], highlight_id),
                )
                await asyncio.sleep(CUT_RETRY_S)
            return
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        now = self._clock.wall()
        updated = await self._update(
            "UPDATE highlights SET clip_state = 'ready', clip_path = ?, clip_sha256 = ?, clip_bytes = ?,"
            " clip_start_at = ?, trim_start_s = ?, clip_duration_ms = ?, clip_ready_at = ?, clip_error = NULL"
            " WHERE highlight_id = ? AND clip_state = 'pending'",
            (
                str(clip.path),
                clip.sha256,
                clip.size,
                repo.to_ms(clip.start_at),
                clip.trim_start_s,
                round(clip.duration_s * 1000),
                repo.to_ms(now),
                highlight_id,
            ),
        )
        if not updated:  # evicted or given up on meanwhile: the file is nobody's
            await asyncio.to_thread(clip.path.unlink, True)
            return
        self._metrics.clips.labels("ready").inc()
        self._metrics.press_to_clip_seconds.observe((now - pressed).total_seconds())
        log.info(
            "clip_ready",
            highlight=highlight_id,
            court=row["court_id"],
            seconds=round(clip.duration_s, 2),
            trim_start_s=round(clip.trim_start_s, 3),
            press_to_clip_s=round((now - pressed).total_seconds(), 2),
            bytes=clip.size,
        )
        self._wake_upload.set()
        self._wake_budget.set()

    async def _missed(self, highlight_id: str, reason: str, detail: str) -> None:
        if await self._service.clip_unavailable(highlight_id, "missed", reason, detail):
            self._metrics.clips.labels("missed").inc()
            log.warning("clip_missed", highlight=highlight_id, reason=reason, detail=detail[-300:])

    # -- the uploader -----------------------------------------------------------------------------------------

    def upload_rate(self, now: datetime) -> float | None:
        """Bytes per second allowed now: the opening-hours cap while any court is open."""
        local = now.astimezone(self._tz)
        is_open = any(within(court.hours, local) for court in self._courts.values())
        kbps = self._media.upload_kbps_open if is_open else self._media.upload_kbps_closed
        return kbps * 1000 / 8 if kbps is not None else None

    async def _upload_loop(self) -> None:
        assert self._uploader is not None
        failures = 0
        while True:
            check_cancelled()
            self._wake_upload.clear()
            row = await self._db.fetchone(
                "SELECT highlight_id, court_id, session_id, pressed_at, clip_start_at, trim_start_s,"
                " clip_duration_ms, clip_path, clip_sha256, upload_url FROM highlights"
                " WHERE clip_state = 'ready' ORDER BY pressed_at LIMIT 1"
            )
            if row is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(UPLOAD_POLL_S):
                        await self._wake_upload.wait()
                continue
            if await self._db.read(repo.destination_busy, "cloud", repo.to_ms(self._clock.wall())):
                await asyncio.sleep(BUSY_POLL_S)  # sessions and consumption first
                continue
            try:
                await self._upload(dict(row))
                failures = 0
            except Transient as exc:
                failures += 1
                wait = UPLOAD_BACKOFF_S[min(failures, len(UPLOAD_BACKOFF_S)) - 1]
                self._once.warning("clip_upload_retry", "transient", error=str(exc)[:300], retry_in_s=wait)
                with contextlib.suppress(StoreError):  # a full disk must not stop the agent: the row keeps its state
                    await self._update(
                        "UPDATE highlights SET clip_error = ? WHERE highlight_id = ?",
                        (str(exc)[:500], row["highlight_id"]),
                    )
                await asyncio.sleep(wait)
            except StoreError as exc:  # a full or read-only disk: the upload is retried once writes work again
                failures += 1
                self._once.warning("clip_upload_store_error", "store", error=str(exc)[:300])
                await asyncio.sleep(UPLOAD_BACKOFF_S[min(failures, len(UPLOAD_BACKOFF_S)) - 1])

    async def _upload(self, row: dict[str, Any]) -> None:
        assert self._uploader is not None
        highlight_id = str(row["highlight_id"])
        path = Path(str(row["clip_path"]))
        if not await asyncio.to_thread(path.is_file):
            await self._missed(highlight_id, "no_footage", f"the clip file {path.name} is gone")
            return
        metadata = ClipMetadata(
            highlight_id=highlight_id,
            court_id=str(row["court_id"]),
            session_id=row["session_id"],
            pressed_at=repo.from_ms(int(row["pressed_at"])),
            start_at=repo.from_ms(int(row["clip_start_at"])),
            trim_start_s=float(row["trim_start_s"]),
            duration_s=int(row["clip_duration_ms"]) / 1000,
            triggered_by="button",
            filename=path.name,
        )

        async def created(url: str) -> None:
            await self._update("UPDATE highlights SET upload_url = ? WHERE highlight_id = ?", (url, highlight_id))

        self._uploader.max_bytes_per_s = self.upload_rate(self._clock.wall())
        started = time.monotonic()
        try:
            result = await self._uploader.upload(
                path, metadata, str(row["clip_sha256"]), resume_url=row["upload_url"], on_created=created
            )
        except Permanent as exc:
            if await self._service.clip_unavailable(highlight_id, "failed", "refused", str(exc)):
                self._metrics.clips.labels("refused").inc()
                log.error("clip_refused", highlight=highlight_id, error=str(exc)[:300])
            return
        await self._update(
            "UPDATE highlights SET clip_state = 'uploaded', uploaded_at = ?, clip_error = NULL"
            " WHERE highlight_id = ? AND clip_state = 'ready'",
            (repo.to_ms(self._clock.wall()), highlight_id),
        )
        self._metrics.clips.labels("uploaded").inc()
        log.info(
            "clip_uploaded",
            highlight=highlight_id,
            bytes=result.size,
            resumed_from=result.resumed_from,
            retries=result.retries,
            seconds=round(time.monotonic() - started, 2),
        )

    # -- the storage budget -----------------------------------------------------------------------------------

    async def _budget_loop(self) -> None:
        while True:
            check_cancelled()
            self._wake_budget.clear()
            try:
                await self.enforce_budget()
            except (StoreError, OSError) as exc:  # a full or read-only disk: measured again next round
                self._once.warning("storage_budget_failed", "store", error=str(exc)[:300])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BUDGET_EVERY_S):
                    await self._wake_budget.wait()

    async def enforce_budget(self) -> budget.Usage:
        """Measure; over the budget, evict clips in the stated order. Returns the usage after."""
        limit = self._media.budget_mb * 1024 * 1024
        measure: Callable[[], budget.Usage] = lambda: budget.measure(  # noqa: E731
            self._config.db_path, self._clips_dir, self._config.ring_path, limit
        )
        usage = await asyncio.to_thread(measure)
        if usage.total > usage.budget:
            rows = await self._db.fetchall(
                "SELECT highlight_id, clip_path, clip_bytes, uploaded_at, pressed_at FROM highlights"
                " WHERE clip_path IS NOT NULL AND clip_state IN ('ready', 'uploaded')"
            )
            files = [
                budget.ClipFile(
                    str(r["highlight_id"]),
                    Path(str(r["clip_path"])),
                    int(r["clip_bytes"] or 0),
                    r["uploaded_at"] is not None,
                    int(r["pressed_at"]),
                )
                for r in rows
            ]
            uploaded, waiting = budget.choose(usage, files, EVICT_TO_PCT)
            for clip in uploaded:
                await asyncio.to_thread(clip.path.unlink, True)
                await self._update(
                    "UPDATE highlights SET clip_path = NULL WHERE highlight_id = ?", (clip.highlight_id,)
                )
                self._metrics.clips.labels("evicted_uploaded").inc()
            for clip in waiting:
                detail = (
                    f"storage budget of {self._media.budget_mb} MB exceeded: the clip was deleted before upload"
                    f" ({usage.total // (1024 * 1024)} MB in use)"
                )
                log.warning("clip_evicted_before_upload", highlight=clip.highlight_id, bytes=clip.size)
                await asyncio.to_thread(clip.path.unlink, True)
                if await self._service.clip_unavailable(clip.highlight_id, "evicted", "evicted", detail):
                    self._metrics.clips.labels("evicted").inc()
            if uploaded or waiting:
                log.info("storage_budget_evicted", uploaded=len(uploaded), not_uploaded=len(waiting))
                usage = await asyncio.to_thread(measure)
        level = usage.level(self._media.warn_pct, self._media.critical_pct)
        if level is not budget.Level.OK:
            self._once.warning(
                "storage_budget_high", level.value, level=level.value, used_pct=round(usage.pct, 1), bytes=usage.total
            )
        self._metrics.storage_bytes.labels("database").set(usage.database)
        self._metrics.storage_bytes.labels("clips").set(usage.clips)
        self._metrics.storage_bytes.labels("ring").set(usage.ring)
        self._metrics.storage_budget_bytes.set(usage.budget)
        self.usage = usage
        return usage

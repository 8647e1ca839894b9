"""Clip upload to the club cloud: tus 1.0.0 (core, creation, checksum, termination), one highlight's clip a call.

`ClipUploader.upload` creates the upload (its URL goes to `on_created` before any byte is sent, so the caller can
keep it in SQLite and a restarted agent resumes there), or asks where a known upload stands (HEAD), then PATCHes
256 KiB chunks, each with `Upload-Checksum: sha256` and signed as every body to the cloud is (DESIGN 2.3: `X-Timestamp`,
`X-Signature = hex(HMAC-SHA256(secret, "{timestamp}.{chunk}"))`). A lost connection, a timeout, a 5xx or a garbled
answer is retried from the offset a HEAD reports, after a capped, jittered backoff, a bounded number of times a
call; the cloud judges the whole clip's SHA-256 on the last chunk, and a final HEAD confirms it is complete. Bytes
are paced by a token bucket when `max_bytes_per_s` is set (opening hours can throttle uploads while members use the
club's uplink), and file reads and hashing run in a thread, never on the event loop.

Errors are the delivery classes: `Transient` (network, 5xx, 408/423/429, unreadable answers, attempts used up)
and `Permanent` (other 4xx; a clip whose SHA-256 is not the one declared). A 401 renews the token once.

Why not tuspy (tusclient 1.1.0, the kept Python tus client): its AsyncUploader calls `requests.head`
synchronously when it resumes a URL and on every retry, and reads each chunk from the file on the event loop;
every chunk opens the file again without closing it (a descriptor and a ResourceWarning a chunk) and makes a
new aiohttp session, so a new connection; its checksum is SHA-1, its retry delay fixed without jitter, its
headers fixed when the client is made (no token renewal on 401), and it has no place to pace bytes. Wrapping its
synchronous Uploader in a thread fixes only the event loop, and a thread cannot be cancelled mid-chunk. The part
of tus we need is five requests; this client speaks them over httpx, which the cloud client already uses, with
the same TokenSource and error classes.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import json
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from ..config import CloudSection
from ..logs import get_logger
from .cloud import TokenSource, sign
from .delivery import Permanent, Transient, network_error, response_text, retry_after

log = get_logger("agent.sync.clips")

TUS_VERSION = "1.0.0"
OFFSET_STREAM = "application/offset+octet-stream"
CLIPS_PATH = "/edge/clips/"
# Measured on a 7.5 MB clip: 1.002x bytes on the wire (headers included) without faults, 1.07x with two cuts;
# a cut costs at most one chunk again, and a smaller chunk would pay more headers and round trips instead.
CHUNK_BYTES = 256 * 1024
PIECE_BYTES = 64 * 1024  # a chunk goes out in pieces, so pacing is smooth and a cancel stops within one
# Per request: connect, and each read or write of the socket (a paced body waits between writes, not in them).
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
MAX_ATTEMPTS = 5  # failed requests one call survives; the caller's own retry (the outbox) takes it from there
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
BURST_S = 0.5  # the bucket holds at most this many seconds of the cap, so an idle spell is not a long burst
CHECKSUM_MISMATCH = 460  # the tus checksum extension's status
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ClipMetadata:
    """The highlight a clip belongs to, sent as the upload's metadata."""

    highlight_id: str
    court_id: str
    session_id: str | None  # a press with no session open still makes a highlight
    pressed_at: datetime
    start_at: datetime
    trim_start_s: float
    duration_s: float
    triggered_by: str
    filename: str

    def header(self, sha256: str) -> str:
        """`Upload-Metadata`: `key base64(value)` pairs; a key alone when there is no value."""
        values = {
            "highlight_id": self.highlight_id,
            "session_id": self.session_id or "",
            "court_id": self.court_id,
            "pressed_at": self.pressed_at.isoformat(timespec="milliseconds"),
            "start_at": self.start_at.isoformat(timespec="milliseconds"),
            "trim_start_s": repr(float(self.trim_start_s)),
            "duration_s": repr(float(self.duration_s)),
            "triggered_by": self.triggered_by,
            "sha256": sha256,
            "filename": self.filename,
        }
        return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" if v else k for k, v in values.items())


@dataclass(frozen=True, slots=True)
class UploadResult:
    url: str
    size: int
    sha256: str
    resumed_from: int  # where the cloud stood when this call began sending (0: from the start)
    bytes_sent: int  # chunk bytes this call put on the wire, resent ones included
    requests: int
    retries: int  # failures this call recovered from
    already_complete: bool  # the cloud had the whole clip before this call sent a byte


class State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class TokenBucket:
    """Paces bytes to `rate` a second. It starts empty, so a measured second never carries an opening burst."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("a bandwidth cap is a positive number of bytes a second")
        self.rate = rate
        self._tokens = 0.0
        self._stamp: float | None = None

    async def take(self, count: int) -> None:
        now = asyncio.get_running_loop().time()
        if self._stamp is not None:
            self._tokens = min(self.rate * BURST_S, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        # Taking into debt and sleeping it off keeps concurrent uploads under one cap together.
        self._tokens -= count
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


@dataclass(slots=True)
class _Run:
    """One call's counters."""

    highlight_id: str
    requests: int = 0
    bytes_sent: int = 0
    retries: int = 0
    resumed_from: int | None = None


@dataclass(slots=True)
class _Where:
    """The upload's URL and offset as far as this call knows; None: to create, to ask with HEAD."""

    url: str | None
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class _Remote:
    offset: int
    length: int
    sha256: str | None


class _Gone(Exception):
    """The upload at this URL no longer exists (404/410): it is created again."""


class _Rejected(Exception):
    """The cloud refused the completed clip: its SHA-256 is not the one in the metadata."""


class _Moved(Exception):
    """409 on a PATCH: the upload stands elsewhere than the client thought."""

    def __init__(self, offset: int | None) -> None:
        super().__init__(offset)
        self.offset = offset


# Each file job opens and closes the file in its own thread: a call cancelled while a job runs leaks nothing.


def _read_chunk(path: Path, offset: int, size: int) -> tuple[bytes, str]:
    with path.open("rb") as file:
        file.seek(offset)
        chunk = file.read(size)
    return chunk, base64.b64encode(hashlib.sha256(chunk).digest()).decode()


def _hash_file(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _header_count(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name, "").strip()
    # isascii: isdigit() is true of '²' and other digits int() refuses
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 15 else None


def _metadata_sha256(header: str) -> str | None:
    for item in header.split(","):
        key, _, value = item.strip().partition(" ")
        if key == "sha256":
            try:
                return base64.b64decode(value, validate=True).decode()
            except ValueError:  # binascii.Error, UnicodeDecodeError, and a non-ASCII value b64decode refuses
                return None
    return None


def _brief(response: httpx.Response) -> str:
    """The error code and detail of a JSON error answer, else the start of its text."""
    try:
        body = json.loads(response.content)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, an integer too long, nested too deep
        return response_text(response)[:160]
    if isinstance(body, dict):
        return f"{body.get('error')}: {body.get('detail')}"[:200]
    return str(body)[:160]


def _refusal(response: httpx.Response, what: str) -> Transient | Permanent:
    """Network-ish answers (408, 423 busy, 429, 5xx, and anything a tus server would not say) are transient;
    other 4xx permanent, as delivery.judge() rules for the rest of the cloud."""
    status = response.status_code
    if status in (408, 423, 429) or status >= 500 or status < 400:
        return Transient(f"{what}: HTTP {status} {_brief(response)}".rstrip(), retry_after(response))
    return Permanent(f"{what}: HTTP {status} {_brief(response)}", status)


class ClipUploader:
    """Resumable clip uploads to the club cloud's `/edge/clips/`, with its bearer token and a bandwidth cap.

    `tokens` may be a TokenSource shared with the box's other cloud calls (one token for all); without one, it
    makes its own from `section` and `client_secret`. A `client` given is the caller's to close.
    """

    def __init__(
        self,
        section: CloudSection,
        client_secret: str,
        signing_secret: str,
        *,
        client: httpx.AsyncClient | None = None,
        wall: Callable[[], float] = time.time,
        tokens: TokenSource | None = None,
        max_bytes_per_s: float | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        if max_attempts < 1 or chunk_bytes < 1:
            raise ValueError("max_attempts and chunk_bytes are at least 1")
        self._endpoint = section.base_url.rstrip("/") + CLIPS_PATH
        self._secret = signing_secret.encode()
        self._wall = wall
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient()
        self._tokens = tokens or TokenSource(self._client, section.token_url, section.client_id, client_secret)
        self._bucket: TokenBucket | None = None
        self.max_bytes_per_s = max_bytes_per_s
        self._max_attempts = max_attempts
        self._base_s = backoff_base_s
        self._cap_s = backoff_cap_s
        self._chunk = chunk_bytes
        self.state = State.NEW

    @property
    def max_bytes_per_s(self) -> float | None:
        return self._bucket.rate if self._bucket is not None else None

    @max_bytes_per_s.setter
    def max_bytes_per_s(self, value: float | None) -> None:
        """Takes effect from the next piece, also in uploads running now (opening hours begin mid-clip)."""
        if value is None:
            self._bucket = None
        elif self._bucket is None:
            self._bucket = TokenBucket(value)
        else:
            if value <= 0:
                raise ValueError("a bandwidth cap is a positive number of bytes a second")
            self._bucket.rate = value

    async def __aenter__(self) -> Self:
        if self.state is not State.NEW:
            raise RuntimeError(f"a ClipUploader is entered once (this one is {self.state.value})")
        self.state = State.OPEN
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self.state = State.CLOSED
        if self._owns_client:
            await self._client.aclose()

    async def upload(
        self,
        path: Path,
        metadata: ClipMetadata,
        sha256: str,
        *,
        resume_url: str | None,
        on_created: Callable[[str], Awaitable[None]],
    ) -> UploadResult:
        """Upload the clip at `path` (whose SHA-256 is `sha256`), resuming at `resume_url` when given."""
        if self.state is not State.OPEN:
            raise RuntimeError(f"upload() needs an open ClipUploader (`async with`); this one is {self.state.value}")
        sha256 = sha256.lower()
        if not _SHA256.fullmatch(sha256):
            raise ValueError("sha256 is 64 hex digits")
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
        except OSError as exc:
            raise Permanent(f"clip {metadata.highlight_id}: cannot read {path}: {exc.strerror or exc}") from exc
        if size == 0:
            raise Permanent(f"clip {metadata.highlight_id}: {path} is empty")
        try:
            return await self._upload(_Run(metadata.highlight_id), path, size, metadata, sha256, resume_url, on_created)
        except OSError as exc:  # the file went away or became unreadable mid-upload (evicted, a failing card)
            raise Permanent(f"clip {metadata.highlight_id}: cannot read {path}: {exc.strerror or exc}") from exc

    async def terminate(self, url: str) -> None:
        """Delete an unfinished upload (tus termination), e.g. a clip evicted before it was sent."""
        if self.state is not State.OPEN:
            raise RuntimeError(f"terminate() needs an open ClipUploader; this one is {self.state.value}")
        response = await self._send(_Run(""), "DELETE", url, {})
        if response.status_code not in (204, 404, 410):
            raise _refusal(response, f"terminating {url}")

    # -- the protocol -------------------------------------------------------------------------------------------

    async def _upload(
        self,
        run: _Run,
        path: Path,
        size: int,
        metadata: ClipMetadata,
        sha256: str,
        resume_url: str | None,
        on_created: Callable[[str], Awaitable[None]],
    ) -> UploadResult:
        where = _Where(resume_url)
        failures = 0
        rejected = False
        while True:
            retry_after_s: float | None = None
            delay = 0.0
            try:
                return await self._attempt(run, where, path, size, metadata, sha256, on_created)
            except _Gone as exc:
                where.url = where.offset = None
                run.resumed_from = None
                last: Exception = exc
                reason = "the upload is gone (expired, terminated or rejected): creating it again"
            except _Moved as exc:
                where.offset = exc.offset
                last, reason = exc, "409: the upload stands elsewhere than this client thought"
            except _Rejected as exc:
                await self._judge_rejection(run, path, sha256, exc, again=rejected)
                # The file is right, so the cloud's copy was assembled from something else (a resume URL kept
                # across a re-cut of the clip): the cloud discarded it, and the clip goes again from the start.
                rejected = True
                where.url = where.offset = None
                run.resumed_from = None
                last, reason = exc, str(exc)
            except Transient as exc:
                where.offset = None  # the chunk may have been stored and only its answer lost: ask
                last, reason, retry_after_s = exc, exc.reason, exc.retry_after_s
                delay = self._backoff_s(failures + 1, retry_after_s)
            failures += 1
            if failures >= self._max_attempts:
                raise Transient(
                    f"clip {run.highlight_id}: gave up after {failures} failed attempts; last: {reason}", retry_after_s
                ) from last
            run.retries += 1
            log.info("clip_upload_retry", highlight_id=run.highlight_id, attempt=failures, reason=reason)
            await asyncio.sleep(delay)

    async def _attempt(
        self,
        run: _Run,
        where: _Where,
        path: Path,
        size: int,
        metadata: ClipMetadata,
        sha256: str,
        on_created: Callable[[str], Awaitable[None]],
    ) -> UploadResult:
        if where.url is None:
            where.url, where.offset = await self._create(run, size, metadata, sha256)
            await on_created(where.url)
        url = where.url
        if where.offset is None:
            remote = await self._head(run, url)
            if remote.length != size:
                # A URL kept from another cut of this clip: its bytes are not this file's.
                await self._terminate_quietly(run, url)
                raise _Gone
            where.offset = remote.offset
        if run.resumed_from is None:
            run.resumed_from = where.offset
        while where.offset < size:
            where.offset = await self._patch(run, url, path, where.offset, size)
        final = await self._head(run, url)
        if final.offset != size or final.length != size:
            raise Transient(f"upload stands at {final.offset} of {final.length} after its last chunk")
        if final.sha256 is not None and final.sha256 != sha256:
            raise Permanent(f"clip {run.highlight_id}: the cloud holds sha256 {final.sha256}, not {sha256}")
        return UploadResult(
            url=url,
            size=size,
            sha256=sha256,
            resumed_from=run.resumed_from,
            bytes_sent=run.bytes_sent,
            requests=run.requests,
            retries=run.retries,
            already_complete=run.resumed_from == size,
        )

    async def _judge_rejection(self, run: _Run, path: Path, sha256: str, exc: _Rejected, *, again: bool) -> None:
        """Permanent when the file itself does not hash to what was declared, or a fresh start was refused too."""
        local = await asyncio.to_thread(_hash_file, path)
        if local != sha256:
            raise Permanent(
                f"clip {run.highlight_id} refused by the cloud: the file's sha256 is {local}, but {sha256} was "
                "declared (the file changed after it was hashed, or the hash is wrong)",
                CHECKSUM_MISMATCH,
            ) from exc
        if again:
            raise Permanent(
                f"clip {run.highlight_id} refused twice although the file matches its sha256: {exc}", CHECKSUM_MISMATCH
            ) from exc

    def _backoff_s(self, failures: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return retry_after_s * random.uniform(1.0, 1.1)
        return min(self._cap_s, self._base_s * 2.0 ** min(failures - 1, 30)) * random.uniform(0.5, 1.0)

    async def _create(self, run: _Run, size: int, metadata: ClipMetadata, sha256: str) -> tuple[str, int]:
        headers = {"Upload-Length": str(size), "Upload-Metadata": metadata.header(sha256)}
        response = await self._send(run, "POST", self._endpoint, headers)
        what = f"creating the upload of clip {run.highlight_id}"
        if response.status_code not in (200, 201):
            raise _refusal(response, what)
        location = response.headers.get("Location")
        if not location:
            raise Transient(f"{what}: HTTP {response.status_code} without a Location")
        offset = _header_count(response, "Upload-Offset") if response.status_code == 200 else 0
        if offset is None or offset > size:
            raise Transient(f"{what}: HTTP 200 without a valid Upload-Offset for the existing upload")
        url = self._upload_url(response, location)
        if url is None:  # kept and resumed at, with the bearer token: only ever on the cloud's own host
            raise Transient(f"{what}: HTTP {response.status_code} with a Location not on the cloud: {location[:80]!r}")
        return url, offset

    def _upload_url(self, response: httpx.Response, location: str) -> str | None:
        """The upload's absolute URL, if `location` is an http(s) URL on the cloud's host."""
        try:
            url = response.url.join(location)
        except httpx.InvalidURL:
            return None
        if url.scheme not in ("http", "https") or url.host != httpx.URL(self._endpoint).host:
            return None
        return str(url)

    async def _head(self, run: _Run, url: str) -> _Remote:
        response = await self._send(run, "HEAD", url, {})
        if response.status_code in (404, 410):
            raise _Gone
        what = f"asking where the upload of clip {run.highlight_id} stands"
        if response.status_code != 200:
            raise _refusal(response, what)
        offset = _header_count(response, "Upload-Offset")
        length = _header_count(response, "Upload-Length")
        if offset is None or length is None or offset > length:
            raise Transient(f"{what}: HTTP 200 without a valid Upload-Offset and Upload-Length (not a tus answer)")
        return _Remote(offset, length, _metadata_sha256(response.headers.get("Upload-Metadata", "")))

    async def _patch(self, run: _Run, url: str, path: Path, offset: int, size: int) -> int:
        count = min(self._chunk, size - offset)
        chunk, checksum = await asyncio.to_thread(_read_chunk, path, offset, count)
        if len(chunk) != count:
            raise Permanent(f"clip {run.highlight_id}: the file shrank to {offset + len(chunk)} bytes while uploading")
        stamp = int(self._wall())
        headers = {
            "Content-Type": OFFSET_STREAM,
            "Content-Length": str(count),
            "Upload-Offset": str(offset),
            "Upload-Checksum": f"sha256 {checksum}",
            "X-Timestamp": str(stamp),
            "X-Signature": await asyncio.to_thread(sign, self._secret, stamp, chunk),
        }
        response = await self._send(run, "PATCH", url, headers, lambda: self._paced(run, chunk))
        status = response.status_code
        what = f"sending clip {run.highlight_id} at {offset}"
        if status in (404, 410):
            raise _Gone
        if status == 409:
            raise _Moved(_header_count(response, "Upload-Offset"))
        if status == CHECKSUM_MISMATCH:
            if _brief(response).startswith("clip_rejected:"):
                raise _Rejected(f"{what}: {_brief(response)}")
            raise Transient(f"{what}: the chunk arrived damaged (HTTP 460 {_brief(response)})")
        if status not in (200, 204):
            raise _refusal(response, what)
        moved_to = _header_count(response, "Upload-Offset")
        if moved_to is None or not offset < moved_to <= size:
            raise Transient(f"{what}: HTTP {status} without a valid Upload-Offset (not a tus answer)")
        return moved_to

    async def _paced(self, run: _Run, chunk: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(chunk), PIECE_BYTES):
            piece = chunk[start : start + PIECE_BYTES]
            if self._bucket is not None:
                await self._bucket.take(len(piece))
            run.bytes_sent += len(piece)
            yield piece

    async def _terminate_quietly(self, run: _Run, url: str) -> None:
        response = await self._send(run, "DELETE", url, {})
        if response.status_code not in (204, 404, 409, 410):
            raise _refusal(response, f"terminating the stale upload {url}")

    async def _send(
        self,
        run: _Run,
        method: str,
        url: str,
        headers: dict[str, str],
        body: Callable[[], AsyncIterator[bytes]] | None = None,
    ) -> httpx.Response:
        """One tus request with the bearer token, renewed once on 401; network errors as Transient."""
        for attempt in (1, 2):
            token = await self._tokens.token(renew=attempt == 2)
            full = {"Tus-Resumable": TUS_VERSION, "Authorization": f"Bearer {token}", **headers}
            content: Any = body() if body is not None else None
            try:
                response = await self._client.request(method, url, headers=full, content=content, timeout=TIMEOUT)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL: a redirect to a bad Location
                # httpx's own message is often empty for a dropped connection; the kind of error says enough.
                raise Transient(f"{method} {url}: {network_error(exc).reason.rstrip(': ')}") from exc
            finally:
                run.requests += 1
            if response.status_code != 401:
                return response
            if attempt == 2:
                raise Transient(f"cloud refused a fresh token on {method} {url}: HTTP 401")
        raise AssertionError("unreachable")

"""The club cloud's clip upload: tus 1.0.0 (core, creation, checksum, termination) under `/edge/clips/`.

    OPTIONS /edge/clips/              what this server speaks: Tus-Version, -Extension, -Max-Size, -Checksum-Algorithm
    POST    /edge/clips/              create: Upload-Length and Upload-Metadata (the highlight) -> 201 and Location
    HEAD    /edge/clips/{upload_id}   how much is stored (Upload-Offset), of how much (Upload-Length)
    PATCH   /edge/clips/{upload_id}   append at Upload-Offset; an Upload-Checksum (sha256) is judged per chunk
    DELETE  /edge/clips/{upload_id}   terminate an unfinished upload

Bytes go to disk as they arrive, off the event loop, so a PATCH whose connection drops keeps what arrived (tus
core) - unless it carries a checksum: a partial chunk cannot be verified, so it is dropped and the client sends it
again from the offset a HEAD reports. The PATCH that completes an upload checks the whole file's SHA-256 against
the `sha256` of its metadata; a mismatch rejects the upload (460) and frees the highlight for a fresh creation.

A highlight has one clip: creating it again answers with the upload that exists (200, its Location and
Upload-Offset) instead of storing the clip twice. That is what makes the agent's retry safe when the answer to
its POST was lost, as the event inbox's de-duplication does for events.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import re
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError

from .errors import ApiError
from .faults import CUT_AFTER
from .signing import Streamed
from .tokens import require_bearer
from .wire import explain, instant, json_response, query, text

if TYPE_CHECKING:
    from .state import Sandbox

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,checksum,termination"
CHECKSUM_ALGORITHM = "sha256"
OFFSET_STREAM = "application/offset+octet-stream"
PREFIX = "/edge/clips/"
CHECKSUM_MISMATCH = 460  # the checksum extension's own status code
METADATA_CAP = 4096  # Upload-Metadata as sent, before it is decoded
PIECE = 64 * 1024
# A PATCH waits this long for an earlier one on the same upload: that one's client may be gone, and the server
# only notices when its socket says so.
LOCK_WAIT_S = 5.0

_KEY = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # printable ASCII without space or comma (tus: metadata keys)
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_DIGITS = re.compile(r"[0-9]{1,15}")


def _plain_name(value: str) -> str:
    if value in (".", ".."):
        raise ValueError("a file name, not a directory")
    return value


Text = Annotated[str, BeforeValidator(text), StringConstraints(min_length=1, max_length=128)]
Instant = Annotated[datetime, BeforeValidator(instant)]


class ClipMetadata(BaseModel):
    """The highlight a clip belongs to, as Upload-Metadata carries it (every value arrives as text)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    highlight_id: Text
    session_id: Text | None = None  # a press with no session open still makes a highlight
    court_id: Text
    pressed_at: Instant
    start_at: Instant
    # negative when the footage starts late (the camera came back after press - 10 s): the clip is still the moment
    trim_start_s: float = Field(ge=-3600, le=3600, allow_inf_nan=False)
    duration_s: float = Field(gt=0, le=3600, allow_inf_nan=False)
    triggered_by: Annotated[str, BeforeValidator(text), StringConstraints(min_length=1, max_length=32)]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    filename: Annotated[str, StringConstraints(pattern=r"^[^/\\\x00-\x1f\x7f]{1,255}$"), AfterValidator(_plain_name)]


def parse_metadata(header: str) -> dict[str, str]:
    """`key base64(value)` pairs, comma separated (a key alone has an empty value); ApiError 400 when malformed."""
    if len(header) > METADATA_CAP:
        raise _error(400, "invalid_metadata", f"Upload-Metadata is longer than {METADATA_CAP} characters")
    pairs: dict[str, str] = {}
    for item in header.split(","):
        parts = item.strip().split(" ")
        key = parts[0]
        if len(parts) > 2 or not _KEY.fullmatch(key):
            raise _error(400, "invalid_metadata", "Upload-Metadata is 'key base64value' pairs separated by commas")
        if key in pairs:
            raise _error(400, "invalid_metadata", f"Upload-Metadata key '{key}' is repeated")
        try:
            pairs[key] = base64.b64decode(parts[1], validate=True).decode("utf-8") if len(parts) == 2 else ""
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise _error(400, "invalid_metadata", f"Upload-Metadata '{key}': not base64 of UTF-8 text") from exc
    return pairs


def clip_metadata(pairs: dict[str, str]) -> ClipMetadata:
    values: dict[str, Any] = dict(pairs)
    if values.get("session_id") == "":
        values["session_id"] = None
    try:
        return ClipMetadata.model_validate(values)
    except ValidationError as exc:
        raise _error(400, "invalid_metadata", explain(exc, prefix="Upload-Metadata")) from exc


class Status(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    REJECTED = "rejected"  # the whole file's SHA-256 did not match its metadata
    TERMINATED = "terminated"


@dataclass(eq=False)
class Upload:
    upload_id: str
    length: int
    metadata: ClipMetadata
    raw_metadata: str
    path: Path
    created_at: str
    status: Status = Status.RECEIVING
    offset: int = 0  # bytes stored, in order; the file on disk is exactly this long between PATCHes
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)  # of the stored bytes
    received: int = 0  # body bytes read by every PATCH, the discarded ones included
    discarded: int = 0
    patches: int = 0
    lost: int = 0  # PATCHes whose connection dropped before the end of their body
    completed_at: str | None = None
    reason: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def gone(self) -> bool:
        return self.status in (Status.REJECTED, Status.TERMINATED)

    def public(self) -> dict[str, Any]:
        return {
            "upload_id": self.upload_id,
            "status": self.status.value,
            "length": self.length,
            "offset": self.offset,
            "received_bytes": self.received,
            "discarded_bytes": self.discarded,
            "patches": self.patches,
            "lost_patches": self.lost,
            "sha256": self.metadata.sha256,
            "metadata": self.metadata.model_dump(mode="json"),
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "reason": self.reason,
            "path": str(self.path) if self.status is Status.COMPLETE else None,
        }


class ClipStore:
    """The uploads of one sandbox epoch, on disk in one folder made at the first creation."""

    def __init__(self, root: Path | None, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._root = root
        self._folder: Path | None = None
        self._cleanup: weakref.finalize[Any, Any] | None = None
        self._uploads: dict[str, Upload] = {}
        self._by_highlight: dict[str, Upload] = {}  # the live (receiving or complete) upload of each highlight

    def __iter__(self) -> Iterator[Upload]:
        return iter(self._uploads.values())

    def complete(self) -> list[Upload]:
        return [u for u in self._uploads.values() if u.status is Status.COMPLETE]

    def close(self) -> None:
        """Remove a temporary folder now (a reset), rather than when the store is collected."""
        if self._cleanup is not None:
            self._cleanup()

    def _make_folder(self) -> Path:
        if self._root is not None:
            self._root.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix="clips-", dir=self._root))  # kept: the operator asked for them
        folder = Path(tempfile.mkdtemp(prefix="sandbox-clips-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        return folder

    async def create(self, length: int, metadata: ClipMetadata, raw: str, now: str) -> Upload:
        if self._folder is None:
            self._folder = await asyncio.to_thread(self._make_folder)
        upload_id = uuid.uuid4().hex
        path = self._folder / upload_id
        await asyncio.to_thread(path.touch, exist_ok=False)
        upload = Upload(upload_id, length, metadata, raw, path, now)
        self._uploads[upload_id] = upload
        self._by_highlight[metadata.highlight_id] = upload
        return upload

    def of_highlight(self, highlight_id: str) -> Upload | None:
        return self._by_highlight.get(highlight_id)

    def get(self, upload_id: str) -> Upload:
        upload = self._uploads.get(upload_id) if _UPLOAD_ID.fullmatch(upload_id) else None
        if upload is None:
            raise _error(404, "not_found", f"no upload {upload_id}")
        if upload.gone:
            raise _error(410, "gone", f"upload {upload_id} was {upload.status.value}: {upload.reason}")
        return upload

    async def drop(self, upload: Upload, status: Status, reason: str) -> None:
        upload.status = status
        upload.reason = reason
        if self._by_highlight.get(upload.metadata.highlight_id) is upload:
            del self._by_highlight[upload.metadata.highlight_id]
        await asyncio.to_thread(upload.path.unlink, missing_ok=True)


# -- the wire -----------------------------------------------------------------------------------------------------


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> ApiError:
    return ApiError(status, code, detail, headers={"Tus-Resumable": TUS_VERSION, **(headers or {})})


def _authorize(sandbox: Sandbox, request: web.Request) -> None:
    """The bearer check of every /edge route, then the protocol version tus requires on every request."""
    try:
        require_bearer(sandbox, request)
    except ApiError as exc:
        exc.headers["Tus-Resumable"] = TUS_VERSION
        raise
    version = request.headers.get("Tus-Resumable")
    if version != TUS_VERSION:
        detail = f"Tus-Resumable must be {TUS_VERSION}, not {version!r}"
        raise _error(412, "unsupported_version", detail, {"Tus-Version": TUS_VERSION})


def _count(request: web.Request, name: str) -> int:
    value = request.headers.get(name)
    if value is None or not _DIGITS.fullmatch(value.strip()):
        raise _error(400, f"invalid_{name.lower().replace('-', '_')}", f"{name} must be a byte count (0 or more)")
    return int(value)


def _checksum(header: str | None) -> bytes | None:
    if header is None:
        return None
    algorithm, _, encoded = header.strip().partition(" ")
    if algorithm.lower() != CHECKSUM_ALGORITHM:
        raise _error(400, "unsupported_checksum_algorithm", f"Upload-Checksum algorithm must be {CHECKSUM_ALGORITHM}")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error as exc:
        raise _error(400, "invalid_checksum", "Upload-Checksum is 'sha256 <base64 of the digest>'") from exc
    if len(digest) != hashlib.sha256().digest_size:
        raise _error(400, "invalid_checksum", "Upload-Checksum: a SHA-256 digest is 32 bytes")
    return digest


async def _locked(upload: Upload) -> None:
    try:
        async with asyncio.timeout(LOCK_WAIT_S):
            await upload.lock.acquire()
    except TimeoutError:
        raise _error(423, "upload_locked", "another request on this upload is running", {"Retry-After": "1"}) from None


def _open_at(path: Path, offset: int) -> IO[bytes]:
    handle = path.open("r+b")
    handle.seek(offset)
    return handle


class _Digest(Protocol):
    def update(self, piece: bytes, /) -> None: ...


def _write(handle: IO[bytes], piece: bytes, hashes: Sequence[_Digest]) -> None:
    handle.write(piece)
    for digest in hashes:
        digest.update(piece)


def _close(handle: IO[bytes], size: int) -> None:
    try:
        handle.truncate(size)
    finally:
        handle.close()


@dataclass(slots=True)
class _Body:
    got: int = 0
    lost: bool = False  # the connection dropped (or a cut fault dropped it) before the body's end


async def _stream(request: web.Request, handle: IO[bytes], hashes: Sequence[_Digest], room: int) -> _Body:
    """Copy the body to `handle` as it arrives; stop at a cut fault's byte, at a dropped connection or at the end."""
    cut_at = request.get(CUT_AFTER)
    body = _Body()
    while True:
        want = PIECE if cut_at is None else min(PIECE, cut_at - body.got)
        if want <= 0:
            body.lost = not request.content.at_eof()
            return body
        try:
            piece = await request.content.read(want)
        except (ConnectionError, HttpProcessingError):
            body.lost = True
            return body
        if not piece:
            return body
        if body.got + len(piece) > room:
            raise _error(413, "beyond_upload_length", f"the body goes past Upload-Length ({room} bytes were left)")
        await asyncio.to_thread(_write, handle, piece, hashes)
        body.got += len(piece)


def routes(sandbox: Sandbox) -> list[web.RouteDef]:
    def location(request: web.Request, upload: Upload) -> str:
        return f"{request.scheme}://{request.host}{PREFIX}{upload.upload_id}"

    async def options(request: web.Request) -> web.Response:
        # Open to anyone, as tus servers are: it tells nothing but what the protocol speaks, and a browser's CORS
        # preflight (an OPTIONS) never carries credentials.
        query(request, frozenset())
        return web.Response(
            status=204,
            headers={
                "Tus-Resumable": TUS_VERSION,
                "Tus-Version": TUS_VERSION,
                "Tus-Extension": TUS_EXTENSIONS,
                "Tus-Max-Size": str(sandbox.clips.max_bytes),
                "Tus-Checksum-Algorithm": CHECKSUM_ALGORITHM,
            },
        )

    async def create(request: web.Request) -> web.Response:
        try:
            return await _create(request)
        except ApiError as exc:
            sandbox.record_call(request, status=exc.status, acted=False, error=exc.code)
            raise

    async def _create(request: web.Request) -> web.Response:
        _authorize(sandbox, request)
        query(request, frozenset())
        if request.content_length or (request.content_length is None and request.body_exists):
            raise _error(400, "unexpected_body", "creation takes no body here (creation-with-upload is not offered)")
        if "Upload-Defer-Length" in request.headers:
            raise _error(400, "defer_length_unsupported", "give Upload-Length (creation-defer-length is not offered)")
        length = _count(request, "Upload-Length")
        store = sandbox.clips
        if not 1 <= length <= store.max_bytes:
            raise _error(413, "too_large", f"Upload-Length must be 1..{store.max_bytes} (Tus-Max-Size)")
        raw = request.headers.get("Upload-Metadata", "")
        metadata = clip_metadata(parse_metadata(raw))
        existing = store.of_highlight(metadata.highlight_id)
        if existing is not None:
            if existing.length != length or existing.metadata.sha256 != metadata.sha256:
                raise _error(
                    409,
                    "clip_conflict",
                    f"highlight {metadata.highlight_id} already has a {existing.status.value} upload of "
                    f"{existing.length} bytes with sha256 {existing.metadata.sha256}; an unfinished one can be "
                    "terminated (DELETE its Location) to make room",
                    {"Location": location(request, existing)},
                )
            effect = {"upload_id": existing.upload_id, "highlight_id": metadata.highlight_id}
            sandbox.record_call(request, status=200, acted=False, replayed=True, effect=effect)
            return web.Response(
                status=200,
                headers={
                    "Tus-Resumable": TUS_VERSION,
                    "Location": location(request, existing),
                    "Upload-Offset": str(existing.offset),
                    "Upload-Length": str(existing.length),
                },
            )
        upload = await store.create(length, metadata, raw, sandbox.clock.iso())
        effect = {"upload_id": upload.upload_id, "highlight_id": metadata.highlight_id}
        sandbox.record_call(request, status=201, acted=True, effect=effect)
        return web.Response(
            status=201,
            headers={"Tus-Resumable": TUS_VERSION, "Location": location(request, upload), "Upload-Offset": "0"},
        )

    async def head(request: web.Request) -> web.Response:
        _authorize(sandbox, request)
        query(request, frozenset())
        upload = sandbox.clips.get(request.match_info["upload_id"])
        return web.Response(
            status=200,
            headers={
                "Tus-Resumable": TUS_VERSION,
                "Upload-Offset": str(upload.offset),
                "Upload-Length": str(upload.length),
                "Upload-Metadata": upload.raw_metadata,
                "Cache-Control": "no-store",
            },
        )

    async def patch(request: web.Request) -> web.Response:
        effect: dict[str, Any] = {}  # filled by _append once the body was read
        try:
            response = await _patch(request, effect)
        except ApiError as exc:
            sandbox.record_call(
                request, status=exc.status, acted=effect.pop("acted", False), error=exc.code, effect=effect or None
            )
            raise
        # A body cut short is never answered: the log says "no answer", as for a reset.
        status = None if effect.get("lost") else response.status
        sandbox.record_call(request, status=status, acted=effect.pop("acted"), effect=effect)
        return response

    async def _patch(request: web.Request, effect: dict[str, Any]) -> web.Response:
        _authorize(sandbox, request)
        query(request, frozenset())
        upload = sandbox.clips.get(request.match_info["upload_id"])
        if request.content_type != OFFSET_STREAM:
            raise _error(415, "unsupported_media_type", f"Content-Type must be {OFFSET_STREAM}")
        offset = _count(request, "Upload-Offset")
        expected = _checksum(request.headers.get("Upload-Checksum"))
        options = sandbox.options
        signed = Streamed(
            options.signing_secret, request.headers, now=sandbox.clock.now(), window_s=options.signature_window_s
        )
        await _locked(upload)
        try:
            if upload.gone:  # terminated or rejected while this request waited
                raise _error(410, "gone", f"upload {upload.upload_id} was {upload.status.value}: {upload.reason}")
            if offset != upload.offset:
                raise _error(
                    409,
                    "offset_mismatch",
                    f"Upload-Offset {offset} is not where the upload stands ({upload.offset})",
                    {"Upload-Offset": str(upload.offset)},
                )
            room = upload.length - offset
            if request.content_length is not None and request.content_length > room:
                raise _error(413, "beyond_upload_length", f"{request.content_length} bytes; {room} are left")
            return await _append(request, upload, expected, signed, room, effect)
        finally:
            upload.lock.release()

    async def _append(
        request: web.Request,
        upload: Upload,
        expected: bytes | None,
        signed: Streamed,
        room: int,
        effect: dict[str, Any],
    ) -> web.Response:
        start = upload.offset
        running = upload.digest.copy()
        chunk = hashlib.sha256()
        handle = await asyncio.to_thread(_open_at, upload.path, start)
        kept = 0
        try:
            body = await _stream(request, handle, [running, chunk, signed], room)
            mismatch = expected is not None and not body.lost and chunk.digest() != expected
            forged: ApiError | None = None
            if not body.lost:
                try:
                    signed.check()
                except ApiError as exc:
                    forged = exc
            # A chunk is kept only whole and as signed (a part of one cannot be checked against its signature),
            # and then only as its checksum says.
            if forged is None and not mismatch and not body.lost:
                kept = body.got
        finally:
            await asyncio.to_thread(_close, handle, start + kept)
        upload.patches += 1
        upload.received += body.got
        upload.discarded += body.got - kept
        upload.lost += body.lost
        if kept:
            upload.offset += kept
            upload.digest = running
        effect.update(
            upload_id=upload.upload_id,
            offset_from=start,
            offset_to=upload.offset,
            received=body.got,
            kept=kept,
            lost=body.lost,
            acted=kept > 0,
        )
        if forged is not None:
            forged.headers["Tus-Resumable"] = TUS_VERSION
            raise forged
        if mismatch:
            raise _error(CHECKSUM_MISMATCH, "checksum_mismatch", "the chunk does not match its Upload-Checksum")
        if upload.offset == upload.length:
            actual = upload.digest.hexdigest()
            if actual != upload.metadata.sha256:
                reason = f"the clip's sha256 is {actual}, its Upload-Metadata says {upload.metadata.sha256}"
                await sandbox.clips.drop(upload, Status.REJECTED, reason)
                effect["rejected"] = True
                raise _error(CHECKSUM_MISMATCH, "clip_rejected", f"{reason}; the upload is discarded")
            upload.status = Status.COMPLETE
            upload.completed_at = sandbox.clock.iso()
            effect["complete"] = True
        return web.Response(status=204, headers={"Tus-Resumable": TUS_VERSION, "Upload-Offset": str(upload.offset)})

    async def delete(request: web.Request) -> web.Response:
        try:
            _authorize(sandbox, request)
            query(request, frozenset())
            upload = sandbox.clips.get(request.match_info["upload_id"])
            if upload.status is Status.COMPLETE:
                raise _error(409, "upload_complete", "a finished clip is the cloud's; it is not terminated")
            await _locked(upload)
            try:
                if upload.gone:
                    raise _error(410, "gone", f"upload {upload.upload_id} was {upload.status.value}")
                await sandbox.clips.drop(upload, Status.TERMINATED, "terminated by the client")
            finally:
                upload.lock.release()
        except ApiError as exc:
            sandbox.record_call(request, status=exc.status, acted=False, error=exc.code)
            raise
        sandbox.record_call(request, status=204, acted=True, effect={"upload_id": upload.upload_id})
        return web.Response(status=204, headers={"Tus-Resumable": TUS_VERSION})

    upload_path = PREFIX + "{upload_id}"
    return [
        web.route("OPTIONS", PREFIX, options, name="cloud.clips.options"),
        web.post(PREFIX, create, name="cloud.clips.create"),
        web.head(upload_path, head, name="cloud.clips.head"),
        web.patch(upload_path, patch, name="cloud.clips.patch"),
        web.delete(upload_path, delete, name="cloud.clips.delete"),
    ]


def admin_listing(store: ClipStore, status: str | None, highlight_id: str | None) -> web.Response:
    """`GET /_sandbox/clips`: every upload of this epoch with what the sandbox received, newest last."""
    if status is not None and status not in set(Status):
        raise ApiError(400, "invalid_query", f"status is one of {', '.join(s.value for s in Status)}")
    clips = [
        u.public()
        for u in store
        if (status is None or u.status == status) and (highlight_id is None or u.metadata.highlight_id == highlight_id)
    ]
    return json_response({"clips": clips, "count": len(clips)})

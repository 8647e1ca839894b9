"""Fuzz target: the tus answers a clip upload reads (agent/sync/clips.py): Location, Upload-Offset,
Upload-Length, Upload-Metadata's sha256, Retry-After and error bodies, through `ClipUploader.upload` (one attempt:
no backoff to sleep) and `terminate` over httpx's own fake transport, which answers each request from the input,
and the header parsers themselves.

Rules: an answer is a step forward, or Transient (garbled, busy, 5xx), or Permanent (refused); nothing else
escapes. What an upload reports holds together (sizes, offsets, an http(s) URL to resume at).
`python -m tests.fuzz.fuzz_clips [libFuzzer flags]` fuzzes it under atheris."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx

from agent.config import CloudSection
from agent.sync import clips
from agent.sync.clips import ClipMetadata, ClipUploader
from agent.sync.delivery import Permanent, Transient

from . import _harness, fuzz_cloud
from ._support import Draw, Known, json_value, quiet_logs, run, scratch_dir, tolerated

SECTION = CloudSection(base_url="https://cloud.test", token_url="https://cloud.test/token", client_id="edge-01")
SIZE, CHUNK = 1000, 300
CLIP = bytes(range(256)) * 3 + bytes(SIZE - 768)
SHA256 = hashlib.sha256(CLIP).hexdigest()
META = ClipMetadata(
    "h-1", "c1", "s-1", datetime(2026, 3, 2, 15, tzinfo=UTC), datetime(2026, 3, 2, 15, tzinfo=UTC), 0, 30, "b1", "x.mp4"
)
STATUSES = (200, 200, 201, 204, 204, 204, 401, 404, 409, 410, 423, 460, 500, 400, 302)
OFFSETS = ("0", "300", "600", "900", "1000", "1001", "-1", " 300 ", "0300", "9" * 16, "1e3", "\u00b2", "\u0663")
LOCATIONS = (
    *("/edge/clips/u-1", "https://cloud.test/edge/clips/u-2", "u-3", "//elsewhere.test/u", "../../u", "http:"),
    *("mailto:u", "http://[::1", "https://cloud.test:99999/u", ""),
)
METADATA = (
    f"sha256 {base64.b64encode(SHA256.encode()).decode()}",
    f"filename eC5tcDQ=,sha256 {base64.b64encode(b'0' * 64).decode()}",
    "sha256 !!!",
    "sha256 \u00e9",
    "sha256",
    "sha256 /w==",
)
HEADERS = {
    b"Location": LOCATIONS,
    b"Upload-Offset": OFFSETS,
    b"Upload-Length": ("1000", "999", "1001", "0", "x"),
    b"Upload-Metadata": METADATA,
    b"Retry-After": fuzz_cloud.RETRY_AFTER,
    b"Content-Type": fuzz_cloud.CONTENT_TYPES,
}
KEYS = ("error", "detail")
STRINGS = ("clip_rejected", "checksum_mismatch", "busy")

_dir: Path | None = None


def clip_file() -> Path:
    global _dir
    if _dir is None:
        _dir = Path(scratch_dir("clips-"))
        (_dir / "clip.mp4").write_bytes(CLIP)
    return _dir / "clip.mp4"


def _headers(data: bytes) -> object:
    """The parsers on one answer's headers: `data` is `Name: value` lines."""
    fields = [line.split(b": ", 1) for line in data.split(b"\n") if b": " in line]
    response = httpx.Response(200, headers=[(name, value) for name, value in fields])
    clips._header_count(response, "Upload-Offset")
    return clips._metadata_sha256(response.headers.get("Upload-Metadata", ""))


def _upload(data: bytes) -> object:
    """An upload answered by `data`: a JSON list of [status, headers, body text] answers, in order."""
    answers = [httpx.Response(status, headers=headers, text=body) for status, headers, body in json.loads(data)]
    try:
        return run(_attempt(lambda request: answers.pop(0), resume_url=None))
    except Transient as exc:  # the upload's verdict, checked
        fuzz_cloud.transient(exc)
        return exc
    except Permanent as exc:
        permanent(exc)
        return exc


# Inputs worth keeping: run by test_fuzz_agent.py.
REGRESSIONS: list[bytes] = [
    # a 401 on a PATCH: the token is renewed and the chunk sent again, so bytes_sent counts it twice (this broke
    # a rule of this target that forgot resent bytes)
    b"\n4\x8c\x8c\x8c\x8c\x8c\x8c)\xf6\xff\xff/.V\x00\xd2\x00\n\xa2\x8c\x8c\x8c\x8c\x8c\x8c\x8c)\xf6\xff\xff````\x08\x08.\x08\x08\x08\x08\x08\x08\xff\xff=\xb3#\x02\x00\x00\x00\x00\x00\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x9a\x00\x00\xff`\xff/",
]
KNOWN: list[Known] = []
# Reported bugs that are fixed: test_fuzz_agent.py runs each check as a plain (passing) regression test.
FIXED: list[Known] = [
    # Upload-Offset is read with str.isdigit(), which is true of '²' and other digits int() refuses:
    # ValueError out of _header_count (from HEAD, PATCH and the creation answer) instead of Transient.
    Known("offset_superscript_digit", ValueError, "_header_count", "Upload-Offset: \u00b2".encode(), _headers),
    # Upload-Metadata's sha256 value with a non-ASCII character: base64.b64decode raises a plain ValueError,
    # not binascii.Error, out of _metadata_sha256 (the final HEAD of every upload).
    Known("metadata_not_ascii", ValueError, "_metadata_sha256", "Upload-Metadata: sha256 \u00e9".encode(), _headers),
    # A Location httpx cannot parse (a bad port, a control character): InvalidURL (not an httpx.HTTPError)
    # out of _create instead of Transient.
    Known("location_unparsable", httpx.InvalidURL, "_create", b'[[201, {"Location": "http://[::1"}, ""]]', _upload),
    # A Location that is not http(s) ("mailto:u", "http:") is taken as the upload's URL and handed to
    # on_created, so the agent keeps it and resumes there, failing, every time.
    Known("location_not_http", AssertionError, "_resumable", b'[[201, {"Location": "mailto:u"}, ""]]', _upload),
    # The same as fuzz_cloud's redirect_location_unparsable, on a tus request.
    Known(
        "redirect_location_unparsable",
        httpx.InvalidURL,
        "_redirect_url",
        b'[[302, {"Location": "mailto:u"}, ""]]',
        _upload,
    ),
    # An error body nested deeper than the json module recurses: RecursionError out of clips._brief (it
    # catches ValueError).
    Known(
        "deep_json_error_body",
        RecursionError,
        "_brief",
        b'[[201, {"Location": "/u"}, ""], [500, {}, "' + b"[" * 100_000 + b'"]]',
        _upload,
    ),
]


def answer(draw: Draw) -> httpx.Response:
    headers: list[tuple[bytes, bytes]] = []
    for _ in range(draw.below(5)):
        name = draw.pick(list(HEADERS))
        headers.append((name, draw.pick(HEADERS[name]).encode() if draw.below(6) else draw.blob(16)))
    if draw.below(3):  # tus answers mostly carry the headers that matter to them
        headers.append((b"Upload-Offset", draw.pick(OFFSETS[:5]).encode()))
        headers.append((b"Location", draw.pick(LOCATIONS[:3]).encode()))
        headers.append((b"Upload-Length", b"1000"))
    kind = draw.below(3)
    body = b"" if kind == 0 else draw.blob(64) if kind == 1 else json.dumps(json_value(draw, KEYS, STRINGS)).encode()
    return httpx.Response(draw.pick(STATUSES), headers=headers, content=body)


async def _attempt(answers: object, resume_url: str | None) -> clips.UploadResult | None:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(200, json={"access_token": "tok-0123456789", "expires_in": 600})
        assert callable(answers)
        response = answers(request)
        assert isinstance(response, httpx.Response)
        return response

    created: list[str] = []

    async def on_created(url: str) -> None:
        _resumable(url)
        created.append(url)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    uploader = ClipUploader(SECTION, "secret", "signing-secret", client=client, max_attempts=1, chunk_bytes=CHUNK)
    async with client, uploader:
        if resume_url == "terminate":
            await uploader.terminate("https://cloud.test/edge/clips/u-1")
            return None
        result = await uploader.upload(clip_file(), META, SHA256, resume_url=resume_url, on_created=on_created)
    assert result.size == SIZE
    assert result.sha256 == SHA256
    assert 0 <= result.resumed_from <= SIZE
    assert result.url in (*created, resume_url)
    assert result.already_complete == (result.resumed_from == SIZE)
    # a PATCH the cloud stored only part of is sent again from where it stopped: resent bytes count
    assert result.bytes_sent <= result.requests * CHUNK
    return result


def _resumable(url: str) -> None:
    parsed = httpx.URL(url)
    assert parsed.scheme in ("http", "https"), url
    assert parsed.host, url


def TestOneInput(data: bytes) -> None:
    draw = Draw(data)
    try:
        if draw.chance(4):
            _headers(draw.rest())
        else:
            check_upload(draw)
    except Exception as exc:
        if not tolerated(exc, [*KNOWN, *fuzz_cloud.KNOWN]):
            raise


def check_upload(draw: Draw) -> None:
    resume = draw.pick((None, None, "https://cloud.test/edge/clips/u-9", "terminate"))
    try:
        run(_attempt(lambda request: answer(draw), resume_url=resume))
    except Transient as exc:
        fuzz_cloud.transient(exc)
    except Permanent as exc:
        permanent(exc)


def permanent(exc: Permanent) -> None:
    assert exc.status is None or exc.status == clips.CHECKSUM_MISMATCH or 400 <= exc.status < 500


if __name__ == "__main__":
    quiet_logs()
    _harness.fuzz(TestOneInput, clips, sys.modules[__name__])

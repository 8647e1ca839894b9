"""Clip upload over tus against the sandbox cloud on loopback: whole clips, cut connections, an agent restart,
a wrong hash, token renewal, the bandwidth cap and garbled answers.

The sandbox is the oracle: what it stored (its clip store and received log) is checked, never the client's own
account. Every tus answer the uploader receives is checked against the cloud contract as it arrives (status
declared, the headers of a success present), so these tests also hold the contract to the sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agent.config import CloudSection
from agent.sandbox.faults import FaultRule
from agent.sandbox.server import SandboxServer
from agent.sync.clips import CHUNK_BYTES, ClipMetadata, ClipUploader, UploadResult
from agent.sync.cloud import sign
from agent.sync.delivery import Permanent, Transient

MIB = 1024 * 1024
PRESSED = datetime(2026, 3, 2, 15, 0, 12, tzinfo=UTC)
CONTRACT: dict[str, Any] = yaml.safe_load(
    resources.files("agent").joinpath("contracts", "cloud.openapi.yaml").read_text(encoding="utf-8")
)

Clip = tuple[Path, str]  # the file and its sha256


def metadata(highlight_id: str = "hl-1", filename: str = "clip.mp4") -> ClipMetadata:
    return ClipMetadata(
        highlight_id=highlight_id,
        court_id="c1",
        session_id="s-1",
        pressed_at=PRESSED,
        start_at=PRESSED.replace(second=2),
        trim_start_s=1.5,
        duration_s=30.0,
        triggered_by="button",
        filename=filename,
    )


@pytest.fixture
def clip(tmp_path: Path) -> Callable[[int], Clip]:
    """Random clip files (seeded: a failure can be replayed)."""

    def make(size: int, seed: int = 7) -> Clip:
        data = random.Random(seed).randbytes(size)
        path = tmp_path / f"clip-{seed}-{size}.mp4"
        path.write_bytes(data)
        return path, hashlib.sha256(data).hexdigest()

    return make


# -- the contract, as answers arrive ---------------------------------------------------------------------------


def _deref(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = CONTRACT
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


async def conform(response: httpx.Response) -> None:
    path = response.request.url.path
    if not path.startswith("/edge/clips/"):
        return
    template = "/edge/clips/" if path == "/edge/clips/" else "/edge/clips/{upload_id}"
    method = response.request.method
    operation = CONTRACT["paths"][template].get(method.lower())
    assert operation is not None, f"{method} {template} is not in the contract"
    declared = operation["responses"].get(str(response.status_code))
    assert declared is not None, f"{method} {template} answered {response.status_code}, not in its contract"
    declared = _deref(declared)
    if response.status_code < 300:
        missing = {name for name in declared.get("headers", {}) if name not in response.headers}
        assert not missing, f"{method} {template} {response.status_code} lacks {missing}"
    await response.aread()
    if "content" in declared and method != "HEAD":
        body = response.json()
        assert set(body) == {"error", "detail"}, body


# -- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture
async def server(sandbox_factory: Callable[..., Any]) -> SandboxServer:
    started: SandboxServer = await sandbox_factory()
    return started


@pytest.fixture
async def uploaders(server: SandboxServer) -> AsyncIterator[Callable[..., ClipUploader]]:
    """Open uploaders on the sandbox with short backoffs (STYLE 16); each with its own client, as after a restart."""
    stack: list[tuple[ClipUploader, httpx.AsyncClient]] = []

    def make(*, check: bool = True, **options: Any) -> ClipUploader:
        s = server.settings
        section = CloudSection(base_url=s.cloud_base_url, token_url=s.token_url, client_id=s.cloud_client_id)
        client = httpx.AsyncClient(event_hooks={"response": [conform]} if check else {})
        options = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05, **options}
        uploader = ClipUploader(section, s.cloud_client_secret, s.signing_secret, client=client, **options)
        stack.append((uploader, client))
        return uploader

    yield make
    for uploader, client in stack:
        await uploader.aclose()
        await client.aclose()


class Created:
    """What the caller would keep in SQLite: the upload URL given to on_created."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    async def __call__(self, url: str) -> None:
        self.urls.append(url)


async def upload(uploader: ClipUploader, clip: Clip, meta: ClipMetadata | None = None, **kw: Any) -> UploadResult:
    path, sha = clip
    kw.setdefault("resume_url", None)
    kw.setdefault("on_created", Created())
    async with uploader:
        return await uploader.upload(path, meta or metadata(), kw.pop("sha256", sha), **kw)


def stored(server: SandboxServer, highlight_id: str = "hl-1") -> list[dict[str, Any]]:
    return [u.public() for u in server.sandbox.clips if u.metadata.highlight_id == highlight_id]


def patches(server: SandboxServer) -> list[dict[str, Any]]:
    return [e for e in server.sandbox.log if e["kind"] == "call" and e["route"] == "cloud.clips.patch"]


def file_sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- tests -------------------------------------------------------------------------------------------------------


async def test_a_multi_megabyte_clip_arrives_whole_and_once(
    server: SandboxServer, uploaders: Callable[..., ClipUploader], clip: Callable[[int], Clip]
) -> None:
    path, sha = clip(5 * MIB + 123)
    created = Created()
    result = await upload(uploaders(), (path, sha), on_created=created)
    assert created.urls == [result.url]
    assert (result.size, result.sha256, result.resumed_from, result.retries) == (5 * MIB + 123, sha, 0, 0)
    assert result.bytes_sent == result.size
    assert result.requests == 1 + 21 + 1  # create, 21 chunks of 256 KiB (the last one short), the final HEAD

    [clip_] = stored(server)
    assert (clip_["status"], clip_["offset"], clip_["received_bytes"], clip_["sha256"]) == (
        "complete",
        result.size,
        result.size,
        sha,
    )
    assert file_sha(clip_["path"]) == sha
    assert clip_["metadata"] == {
        "highlight_id": "hl-1",
        "session_id": "s-1",
        "court_id": "c1",
        "pressed_at": "2026-03-02T15:00:12Z",
        "start_at": "2026-03-02T15:00:02Z",
        "trim_start_s": 1.5,
        "duration_s": 30.0,
        "triggered_by": "button",
        "sha256": sha,
        "filename": "clip.mp4",
    }
    async with httpx.AsyncClient(base_url=server.url) as admin:
        listed = (await admin.get("/_sandbox/clips", params={"status": "complete"})).json()
        assert [c["upload_id"] for c in listed["clips"]] == [clip_["upload_id"]]
        assert (await admin.get("/_sandbox/health")).json()["clips_complete"] == 1

    # The same clip again (an agent that lost the answer to its last PATCH): the cloud says it has it all.
    again = await upload(uploaders(), (path, sha))
    assert (again.url, again.already_complete, again.bytes_sent) == (result.url, True, 0)
    assert len(stored(server)) == 1


async def test_two_cut_connections_resume_where_they_stopped(
    server: SandboxServer, uploaders: Callable[..., ClipUploader], clip: Callable[[int], Clip]
) -> None:
    path, sha = clip(4 * MIB)
    cut = FaultRule(endpoint="cloud.clips.patch", kind="cut", count=2, after_bytes=100_000)
    armed: list[int] = []

    def arm_past_one_mib(entry: dict[str, Any]) -> None:
        # Cut mid-clip rather than at its first chunk, so that a restart from 0 could not pass for a resume.
        effect = entry.get("effect") or {}
        if not armed and entry.get("route") == "cloud.clips.patch" and effect.get("offset_to", 0) >= MIB:
            armed.append(effect["offset_to"])
            server.sandbox.faults.replace([cut])

    server.sandbox.listeners.append(arm_past_one_mib)
    result = await upload(uploaders(), (path, sha))

    [clip_] = stored(server)
    assert (clip_["status"], clip_["lost_patches"], clip_["discarded_bytes"]) == ("complete", 2, 200_000)
    assert clip_["received_bytes"] - clip_["discarded_bytes"] == clip_["length"]  # each byte stored once
    assert file_sha(clip_["path"]) == sha
    sent = [(e["fault"], e["effect"]["offset_from"]) for e in patches(server)]
    cut_at = armed[0]
    assert ("cut", cut_at) in sent
    assert sent.count(("cut", cut_at)) == 2
    assert (None, cut_at) in sent  # the same chunk again, not from 0
    offsets = [offset for _, offset in sent]
    assert offsets == sorted(offsets)
    assert (result.retries, result.resumed_from) == (2, 0)
    # Overhead: what the two cuts cost again, at most two chunks of 256 KiB.
    assert result.size < result.bytes_sent <= result.size + 2 * CHUNK_BYTES


async def test_a_restarted_agent_resumes_from_the_kept_url(
    server: SandboxServer, uploaders: Callable[..., ClipUploader], clip: Callable[[int], Clip]
) -> None:
    path, sha = clip(4 * MIB)
    kept = Created()  # stands for the row the agent writes to SQLite
    half = asyncio.Event()

    def watch(entry: dict[str, Any]) -> None:
        if entry.get("route") == "cloud.clips.patch" and (entry.get("effect") or {}).get("offset_to", 0) >= 2 * MIB:
            half.set()

    server.sandbox.listeners.append(watch)
    first = asyncio.create_task(upload(uploaders(max_bytes_per_s=8 * MIB), (path, sha), on_created=kept))
    halfway = asyncio.create_task(half.wait())
    await asyncio.wait({first, halfway}, return_when=asyncio.FIRST_COMPLETED)
    halfway.cancel()
    assert not first.done(), first  # an upload that failed or ended early stops the test here, not at its deadline
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    [receiving] = server.sandbox.clips
    async with receiving.lock:  # the cancelled PATCH, if the sandbox was still reading it, has been judged
        interrupted = receiving.offset
    assert 2 * MIB <= interrupted < 4 * MIB

    again = Created()
    result = await upload(uploaders(), (path, sha), resume_url=kept.urls[0], on_created=again)
    assert again.urls == []  # resumed, not created again
    assert result.url == kept.urls[0]
    assert result.resumed_from >= interrupted
    assert result.bytes_sent <= result.size - result.resumed_from
    [clip_] = stored(server)
    assert clip_["status"] == "complete"
    assert clip_["received_bytes"] - clip_["discarded_bytes"] == clip_["length"]
    assert file_sha(clip_["path"]) == sha
    creations = [e for e in server.sandbox.log if e["kind"] == "call" and e["route"] == "cloud.clips.create"]
    assert len(creations) == 1


async def test_a_wrong_sha256_is_refused_clearly(
    server: SandboxServer, uploaders: Callable[..., ClipUploader], clip: Callable[[int], Clip]
) -> None:
    path, sha = clip(MIB + 5)
    wrong = hashlib.sha256(b"another clip").hexdigest()
    with pytest.raises(Permanent) as refused:
        await upload(uploaders(), (path, sha), sha256=wrong)
    assert refused.value.status == 460
    assert f"the file's sha256 is {sha}, but {wrong} was declared" in refused.value.reason
    [rejected] = stored(server)
    assert rejected["status"] == "rejected"
    assert rejected["reason"] == f"the clip's sha256 is {sha}, its Upload-Metadata says {wrong}"
    assert rejected["path"] is None

    # The rejected upload frees its highlight: the right hash goes through as a fresh upload.
    result = await upload(uploaders(), (path, sha))
    assert result.resumed_from == 0
    assert [c["status"] for c in stored(server)] == ["rejected", "complete"]


async def test_a_401_renews_the_token_once(server: SandboxServer, clip: Callable[[int], Clip]) -> None:
    path, sha = clip(MIB)
    s = server.settings
    section = CloudSection(base_url=s.cloud_base_url, token_url=s.token_url, client_id=s.cloud_client_id)
    server.sandbox.faults.replace([FaultRule(endpoint="cloud.clips.patch", kind="401", count=1)])
    async with httpx.AsyncClient(event_hooks={"response": [conform]}) as client:
        uploader = ClipUploader(section, s.cloud_client_secret, s.signing_secret, client=client)
        result = await upload(uploader, (path, sha))
        assert (result.retries, len(server.sandbox.tokens)) == (0, 2)  # renewed, not counted as a failure
        assert stored(server)[0]["status"] == "complete"

        # A token refused even fresh is an operator's problem: transient, said plainly, and bounded.
        server.sandbox.faults.replace([FaultRule(endpoint="cloud.clips.create", kind="401", rate=1)])
        uploader = ClipUploader(
            section, s.cloud_client_secret, s.signing_secret, client=client, max_attempts=2, backoff_base_s=0.01
        )
        with pytest.raises(Transient, match="gave up after 2 failed attempts; last: cloud refused a fresh token"):
            await upload(uploader, (path, sha), meta=metadata("hl-2"))


async def test_the_bandwidth_cap_holds(
    server: SandboxServer, uploaders: Callable[..., ClipUploader], clip: Callable[[int], Clip]
) -> None:
    path, sha = clip(2 * MIB)
    cap = 1 * MIB
    started = time.perf_counter()
    result = await upload(uploaders(max_bytes_per_s=cap), (path, sha))
    rate = result.bytes_sent / (time.perf_counter() - started)
    assert 0.85 * cap <= rate <= 1.02 * cap, f"{rate / cap:.3f} of the cap"
    assert stored(server)[0]["status"] == "complete"


async def test_garbled_answers_are_a_clear_transient_error(
    server: SandboxServer, uploaders: Callable[..., ClipUploader], clip: Callable[[int], Clip]
) -> None:
    path, sha = clip(2 * MIB)
    # A garbled answer to the creation: it acted, and the retry finds the upload instead of making a second.
    server.sandbox.faults.replace([FaultRule(endpoint="cloud.clips.create", kind="garbage", count=1)])
    result = await upload(uploaders(check=False), (path, sha))
    assert result.retries == 1
    assert len(stored(server)) == 1

    server.sandbox.faults.replace([FaultRule(endpoint="cloud.clips.patch", kind="garbage", rate=1)])
    with pytest.raises(Transient) as caught:
        await upload(uploaders(check=False, max_attempts=3), (path, sha), meta=metadata("hl-2"))
    reason = caught.value.reason
    assert reason.startswith("clip hl-2: gave up after 3 failed attempts; last: sending clip hl-2 at ")
    assert reason.endswith("HTTP 200 without a valid Upload-Offset (not a tus answer)")
    # Every garbled PATCH acted; each retry asked where the upload stood and went on from there.
    [partial] = stored(server, "hl-2")
    assert (partial["offset"], partial["discarded_bytes"]) == (3 * CHUNK_BYTES, 0)


async def test_the_sandbox_speaks_tus_as_its_contract_says(server: SandboxServer, clip: Callable[[int], Clip]) -> None:
    path, sha = clip(1000)
    data = path.read_bytes()
    async with httpx.AsyncClient(base_url=server.url, event_hooks={"response": [conform]}) as http:
        s = server.settings
        form = {
            "grant_type": "client_credentials",
            "client_id": s.cloud_client_id,
            "client_secret": s.cloud_client_secret,
        }
        bearer = (await http.post(s.token_url, data=form)).json()["access_token"]
        tus = {"Tus-Resumable": "1.0.0", "Authorization": f"Bearer {bearer}"}
        chunk = {**tus, "Content-Type": "application/offset+octet-stream"}

        def checksum(body: bytes) -> str:
            return "sha256 " + base64.b64encode(hashlib.sha256(body).digest()).decode()

        def signed(body: bytes, secret: str = s.signing_secret) -> dict[str, str]:
            stamp = int(time.time())
            return {"X-Timestamp": str(stamp), "X-Signature": sign(secret.encode(), stamp, body)}

        caps = await http.options("/edge/clips/")
        assert (caps.status_code, caps.headers["Tus-Version"], caps.headers["Tus-Checksum-Algorithm"]) == (
            204,
            "1.0.0",
            "sha256",
        )
        assert caps.headers["Tus-Extension"] == "creation,checksum,termination"
        meta = {"Upload-Length": str(len(data)), "Upload-Metadata": metadata().header(sha)}
        assert (await http.post("/edge/clips/", headers={"Tus-Resumable": "1.0.0", **meta})).status_code == 401
        assert (await http.post("/edge/clips/", headers={**tus, **meta, "Tus-Resumable": "0.2.2"})).status_code == 412
        for bad in (metadata().header(sha) + ",color cmVk", "highlight_id aGw=", "highlight_id !!"):
            refused = await http.post("/edge/clips/", headers={**tus, **meta, "Upload-Metadata": bad})
            assert (refused.status_code, refused.json()["error"]) == (400, "invalid_metadata")
        too_big = await http.post("/edge/clips/", headers={**tus, **meta, "Upload-Length": str(1 << 40)})
        assert too_big.status_code == 413

        created = await http.post("/edge/clips/", headers={**tus, **meta})
        assert created.status_code == 201
        url = created.headers["Location"]
        # Every chunk is signed (DESIGN 2.3), so one cut short keeps nothing: a part cannot be checked.
        server.sandbox.faults.replace([FaultRule(endpoint="cloud.clips.patch", kind="cut", count=1, after_bytes=300)])
        async with httpx.AsyncClient() as raw:
            with pytest.raises(httpx.TransportError):
                await raw.patch(url, content=data, headers={**chunk, **signed(data), "Upload-Offset": "0"})
        head = await http.head(url, headers=tus)
        assert (head.headers["Upload-Offset"], head.headers["Upload-Length"]) == ("0", "1000")
        for forged in ({}, signed(data[:300], secret="not the secret"), signed(b"another body")):
            refused = await http.patch(url, content=data[:300], headers={**chunk, **forged, "Upload-Offset": "0"})
            assert (refused.status_code, refused.json()["error"]) == (401, "bad_signature")
        first = {**chunk, **signed(data[:300]), "Upload-Offset": "0"}
        assert (await http.patch(url, content=data[:300], headers=first)).headers["Upload-Offset"] == "300"
        stale = await http.patch(url, content=data[:100], headers={**chunk, **signed(data[:100]), "Upload-Offset": "0"})
        assert (stale.status_code, stale.headers["Upload-Offset"]) == (409, "300")
        damaged = {**chunk, **signed(data[300:600]), "Upload-Offset": "300", "Upload-Checksum": checksum(b"not this")}
        assert (await http.patch(url, content=data[300:600], headers=damaged)).status_code == 460
        plain = {**tus, "Content-Type": "application/octet-stream", "Upload-Offset": "300"}
        assert (await http.patch(url, content=data[300:], headers=plain)).status_code == 415
        good = {**chunk, **signed(data[300:600]), "Upload-Offset": "300", "Upload-Checksum": checksum(data[300:600])}
        assert (await http.patch(url, content=data[300:600], headers=good)).headers["Upload-Offset"] == "600"
        # The same highlight again: the upload that exists, where it stands; another clip for it: a conflict.
        again = await http.post("/edge/clips/", headers={**tus, **meta})
        assert (again.status_code, again.headers["Location"], again.headers["Upload-Offset"]) == (200, url, "600")
        other = {**meta, "Upload-Metadata": metadata().header("0" * 64)}
        assert (await http.post("/edge/clips/", headers={**tus, **other})).status_code == 409

        assert (await http.delete(url, headers=tus)).status_code == 204
        assert (await http.head(url, headers=tus)).status_code == 410
        late = {**chunk, **signed(b"x"), "Upload-Offset": "600"}
        assert (await http.patch(url, content=b"x", headers=late)).status_code == 410
        assert (await http.head(url.rsplit("/", 1)[0] + "/" + "0" * 32, headers=tus)).status_code == 404
        assert [u.status for u in server.sandbox.clips] == ["terminated"]

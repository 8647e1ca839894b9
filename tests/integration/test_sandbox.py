"""The sandbox cloud over real loopback HTTP: Ziggy, the token endpoint, the member feed, the event inbox, every
fault kind, the oracle, the CLI, and conformance with the OpenAPI contracts it publishes.

Every response a test receives through the `http` fixture is validated against the contracts' response schemas
as it arrives, so each error case below is also a conformance check. Signatures are computed here with hmac
directly, not with the sandbox's own helper, so the formula is checked rather than assumed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from agent.sandbox import ZIGGY_PREFIX, SandboxOptions, SandboxServer, load_plan_file, make_app
from agent.sandbox.events import EVENT_TYPES
from agent.sandbox.members import seeded_members
from agent.store.members import MemberRecord

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).with_name("club-agent")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "agent.cli"]
T0 = "2026-03-02T15:00:00Z"

# -- the contracts ------------------------------------------------------------------------------------------------


def _load(name: str) -> dict[str, Any]:
    text = resources.files("agent").joinpath("contracts", name).read_text(encoding="utf-8")
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


class Contracts:
    """Both OpenAPI documents, addressed by the sandbox's own paths (Ziggy's are mounted under its prefix)."""

    def __init__(self) -> None:
        self.docs = {"cloud": _load("cloud.openapi.yaml"), "ziggy": _load("ziggy.openapi.yaml")}
        self.prefix = {"cloud": "", "ziggy": ZIGGY_PREFIX}
        self.validated: set[tuple[str, str, int]] = set()
        routes = []
        for name, doc in self.docs.items():
            for template in doc["paths"]:
                full = self.prefix[name] + template
                pattern = re.compile("^" + "[^/]+".join(map(re.escape, re.split(r"\{[^/}]+\}", full))) + "$")
                routes.append((full.count("{"), pattern, full, name, template))
        self.routes = sorted(routes, key=lambda r: r[0])  # literal paths win: sessions/active before {session_id}

    def operations(self) -> set[tuple[str, str]]:
        return {
            (self.prefix[name] + template, method.upper())
            for name, doc in self.docs.items()
            for template, item in doc["paths"].items()
            for method in item
            if method in ("get", "head", "options", "post", "put", "patch", "delete")
        }

    def find(self, method: str, path: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
        for _, pattern, full, name, template in self.routes:
            if pattern.match(path):
                operation = self.docs[name]["paths"][template].get(method.lower())
                assert operation is not None, f"{method} {full} is not in the {name} contract"
                return full, self.docs[name], operation
        raise AssertionError(f"{method} {path} is in no contract")

    @staticmethod
    def _deref(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node and len(node) == 1:
            target: Any = doc
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    @staticmethod
    def validator(doc: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
        return Draft202012Validator(
            {**schema, "components": doc["components"]}, format_checker=Draft202012Validator.FORMAT_CHECKER
        )

    def check_response(self, method: str, path: str, status: int, content_type: str, body: bytes) -> None:
        full, doc, operation = self.find(method, path)
        declared = operation["responses"].get(str(status))
        assert declared is not None, f"{method} {full} answered {status}, which its contract does not declare"
        declared = self._deref(doc, declared)
        if "content" not in declared or method.upper() == "HEAD":  # tus answers (201, 204, HEAD) have no body
            assert not body, f"{method} {full} {status} has a body its contract does not declare"
            self.validated.add((full, method.upper(), status))
            return
        media = declared["content"]
        assert content_type.split(";")[0].strip() in media, f"{method} {full} {status}: {content_type}"
        schema = media["application/json"]["schema"]
        errors = list(self.validator(doc, schema).iter_errors(json.loads(body)))
        assert not errors, f"{method} {full} {status}: {[e.message for e in errors]}"
        self.validated.add((full, method.upper(), status))

    def check_request(self, method: str, path: str, body: Any) -> None:
        full, doc, operation = self.find(method, path)
        schema = next(iter(operation["requestBody"]["content"].values()))["schema"]
        errors = list(self.validator(doc, schema).iter_errors(body))
        assert not errors, f"request to {method} {full}: {[e.message for e in errors]}"


CONTRACTS = Contracts()

# -- fixtures and helpers -----------------------------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[SandboxServer]:
    options = SandboxOptions(members=50, seed=3, courts={"c1": "Quadra 1"})
    async with SandboxServer(options, port=0) as running:
        yield running


async def _conform(response: httpx.Response) -> None:
    path = response.request.url.path
    if path.startswith("/_sandbox/"):
        return
    try:
        CONTRACTS.find(response.request.method, path)
    except AssertionError:
        return  # a route or method no contract has (a test's deliberate typo): the routes test covers the rest
    await response.aread()
    CONTRACTS.check_response(
        response.request.method, path, response.status_code, response.headers.get("content-type", ""), response.content
    )


@pytest.fixture
async def http(server: SandboxServer) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose every non-admin response is checked against the contracts as it arrives."""
    async with httpx.AsyncClient(base_url=server.url, timeout=5, event_hooks={"response": [_conform]}) as client:
        yield client


@pytest.fixture
async def raw(server: SandboxServer) -> AsyncIterator[httpx.AsyncClient]:
    """A client that checks nothing: faulted answers (garbage, no answer) are meant to break the contract."""
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        yield client


def zheaders(server: SandboxServer, key: str | None = None) -> dict[str, str]:
    s = server.settings
    headers = {"Authorization": f"Bearer {s.ziggy_api_key}", "X-Client-Id": s.ziggy_client_id}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


def z(path: str) -> str:
    return ZIGGY_PREFIX + path


def checkin_body(user: str = "m-000001", court: str = "c1", at: str = T0) -> dict[str, Any]:
    return {"user_id": user, "court_id": court, "timestamp": at}


def line_body(session_id: str, quantity: int = 3, unit: float = 0.1, total: float = 0.3) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "item_id": "agua-500",
        "item_name": "Água 500 ml",
        "quantity": quantity,
        "unit_price": unit,
        "total_price": total,
    }


async def token(http: httpx.AsyncClient, server: SandboxServer) -> str:
    s = server.settings
    answer = await http.post(
        s.token_url,
        data={
            "grant_type": "client_credentials",
            "client_id": s.cloud_client_id,
            "client_secret": s.cloud_client_secret,
        },
    )
    assert answer.status_code == 200, answer.text
    value: str = answer.json()["access_token"]
    return value


def signed(
    server: SandboxServer, body: bytes, timestamp: float | None = None, secret: str | None = None
) -> dict[str, str]:
    stamp = str(int(server.sandbox.clock.now() if timestamp is None else timestamp))
    key = (secret or server.settings.signing_secret).encode()
    signature = hmac.new(key, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Timestamp": stamp, "X-Signature": signature, "Content-Type": "application/json"}


def event(seq: int, kind: str = "session.started", **overrides: Any) -> dict[str, Any]:
    value = {
        "event_id": str(uuid.uuid4()),
        "seq": seq,
        "type": kind,
        "occurred_at": "2026-03-02T15:00:00.000+00:00",
        "mono_ns": 1_000_000 * seq,
        "boot_id": "5f1c7f55-1b0e-4f0b-9d1c-3a8f0b2d4e6f",
        "clock_synced": True,
        "session_id": "s-local-1",
        "data": {"court_id": "c1", "member_id": "m-000001"},
    }
    value.update(overrides)
    return value


async def post_events(
    http: httpx.AsyncClient, server: SandboxServer, bearer: str, events: list[Any], device: str = "edge-01"
) -> httpx.Response:
    body = json.dumps({"device_id": device, "events": events}).encode()
    return await http.post(
        "/edge/events", content=body, headers={"Authorization": f"Bearer {bearer}", **signed(server, body)}
    )


async def received(http: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    answer = await http.get("/_sandbox/received", params=params)
    assert answer.status_code == 200
    entries: list[dict[str, Any]] = answer.json()["entries"]
    return entries


async def set_faults(http: httpx.AsyncClient, plan: Any) -> dict[str, Any]:
    answer = await http.put("/_sandbox/faults", json=plan)
    assert answer.status_code == 200, answer.text
    described: dict[str, Any] = answer.json()
    return described


async def members_page(
    http: httpx.AsyncClient, bearer: str, cursor: str | None = None, limit: int | None = None
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if cursor is not None:
        params["cursor"] = cursor
    if limit is not None:
        params["limit"] = limit
    answer = await http.get("/edge/members", params=params, headers={"Authorization": f"Bearer {bearer}"})
    assert answer.status_code == 200, answer.text
    page: dict[str, Any] = answer.json()
    return page


async def pull_all(
    http: httpx.AsyncClient, bearer: str, cursor: str | None = None, limit: int = 1000
) -> dict[str, Any]:
    """Follow next_cursor to the end: every member and tombstone, the final cursor, and how many pages it took."""
    members: list[dict[str, Any]] = []
    tombstones: list[str] = []
    pages = 0
    while True:
        page = await members_page(http, bearer, cursor, limit)
        pages += 1
        members += page["members"]
        tombstones += page["tombstones"]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return {"members": members, "tombstones": tombstones, "cursor": cursor, "pages": pages}


# -- Ziggy ----------------------------------------------------------------------------------------------------------


async def test_ziggy_session_lifecycle_with_exact_money(http: httpx.AsyncClient, server: SandboxServer) -> None:
    h = zheaders(server)
    answer = await http.post(z("/access/checkin"), json=checkin_body(), headers=h)
    assert answer.status_code == 200
    started = answer.json()
    assert started == {
        "session_id": "zg-1",
        "checked_in_at": "2026-03-02T15:00:00.000Z",
        "court": {"id": "c1", "name": "Quadra 1"},
    }
    other = await http.post(z("/access/checkin"), json=checkin_body("m-000002", "c2"), headers=h)
    assert other.json()["court"] == {"id": "c2", "name": "Quadra c2"}

    active = (await http.get(z("/access/sessions/active"), headers=h)).json()
    assert [s["session_id"] for s in active] == ["zg-1", "zg-2"]
    mine = (await http.get(z("/access/sessions/active"), params={"user_id": "m-000001"}, headers=h)).json()
    assert [(s["session_id"], s["status"], s["checked_out_at"]) for s in mine] == [("zg-1", "active", None)]

    # 3 x 0.10 is 0.30 here, as money must be (as floats it would be 0.30000000000000004)
    line = await http.post(z("/consumption/record"), json=line_body("zg-1"), headers=h)
    assert line.status_code == 201
    assert line.json()["id"] == "zc-1"
    assert line.json()["total_price"] == 0.3
    await http.post(z("/consumption/record"), json=line_body("zg-1", 2, 12.5, 25), headers=h)
    lines = (await http.get(z("/consumption/zg-1"), headers=h)).json()
    assert [(x["id"], x["quantity"], x["total_price"]) for x in lines] == [("zc-1", 3, 0.3), ("zc-2", 2, 25)]

    out = await http.post(
        z("/access/checkout"), json={"session_id": "zg-1", "timestamp": "2026-03-02T16:30:59Z"}, headers=h
    )
    assert out.status_code == 200
    assert out.json() == {
        "session_id": "zg-1",
        "checked_out_at": "2026-03-02T16:30:59.000Z",
        "duration_minutes": 90,
        "consumption_total": 25.3,
    }
    closed = (await http.get(z("/access/sessions/zg-1"), headers=h)).json()
    assert (closed["status"], closed["duration_minutes"], closed["consumption_total"]) == ("closed", 90, 25.3)
    assert [s["session_id"] for s in (await http.get(z("/access/sessions/active"), headers=h)).json()] == ["zg-2"]

    # Without a timestamp Ziggy checks out at its own time; the oracle saw each effect once, in order.
    assert (await http.post(z("/access/checkout"), json={"session_id": "zg-2"}, headers=h)).status_code == 200
    calls = await received(http, kind="call")
    assert [(c["route"], c["acted"]) for c in calls] == [
        ("ziggy.checkin", True),
        ("ziggy.checkin", True),
        ("ziggy.consumption.record", True),
        ("ziggy.consumption.record", True),
        ("ziggy.checkout", True),
        ("ziggy.checkout", True),
    ]
    assert calls[0]["effect"] == {"session_id": "zg-1", "user_id": "m-000001", "court_id": "c1"}


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing 'Authorization"),
        ({"Authorization": "Bearer wrong", "X-Client-Id": "club-001-edge"}, "invalid API key"),
        ({"Authorization": "Bearer sandbox-ziggy-api-key"}, "missing X-Client-Id"),
        ({"Authorization": "Bearer sandbox-ziggy-api-key", "X-Client-Id": "someone-else"}, "unknown X-Client-Id"),
    ],
)
async def test_ziggy_checks_key_and_client_id(http: httpx.AsyncClient, headers: dict[str, str], detail: str) -> None:
    for answer in (
        await http.post(z("/access/checkin"), json=checkin_body(), headers=headers),
        await http.get(z("/access/sessions/active"), headers=headers),
    ):
        assert answer.status_code == 401
        assert answer.json()["error"] == "unauthorized"
        assert detail in answer.json()["detail"]
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert [c["acted"] for c in await received(http)] == [False]


async def test_ziggy_refuses_what_real_ziggy_would(http: httpx.AsyncClient, server: SandboxServer) -> None:
    h = zheaders(server)

    async def post(path: str, body: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
        answer = await http.post(z(path), json=body, headers=h, **kw)
        return answer.status_code, answer.json()

    assert (await post("/access/checkin", checkin_body()))[0] == 200
    status, body = await post("/access/checkin", checkin_body(court="c2"))
    assert (status, body["error"], body["session_id"]) == (409, "already_checked_in", "zg-1")
    # the agent's own session id means nothing to Ziggy
    for path in ("/access/sessions/s-local-1", "/consumption/s-local-1"):
        missing = await http.get(z(path), headers=h)
        assert (missing.status_code, missing.json()["error"]) == (404, "session_not_found")
    assert (await post("/access/checkout", {"session_id": "s-local-1"}))[1]["error"] == "session_not_found"
    assert (await post("/consumption/record", line_body("s-local-1")))[0] == 404
    status, body = await post("/consumption/record", line_body("zg-1", 2, 12.4, 25))
    assert (status, body["error"]) == (422, "total_mismatch")
    assert "24.80" in body["detail"]
    status, body = await post("/access/checkout", {"session_id": "zg-1", "timestamp": "2026-03-02T14:00:00Z"})
    assert (status, body["error"]) == (422, "checkout_before_checkin")
    assert (await post("/access/checkout", {"session_id": "zg-1"}))[0] == 200
    assert (await post("/access/checkout", {"session_id": "zg-1"}))[1]["error"] == "session_closed"
    assert (await post("/consumption/record", line_body("zg-1")))[1]["error"] == "session_closed"

    # strict bodies: each problem named
    bad = [
        ({**checkin_body(), "member_id": "x"}, "member_id: unknown field"),
        ({"user_id": "m-1", "court_id": "c1"}, "timestamp: required"),
        (checkin_body(at="2026-03-02T15:00:00"), "UTC offset"),
        (checkin_body(court="c 1"), "court_id"),
        ({**checkin_body(), "user_id": 7}, "user_id"),
    ]
    for payload, detail in bad:
        status, body = await post("/access/checkin", payload)
        assert (status, body["error"]) == (422, "invalid_body"), payload
        assert detail in body["detail"], body
    for payload in (line_body("zg-1", True), line_body("zg-1", 0), {**line_body("zg-1"), "unit_price": "0.1"}):
        assert (await post("/consumption/record", payload))[0] == 422

    not_json = await http.post(
        z("/access/checkin"), content=b'{"user_id": ', headers={**h, "Content-Type": "application/json"}
    )
    assert (not_json.status_code, not_json.json()["error"]) == (400, "invalid_json")
    dup = await http.post(
        z("/access/checkin"),
        content=b'{"user_id":"a","user_id":"b","court_id":"c1","timestamp":"2026-03-02T15:00:00Z"}',
        headers={**h, "Content-Type": "application/json"},
    )
    assert dup.status_code == 400
    assert "duplicate key" in dup.json()["detail"]
    form = await http.post(z("/access/checkin"), data={"user_id": "x"}, headers=h)
    assert (form.status_code, form.json()["error"]) == (415, "unsupported_media_type")
    big = await http.post(z("/access/checkin"), json={"user_id": "x" * 70_000}, headers=h)
    assert (big.status_code, big.json()["error"]) == (413, "payload_too_large")
    unknown_query = await http.get(z("/access/sessions/active"), params={"user": "m-1"}, headers=h)
    assert (unknown_query.status_code, unknown_query.json()["error"]) == (400, "invalid_query")

    # unknown routes and methods answer JSON too
    assert (await http.get(z("/access/nowhere"), headers=h)).json()["error"] == "not_found"
    wrong_method = await http.get(z("/access/checkin"), headers=h)
    assert (wrong_method.status_code, wrong_method.headers["Allow"]) == (405, "POST")


async def test_ziggy_idempotency_replays_and_forgets_after_a_day(
    http: httpx.AsyncClient, server: SandboxServer
) -> None:
    first = await http.post(z("/access/checkin"), json=checkin_body(), headers=zheaders(server, "ev-1"))
    again = await http.post(z("/access/checkin"), json=checkin_body(), headers=zheaders(server, "ev-1"))
    assert again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    # key order and spacing do not make a different request
    reordered = json.dumps({"timestamp": T0, "court_id": "c1", "user_id": "m-000001"}, indent=2)
    replay = await http.post(
        z("/access/checkin"),
        content=reordered,
        headers={**zheaders(server, "ev-1"), "Content-Type": "application/json"},
    )
    assert replay.json() == first.json()
    reused = await http.post(z("/access/checkin"), json=checkin_body(court="c2"), headers=zheaders(server, "ev-1"))
    assert (reused.status_code, reused.json()["error"]) == (422, "idempotency_key_reused")
    too_long = await http.post(z("/access/checkin"), json=checkin_body(), headers=zheaders(server, "k" * 256))
    assert (too_long.status_code, too_long.json()["error"]) == (400, "invalid_idempotency_key")

    # a refusal is not stored: after the checkout, the same key is judged afresh
    refused = await http.post(z("/access/checkin"), json=checkin_body(court="c2"), headers=zheaders(server, "ev-2"))
    assert refused.status_code == 409
    await http.post(z("/access/checkout"), json={"session_id": "zg-1"}, headers=zheaders(server, "ev-3"))
    retried = await http.post(z("/access/checkin"), json=checkin_body(court="c2"), headers=zheaders(server, "ev-2"))
    assert (retried.status_code, retried.json()["session_id"]) == (200, "zg-2")

    # a day of sandbox time later the key is forgotten and the same call acts again: why the agent must first
    # ask sessions/active before retrying anything older than that
    line = await http.post(z("/consumption/record"), json=line_body("zg-2"), headers=zheaders(server, "ev-4"))
    assert (await http.post("/_sandbox/clock", json={"advance_s": 86_399})).status_code == 200
    kept = await http.post(z("/consumption/record"), json=line_body("zg-2"), headers=zheaders(server, "ev-4"))
    assert kept.json()["id"] == line.json()["id"] == "zc-1"
    await http.post("/_sandbox/clock", json={"advance_s": 1})
    forgotten = await http.post(z("/consumption/record"), json=line_body("zg-2"), headers=zheaders(server, "ev-4"))
    assert forgotten.json()["id"] == "zc-2"

    calls = await received(http, route="ziggy.checkin")
    assert [(c["status"], c["acted"], c["replayed"]) for c in calls] == [
        (200, True, False),
        (200, False, True),
        (200, False, True),
        (422, False, False),
        (400, False, False),
        (409, False, False),
        (200, True, False),
    ]


# -- tokens ---------------------------------------------------------------------------------------------------------


async def test_token_issue_expiry_and_refusals(http: httpx.AsyncClient, server: SandboxServer) -> None:
    s = server.settings
    issued = await http.post(
        s.token_url,
        data={
            "grant_type": "client_credentials",
            "client_id": s.cloud_client_id,
            "client_secret": s.cloud_client_secret,
        },
    )
    body = issued.json()
    assert (body["token_type"], body["expires_in"]) == ("Bearer", 300)
    assert issued.headers["Cache-Control"] == "no-store"
    basic = base64.b64encode(f"{s.cloud_client_id}:{s.cloud_client_secret}".encode()).decode()
    by_basic = await http.post(
        s.token_url, data={"grant_type": "client_credentials"}, headers={"Authorization": f"Basic {basic}"}
    )
    assert by_basic.status_code == 200
    assert by_basic.json()["access_token"] != body["access_token"]

    refusals = [
        (
            {"grant_type": "client_credentials", "client_id": s.cloud_client_id, "client_secret": "nope"},
            401,
            "invalid_client",
        ),
        (
            {"grant_type": "client_credentials", "client_id": "intruder", "client_secret": s.cloud_client_secret},
            401,
            "invalid_client",
        ),
        ({"grant_type": "password", "client_id": s.cloud_client_id}, 400, "unsupported_grant_type"),
        ({"client_id": s.cloud_client_id}, 400, "invalid_request"),
    ]
    for form, status, code in refusals:
        answer = await http.post(s.token_url, data=form)
        assert (answer.status_code, answer.json()["error"]) == (status, code)
        assert answer.json()["error_description"]
    as_json = await http.post(s.token_url, json={"grant_type": "client_credentials"})
    assert as_json.status_code == 415
    wrong_realm = await http.post(
        "/realms/other/protocol/openid-connect/token", data={"grant_type": "client_credentials"}
    )
    assert (wrong_realm.status_code, wrong_realm.json()["error"]) == (404, "realm_not_found")

    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    assert (await http.get("/edge/members", headers=bearer)).status_code == 200
    await http.post("/_sandbox/clock", json={"advance_s": 299})
    assert (await http.get("/edge/members", headers=bearer)).status_code == 200
    await http.post("/_sandbox/clock", json={"advance_s": 2})
    expired = await http.get("/edge/members", headers=bearer)
    assert (expired.status_code, expired.json()["error"]) == (401, "token_expired")
    unknown = await http.get("/edge/members", headers={"Authorization": "Bearer made-up"})
    assert unknown.json()["error"] == "invalid_token"
    assert (await http.get("/edge/members")).json()["error"] == "unauthorized"
    fresh = await token(http, server)
    assert (await http.get("/edge/members", headers={"Authorization": f"Bearer {fresh}"})).status_code == 200


# -- members ---------------------------------------------------------------------------------------------------------


async def test_members_page_with_cursors_and_are_valid_records(http: httpx.AsyncClient, server: SandboxServer) -> None:
    bearer = await token(http, server)
    first = await members_page(http, bearer, limit=20)
    assert len(first["members"]) == 20
    assert first["has_more"]
    assert first["tombstones"] == []
    everything = await pull_all(http, bearer, limit=20)
    assert everything["pages"] == 3
    ids = [m["member_id"] for m in everything["members"]]
    assert ids == [f"m-{i:06d}" for i in range(1, 51)]
    records = [MemberRecord.model_validate(m) for m in everything["members"]]  # what the agent's cache reads
    cards = [card for r in records for card in r.cards]
    assert len(cards) == len(set(cards))
    assert all(re.fullmatch(r"04[0-9A-F]{12}", c) for c in cards)
    assert {r.status.value for r in records} <= {"active", "suspended", "expired"}
    # the last cursor is a resting point: nothing new, nothing more
    rest = await members_page(http, bearer, everything["cursor"])
    assert (rest["members"], rest["tombstones"], rest["has_more"]) == ([], [], False)
    assert rest["next_cursor"] == everything["cursor"]
    # seeded members are the same on every machine for the same seed, different for another
    assert seeded_members(50, 3) == seeded_members(50, 3)
    assert seeded_members(5, 3)[0][1].json == json.dumps(
        everything["members"][0], ensure_ascii=False, separators=(",", ":")
    )
    assert seeded_members(5, 4)[0][1].json != seeded_members(5, 3)[0][1].json

    h = {"Authorization": f"Bearer {bearer}"}
    for params, code in [
        ({"limit": 0}, "invalid_query"),
        ({"limit": 5001}, "invalid_query"),
        ({"limit": "ten"}, "invalid_query"),
        ({"since": "x"}, "invalid_query"),
        ({"cursor": "not-a-cursor"}, "invalid_cursor"),
    ]:
        answer = await http.get("/edge/members", params=params, headers=h)
        assert (answer.status_code, answer.json()["error"]) == (400, code), params


async def test_members_deltas_tombstones_and_moves(http: httpx.AsyncClient, server: SandboxServer) -> None:
    bearer = await token(http, server)
    synced = await pull_all(http, bearer)
    by_id = {m["member_id"]: m for m in synced["members"]}
    stolen_card = by_id["m-000007"]["cards"][0]

    change = {
        "upsert": [
            {**by_id["m-000003"], "first_name": "Renamed", "credits": 9},
            {"member_id": "m-new", "first_name": "Nova", "cards": [stolen_card.lower()], "member_code": "100010"},
        ],
        "delete": ["m-000005", "m-unknown"],
    }
    answer = await http.post("/_sandbox/members", json=change)
    assert answer.json() == {"upserted": 2, "deleted": 1, "missing": ["m-unknown"], "members": 50}

    delta = await pull_all(http, bearer, synced["cursor"])
    changed = {m["member_id"]: m for m in delta["members"]}
    # m-000007 lost its card and m-000010 its member code to m-new: both changed too
    assert set(changed) == {"m-000003", "m-new", "m-000007", "m-000010"}
    assert delta["tombstones"] == ["m-000005"]
    assert changed["m-000003"]["first_name"] == "Renamed"
    assert changed["m-000003"]["credits"] == 9
    assert changed["m-new"]["cards"] == [stolen_card]
    assert stolen_card not in changed["m-000007"]["cards"]
    assert changed["m-000010"]["member_code"] is None
    assert (await pull_all(http, bearer, delta["cursor"]))["members"] == []

    # changed twice between pulls: sent once, newest; deleted then re-created: an upsert, not a tombstone
    await http.post("/_sandbox/members", json={"upsert": [{**changed["m-000003"], "first_name": "Twice"}]})
    await http.post("/_sandbox/members", json={"upsert": [{**changed["m-000003"], "first_name": "Thrice"}]})
    await http.post("/_sandbox/members", json={"delete": ["m-000004"]})
    await http.post("/_sandbox/members", json={"upsert": [{**by_id["m-000004"], "status": "suspended"}]})
    again = await pull_all(http, bearer, delta["cursor"], limit=1)
    assert [(m["member_id"], m["first_name"], m["status"]) for m in again["members"]] == [
        ("m-000003", "Thrice", "active"),
        ("m-000004", by_id["m-000004"]["first_name"], "suspended"),
    ]
    assert again["tombstones"] == []

    # admin input is validated as the agent would read it
    bad = await http.post(
        "/_sandbox/members", json={"upsert": [{"member_id": "x", "first_name": "X", "cards": ["zz"]}]}
    )
    assert bad.status_code == 422
    assert "upsert[0].cards" in bad.json()["detail"]

    # a reset rebuilds the list: old cursors are refused with 410, so the agent resyncs from scratch
    await http.post("/_sandbox/reset")
    bearer = await token(http, server)
    gone = await http.get(
        "/edge/members", params={"cursor": delta["cursor"]}, headers={"Authorization": f"Bearer {bearer}"}
    )
    assert (gone.status_code, gone.json()["error"]) == (410, "cursor_expired")


async def test_100k_members_page_out_quickly() -> None:
    started = time.perf_counter()
    async with SandboxServer(SandboxOptions(members=100_000), port=0) as big:
        built = time.perf_counter() - started
        async with httpx.AsyncClient(base_url=big.url, timeout=10) as http:
            bearer = await token(http, big)
            started = time.perf_counter()
            everything = await pull_all(http, bearer, limit=5000)
            paged = time.perf_counter() - started
    assert len(everything["members"]) == 100_000
    assert everything["pages"] == 20
    assert built < 5, built
    assert paged < 6, paged


# -- events ----------------------------------------------------------------------------------------------------------


async def test_events_are_accepted_once_per_device(http: httpx.AsyncClient, server: SandboxServer) -> None:
    bearer = await token(http, server)
    batch = [event(1), event(2, "access.decided", session_id=None), event(3, "consumption.recorded")]
    first = await post_events(http, server, bearer, batch)
    assert [r["status"] for r in first.json()["results"]] == ["accepted"] * 3
    again = await post_events(http, server, bearer, batch)
    assert [r for r in again.json()["results"]] == [{"event_id": e["event_id"], "status": "duplicate"} for e in batch]
    # the same event id from another box is another event; changed content under a known id is flagged
    other_box = await post_events(http, server, bearer, batch[:1], device="edge-02")
    assert other_box.json()["results"][0]["status"] == "accepted"
    altered = await post_events(http, server, bearer, [{**batch[0], "data": {"court_id": "c9"}}])
    assert altered.json()["results"][0] == {
        "event_id": batch[0]["event_id"],
        "status": "duplicate",
        "reason": "conflicting_duplicate",
        "detail": "already accepted with different content; the first copy stands",
    }
    # a twin inside one batch is a duplicate of its sibling; dedup survives time passing
    await http.post("/_sandbox/clock", json={"advance_s": 30 * 86_400})
    bearer = await token(http, server)
    twin = event(4)
    twins = await post_events(http, server, bearer, [twin, twin, batch[1]])
    assert [r["status"] for r in twins.json()["results"]] == ["accepted", "duplicate", "duplicate"]

    events = await received(http, kind="event")
    assert [(e["device_id"], e["seq"], e["type"], e["session_id"]) for e in events] == [
        ("edge-01", 1, "session.started", "s-local-1"),
        ("edge-01", 2, "access.decided", None),
        ("edge-01", 3, "consumption.recorded", "s-local-1"),
        ("edge-02", 1, "session.started", "s-local-1"),
        ("edge-01", 4, "session.started", "s-local-1"),
    ]
    assert events[0]["event_id"] == batch[0]["event_id"]
    assert events[0]["data"] == batch[0]["data"]


async def test_events_signature_and_freshness(http: httpx.AsyncClient, server: SandboxServer) -> None:
    bearer = await token(http, server)
    body = json.dumps({"device_id": "edge-01", "events": [event(1)]}).encode()
    auth = {"Authorization": f"Bearer {bearer}"}
    now = server.sandbox.clock.now()

    async def send(headers: dict[str, str], content: bytes = body) -> tuple[int, str]:
        answer = await http.post("/edge/events", content=content, headers={**auth, **headers})
        return answer.status_code, answer.json().get("error", "")

    assert await send(signed(server, body, secret="not-the-secret")) == (401, "bad_signature")
    assert await send(signed(server, body), content=body.replace(b"edge-01", b"edge-02")) == (401, "bad_signature")
    assert await send({"Content-Type": "application/json"}) == (401, "bad_signature")
    assert await send({**signed(server, body), "X-Timestamp": "yesterday"}) == (401, "bad_signature")
    # X-Timestamp is whole seconds: probe the 300 s window with margins wider than the truncation
    assert await send(signed(server, body, now - 310)) == (401, "stale_timestamp")
    assert await send(signed(server, body, now + 310)) == (401, "stale_timestamp")
    # sandbox time moves the window: a box whose clock stayed behind is told the server's time
    await http.post("/_sandbox/clock", json={"advance_s": 600})
    auth = {"Authorization": f"Bearer {await token(http, server)}"}  # the old token expired on the way
    behind = await http.post("/edge/events", content=body, headers={**auth, **signed(server, body, now)})
    assert behind.json()["error"] == "stale_timestamp"
    assert "behind server time" in behind.json()["detail"]
    assert await received(http, kind="event") == []
    assert await send(signed(server, body, server.sandbox.clock.now() - 290)) == (200, "")


async def test_events_rejected_one_by_one(http: httpx.AsyncClient, server: SandboxServer) -> None:
    bearer = await token(http, server)
    good = event(1)
    batch = [
        good,
        event(2, "session.paused"),
        {k: v for k, v in event(3).items() if k != "boot_id"},
        event(4, occurred_at="2026-03-02T15:00:00"),
        event(5, clock_synced=1),
        {**event(6), "seq": True},
        event(7, agent_id="edge-01"),
        event(8, event_id="42"),
        event(9, data=[]),
        "an event",
    ]
    results = (await post_events(http, server, bearer, batch)).json()["results"]
    assert [(r["status"], r.get("reason")) for r in results] == [
        ("accepted", None),
        ("rejected", "unknown_type"),
        *[("rejected", "malformed")] * 8,
    ]
    details = [r.get("detail", "") for r in results]
    for index, fragment in [(2, "boot_id: required"), (3, "UTC offset"), (6, "agent_id: unknown field"), (8, "data")]:
        assert fragment in details[index], details[index]
    assert results[9]["event_id"] is None
    # fixed and sent again, a rejected event is accepted
    fixed = (await post_events(http, server, bearer, [event(4, event_id=batch[3]["event_id"])])).json()
    assert fixed["results"][0]["status"] == "accepted"

    auth = {"Authorization": f"Bearer {bearer}"}
    too_many = json.dumps({"device_id": "edge-01", "events": [event(i) for i in range(501)]}).encode()
    answer = await http.post("/edge/events", content=too_many, headers={**auth, **signed(server, too_many)})
    assert (answer.status_code, answer.json()["error"]) == (413, "batch_too_large")
    for envelope in ({"events": []}, {"device_id": "edge-01", "events": {}}, [], {"device_id": "", "events": []}):
        raw_body = json.dumps(envelope).encode()
        answer = await http.post("/edge/events", content=raw_body, headers={**auth, **signed(server, raw_body)})
        assert (answer.status_code, answer.json()["error"]) == (422, "invalid_body"), envelope
    garbage = b"{not json"
    answer = await http.post("/edge/events", content=garbage, headers={**auth, **signed(server, garbage)})
    assert (answer.status_code, answer.json()["error"]) == (400, "invalid_json")
    empty = await post_events(http, server, bearer, [])
    assert empty.json() == {"results": []}


# -- faults ----------------------------------------------------------------------------------------------------------


async def test_status_faults_answer_without_acting(http: httpx.AsyncClient, server: SandboxServer) -> None:
    plan = await set_faults(
        http,
        [
            {"endpoint": "ziggy.checkin", "kind": "503", "count": 1, "retry_after_s": 3},
            {"endpoint": "ziggy.*", "kind": 429, "count": 1},
            {"endpoint": "ziggy.checkin", "kind": "500", "count": 1},
            {"endpoint": "token", "kind": "401", "count": 1},
            {"endpoint": "cloud.members", "kind": "401", "count": 1},
        ],
    )
    assert [r["remaining"] for r in plan["rules"]] == [1, 1, 1, 1, 1]
    h = zheaders(server)
    seen = []
    for _ in range(4):
        answer = await http.post(z("/access/checkin"), json=checkin_body(), headers=h)
        seen.append((answer.status_code, answer.json().get("error"), answer.headers.get("Retry-After")))
    assert seen == [
        (503, "unavailable", "3"),
        (429, "rate_limited", "1"),
        (500, "internal_error", None),
        (200, None, None),
    ]
    assert (await http.get(z("/access/sessions/active"), headers=h)).status_code == 200

    refused = await http.post(server.settings.token_url, data={"grant_type": "client_credentials"})
    assert (refused.status_code, refused.json()["error"]) == (401, "invalid_client")
    bearer = await token(http, server)
    members = await http.get("/edge/members", headers={"Authorization": f"Bearer {bearer}"})
    assert members.status_code == 401  # a 401 mid-token-life: the client refreshes once and retries
    assert (await http.get("/edge/members", headers={"Authorization": f"Bearer {bearer}"})).status_code == 200

    calls = await received(http, kind="call")
    assert [(c["route"], c["fault"], c["status"], c["acted"]) for c in calls] == [
        ("ziggy.checkin", "503", 503, False),
        ("ziggy.checkin", "429", 429, False),
        ("ziggy.checkin", "500", 500, False),
        ("ziggy.checkin", None, 200, True),
        ("token", "401", 401, False),
        ("cloud.members", "401", 401, False),
    ]
    assert [r["fired"] for r in (await http.get("/_sandbox/faults")).json()["rules"]] == [1, 1, 1, 1, 1]


async def test_reset_drops_the_connection_without_acting(raw: httpx.AsyncClient, server: SandboxServer) -> None:
    await set_faults(raw, [{"endpoint": "ziggy.checkin", "kind": "reset", "count": 1}])
    started = time.perf_counter()
    with pytest.raises(httpx.TransportError) as caught:
        await raw.post(z("/access/checkin"), json=checkin_body(), headers=zheaders(server, "ev-1"))
    assert not isinstance(caught.value, httpx.TimeoutException)
    assert time.perf_counter() - started < 1
    assert server.sandbox.ziggy.sessions == {}
    retry = await raw.post(z("/access/checkin"), json=checkin_body(), headers=zheaders(server, "ev-1"))
    assert retry.status_code == 200
    assert "Idempotent-Replayed" not in retry.headers
    calls = await received(raw)
    assert [(c["fault"], c["status"], c["acted"]) for c in calls] == [("reset", None, False), (None, 200, True)]


async def test_timeout_holds_the_request_without_acting(raw: httpx.AsyncClient, server: SandboxServer) -> None:
    await set_faults(raw, [{"endpoint": "cloud.events", "kind": "timeout", "count": 1, "delay_s": 0.5}])
    bearer = await token(raw, server)
    body = json.dumps({"device_id": "edge-01", "events": [event(1)]}).encode()
    started = time.perf_counter()
    with pytest.raises(httpx.ReadTimeout):
        await raw.post(
            "/edge/events",
            content=body,
            headers={"Authorization": f"Bearer {bearer}", **signed(server, body)},
            timeout=httpx.Timeout(5, read=0.1),
        )
    assert time.perf_counter() - started < 0.4
    assert len(server.sandbox.inbox) == 0
    assert [(c["fault"], c["acted"]) for c in await received(raw)] == [("timeout", False)]


async def test_slow_body_arrives_late_after_acting(raw: httpx.AsyncClient, server: SandboxServer) -> None:
    await set_faults(raw, [{"endpoint": "ziggy.checkin", "kind": "slow", "rate": 1, "delay_s": 0.4}])
    started = time.perf_counter()
    answer = await raw.post(z("/access/checkin"), json=checkin_body(), headers=zheaders(server, "ev-1"))
    assert time.perf_counter() - started >= 0.38
    assert answer.status_code == 200
    assert answer.json()["session_id"] == "zg-1"
    # a client with a 0.1 s deadline gives up mid-body; the check-in happened anyway, and the keyed retry
    # (here after the fault is lifted) gets the stored answer instead of a 409
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await raw.post(z("/access/checkin"), json=checkin_body("m-000002"), headers=zheaders(server, "ev-2"))
    await set_faults(raw, [])
    retry = await raw.post(z("/access/checkin"), json=checkin_body("m-000002"), headers=zheaders(server, "ev-2"))
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json()["session_id"] == "zg-2"
    assert [(c["fault"], c["acted"], c["replayed"]) for c in await received(raw)] == [
        ("slow", True, False),
        ("slow", True, False),
        (None, False, True),
    ]


async def test_garbage_answers_after_acting_and_retries_are_safe(raw: httpx.AsyncClient, server: SandboxServer) -> None:
    await set_faults(
        raw,
        [
            {"endpoint": "ziggy.checkin", "kind": "garbage", "count": 1},
            {"endpoint": "cloud.events", "kind": "garbage", "count": 1},
        ],
    )
    answer = await raw.post(z("/access/checkin"), json=checkin_body(), headers=zheaders(server, "ev-1"))
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer.content)
    retry = await raw.post(z("/access/checkin"), json=checkin_body(), headers=zheaders(server, "ev-1"))
    assert retry.json()["session_id"] == "zg-1"
    assert retry.headers["Idempotent-Replayed"] == "true"

    bearer = await token(raw, server)
    batch = [event(1), event(2)]
    body = json.dumps({"device_id": "edge-01", "events": batch}).encode()
    headers = {"Authorization": f"Bearer {bearer}", **signed(server, body)}
    garbled = await raw.post("/edge/events", content=body, headers=headers)
    with pytest.raises(json.JSONDecodeError):
        json.loads(garbled.content)
    resent = await raw.post("/edge/events", content=body, headers=headers)
    assert [r["status"] for r in resent.json()["results"]] == ["duplicate", "duplicate"]

    log = await received(raw)
    assert [(e["kind"], e.get("route"), e["fault"], e.get("acted")) for e in log] == [
        ("call", "ziggy.checkin", "garbage", True),
        ("call", "ziggy.checkin", None, False),
        ("call", "cloud.events", "garbage", True),
        ("event", None, "garbage", None),
        ("event", None, "garbage", None),
    ]
    assert len(server.sandbox.ziggy.sessions) == 1


async def test_rate_faults_follow_the_seed(raw: httpx.AsyncClient, server: SandboxServer) -> None:
    async def pattern(seed: int) -> list[int]:
        await set_faults(raw, {"seed": seed, "rules": [{"endpoint": "ziggy.sessions.*", "kind": "500", "rate": 0.5}]})
        return [(await raw.get(z("/access/sessions/active"), headers=zheaders(server))).status_code for _ in range(24)]

    first = await pattern(42)
    assert first == await pattern(42)
    assert first != await pattern(43)
    assert 4 < first.count(500) < 20


async def test_fault_plans_are_validated(http: httpx.AsyncClient, tmp_path: Path) -> None:
    for plan, fragment in [
        ([{"endpoint": "ziggy.chekin", "kind": "500", "count": 1}], "matches no route"),
        ([{"endpoint": "ziggy.*", "kind": "500", "count": 1, "rate": 0.5}], "exactly one of"),
        ([{"endpoint": "ziggy.*", "kind": "500"}], "exactly one of"),
        ([{"endpoint": "ziggy.*", "kind": "500", "count": 1, "delay_s": 1}], "delay_s"),
        ([{"endpoint": "ziggy.*", "kind": "418", "count": 1}], "kind"),
        ([{"endpoint": "ziggy.*", "kind": "slow", "rate": 1.5}], "rate"),
        ([{"endpoint": "ziggy.*", "kind": "reset", "count": 1, "when": "now"}], "when"),
        ({"rules": [], "seed": "x"}, "seed"),
    ]:
        answer = await http.put("/_sandbox/faults", json=plan)
        assert (answer.status_code, answer.json()["error"]) == (422, "invalid_fault_plan"), plan
        assert fragment in answer.json()["detail"], answer.json()
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"seed": 9, "rules": [{"endpoint": "cloud.*", "kind": "503", "rate": 0.25}]}))
    rules, seed = load_plan_file(path)
    assert (seed, rules[0].kind, rules[0].rate) == (9, "503", 0.25)
    app = make_app(SandboxOptions(members=0, faults=tuple(rules), fault_seed=seed))
    assert len(app.router.routes()) > 0


# -- admin -----------------------------------------------------------------------------------------------------------


async def test_admin_health_clock_received_and_reset(http: httpx.AsyncClient, server: SandboxServer) -> None:
    health = (await http.get("/_sandbox/health")).json()
    assert (health["status"], health["members"], health["sessions_active"]) == ("ok", 50, 0)
    moved = (await http.post("/_sandbox/clock", json={"advance_s": 90.5})).json()
    assert moved["offset_s"] == 90.5
    for bad in ({"advance_s": -1}, {"advance_s": "1"}, {"advance": 1}, {"advance_s": True}):
        assert (await http.post("/_sandbox/clock", json=bad)).status_code == 422

    await http.post(z("/access/checkin"), json=checkin_body(), headers=zheaders(server))
    bearer = await token(http, server)
    await post_events(http, server, bearer, [event(1), event(2)])
    log = await received(http)
    assert [e["n"] for e in log] == [1, 2, 3]
    assert [e["kind"] for e in await received(http, after=1)] == ["event", "event"]
    assert (await http.get("/_sandbox/received", params={"kind": "calls"})).status_code == 400

    contract = await http.get("/_sandbox/contracts/cloud.openapi.yaml")
    assert contract.status_code == 200
    assert yaml.safe_load(contract.text)["openapi"] == "3.1.0"

    await http.post("/_sandbox/reset")
    health = (await http.get("/_sandbox/health")).json()
    assert (health["clock_offset_s"], health["sessions_active"], health["events_accepted"], health["received"]) == (
        0,
        0,
        0,
        0,
    )
    assert health["tokens_live"] == 0
    again = await http.post(z("/access/checkin"), json=checkin_body(), headers=zheaders(server))
    assert again.json()["session_id"] == "zg-1"


def test_cli_prints_what_the_agent_needs_and_stops_on_sigterm(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text('[{"endpoint": "ziggy.checkin", "kind": "503", "count": 1}]')
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUB_AGENT_")} | {"COLUMNS": "200"}
    with subprocess.Popen(
        [*COMMAND, "sandbox", "--port", "0", "--members", "10", "--faults", str(plan), "--token-ttl", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    ) as proc:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("contracts:") or not line:
                break
        text = "".join(lines)
        url = re.search(r"sandbox cloud on (http://127\.0\.0\.1:\d+)", text)
        assert url is not None, text
        base = url.group(1)
        with httpx.Client(base_url=base, timeout=5) as client:
            assert client.get("/_sandbox/health").json()["members"] == 10
            token_url = re.search(r'token_url = "([^"]+)"', text)
            assert token_url is not None
            issued = client.post(
                token_url.group(1),
                data={
                    "grant_type": "client_credentials",
                    "client_id": "edge-01",
                    "client_secret": "sandbox-cloud-client-secret",
                },
            )
            assert issued.json()["expires_in"] == 60
            assert client.post(z("/access/checkin"), json=checkin_body(), headers={}).status_code == 503
        proc.send_signal(signal.SIGTERM)
        rest, errors = proc.communicate(timeout=10)
    assert proc.returncode == 0, errors
    for expected in (
        f'base_url = "{base}/ziggy/api/v1"',
        'client_id = "club-001-edge"',
        f'base_url = "{base}"',
        f'token_url = "{base}/realms/club/protocol/openid-connect/token"',
        'client_id = "edge-01"',
        'ziggy_api_key = "sandbox-ziggy-api-key"',
        'cloud_client_secret = "sandbox-cloud-client-secret"',
        'cloud_signing_secret = "sandbox-cloud-signing-secret"',
        "1 fault rule(s)",
    ):
        assert expected in text, expected
    assert "ziggy.checkin 503" in rest

    bad = tmp_path / "bad.json"
    bad.write_text('[{"endpoint": "nowhere", "kind": "500", "count": 1}]')
    refused = subprocess.run(
        [*COMMAND, "sandbox", "--faults", str(bad)], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    assert refused.returncode == 2
    assert "matches no route" in " ".join(refused.stderr.replace("│", " ").split())


# -- the contracts ---------------------------------------------------------------------------------------------------


def test_contracts_are_valid_openapi_31_and_shipped() -> None:
    for doc in CONTRACTS.docs.values():
        assert doc["openapi"] == "3.1.0"
        validate_openapi(doc)


def test_routes_and_contracts_match_exactly() -> None:
    app = make_app(SandboxOptions(members=0))
    served = {
        (route.resource.canonical, route.method)
        for route in app.router.routes()
        if route.resource is not None and not route.resource.canonical.startswith("/_sandbox/")
    }
    assert served == CONTRACTS.operations()


async def test_a_client_following_the_contracts_gets_conforming_answers(
    http: httpx.AsyncClient, server: SandboxServer
) -> None:
    """Every operation, with requests that validate against the request schemas, answered as documented."""
    CONTRACTS.validated.clear()
    h = zheaders(server)

    async def zpost(path: str, body: dict[str, Any]) -> httpx.Response:
        CONTRACTS.check_request("POST", z(path), body)
        return await http.post(z(path), json=body, headers={**h, "Idempotency-Key": str(uuid.uuid4())})

    session = (await zpost("/access/checkin", checkin_body())).json()["session_id"]
    await zpost("/consumption/record", line_body(session, 2, 7.25, 14.5))
    await http.get(z("/access/sessions/active"), headers=h)
    await http.get(z(f"/access/sessions/{session}"), headers=h)
    await http.get(z(f"/consumption/{session}"), headers=h)
    await zpost("/access/checkout", {"session_id": session, "timestamp": "2026-03-02T16:00:00Z"})

    s = server.settings
    form = {"grant_type": "client_credentials", "client_id": s.cloud_client_id, "client_secret": s.cloud_client_secret}
    CONTRACTS.check_request("POST", "/realms/club/protocol/openid-connect/token", form)
    bearer = await token(http, server)
    await members_page(http, bearer, limit=10)
    batch = [event(i, kind) for i, kind in enumerate(sorted(EVENT_TYPES))]
    CONTRACTS.check_request("POST", "/edge/events", {"device_id": "edge-01", "events": batch})
    results = (await post_events(http, server, bearer, batch)).json()["results"]
    assert {r["status"] for r in results} == {"accepted"}

    clip = b"a highlight's bytes"
    meta = {
        "highlight_id": "hl-1",
        "session_id": "",
        "court_id": "c1",
        "pressed_at": "2026-03-02T15:00:12.000+00:00",
        "start_at": "2026-03-02T15:00:02.000+00:00",
        "trim_start_s": "0.0",
        "duration_s": "30.0",
        "triggered_by": "button",
        "sha256": hashlib.sha256(clip).hexdigest(),
        "filename": "clip.mp4",
    }
    tus = {"Tus-Resumable": "1.0.0", "Authorization": f"Bearer {bearer}"}
    pairs = ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" if v else k for k, v in meta.items())
    create = {**tus, "Upload-Length": str(len(clip)), "Upload-Metadata": pairs}
    await http.options("/edge/clips/")
    url = (await http.post("/edge/clips/", headers=create)).headers["Location"]
    await http.head(url, headers=tus)
    digest = base64.b64encode(hashlib.sha256(clip).digest()).decode()
    chunk = {**tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
    sent = await http.patch(
        url, content=clip, headers={**signed(server, clip), **chunk, "Upload-Checksum": f"sha256 {digest}"}
    )
    assert sent.status_code == 204
    another = pairs.replace(base64.b64encode(b"hl-1").decode(), base64.b64encode(b"hl-2").decode())
    unfinished = await http.post("/edge/clips/", headers={**create, "Upload-Metadata": another})
    await http.delete(unfinished.headers["Location"], headers=tus)

    claim = {"claim_token": "sandbox-claim-0001", "agent_id": "edge-01", "hostname": "pi"}
    CONTRACTS.check_request("POST", "/edge/claim", claim)
    claimed = (await http.post("/edge/claim", json=claim)).json()
    assert claimed["cloud"]["client_secret"] == s.cloud_client_secret
    for refused in ({"claim_token": "sandbox-claim-0001"}, {"claim_token": "never-issued"}, {"token": "x"}):
        await http.post("/edge/claim", json=refused)  # 409, 401, 422: each checked against the contract

    succeeded = {(path, method) for path, method, status in CONTRACTS.validated if status < 300}
    assert succeeded == CONTRACTS.operations()

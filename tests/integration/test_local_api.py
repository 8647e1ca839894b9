"""The local REST API against a real agent on loopback: decisions by role, every role boundary, validation, and
schemathesis over the published contract with no server errors."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BRUNO, CARLA, Premises, PremisesFactory

TOKENS = {
    "court-c1": "tok-court-c1-0123456789",
    "court-c2": "tok-court-c2-0123456789",
    "bar": "tok-bar-0123456789abcdef",
    "desk": "tok-desk-0123456789abcd",
}
CLIENTS = [
    {"name": "court-c1", "role": "court", "courts": ["c1"]},
    {"name": "court-c2", "role": "court", "courts": ["c2"]},
    {"name": "bar", "role": "bar"},
    {"name": "desk", "role": "desk"},
]
WATER = {"item_id": "agua-500", "name": "Água 500 ml", "quantity": 2, "unit_price": 4.5}


@pytest.fixture
async def api(premises_factory: PremisesFactory, tmp_path: Path) -> Premises:
    secrets = tmp_path / "api-secrets.toml"
    tokens = ", ".join(f'{name} = "{token}"' for name, token in TOKENS.items())
    secrets.write_text(f"api_tokens = {{ {tokens} }}\n")  # inline: the test harness may append more keys
    secrets.chmod(0o600)
    premises: Premises = await premises_factory(api={"clients": CLIENTS}, agent={"secrets_file": str(secrets)})
    return premises


def client(premises: Premises, who: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{premises.agent.api_port}", headers=headers, timeout=10)


async def call(premises: Premises, who: str | None, method: str, path: str, **kw: Any) -> httpx.Response:
    async with client(premises, who) as http:
        return await http.request(method, path, **kw)


async def test_a_player_without_a_card_checks_in_by_member_code_once(api: Premises) -> None:
    body = {"request_id": "req-1", "member_code": "1002"}
    first = await call(api, "court-c1", "POST", "/api/v1/courts/c1/checkin", json=body)
    assert first.status_code == 200
    answer = first.json()
    assert (answer["status"], answer["action"]) == ("granted", "checkin")
    assert answer["message"].startswith("Bem-vindo, Bruno")
    again = await call(api, "court-c1", "POST", "/api/v1/courts/c1/checkin", json=body)
    assert again.json() == answer  # the same request id: answered from the store
    assert await api.rows("SELECT member_id, court_id FROM sessions WHERE ended_at IS NULL") == [("m-bruno", "c1")]
    court = (await call(api, "court-c1", "GET", "/api/v1/courts/c1")).json()
    assert [p["first_name"] for p in court["players"]] == ["Bruno"]
    sessions = (await call(api, "court-c1", "GET", "/api/v1/sessions")).json()["sessions"]
    assert [(s["member_id"], s["court_id"]) for s in sessions] == [("m-bruno", "c1")]

    checkout = {"request_id": "req-2", "session_id": sessions[0]["session_id"]}
    out = await call(api, "court-c1", "POST", "/api/v1/courts/c1/checkout", json=checkout)
    assert out.json()["status"] == "ok"
    assert await api.rows("SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL") == [(0,)]


async def test_the_bar_charges_a_session_and_the_court_sees_it(api: Premises) -> None:
    checkin = await call(api, "desk", "POST", "/api/v1/courts/c1/checkin", json={"request_id": "d1", "card_id": BRUNO})
    session_id = checkin.json()["session_id"]
    order = {"request_id": "ord-1", "card_id": BRUNO, "items": [WATER]}
    answer = (await call(api, "bar", "POST", "/api/v1/consumption", json=order)).json()
    assert answer["status"] == "ok"
    assert answer["session_total"] == 9.0
    lines = (await call(api, "court-c1", "GET", f"/api/v1/sessions/{session_id}/consumption")).json()
    assert lines["total"] == 9.0
    assert [(line["item_id"], line["quantity"], line["unit_price"]) for line in lines["lines"]] == [
        ("agua-500", 2, 4.5)
    ]
    assert (await call(api, "bar", "POST", "/api/v1/consumption", json=order)).json() == answer  # never twice
    assert await api.rows("SELECT COUNT(*) FROM consumption") == [(1,)]
    highlights = await call(api, "bar", "GET", f"/api/v1/sessions/{session_id}/highlights")
    assert highlights.json() == {"highlights": []}


async def test_every_role_boundary(api: Premises) -> None:
    session_id = (
        await call(api, "desk", "POST", "/api/v1/courts/c1/checkin", json={"request_id": "d1", "card_id": BRUNO})
    ).json()["session_id"]
    order = {"request_id": "o1", "session_id": session_id, "items": [WATER]}
    refused = [
        ("court-c1", "POST", "/api/v1/consumption", order),  # a court tablet cannot record consumption
        ("court-c2", "POST", "/api/v1/courts/c1/checkin", {"request_id": "x", "member_code": "1001"}),
        ("court-c2", "GET", "/api/v1/courts/c1", None),
        ("court-c2", "GET", f"/api/v1/sessions/{session_id}/consumption", None),
        ("court-c2", "GET", "/api/v1/sessions?court_id=c1", None),
        ("bar", "POST", "/api/v1/courts/c1/checkin", {"request_id": "x", "member_code": "1001"}),
        ("bar", "POST", "/api/v1/courts/c1/checkout", {"request_id": "x", "session_id": session_id}),
        ("bar", "GET", "/api/v1/devices", None),
        ("bar", "GET", "/api/v1/outbox", None),
        ("court-c1", "GET", "/api/v1/devices", None),
        ("court-c1", "GET", "/api/v1/outbox", None),
        ("court-c1", "GET", "/api/v1/decisions/denied", None),
        ("bar", "GET", "/api/v1/decisions/denied", None),
    ]
    for who, method, path, body in refused:
        response = await call(api, who, method, path, json=body)
        assert response.status_code == 403, (who, method, path, response.text)
        assert response.json()["error"] == "forbidden"
    # a court tablet sees only its own courts
    assert [c["court_id"] for c in (await call(api, "court-c2", "GET", "/api/v1/courts")).json()["courts"]] == ["c2"]
    assert (await call(api, "court-c2", "GET", "/api/v1/sessions")).json() == {"sessions": []}
    # the desk sees devices and the outbox
    devices = (await call(api, "desk", "GET", "/api/v1/devices")).json()["devices"]
    assert {"r1", "t1", "b1"} <= {d["device_id"] for d in devices}
    destinations = (await call(api, "desk", "GET", "/api/v1/outbox")).json()["destinations"]
    assert {d["destination"] for d in destinations} == {"ziggy", "cloud"}
    assert all(d["pending"] >= 1 for d in destinations)
    # no API token reads the cloud's pull feed
    for who in TOKENS:
        assert (await call(api, who, "GET", "/api/v1/sync/changes")).status_code in (401, 503)


async def test_the_desk_lists_refused_taps_newest_first_with_reason_and_name(api: Premises) -> None:
    async with api.reader("r1") as reader:
        assert (await reader.tap("DEADBEEF00")).payload["reason"] == "unknown_card"
        assert (await reader.tap(BRUNO)).payload["status"] == "granted"  # granted taps are not listed
        assert (await reader.tap(CARLA)).payload["reason"] == "suspended"
    listed = (await call(api, "desk", "GET", "/api/v1/decisions/denied")).json()["denied"]
    assert [(t["reason"], t["first_name"], t["device_id"], t["court_id"]) for t in listed] == [
        ("suspended", "Carla", "r1", "c1"),
        ("unknown_card", None, "r1", "c1"),
    ]
    assert listed[0]["message"] == "Acesso negado: cadastro suspenso"
    assert listed[1]["card_hint"] == "…EF00"
    assert listed[0]["seq"] > listed[1]["seq"]
    one = (await call(api, "desk", "GET", "/api/v1/decisions/denied?limit=1")).json()["denied"]
    assert [t["seq"] for t in one] == [listed[0]["seq"]]
    for bad in ("0", "201", "x", "-1"):
        response = await call(api, "desk", "GET", f"/api/v1/decisions/denied?limit={bad}")
        assert response.status_code == 422, bad
    # the desk also sees when the member list last synced
    member_list = (await call(api, "desk", "GET", "/api/v1/outbox")).json()["member_list"]
    assert member_list["members"] >= 1
    assert member_list["version"] >= 1


async def test_without_a_valid_token_nothing_and_guessing_gets_slow(api: Premises) -> None:
    assert (await call(api, None, "GET", "/api/v1/courts")).status_code == 401
    async with client(api, None) as http:
        http.headers["Authorization"] = "Bearer tok-court-c1-012345678X"  # one character off
        timings = []
        for _ in range(6):
            started = time.perf_counter()
            response = await http.get("/api/v1/courts")
            timings.append(time.perf_counter() - started)
            assert response.status_code == 401
            assert response.json()["error"] == "unauthorized"
    assert max(timings[:2]) < 0.2  # failures 2 and 3 (the call without a header was the first)
    assert timings[-1] >= 1.0  # the seventh in a row waits 0.25 * 2**3 s
    assert (await call(api, "desk", "GET", "/api/v1/courts")).status_code == 200  # a good token still works


async def test_bad_requests_are_answered_clearly(api: Premises) -> None:
    path = "/api/v1/courts/c1/checkin"
    cases = [
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
        ({"content": b"request_id=1", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"json": {"request_id": "x"}}, 422, "invalid_request"),
        ({"json": {"request_id": "x", "card_id": BRUNO, "member_code": "1002"}}, 422, "invalid_request"),
        ({"json": {"request_id": "x", "card_id": "not-hex!"}}, 422, "invalid_request"),
        ({"json": {"request_id": "x", "member_code": "1", "pad": "x" * 70_000}}, 413, "too_large"),
    ]
    for kw, status, code in cases:
        response = await call(api, "desk", "POST", path, **kw)
        assert (response.status_code, response.json()["error"]) == (status, code), response.text
    missing = await call(api, "desk", "POST", "/api/v1/courts/c9/checkin", json={"request_id": "x", "card_id": BRUNO})
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    gone = await call(api, "desk", "GET", "/api/v1/sessions/nope/consumption")
    assert gone.status_code == 404
    assert await api.rows("SELECT COUNT(*) FROM sessions") == [(0,)]


async def test_the_contract_is_served_and_schemathesis_finds_no_server_error(api: Premises, tmp_path: Path) -> None:
    contract = await call(api, None, "GET", "/api/v1/openapi.yaml")
    assert contract.status_code == 200
    assert contract.text.startswith("openapi: 3.1.0")
    schema = tmp_path / "local.openapi.yaml"
    schema.write_text(contract.text)
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        str(schema),
        f"--url=http://127.0.0.1:{api.agent.api_port}",
        f"--header=Authorization: Bearer {TOKENS['desk']}",
        "--checks=not_a_server_error",
        "--max-examples=25",
        "--seed=1",
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # its .schemathesis cache stays out of the repository
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 150)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "Tested: 12" in text, text[-2000:]  # every operation of the contract was exercised


def test_api_clients_are_checked(tmp_path: Path) -> None:
    from agent.config import parse_config
    from agent.errors import ConfigError

    courts = [{"id": "c1"}]
    bad = [
        ([{"name": "t", "role": "court"}], "list the courts it serves"),
        ([{"name": "t", "role": "court", "courts": ["c9"]}], "not a configured court"),
        ([{"name": "t", "role": "bar"}, {"name": "t", "role": "desk"}], "must be unique"),
        ([{"name": "t", "role": "janitor"}], "role"),
    ]
    for clients, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_config({"courts": courts, "api": {"clients": clients}})
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('[api_tokens]\nt = "short"\n')
    secrets.chmod(0o600)
    with pytest.raises(ConfigError, match="shorter than 16"):
        parse_config(
            {
                "agent": {"secrets_file": str(secrets)},
                "courts": courts,
                "api": {"clients": [{"name": "t", "role": "bar"}]},
            }
        )


async def test_a_line_voided_in_time_leaves_the_total_and_never_reaches_ziggy(api: Premises) -> None:
    session_id = (
        await call(api, "desk", "POST", "/api/v1/courts/c1/checkin", json={"request_id": "d1", "card_id": BRUNO})
    ).json()["session_id"]
    beer = {"item_id": "chopp", "name": "Chopp", "quantity": 1, "unit_price": 12.9}
    order = {"request_id": "o1", "session_id": session_id, "items": [WATER, beer]}
    assert (await call(api, "bar", "POST", "/api/v1/consumption", json=order)).json()["session_total"] == 21.9
    lines = (await call(api, "bar", "GET", f"/api/v1/sessions/{session_id}/consumption")).json()["lines"]
    beer_line = next(x["line_id"] for x in lines if x["item_id"] == "chopp")
    void = {"request_id": "v1", "reason": "wrong player"}
    path = f"/api/v1/consumption/{beer_line}/void"
    assert (await call(api, "court-c1", "POST", path, json=void)).status_code == 403  # not a court tablet's
    answer = await call(api, "bar", "POST", path, json=void)
    assert (answer.status_code, answer.json()["status"], answer.json()["session_total"]) == (200, "ok", 9.0)
    assert (await call(api, "bar", "POST", path, json={**void, "request_id": "v2"})).json()["already"] is True
    listed = (await call(api, "bar", "GET", f"/api/v1/sessions/{session_id}/consumption")).json()
    assert listed["total"] == 9.0
    assert [(x["item_id"], x["void_reason"]) for x in listed["lines"]] == [
        ("agua-500", None),
        ("chopp", "wrong player"),
    ]
    voided = await api.rows(
        "SELECT json_extract(data, '$.reason'), device_id FROM events WHERE type = 'consumption.voided'"
    )
    assert voided == [("wrong player", "bar")]
    await api.queue_deliveries()  # the void goes to the cloud only; Ziggy has no call to take a line back
    routed = await api.rows(
        "SELECT d.destination FROM deliveries d JOIN events e USING (seq) WHERE e.type = 'consumption.voided'"
    )
    assert routed == [("cloud",)]
    unknown = await call(api, "bar", "POST", "/api/v1/consumption/nope/void", json={**void, "request_id": "v3"})
    assert unknown.status_code == 404


async def test_a_line_cannot_be_voided_after_the_grace_period(api: Premises) -> None:
    await call(api, "desk", "POST", "/api/v1/courts/c1/checkin", json={"request_id": "d1", "card_id": BRUNO})
    order = {"request_id": "o1", "card_id": BRUNO, "items": [WATER]}
    await call(api, "bar", "POST", "/api/v1/consumption", json=order)
    [(line_id,)] = await api.rows("SELECT line_id FROM consumption")
    api.clock.advance(seconds=301)
    late = await call(
        api, "bar", "POST", f"/api/v1/consumption/{line_id}/void", json={"request_id": "v", "reason": "x"}
    )
    assert (late.status_code, late.json()["error"]) == (409, "void_too_late")
    assert await api.rows("SELECT voided_at FROM consumption") == [(None,)]


async def test_live_streams_tell_the_desk_and_end_when_the_agent_stops(
    premises_factory: PremisesFactory, tmp_path: Path
) -> None:
    secrets = tmp_path / "live-secrets.toml"
    secrets.write_text(f'api_tokens = {{ desk = "{TOKENS["desk"]}" }}\n')
    secrets.chmod(0o600)
    premises: Premises = await premises_factory(
        api={"clients": [{"name": "desk", "role": "desk"}]}, agent={"secrets_file": str(secrets)}
    )
    url = f"http://127.0.0.1:{premises.agent.api_port}/api/v1/live?access_token={TOKENS['desk']}"
    async with httpx.AsyncClient(timeout=10) as http, http.stream("GET", url) as stream:
        assert stream.headers["content-type"] == "text/event-stream"
        seen = ""
        chunks = stream.aiter_text()
        while "event: device" not in seen:  # the current state first: courts, then every device
            seen += await anext(chunks)
        assert "event: court" in seen
        async with premises.reader("r1") as reader:
            await reader.tap(CARLA)
        while '"reason":"suspended"' not in seen:
            seen += await anext(chunks)
        assert "event: decision" in seen
        started = time.monotonic()
        await premises_factory(restart=premises)  # stops this agent: the stream must end, not hold the stop
        async for _ in chunks:
            pass
    assert time.monotonic() - started < 4  # far from aiohttp's 60 s default wait for handlers

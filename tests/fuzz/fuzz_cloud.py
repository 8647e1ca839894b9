"""Fuzz target: the club cloud's answers as the agent judges them (agent/sync/delivery.py `judge`,
`retry_after`) and as the event destination reads them (agent/sync/cloud.py: the token endpoint's answer, then
/edge/events' per-event results), over httpx's own fake transport, which answers each request from the input.

Every answer is drawn: a status, headers (Retry-After, Content-Type with its charset, Content-Encoding) and a
body that is raw bytes or JSON made of the contract's names. Rules: garbage is Transient (retry), a refusal
Permanent, 401 never escapes the destination; anything else that escapes is a bug. A Transient's Retry-After
is a delay the outbox can wait and store. `python -m tests.fuzz.fuzz_cloud [libFuzzer flags]` fuzzes it under
atheris."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import httpx

from agent.config import CloudSection
from agent.sync import cloud, delivery
from agent.sync.cloud import CloudDestination
from agent.sync.delivery import OutboxEvent, Permanent, Transient, Unauthorized, Verdict

from . import _harness
from ._support import INT64, Draw, Known, json_value, quiet_logs, run, tolerated

SECTION = CloudSection(base_url="https://cloud.test/api", token_url="https://cloud.test/token", client_id="edge-01")
STATUSES = (200, 200, 200, 200, 201, 204, 302, 400, 401, 403, 404, 408, 409, 410, 422, 429, 500, 502, 503, 599)
RETRY_AFTER = (
    *("0", "5", "-1", "1.5", " 7 ", "nan", "inf", "-inf", "1e400", "1e16", "soon", ""),
    *("Wed, 21 Oct 2015 07:28:00 GMT", "Wed, 21 Oct 2099 07:28:00 GMT", "Mon, 01 Jan 2020 00:00:00 -0000"),
    *("Mon, 01 Jan 99999999999999999999 00:00:00 GMT", "Mon, 01 Jan 2020 99:00:00 GMT", "01 Jan 2020 +9999"),
)
CONTENT_TYPES = (
    *("application/json", "application/json; charset=utf-8", "application/json; charset=utf-16", "text/plain"),
    *("text/plain; charset=latin-1", "text/plain; charset=bogus", "text/plain; charset=rot13"),
    *("text/plain; charset=base64", "text/plain; charset=hex", "text/plain; charset=zlib"),
)
ENCODINGS = ("gzip", "deflate", "br", "identity", "zstd", "gzip, gzip")
KEYS = (
    *("access_token", "expires_in", "token_type", "results", "event_id", "status", "reason", "error"),
    *("detail", "members", "next_cursor"),
)
STRINGS = (
    *("e-1", "e-2", "e-3", "accepted", "duplicate", "rejected", "tok-0123456789", "300", "Bearer"),
    *("invalid_event", "bad_signature"),
)
EVENTS = [
    OutboxEvent(seq, f"e-{seq}", "access.decided", 1_772_463_600_000, 1, "boot", True, None, "r1", {}, 0, None)
    for seq in (1, 2, 3)
]
NOW_MS = 1_772_463_600_000


def _judge(data: bytes) -> object:
    """judge() on the answer `data` ("status headers\n\nbody"): its body, or the verdict it raised, checked."""
    status, _, rest = data.partition(b" ")
    headers, _, body = rest.partition(b"\n\n")
    fields = [line.split(b": ", 1) for line in headers.split(b"\n") if b": " in line]
    try:
        return _judged(httpx.Response(int(status), headers=[(name, value) for name, value in fields], content=body))
    except Unauthorized as exc:
        assert int(status) == 401
        return exc
    except Transient as exc:
        transient(exc)
        return exc
    except Permanent as exc:
        permanent(exc, int(status))
        return exc


def _judged(response: httpx.Response) -> object:
    try:
        return delivery.judge(response)
    except Transient as exc:
        _retry_after_usable(exc.retry_after_s)
        raise


def _replay(data: bytes) -> object:
    """CloudDestination.send answered by `data`: a JSON list of [status, body, headers?] answers, in order."""
    answers = [httpx.Response(a[0], json=a[1], headers=a[2] if len(a) > 2 else None) for a in json.loads(data)]

    def handle(request: httpx.Request) -> httpx.Response:
        if not answers:  # past the answers given, the cloud is unreachable
            raise httpx.ConnectError("no more answers", request=request)
        return answers.pop(0)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))

    async def send() -> object:
        """The results, or the verdict send() raised, checked."""
        dest = CloudDestination(SECTION, "client-secret", "signing-secret", "edge-01", client)
        try:
            return await dest.send(EVENTS[:1])
        except Transient as exc:
            transient(exc)
            return exc
        except Permanent as exc:
            permanent(exc, exc.status)
            return exc
        finally:
            await dest.aclose()

    return run(send())


# Inputs worth keeping: run by test_fuzz_agent.py.
REGRESSIONS: list[bytes] = []
KNOWN: list[Known] = []
# Reported bugs that are fixed: test_fuzz_agent.py runs each check as a plain (passing) regression test.
FIXED: list[Known] = [
    # A date in Retry-After with a year too large for datetime: parsedate_to_datetime raises OverflowError,
    # which retry_after() does not catch (it catches TypeError and ValueError). Out of judge() on any 429/5xx.
    Known(
        "retry_after_huge_year",
        OverflowError,
        "retry_after",
        b"503 Retry-After: Mon, 01 Jan 99999999999999999999 00:00:00 GMT\n\n",
        _judge,
    ),
    # Retry-After: inf (or 1e400) is float('inf'): Transient(retry_after_s=inf). The outbox then does
    # int(inf * 1000) (OverflowError in Outbox._backoff_ms, the delivery never recorded), member sync and clip
    # uploads sleep forever; 1e16 seconds overflows the outbox's 64-bit next_attempt_at column instead.
    Known("retry_after_inf", AssertionError, "_retry_after_usable", b"503 Retry-After: inf\n\n", _judge),
    # A 2xx body nested deeper than the json module recurses: RecursionError, not the Transient judge()
    # promises for an unreadable body (it catches JSONDecodeError and UnicodeDecodeError only).
    Known("deep_json_body", RecursionError, "judge", b"200 \n\n" + b"[" * 100_000, _judge),
    # A 2xx body with an integer of more than 4300 digits: json raises a plain ValueError (Python's int
    # conversion limit), not JSONDecodeError: out of judge().
    Known("long_integer_body", ValueError, "judge", b"200 \n\n" + b"1" * 5000, _judge),
    # The same two in the body of a 4xx/5xx, read by _brief() for the reason.
    Known("deep_json_error_body", RecursionError, "_brief", b"500 \n\n" + b"[" * 100_000, _judge),
    Known("long_integer_error_body", ValueError, "_brief", b"500 \n\n" + b"1" * 5000, _judge),
    # A refusal whose body is not JSON, with a charset naming a bytes-to-bytes codec: httpx's Response.text
    # raises TypeError (rot13) or AssertionError (base64, hex, zlib) in _brief(). httpx's to fix too; the agent
    # can catch it where it reads a refusal's text.
    Known("charset_rot13", TypeError, "text", b"500 Content-Type: text/plain; charset=rot13\n\noops", _judge),
    Known("charset_base64", AssertionError, "text", b"500 Content-Type: text/plain; charset=base64\n\noops", _judge),
    # An /edge/events answer whose result has an unhashable event_id (a list, an object): TypeError in
    # CloudDestination.send, which the outbox logs as a destination bug (with a traceback) instead of a retry.
    Known(
        "unhashable_event_id",
        TypeError,
        "send",
        b'[[200, {"access_token": "t", "expires_in": 600}], [200, {"results": [{"event_id": ["e-1"]}]}]]',
        _replay,
    ),
    # A token answer whose expires_in is not a number ("3600s", a list, an object): float() raises ValueError
    # or TypeError out of TokenSource._fetch, through every cloud call, instead of Transient.
    Known(
        "expires_in_not_a_number", ValueError, "_fetch", b'[[200, {"access_token": "t", "expires_in": "1h"}]]', _replay
    ),
    Known("expires_in_an_object", TypeError, "_fetch", b'[[200, {"access_token": "t", "expires_in": [1]}]]', _replay),
    # A 3xx whose Location has a scheme and no host ("mailto:u"): httpx builds the redirect request even when
    # it does not follow redirects, and raises InvalidURL (not an httpx.HTTPError) out of client.request, so
    # past every `except httpx.HTTPError` of the agent (here the token fetch; clip uploads too).
    Known(
        "redirect_location_unparsable",
        httpx.InvalidURL,
        "_redirect_url",
        b'[[302, null, {"Location": "mailto:u"}]]',
        _replay,
    ),
    # A token that is not ASCII: httpx cannot encode the Authorization header it goes in, and every cloud call
    # raises UnicodeEncodeError (from CloudClient.request) instead of Transient.
    Known(
        "token_not_ascii",
        UnicodeEncodeError,
        "request",
        '[[200, {"access_token": "t\u00f6k", "expires_in": 600}]]'.encode(),
        _replay,
    ),
]


def transient(exc: Transient) -> None:
    assert isinstance(exc.reason, str)
    _retry_after_usable(exc.retry_after_s)


def permanent(exc: Permanent, status: int | None) -> None:
    assert exc.status == status
    assert status is None or 400 <= status < 500
    assert status not in (401, 408, 429)


def _retry_after_usable(value: float | None) -> None:
    if value is None:
        return
    assert math.isfinite(value), value
    assert value >= 0, value
    assert NOW_MS + int(value * 1000 * 1.1) <= INT64[1], value  # what the outbox stores as next_attempt_at


def answer(draw: Draw, token: bool) -> httpx.Response:
    status = draw.pick(STATUSES) if draw.below(3) else 200
    headers: list[tuple[bytes, bytes]] = []
    for _ in range(draw.below(4)):
        which = draw.below(4)
        if which == 0:
            headers.append((b"Retry-After", draw.pick(RETRY_AFTER).encode() if draw.below(4) else draw.blob(16)))
        elif which == 1:
            headers.append((b"Content-Type", draw.pick(CONTENT_TYPES).encode()))
        elif which == 2:
            headers.append((b"Content-Encoding", draw.pick(ENCODINGS).encode()))
        else:
            name = draw.pick((b"X-Error", b"Location", b"Content-Language"))
            headers.append((name, draw.pick((b"mailto:u", b"/elsewhere", b"")) if draw.below(2) else draw.blob(16)))
    kind = draw.below(4)
    if kind == 0:
        body = draw.blob(256)
    elif kind == 1:
        body = json.dumps(json_value(draw, KEYS, STRINGS)).encode()
    elif token:
        doc: dict[str, Any] = {"access_token": draw.pick(("tok-0123456789", "", 7, None)), "expires_in": 600}
        if draw.below(2):
            doc["expires_in"] = json_value(draw, KEYS, STRINGS)
        body = json.dumps(doc).encode()
    else:
        results = [
            {
                "event_id": draw.pick(("e-1", "e-2", "e-3")) if draw.below(4) else json_value(draw, KEYS, STRINGS),
                "status": draw.pick(("accepted", "duplicate", "rejected", "later")),
                "reason": draw.pick(("invalid_event", None, 7)),
            }
            for _ in range(draw.below(4))
        ]
        body = json.dumps({"results": results} if draw.below(4) else json_value(draw, KEYS, STRINGS)).encode()
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))


async def _deliver(draw: Draw) -> list[delivery.Result]:
    def handle(request: httpx.Request) -> httpx.Response:
        return answer(draw, token=request.url.path == "/token")

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    dest = CloudDestination(SECTION, "client-secret", "signing-secret", "edge-01", client, lambda: 1e9)
    try:
        return await dest.send(EVENTS[: 1 + draw.below(3)])
    finally:
        await dest.aclose()


def TestOneInput(data: bytes) -> None:
    draw = Draw(data)
    try:
        if draw.below(2):
            check_judge(draw)
        else:
            check_send(draw)
    except Exception as exc:
        if not tolerated(exc, KNOWN):
            raise


def check_judge(draw: Draw) -> None:
    response = answer(draw, token=bool(draw.below(2)))
    try:
        response.read()
    except httpx.DecodingError:
        return  # the client raises this before judge() sees the answer (a network error: Transient)
    status = response.status_code
    try:
        body = _judged(response)
    except Unauthorized:
        assert status == 401
    except Transient as exc:
        transient(exc)
        assert status in (408, 429) or status >= 500 or status < 400
    except Permanent as exc:
        permanent(exc, status)
    else:
        assert isinstance(body, dict | list)
        assert status < 400


def check_send(draw: Draw) -> None:
    events = len(EVENTS)
    try:
        results = run(_deliver(draw))
    except Transient as exc:
        transient(exc)
        return
    except Permanent as exc:
        permanent(exc, exc.status)
        return
    assert 1 <= len(results) <= events
    assert [r.seq for r in results] == list(range(1, len(results) + 1))
    for result in results:
        assert result.verdict in Verdict
        assert result.verdict is Verdict.DELIVERED or isinstance(result.reason, str)


if __name__ == "__main__":
    quiet_logs()
    _harness.fuzz(TestOneInput, delivery, cloud, sys.modules[__name__])

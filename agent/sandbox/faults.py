"""The fault plan: rules that make named routes fail the ways real networks and vendors do.

A rule is `{"endpoint": glob, "kind": ..., "rate": p | "count": n, "retry_after_s"?, "delay_s"?, "after_bytes"?}`.
For each request the first rule that matches its route name and fires decides its fate; `count` rules fire on the
next n matching calls, `rate` rules with probability p from one seeded RNG, so a run with the same seed and the
same request sequence fails the same way.

Kinds, and whether the request acts (changes sandbox state) before the failure:

    500 503 429 401   answer that status with a JSON error; does not act (429/503 carry Retry-After)
    timeout           hold the request delay_s without answering, then drop it; does not act
    reset             close the TCP connection with a RST, no response; does not act
    cut               let `after_bytes` bytes of the request body through, then RST: a link lost mid-upload.
                      A clip PATCH keeps what arrived (tus core) unless it carries Upload-Checksum, whose
                      partial chunk is discarded. When the body is no longer than after_bytes, the request acts
                      and its answer is lost
    slow              acts, then trickles the real response body over delay_s
    garbage           acts, then answers 200 with a truncated (malformed) JSON body

The acting kinds are the interesting ones: the client cannot tell whether its request took effect, and only
idempotency keys and event de-duplication make its retry safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import math
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from .errors import ApiError
from .wire import explain, json_response

# Every route a rule may name; app.py checks that its named routes are exactly these.
FAULTABLE_ROUTES = (
    "ziggy.checkin",
    "ziggy.checkout",
    "ziggy.sessions.active",
    "ziggy.sessions.get",
    "ziggy.consumption.record",
    "ziggy.consumption.list",
    "token",
    "cloud.members",
    "cloud.events",
    "cloud.clips.options",
    "cloud.clips.create",
    "cloud.clips.head",
    "cloud.clips.patch",
    "cloud.clips.delete",
    "cloud.claim",
)
# Routes that read their body as a stream and apply a cut themselves (at the byte), keeping what arrived.
STREAMING_ROUTES = ("cloud.clips.patch",)
# Set on a request a cut rule fired for: the body bytes let through before the connection drops.
CUT_AFTER = web.RequestKey("sandbox.cut_after", int)
STATUS_KINDS = ("500", "503", "429", "401")
ACTING_KINDS = ("slow", "garbage")
DEFAULT_DELAY_S = {"timeout": 30.0, "slow": 5.0}
DEFAULT_RETRY_AFTER_S = 1.0
SLOW_PIECES = 20
_STATUS_CODES = {"500": "internal_error", "503": "unavailable", "429": "rate_limited", "401": "unauthorized"}

FaultKind = Literal["500", "503", "429", "401", "timeout", "reset", "cut", "slow", "garbage"]


def _kind(value: Any) -> Any:
    # 503 and "503" mean the same to a person writing a plan by hand.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class FaultRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    endpoint: str = Field(min_length=1, max_length=128)
    kind: Annotated[FaultKind, BeforeValidator(_kind)]
    rate: float | None = Field(default=None, ge=0, le=1)
    count: int | None = Field(default=None, ge=1)
    retry_after_s: float | None = Field(default=None, ge=0, le=86_400)
    delay_s: float | None = Field(default=None, gt=0, le=3600)
    after_bytes: int | None = Field(default=None, ge=0, le=1 << 40)

    @model_validator(mode="after")
    def _coherent(self) -> FaultRule:
        if (self.rate is None) == (self.count is None):
            raise ValueError("give exactly one of 'rate' (probability 0..1) or 'count' (the next n calls)")
        if self.retry_after_s is not None and self.kind not in ("429", "503"):
            raise ValueError("retry_after_s applies to kinds 429 and 503 only")
        if self.delay_s is not None and self.kind not in ("timeout", "slow"):
            raise ValueError("delay_s applies to kinds timeout and slow only")
        if (self.after_bytes is not None) != (self.kind == "cut"):
            raise ValueError("after_bytes (body bytes let through before the cut) is given with kind cut, and only")
        if not any(fnmatch.fnmatchcase(route, self.endpoint) for route in FAULTABLE_ROUTES):
            raise ValueError(f"endpoint '{self.endpoint}' matches no route (routes: {', '.join(FAULTABLE_ROUTES)})")
        return self

    @property
    def delay(self) -> float:
        return self.delay_s if self.delay_s is not None else DEFAULT_DELAY_S.get(self.kind, 0.0)

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


_RULES: TypeAdapter[list[FaultRule]] = TypeAdapter(list[FaultRule])


def parse_plan(value: Any) -> tuple[list[FaultRule], int | None]:
    """A plan as written: a list of rules, or `{"rules": [...], "seed": n}`. Raises ValueError naming the rule."""
    seed: int | None = None
    if isinstance(value, dict):
        unknown = set(value) - {"rules", "seed"}
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}: expected 'rules' and optionally 'seed'")
        raw_seed = value.get("seed")
        if raw_seed is not None and (isinstance(raw_seed, bool) or not isinstance(raw_seed, int)):
            raise ValueError("seed: expected an integer")
        seed = raw_seed
        value = value.get("rules", [])
    if not isinstance(value, list):
        raise ValueError("expected a list of rules or an object with 'rules'")
    # Through JSON text: strict validation then reads 0.5 as a float whatever parsed it (Decimal, float).
    try:
        return _RULES.validate_json(json.dumps(value, default=float)), seed
    except ValidationError as exc:
        raise ValueError(explain(exc, prefix="rules")) from exc


def load_plan_file(path: Path) -> tuple[list[FaultRule], int | None]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from exc
    try:
        return parse_plan(value)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


@dataclass(slots=True)
class _Armed:
    rule: FaultRule
    remaining: int | None
    fired: int = 0


class FaultPlan:
    def __init__(self, rules: list[FaultRule] | tuple[FaultRule, ...] = (), seed: int = 0) -> None:
        self._armed: list[_Armed] = []
        self._seed = seed
        self._rng = random.Random(seed)
        self.replace(list(rules))

    def replace(self, rules: list[FaultRule], seed: int | None = None) -> None:
        self._armed = [_Armed(rule, rule.count) for rule in rules]
        if seed is not None:
            self._seed = seed
            self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self._armed)

    def draw(self, route: str) -> tuple[int, FaultRule] | None:
        """The first rule that fires for a call to `route` (its 1-based index and itself), if any."""
        for index, armed in enumerate(self._armed, 1):
            rule = armed.rule
            if not fnmatch.fnmatchcase(route, rule.endpoint):
                continue
            if armed.remaining is not None:
                if armed.remaining <= 0:
                    continue
                armed.remaining -= 1
            elif self._rng.random() >= (rule.rate or 0.0):
                continue
            armed.fired += 1
            return index, rule
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "seed": self._seed,
            "rules": [
                {**a.rule.public(), "fired": a.fired, **({"remaining": a.remaining} if a.remaining is not None else {})}
                for a in self._armed
            ],
        }


# -- injection ----------------------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Record = Callable[[bool, int | None], None]


def abort(request: web.Request) -> None:
    """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed proxy or a NAT timeout does."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def status_answer(rule: FaultRule, index: int, route: str) -> web.Response:
    code = "invalid_client" if rule.kind == "401" and route == "token" else _STATUS_CODES[rule.kind]
    headers: dict[str, str] = {}
    if rule.kind == "429" or (rule.kind == "503" and rule.retry_after_s is not None):
        retry_after = DEFAULT_RETRY_AFTER_S if rule.retry_after_s is None else rule.retry_after_s
        headers["Retry-After"] = str(math.ceil(retry_after))
    if rule.kind == "401":
        headers["WWW-Authenticate"] = f'Bearer error="{code}"'
    error = ApiError(int(rule.kind), code, f"injected fault (rule {index}: {rule.kind} on {rule.endpoint})")
    return json_response(error.body(), status=error.status, headers=headers)


async def inject(
    rule: FaultRule, index: int, request: web.Request, handler: Handler, record: Record
) -> web.StreamResponse:
    route = request.match_info.route.name or ""
    if rule.kind in STATUS_KINDS:
        answer = status_answer(rule, index, route)
        record(False, answer.status)
        return answer
    if rule.kind == "reset":
        record(False, None)
        abort(request)
        return web.Response(status=500)  # never sent: the connection is gone
    if rule.kind == "cut":
        return await _cut(rule, request, handler, record)
    if rule.kind == "timeout":
        record(False, None)
        await asyncio.sleep(rule.delay)
        abort(request)
        return web.Response(status=500)
    response = await handler(request)  # the acting kinds: the request takes effect first
    record(True, response.status)
    body = response.body if isinstance(response, web.Response) and isinstance(response.body, bytes) else b""
    if rule.kind == "garbage":
        # Half of a JSON document never parses: '{"a":1}' -> '{"a', '[]' -> '['.
        return web.Response(status=200, body=body[: max(1, len(body) // 2)], content_type="application/json")
    return await _trickle(request, response, body, rule.delay)


async def _cut(rule: FaultRule, request: web.Request, handler: Handler, record: Record) -> web.StreamResponse:
    limit = rule.after_bytes or 0
    route = request.match_info.route.name or ""
    if route in STREAMING_ROUTES:
        request[CUT_AFTER] = limit
        record(False, None)  # the handler records what it kept
        await handler(request)
        abort(request)  # a handler that never reached the limit (a short body, an early error) loses its answer
        return web.Response(status=500)
    length = request.content_length
    if length is not None and length <= limit:
        response = await handler(request)  # the whole body arrived: the request acts, its answer is lost
        record(True, response.status)
    else:
        record(False, None)
        seen = 0
        with contextlib.suppress(ConnectionError):
            while seen < limit:
                piece = await request.content.read(min(limit - seen, 64 * 1024))
                if not piece:
                    break
                seen += len(piece)
    abort(request)
    return web.Response(status=500)


async def _trickle(request: web.Request, response: web.StreamResponse, body: bytes, delay: float) -> web.StreamResponse:
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
    stream = web.StreamResponse(status=response.status, headers=headers)
    stream.content_length = len(body)
    await stream.prepare(request)
    step = max(1, -(-len(body) // SLOW_PIECES))
    chunks = [body[start : start + step] for start in range(0, len(body), step)] or [b""]
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        for number, chunk in enumerate(chunks, 1):
            # Deadlines, not a sum of short sleeps: timers round to the millisecond and would finish early.
            await asyncio.sleep(max(0.0, began + delay * number / len(chunks) - loop.time()))
            await stream.write(chunk)
        await stream.write_eof()
    except ConnectionResetError:
        pass  # the client gave up waiting: exactly what a slow body is for
    return stream

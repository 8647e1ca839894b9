"""Reading and writing the sandbox's JSON: size caps before allocation, strict parsing, exact money.

Parsing is strict on purpose: the sandbox exists to catch client mistakes before a real vendor does. Duplicate
keys, NaN/Infinity and non-UTF-8 text are refused; floats are read as `Decimal` so that money compares exactly
(0.1 + 0.2 is 0.3 here).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from aiohttp import web
from multidict import MultiMapping
from pydantic import BaseModel, ValidationError

from .errors import ApiError

JSON = "application/json"
M = TypeVar("M", bound=BaseModel)


def _default(value: object) -> Any:
    if isinstance(value, Decimal):
        exponent = value.as_tuple().exponent
        return int(value) if isinstance(exponent, int) and exponent >= 0 else float(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps(value: Any) -> str:
    return json.dumps(value, default=_default, ensure_ascii=False, separators=(",", ":"))


def json_response(value: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return json_text_response(dumps(value), status=status, headers=headers)


def json_text_response(text: str, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A response from JSON text already serialised (the member feed pre-serialises every member)."""
    return web.Response(text=text, status=status, content_type=JSON, charset="utf-8", headers=headers)


async def read_body(request: web.Request, *, cap: int, content_type: str = JSON) -> bytes:
    """The raw body, refused with 415 for the wrong media type and 413 beyond `cap` bytes."""
    if request.content_type != content_type:
        raise ApiError(
            415, "unsupported_media_type", f"Content-Type must be {content_type}, got '{request.content_type}'"
        )
    if request.content_length is not None and request.content_length > cap:
        raise ApiError(413, "payload_too_large", f"body of {request.content_length} bytes exceeds {cap}")
    raw = await request.read()
    if len(raw) > cap:
        raise ApiError(413, "payload_too_large", f"body of {len(raw)} bytes exceeds {cap}")
    return raw


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key '{key}'")
        out[key] = value
    return out


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_json", "body is not UTF-8") from exc
    try:
        return json.loads(text, parse_float=Decimal, parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, "invalid_json", f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"body is not JSON: {exc}") from exc


async def read_json(request: web.Request, *, cap: int) -> Any:
    return parse_json(await read_body(request, cap=cap))


def explain(exc: ValidationError, prefix: str = "") -> str:
    """Every problem as `field: message` (`rules[0].endpoint: ...`), joined; pydantic's wording made shorter."""
    parts = []
    for err in exc.errors(include_url=False):
        where = prefix
        for part in err["loc"]:
            where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
        where = where or "body"
        kind = err["type"]
        if kind == "missing":
            message = "required"
        elif kind == "extra_forbidden":
            message = "unknown field"
        else:
            message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def validate(model: type[M], value: Any) -> M:
    """Validate a parsed body, or raise a 422 naming every bad field."""
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_body", f"expected a JSON object, got {type(value).__name__}")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise ApiError(422, "invalid_body", explain(exc)) from exc


def query(request: web.Request, allowed: frozenset[str]) -> MultiMapping[str]:
    """The query string, refusing unknown and repeated parameters (a typo must not silently mean 'default')."""
    params = request.query
    for key in params:
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ApiError(400, "invalid_query", f"unknown query parameter '{key}' (accepted: {known})")
        if len(params.getall(key)) > 1:
            raise ApiError(400, "invalid_query", f"query parameter '{key}' is repeated")
    return params


# -- field parsers shared by the request models -----------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def instant(value: Any) -> datetime:
    """An ISO 8601 date-time with an offset; a naive time would be ambiguous on a box with no RTC."""
    if not isinstance(value, str):
        raise ValueError("expected an ISO 8601 date-time string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError("expected an ISO 8601 date-time such as 2026-03-02T15:00:00Z") from exc
    if parsed.tzinfo is None:
        raise ValueError("the date-time needs a UTC offset or 'Z'")
    return parsed


def money(value: Any) -> Decimal:
    """A JSON number (never a string or a boolean), kept exact."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ValueError("expected a JSON number")
    return Decimal(value)


def text(value: Any) -> Any:
    """Strings without control characters (they end up in logs and on tablets)."""
    if isinstance(value, str) and _CONTROL.search(value):
        raise ValueError("control characters are not allowed")
    return value

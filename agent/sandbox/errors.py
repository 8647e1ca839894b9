"""Errors the sandbox answers with: one JSON shape, `{"error": code, "detail": text}`, everywhere.

Handlers raise `ApiError`; the error middleware in `app.py` turns it (and aiohttp's own 404/405/413) into that
shape, so a client never has to parse an HTML error page from the fake that it would not get from the real thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ApiError(Exception):
    """An answer other than success: status, a stable code for programs and a detail for people."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail, **self.extra}


def unauthorized(code: str, detail: str) -> ApiError:
    return ApiError(401, code, detail, headers={"WWW-Authenticate": f'Bearer error="{code}"'})

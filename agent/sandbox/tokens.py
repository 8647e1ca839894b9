"""Keycloak's client-credentials token endpoint and the bearer check of the cloud routes.

Tokens are random opaque strings, not JWTs: the agent must treat them as opaque (it never validates its own
token), and an opaque token keeps the sandbox free of key management. Expiry runs on sandbox time, so a test
advances the clock instead of waiting five minutes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import secrets
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote

from aiohttp import web

from .errors import ApiError, unauthorized
from .wire import json_response, read_body

if TYPE_CHECKING:
    from .state import Sandbox

FORM = "application/x-www-form-urlencoded"
TOKEN_BODY_CAP = 8 * 1024
_FORGET_AFTER_S = 86_400.0  # expired tokens are remembered this long, to answer "expired" rather than "unknown"


class TokenIssuer:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._expiry: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def issue(self, now: float) -> str:
        self._expiry = {t: exp for t, exp in self._expiry.items() if exp > now - _FORGET_AFTER_S}
        token = secrets.token_urlsafe(32)
        self._expiry[token] = now + self.ttl_s
        return token

    def live(self, now: float) -> int:
        return sum(1 for exp in self._expiry.values() if exp > now)

    def check(self, token: str, now: float) -> None:
        expires = self._expiry.get(token)
        if expires is None:
            raise unauthorized("invalid_token", "unknown access token (get one at the token endpoint)")
        if now >= expires:
            raise unauthorized("token_expired", f"access token expired {now - expires:.0f} s ago")


def require_bearer(sandbox: Sandbox, request: web.Request) -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("unauthorized", "missing 'Authorization: Bearer <access token>'")
    sandbox.tokens.check(token.strip(), sandbox.clock.now())


def _oauth_error(status: int, code: str, detail: str) -> ApiError:
    """OAuth2 clients read `error_description` (RFC 6749 5.2); ours read `detail`. Both are given."""
    headers = {"WWW-Authenticate": 'Basic realm="token"'} if status == 401 else None
    return ApiError(status, code, detail, headers=headers, extra={"error_description": detail})


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise _oauth_error(401, "invalid_client", "malformed Basic credentials") from exc
    client_id, sep, client_secret = decoded.partition(":")
    if not sep:
        raise _oauth_error(401, "invalid_client", "malformed Basic credentials")
    # RFC 6749 2.3.1: both parts are form-urlencoded before base64
    return unquote(client_id), unquote(client_secret)


async def token_endpoint(sandbox: Sandbox, request: web.Request) -> web.Response:
    options = sandbox.options
    realm = request.match_info["realm"]
    if realm != options.realm:
        raise ApiError(404, "realm_not_found", f"realm '{realm}' does not exist")
    raw = await read_body(request, cap=TOKEN_BODY_CAP, content_type=FORM)
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _oauth_error(
            400, "invalid_request", "body is not a valid form (application/x-www-form-urlencoded)"
        ) from exc
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise _oauth_error(400, "invalid_request", f"parameter '{key}' is repeated")
        form[key] = value  # unknown parameters are ignored, as RFC 6749 3.2 requires
    grant = form.get("grant_type")
    if not grant:
        raise _oauth_error(400, "invalid_request", "missing grant_type")
    if grant != "client_credentials":
        raise _oauth_error(400, "unsupported_grant_type", f"grant_type '{grant}' is not supported here")
    basic = _basic_credentials(request.headers.get("Authorization", ""))
    if basic is not None and ("client_id" in form or "client_secret" in form):
        raise _oauth_error(400, "invalid_request", "use one client authentication method: Basic or form fields")
    client_id, client_secret = basic or (form.get("client_id", ""), form.get("client_secret", ""))
    good = hmac.compare_digest(client_id.encode(), options.cloud_client_id.encode()) & hmac.compare_digest(
        client_secret.encode(), options.cloud_client_secret.encode()
    )
    if not good:
        raise _oauth_error(401, "invalid_client", "invalid client or invalid client credentials")
    token = sandbox.tokens.issue(sandbox.clock.now())
    return json_response(
        {
            "access_token": token,
            "expires_in": math.ceil(options.token_ttl_s),
            "refresh_expires_in": 0,
            "token_type": "Bearer",
            "not-before-policy": 0,
            "scope": form.get("scope", "profile email"),
        },
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )

"""Device claim: `POST /edge/claim` trades a one-time claim token (made in the club's cloud account, carried by
the installer) for this box's credentials: the OAuth client, the signing secret, the Ziggy key, the site and its
courts. No bearer token: the claim token is the credential, good once and for `CLAIM_TTL_S`.

A used token answers 409 `claim_token_used` (with when and by which agent), an expired one 410
`claim_token_expired`, an unknown one 401 `claim_token_unknown`. The sandbox starts with the tokens of
`SandboxOptions.claim_tokens`; `POST /_sandbox/claim-tokens {"ttl_s": ...}` makes more.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from aiohttp import web
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from .errors import ApiError
from .options import ZIGGY_PREFIX
from .wire import explain, json_response, read_json

if TYPE_CHECKING:
    from .state import Sandbox

CLAIM_TTL_S = 7 * 86400.0
BODY_CAP = 4096

Text = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=True)]


class ClaimRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    claim_token: Annotated[str, StringConstraints(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]
    agent_id: Text | None = None  # the box's own id, if the installer set one
    hostname: Text | None = None
    version: Text | None = None


@dataclass(slots=True)
class ClaimToken:
    token: str
    expires_at: float
    used_at: float | None = None
    used_by: str | None = None


class Claims:
    def __init__(self, seeded: tuple[str, ...], now: float) -> None:
        self._tokens = {t: ClaimToken(t, now + CLAIM_TTL_S) for t in seeded}

    def mint(self, now: float, ttl_s: float = CLAIM_TTL_S) -> ClaimToken:
        token = ClaimToken(f"claim-{secrets.token_urlsafe(18)}", now + ttl_s)
        self._tokens[token.token] = token
        return token

    def redeem(self, value: str, agent: str, now: float) -> ClaimToken:
        token = self._tokens.get(value)
        if token is None:
            raise ApiError(401, "claim_token_unknown", "this claim token was never issued: check it for typos")
        if token.used_at is not None:
            raise ApiError(
                409,
                "claim_token_used",
                f"this claim token was already used by agent '{token.used_by}': make a new one in the club's account",
            )
        if now >= token.expires_at:
            raise ApiError(
                410, "claim_token_expired", "this claim token has expired: make a new one in the club's account"
            )
        token.used_at, token.used_by = now, agent
        return token


def routes(sandbox: Sandbox) -> list[web.RouteDef]:
    async def claim(request: web.Request) -> web.Response:
        try:
            body = ClaimRequest.model_validate(await read_json(request, cap=BODY_CAP))
        except ValidationError as exc:
            raise ApiError(422, "invalid_request", explain(exc)) from exc
        options = sandbox.options
        agent_id = body.agent_id or options.cloud_client_id
        sandbox.claims.redeem(body.claim_token, agent_id, sandbox.clock.now())
        base = f"{request.scheme}://{request.host}"
        return json_response(
            {
                "club_id": options.club_id,
                "agent_id": agent_id,
                "site_name": options.site_name,
                "courts": [{"id": court_id, "name": name} for court_id, name in sorted(options.courts.items())],
                "cloud": {
                    "base_url": base,
                    "token_url": f"{base}/realms/{options.realm}/protocol/openid-connect/token",
                    "client_id": options.cloud_client_id,
                    "client_secret": options.cloud_client_secret,
                    "signing_secret": options.signing_secret,
                },
                "ziggy": {
                    "base_url": base + ZIGGY_PREFIX,
                    "client_id": options.ziggy_client_id,
                    "api_key": options.ziggy_api_key,
                },
            }
        )

    return [web.post("/edge/claim", claim, name="cloud.claim")]

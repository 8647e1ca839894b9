"""`make_app(options)`: the sandbox as an aiohttp application, with its routes, faults and JSON errors.

Middleware order matters: faults are outermost, so an injected 503 happens before authentication (as a load
balancer's would) and a garbage or slow fault wraps the real answer, errors included, after the handler acted.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from . import admin, claim, events, members, tokens, tus, ziggy
from .clock import SandboxClock
from .errors import ApiError
from .faults import FAULTABLE_ROUTES, Handler, inject
from .options import ZIGGY_PREFIX, SandboxOptions
from .state import CALL, FAULT, Sandbox
from .wire import json_response

SANDBOX = web.AppKey("sandbox", Sandbox)
CLIENT_MAX_SIZE = admin.BODY_CAP  # the largest per-route cap; each route enforces its own smaller one
_log = logging.getLogger(__name__)
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


@web.middleware
async def _faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.name
    if route is None or route not in FAULTABLE_ROUTES:
        return await handler(request)
    sandbox = request.app[SANDBOX]
    try:
        return await _maybe_faulted(sandbox, route, request, handler)
    finally:
        sandbox.finish(request)


async def _maybe_faulted(sandbox: Sandbox, route: str, request: web.Request, handler: Handler) -> web.StreamResponse:
    drawn = sandbox.faults.draw(route)
    if drawn is None:
        return await handler(request)
    index, rule = drawn
    request[FAULT] = rule.kind
    sandbox.record_call(request)  # logged on arrival: a held or reset call still shows, in order

    def record(acted: bool, status: int | None) -> None:
        entry = request[CALL]
        if entry["status"] is None:  # the handler did not judge its own effect (GETs, token, events)
            entry.update(status=status, acted=acted and status is not None and status < 400)

    return await inject(rule, index, request, handler, record)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.reason
        headers: dict[str, str] = {}
        if isinstance(exc, web.HTTPNotFound):
            detail = f"no route for {request.method} {request.path}"
        elif isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            detail = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
            headers["Allow"] = allowed
        code = _HTTP_CODES.get(exc.status, "http_error")
        return json_response({"error": code, "detail": detail}, status=exc.status, headers=headers)
    except Exception:
        _log.exception("sandbox handler failed: %s %s", request.method, request.path)
        return json_response({"error": "internal_error", "detail": "the sandbox failed; see its log"}, status=500)


def make_app(options: SandboxOptions | None = None, *, clock: SandboxClock | None = None) -> web.Application:
    sandbox = Sandbox(options or SandboxOptions(), clock)
    app = web.Application(middlewares=[_faults, _errors], client_max_size=CLIENT_MAX_SIZE)
    app[SANDBOX] = sandbox

    async def token(request: web.Request) -> web.Response:
        return await tokens.token_endpoint(sandbox, request)

    route_defs: list[Any] = [
        *ziggy.routes(sandbox, ZIGGY_PREFIX),
        web.post("/realms/{realm}/protocol/openid-connect/token", token, name="token"),
        *members.routes(sandbox),
        *events.routes(sandbox),
        *tus.routes(sandbox),
        *claim.routes(sandbox),
        *admin.routes(sandbox),
    ]
    app.add_routes(route_defs)
    named = {r.name for r in app.router.routes() if r.name and not r.name.startswith("sandbox.")}
    assert named == set(FAULTABLE_ROUTES), f"fault routes out of date: {sorted(named ^ set(FAULTABLE_ROUTES))}"
    return app

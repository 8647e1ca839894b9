"""The local HTTP server: liveness, readiness, Prometheus metrics, integration health and the cloud's pull feed.

| route | who may call it |
|---|---|
| GET /healthz, /readyz, /health, /metrics, /api/v1/health/integrations | anyone who reaches the port (no secrets) |
| GET /api/v1/sync/changes, POST /api/v1/sync/ack | the club cloud only: Bearer cloud_pull_token (web/pull.py) |
| the rest of /api/v1/: courts, sessions, check-in/out, consumption... | `[[api.clients]]` by role (web/api.py) |
| GET /tablet/court?court=ID, /tablet/bar?pos=ID, /tablet/desk, /static/... | anyone: a page holds no data |
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..metrics import Metrics
from .api import LocalApi
from .health import IntegrationHealth
from .pull import PullFeedApi


def _page(path: Path) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    async def serve(_: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    return serve


def make_app(
    metrics: Metrics,
    readiness: Callable[[], dict[str, bool]],
    *,
    pull: PullFeedApi | None = None,
    health: IntegrationHealth | None = None,
    api: LocalApi | None = None,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        checks = readiness()
        ready = all(checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def health_view(_: web.Request) -> web.Response:
        """Liveness and readiness in one answer, with what is not ready: for operators and load checks."""
        checks = readiness()
        failing = sorted(name for name, ok in checks.items() if not ok)
        body = {"live": True, "ready": not failing, "checks": checks, "not_ready": failing}
        return web.json_response(body, status=200 if not failing else 503)

    async def metrics_view(_: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()  # gauges read from the store (outbox depth, member list age) are sampled now
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=64 * 1024, middlewares=[api.middleware] if api is not None else [])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/health", health_view)
    if health is not None:
        app.router.add_get("/api/v1/health/integrations", health.view)
    if pull is not None:
        app.router.add_routes(pull.routes())
    if api is not None:
        app.router.add_routes(api.routes())
        static = Path(__file__).parent / "static"
        app.router.add_get("/tablet/court", _page(static / "court.html"))
        app.router.add_get("/tablet/bar", _page(static / "bar.html"))
        app.router.add_get("/tablet/desk", _page(static / "desk.html"))
        app.router.add_static("/static/", static, append_version=False)
    return app

"""Integration metrics at the HTTP transport, the reference document's names: every call to Ziggy or the club
cloud is counted and timed once, whichever part of the agent made it (outbox, member sync, clip upload).

    integration_request_duration_seconds{integration, operation, status=success|error}
    integration_requests_total{integration, operation}
    integration_errors_total{integration, operation, error_type=http_4xx|http_5xx|timeout|network}

`operation` is the method and the path with ids folded (`POST /access/checkin`, `GET /access/sessions/{id}`),
so the label set stays small whatever the traffic.
"""

from __future__ import annotations

import re
import time

import httpx

from ..metrics import Metrics

_ID = re.compile(r"^(?=.*\d)[0-9A-Za-z_.:-]{8,}$|^[0-9]+$")


def operation(request: httpx.Request, prefix: str = "") -> str:
    path = request.url.path
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :] or "/"
    parts = ["{id}" if _ID.match(part) else part for part in path.split("/")]
    return f"{request.method} {'/'.join(parts)}"


class MeteredTransport(httpx.AsyncBaseTransport):
    def __init__(
        self, metrics: Metrics, integration: str, prefix: str = "", inner: httpx.AsyncBaseTransport | None = None
    ):
        self._metrics = metrics
        self._integration = integration
        self._prefix = prefix.rstrip("/")
        self._inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        op = operation(request, self._prefix)
        m = self._metrics
        m.integration_requests.labels(self._integration, op).inc()
        started = time.perf_counter()
        try:
            response = await self._inner.handle_async_request(request)
        except httpx.TimeoutException:
            self._failed(op, "timeout", started)
            raise
        except httpx.TransportError:
            self._failed(op, "network", started)
            raise
        status = response.status_code
        if status >= 400:
            self._failed(op, "http_5xx" if status >= 500 else "http_4xx", started)
        else:
            m.integration_duration.labels(self._integration, op, "success").observe(time.perf_counter() - started)
        return response

    def _failed(self, op: str, error_type: str, started: float) -> None:
        self._metrics.integration_errors.labels(self._integration, op, error_type).inc()
        self._metrics.integration_duration.labels(self._integration, op, "error").observe(time.perf_counter() - started)

    async def aclose(self) -> None:
        await self._inner.aclose()


def metered_client(metrics: Metrics, integration: str, base_url: str = "") -> httpx.AsyncClient:
    """An httpx client whose every call lands in the integration metrics."""
    prefix = httpx.URL(base_url).path if base_url else ""
    return httpx.AsyncClient(transport=MeteredTransport(metrics, integration, prefix))

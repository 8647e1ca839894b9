"""/metrics and /health against a real agent and the sandbox cloud: the reference document's integration metrics
(counted at the HTTP transport, errors by type), decisions by reason, outbox depth and age per destination,
devices online, the member list's age, the storage budget; /health says what is not ready."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ANA, UNKNOWN, Premises, PremisesFactory
from tests.sandboxes import delivered, sandbox_overrides


def sample(text: str, name: str, **labels: str) -> float | None:
    """One sample of the Prometheus text format, by name and (a subset of) labels."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        have = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part)
        if all(have.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    return None


async def test_metrics_cover_integrations_decisions_outbox_devices_and_storage(
    premises_factory: PremisesFactory, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await sandbox_factory({"endpoint": "cloud.events", "kind": "503", "count": 1})
    premises: Premises = await premises_factory(**sandbox_overrides(server, tmp_path / "secrets"))
    async with premises.reader("r1") as reader:
        assert (await reader.tap(ANA)).payload["status"] == "granted"
        assert (await reader.tap(UNKNOWN)).payload["reason"] == "unknown_card"
    await delivered(premises, within=30)
    base = f"http://127.0.0.1:{premises.agent.api_port}"
    async with httpx.AsyncClient(base_url=base) as http:
        text = (await http.get("/metrics")).text
        health = await http.get("/health")
    assert sample(text, "integration_requests_total", integration="cloud", operation="POST /edge/events")
    assert sample(text, "integration_errors_total", integration="cloud", error_type="http_5xx") == 1
    assert sample(text, "integration_requests_total", integration="ziggy", operation="POST /access/checkin") == 1
    assert (
        sample(
            text, "integration_request_duration_seconds_count", integration="ziggy", operation="POST /access/checkin"
        )
        == 1
    )
    assert sample(text, "scans_total", reader="r1", result="denied", reason="unknown_card") == 1
    assert sample(text, "outbox_pending", destination="cloud") == 0
    assert sample(text, "outbox_oldest_pending_age_seconds", destination="ziggy") == 0
    assert sample(text, "devices_configured", kind="reader") == 4
    assert sample(text, "devices_online", kind="reader") is not None
    assert (sample(text, "member_list_age_seconds") or 0) >= 0
    assert (sample(text, "storage_budget_bytes") or 0) > 0
    assert sample(text, "decision_seconds_count") == 2
    assert sample(text, "outbox_clock_steps_total") == 0  # exposed; the clock was never stepped here
    assert (sample(text, "event_loop_lag_seconds_count") or 0) > 0  # the probe runs from the start
    assert health.status_code == 200
    assert health.json() == {"live": True, "ready": True, "checks": health.json()["checks"], "not_ready": []}

"""The presence registry: connections, status messages and silence, and what it reports as changed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agent.config import DeviceConfig
from agent.lan.presence import SILENT_AFTER_S, DeviceState, Presence

T = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)


def registry() -> tuple[Presence, list[tuple[str, str, str]]]:
    changes: list[tuple[str, str, str]] = []

    def record(state: DeviceState) -> None:
        changes.append((state.device_id, state.to_json()["state"], state.how))

    devices = [
        DeviceConfig(id="r1", kind="reader", court="c1"),
        DeviceConfig(id="t1", kind="tablet", court="c1"),
    ]
    return Presence(devices, on_change=record), changes


def test_every_configured_device_starts_offline_and_unknown_ids_are_ignored() -> None:
    presence, changes = registry()
    assert [(s.device_id, s.online, s.how) for s in presence.snapshot()] == [
        ("r1", False, "never_seen"),
        ("t1", False, "never_seen"),
    ]
    presence.connected("intruder", T)
    presence.seen("intruder", T)
    assert presence.get("intruder") is None
    assert changes == []


def test_connect_and_keepalive_loss_are_changes_with_their_cause() -> None:
    presence, changes = registry()
    presence.connected("r1", T)
    presence.seen("r1", T + timedelta(seconds=5))  # a scan: still online, nothing new to publish
    presence.disconnected("r1", "keepalive", T + timedelta(seconds=50))
    assert changes == [("r1", "online", "connected"), ("r1", "offline", "keepalive")]
    state = presence.get("r1")
    assert state is not None
    assert state.since == T + timedelta(seconds=50)
    assert state.last_seen == T + timedelta(seconds=5)
    assert state.to_json()["since"] == "2026-03-02T15:00:50+00:00"


def test_heartbeat_info_is_kept_and_a_change_of_it_is_reported() -> None:
    presence, changes = registry()
    presence.seen("t1", T, how="heartbeat", battery=80, app_version="2.3.0", charging=None)
    presence.seen("t1", T + timedelta(seconds=30), how="heartbeat", battery=80)
    presence.seen("t1", T + timedelta(seconds=60), how="heartbeat", battery=79)
    assert changes == [("t1", "online", "heartbeat"), ("t1", "online", "heartbeat")]
    state = presence.get("t1")
    assert state is not None
    assert state.info == {"battery": 79, "app_version": "2.3.0"}
    assert state.to_json()["battery"] == 79


def test_a_will_is_ignored_while_the_broker_holds_the_connection() -> None:
    """A stale retained 'offline' replayed on subscribe must not hide a connected device."""
    presence, changes = registry()
    presence.connected("r1", T)
    presence.said_offline("r1", T + timedelta(seconds=1))
    assert presence.get("r1").online  # type: ignore[union-attr]
    presence.disconnected("r1", "network", T + timedelta(seconds=2))
    presence.seen("r1", T + timedelta(seconds=3), how="heartbeat")  # e.g. through an external broker
    presence.said_offline("r1", T + timedelta(seconds=4))
    assert changes[-2:] == [("r1", "online", "heartbeat"), ("r1", "offline", "will")]


def test_silent_devices_known_only_from_messages_go_offline() -> None:
    presence, changes = registry()
    presence.connected("r1", T)
    presence.seen("t1", T, how="heartbeat")
    presence.sweep(T + timedelta(seconds=SILENT_AFTER_S - 1))
    assert changes[-1] == ("t1", "online", "heartbeat")
    presence.sweep(T + timedelta(seconds=SILENT_AFTER_S + 1))
    assert changes[-1] == ("t1", "offline", "silent")
    assert presence.get("r1").online  # type: ignore[union-attr]  # connected: silence is fine

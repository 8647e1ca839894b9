"""Prometheus metrics. One registry per agent instance, so several agents can live in one test process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.scans = Counter("scans_total", "Card scans answered", ["reader", "result", "reason"], registry=r)
        self.decision_seconds = Histogram(
            "decision_seconds", "Scan received to decision committed", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.loop_lag = Histogram(
            "event_loop_lag_seconds",
            "How late the agent's event loop ran a 50 ms timer: time every tap waited behind other work",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.rejected = Counter(
            "messages_rejected_total", "Device messages rejected before a decision", ["kind", "reason"], registry=r
        )
        self.replayed = Counter(
            "answers_replayed_total", "Repeated messages answered again without a new effect", ["why"], registry=r
        )
        self.sessions = Counter("sessions_total", "Sessions opened and closed", ["change", "reason"], registry=r)
        self.highlights = Counter("highlights_total", "Highlight button presses", ["status"], registry=r)
        self.clips = Counter(
            "clips_total",
            "Highlight clips by outcome (ready, uploaded, missed, refused, evicted, evicted_uploaded)",
            ["result"],
            registry=r,
        )
        self.press_to_clip_seconds = Histogram(
            "press_to_clip_seconds",
            "Highlight press to finished clip (the 20 s post-roll included)",
            buckets=(20, 21, 22, 23, 25, 30, 45, 60, 120),
            registry=r,
        )
        self.storage_bytes = Gauge(
            "storage_bytes", "What the storage budget counts, by part (database, clips, ring)", ["part"], registry=r
        )
        self.storage_budget_bytes = Gauge("storage_budget_bytes", "The storage budget (media.budget_mb)", registry=r)
        self.clock_corrections = Counter(
            "clock_corrections_total", "Events re-stamped once the clock synced", registry=r
        )
        self.outbox_clock_steps = Counter(
            "outbox_clock_steps_total",
            "Wall clock steps (NTP setting the time) the outbox moved its waiting retries for",
            registry=r,
        )
        self.consumption = Counter("consumption_orders_total", "Bar orders answered", ["status"], registry=r)
        self.heartbeats = Counter("heartbeats_total", "Device heartbeats received", ["kind"], registry=r)
        self.store_errors = Counter("store_errors_total", "Writes the store refused", ["doing"], registry=r)
        self.members_cached = Gauge("members_cached", "Members in the local cache", registry=r)
        self.member_syncs = Counter(
            "member_syncs_total", "Member sync runs from the cloud (ok, failed, superseded)", ["result"], registry=r
        )
        self.member_sync_records = Counter(
            "member_sync_records_total", "Records of applied member syncs", ["kind"], registry=r
        )
        self.mqtt_connected = Gauge("mqtt_connected", "The agent's own MQTT client is connected", registry=r)
        self.mqtt_throttled = Counter(
            "mqtt_publishes_throttled_total",
            "Device PUBLISH packets the embedded broker held back for the device's rate (broker.publish_rate_per_s)",
            registry=r,
        )
        self.queue_depth = Gauge("decision_queue_depth", "Messages waiting for the decision worker", registry=r)
        self.events_pruned = Counter("events_pruned_total", "Events pruned from the log by retention", registry=r)
        self.pull_feed_events = Counter("pull_feed_events_total", "Events served by the cloud's pull feed", registry=r)
        self.pull_feed_acked = Gauge("pull_feed_acked_seq", "Highest seq the cloud acknowledged", registry=r)
        # The reference document's integration metrics (agent/sync/metered.py)
        self.integration_duration = Histogram(
            "integration_request_duration_seconds",
            "Duration of integration requests",
            ["integration", "operation", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.integration_requests = Counter(
            "integration_requests_total",
            "Total number of integration requests",
            ["integration", "operation"],
            registry=r,
        )
        self.integration_errors = Counter(
            "integration_errors_total",
            "Total number of integration errors",
            ["integration", "operation", "error_type"],
            registry=r,
        )
        # Sampled when /metrics is read (Agent.refresh_gauges)
        self.outbox_pending = Gauge("outbox_pending", "Events waiting for a destination", ["destination"], registry=r)
        self.outbox_oldest_age = Gauge(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest event waiting, per destination",
            ["destination"],
            registry=r,
        )
        self.outbox_dead = Gauge("outbox_dead", "Dead-lettered events, per destination", ["destination"], registry=r)
        self.devices_online = Gauge("devices_online", "Devices online now, by kind", ["kind"], registry=r)
        self.devices_known = Gauge("devices_configured", "Devices configured, by kind", ["kind"], registry=r)
        self.member_list_age = Gauge(
            "member_list_age_seconds", "Since the member list was last synced (or imported)", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Read one sample (tests and the status command); 0.0 when absent."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else got

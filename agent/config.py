"""Configuration: one TOML file plus a secrets file, validated by pydantic.

Errors name the key, the value and what is expected, e.g.
`agent.toml: courts[0].hours[0].from = '25:00': expected a time HH:MM (00:00-24:00)`.
Every scalar key can be overridden by an environment variable `CLUB_AGENT_<SECTION>__<KEY>`.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import argon2
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from firmware_bridges.lines import parse_format

from .domain.messages import Language
from .domain.model import Court, Direction, Policy, SecondTap, TimeWindow, UntrustedClock
from .errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/club-agent/agent.toml")
ENV_PREFIX = "CLUB_AGENT_"
AGENT_USERNAME = "agent"  # the agent's own MQTT account; no device may take it
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DAYS = {"mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "sun": 7}
_DAY_NAMES = {
    **_DAYS,
    "monday": 1,
    "tuesday": 2,
    "wednesday": 3,
    "thursday": 4,
    "friday": 5,
    "saturday": 6,
    "sunday": 7,
}
_SECRET_MARKERS = ("password", "secret", "token", "api_key", "apikey")


class KeyedError(ValueError):
    """A cross-field problem that knows which key to blame."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _parse_day(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a weekday name (mon..sun) or number 1..7")
    if isinstance(value, int) and 1 <= value <= 7:
        return value
    if isinstance(value, str) and value.strip().lower() in _DAY_NAMES:
        return _DAY_NAMES[value.strip().lower()]
    raise ValueError("expected a weekday name (mon..sun) or number 1..7")


def _parse_hhmm(value: Any) -> time:
    if isinstance(value, time):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"(\d{1,2}):(\d{2})", value.strip())
        if m:
            hours, minutes = int(m[1]), int(m[2])
            if hours == 24 and minutes == 0:
                return time(0, 0)  # "24:00" ends the day; windows with end <= start span midnight
            if hours < 24 and minutes < 60:
                return time(hours, minutes)
    raise ValueError("expected a time HH:MM (00:00-24:00)")


class HoursConfig(_Model):
    days: list[Annotated[int, BeforeValidator(_parse_day)]] = Field(min_length=1)
    from_: Annotated[time, BeforeValidator(_parse_hhmm)] = Field(alias="from")
    to: Annotated[time, BeforeValidator(_parse_hhmm)]

    def window(self) -> TimeWindow:
        return TimeWindow(days=frozenset(self.days), start=self.from_, end=self.to)


def _check_id(value: str) -> str:
    if not _ID.fullmatch(value):
        raise ValueError("expected 1-64 letters, digits, '_', '.', '-' (it becomes an MQTT topic level)")
    return value


DeviceId = Annotated[str, BeforeValidator(lambda v: _check_id(v) if isinstance(v, str) else v)]


class AgentSection(_Model):
    club_id: str = "club-001"
    agent_id: str = "edge-01"
    name: str = "Club"
    data_dir: Path = Path("/var/lib/club-agent")
    language: Language = Language.PT_BR
    timezone: str = "America/Sao_Paulo"
    secrets_file: Path | None = None  # relative paths are relative to the config file
    trust_clock: bool = False  # treat the wall clock as synced (RTC hat, container host); Pis need NTP

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        # OSError: a zone's directory ("America") read as a zone file raises IsADirectoryError
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise ValueError("expected an IANA time zone such as 'America/Sao_Paulo'") from exc
        return value


class BrokerSection(_Model):
    # embedded: the agent runs its own broker; external: the agent is a client of a broker the site runs
    # (Debian's mosquitto, configured from `club-agent broker export-mosquitto`).
    mode: Literal["embedded", "external"] = "embedded"
    host: str = "0.0.0.0"  # noqa: S104 - the broker serves the premises LAN by design
    port: int = Field(default=1883, ge=0, le=65535)
    ws_port: int = Field(default=0, ge=0, le=65535)  # 0: no websocket listener
    tls_port: int = Field(default=0, ge=0, le=65535)  # 0: no TLS listener
    tls_cert: Path | None = None  # PEM certificate chain for the TLS listener
    tls_key: Path | None = None  # PEM private key for the TLS listener
    allow_anonymous: bool = False
    max_payload_bytes: int = Field(default=4096, ge=256, le=262144)
    max_packet_bytes: int = Field(default=65536, ge=1024, le=268435455)
    max_queued_messages: int = Field(default=1000, ge=1, le=1_000_000)  # per offline persistent session
    persist: bool = True  # retained messages and persistent sessions survive a restart (data_dir/broker.db)
    # Inbound PUBLISH limit per device account, a token bucket (as EMQX's messages_rate): over it, the broker takes
    # the device's next publishes only as tokens come, and stops reading its socket, so TCP slows the device
    # itself; nothing is dropped and the connection stays. The agent's own client is never limited. 20/s is 10x
    # policy.scan_rate_per_s and 4x the premises benchmark's devices; the burst covers a reconnect's replay (a
    # standalone bridge queues up to 256). Embedded mode only. 0: no limit.
    publish_rate_per_s: float = Field(default=20.0, ge=0, le=100_000)
    publish_burst: int = Field(default=300, ge=1, le=1_000_000)
    # external mode: where the site's broker listens; the agent logs in as "agent" with secrets' broker_password
    external_host: str = "127.0.0.1"
    external_port: int = Field(default=1883, ge=1, le=65535)
    external_tls: bool = False
    external_ca: Path | None = None  # CA bundle to verify the external broker's certificate; None: system CAs

    @model_validator(mode="after")
    def _tls(self) -> BrokerSection:
        if self.tls_port and (self.tls_cert is None or self.tls_key is None):
            raise KeyedError(
                "broker.tls_cert", "broker.tls_port is set: broker.tls_cert and broker.tls_key are required"
            )
        return self


class ApiClient(_Model):
    """A caller of the local REST API (a court or bar tablet, the front desk, an operator): its role bounds what
    it may do; its bearer token is `api_tokens.<name>` in the secrets file."""

    name: DeviceId
    role: Literal["court", "bar", "desk", "admin"]
    courts: list[str] = Field(default_factory=list)  # court role: the courts it serves (required)

    @model_validator(mode="after")
    def _courts(self) -> ApiClient:
        if self.role == "court" and not self.courts:
            raise ValueError(f"API client '{self.name}' has role court: list the courts it serves in 'courts'")
        return self


class ApiSection(_Model):
    host: str = "0.0.0.0"  # noqa: S104
    port: int = Field(default=8080, ge=0, le=65535)
    enabled: bool = True
    clients: list[ApiClient] = Field(default_factory=list)


class CatalogueItem(_Model):
    """One item of the bar's grid (`[[bar.items]]`): what the bar tablet offers, at what price."""

    item_id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=128)
    unit_price: float = Field(ge=0, le=10_000)

    @model_validator(mode="after")
    def _cents(self) -> CatalogueItem:
        if round(self.unit_price * 100) != self.unit_price * 100:
            raise ValueError(f"bar item '{self.item_id}': unit_price {self.unit_price} has more than 2 decimals")
        return self


class BarSection(_Model):
    items: list[CatalogueItem] = Field(default_factory=list)


class CameraConfig(_Model):
    """A court's IP camera (`[[cameras]]`): recorded continuously into the ring; a highlight on its court becomes
    a clip cut from the ring. A court without one syncs the highlight marker alone."""

    id: DeviceId
    court: str
    url: str = Field(pattern=r"^rtsps?://[^\s]+$", max_length=512)  # without a password: see camera_passwords
    username: str | None = Field(default=None, max_length=128)  # its password is camera_passwords.<id>
    name: str = ""


class MediaSection(_Model):
    """The ring recorder, the clips and the one storage budget (DESIGN 3 and 5)."""

    # The ring of short segments: about 1 GB/hour at 2 Mbit/s, rewritten all day, so it belongs in RAM (tmpfs),
    # never on the SD card. The unit gives /run/club-agent; a relative path is under data_dir.
    ring_dir: Path = Path("/run/club-agent/ring")
    segment_s: float = Field(default=1, ge=1, le=10)  # cameras need a GOP of this or shorter (see the example)
    ring_keep_s: float = Field(default=90, ge=45, le=600)  # the clip's 10 s pre-roll and 20 s post-roll, and slack
    clips_dir: Path = Path("clips")  # relative: under data_dir
    reencode: bool = False  # frame-exact cuts (a few seconds of a core per clip); off: whole segments, no re-encode
    # Clip uploads yield to sessions and consumption, and to the club's own Wi-Fi while the courts are open.
    upload_kbps_open: int | None = Field(default=4000, ge=64)  # while any court is within its hours; None: no cap
    upload_kbps_closed: int | None = Field(default=None, ge=64)
    # One budget for the ring, the clips and the database: uploaded clips go first, then the oldest clips not yet
    # uploaded (with a warning); records not yet synced never.
    budget_mb: int = Field(default=8192, ge=64)
    warn_pct: int = Field(default=80, ge=10, le=99)
    critical_pct: int = Field(default=95, ge=10, le=100)

    @model_validator(mode="after")
    def _levels(self) -> MediaSection:
        if self.critical_pct <= self.warn_pct:
            raise KeyedError("media.critical_pct", "media.critical_pct must be above media.warn_pct")
        return self


class SyncSection(_Model):
    """The outbox's pace and the event log's retention (DESIGN 3)."""

    # An event is pruned once every destination has it (delivered or dead), the pull feed acked it (when
    # configured), its session is closed, and it is older than this.
    retention_days: float = Field(default=30, ge=0, le=3650)
    prune_interval_s: float = Field(default=300, ge=1, le=86400)
    prune_batch: int = Field(default=200, ge=1, le=10_000)  # events per delete transaction: a tap waits one at most
    replay_per_s: float = Field(default=500, gt=0, le=100_000)  # backlog replay rate after an outage, per destination
    backoff_base_s: float = Field(default=1, gt=0, le=3600)
    backoff_cap_s: float = Field(default=300, gt=0, le=86400)
    # A destination that failed this many calls in a row is left alone this long, then probed (reference doc).
    breaker_failures: int = Field(default=5, ge=1, le=1000)
    breaker_open_s: float = Field(default=60, gt=0, le=3600)

    @model_validator(mode="after")
    def _backoff(self) -> SyncSection:
        if self.backoff_cap_s < self.backoff_base_s:
            raise KeyedError(
                "sync.backoff_cap_s",
                f"sync.backoff_cap_s = {self.backoff_cap_s:g} is below sync.backoff_base_s = {self.backoff_base_s:g}",
            )
        return self


class PolicySection(_Model):
    debounce_s: float = Field(default=3.0, ge=0, le=60)
    second_tap: SecondTap = SecondTap.CHECKOUT
    second_tap_grace_s: float = Field(default=60, ge=0, le=3600)
    void_grace_s: float = Field(default=300, ge=0, le=86400)  # how long after recording a bar line may be voided
    anti_passback_s: float = Field(default=0, ge=0, le=86400)
    max_cache_age_h: float = Field(default=36, gt=0, le=24 * 90)
    untrusted_clock: UntrustedClock = UntrustedClock.LAST_KNOWN
    enforce_hours_untrusted: bool = False
    credits_per_checkin: int = Field(default=1, ge=0, le=100)
    session_max_minutes: int = Field(default=180, ge=1, le=24 * 60)
    scan_rate_per_s: float = Field(default=2.0, gt=0, le=100)
    scan_burst: int = Field(default=5, ge=1, le=1000)


class CourtConfig(_Model):
    id: DeviceId
    name: str = ""
    access_groups: list[str] = Field(default_factory=list)
    hours: list[HoursConfig] = Field(default_factory=list)
    max_session_minutes: int | None = Field(default=None, ge=1, le=24 * 60)


_MOSQUITTO_HASH = re.compile(r"\$7\$\d{1,7}\$[A-Za-z0-9+/=]{4,}\$[A-Za-z0-9+/=]{64,}")


def _check_hash(value: str | None) -> str | None:
    if value is None or _MOSQUITTO_HASH.fullmatch(value):
        return value  # mosquitto's PBKDF2 format: for sites that run mosquitto (broker.mode = "external")
    try:
        argon2.extract_parameters(value)
    except argon2.exceptions.InvalidHashError as exc:
        raise ValueError(
            "expected an argon2 hash, or mosquitto's $7$ PBKDF2 hash ('club-agent devices hash-password' makes either)"
        ) from exc
    return value


def _placed(kind: str, court: str | None, pos: str | None) -> None:
    """A reader stands at a court's door (a tap checks in or out) or at a bar (`pos`: a tap picks the player on
    that bar's tablets and decides nothing); a button is on a court."""
    if kind == "reader" and (court is None) == (pos is None):
        raise ValueError("a reader needs exactly one of 'court' (at a court's door) or 'pos' (at a bar)")
    if kind != "reader" and pos is not None:
        raise ValueError(f"'pos' is for readers at a bar, not a {kind}")
    if kind in ("button", "buttonbox") and not court:
        raise ValueError(f"a {kind} needs 'court'")


class DeviceConfig(_Model):
    id: DeviceId
    kind: Literal["reader", "button", "tablet", "display"]
    court: str | None = None  # readers (or pos) and buttons: required; tablets: optional single court
    courts: list[str] = Field(default_factory=list)  # tablets that serve several courts; empty: all
    pos: str | None = Field(default=None, min_length=1, max_length=64)  # a reader at the bar (see _bound)
    direction: Direction = Direction.IN
    name: str = ""
    password_hash: Annotated[str | None, AfterValidator(_check_hash)] = None

    @model_validator(mode="after")
    def _bound(self) -> DeviceConfig:
        _placed(self.kind, self.court, self.pos)
        if self.id == AGENT_USERNAME:
            raise ValueError(f"id '{AGENT_USERNAME}' is reserved for the agent itself")
        return self

    @property
    def served_courts(self) -> list[str]:
        """Courts a tablet or display may act on; empty means every court."""
        if self.court:
            return [self.court, *[c for c in self.courts if c != self.court]]
        return list(self.courts)


_SERIAL_KINDS = ("rdm6300", "wiegand", "lines", "buttonbox", "osdp")


class ReaderConfig(_Model):
    """A reader or button box attached to the box itself (`[[readers]]`): hosted in-process by the agent, its
    reads decided on the same path as an MQTT reader's. `id` is its device id on the contract (a reader's
    `rfid/{id}/...`, a button box's `button_id`)."""

    id: DeviceId
    kind: Literal["rdm6300", "wiegand", "lines", "buttonbox", "nfc", "osdp", "keywedge"]
    court: str | None = None  # a reader at a court's door, or the button box's court
    pos: str | None = Field(default=None, min_length=1, max_length=64)  # or a reader at this bar
    direction: Direction = Direction.IN
    name: str = ""
    port: str | None = None  # serial device (or pyserial URL) for the serial kinds
    path: str | None = None  # nfc: nfcpy's path ("usb", "tty:AMA0:pn532"); keywedge: the input device
    baud: int = Field(default=9600, ge=1200, le=921_600)
    format: str = "hex"  # lines: how the reader writes ids (firmware_bridges.lines.parse_format)
    address: int = Field(default=0, ge=0, le=126)  # osdp: the reader's address on the bus
    feedback: Literal["line", "none"] = "none"  # serial kinds: the feedback line on the port's TX
    install_mode: bool = False  # osdp: send the reader its key over the factory key (commissioning only)

    @model_validator(mode="after")
    def _where(self) -> ReaderConfig:
        if self.kind in _SERIAL_KINDS and not self.port:
            raise ValueError(f"a {self.kind} reader needs 'port' (for example /dev/ttyUSB0)")
        if self.kind == "nfc" and not self.path:
            raise ValueError("an nfc reader needs 'path' (for example usb or tty:AMA0:pn532)")
        if self.kind == "keywedge" and not self.path:
            raise ValueError("a keywedge reader needs 'path' (for example /dev/input/by-id/usb-...-event-kbd)")
        _placed("buttonbox" if self.kind == "buttonbox" else "reader", self.court, self.pos)
        if self.id == AGENT_USERNAME:
            raise ValueError(f"id '{AGENT_USERNAME}' is reserved for the agent itself")
        if self.kind in ("lines", "keywedge"):
            parse_format(self.format)  # its ValueError names what is wrong
        return self

    def as_device(self) -> DeviceConfig:
        kind: Literal["reader", "button"] = "button" if self.kind == "buttonbox" else "reader"
        return DeviceConfig(
            id=self.id, kind=kind, court=self.court, pos=self.pos, direction=self.direction, name=self.name
        )


class ZiggySection(_Model):
    base_url: str
    client_id: str
    enabled: bool = True


class CloudSection(_Model):
    base_url: str
    token_url: str
    client_id: str
    enabled: bool = True
    # Member sync (agent/sync/members.py): how often the agent pulls the member feed, and its page size
    # (the contract allows at most 5000 per page).
    members_sync_interval_s: float = Field(default=300.0, ge=1.0, le=86_400.0)
    members_page_limit: int = Field(default=5000, ge=1, le=5000)


class Secrets(_Model):
    """Loaded from the secrets file; never logged (SecretStr)."""

    ziggy_api_key: SecretStr | None = None
    cloud_client_secret: SecretStr | None = None
    cloud_signing_secret: SecretStr | None = None
    api_tokens: dict[str, SecretStr] = Field(default_factory=dict)
    broker_password: SecretStr | None = None  # the agent's account on an external broker
    # The cloud's bearer token for the pull feed (/api/v1/sync/...); unset: the feed answers 503.
    cloud_pull_token: SecretStr | None = Field(default=None, min_length=16)
    # OSDP readers' secure channel keys by reader id: 32 hex digits each
    osdp_keys: dict[str, SecretStr] = Field(default_factory=dict)
    # RTSP passwords by camera id (the camera's `username` in the config)
    camera_passwords: dict[str, SecretStr] = Field(default_factory=dict)

    @field_validator("osdp_keys")
    @classmethod
    def _osdp_keys_are_keys(cls, keys: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for reader_id, key in keys.items():
            if not re.fullmatch(r"[0-9A-Fa-f]{32}", key.get_secret_value()):
                # the message never repeats the key
                raise ValueError(f"osdp_keys.{reader_id}: a key is 32 hex digits (16 bytes)")
        return keys


class Config(_Model):
    agent: AgentSection = AgentSection()
    broker: BrokerSection = BrokerSection()
    api: ApiSection = ApiSection()
    policy: PolicySection = PolicySection()
    courts: list[CourtConfig] = Field(default_factory=list)
    devices: list[DeviceConfig] = Field(default_factory=list)
    readers: list[ReaderConfig] = Field(default_factory=list)
    ziggy: ZiggySection | None = None
    cloud: CloudSection | None = None
    sync: SyncSection = SyncSection()
    bar: BarSection = BarSection()
    cameras: list[CameraConfig] = Field(default_factory=list)
    media: MediaSection = MediaSection()
    secrets: Secrets = Secrets()

    @model_validator(mode="after")
    def _cross_check(self) -> Config:
        court_ids = [c.id for c in self.courts]
        for i, court_id in enumerate(court_ids):
            if court_id in court_ids[:i]:
                raise KeyedError(f"courts[{i}].id", f"courts[{i}].id = '{court_id}': court ids must be unique")
        device_ids = [d.id for d in self.devices]
        for i, device_id in enumerate(device_ids):
            if device_id in device_ids[:i]:
                raise KeyedError(f"devices[{i}].id", f"devices[{i}].id = '{device_id}': device ids must be unique")
        item_ids = [item.item_id for item in self.bar.items]
        for i, item_id in enumerate(item_ids):
            if item_id in item_ids[:i]:
                raise KeyedError(f"bar.items[{i}].item_id", f"bar.items[{i}].item_id = '{item_id}': must be unique")
        known = set(court_ids)
        client_names = [c.name for c in self.api.clients]
        for i, client in enumerate(self.api.clients):
            if client.name in client_names[:i]:
                raise KeyedError(f"api.clients[{i}].name", f"api.clients[{i}].name = '{client.name}': must be unique")
            for j, served in enumerate(client.courts):
                if served not in known:
                    raise KeyedError(
                        f"api.clients[{i}].courts[{j}]",
                        f"api.clients[{i}].courts[{j}] = '{served}': not a configured court (courts: {sorted(known)})",
                    )
        camera_courts: list[str] = []
        for i, camera in enumerate(self.cameras):
            taken = [*device_ids, *(r.id for r in self.readers), *(c.id for c in self.cameras[:i])]
            if camera.id in taken:
                raise KeyedError(f"cameras[{i}].id", f"cameras[{i}].id = '{camera.id}': ids must be unique")
            if camera.court not in known:
                raise KeyedError(
                    f"cameras[{i}].court",
                    f"cameras[{i}].court = '{camera.court}': not a configured court (courts: {sorted(known)})",
                )
            if camera.court in camera_courts:
                raise KeyedError(f"cameras[{i}].court", f"cameras[{i}]: court '{camera.court}' already has a camera")
            camera_courts.append(camera.court)
        places: set[str] = set()
        for i, reader in enumerate(self.readers):
            if reader.id in device_ids or reader.id in [r.id for r in self.readers[:i]]:
                raise KeyedError(
                    f"readers[{i}].id", f"readers[{i}].id = '{reader.id}': reader and device ids must be unique"
                )
            if reader.court is not None and reader.court not in known:  # or a bar's (pos)
                raise KeyedError(
                    f"readers[{i}].court",
                    f"readers[{i}].court = '{reader.court}': not a configured court (courts: {sorted(known)})",
                )
            place = reader.port or reader.path or ""
            if reader.kind != "osdp" and place in places:  # OSDP readers share their bus by address
                raise KeyedError(f"readers[{i}].port", f"readers[{i}]: '{place}' is already used by another reader")
            places.add(place)
        for i, device in enumerate(self.devices):
            refs = [("court", device.court)] + [(f"courts[{j}]", c) for j, c in enumerate(device.courts)]
            for where, court in refs:
                if court is not None and court not in known:
                    raise KeyedError(
                        f"devices[{i}].{where}",
                        f"devices[{i}].{where} = '{court}': device '{device.id}' refers to a court that is not "
                        f"configured (courts: {sorted(known)})",
                    )
            if device.password_hash is None and not self.broker.allow_anonymous:
                raise KeyedError(
                    f"devices[{i}].password_hash",
                    f"devices[{i}].password_hash: device '{device.id}' has no password_hash and "
                    f"broker.allow_anonymous is false",
                )
        return self

    # Derived views used by the rest of the agent.

    def domain_courts(self) -> dict[str, Court]:
        default = timedelta(minutes=self.policy.session_max_minutes)
        return {
            c.id: Court(
                court_id=c.id,
                name=c.name or c.id,
                access_groups=frozenset(c.access_groups),
                hours=tuple(h.window() for h in c.hours),
                max_session=timedelta(minutes=c.max_session_minutes) if c.max_session_minutes else default,
            )
            for c in self.courts
        }

    def domain_policy(self) -> Policy:
        p = self.policy
        return Policy(
            timezone=ZoneInfo(self.agent.timezone),
            second_tap=p.second_tap,
            second_tap_grace=timedelta(seconds=p.second_tap_grace_s),
            anti_passback=timedelta(seconds=p.anti_passback_s),
            max_cache_age=timedelta(hours=p.max_cache_age_h),
            untrusted_clock=p.untrusted_clock,
            enforce_hours_untrusted=p.enforce_hours_untrusted,
            credits_per_checkin=p.credits_per_checkin,
        )

    @property
    def all_devices(self) -> list[DeviceConfig]:
        """The LAN devices and the attached readers: everything a decision or the registry may name."""
        return [*self.devices, *(r.as_device() for r in self.readers)]

    @property
    def destinations(self) -> tuple[str, ...]:
        out = []
        if self.ziggy is not None and self.ziggy.enabled:
            out.append("ziggy")
        if self.cloud is not None and self.cloud.enabled:
            out.append("cloud")
        return tuple(out)

    @property
    def db_path(self) -> Path:
        return self.agent.data_dir / "agent.db"

    @property
    def ring_path(self) -> Path:
        return self.agent.data_dir / self.media.ring_dir  # an absolute ring_dir stays as it is

    @property
    def clips_path(self) -> Path:
        return self.agent.data_dir / self.media.clips_dir

    def camera_url(self, camera: CameraConfig) -> str:
        """The camera's RTSP address with its credentials (from the secrets file) for ffmpeg."""
        if camera.username is None:
            return camera.url
        password = self.secrets.camera_passwords.get(camera.id)
        user = quote(camera.username, safe="")
        userinfo = f"{user}:{quote(password.get_secret_value(), safe='')}" if password is not None else user
        scheme, rest = camera.url.split("://", 1)
        return f"{scheme}://{userinfo}@{rest}"


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _error_key(err: Any) -> str | None:
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, KeyedError):
        return cause.key
    return _loc(tuple(err["loc"])) or None


def format_validation_error(
    exc: ValidationError, source: str, *, from_env: Mapping[str, str] | None = None, echo_values: bool = True
) -> str:
    """One line per problem: where, the value given, what is expected.

    Values are never echoed for keys that look secret (an installer may paste a password where its hash
    belongs), nor at all when `echo_values` is false (the secrets file). Keys set from the environment say so.
    """
    lines = []
    for err in exc.errors(include_url=False):
        key = _error_key(err) or ""
        msg = err["msg"].removeprefix("Value error, ")
        secret = any(marker in key.lower() for marker in _SECRET_MARKERS)
        origin = f" (from {from_env[key]})" if from_env and key in from_env else ""
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: {key}{origin}: unknown key (misspelt? see provisioning/agent.example.toml)")
        elif err["type"] == "missing":
            lines.append(f"{source}: {key}: required key is missing")
        elif isinstance((err.get("ctx") or {}).get("error"), KeyedError):
            lines.append(f"{source}: {msg}")
        elif key and echo_values and not secret and not isinstance(err.get("input"), dict | list):
            lines.append(f"{source}: {key} = {_mask_userinfo(repr(err.get('input')))}{origin}: {msg}")
        else:
            lines.append(f"{source}: {key or '(top level)'}{origin}: {msg}")
    return "\n".join(lines)


def _mask_userinfo(text: str) -> str:
    """`text` with the user and password of any URL in it masked (a camera URL may carry its password)."""
    return _USERINFO.sub("://***@", text)


_USERINFO = re.compile(r"://.*@", re.DOTALL)


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Apply overrides; returns which key came from which variable, for error messages."""
    origins: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: section '{section}' is not a table and cannot be overridden", key=section)
        table[key] = value
        origins[f"{section}.{key}"] = name
    return origins


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} not found: {path}") from exc
    except PermissionError as exc:
        raise ConfigError(f"{what} is not readable by this user: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{what} is a directory, expected a file: {path}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not UTF-8 text (save it as UTF-8): {exc.reason}") from exc


def check_secrets_mode(path: Path) -> None:
    """The secrets file must be readable by its owner (and group) only."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise ConfigError(
            f"{path}: secrets file mode is {stat.S_IMODE(mode):04o}; it must not be world-accessible "
            f"or group-writable (fix: chmod 600 {path})",
            key="agent.secrets_file",
        )


def _load_secrets(path: Path) -> Secrets:
    try:
        check_secrets_mode(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"secrets file not found: {path}", key="agent.secrets_file") from exc
    raw = _read_toml(path, "secrets file")
    try:
        return Secrets.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), echo_values=False)) from exc


def parse_config(
    raw: dict[str, Any],
    *,
    source: str = "config",
    base_dir: Path | None = None,
    from_env: Mapping[str, str] | None = None,
) -> Config:
    """Validate a config mapping (already read from TOML); loads the secrets file it names."""
    raw = dict(raw)
    if "secrets" in raw:
        raise ConfigError(f"{source}: secrets: put secrets in the secrets file, not in the config", key="secrets")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ConfigError(format_validation_error(exc, source, from_env=from_env), key=_error_key(first)) from exc
    if base_dir is not None and not cfg.agent.data_dir.is_absolute():
        # Under systemd the working directory is /: a relative data_dir means "next to the config file".
        cfg = cfg.model_copy(update={"agent": cfg.agent.model_copy(update={"data_dir": base_dir / cfg.agent.data_dir})})
    secrets_file = cfg.agent.secrets_file
    if secrets_file is not None:
        if not secrets_file.is_absolute() and base_dir is not None:
            secrets_file = base_dir / secrets_file
        cfg = cfg.model_copy(update={"secrets": _load_secrets(secrets_file)})
    for i, client in enumerate(cfg.api.clients):  # once the secrets are in
        token = cfg.secrets.api_tokens.get(client.name)  # missing: reported at start, the client cannot call
        if token is not None and len(token.get_secret_value()) < 16:
            raise ConfigError(
                f"{source}: api.clients[{i}]: '{client.name}' has a token shorter than 16 characters "
                f"(api_tokens.{client.name} in the secrets file): make it long and random",
                key=f"api.clients[{i}].name",
            )
    for i, reader in enumerate(cfg.readers):
        if reader.kind == "osdp" and reader.id not in cfg.secrets.osdp_keys:
            raise ConfigError(
                f"{source}: readers[{i}]: OSDP reader '{reader.id}' has no key: add osdp_keys.{reader.id} "
                f"(32 hex digits) to the secrets file",
                key=f"readers[{i}].id",
            )
    return cfg


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    raw = _read_toml(path, "config file")
    origins = _apply_env(raw, os.environ if environ is None else environ)
    return parse_config(raw, source=str(path), base_dir=path.parent.resolve(), from_env=origins)

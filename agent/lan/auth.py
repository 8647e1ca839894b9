"""Who may connect to the embedded broker, and what each device may publish and subscribe.

The access list is generated from the configured devices, so a reader can only ever speak for itself:

| kind    | may publish                                               | may subscribe                           |
|---------|-----------------------------------------------------------|-----------------------------------------|
| reader  | rfid/{id}/scan, rfid/{id}/status                          | rfid/{id}/response, agent/status        |
| button  | court/{court}/button/pressed, button/{id}/status          | court/{court}/button/ack, agent/status  |
| tablet  | tablet/{id}/status, court/{c}/checkin, court/{c}/checkout | tablet/{id}/#, court/{c}/#, agent/status, |
|         | pos/{id}/consumption (a bar tablet is its own point of sale) | agent/presence/#                     |
| display | display/{id}/status                                       | court/{c}/#, agent/status,              |
|         |                                                           | agent/presence/#                        |

`{c}` is each court the tablet or display serves (`+` when it serves them all).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import argon2

from ..config import AGENT_USERNAME, DeviceConfig
from ..logs import OnceLogger, get_logger
from .topics import AGENT_STATUS, PRESENCE_PREFIX, covers, matches

PRESENCE = f"{PRESENCE_PREFIX}/#"

log = get_logger("agent.lan.auth")

# OWASP's minimum argon2id profile. Device passwords are random 128-bit tokens, so the hash only has to make
# a stolen config useless, not protect a human's guessable password; a Pi with 1 GB cannot spare 64 MiB a verify.
HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


# mosquitto's password-file format, PBKDF2-HMAC-SHA512 `$7$<iterations>$<salt>$<hash>`: what a device needs when
# the site runs mosquitto (broker.mode = "external"), and what the embedded broker checks as well. Device
# passwords are random tokens, so the iteration count only has to make a stolen file useless; mosquitto checks
# passwords on its one thread, so each check must stay a few milliseconds on a Pi.
PBKDF2_ITERATIONS = 10_000
_PBKDF2 = re.compile(r"\$7\$(\d{1,7})\$([A-Za-z0-9+/=]{4,})\$([A-Za-z0-9+/=]{64,})")


def hash_password(password: str, scheme: Literal["argon2", "pbkdf2"] = "argon2") -> str:
    if scheme == "pbkdf2":
        salt = secrets.token_bytes(12)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
        return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    return HASHER.hash(password)


def is_pbkdf2_hash(value: str) -> bool:
    return _PBKDF2.fullmatch(value) is not None


def verify_password(stored: str, password: str) -> bool:
    """Check a password against an argon2 or a mosquitto PBKDF2 hash (slow by design: call off the loop)."""
    m = _PBKDF2.fullmatch(stored)
    if m is not None:
        iterations, salt, expected = int(m[1]), base64.b64decode(m[2]), base64.b64decode(m[3])
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
        return hmac.compare_digest(digest, expected)
    try:
        return bool(HASHER.verify(stored, password))
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


@dataclass(frozen=True, slots=True)
class Rules:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def rules_for(device: DeviceConfig) -> Rules:
    i = device.id
    courts = device.served_courts or ["+"]
    if device.kind == "reader":
        return Rules((f"rfid/{i}/scan", f"rfid/{i}/status"), (f"rfid/{i}/response", AGENT_STATUS))
    if device.kind == "button":
        c = device.court
        return Rules((f"court/{c}/button/pressed", f"button/{i}/status"), (f"court/{c}/button/ack", AGENT_STATUS))
    if device.kind == "tablet":
        publish = [f"tablet/{i}/status", f"pos/{i}/consumption"]
        for c in courts:
            publish += [f"court/{c}/checkin", f"court/{c}/checkout"]
        return Rules(tuple(publish), (f"tablet/{i}/#", *(f"court/{c}/#" for c in courts), AGENT_STATUS, PRESENCE))
    return Rules((f"display/{i}/status",), (*(f"court/{c}/#" for c in courts), AGENT_STATUS, PRESENCE))


EVERYTHING = Rules(("#",), ("#",))


@dataclass
class DeviceDirectory:
    """Credentials and access rules for every account of the broker."""

    devices: Iterable[DeviceConfig]
    agent_password: str
    allow_anonymous: bool = False
    on_denied: Callable[[str, str], None] | None = None  # (action, username) for metrics
    _hashes: dict[str, str] = field(init=False, default_factory=dict)
    _rules: dict[str, Rules] = field(init=False, default_factory=dict)
    _verified: dict[str, bytes] = field(init=False, default_factory=dict)
    # One thread for every verify: each needs 19 MiB, and glibc keeps what a thread's arena once grew to.
    _verifier: ThreadPoolExecutor = field(
        init=False, default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="argon2")
    )
    _once: OnceLogger = field(init=False, default_factory=lambda: OnceLogger(log))

    def __post_init__(self) -> None:
        for device in self.devices:
            if device.password_hash:
                self._hashes[device.id] = device.password_hash
            self._rules[device.id] = rules_for(device)
        self._rules[AGENT_USERNAME] = EVERYTHING

    def close(self) -> None:
        self._verifier.shutdown(wait=False, cancel_futures=True)

    def rules(self, username: str | None) -> Rules | None:
        if username is None:
            return EVERYTHING if self.allow_anonymous else None
        return self._rules.get(username)

    def _denied(self, action: str, username: str | None, detail: str) -> None:
        self._once.warning("mqtt_denied", f"{action}:{username}", action=action, username=username, detail=detail)
        if self.on_denied is not None:
            self.on_denied(action, username or "anonymous")

    async def check_password(self, username: str, password: str) -> bool:
        if username == AGENT_USERNAME:
            return hmac.compare_digest(password.encode(), self.agent_password.encode())
        stored = self._hashes.get(username)
        if stored is None:
            return False
        digest = hashlib.sha256(password.encode()).digest()
        known = self._verified.get(username)
        if known is not None:
            return hmac.compare_digest(known, digest)
        # One verify at a time (a single thread): each costs 19 MiB and ~30 ms of a Pi core; a reconnect storm
        # after a Wi-Fi outage is then served from the verified cache above after each device's first connect.
        ok = await asyncio.get_running_loop().run_in_executor(self._verifier, verify_password, stored, password)
        if ok:
            self._verified[username] = digest
        return bool(ok)

    async def authenticate(
        self, username: str | None, password: str | None, client_id: str | None, will_topic: str | None
    ) -> bool:
        if not username:
            if not self.allow_anonymous:
                self._denied("connect", None, "anonymous clients are not allowed")
            return self.allow_anonymous
        if not await self.check_password(username, password or ""):
            self._denied("connect", username, "unknown user or wrong password")
            return False
        # A client id names a persistent session; another device must not be able to take it over.
        if (
            client_id
            and username != AGENT_USERNAME
            and not (client_id == username or client_id.startswith((f"{username}-", "amqtt/")))
        ):
            self._denied("connect", username, f"client id '{client_id}' must be '{username}' or '{username}-...'")
            return False
        # The broker publishes a will without an ACL check, so the will topic is checked here.
        if will_topic and not self.may_publish(username, will_topic):
            self._denied("connect", username, f"will topic '{will_topic}' is outside the device's access list")
            return False
        return True

    def may_publish(self, username: str | None, topic: str) -> bool:
        rules = self.rules(username)
        ok = rules is not None and any(matches(topic, allowed) for allowed in rules.publish)
        if not ok:
            self._denied("publish", username, topic)
        return ok

    def allows_subscribe(self, username: str | None, topic_filter: str) -> bool:
        rules = self.rules(username)
        return rules is not None and any(covers(allowed, topic_filter) for allowed in rules.subscribe)

    def may_subscribe(self, username: str | None, topic_filter: str) -> bool:
        ok = self.allows_subscribe(username, topic_filter)
        if not ok:
            self._denied("subscribe", username, topic_filter)
        return ok

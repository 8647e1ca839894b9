"""Fuzz target: the config and secrets files as the agent loads them (agent/config.py `load_config`: TOML,
environment overrides, pydantic, the secrets file, the checks across both).

The input's first byte picks what is fuzzed: the config file's bytes, the secrets file's bytes, or the choices
of a few changes to a good config (or good secrets), written as TOML. Secret values in those changes (under a
key that names a password, secret, token or key, the password of a camera URL, every value of the secrets
file) carry a marker. Rules: loading raises nothing but ConfigError (naming a key or none); its message never
contains a secret value; a config that loads also gives the views the agent starts from (courts, policy,
devices, camera URLs). `python -m tests.fuzz.fuzz_config [libFuzzer flags]` fuzzes it under atheris."""

from __future__ import annotations

import copy
import sys
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from agent import config
from agent.config import load_config
from agent.errors import ConfigError
from firmware_bridges import lines

from . import _harness
from ._support import NUMBERS, TEXTS, Draw, Known, quiet_logs, scratch_dir, tolerated, toml_text

CANARY = "Kq7Zx"  # marks a secret value; appears nowhere else
SECRET_MARKERS = ("password", "secret", "token", "api_key", "apikey")
HASH = "$7$101$c2FsdHNhbHRzYWx0$" + "A" * 86 + "=="  # mosquitto's PBKDF2 format (not checked beyond its shape)
GOOD: dict[str, Any] = {
    "agent": {"club_id": "club-1", "agent_id": "edge-1", "data_dir": "data", "timezone": "America/Sao_Paulo"},
    "broker": {"host": "127.0.0.1", "port": 1883, "max_payload_bytes": 4096},
    "api": {"clients": [{"name": "desk", "role": "desk"}, {"name": "court-c1", "role": "court", "courts": ["c1"]}]},
    "policy": {"debounce_s": 3, "second_tap": "checkout", "session_max_minutes": 120},
    "courts": [
        {
            "id": "c1",
            "name": "Quadra 1",
            "access_groups": ["padel"],
            "hours": [{"days": ["mon", 2, "Sunday"], "from": "06:00", "to": "24:00"}],
        },
        {"id": "c2", "max_session_minutes": 90},
    ],
    "devices": [
        {"id": "r1", "kind": "reader", "court": "c1", "password_hash": HASH},
        {"id": "rb", "kind": "reader", "pos": "bar-1", "password_hash": HASH},
        {"id": "t1", "kind": "tablet", "courts": ["c1", "c2"], "password_hash": HASH},
    ],
    "readers": [
        {"id": "rd1", "kind": "lines", "court": "c2", "port": "/dev/ttyUSB0", "format": "hex:prefix=ID:,suffix=;"},
        {"id": "bb1", "kind": "buttonbox", "court": "c1", "port": "/dev/ttyUSB1"},
    ],
    "cameras": [{"id": "cam1", "court": "c1", "url": "rtsp://10.0.0.5/stream1", "username": "viewer"}],
    "bar": {"items": [{"item_id": "agua", "name": "Água 500 ml", "unit_price": 4.5}]},
    "media": {"warn_pct": 80, "critical_pct": 95},
    "sync": {"backoff_base_s": 1, "backoff_cap_s": 300},
    "cloud": {"base_url": "https://cloud.test", "token_url": "https://cloud.test/token", "client_id": "edge-1"},
}
GOOD_SECRETS: dict[str, Any] = {
    "api_tokens": {"desk": "tok-desk-0123456789", "court-c1": "tok-court-c1-0123456789"},
    "cloud_client_secret": "client-secret",
    "cloud_pull_token": "pull-token-0123456789",
    "camera_passwords": {"cam1": "camera-password"},
    "osdp_keys": {"o1": "00112233445566778899AABBCCDDEEFF"},
}
KEYS = (
    *("agent", "broker", "api", "policy", "courts", "devices", "readers", "cameras", "bar", "media", "sync"),
    *("cloud", "ziggy", "secrets", "id", "name", "kind", "court", "courts", "pos", "port", "path", "format"),
    *("hours", "days", "from", "to", "timezone", "data_dir", "secrets_file", "tls_port", "tls_cert", "mode"),
    *("url", "username", "items", "item_id", "unit_price", "clients", "role", "password_hash", "api_token"),
    *("client_secret", "api_tokens", "osdp_keys", "camera_passwords", "cloud_pull_token", "language", "address"),
)
STRINGS = (
    *("c1", "c2", "c9", "r1", "desk", "agent", "reader", "button", "tablet", "display", "lines", "osdp", "nfc"),
    *("keywedge", "court", "bar", "admin", "mon", "sun", "06:00", "24:00", "25:00", "7:5", "hex", "decimal:4"),
    *("hex:prefix=", "hex:min=9,max=2", "decimal:0", "hex:bogus=1", "America/Sao_Paulo", "UTC", "America"),
    *("Etc", "Mars/Olympus", "posixrules", "/dev/ttyUSB0", "rtsp://cam/1", "external", "pt-BR", "en", "in"),
)
GOOD_TOML, GOOD_SECRETS_TOML = toml_text(GOOD), toml_text(GOOD_SECRETS)
TOML_VALUES = (time(6, 0), time(23, 59, 59, 999999), date(2026, 3, 2), datetime(2026, 3, 2, 15, 0))

_dir: Path | None = None
_written: dict[Path, bytes] = {}


def files() -> tuple[Path, Path]:
    global _dir
    if _dir is None:
        _dir = Path(scratch_dir("config-"))
        (_dir / "secrets.toml").touch(mode=0o600)
    return _dir / "agent.toml", _dir / "secrets.toml"


def write(path: Path, content: bytes | str) -> None:
    """`content` into `path`, unless it holds it already (most runs change one file of the two)."""
    data = content.encode() if isinstance(content, str) else content
    if _written.get(path) != data:
        path.write_bytes(data)
        _written[path] = data


def _load(data: bytes) -> None:
    """The config file `data`, with good secrets, checked."""
    config_path, secrets_path = files()
    write(config_path, data)
    write(secrets_path, toml_text(GOOD_SECRETS))
    check(config_path, secrets_path)


def _load_secrets(_: bytes) -> None:
    """Good config, and secrets with the OSDP key where its table belongs."""
    config_path, secrets_path = files()
    write(config_path, toml_text(GOOD))
    write(secrets_path, f'osdp_keys = "{CANARY}00112233445566778899AABBCC"\n')
    check(config_path, secrets_path)


REGRESSIONS: list[bytes] = [b"\x00agent = 1\n", b"\x00secrets = {}\n", b"\x01api_tokens = {desk = 7}\n"]
KNOWN: list[Known] = []
# Reported bugs that are fixed: test_fuzz_agent.py runs each check as a plain (passing) regression test.
FIXED: list[Known] = [
    # A config file that is not UTF-8 (a club name saved from a Windows editor, "S\xe3o Paulo"): tomllib.load
    # raises UnicodeDecodeError, which _read_toml does not catch (TOMLDecodeError, OSError kinds only), so the
    # agent and `club-agent doctor` end in a traceback instead of the ConfigError naming the file.
    Known("config_not_utf8", UnicodeDecodeError, "_read_toml", b'[agent]\nname = "S\xe3o Paulo"\n', _load),
    # timezone = "America" (a zone's directory): ZoneInfo raises IsADirectoryError (CPython's zoneinfo reading
    # the tzdata package), which AgentSection._tz does not catch (ZoneInfoNotFoundError, ValueError), so it
    # escapes pydantic and parse_config as it is. Without the tzdata package it is ZoneInfoNotFoundError.
    Known("timezone_a_directory", IsADirectoryError, "_tz", b'[agent]\ntimezone = "America"\n', _load),
    # The secrets file's errors echo values: _load_secrets calls format_validation_error without
    # echo_values=False (its docstring says the secrets file passes it), so only keys with a secret-looking name
    # are hidden, and osdp_keys is not one: `osdp_keys = "00112233445566778899AABBCCDDEEFF"` (the table
    # forgotten) prints the reader's key.
    Known("secrets_file_values_echoed", AssertionError, "_secrets_file_not_echoed", b"", _load_secrets),
    # A camera URL with a password in it (the installer did not use camera_passwords) that fails the URL
    # pattern (a space, say) is echoed whole in the error: the key "cameras[0].url" names no secret.
    Known(
        "camera_url_password_echoed",
        AssertionError,
        "_camera_url_password_not_echoed",
        b'courts = [{id = "c1"}]\ncameras = [{id = "cam1", court = "c1", url = "rtsp://admin:Kq7Zx@cam /1"}]\n',
        _load,
    ),
]


def value(draw: Draw, key: str | int, depth: int = 0) -> Any:
    """A TOML value for `key`: a marked secret under a secret-looking key."""
    if isinstance(key, str) and any(marker in key.lower() for marker in SECRET_MARKERS):
        return CANARY + draw.text(12)
    if key == "url" and draw.chance(2):
        return f"rtsp://admin:{CANARY}{draw.text(6)}@cam{draw.pick(('', ' ', '/1', '/a b'))}"
    kind = draw.below(9 if depth < 2 else 6)
    if kind <= 2:
        return draw.pick(STRINGS) if draw.below(3) else draw.pick(TEXTS) if draw.chance(2) else draw.text(20)
    if kind == 3:
        number = draw.pick(NUMBERS)
        return number if not isinstance(number, int) or -(2**63) <= number < 2**63 else draw.below(256)
    if kind == 4:
        return bool(draw.below(2))
    if kind == 5:
        return draw.pick(TOML_VALUES)
    if kind <= 7:
        return [value(draw, i, depth + 1) for i in range(draw.below(3))]
    return {draw.pick(KEYS): value(draw, draw.pick(KEYS), depth + 1) for _ in range(draw.below(3))}


def mutate(draw: Draw, doc: dict[str, Any], secrets: bool) -> None:
    """A few changes: a value set (or a key removed) somewhere in `doc`."""
    for _ in range(1 + draw.below(3)):
        node: Any = doc
        for _depth in range(4):
            if isinstance(node, dict):
                key: str | int = draw.pick(list(node) or KEYS) if draw.below(4) else draw.pick(KEYS)
            elif isinstance(node, list) and node:
                key = draw.below(len(node))
            else:
                break
            child = node[key] if isinstance(node, list) or key in node else None  # type: ignore[index]
            if isinstance(child, dict | list) and child and draw.below(3):
                node = child
                continue
            if isinstance(node, dict) and draw.chance(5):
                node.pop(key, None)
            else:
                new = CANARY + draw.text(24) if secrets else value(draw, key)
                if secrets and draw.chance(4):
                    new = {draw.pick(("desk", "court-c1", "cam1", "o1")): new}
                node[key] = new
            break


def TestOneInput(data: bytes) -> None:
    draw = Draw(data)
    mode = draw.below(4)
    config_path, secrets_path = files()
    if mode == 0:
        write(config_path, draw.rest())
        write(secrets_path, GOOD_SECRETS_TOML)
    elif mode == 1:
        write(config_path, GOOD_TOML)
        write(secrets_path, draw.rest())
    else:
        doc, secrets = copy.deepcopy(GOOD), copy.deepcopy(GOOD_SECRETS)
        mutate(draw, doc if mode == 2 else secrets, secrets=mode == 3)
        write(config_path, toml_text(doc))
        write(secrets_path, toml_text(secrets))
    try:
        check(config_path, secrets_path)
    except Exception as exc:
        if not tolerated(exc, KNOWN):
            raise


def check(config_path: Path, secrets_path: Path) -> None:
    try:
        cfg = load_config(config_path, {"CLUB_AGENT_AGENT__SECRETS_FILE": secrets_path.name})
    except ConfigError as exc:
        refused(exc, secrets_path)
        return
    # what the agent builds from a config at start
    cfg.domain_courts()
    cfg.domain_policy()
    assert len({d.id for d in cfg.all_devices}) == len(cfg.all_devices)
    for camera in cfg.cameras:
        assert cfg.camera_url(camera).startswith(camera.url.split("://", 1)[0] + "://")
    for reader in cfg.readers:
        if reader.kind in ("lines", "keywedge"):
            lines.parse_format(reader.format)


def refused(exc: ConfigError, secrets_path: Path) -> None:
    message = str(exc)
    assert message
    assert exc.key is None or isinstance(exc.key, str)
    _secrets_file_not_echoed(message, secrets_path)
    _no_secret_echoed(message)
    _camera_url_password_not_echoed(message)


def _secrets_file_not_echoed(message: str, secrets_path: Path) -> None:
    leaks = [line for line in message.splitlines() if CANARY in line and line.startswith(str(secrets_path))]
    assert not leaks, leaks


def _no_secret_echoed(message: str) -> None:
    leaks = [line for line in message.splitlines() if CANARY in line and ".url = " not in line]
    assert not leaks, leaks


def _camera_url_password_not_echoed(message: str) -> None:
    assert CANARY not in message, message


if __name__ == "__main__":
    quiet_logs()
    _harness.fuzz(TestOneInput, config, sys.modules[__name__])

"""Device claim: `club-agent provision claim --token T` trades the installer's one-time claim token with the
cloud (`POST /edge/claim`, agent/contracts/cloud.openapi.yaml) for this box's credentials and identity.

The secrets (cloud client secret, signing secret, Ziggy key) go into the secrets file, written atomically with
mode 0600; the ids, the cloud and Ziggy addresses and the site's courts go into the config. Both files are edited
line by line, so the installer's comments stay, and the result must load (`load_config`) or both are put back
as they were. Claiming again with a new token replaces the credentials and keeps everything else.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .config import Config, load_config
from .errors import AgentError

CLAIM_TIMEOUT = httpx.Timeout(15.0, connect=5.0)
_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?\s*(#.*)?$")


class ClaimRefused(AgentError):
    """The cloud refused the token (unknown, used, expired) or the claim itself: nothing was changed."""


class ClaimFailed(AgentError):
    """The cloud could not be asked, or answered something that is not a claim: nothing was changed."""


@dataclass(frozen=True, slots=True)
class Claimed:
    club_id: str
    agent_id: str
    site_name: str
    courts: list[tuple[str, str]]
    config_path: Path
    secrets_path: Path


def _toml(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def set_keys(text: str, section: str | None, values: dict[str, str]) -> str:
    """`text` (TOML) with `key = "value"` set for each of `values` in `section` (None: the top level, before the
    first table). A key already there is replaced on its line; a missing one is added; a missing section too."""
    lines = text.splitlines()
    start, end = 0, len(lines)  # the section's body: [start, end)
    if section is None:
        end = next((i for i, line in enumerate(lines) if _HEADER.match(line)), len(lines))
    else:
        header = next(
            (
                i
                for i, line in enumerate(lines)
                if (m := _HEADER.match(line)) and m.group(1) == section and "[[" not in line
            ),
            None,
        )
        if header is None:
            lines += ["", f"[{section}]"]
            header = len(lines) - 1
        start = header + 1
        end = next((i for i in range(start, len(lines)) if _HEADER.match(lines[i])), len(lines))
    for key, value in values.items():
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        found = next((i for i in range(start, end) if pattern.match(lines[i])), None)
        line = f"{key} = {_toml(value)}"
        if found is not None:
            lines[found] = line
        else:
            at = end
            while at > start and not lines[at - 1].strip():  # before the blank lines that close the section
                at -= 1
            lines.insert(at, line)
            end += 1
    return "\n".join(lines) + "\n"


def add_courts(text: str, courts: list[tuple[str, str]]) -> str:
    """`text` with a `[[courts]]` block for each claimed court the config does not have yet."""
    have = {c.get("id") for c in tomllib.loads(text).get("courts", [])}
    blocks = [
        f"\n[[courts]]\nid = {_toml(court_id)}\nname = {_toml(name)}\n"
        for court_id, name in courts
        if court_id not in have
    ]
    return text.rstrip("\n") + "\n" + "".join(blocks) if blocks else text


def _write_atomically(path: Path, text: str, mode: int) -> None:
    """Replace `path` whole (a crash leaves the old or the new file), keeping its owner and group: the service
    reads these files as its own user, and a claim run by root must not take them away from it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        before = path.stat()
        owner: tuple[int, int] | None = (before.st_uid, before.st_gid)
    except FileNotFoundError:
        owner = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        if owner is not None and hasattr(os, "fchown"):
            os.fchown(fd, *owner)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _store(config_path: Path, old_config: str, new_config: str, secrets_path: Path, secrets: dict[str, str]) -> Config:
    """Write the secrets, then the config; if the result does not load, put both back. Blocking: a thread."""
    old_secrets = secrets_path.read_text(encoding="utf-8") if secrets_path.exists() else None
    config_mode = config_path.stat().st_mode & 0o777
    _write_atomically(secrets_path, set_keys(old_secrets or "", None, secrets), 0o600)
    _write_atomically(config_path, new_config, config_mode)
    try:
        return load_config(config_path)
    except AgentError as exc:
        _write_atomically(config_path, old_config, config_mode)
        if old_secrets is None:
            secrets_path.unlink(missing_ok=True)
        else:
            _write_atomically(secrets_path, old_secrets, 0o600)
        raise ClaimFailed(
            f"the claimed settings do not load ({exc}); both files were put back as they were. The token is used"
            " now: fix the config, then claim with a new token"
        ) from exc


def _field(doc: Any, *path: str) -> str:
    value = doc
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, str) or not value:
        raise ClaimFailed(f"the cloud's claim answer has no {'.'.join(path)}: is {'/edge/claim'} a club cloud?")
    return value


async def claim(
    config_path: Path,
    token: str,
    *,
    cloud_url: str | None = None,
    client: httpx.AsyncClient | None = None,
    version: str = "",
) -> Claimed:
    """Trade `token` and write what it gives; raises ClaimRefused or ClaimFailed and then changes nothing."""
    config_text = await asyncio.to_thread(config_path.read_text, encoding="utf-8")
    raw = tomllib.loads(config_text)
    base = cloud_url or raw.get("cloud", {}).get("base_url")
    if not base:
        raise ClaimFailed("no cloud address: give --cloud-url or set [cloud] base_url in the config")
    agent_id = raw.get("agent", {}).get("agent_id")
    body = {"claim_token": token.strip(), "hostname": socket.gethostname()[:128] or "club-agent"}
    if agent_id:
        body["agent_id"] = agent_id
    if version:
        body["version"] = version
    own = client is None
    http = client or httpx.AsyncClient(timeout=CLAIM_TIMEOUT)
    try:
        response = await http.post(f"{base.rstrip('/')}/edge/claim", json=body)
    except httpx.HTTPError as exc:
        raise ClaimFailed(
            f"cannot reach the cloud at {base}: {type(exc).__name__} {exc}; the token is still good"
        ) from exc
    finally:
        if own:
            await http.aclose()
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code in (401, 409, 410, 422):
        detail = answer.get("detail") if isinstance(answer, dict) else None
        raise ClaimRefused(f"the cloud refused the claim ({response.status_code}): {detail or response.reason_phrase}")
    if response.status_code != 200 or not isinstance(answer, dict):
        raise ClaimFailed(f"the cloud answered {response.status_code} {response.reason_phrase} to the claim; try again")

    courts = [
        (str(c["id"]), str(c.get("name") or c["id"]))
        for c in answer.get("courts", [])
        if isinstance(c, dict) and isinstance(c.get("id"), str)
    ]
    agent_values = {
        "club_id": _field(answer, "club_id"),
        "agent_id": _field(answer, "agent_id"),
        "name": _field(answer, "site_name"),
    }
    cloud_values = {
        "base_url": _field(answer, "cloud", "base_url"),
        "token_url": _field(answer, "cloud", "token_url"),
        "client_id": _field(answer, "cloud", "client_id"),
    }
    secrets = {
        "cloud_client_secret": _field(answer, "cloud", "client_secret"),
        "cloud_signing_secret": _field(answer, "cloud", "signing_secret"),
    }
    ziggy = answer.get("ziggy")
    new_config = set_keys(config_text, "cloud", cloud_values)
    if isinstance(ziggy, dict):
        secrets["ziggy_api_key"] = _field(answer, "ziggy", "api_key")
        new_config = set_keys(
            new_config,
            "ziggy",
            {"base_url": _field(answer, "ziggy", "base_url"), "client_id": _field(answer, "ziggy", "client_id")},
        )
    secrets_name = raw.get("agent", {}).get("secrets_file")
    if not secrets_name:
        secrets_name = "secrets.toml"
        agent_values["secrets_file"] = secrets_name
    new_config = add_courts(set_keys(new_config, "agent", agent_values), courts)
    secrets_path = Path(secrets_name) if Path(secrets_name).is_absolute() else config_path.parent / secrets_name
    loaded = await asyncio.to_thread(_store, config_path, config_text, new_config, secrets_path, secrets)
    return Claimed(loaded.agent.club_id, loaded.agent.agent_id, loaded.agent.name, courts, config_path, secrets_path)

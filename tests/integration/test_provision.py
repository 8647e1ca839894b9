"""`club-agent provision claim`: the real console script against the sandbox cloud's /edge/claim. The secrets
land in the secrets file with mode 0600, the ids, addresses and courts in the config (its comments kept), and a
used, expired or unknown token, or an unreachable cloud, is refused clearly with nothing changed."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from agent.config import load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "provisioning" / "agent.example.toml"


async def claim(config: Path, token: str, cloud_url: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "agent.cli", "provision", "claim", "--config", str(config), "--cloud-url", cloud_url]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    if token.startswith("sandbox-claim-0001"):
        args += ["--token", token]
    else:  # the other way, which keeps the token out of `ps`
        env["CLUB_AGENT_CLAIM_TOKEN"] = token
    return await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=60, env=env)


def snapshot(*paths: Path) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.exists() else None for p in paths}


async def test_a_claim_writes_the_credentials_and_a_token_works_once(
    sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await sandbox_factory(courts={"c1": "Quadra 1", "c7": "Quadra de areia 7"})
    config = tmp_path / "agent.toml"
    shutil.copy(EXAMPLE, config)
    secrets = tmp_path / "secrets.toml"
    if os.geteuid() == 0:  # the service's user owns its files: a claim run by root keeps them the service's
        os.chown(config, 65534, 65534)

    done = await claim(config, "sandbox-claim-0001", server.url)
    assert done.returncode == 0, done.stderr
    assert "claimed: club club-001" in done.stdout
    assert "sandbox-cloud-client-secret" not in done.stdout + done.stderr  # secrets are never printed
    assert oct(secrets.stat().st_mode & 0o777) == "0o600"
    if os.geteuid() == 0:
        assert (config.stat().st_uid, config.stat().st_gid) == (65534, 65534)
    stored = tomllib.loads(secrets.read_text())
    s = server.settings
    assert stored == {
        "cloud_client_secret": s.cloud_client_secret,
        "cloud_signing_secret": server.sandbox.options.signing_secret,
        "ziggy_api_key": s.ziggy_api_key,
    }
    loaded = load_config(config)
    assert loaded.cloud is not None
    assert loaded.ziggy is not None
    assert (loaded.cloud.base_url, loaded.cloud.client_id) == (server.url, s.cloud_client_id)
    assert loaded.ziggy.base_url.startswith(server.url)
    assert loaded.agent.name == "Arena Sandbox"
    assert {c.id: c.name for c in loaded.courts}["c7"] == "Quadra de areia 7"  # a court the config lacked
    assert [c.id for c in loaded.courts].count("c1") == 1  # one it had stays as it was
    assert "# Club identifier given by the club cloud" in config.read_text()  # the installer's comments stay
    # and the claimed box really talks to the cloud with them
    async with httpx.AsyncClient() as http:
        token = await http.post(
            loaded.cloud.token_url,
            data={"grant_type": "client_credentials", "client_id": loaded.cloud.client_id,
                  "client_secret": loaded.secrets.cloud_client_secret.get_secret_value()},  # type: ignore[union-attr]
        )  # fmt: skip
    assert token.status_code == 200

    before = snapshot(config, secrets)
    again = await claim(config, "sandbox-claim-0001", server.url)
    assert again.returncode == 2
    assert "claim refused" in again.stderr
    assert "already used" in again.stderr
    assert snapshot(config, secrets) == before


async def test_expired_unknown_tokens_and_an_unreachable_cloud_change_nothing(
    sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    server = await sandbox_factory()
    config = tmp_path / "agent.toml"
    shutil.copy(EXAMPLE, config)
    before = snapshot(config, tmp_path / "secrets.toml")
    async with httpx.AsyncClient(base_url=server.url) as admin:
        short = (await admin.post("/_sandbox/claim-tokens", json={"ttl_s": 1})).json()["claim_token"]
        await admin.post("/_sandbox/clock", json={"advance_s": 5})
    expired = await claim(config, short, server.url)
    assert (expired.returncode, "expired" in expired.stderr) == (2, True), expired.stderr
    unknown = await claim(config, "never-issued-token", server.url)
    assert (unknown.returncode, "never issued" in unknown.stderr) == (2, True), unknown.stderr
    unreachable = await claim(config, "sandbox-claim-0002", "http://127.0.0.1:9")
    assert unreachable.returncode == 1
    assert "cannot reach the cloud" in unreachable.stderr
    assert "still good" in unreachable.stderr
    assert snapshot(config, tmp_path / "secrets.toml") == before
    # the token the unreachable attempt carried is still good
    assert (await claim(config, "sandbox-claim-0002", server.url)).returncode == 0

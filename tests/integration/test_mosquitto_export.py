"""`club-agent broker export-mosquitto`: the files it writes, run by a real mosquitto on loopback."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import aiomqtt
import pytest

from agent.config import Config, parse_config
from agent.errors import ConfigError
from agent.lan.auth import hash_password, verify_password
from agent.lan.mosquitto import export_mosquitto
from tests.brokers import free_port
from tests.conftest import DEVICES, PASSWORDS, site_mosquitto
from tests.mqtt_wire import WireClient

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="Debian's mosquitto is not installed",
)

AGENT_PW = "agent-password-0123456789"


def site_config(tmp_path: Path, port: int, scheme: str = "pbkdf2", **broker: object) -> Config:
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'broker_password = "{AGENT_PW}"\n')
    secrets.chmod(0o600)
    raw = {
        "agent": {"data_dir": str(tmp_path / "data"), "secrets_file": str(secrets)},
        "broker": {"mode": "external", "host": "127.0.0.1", "external_port": port, **broker},
        "courts": [{"id": "c1"}, {"id": "c2"}],
        "devices": [{**d, "password_hash": hash_password(PASSWORDS[d["id"]], scheme)} for d in DEVICES],  # type: ignore[arg-type]
    }
    return parse_config(raw, source="test")


def test_mosquitto_and_the_agent_read_each_others_password_hashes(tmp_path: Path) -> None:
    ours = hash_password("s3cret-device-token", "pbkdf2")
    assert ours.startswith("$7$10000$")
    assert verify_password(ours, "s3cret-device-token")
    assert not verify_password(ours, "s3cret-device-tokem")
    passwd = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "r1", "from-mosquitto"], check=True)
    theirs = passwd.read_text().strip().split(":", 1)[1]
    assert verify_password(theirs, "from-mosquitto")
    assert not verify_password(theirs, "from-mosquittO")


def test_export_refuses_argon2_hashes_and_a_missing_agent_password(tmp_path: Path) -> None:
    config = site_config(tmp_path, 1883, scheme="argon2")
    with pytest.raises(ConfigError, match=r"devices r1, r2, rx, rb, b1, t1, desk, d1 have argon2 password hashes"):
        export_mosquitto(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    config = site_config(tmp_path, 1883)
    no_password = config.model_copy(update={"secrets": config.secrets.model_copy(update={"broker_password": None})})
    with pytest.raises(ConfigError, match="broker_password"):
        export_mosquitto(no_password, tmp_path / "out")


def test_exported_files(tmp_path: Path) -> None:
    config = site_config(tmp_path, 18830, max_packet_bytes=8192, ws_port=19001)
    files = export_mosquitto(config, tmp_path / "out")
    assert oct(files.passwd.stat().st_mode & 0o777) == "0o640"
    users = [line.split(":", 1)[0] for line in files.passwd.read_text().splitlines()]
    assert users == ["agent", *(d["id"] for d in DEVICES)]
    acl = files.acl.read_text()
    assert "user r1\ntopic write rfid/r1/scan\ntopic write rfid/r1/status\ntopic read rfid/r1/response\n" in acl
    assert "user desk\n" in acl
    assert "topic read agent/presence/#" in acl
    conf = files.conf.read_text()
    for line in (
        "allow_anonymous false",
        "max_packet_size 8192",
        "use_username_as_clientid true",
        "listener 18830 127.0.0.1",
        "listener 19001 127.0.0.1\nprotocol websockets",
    ):
        assert line in conf


async def test_devices_log_in_and_stay_inside_their_access_list_on_mosquitto(tmp_path: Path) -> None:
    config = site_config(tmp_path, free_port())
    site = await site_mosquitto(config, tmp_path / "mq")
    host, port = "127.0.0.1", config.broker.external_port
    try:
        # only the configured listener: a listener option before it would add mosquitto's default one on 1883
        opened = re.findall(r"Opening ipv[46] listen socket on port (\d+)", site.log_text())
        assert set(opened) == {str(port)}
        refused = await WireClient.open(host, port, client_id="r1", username="r1", password="wrong-password")
        assert refused.connack.return_code in (4, 5)
        refused.abort()
        async with (
            aiomqtt.Client(host, port, username="agent", password=AGENT_PW, identifier="agent") as agent,
            aiomqtt.Client(host, port, username="r1", password=PASSWORDS["r1"], identifier="r1") as r1,
        ):
            await agent.subscribe("rfid/+/scan", qos=1)
            await r1.subscribe("rfid/+/response", qos=1)  # mosquitto may grant it, but delivers only what r1 may read
            await r1.publish("rfid/r2/scan", b"forged", qos=1)  # outside r1's list: dropped
            await r1.publish("rfid/r1/scan", b"mine", qos=1)
            await agent.publish("rfid/r2/response", b"for r2", qos=1)
            await agent.publish("rfid/r1/response", b"for r1", qos=1)
            async with asyncio.timeout(5):
                got_agent = await anext(agent.messages)
                got_r1 = await anext(r1.messages)
            assert (got_agent.topic.value, got_agent.payload) == ("rfid/r1/scan", b"mine")
            assert (got_r1.topic.value, got_r1.payload) == ("rfid/r1/response", b"for r1")
    finally:
        await site.stop()

"""agent.config: the example config, derived domain objects, error messages, secrets file, env overrides.

Broken configs are made by text substitution on provisioning/agent.example.toml, so each case reads as
"the example, with this one line changed".
"""

from __future__ import annotations

import os
import re
from datetime import datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from pydantic import BaseModel, SecretStr

from agent.config import (
    AgentSection,
    ApiSection,
    BrokerSection,
    CameraConfig,
    CloudSection,
    Config,
    CourtConfig,
    DeviceConfig,
    HoursConfig,
    MediaSection,
    PolicySection,
    Secrets,
    ZiggySection,
    check_secrets_mode,
    load_config,
)
from agent.domain.messages import Language
from agent.domain.model import Court, Direction, Policy, SecondTap, TimeWindow, UntrustedClock
from agent.errors import ConfigError

PROVISIONING = Path(__file__).resolve().parents[2] / "provisioning"
EXAMPLE = PROVISIONING / "agent.example.toml"
SECRETS_EXAMPLE = PROVISIONING / "secrets.example.toml"
EXAMPLE_TEXT = EXAMPLE.read_text(encoding="utf-8")
SECRETS_TEXT = SECRETS_EXAMPLE.read_text(encoding="utf-8")

WEEKDAYS = frozenset({1, 2, 3, 4, 5})
WEEKEND = frozenset({6, 7})
LOBBY_HASH_LINE = next(
    line for line in EXAMPLE_TEXT.splitlines() if line.startswith('password_hash = "$argon2id$') and "jmtR" in line
)


def edit(old: str, new: str, text: str = EXAMPLE_TEXT) -> str:
    """The example with the first occurrence of `old` replaced; fails loudly if `old` is not there."""
    assert old in text, f"test setup: {old!r} not found in the example"
    return text.replace(old, new, 1)


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), environ={} if environ is None else environ)


def config_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, environ)
    return info.value


def with_secrets(tmp_path: Path, secrets_text: str = SECRETS_TEXT, mode: int = 0o600) -> Path:
    """Example config with secrets_file enabled, next to a secrets file of the given mode."""
    secrets = write(tmp_path, secrets_text, "secrets.toml")
    os.chmod(secrets, mode)
    return write(tmp_path, edit('# secrets_file = "secrets.toml"', 'secrets_file = "secrets.toml"'))


@pytest.fixture
def example() -> Config:
    return load_config(EXAMPLE, environ={})


# --- the example file ---------------------------------------------------------------------------------


def test_example_loads_as_is_from_the_repo() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.agent.club_id == "club-001"
    assert config.agent.agent_id == "edge-01"
    assert config.agent.timezone == "America/Sao_Paulo"
    assert config.agent.language is Language.PT_BR
    assert config.agent.data_dir == Path("/var/lib/club-agent")
    assert config.agent.secrets_file is None
    assert config.db_path == Path("/var/lib/club-agent/agent.db")


def test_example_courts(example: Config) -> None:
    assert [c.id for c in example.courts] == ["c1", "c2", "c3"]
    assert [c.access_groups for c in example.courts] == [["padel"], ["padel"], []]
    assert [c.max_session_minutes for c in example.courts] == [None, None, 90]
    for court in example.courts:
        assert [h.days for h in court.hours] == [[1, 2, 3, 4, 5], [6, 7]]
        assert [(h.from_, h.to) for h in court.hours] == [(time(6), time(23)), (time(7), time(22))]


def test_a_reader_stands_at_a_court_or_a_bar_never_both(tmp_path: Path) -> None:
    bar = 'kind = "reader"\npos = "bar-1"\n'
    for placed, expected in [
        ('kind = "reader"\n', "exactly one of 'court'"),
        ('kind = "reader"\npos = "bar-1"\ncourt = "c1"\n', "exactly one of 'court'"),
        ('kind = "button"\npos = "bar-1"\n', "'pos' is for readers at a bar"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            load_config(write(tmp_path, edit(bar, placed)))
    # an attached reader at the bar, too
    attached = load_config(write(tmp_path, edit('court = "c3"\nname = "Leitor 125 kHz', 'pos = "bar-1"\nname = "L')))
    assert attached.readers[0].pos == "bar-1"
    assert attached.readers[0].as_device().pos == "bar-1"


def test_example_devices(example: Config) -> None:
    kinds = {d.id: (d.kind, d.court) for d in example.devices}
    assert kinds == {
        "reader-c1": ("reader", "c1"),
        "reader-c2": ("reader", "c2"),
        "reader-c3": ("reader", "c3"),
        "reader-bar": ("reader", None),
        "button-c1": ("button", "c1"),
        "button-c2": ("button", "c2"),
        "button-c3": ("button", "c3"),
        "tablet-c1": ("tablet", "c1"),
        "tablet-desk": ("tablet", None),
        "display-lobby": ("display", None),
    }
    assert all(d.direction is Direction.IN for d in example.devices if d.kind == "reader")
    assert [d.pos for d in example.devices if d.pos] == ["bar-1"]
    assert all(d.password_hash and d.password_hash.startswith("$argon2id$") for d in example.devices)
    assert len({d.password_hash for d in example.devices}) == len(example.devices)
    served = {d.id: d.served_courts for d in example.devices if d.kind in ("tablet", "display")}
    assert served == {"tablet-c1": ["c1"], "tablet-desk": [], "display-lobby": []}


def test_example_camera_and_its_password(example: Config, tmp_path: Path) -> None:
    assert [(c.id, c.court) for c in example.cameras] == [("cam-c1", "c1")]
    with_password = example.model_copy(update={"secrets": Secrets(camera_passwords={"cam-c1": SecretStr("p@ss/word")})})
    assert with_password.camera_url(example.cameras[0]) == "rtsp://club:p%40ss%2Fword@192.168.10.31:554/stream1"
    assert example.ring_path == Path("/run/club-agent/ring")  # absolute: not under the data dir
    assert example.clips_path == example.agent.data_dir / "clips"
    for old, new, expected in [
        ('court = "c1"\nurl = "rtsp', 'court = "c9"\nurl = "rtsp', "cameras\\[0\\].court = 'c9'"),
        ('url = "rtsp://192.168.10.31', 'url = "http://192.168.10.31', "cameras\\[0\\].url"),
        ("critical_pct = 95", "critical_pct = 80", "media.critical_pct"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            load_config(write(tmp_path, edit(old, new)))


def test_example_sync_destinations(example: Config) -> None:
    assert example.ziggy is not None
    assert example.ziggy.base_url == "https://ziggy.example/api/v1"
    assert example.cloud is not None
    assert example.cloud.token_url == "https://sso.example/realms/club/protocol/openid-connect/token"
    assert example.destinations == ("ziggy", "cloud")


def _keys(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


@pytest.mark.parametrize(
    "model",
    [
        AgentSection,
        BrokerSection,
        CameraConfig,
        MediaSection,
        ApiSection,
        PolicySection,
        CourtConfig,
        HoursConfig,
        DeviceConfig,
        ZiggySection,
        CloudSection,
    ],
    ids=lambda m: m.__name__,
)
def test_example_documents_every_key(model: type[BaseModel]) -> None:
    undocumented = [
        key
        for key in _keys(model)
        if not re.search(rf"^(# )?{re.escape(key)} = |\.{re.escape(key)}\]\]$", EXAMPLE_TEXT, re.MULTILINE)
    ]
    assert undocumented == []


def test_example_documents_every_section() -> None:
    sections = [key for key in _keys(Config) if key != "secrets"]
    missing = [s for s in sections if f"\n[{s}]\n" not in EXAMPLE_TEXT and f"\n[[{s}]]\n" not in EXAMPLE_TEXT]
    assert missing == []
    assert "\n[secrets]" not in EXAMPLE_TEXT


def test_secrets_example_documents_every_key() -> None:
    undocumented = [key for key in _keys(Secrets) if not re.search(rf"^\[?{key}\]? ?=?", SECRETS_TEXT, re.M)]
    assert undocumented == []
    assert "chmod 600" in SECRETS_TEXT


# --- derived domain objects ---------------------------------------------------------------------------


def test_domain_courts(example: Config) -> None:
    courts = example.domain_courts()
    assert set(courts) == {"c1", "c2", "c3"}
    hours = (
        TimeWindow(days=WEEKDAYS, start=time(6, 0), end=time(23, 0)),
        TimeWindow(days=WEEKEND, start=time(7, 0), end=time(22, 0)),
    )
    assert courts["c1"] == Court(
        court_id="c1",
        name="Quadra 1 - Padel",
        access_groups=frozenset({"padel"}),
        hours=hours,
        max_session=timedelta(minutes=180),
    )
    assert courts["c3"].access_groups == frozenset()
    assert courts["c3"].max_session == timedelta(minutes=90)
    assert courts["c3"].hours == hours


def test_domain_courts_default_max_session_follows_policy(tmp_path: Path) -> None:
    config = load_text(tmp_path, edit("session_max_minutes = 180", "session_max_minutes = 120"))
    courts = config.domain_courts()
    assert courts["c1"].max_session == timedelta(minutes=120)
    assert courts["c3"].max_session == timedelta(minutes=90)  # the court's own limit wins


def test_court_name_defaults_to_id(tmp_path: Path) -> None:
    config = load_text(tmp_path, edit('name = "Quadra 2 - Padel"\n', ""))
    assert config.domain_courts()["c2"].name == "c2"


def test_domain_policy(example: Config) -> None:
    assert example.domain_policy() == Policy(
        timezone=ZoneInfo("America/Sao_Paulo"),
        second_tap=SecondTap.CHECKOUT,
        second_tap_grace=timedelta(seconds=60),
        anti_passback=timedelta(0),
        max_cache_age=timedelta(hours=36),
        untrusted_clock=UntrustedClock.LAST_KNOWN,
        enforce_hours_untrusted=False,
        credits_per_checkin=1,
    )


def test_domain_policy_reflects_edits(tmp_path: Path) -> None:
    text = edit('second_tap = "checkout"', 'second_tap = "deny"')
    text = edit("anti_passback_s = 0", "anti_passback_s = 90", text)
    text = edit("max_cache_age_h = 36", "max_cache_age_h = 0.5", text)
    text = edit('untrusted_clock = "last_known"', 'untrusted_clock = "deny"', text)
    text = edit('timezone = "America/Sao_Paulo"', 'timezone = "Europe/Lisbon"', text)
    policy = load_text(tmp_path, text).domain_policy()
    assert policy.second_tap is SecondTap.DENY
    assert policy.anti_passback == timedelta(seconds=90)
    assert policy.max_cache_age == timedelta(minutes=30)
    assert policy.untrusted_clock is UntrustedClock.DENY
    assert policy.timezone == ZoneInfo("Europe/Lisbon")


def test_hours_accept_day_numbers_toml_times_and_2400(tmp_path: Path) -> None:
    text = edit('days = ["sat", "sun"]\nfrom = "07:00"\nto = "22:00"', 'days = [6, 7]\nfrom = 07:00:00\nto = "24:00"')
    window = load_text(tmp_path, text).domain_courts()["c1"].hours[1]
    assert window == TimeWindow(days=WEEKEND, start=time(7, 0), end=time(0, 0))
    saturday = datetime(2025, 3, 1, tzinfo=ZoneInfo("America/Sao_Paulo"))
    assert window.contains(saturday.replace(hour=23, minute=59))
    assert not window.contains(saturday.replace(hour=6, minute=59))


def test_allow_anonymous_lets_devices_go_without_password(tmp_path: Path) -> None:
    text = edit("allow_anonymous = false", "allow_anonymous = true", edit(LOBBY_HASH_LINE, ""))
    config = load_text(tmp_path, text)
    lobby = next(d for d in config.devices if d.id == "display-lobby")
    assert lobby.password_hash is None


def test_disabled_destination_is_left_out(tmp_path: Path) -> None:
    before, header, ziggy_and_cloud = EXAMPLE_TEXT.partition("\n[ziggy]\n")
    assert header, "test setup: no [ziggy] section in the example"
    config = load_text(tmp_path, before + header + edit("enabled = true", "enabled = false", ziggy_and_cloud))
    assert config.ziggy is not None
    assert config.ziggy.enabled is False
    assert config.destinations == ("cloud",)


# --- broken copies: each names the key path and, for scalars, the value --------------------------------

BROKEN = [
    pytest.param(
        "debounce_s = 3.0",
        "debounce = 3",
        ["policy.debounce", "unknown key"],
        "policy.debounce",
        id="unknown-key",
    ),
    pytest.param("port = 1883", 'port = "abc"', ["broker.port = 'abc'", "integer"], "broker.port", id="wrong-type"),
    pytest.param("port = 1883", "port = 70000", ["broker.port = 70000", "65535"], "broker.port", id="out-of-range"),
    pytest.param(
        "debounce_s = 3.0",
        "debounce_s = 61",
        ["policy.debounce_s = 61", "60"],
        "policy.debounce_s",
        id="float-range",
    ),
    pytest.param(
        'from = "06:00"',
        'from = "25:00"',
        ["courts[0].hours[0].from = '25:00'", "HH:MM"],
        "courts[0].hours[0].from",
        id="bad-time",
    ),
    pytest.param(
        'to = "23:00"',
        'to = "7pm"',
        ["courts[0].hours[0].to = '7pm'", "HH:MM"],
        "courts[0].hours[0].to",
        id="bad-to",
    ),
    pytest.param(
        '"thu", "fri"]',
        '"thu", "fry"]',
        ["courts[0].hours[0].days[4] = 'fry'", "weekday"],
        "courts[0].hours[0].days[4]",
        id="bad-weekday",
    ),
    pytest.param(
        'days = ["sat", "sun"]',
        "days = [0]",
        ["courts[0].hours[1].days[0] = 0", "1..7"],
        "courts[0].hours[1].days[0]",
        id="weekday-zero",
    ),
    pytest.param(
        'days = ["sat", "sun"]',
        "days = []",
        ["courts[0].hours[1].days"],
        "courts[0].hours[1].days",
        id="no-days",
    ),
    pytest.param(
        'timezone = "America/Sao_Paulo"',
        'timezone = "America/Sao Paulo"',
        ["agent.timezone = 'America/Sao Paulo'", "IANA time zone"],
        "agent.timezone",
        id="bad-timezone",
    ),
    pytest.param(
        'language = "pt-BR"',
        'language = "pt"',
        ["agent.language = 'pt'", "'pt-BR'"],
        "agent.language",
        id="language",
    ),
    pytest.param(
        'second_tap = "checkout"',
        'second_tap = "toggle"',
        ["policy.second_tap = 'toggle'", "'checkout'"],
        "policy.second_tap",
        id="bad-enum",
    ),
    pytest.param(
        'court = "c3"\ndirection',
        'court = "c9"\ndirection',
        ["devices[2].court = 'c9'", "'reader-c3'", "not configured"],
        "devices[2].court",
        id="unknown-court",
    ),
    pytest.param(
        'courts = []\nname = "Recepcao"',
        'courts = ["c1", "c4"]\nname = "Recepcao"',
        ["devices[7].courts[1] = 'c4'", "'tablet-desk'"],
        "devices[7].courts[1]",
        id="tablet-unknown-court",
    ),
    pytest.param(
        'id = "c2"',
        'id = "c1"',
        ["courts[1].id = 'c1'", "court ids must be unique"],
        "courts[1].id",
        id="duplicate-court",
    ),
    pytest.param(
        'id = "reader-c2"',
        'id = "reader-c1"',
        ["devices[1].id = 'reader-c1'", "device ids must be unique"],
        "devices[1].id",
        id="duplicate-device",
    ),
    pytest.param(
        'court = "c1"\ndirection = "in"\n',
        'direction = "in"\n',
        ["devices[0]", "a reader needs exactly one of 'court'"],
        "devices[0]",
        id="reader-without-court",
    ),
    pytest.param(
        'court = "c1"\nname = "Botao',
        'name = "Botao',
        ["devices[3]", "a button needs 'court'"],
        "devices[3]",
        id="button-without-court",
    ),
    pytest.param(
        'direction = "in"',
        'direction = "both"',
        ["devices[0].direction = 'both'"],
        "devices[0].direction",
        id="dir",
    ),
    pytest.param(
        'kind = "display"',
        'kind = "camera"',
        ["devices[8].kind = 'camera'"],
        "devices[8].kind",
        id="unknown-kind",
    ),
    pytest.param(
        'id = "reader-c1"',
        'id = "reader/c1"',
        ["devices[0].id = 'reader/c1'", "MQTT topic level"],
        "devices[0].id",
        id="id-with-slash",
    ),
    pytest.param(
        'id = "reader-c1"',
        'id = "reader+c1"',
        ["devices[0].id = 'reader+c1'", "MQTT topic level"],
        "devices[0].id",
        id="id-with-plus",
    ),
    pytest.param(
        'id = "reader-c1"',
        'id = "r#1"',
        ["devices[0].id = 'r#1'", "MQTT topic level"],
        "devices[0].id",
        id="id-hash",
    ),
    pytest.param('id = "reader-c1"', 'id = ""', ["devices[0].id = ''"], "devices[0].id", id="empty-id"),
    pytest.param(
        'id = "c3"',
        'id = "c/3"',
        ["courts[2].id = 'c/3'", "MQTT topic level"],
        "courts[2].id",
        id="court-id-slash",
    ),
    pytest.param(
        'id = "display-lobby"',
        'id = "agent"',
        ["devices[8]", "'agent' is reserved"],
        "devices[8]",
        id="reserved-agent-id",
    ),
    pytest.param(
        LOBBY_HASH_LINE,
        'password_hash = "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW"',
        ["devices[8].password_hash", "expected an argon2 hash", "club-agent devices hash-password"],
        "devices[8].password_hash",
        id="bcrypt-not-argon2",
    ),
    pytest.param(
        LOBBY_HASH_LINE,
        "",
        ["devices[8].password_hash", "'display-lobby'", "no password_hash", "broker.allow_anonymous is false"],
        "devices[8].password_hash",
        id="missing-password-hash",
    ),
    pytest.param(
        'base_url = "https://ziggy.example/api/v1"\n',
        "",
        ["ziggy.base_url", "required key is missing"],
        "ziggy.base_url",
        id="ziggy-without-base-url",
    ),
]


@pytest.mark.parametrize(("old", "new", "fragments", "key"), BROKEN)
def test_broken_config_names_key_and_value(
    tmp_path: Path, old: str, new: str, fragments: list[str], key: str | None
) -> None:
    err = config_error(tmp_path, edit(old, new))
    message = str(err)
    assert message.startswith(str(tmp_path / "agent.toml"))
    missing = [f for f in fragments if f not in message]
    assert missing == [], message
    if key is not None:
        assert err.key == key


def test_every_problem_gets_its_own_line(tmp_path: Path) -> None:
    text = edit("port = 1883", "port = 70000", edit("debounce_s = 3.0", "debounce = 3"))
    lines = str(config_error(tmp_path, text)).splitlines()
    assert len(lines) == 2
    assert any("broker.port = 70000" in line for line in lines)
    assert any("policy.debounce: unknown key" in line for line in lines)


def test_secrets_table_in_config_is_refused(tmp_path: Path) -> None:
    err = config_error(tmp_path, EXAMPLE_TEXT + '\n[secrets]\nziggy_api_key = "zk-inline"\n')
    assert err.key == "secrets"
    assert "put secrets in the secrets file" in str(err)
    assert "zk-inline" not in str(err)


def test_invalid_toml(tmp_path: Path) -> None:
    err = config_error(tmp_path, edit("port = 1883", "port = "))
    assert "not valid TOML" in str(err)
    assert str(tmp_path / "agent.toml") in str(err)
    assert "line " in str(err)


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, environ={})


# --- secrets file -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440], ids=oct)
def test_secrets_file_loads_when_private(tmp_path: Path, mode: int) -> None:
    config = load_config(with_secrets(tmp_path, mode=mode), environ={})
    secrets = config.secrets
    assert isinstance(secrets.ziggy_api_key, SecretStr)
    assert secrets.ziggy_api_key.get_secret_value() == "REPLACE-with-the-ziggy-api-key"
    assert secrets.cloud_client_secret is not None
    assert secrets.cloud_client_secret.get_secret_value() == "REPLACE-with-the-cloud-client-secret"
    assert secrets.cloud_signing_secret is not None
    assert secrets.cloud_signing_secret.get_secret_value() == "REPLACE-with-the-cloud-signing-secret"
    assert set(secrets.api_tokens) == {"front-desk", "bar-1", "court-c1"}
    assert all(isinstance(token, SecretStr) for token in secrets.api_tokens.values())


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o620, 0o666, 0o601], ids=oct)
def test_secrets_file_refused_when_world_accessible_or_group_writable(tmp_path: Path, mode: int) -> None:
    config_path = with_secrets(tmp_path, mode=mode)
    with pytest.raises(ConfigError) as info:
        load_config(config_path, environ={})
    message = str(info.value)
    assert f"chmod 600 {tmp_path / 'secrets.toml'}" in message
    assert f"{mode:04o}" in message
    assert info.value.key == "agent.secrets_file"


def test_check_secrets_mode_directly(tmp_path: Path) -> None:
    path = write(tmp_path, "", "secrets.toml")
    os.chmod(path, 0o640)
    check_secrets_mode(path)  # group-readable is fine: the service user's group may read it
    os.chmod(path, 0o664)
    with pytest.raises(ConfigError, match="group-writable"):
        check_secrets_mode(path)


def test_secrets_file_is_relative_to_config_directory_not_cwd(tmp_path: Path) -> None:
    config_path = with_secrets(tmp_path)
    assert Path.cwd() != tmp_path
    assert load_config(config_path, environ={}).secrets.api_tokens


def test_missing_secrets_file(tmp_path: Path) -> None:
    config_path = write(tmp_path, edit('# secrets_file = "secrets.toml"', 'secrets_file = "secrets.toml"'))
    with pytest.raises(ConfigError, match="secrets file not found") as info:
        load_config(config_path, environ={})
    assert str(tmp_path / "secrets.toml") in str(info.value)
    assert info.value.key == "agent.secrets_file"


def test_secrets_file_unknown_key(tmp_path: Path) -> None:
    config_path = with_secrets(tmp_path, 'ziggy_apikey = "zk-123"\n')
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_config(config_path, environ={})
    assert "ziggy_apikey" in str(info.value)
    assert "zk-123" not in str(info.value)


def test_secrets_file_invalid_toml(tmp_path: Path) -> None:
    config_path = with_secrets(tmp_path, 'ziggy_api_key = "unterminated\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(config_path, environ={})


def test_secrets_never_appear_in_repr(tmp_path: Path) -> None:
    config = load_config(with_secrets(tmp_path), environ={})
    values = [
        "REPLACE-with-the-ziggy-api-key",
        "REPLACE-with-the-cloud-client-secret",
        "REPLACE-with-the-cloud-signing-secret",
        "REPLACE-with-a-long-random-token",
        "REPLACE-with-another-long-random-token",
        "REPLACE-with-a-third-long-random-token",
    ]
    shown = [repr(config), str(config), repr(config.secrets), config.model_dump_json()]
    leaked = [v for v in values for text in shown if v in text]
    assert leaked == []
    assert config.secrets.api_tokens["front-desk"].get_secret_value() == values[3]


def test_secrets_file_errors_do_not_echo_secret_values(tmp_path: Path) -> None:
    config_path = with_secrets(tmp_path, 'api_tokens = "tok-SECRET-123"\n')
    with pytest.raises(ConfigError) as info:
        load_config(config_path, environ={})
    assert "api_tokens" in str(info.value)
    assert "tok-SECRET-123" not in str(info.value)


def test_plaintext_password_in_password_hash_is_not_echoed(tmp_path: Path) -> None:
    err = config_error(tmp_path, edit(LOBBY_HASH_LINE, 'password_hash = "lobby-Pa55word"'))
    assert "devices[8].password_hash" in str(err)
    assert "lobby-Pa55word" not in str(err)


# --- environment overrides ----------------------------------------------------------------------------


def test_env_overrides_scalar_key() -> None:
    config = load_config(EXAMPLE, environ={"CLUB_AGENT_BROKER__PORT": "1884", "PATH": "/usr/bin"})
    assert config.broker.port == 1884
    assert config.api.port == 8080


def test_env_overrides_booleans_and_strings() -> None:
    environ = {
        "CLUB_AGENT_API__ENABLED": "false",
        "CLUB_AGENT_AGENT__AGENT_ID": "edge-02",
        "CLUB_AGENT_ZIGGY__ENABLED": "false",
    }
    config = load_config(EXAMPLE, environ=environ)
    assert config.api.enabled is False
    assert config.agent.agent_id == "edge-02"
    assert config.destinations == ("cloud",)


def test_env_can_enable_secrets_file_relative_to_config(tmp_path: Path) -> None:
    write(tmp_path, SECRETS_TEXT, "secrets.toml")
    os.chmod(tmp_path / "secrets.toml", 0o600)
    config_path = write(tmp_path, EXAMPLE_TEXT)
    config = load_config(config_path, environ={"CLUB_AGENT_AGENT__SECRETS_FILE": "secrets.toml"})
    assert set(config.secrets.api_tokens) == {"front-desk", "bar-1", "court-c1"}


def test_env_invalid_value_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, environ={"CLUB_AGENT_BROKER__PORT": "abc"})
    assert "broker.port = 'abc'" in str(info.value)
    assert info.value.key == "broker.port"


def test_env_unknown_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_config(EXAMPLE, environ={"CLUB_AGENT_BROKER__PROT": "1884"})
    assert "broker.prot" in str(info.value)


def test_env_cannot_override_a_list() -> None:
    with pytest.raises(ConfigError, match="not a table") as info:
        load_config(EXAMPLE, environ={"CLUB_AGENT_COURTS__ID": "c9"})
    assert "CLUB_AGENT_COURTS__ID" in str(info.value)


def test_env_invalid_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, environ={"CLUB_AGENT_BROKER__PORT": "abc"})
    assert "CLUB_AGENT_BROKER__PORT" in str(info.value)

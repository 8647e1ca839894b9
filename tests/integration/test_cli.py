"""The real `club-agent` console script, run as a subprocess against a config and data directory in tmp_path."""

from __future__ import annotations

import os
import random
import re
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import argon2
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "provisioning" / "agent.example.toml"
SCRIPT = Path(sys.executable).with_name("club-agent")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "agent.cli"]
# Terminal settings would change how rich lays out output; the tests see what a pipe or a log file sees.
TERMINAL_VARS = {"COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"}

CSV = (
    "member_id,first_name,last_name,member_code,status,cards,credits,requires_credit,valid_until,groups\n"
    "m1,Ana,Silva,1001,active,04:a1:b2:c3,5,true,2026-12-31,padel\n"
    "m2,Bruno,Costa,1002,suspended,04:d4:e5:f6;0a0b,,,,beach\n"
    "m3,Carla,Souza,,active,,,,,\n"
)


def club_agent(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUB_AGENT_") and k not in TERMINAL_VARS}
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=60, env=env, input=stdin, cwd=ROOT, check=False
    )


def words(text: str) -> str:
    """Output with whitespace collapsed, for assertions that should not depend on line wrapping."""
    return " ".join(text.split())


@pytest.fixture
def config(tmp_path: Path) -> Path:
    text = EXAMPLE.read_text(encoding="utf-8")
    line = 'data_dir = "/var/lib/club-agent"'
    assert text.count(line) == 1
    path = tmp_path / "agent.toml"
    path.write_text(text.replace(line, f'data_dir = "{(tmp_path / "data").resolve()}"'), encoding="utf-8")
    return path


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return (tmp_path / "data" / "agent.db").resolve()


@pytest.fixture
def members_csv(tmp_path: Path) -> Path:
    path = tmp_path / "members.csv"
    path.write_text(CSV, encoding="utf-8")
    return path


# -- config check ----------------------------------------------------------------------------------------------


def test_config_check_accepts_the_example() -> None:
    result = club_agent("config", "check", "provisioning/agent.example.toml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK")
    assert "club-001" in words(result.stdout)


def test_config_check_names_the_broken_key(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    assert text.count("\nport = 1883\n") == 1
    broken = tmp_path / "broken.toml"
    broken.write_text(text.replace("\nport = 1883\n", "\nport = 70000\n"), encoding="utf-8")
    result = club_agent("config", "check", str(broken))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "broker.port" in lines[0]
    assert "70000" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_config_check_missing_file(tmp_path: Path) -> None:
    result = club_agent("config", "check", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "not found" in result.stderr
    assert "Traceback" not in result.stderr


# -- members ---------------------------------------------------------------------------------------------------


def test_members_import_then_show(config: Path, members_csv: Path, db_file: Path) -> None:
    result = club_agent("members", "import", str(members_csv), "--config", str(config))
    assert result.returncode == 0, result.stderr
    out = words(result.stdout)
    assert "imported 3 members" in out
    assert "member list version 1" in out
    assert db_file.exists()

    shown = club_agent("members", "show", "04 A1 B2 C3", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert "Ana" in shown.stdout
    assert "active" in shown.stdout
    assert "04A1B2C3" in shown.stdout

    shown = club_agent("members", "show", "0A:0B", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert "Bruno" in shown.stdout
    assert "suspended" in shown.stdout

    shown = club_agent("members", "show", "m3", "--config", str(config))  # not a card id: taken as a member id
    assert shown.returncode == 0, shown.stderr
    assert "Carla" in shown.stdout

    again = club_agent("members", "import", str(members_csv), "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert "member list version 2" in words(again.stdout)


def test_members_show_unknown_card(config: Path, members_csv: Path) -> None:
    assert club_agent("members", "import", str(members_csv), "--config", str(config)).returncode == 0
    result = club_agent("members", "show", "DEADBEEF", "--config", str(config))
    assert result.returncode == 1
    assert "no member" in result.stderr
    assert "Traceback" not in result.stderr


def test_members_import_bad_file_names_the_line(config: Path, tmp_path: Path, db_file: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(CSV + "m4,Diego,,,active,04:zz:01,,,,\n", encoding="utf-8")
    result = club_agent("members", "import", str(bad), "--config", str(config))
    assert result.returncode == 1
    assert "line 5" in result.stderr
    assert "cards" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not db_file.exists()  # the file is checked before the store is touched


def test_members_import_error_quoting_brackets_is_one_line_not_a_traceback(config: Path, tmp_path: Path) -> None:
    """Values from the file are echoed in the error; they must be printed as text, not as rich markup."""
    bad = tmp_path / "bad.csv"
    bad.write_text("member_id,first_name,status\nm1,Ana,[/oops]\n", encoding="utf-8")
    result = club_agent("members", "import", str(bad), "--config", str(config))
    assert "Traceback" not in result.stderr
    assert result.returncode == 1
    assert "line 2" in result.stderr
    assert "[/oops]" in result.stderr


def test_members_import_missing_file(config: Path, tmp_path: Path) -> None:
    result = club_agent("members", "import", str(tmp_path / "nope.csv"), "--config", str(config))
    assert result.returncode == 1
    assert "no such file" in words(result.stderr)
    assert "Traceback" not in result.stderr


# -- devices ---------------------------------------------------------------------------------------------------


def test_hash_password_generate_prints_a_pasteable_line() -> None:
    result = club_agent("devices", "hash-password", "--generate")
    assert result.returncode == 0, result.stderr
    password = re.search(r"^password: (\S+)$", result.stdout, re.MULTILINE)
    assert password is not None, result.stdout
    # The hash line is copied into the TOML file as it is: it must be whole, on one line.
    line = re.search(r'^password_hash = "(\$argon2id\$[^"\s]+)"$', result.stdout, re.MULTILINE)
    assert line is not None, result.stdout
    assert argon2.PasswordHasher().verify(line.group(1), password.group(1))


def test_hash_password_from_stdin() -> None:
    result = club_agent("devices", "hash-password", stdin="a-long-enough-password\n")
    assert result.returncode == 0, result.stderr
    # Wrapping is test_hash_password_generate_prints_a_pasteable_line's business: here only the hash matters.
    match = re.search(r'password_hash="(\$argon2id\$[^"]+)"', "".join(result.stdout.split()))
    assert match is not None, result.stdout
    assert argon2.PasswordHasher().verify(match.group(1), "a-long-enough-password")


def test_hash_password_refuses_a_short_password() -> None:
    result = club_agent("devices", "hash-password", stdin="short\n")
    assert result.returncode == 2
    assert "12 characters" in result.stderr
    assert "argon2" not in result.stdout
    assert "Traceback" not in result.stderr


# -- store recover ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["members-page", "page-2-onward"])
def test_store_recover_moves_a_corrupt_database_aside(
    config: Path, members_csv: Path, db_file: Path, damage: str
) -> None:
    assert club_agent("members", "import", str(members_csv), "--config", str(config)).returncode == 0
    with closing(sqlite3.connect(db_file)) as raw:
        page_size = raw.execute("PRAGMA page_size").fetchone()[0]
        root = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = 'members'").fetchone()[0]
    assert not Path(f"{db_file}-wal").exists()
    size = db_file.stat().st_size
    offset, length = ((root - 1) * page_size, page_size) if damage == "members-page" else (page_size, size - page_size)
    with db_file.open("r+b") as fh:
        fh.seek(offset)
        fh.write(random.Random(5).randbytes(length))

    refused = club_agent("members", "show", "04A1B2C3", "--config", str(config))
    assert refused.returncode == 1
    assert "club-agent store recover" in refused.stderr
    assert "Traceback" not in refused.stderr

    result = club_agent("store", "recover", "--config", str(config))
    assert "Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr
    assert "moved_to" in result.stdout
    aside = [p for p in db_file.parent.iterdir() if p.name.startswith("agent.db.corrupt-")]
    assert [p.name for p in aside if not p.name.endswith(("-wal", "-shm"))], list(db_file.parent.iterdir())
    assert "members" in result.stdout
    assert "unreadable" in result.stdout

    after = club_agent("members", "show", "04A1B2C3", "--config", str(config))
    assert after.returncode == 1
    assert "no member" in after.stderr  # a working, empty store: the salvage could not read the members


def test_version_needs_no_command() -> None:
    done = club_agent("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("club-agent ")

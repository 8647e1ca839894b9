"""provisioning/setup.sh, systemd/club-agent.service and the reader files (udev, modprobe, modules-load), for real.

setup.sh installs into a temporary `--root` prefix, twice, from a snapshot of this checkout (work going on in the
tree cannot change the sources between the two runs), with the agent's Python packages from a wheelhouse built
once for the module (`--wheelhouse`), and claims the box from the sandbox cloud, a `club-agent sandbox` subprocess
on loopback. The second run must change nothing: the whole prefix is compared (type, content, mode, owner, mtime,
link target) and every step must say "unchanged". Then every file it wrote is checked for its content, mode and
owner (the owner as the prefix's own /etc/passwd names it), the installed unit with `systemd-analyze verify` (in a
private mount namespace where the prefix's /opt is the machine's, so ExecStart= is the installed agent) and
`systemd-analyze security` (the exposure is printed, and must be 3.0 at most), and the udev rules with
`udevadm test` the same way (Debian 12's udevadm has no `verify`). Copies of the installed prefix then take a
refused claim and `--uninstall`.

Needs root (chown, `useradd --prefix`), shellcheck, systemd-analyze, udevadm and Debian's python3-venv:
`make test-deps` installs them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import AgentSection, MediaSection, load_config
from firmware_bridges.nfc import KERNEL_MODULES

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "provisioning" / "setup.sh"
UNIT = REPO / "systemd" / "club-agent.service"
RULES = REPO / "provisioning" / "udev" / "70-club-agent-readers.rules"
MODPROBE = REPO / "provisioning" / "modprobe" / "club-agent-nfc.conf"
MODULES_LOAD = REPO / "provisioning" / "modules-load" / "club-agent.conf"
SNAPSHOT_PARTS = ("pyproject.toml", "README.md", "agent", "firmware_bridges", "provisioning", "systemd")
SETUP_TIMEOUT_S = 240  # one run; the first builds the venv (about 25 s here), a re-run takes a few seconds
MAX_EXPOSURE = 3.0
SITE = 'Arena Beira-Mar "Padel" & Beach'
SANDBOX_TOKEN = "sandbox-claim-0001"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="setup.sh installs as root (chown, useradd --prefix)"),
    pytest.mark.skipif(
        os.environ.get("CLUB_AGENT_TEST_BROKER") == "mosquitto",
        reason="nothing here involves the broker: runs in the embedded pass only",
    ),
]


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make test-deps installs it)")


def run_setup(*args: str, timeout: float = SETUP_TIMEOUT_S) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUB_AGENT_")}
    env.update(NO_COLOR="1", COLUMNS="120")
    started = time.monotonic()
    done = subprocess.run(
        ["bash", *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False
    )
    return done, time.monotonic() - started


def summary(output: str) -> dict[str, tuple[str, str]]:
    """The summary table: step -> (result, note)."""
    table = output.split("==> Summary", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[1:]:
        step, result, note = re.split(r"\s{2,}", line.strip() + "  ", maxsplit=2)
        rows[step] = (result, note.strip())
    return rows


def still_to_do(output: str) -> list[str]:
    if "Still to do" not in output:
        return []
    block = output.split("Still to do", 1)[1].split("\n", 1)[1]
    return [line[4:] for line in block.splitlines() if line.startswith("  - ")]


Entry = tuple[str, str | None, int, int, int, int]  # kind, content hash or link, mode, uid, gid, mtime_ns


def tree(root: Path) -> dict[str, Entry]:
    """Everything under root (root included), without following links."""
    out: dict[str, Entry] = {}
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath, name) for name in (*dirnames, *filenames)]
    for path in paths:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            kind, what = "l", os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            kind, what = "f", hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            kind, what = "d", None
        out[str(path.relative_to(root))] = (kind, what, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
    return out


def ids(root: Path) -> dict[str, int]:
    """User and group names to ids, from the prefix's own files (`u:NAME`, `g:NAME`)."""
    out = {"u:root": 0, "g:root": 0}
    for prefix, name in (("u", "passwd"), ("g", "group")):
        for line in (root / "etc" / name).read_text().splitlines():
            fields = line.split(":")
            out[f"{prefix}:{fields[0]}"] = int(fields[2])
    return out


def unit_settings(path: Path) -> dict[str, list[str]]:
    """`Section.Key` -> every value it is given (DeviceAllow= and the like repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def unshare_works() -> bool:
    return (
        shutil.which("unshare") is not None and subprocess.run(["unshare", "-m", "true"], check=False).returncode == 0
    )


# --------------------------------------------------------------------------------------------------------------
# Fixtures: the snapshot, the wheelhouse, the sandbox cloud, the two runs


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for part in SNAPSHOT_PARTS:
        if (REPO / part).is_dir():
            shutil.copytree(REPO / part, src / part, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(REPO / part, src / part)
    return src


@pytest.fixture(scope="module")
def wheelhouse(snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every dependency of the agent as a wheel, and setuptools to build the agent itself: the installs that
    follow run with --no-index. Made once per module (a few seconds with pip's cache)."""
    house = tmp_path_factory.mktemp("wheelhouse")
    deps = tomllib.loads((snapshot / "pyproject.toml").read_text())["project"]["dependencies"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "-w",
            str(house),
            "setuptools>=77",
            *deps,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout}\n{done.stderr}"
    return house


@pytest.fixture(scope="module")
def sandbox_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The sandbox cloud as an installer would run it: `club-agent sandbox`, here on a free loopback port."""
    log = tmp_path_factory.mktemp("sandbox") / "sandbox.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "sandbox", "--port", "0", "--members", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        )
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"sandbox cloud on (http://[0-9.]+:\d+)", log.read_text())):
            assert proc.poll() is None, f"the sandbox did not start:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the sandbox did not listen within 30 s:\n{log.read_text()}"
            time.sleep(0.05)
        yield found.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# What setup.sh would write on this machine without --root, and the user database it would change.
HOST_PATHS = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/club-agent", "/opt/club-agent",
              "/var/lib/club-agent", "/etc/systemd/system/club-agent.service",
              "/etc/systemd/system/multi-user.target.wants/club-agent.service",
              "/etc/udev/rules.d/70-club-agent-readers.rules", "/etc/modprobe.d/club-agent-nfc.conf",
              "/etc/modules-load.d/club-agent.conf", "/run/lock/club-agent-setup.lock")  # fmt: skip


def host_state() -> dict[str, int | None]:
    """The mtime of each (None: absent): setup.sh --root must leave them all as they are."""
    return {name: Path(name).lstat().st_mtime_ns if os.path.lexists(name) else None for name in HOST_PATHS}


@dataclass(frozen=True)
class Installed:
    root: Path
    src: Path
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]
    seconds: tuple[float, float]
    trees: tuple[dict[str, Entry], dict[str, Entry]]
    src_unchanged: bool
    host_unchanged: bool


@pytest.fixture(scope="module")
def installed(
    snapshot: Path, wheelhouse: Path, sandbox_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Installed:
    need("systemctl", "useradd")
    root = tmp_path_factory.mktemp("prefix")
    args = (str(snapshot / "provisioning" / "setup.sh"), "--root", str(root), "--wheelhouse", str(wheelhouse),
            "--site", SITE, "--court", "c1=Quadra 1", "--court", "Quadra 2 - Beach", "--timezone", "America/Recife",
            "--claim-token", SANDBOX_TOKEN, "--cloud-url", sandbox_url, "--yes")  # fmt: skip
    src_before = tree(snapshot)
    host_before = host_state()
    first, first_s = run_setup(*args)
    assert first.returncode in (0, 3), f"first run failed:\n{first.stdout}\n{first.stderr}"
    after_first = tree(root)
    second, second_s = run_setup(*args)
    assert second.returncode in (0, 3), f"second run failed:\n{second.stdout}\n{second.stderr}"
    after_second = tree(root)
    return Installed(
        root=root,
        src=snapshot,
        first=first,
        second=second,
        seconds=(first_s, second_s),
        trees=(after_first, after_second),
        src_unchanged=tree(snapshot) == src_before,
        host_unchanged=host_state() == host_before,
    )


# --------------------------------------------------------------------------------------------------------------
# The script itself


def test_setup_sh_is_shellcheck_clean_and_strict() -> None:
    need("shellcheck")
    done = subprocess.run(["shellcheck", "-x", str(SETUP)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout
    text = SETUP.read_text()
    assert re.search(r"^set -E?euo pipefail$", text, re.MULTILINE)
    assert os.access(SETUP, os.X_OK)


def test_help_and_bad_usage() -> None:
    done, _ = run_setup(str(SETUP), "--help", timeout=30)
    assert done.returncode == 0
    for option in ("--root", "--dry-run", "--wheelhouse", "--claim-token", "--site", "--court", "--uninstall"):
        assert option in done.stdout
    bad, _ = run_setup(str(SETUP), "--no-such-option", timeout=30)
    assert bad.returncode == 2
    assert "unknown option '--no-such-option'" in bad.stderr


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "prefix"
    root.mkdir()
    done, _ = run_setup(str(SETUP), "--root", str(root), "--dry-run", "--site", "X", "--court", "A", timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr  # the claim is skipped (no token): said, and exit 3
    assert list(root.iterdir()) == []
    assert "would: create system user club-agent" in done.stdout
    assert "would: write /etc/systemd/system/club-agent.service" in done.stdout
    assert "(dry run: nothing was changed)" in done.stdout


# --------------------------------------------------------------------------------------------------------------
# Two runs into a prefix


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_second_run_changes_nothing(installed: Installed, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = installed.first.stdout, installed.second.stdout
    with capsys.disabled():
        print(
            f"\nsetup.sh --root: first run {installed.seconds[0]:.1f} s, second run {installed.seconds[1]:.1f} s"
            f" ({len(installed.trees[0])} paths in the prefix)"
        )
    assert sum(installed.seconds) < 120, installed.seconds
    # The first run did every step, claimed the box from the sandbox and its doctor passed.
    steps = summary(first)
    assert list(steps) == ["Preflight", "Packages", "Python", "Service user", "Directories", "Agent",
                           "Configuration", "Readers", "systemd unit", "Claim", "Start", "Doctor"]  # fmt: skip
    for step in ("Service user", "Directories", "Agent", "Configuration", "Readers", "systemd unit", "Claim"):
        assert steps[step][0] == "changed", (step, steps[step], first)
    assert steps["Start"] == ("skipped", "--root: nothing is started")
    assert steps["Doctor"][0] == "ok", first
    # Only missing Debian packages (which --root does not install) may be left to do.
    assert all(p.startswith("packages:") for p in still_to_do(first)), still_to_do(first)
    # The second run: the same tree, to the mtime, and every step says so.
    before, after = installed.trees
    assert after.keys() == before.keys(), sorted(before.keys() ^ after.keys())
    differing = [path for path in before if before[path] != after[path]]
    assert not differing, differing[:20]
    again = summary(second)
    for step, (result, note) in again.items():
        assert result in ("unchanged", "ok", "skipped"), (step, result, note)
    assert again["Claim"][0] == "unchanged"
    assert "claimed with this token" in again["Claim"][1]
    assert not re.search(r"^    done: ", second, re.MULTILINE)
    assert installed.second.returncode == installed.first.returncode
    # The checkout it ran from and this machine's own /etc, /opt and /var/lib were not touched.
    assert installed.src_unchanged
    assert installed.host_unchanged


# path -> (kind, mode, owner, group); under opt/club-agent/venv only the rules of test_venv apply.
EXPECTED: dict[str, tuple[str, int, str, str]] = {
    ".": ("d", 0o700, "root", "root"),  # pytest's directory; setup.sh leaves an existing prefix as it is
    "etc": ("d", 0o755, "root", "root"),
    "etc/passwd": ("f", 0o644, "root", "root"),
    "etc/passwd-": ("f", 0o644, "root", "root"),  # useradd's backups
    "etc/group": ("f", 0o644, "root", "root"),
    "etc/group-": ("f", 0o644, "root", "root"),
    "etc/shadow": ("f", 0o640, "root", "root"),
    "etc/shadow-": ("f", 0o640, "root", "root"),
    "etc/gshadow": ("f", 0o640, "root", "root"),
    "etc/gshadow-": ("f", 0o640, "root", "root"),
    "etc/club-agent": ("d", 0o750, "root", "club-agent"),
    "etc/club-agent/agent.toml": ("f", 0o640, "root", "club-agent"),
    "etc/club-agent/secrets.toml": ("f", 0o600, "club-agent", "club-agent"),
    "etc/club-agent/.claimed": ("f", 0o640, "root", "club-agent"),
    "etc/systemd": ("d", 0o755, "root", "root"),
    "etc/systemd/system": ("d", 0o755, "root", "root"),
    "etc/systemd/system/club-agent.service": ("f", 0o644, "root", "root"),
    "etc/systemd/system/multi-user.target.wants": ("d", 0o755, "root", "root"),
    "etc/systemd/system/multi-user.target.wants/club-agent.service": ("l", 0o777, "root", "root"),
    "etc/udev": ("d", 0o755, "root", "root"),
    "etc/udev/rules.d": ("d", 0o755, "root", "root"),
    "etc/udev/rules.d/70-club-agent-readers.rules": ("f", 0o644, "root", "root"),
    "etc/modprobe.d": ("d", 0o755, "root", "root"),
    "etc/modprobe.d/club-agent-nfc.conf": ("f", 0o644, "root", "root"),
    "etc/modules-load.d": ("d", 0o755, "root", "root"),
    "etc/modules-load.d/club-agent.conf": ("f", 0o644, "root", "root"),
    "opt": ("d", 0o755, "root", "root"),
    "opt/club-agent": ("d", 0o755, "root", "root"),
    "opt/club-agent/share": ("d", 0o755, "root", "root"),
    "opt/club-agent/share/agent.example.toml": ("f", 0o644, "root", "root"),
    "opt/club-agent/share/secrets.example.toml": ("f", 0o644, "root", "root"),
    "opt/club-agent/share/README.md": ("f", 0o644, "root", "root"),
    "opt/club-agent/venv": ("d", 0o755, "root", "root"),
    "var": ("d", 0o755, "root", "root"),
    "var/lib": ("d", 0o755, "root", "root"),
    "var/lib/club-agent": ("d", 0o700, "club-agent", "club-agent"),
}
# Installed as they are in the checkout.
COPIES = {
    "etc/systemd/system/club-agent.service": "systemd/club-agent.service",
    "etc/udev/rules.d/70-club-agent-readers.rules": "provisioning/udev/70-club-agent-readers.rules",
    "etc/modprobe.d/club-agent-nfc.conf": "provisioning/modprobe/club-agent-nfc.conf",
    "etc/modules-load.d/club-agent.conf": "provisioning/modules-load/club-agent.conf",
    "opt/club-agent/share/agent.example.toml": "provisioning/agent.example.toml",
    "opt/club-agent/share/secrets.example.toml": "provisioning/secrets.example.toml",
    "opt/club-agent/share/README.md": "README.md",
}


@pytest.mark.slow
def test_every_file_written_has_its_mode_and_owner(installed: Installed) -> None:
    root, files = installed.root, installed.trees[1]
    who = ids(root)
    outside_venv = {p for p in files if not p.startswith("opt/club-agent/venv/")}
    assert outside_venv == set(EXPECTED), sorted(outside_venv ^ set(EXPECTED))
    for path, (kind, mode, user, group) in EXPECTED.items():
        got_kind, _, got_mode, uid, gid, _ = files[path]
        assert (got_kind, got_mode, uid, gid) == (kind, mode, who[f"u:{user}"], who[f"g:{group}"]), path
    for path, source in COPIES.items():
        assert (root / path).read_bytes() == (installed.src / source).read_bytes(), path
    link = root / "etc/systemd/system/multi-user.target.wants/club-agent.service"
    assert os.readlink(link) == "/etc/systemd/system/club-agent.service"


@pytest.mark.slow
def test_the_service_user(installed: Installed) -> None:
    passwd = {line.split(":")[0]: line.split(":") for line in (installed.root / "etc/passwd").read_text().splitlines()}
    user = passwd["club-agent"]
    assert int(user[2]) < 1000  # a system user
    assert user[5:] == ["/var/lib/club-agent", "/usr/sbin/nologin"]
    groups = {line.split(":")[0]: line.split(":") for line in (installed.root / "etc/group").read_text().splitlines()}
    for group in ("dialout", "plugdev", "video"):
        assert "club-agent" in groups[group][3].split(","), group
    assert int(groups["club-agent"][2]) == int(user[3])
    # Debian's static ids, so that the prefix's files mean the same on a Pi
    assert (groups["dialout"][2], groups["video"][2], groups["plugdev"][2]) == ("20", "44", "46")


@pytest.mark.slow
def test_venv(installed: Installed) -> None:
    root, files = installed.root, installed.trees[1]
    venv = [(path, entry) for path, entry in files.items() if path.startswith("opt/club-agent/venv/")]
    assert venv
    for path, (kind, _, mode, uid, gid, _) in venv:
        assert (uid, gid) == (0, 0), path  # the service user cannot change its own code
        assert kind == "l" or not mode & (stat.S_IWOTH | stat.S_IWGRP), path
    stamp = (root / "opt/club-agent/venv/.club-agent-install").read_text()
    assert re.fullmatch(r"source_sha256=[0-9a-f]{64}\npython=3\.\d+\.\d+\nextras=\n", stamp), stamp
    agent = root / "opt/club-agent/venv/bin/club-agent"
    version = subprocess.run(
        [str(agent.with_name("python")), "-c", "import agent, sys; print(agent.__version__, sys.prefix)"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert version.stdout.split() == [
        tomllib.loads((installed.src / "pyproject.toml").read_text())["project"]["version"],
        str(root / "opt/club-agent/venv"),
    ]


@pytest.mark.slow
def test_config_and_secrets(installed: Installed, sandbox_url: str) -> None:
    root = installed.root
    raw = tomllib.loads((root / "etc/club-agent/agent.toml").read_text())
    assert raw["agent"]["data_dir"] == "/var/lib/club-agent"
    assert raw["agent"]["secrets_file"] == "secrets.toml"
    assert raw["agent"]["timezone"] == "America/Recife"
    assert raw["media"]["ring_dir"] == "/run/club-agent/ring"  # the unit's RuntimeDirectory, a tmpfs
    courts = {court["id"]: court["name"] for court in raw["courts"]}
    assert courts["c1"] == "Quadra 1"
    assert courts["c2"] == "Quadra 2 - Beach"
    assert raw["cloud"]["base_url"] == sandbox_url  # from the claim
    secrets = tomllib.loads((root / "etc/club-agent/secrets.toml").read_text())
    assert len(secrets["api_tokens"]["front-desk"]) >= 32
    assert secrets["cloud_client_secret"] == "sandbox-cloud-client-secret"  # the claim's, kept at 0600
    for line in installed.first.stdout.splitlines() + installed.second.stdout.splitlines():
        assert "sandbox-cloud-client-secret" not in line
        assert secrets["api_tokens"]["front-desk"] not in line
    # What the agent itself makes of them (with the prefix's data directory)
    cfg = load_config(root / "etc/club-agent/agent.toml", environ={})
    assert cfg.secrets.cloud_client_secret is not None
    assert cfg.media.ring_dir == Path("/run/club-agent/ring")
    stamp = (root / "etc/club-agent/.claimed").read_text()
    assert SANDBOX_TOKEN not in stamp
    assert hashlib.sha256(SANDBOX_TOKEN.encode()).hexdigest() in stamp


@pytest.mark.slow
def test_installed_unit_verifies_and_scores(
    installed: Installed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    need("systemd-analyze")
    root = installed.root
    unit = root / "etc/systemd/system/club-agent.service"
    if unshare_works():
        # The machine's own units (multi-user.target, ...) and the prefix's /opt, so ExecStart= is the installed
        # agent; the bind mount lives in a private mount namespace only.
        script = f'mount --bind "{root}/opt" /opt && exec systemd-analyze verify "{unit}"'
        verify = subprocess.run(
            ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
    else:  # no mount namespaces here: the same unit with ExecStart= pointing into the prefix
        copy = tmp_path / "club-agent.service"
        copy.write_text(unit.read_text().replace("ExecStart=/opt/", f"ExecStart={root}/opt/"))
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
        )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout + verify.stderr == ""  # not even a warning
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", f"--root={root}", "--no-pager", "club-agent.service"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for club-agent\.service: (\d+\.\d+) (\w+)", security.stdout)
    assert found, security.stdout + security.stderr
    exposure = float(found.group(1))
    with capsys.disabled():
        print(f"\nsystemd-analyze security club-agent.service: exposure {exposure} {found.group(2)}")
    assert exposure <= MAX_EXPOSURE
    assert f"exposure {found.group(1)}" in summary(installed.first.stdout)["systemd unit"][1]


@pytest.mark.slow
def test_a_refused_claim_is_reported_and_changes_nothing(
    installed: Installed, wheelhouse: Path, sandbox_url: str, tmp_path: Path
) -> None:
    """The token was used by the first run: on a box that has no record of it, the cloud refuses it."""
    root = tmp_path / "prefix"
    subprocess.run(["cp", "-a", str(installed.root), str(root)], check=True, timeout=120)
    (root / "etc/club-agent/.claimed").unlink()
    args = [str(installed.src / "provisioning/setup.sh"), "--root", str(root), "--yes", "--wheelhouse", str(wheelhouse)]
    args += ["--cloud-url", sandbox_url]
    config_before = (root / "etc/club-agent/agent.toml").read_bytes()
    secrets_before = (root / "etc/club-agent/secrets.toml").read_bytes()
    done, _ = run_setup(*args, "--claim-token", SANDBOX_TOKEN)
    assert done.returncode == 3, done.stdout + done.stderr
    assert summary(done.stdout)["Claim"] == ("FAIL", "token refused")
    assert any("the cloud refused the token" in p and "already used" in p for p in still_to_do(done.stdout))
    assert (root / "etc/club-agent/agent.toml").read_bytes() == config_before
    assert (root / "etc/club-agent/secrets.toml").read_bytes() == secrets_before
    assert not (root / "etc/club-agent/.claimed").exists()


@pytest.mark.slow
def test_uninstall_keeps_data_unless_purged(installed: Installed, tmp_path: Path) -> None:
    root = tmp_path / "prefix"
    subprocess.run(["cp", "-a", str(installed.root), str(root)], check=True, timeout=120)
    script = str(installed.src / "provisioning/setup.sh")
    done, _ = run_setup(script, "--root", str(root), "--uninstall", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    for gone in ("opt/club-agent", "etc/systemd/system/club-agent.service",
                 "etc/systemd/system/multi-user.target.wants/club-agent.service",
                 "etc/udev/rules.d/70-club-agent-readers.rules", "etc/modprobe.d/club-agent-nfc.conf",
                 "etc/modules-load.d/club-agent.conf"):  # fmt: skip
        assert not (root / gone).exists(), gone
    for kept in ("etc/club-agent/agent.toml", "etc/club-agent/secrets.toml", "var/lib/club-agent"):
        assert (root / kept).exists(), kept
    assert "u:club-agent" in ids(root)
    done, _ = run_setup(script, "--root", str(root), "--uninstall", "--purge", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (root / "etc/club-agent").exists()
    assert not (root / "var/lib/club-agent").exists()
    assert "u:club-agent" not in ids(root)
    assert "club-agent" not in (root / "etc/group").read_text()


# --------------------------------------------------------------------------------------------------------------
# The unit and the reader files, as they are in the checkout


def test_unit_settings_match_the_agent() -> None:
    unit = unit_settings(UNIT)

    def one(key: str) -> str:
        (value,) = unit[key]
        return value

    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"
    assert 10 <= int(one("Service.WatchdogSec")) <= 60
    assert one("Service.Restart") == "on-failure"
    assert int(one("Unit.StartLimitBurst")) > 0
    assert int(one("Unit.StartLimitIntervalSec")) > 0
    assert one("Service.RestartPreventExitStatus") == "2"  # a configuration error: restarting cannot fix it
    # Decisions never wait for time sync (nor for the network to be online)
    ordering = " ".join(v for k in ("After", "Wants", "Requires", "BindsTo") for v in unit.get(f"Unit.{k}", []))
    assert "time-sync.target" not in ordering
    assert "network-online.target" not in ordering
    assert one("Service.ExecStart") == "/opt/club-agent/venv/bin/club-agent run --config /etc/club-agent/agent.toml"
    assert one("Service.User") == "club-agent"
    # The directories systemd makes are the agent's defaults: the ring in RAM, the store on the card
    assert MediaSection().ring_dir == Path("/run") / one("Service.RuntimeDirectory") / "ring"
    assert AgentSection().data_dir == Path("/var/lib") / one("Service.StateDirectory")
    assert one("Service.ConfigurationDirectory") == "club-agent"
    for key, value in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"),
                       ("ProtectHome", "yes"), ("DevicePolicy", "closed"), ("CapabilityBoundingSet", "")):  # fmt: skip
        assert one(f"Service.{key}") == value, key
    # adjtimex(2) (agent/clock.py reads the kernel's NTP state) stays allowed: a deny line with @privileged or
    # @clock takes it out of the allow list again, so it must be allowed after the last one
    filters = unit["Service.SystemCallFilter"]
    denies = [i for i, value in enumerate(filters) if value.startswith("~")]
    assert any("adjtimex" in value.split() and i > max(denies, default=-1) for i, value in enumerate(filters))
    allowed = set(unit["Service.DeviceAllow"])
    assert {"char-ttyUSB rw", "char-ttyACM rw", "char-usb_device rw"} <= allowed
    # The reader groups: serial ports (dialout) and USB NFC readers (plugdev, the udev rules' group)
    assert set(one("Service.SupplementaryGroups").split()) == {"dialout", "plugdev"}
    # char-ttyUSB / char-ttyACM are looked up in /proc/devices at start: their cores are loaded at boot
    modules = [line for line in MODULES_LOAD.read_text().splitlines() if line and not line.startswith("#")]
    assert modules == ["usbserial", "cdc_acm"]


Usb = tuple[int, int]
RULE_TOKEN = re.compile(r'\s*([A-Z_]+)(?:\{([^}]+)\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
MATCH_ONLY = {"ACTION", "DEVPATH", "KERNEL", "KERNELS", "SUBSYSTEM", "SUBSYSTEMS", "DRIVER", "DRIVERS", "ATTRS",
              "TAGS", "TEST", "PROGRAM", "RESULT", "CONST"}  # fmt: skip
ASSIGN_ONLY = {"OWNER", "GROUP", "MODE", "RUN", "LABEL", "GOTO", "IMPORT", "OPTIONS", "SECLABEL"}
EITHER = {"NAME", "SYMLINK", "ATTR", "SYSCTL", "ENV", "TAG"}


def parse_rules(path: Path) -> list[list[tuple[str, str | None, str, str]]]:
    """A udev rules file as rules of (key, attribute, operator, value), every line checked against udev(7)."""
    rules = []
    text = path.read_text().replace("\\\n", "")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        tokens, pos = [], 0
        while pos < len(line):
            match = RULE_TOKEN.match(line, pos)
            assert match, f"{path.name}:{number}: cannot parse at {line[pos:]!r}"
            key, attr, op, value, _ = match.groups()
            assert key in MATCH_ONLY | ASSIGN_ONLY | EITHER, f"{path.name}:{number}: unknown key {key}"
            if key in MATCH_ONLY:
                assert op in ("==", "!="), f"{path.name}:{number}: {key} only matches"
            if key in ASSIGN_ONLY:
                assert op in ("=", "+=", "-=", ":="), f"{path.name}:{number}: {key} is only assigned"
            tokens.append((key, attr, op, value))
            pos = match.end()
        rules.append(tokens)
    return rules


def usb_ids(rules: list[list[tuple[str, str | None, str, str]]], assigned: tuple[str, str | None, str]) -> set[Usb]:
    """(vendor, product) of the rules that match USB ids and make the assignment (key, attribute, value)."""
    out = set()
    for rule in rules:
        found = {attr: value for key, attr, op, value in rule if key in ("ATTR", "ATTRS") and op == "=="}
        assigns = {(key, attr, value) for key, attr, op, value in rule if op in ("=", "+=")}
        if "idVendor" in found and "idProduct" in found and assigned in assigns:
            out |= {(int(found["idVendor"], 16), int(pid, 16)) for pid in found["idProduct"].split("|")}
    return out


def test_udev_rules_cover_the_supported_readers() -> None:
    rules = parse_rules(RULES)
    labels = [value for rule in rules for key, _, _, value in rule if key == "LABEL"]
    gotos = {value for rule in rules for key, _, _, value in rule if key == "GOTO"}
    assert gotos <= set(labels)
    assert len(labels) == len(set(labels))
    # USB-serial bridges (RDM6300, Wiegand converters, line readers, button boxes, OSDP on RS-485)
    serial = usb_ids(rules, ("ENV", "CLUB_AGENT_READER", "1"))  # these get dialout, 0660 and the names below
    assert {(0x0403, 0x6001), (0x0403, 0x6015), (0x1A86, 0x7523), (0x10C4, 0xEA60), (0x067B, 0x2303)} <= serial
    # every USB reader nfcpy drives through libusb
    from nfc.clf.device import usb_device_map  # type: ignore[import-untyped]

    assert set(usb_device_map) <= usb_ids(rules, ("GROUP", None, "plugdev"))
    assigned = [(key, value) for rule in rules for key, _, op, value in rule if op in ("=", "+=")]
    assert {value for key, value in assigned if key == "MODE"} == {"0660"}
    assert {value for key, value in assigned if key == "GROUP"} == {"dialout", "plugdev"}
    assert all(value.startswith("club-reader-") for key, value in assigned if key == "SYMLINK")


def test_udev_rules_load_without_errors_in_udevadm(tmp_path: Path) -> None:
    """`udevadm test` reads every rules file and names each line it cannot use; ours go in through a bind mount
    over /etc/udev/rules.d in a private mount namespace (the machine's rules are not touched)."""
    need("udevadm")
    if not unshare_works():
        pytest.skip("no private mount namespaces here (unshare -m): the parser test above still checks the syntax")
    ttys = sorted(Path("/sys/class/tty").iterdir()) if Path("/sys/class/tty").is_dir() else []
    if not ttys:
        pytest.skip("no tty device in /sys to run udevadm test against")
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    shutil.copy(RULES, rules_dir / RULES.name)
    (rules_dir / "71-broken.rules").write_text('SUBSYSTEM="tty", NOSUCHKEY=="x"\n')  # proves errors are seen
    script = f'mount --bind "{rules_dir}" /etc/udev/rules.d && exec udevadm test --action=add "{ttys[0]}"'
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert f"Reading rules file: /etc/udev/rules.d/{RULES.name}" in output
    assert "71-broken.rules:1" in output
    complaints = [line for line in output.splitlines() if RULES.name in line and "Reading rules file" not in line]
    assert complaints == []


def test_nfc_drivers_are_blacklisted() -> None:
    lines = [line.split() for line in MODPROBE.read_text().splitlines() if line and not line.startswith("#")]
    assert all(words[0] == "blacklist" and len(words) == 2 for words in lines)
    blacklisted = {words[1] for words in lines}
    assert set(KERNEL_MODULES) | {"nfc"} <= blacklisted  # the modules the agent's NFC adapter warns about
    assert "claims" in MODPROBE.read_text()  # and the file says why

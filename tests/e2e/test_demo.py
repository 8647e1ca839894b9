"""`club-agent demo` shows granted and denied taps, bar orders and the sync to the sandbox cloud on a fresh
data dir, with nothing but the package."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_shows_granted_and_denied_taps() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUB_AGENT_")}
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--duration", "8", "--pace", "0.15"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "GRANTED" in out
    assert "DENIED" in out
    assert "Bem-vindo," in out
    summary = re.search(r"Summary: (\d+) answers .*p50 ([\d.]+) ms, p99 ([\d.]+) ms", out.replace("\n", " "))
    assert summary is not None, out[-1500:]
    assert int(summary.group(1)) >= 10
    synced = re.search(r"Synced: (\d+) events accepted by the club cloud, (\d+) Ziggy calls", out)
    assert synced is not None, out[-1500:]
    assert int(synced.group(1)) >= 10  # the outbox reached the sandbox cloud during the demo
    assert "pedido no bar" in out  # the bar reader picked a player and the bar ordered for them
    assert "/tablet/desk?token=" in out
    assert "Traceback" not in done.stderr

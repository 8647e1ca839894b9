"""The agent-side fuzz targets (MQTT payloads, topics, config, the local API's bodies, the cloud's answers,
member pages, tus answers) as part of the suite, like test_fuzz_short.py runs the decoders': on hypothesis input,
under atheris for a fixed number of runs (x86_64), and on the inputs each target keeps (REGRESSIONS). A bug a
target found and that is not fixed yet (its KNOWN list) is a strict xfail here: it fails the day the fix lands,
until the entry moves to the target's FIXED list, whose checks run here as plain regression tests.

With HYPOTHESIS_PROFILE=fuzz (`make fuzz`) the hypothesis test runs the decoders' targets too, at that profile's
count; test_fuzz_short.py runs them at its own fixed count either way."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from . import (
    _support,
    fuzz_api,
    fuzz_buttonbox,
    fuzz_clips,
    fuzz_cloud,
    fuzz_config,
    fuzz_feedback,
    fuzz_keywedge,
    fuzz_lines,
    fuzz_members,
    fuzz_payloads,
    fuzz_rdm6300,
    fuzz_topics,
    fuzz_wiegand,
)
from ._harness import run_under_atheris

TARGETS = [fuzz_payloads, fuzz_topics, fuzz_config, fuzz_api, fuzz_cloud, fuzz_members, fuzz_clips]
DECODERS = [fuzz_rdm6300, fuzz_wiegand, fuzz_lines, fuzz_buttonbox, fuzz_keywedge, fuzz_feedback]
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "fuzz-short")
GENERATED = TARGETS if PROFILE == "fuzz-short" else TARGETS + DECODERS


def _name(target: ModuleType) -> str:
    return target.__name__.rsplit(".", 1)[-1]


@pytest.fixture(scope="module", autouse=True)
def _one_loop() -> Iterator[None]:
    """The event loop (and the API's server) the async targets keep across inputs, closed after the module."""
    yield
    _support.close()


@pytest.mark.parametrize("target", GENERATED, ids=_name)
@settings(settings.get_profile(PROFILE))
@given(data=st.binary(max_size=1024))
def test_target_on_generated_input(target: ModuleType, data: bytes) -> None:
    """The target's own assertions are the checks: any of them failing fails this test."""
    target.TestOneInput(data)


@pytest.mark.parametrize(
    ("target", "data"),
    [pytest.param(t, data, id=f"{_name(t)}-{i}") for t in TARGETS for i, data in enumerate(t.REGRESSIONS)],
)
def test_target_on_kept_input(target: ModuleType, data: bytes) -> None:
    """A kept input once broke the target; the target's own assertions are the checks, as above."""
    target.TestOneInput(data)


@pytest.mark.parametrize(
    "bug",
    [
        pytest.param(bug, id=f"{_name(t)}-{bug.name}", marks=pytest.mark.xfail(raises=bug.raises, strict=True))
        for t in TARGETS
        for bug in t.KNOWN
    ],
)
def test_reported_bug_is_still_there(bug: _support.Known) -> None:
    """Each reported bug, shown by its input. When this fails (XPASS), the bug is fixed: move its entry from the
    target's KNOWN to FIXED."""
    bug.check(bug.data)


@pytest.mark.parametrize(
    "bug", [pytest.param(bug, id=f"{_name(t)}-{bug.name}") for t in TARGETS for bug in getattr(t, "FIXED", [])]
)
def test_fixed_bug_stays_fixed(bug: _support.Known) -> None:
    """Each reported bug that was fixed (the target's FIXED list), shown by its input: it must not come back."""
    bug.check(bug.data)


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed (x86_64 only)")
@pytest.mark.parametrize("target", TARGETS, ids=_name)
def test_target_under_atheris(target: ModuleType, tmp_path: Path) -> None:
    result = run_under_atheris(target, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

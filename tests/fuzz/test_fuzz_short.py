"""Every fuzz target, briefly, as part of the suite: on hypothesis-generated input always, and under atheris's
coverage-guided engine for a fixed number of runs where atheris is installed (x86_64). Longer campaigns run a
target by hand: `python -m tests.fuzz.fuzz_lines -max_total_time=600`."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from . import fuzz_buttonbox, fuzz_feedback, fuzz_keywedge, fuzz_lines, fuzz_rdm6300, fuzz_wiegand
from ._harness import run_under_atheris

TARGETS = [fuzz_rdm6300, fuzz_wiegand, fuzz_lines, fuzz_buttonbox, fuzz_keywedge, fuzz_feedback]

settings.register_profile("fuzz-short", max_examples=150, deadline=None)


def _name(target: ModuleType) -> str:
    return target.__name__.rsplit(".", 1)[-1]


@pytest.mark.parametrize("target", TARGETS, ids=_name)
@settings(settings.get_profile("fuzz-short"))
@given(data=st.binary(max_size=512))
def test_target_on_generated_input(target: ModuleType, data: bytes) -> None:
    """The target's own assertions are the checks (feed never raises, items are decoded or FrameError, buffers
    stay bounded, chunking changes nothing, round trips hold): any of them failing fails this test."""
    target.TestOneInput(data)


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed (x86_64 only)")
@pytest.mark.parametrize("target", TARGETS, ids=_name)
def test_target_under_atheris(target: ModuleType, tmp_path: Path) -> None:
    result = run_under_atheris(target, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

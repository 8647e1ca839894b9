"""Topic matching and filter coverage (the subscribe ACL's algebra), checked against brute force."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.lan.topics import Kind, Route, covers, matches, route

LEVELS = ["a", "b"]
FILTER_LEVELS = ["a", "b", "+", "#"]


def _filters(max_len: int = 3) -> list[str]:
    out = []
    for n in range(1, max_len + 1):
        for combo in itertools.product(FILTER_LEVELS, repeat=n):
            if "#" in combo[:-1]:
                continue  # '#' only as the last level
            out.append("/".join(combo))
    return out


def _topics(max_len: int = 4) -> list[str]:
    return ["/".join(c) for n in range(1, max_len + 1) for c in itertools.product(LEVELS, repeat=n)]


TOPICS = _topics()


def test_matches_examples() -> None:
    assert matches("court/c1/state", "court/+/state")
    assert matches("court/c1/state", "court/#")
    assert matches("court", "court/#")  # '#' also matches the parent level (MQTT 4.7.1.2)
    assert not matches("court/c1/state", "court/+")
    assert not matches("court/c1", "court/+/state")


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_filters()), st.sampled_from(_filters()))
def test_covers_agrees_with_brute_force(allowed: str, requested: str) -> None:
    """covers(A, R) must hold exactly when every topic R matches is matched by A (over a finite universe)."""
    brute = all(matches(t, allowed) for t in TOPICS if matches(t, requested))
    if covers(allowed, requested):
        assert brute  # soundness: never grants more than allowed
    # completeness on filters without '#' in the request (where the finite universe is exact)
    if "#" not in requested and brute:
        assert covers(allowed, requested)


def test_routes() -> None:
    assert route("rfid/r1/scan") is not None
    assert route("rfid/r1/scan").kind is Kind.SCAN  # type: ignore[union-attr]
    assert route("court/c1/button/pressed").kind is Kind.BUTTON  # type: ignore[union-attr]
    assert route("tablet/t1/status").kind is Kind.STATUS  # type: ignore[union-attr]
    assert route("rfid/r1/status") == Route(Kind.STATUS, "r1")
    assert route("display/d1/status") == Route(Kind.STATUS, "d1")
    assert route("pos/p1/status") is None
    for junk in ("rfid//scan", "rfid/r1/scan/extra", "court/c1/state", "", "agent/status"):
        assert route(junk) is None

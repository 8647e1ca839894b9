"""Fuzz target: MQTT topic routing and the topic-filter algebra of the broker's ACL (agent/lan/topics.py).

Topics and filters are drawn level by level from the contract's words, wildcards and anything else, or are
the input's text. Rules: `route` never raises and routes exactly the topics the agent subscribes to (with no
empty id), each to the id in it, and never a topic the agent itself publishes; a filter that `covers` another
matches every topic the other matches (what keeps one court's tablet out of another court's topics).
`python -m tests.fuzz.fuzz_topics [libFuzzer flags]` fuzzes it under atheris."""

from __future__ import annotations

import sys

from agent.lan import topics
from agent.lan.topics import Kind

from . import _harness
from ._support import Draw, Known

LEVELS = (
    *("rfid", "court", "button", "pressed", "checkin", "checkout", "pos", "consumption", "scan", "status"),
    *("tablet", "display", "response", "ack", "state", "agent", "presence", "r1", "c1", "b1", "t1", ""),
)
WILDCARDS = ("+", "#")
OUTBOUND = (
    topics.reader_response,
    topics.button_ack,
    topics.court_state,
    topics.tablet_response,
    topics.presence,
)

REGRESSIONS: list[bytes] = [b"\x00rfid//scan", b"\x00court/c1/button/pressed/", b"\x00$SYS/rfid/r1/scan"]
KNOWN: list[Known] = []


def levels(draw: Draw, *, wild: bool) -> list[str]:
    out = []
    for i in range(1 + draw.below(5)):
        choice = draw.below(8)
        if wild and choice == 0:
            level = draw.pick(WILDCARDS)
            out.append(level)
            if level == "#":
                break  # '#' is last in a valid filter; the broker refuses the rest before any ACL check
        elif choice == 1:
            out.append(draw.text(6).replace("/", ""))
        elif choice == 2 and i == 0:
            out.append("$SYS")
        else:
            out.append(draw.pick(LEVELS))
    return out


def instance(draw: Draw, topic_filter: list[str]) -> str:
    """A topic the filter matches (when it can be built from the choices)."""
    out = []
    for level in topic_filter:
        if level == "#":
            out += [draw.pick(LEVELS) for _ in range(draw.below(3))]
        elif level == "+":
            out.append(draw.pick(LEVELS))
        else:
            out.append(level)
    return "/".join(out) if out else draw.pick(LEVELS)


def TestOneInput(data: bytes) -> None:
    draw = Draw(data)
    if draw.below(4) == 0:
        check_route(draw.rest().decode("utf-8", "replace"))
        return
    topic = "/".join(levels(draw, wild=False))
    check_route(topic)
    allowed, requested = levels(draw, wild=True), levels(draw, wild=True)
    a, r = "/".join(allowed), "/".join(requested)
    assert topics.matches(topic, a) == topics.matches(topic, a)  # pure
    if topics.covers(a, r):
        assert topics.covers(a, a)
        for _ in range(3):
            t = instance(draw, requested)
            if topics.matches(t, r):
                assert topics.matches(t, a), (a, r, t)
    for make in OUTBOUND:
        assert topics.route(make(draw.pick(LEVELS) if draw.below(2) else draw.text(8))) is None


def check_route(topic: str) -> None:
    routed = topics.route(topic)
    subscribed = [s for s in topics.SUBSCRIPTIONS if topics.matches(topic, s)]
    parts = topic.split("/")
    if routed is None:
        assert not subscribed or "" in parts, (topic, subscribed)
        return
    assert subscribed, topic
    assert routed.device_or_court, (topic, routed)
    assert routed.device_or_court == parts[1], (topic, routed)
    expected = {
        "scan": Kind.SCAN,
        "pressed": Kind.BUTTON,
        "checkin": Kind.CHECKIN,
        "checkout": Kind.CHECKOUT,
        "consumption": Kind.CONSUMPTION,
        "status": Kind.STATUS,
    }[parts[-1]]
    assert routed.kind is expected, (topic, routed)


if __name__ == "__main__":
    _harness.fuzz(TestOneInput, topics, sys.modules[__name__])

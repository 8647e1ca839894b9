"""The MQTT topic contract (DESIGN 2.1, names from the reference document), and topic-filter algebra."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from enum import StrEnum

AGENT_STATUS = "agent/status"
PRESENCE_PREFIX = "agent/presence"  # retained agent/presence/{device_id}, one per configured device

# paho (under aiomqtt) leaves Nagle on: a reply then waits for the peer's delayed ACK, ~40 ms on Linux.
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

# What the agent subscribes to.
SUBSCRIPTIONS = (
    "rfid/+/scan",
    "court/+/button/pressed",
    "court/+/checkin",
    "court/+/checkout",
    "pos/+/consumption",
    "rfid/+/status",
    "button/+/status",
    "tablet/+/status",
    "display/+/status",
)
# The first topic level of each device kind's status topic (heartbeats, births and wills).
STATUS_PREFIXES = ("rfid", "button", "tablet", "display")


class Kind(StrEnum):
    SCAN = "scan"
    BUTTON = "button"
    CHECKIN = "checkin"
    CHECKOUT = "checkout"
    CONSUMPTION = "consumption"  # a bar order from a tablet acting as point of sale
    STATUS = "status"  # a device's heartbeat, birth or will


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    device_or_court: str  # reader id, court id, tablet id or point-of-sale id, depending on kind


def route(topic: str) -> Route | None:
    """Which of our inbound topics this is; None for anything else."""
    parts = topic.split("/")
    match parts:
        case ["rfid", reader, "scan"] if reader:
            return Route(Kind.SCAN, reader)
        case ["court", court, "button", "pressed"] if court:
            return Route(Kind.BUTTON, court)
        case ["court", court, "checkin"] if court:
            return Route(Kind.CHECKIN, court)
        case ["court", court, "checkout"] if court:
            return Route(Kind.CHECKOUT, court)
        case ["pos", pos, "consumption"] if pos:
            return Route(Kind.CONSUMPTION, pos)
        case [prefix, device, "status"] if device and prefix in STATUS_PREFIXES:
            return Route(Kind.STATUS, device)
    return None


def reader_response(reader_id: str) -> str:
    return f"rfid/{reader_id}/response"


def button_ack(court_id: str) -> str:
    return f"court/{court_id}/button/ack"


def court_state(court_id: str) -> str:
    return f"court/{court_id}/state"


def tablet_response(tablet_id: str) -> str:
    return f"tablet/{tablet_id}/response"


def presence(device_id: str) -> str:
    return f"{PRESENCE_PREFIX}/{device_id}"


def matches(topic: str, topic_filter: str) -> bool:
    """MQTT 3.1.1 section 4.7 matching of a topic name against a filter."""
    t = topic.split("/")
    f = topic_filter.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(t) == len(f)


def covers(allowed: str, requested: str) -> bool:
    """Whether every topic matched by filter `requested` is also matched by filter `allowed`.

    This is what a subscribe ACL needs: `court/c1/#` covers `court/c1/state` and `court/c1/+`,
    but `court/+/state` is not covered by `court/c1/#` (it would leak other courts).
    """
    a = allowed.split("/")
    r = requested.split("/")
    for i, level in enumerate(a):
        if level == "#":
            return True
        if i >= len(r):
            return False
        req = r[i]
        if req == "#":
            return False
        if level == "+":
            continue
        if req == "+" or req != level:
            return False
    return len(a) == len(r)

"""What every adapter speaks, whatever its wire: `DeviceEvent`s up (card read, button press, heartbeat, fault),
`DeviceCommand`s down (LED colour, buzzer pattern, display text).

The agent hosts adapters in-process and maps these onto the same path as the MQTT contract (DESIGN 2.1):
a `CardRead` is an `rfid/{reader_id}/scan`, a `ButtonPress` a `court/{court_id}/button/pressed`, and the
decision's answer comes back as `Feedback`. Standalone (`python -m firmware_bridges`), the same events are published
to the agent's broker with that contract.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class Color(enum.StrEnum):
    OFF = "off"
    GREEN = "green"
    RED = "red"
    AMBER = "amber"
    BLUE = "blue"


@dataclass(frozen=True, slots=True)
class CardRead:
    """A card presented to a reader; `card_id` is upper-case hex (the MQTT contract's `card_id`)."""

    card_id: str
    format: str  # "em4100", "wiegand26", "wiegand34", "iso14443a", "felica", "osdp", "line", "keyboard"


@dataclass(frozen=True, slots=True)
class ButtonPress:
    button: int  # the button's number on its box (1-based)
    long: bool = False


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The device says it is alive (and, where it can, what it is)."""

    detail: str = ""


@dataclass(frozen=True, slots=True)
class Fault:
    """Something is wrong with the device or its link: reported to the device registry, never fatal."""

    reason: str


DeviceEvent = CardRead | ButtonPress | Heartbeat | Fault


@dataclass(frozen=True, slots=True)
class Feedback:
    """What the person at the device sees and hears. `ack` is the immediate local acknowledgement of a read (a
    short beep and flash before any decision); otherwise the decision's answer: `granted` True/False, with the
    colour, a buzzer pattern (`beeps` short beeps; `long_beep` for a refusal) and text where a display exists."""

    color: Color
    beeps: int = 0
    long_beep: bool = False
    text: str = ""
    ack: bool = False
    granted: bool | None = None

    @classmethod
    def acknowledge(cls) -> Feedback:
        return cls(Color.BLUE, beeps=1, ack=True)

    @classmethod
    def decision(cls, granted: bool, text: str = "") -> Feedback:
        if granted:
            return cls(Color.GREEN, beeps=2, text=text, granted=True)
        return cls(Color.RED, long_beep=True, text=text, granted=False)


DeviceCommand = Feedback


class EventSink(Protocol):
    """Where an adapter hands its events: called on the event loop's thread, never blocks."""

    def __call__(self, event: DeviceEvent) -> None: ...


class Adapter(Protocol):
    """One attached device (or one bus of them). `run` reads until cancelled, reconnecting by itself when the link
    goes away (a `Fault` says so, a `Heartbeat` says it is back) and never blocks the event loop; `send` delivers
    a command if the link is up, else drops it with a `Fault` (feedback is worthless late). Neither raises for
    the link's sake."""

    name: str

    async def run(self, sink: EventSink) -> None: ...

    async def send(self, command: DeviceCommand) -> None: ...

"""Stand-in for MicroPython's `machine`: GPIO pins, SPI, PWM and the watchdog, as far as the firmware uses them.

Every Pin made is registered by number in `pins` (the latest one wins, as after a reboot), so a test can press
a button (`drive`) or look at a LED (`value()`, `history`). An SPI device is attached by its chip-select pin
and sees the bytes of each transfer made while that pin is low.
"""

from __future__ import annotations

from typing import Protocol


class SpiDevice(Protocol):
    def transfer(self, data: bytes) -> bytes: ...


pins: dict[int, Pin] = {}
spi_devices: dict[int, SpiDevice] = {}
watchdogs: list[WDT] = []


def clear() -> None:
    """A new board: no pins made, nothing on the SPI bus."""
    pins.clear()
    spi_devices.clear()
    watchdogs.clear()


class Pin:
    IN = 1
    OUT = 3
    PULL_UP = 1
    PULL_DOWN = 2

    def __init__(self, pin_id: int, mode: int | None = None, pull: int | None = None, value: int | None = None):
        self.id = pin_id
        self.mode = mode
        self.pull = pull
        self._value = value if value is not None else (1 if pull == Pin.PULL_UP else 0)
        self.history: list[int] = []  # every level written by the firmware, for outputs
        pins[pin_id] = self

    def value(self, level: int | None = None) -> int:
        if level is None:
            return self._value
        self._value = 1 if level else 0
        self.history.append(self._value)
        return self._value

    def on(self) -> None:
        self.value(1)

    def off(self) -> None:
        self.value(0)

    def drive(self, level: int) -> None:
        """The outside world sets an input's level (a contact closing)."""
        self._value = level


class SPI:
    def __init__(self, spi_id: int, baudrate: int = 1_000_000, polarity: int = 0, phase: int = 0, **pins: Pin):
        self.id = spi_id
        self.baudrate = baudrate
        self.mode = (polarity, phase)
        self.pins = pins

    def _selected(self) -> SpiDevice | None:
        chosen = [device for cs, device in spi_devices.items() if cs in pins and pins[cs].value() == 0]
        assert len(chosen) <= 1, "two chip selects low at once"
        return chosen[0] if chosen else None

    def write(self, data: bytes | bytearray) -> None:
        device = self._selected()
        if device is not None:
            device.transfer(bytes(data))

    def write_readinto(self, data: bytes | bytearray, into: bytearray) -> None:
        device = self._selected()
        reply = device.transfer(bytes(data)) if device is not None else b"\xff" * len(data)  # MISO floats high
        into[: len(reply)] = reply


class PWM:
    def __init__(self, pin: Pin, freq: int = 0, duty_u16: int = 0):
        self.pin = pin
        self.freq = freq
        self.duty_u16(duty_u16)

    def duty_u16(self, duty: int) -> None:
        self.pin.value(1 if duty else 0)


class WDT:
    def __init__(self, timeout: int = 5000):
        self.timeout = timeout
        self.feeds = 0
        watchdogs.append(self)

    def feed(self) -> None:
        self.feeds += 1


class ResetRequested(Exception):
    """machine.reset() was called: on the device the board would reboot here."""


def reset() -> None:
    raise ResetRequested

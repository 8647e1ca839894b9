"""The ESP32's hardware behind the small interfaces the application modules use.

This module and main.py are the only ones that import MicroPython's `machine`, `network` and `umqtt`; the
rest run unchanged on a host. Wiring and pin numbers: README.md and config.PIN_DEFAULTS.
"""

import os

import machine
import network
from mfrc522 import MFRC522
from umqtt.simple import MQTTClient

random_bytes = os.urandom  # the ESP32's hardware RNG: truly random once the radio is on


class Output:
    """A LED or an active buzzer on a GPIO. value(1) means lit or sounding, whatever the wiring's polarity."""

    def __init__(self, pin_no, active_low=False):
        self._active_low = active_low
        self._pin = machine.Pin(pin_no, machine.Pin.OUT, value=1 if active_low else 0)

    def value(self, on):
        lit = 1 if on else 0
        self._pin.value(1 - lit if self._active_low else lit)


class PwmBuzzer:
    """A passive buzzer (a bare piezo) needs a tone, not a level: a square wave at `hz` while on."""

    def __init__(self, pin_no, hz):
        self._pwm = machine.PWM(machine.Pin(pin_no), freq=hz, duty_u16=0)

    def value(self, on):
        self._pwm.duty_u16(32768 if on else 0)


class NoOutput:
    """An output the board does not have (pin set to null in the config)."""

    def value(self, on):
        return None


def output(pin_no, active_low=False):
    return NoOutput() if pin_no is None else Output(pin_no, active_low)


def buzzer(pin_no, pwm_hz):
    if pin_no is None:
        return NoOutput()
    return PwmBuzzer(pin_no, pwm_hz) if pwm_hz else Output(pin_no)


class ButtonInput:
    """A push button between a GPIO and GND, on the internal pull-up: pressed reads 0, reported as level 1.

    Polled once a loop (every 10 ms), not taken from a pin interrupt: the ESP32 port runs pin handlers as
    scheduled callbacks, which run late, all together, after a blocking call, and so would tell nothing the poll
    does not. What polling cannot see is a press made and released entirely while a call blocks; the only long
    one is an MQTT connect to a broker host that does not answer, bounded by broker.connect_timeout_s, and the
    LED gives no flicker for such a press, so the player presses again.
    """

    def __init__(self, pin_no):
        self._pin = machine.Pin(pin_no, machine.Pin.IN, machine.Pin.PULL_UP)

    def samples(self, now):
        return [(1 - self._pin.value(), now)]


class Rc522:
    """The RC522 board on SPI, as a source of card UIDs. A bus error is a missed poll, not a crash."""

    def __init__(self, pins, spi_id, baudrate, sleep_ms, log):
        spi = machine.SPI(
            spi_id,
            baudrate=baudrate,
            polarity=0,
            phase=0,
            sck=machine.Pin(pins["sck"]),
            mosi=machine.Pin(pins["mosi"]),
            miso=machine.Pin(pins["miso"]),
        )
        cs = machine.Pin(pins["cs"], machine.Pin.OUT, value=1)
        rst = machine.Pin(pins["rst"], machine.Pin.OUT, value=1) if pins.get("rst") is not None else None
        self._log = log
        self.errors = 0
        self._chip = MFRC522(spi, cs, rst, sleep_ms)
        self.version = self._chip.version()
        if self.version in (0x00, 0xFF):
            log("rc522_not_found", "VersionReg " + hex(self.version) + ": check the wiring and the 3.3 V supply")

    def read_uid(self):
        try:
            return self._chip.read_uid()
        except OSError as exc:
            self.errors += 1
            self._log("rc522_error", repr(exc))
            return None


def wlan(hostname, log):
    """The station interface, powered up (which also starts the radio the RNG draws its noise from)."""
    try:
        network.hostname(hostname)  # the name in the club router's DHCP list (recent MicroPython versions)
    except (AttributeError, OSError, ValueError) as exc:
        log("hostname_not_set", repr(exc))
    station = network.WLAN(network.STA_IF)
    station.active(True)
    return station


def mqtt_factory(host, port):
    def make(client_id, **options):
        return MQTTClient(client_id, host, port, **options)

    return make


def watchdog(seconds):
    """Resets the board if the loop stops feeding it: a hang costs a reboot, and the press queue is on flash."""
    return machine.WDT(timeout=seconds * 1000) if seconds else None


def reset():
    machine.reset()

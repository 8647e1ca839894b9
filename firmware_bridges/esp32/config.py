"""The device's settings: one JSON file on flash (`config.json`), read once at boot.

Everything a site differs in is here; everything else has a default that suits an ESP32 DevKit. A missing or
wrong required setting stops the boot with a message naming it (shown on the serial console), because a device
that guesses its identity would speak for another one.
"""

import json

ROLES = ("button", "reader")

# GPIO numbers on an ESP32 DevKit (see README.md for the wiring). None means "not fitted".
PIN_DEFAULTS = {
    "button": {"button": 4, "led": 2, "buzzer": None},
    "reader": {
        "sck": 18,
        "mosi": 23,
        "miso": 19,
        "cs": 5,
        "rst": 22,
        "led_green": 25,
        "led_red": 26,
        "buzzer": 27,
        "led_status": 2,
    },
}

DEFAULTS = {
    # A connect blocks the loop (and the button's polling) for at most connect_timeout_s.
    "broker": {"port": 1883, "keepalive_s": 30, "connect_timeout_s": 3},
    "button": {
        "debounce_ms": 30,
        "long_press_ms": 1500,
        "ack_timeout_ms": 2000,
        "max_tries": 10,
        "queue_limit": 50,
        "queue_file": "presses.json",
        # The agent accepts a burst of presses per court, then two a second (policy.scan_rate_per_s): a
        # backlog sent after an outage is paced to that, so none is dropped for arriving too fast.
        "send_gap_ms": 500,
    },
    "reader": {
        "poll_ms": 80,
        # A card that stays in the field still misses an occasional poll: it counts as removed only after
        # this long without a read.
        "gone_ms": 800,
        "response_timeout_ms": 1500,
        "max_tries": 2,
        "result_ms": 2500,
        "spi_id": 2,
        "spi_baudrate": 1000000,
    },
    "heartbeat_s": 60,
    "watchdog_s": 60,
    "active_low_leds": False,
    "buzzer_pwm_hz": 0,
}


class ConfigError(ValueError):
    pass


class Config:
    """Attribute access over the merged settings: cfg.device_id, cfg.button["debounce_ms"], cfg.pins["led"]."""

    def __init__(self, doc):
        if not isinstance(doc, dict):
            raise ConfigError("the config file must hold a JSON object")
        role = doc.get("role")
        if role not in ROLES:
            raise ConfigError("role: expected one of " + ", ".join(ROLES))
        self.role = role
        self.device_id = _text(doc, "device_id")
        self.password = _text(doc, "password", limit=128)
        # The broker's access list ties a button to one court's topics, so a button must know its court.
        self.court_id = _text(doc, "court_id") if role == "button" else doc.get("court_id")
        wifi = _section(doc, "wifi", {})
        self.wifi_ssid = _text(wifi, "ssid", "wifi.")
        self.wifi_password = wifi.get("password", "")
        self.broker = _section(doc, "broker", DEFAULTS["broker"])
        _text(self.broker, "host", "broker.")
        self.button = _section(doc, "button", DEFAULTS["button"])
        self.reader = _section(doc, "reader", DEFAULTS["reader"])
        self.pins = _section(doc, "pins", PIN_DEFAULTS[role])
        self.heartbeat_s = doc.get("heartbeat_s", DEFAULTS["heartbeat_s"])
        self.watchdog_s = doc.get("watchdog_s", DEFAULTS["watchdog_s"])
        self.active_low_leds = bool(doc.get("active_low_leds", DEFAULTS["active_low_leds"]))
        self.buzzer_pwm_hz = doc.get("buzzer_pwm_hz", DEFAULTS["buzzer_pwm_hz"])
        for name in ("debounce_ms", "long_press_ms", "ack_timeout_ms", "max_tries", "queue_limit", "send_gap_ms"):
            _positive(self.button, name, "button.")
        for name in ("poll_ms", "gone_ms", "response_timeout_ms", "max_tries", "result_ms"):
            _positive(self.reader, name, "reader.")
        _positive(self.broker, "port", "broker.")
        if self.button["long_press_ms"] <= self.button["debounce_ms"]:
            raise ConfigError("button.long_press_ms must be longer than button.debounce_ms")

    @property
    def username(self):
        # The broker requires the device id as user name and as client id (or client id "{id}-...").
        return self.device_id


def _section(doc, name, defaults):
    given = doc.get(name, {})
    if not isinstance(given, dict):
        raise ConfigError(name + ": expected an object")
    merged = dict(defaults)
    merged.update(given)
    return merged


def _text(doc, name, where="", limit=64):
    # 64: the agent's limit for ids; a longer device id could never be configured there.
    value = doc.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ConfigError(where + name + ": expected a non-empty string of at most " + str(limit) + " characters")
    return value


def _positive(doc, name, where):
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(where + name + ": expected a positive integer")


def load(path="config.json"):
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as exc:
        raise ConfigError(path + ": cannot read (" + str(exc) + ")") from exc
    except ValueError as exc:
        raise ConfigError(path + ": not valid JSON (" + str(exc) + ")") from exc
    return Config(doc)

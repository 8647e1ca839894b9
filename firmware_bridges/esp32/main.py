"""Boot entry: read config.json, build the button or the reader from it, and run the loop forever.

MicroPython runs this file after boot.py. On a host, the tests call `build` with stand-ins for the hardware
modules and step the application themselves.
"""

import config
import hal
import proto
import ticks
from button_app import ButtonApp
from netlink import Backoff, MqttLink, Wifi
from pressqueue import PressQueue
from reader_app import ReaderApp
from signals import Blinker

LOOP_MS = 10
# Consecutive failed loop steps before a reset: a fault that repeats on every step will not fix itself.
CRASHES_BEFORE_RESET = 50


def log(event, detail=""):
    print(ticks.ticks_ms(), event, detail)


def build(cfg, clock=ticks, flash_dir="", log=log):
    """The application for cfg.role, wired to the hardware in `hal`."""
    station = hal.wlan(cfg.device_id, log)  # first: the radio must be on before the RNG is used
    ids = proto.MsgIds(hal.random_bytes)
    wifi = Wifi(station, cfg.wifi_ssid, cfg.wifi_password, Backoff(1000, 30000, hal.random_bytes), log)
    status_topic = proto.status_topic(cfg.role, cfg.device_id)
    reply_topic = proto.ack_topic(cfg.court_id) if cfg.role == "button" else proto.response_topic(cfg.device_id)
    link = MqttLink(
        hal.mqtt_factory(cfg.broker["host"], cfg.broker["port"]),
        client_id=cfg.device_id,
        user=cfg.username,
        password=cfg.password,
        keepalive_s=cfg.broker["keepalive_s"],
        subscriptions=[reply_topic],
        status_topic=status_topic,
        birth=proto.encode_status("online"),
        will=proto.encode_status("offline"),
        backoff=Backoff(500, 30000, hal.random_bytes),
        connect_timeout_s=cfg.broker["connect_timeout_s"],
        log=log,
    )
    pins = cfg.pins
    low = cfg.active_low_leds
    if cfg.role == "button":
        name = cfg.button["queue_file"]
        queue = PressQueue(flash_dir + "/" + name if flash_dir else name, cfg.button["queue_limit"])
        queue.load()
        if queue.load_error:
            log("queue_damaged", queue.load_error)
        return ButtonApp(
            cfg,
            clock,
            wifi,
            link,
            hal.ButtonInput(pins["button"]),
            Blinker(hal.output(pins["led"], low)),
            queue,
            ids,
            buzzer=Blinker(hal.buzzer(pins["buzzer"], cfg.buzzer_pwm_hz)) if pins.get("buzzer") is not None else None,
            log=log,
        )
    reader = cfg.reader
    return ReaderApp(
        cfg,
        clock,
        wifi,
        link,
        hal.Rc522(pins, reader["spi_id"], reader["spi_baudrate"], clock.sleep_ms, log),
        Blinker(hal.output(pins["led_green"], low)),
        Blinker(hal.output(pins["led_red"], low)),
        Blinker(hal.buzzer(pins.get("buzzer"), cfg.buzzer_pwm_hz)),
        Blinker(hal.output(pins.get("led_status"), low)),
        ids,
        log=log,
    )


def run(app, watchdog_s):
    dog = hal.watchdog(watchdog_s)
    crashes = 0
    while True:
        try:
            app.step()
            crashes = 0
        except Exception as exc:  # one bad message or glitch must not stop the device
            crashes += 1
            log("step_failed", repr(exc))
            if crashes >= CRASHES_BEFORE_RESET:
                hal.reset()
        if dog is not None:
            dog.feed()
        ticks.sleep_ms(LOOP_MS)


def main():
    try:
        cfg = config.load()
    except config.ConfigError as exc:
        # Left at the REPL, so the installer sees the message on the serial console and can fix the file.
        print("config.json:", exc)
        return
    run(build(cfg), cfg.watchdog_s)


if __name__ == "__main__":
    main()

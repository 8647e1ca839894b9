"""The firmware's host-independent modules run under a real MicroPython (the unix port), to show that every
API they use exists there and behaves as the CPython tests assume: json, binascii, os.rename over a file,
time.ticks_*, os.urandom, bytes and list operations.

    micropython micropython_smoke.py FIRMWARE_DIR FLASH_DIR

prints "ok" last; any failure is an uncaught exception (non-zero exit status).
"""

import json
import os
import sys

sys.path.insert(0, sys.argv[1])
FLASH = sys.argv[2]

import button_app  # noqa: E402 (the firmware directory is on the path only now)
import config  # noqa: E402
import pressqueue  # noqa: E402
import proto  # noqa: E402
import signals  # noqa: E402
import ticks  # noqa: E402
from debounce import LONG, SHORT, PressDetector  # noqa: E402
from netlink import Backoff  # noqa: E402


class FakeLink:
    def __init__(self):
        self.up = True
        self.connects = 1
        self.sent = []
        self.inbox = []

    def service(self, now, network_up):
        return None

    def take(self):
        messages, self.inbox = self.inbox, []
        return messages

    def publish(self, topic, payload, now, retain=False):
        self.sent.append((topic, payload))
        return True

    def answered(self):
        return None

    def unanswered(self, now):
        return None


class FakeClock:
    def __init__(self):
        self.now = 5000

    def ticks_ms(self):
        return self.now


class FakeButton:
    def __init__(self):
        self.pending = []

    def samples(self, now):
        out, self.pending = self.pending, []
        return out


class FakeOutput:
    def __init__(self):
        self.level = 0

    def value(self, level):
        self.level = level


class Online:
    def service(self, now):
        return True


def check_ticks():
    start = ticks.ticks_ms()
    ticks.sleep_ms(2)
    assert ticks.ticks_diff(ticks.ticks_ms(), start) >= 1
    assert ticks.ticks_diff(ticks.ticks_add(start, 100), start) == 100


def check_debounce():
    detector = PressDetector(30, 1000)
    presses = []
    for level, t in ((1, 0), (0, 2), (1, 3), (0, 5), (1, 6), (0, 100), (1, 101), (0, 103)):
        presses += detector.feed(level, t)
    presses += detector.poll(200)
    assert presses == [(SHORT, 6)], presses
    presses = detector.feed(1, 300) + detector.poll(400) + detector.poll(1400)
    assert presses == [(LONG, 300)], presses


def check_proto():
    ids = proto.MsgIds(os.urandom)
    assert len(ids.boot) == 12
    assert ids.next() == ids.boot + "-1"
    assert proto.uid_hex(b"\x04\xb0\x0a") == "04B00A"
    reply = proto.decode_reply(b'{"msg_id": "x-1", "status": "ok", "highlight_id": "h1"}')
    assert reply.recorded
    assert reply.highlight_id == "h1"
    assert proto.decode_reply(b"\xff\xfe") is None
    assert proto.decode_reply(b"[1]") is None


def check_queue():
    path = FLASH + "/presses.json"
    queue = pressqueue.PressQueue(path, 2)
    for n in range(3):
        queue.push(pressqueue.Entry("b-" + str(n), SHORT, "b", n))
    queue.save()  # a second rename over the existing file
    again = pressqueue.PressQueue(path, 2)
    again.load()
    assert [e.msg_id for e in again.items] == ["b-1", "b-2"]
    assert again.dropped == 1


def check_button():
    doc = {
        "role": "button",
        "device_id": "b1",
        "password": "pw",
        "court_id": "c1",
        "wifi": {"ssid": "club"},
        "broker": {"host": "10.0.0.2"},
    }
    cfg = config.Config(doc)
    clock = FakeClock()
    link = FakeLink()
    button = FakeButton()
    queue = pressqueue.PressQueue(FLASH + "/button.json", 5)
    led = signals.Blinker(FakeOutput())
    ids = proto.MsgIds(os.urandom)
    app = button_app.ButtonApp(cfg, clock, Online(), link, button, led, queue, ids)
    button.pending = [(1, 5000), (0, 5001), (1, 5002)]
    clock.now = 5100
    app.step()
    button.pending = [(0, 5100)]
    clock.now = 5200
    app.step()
    assert len(link.sent) == 2, link.sent  # the status heartbeat, then the press
    topic, payload = link.sent[1]
    assert topic == "court/c1/button/pressed"
    sent = json.loads(payload)
    assert sent["msg_id"] == ids.boot + "-1"
    assert sent["kind"] == SHORT
    assert sent["button_id"] == "b1"
    ack = b'{"msg_id": "' + ids.boot.encode() + b'-1", "status": "no_session", "highlight_id": "h"}'
    link.inbox.append(("court/c1/button/ack", ack))
    clock.now = 5300
    app.step()
    assert len(queue) == 0
    assert app.last_ack.status == "no_session"


def check_backoff():
    backoff = Backoff(100, 1000, os.urandom)
    delays = [backoff.delay() for _ in range(6)]
    assert all(0 < d <= 1000 for d in delays), delays


check_ticks()
check_debounce()
check_proto()
check_queue()
check_button()
check_backoff()
print("ok")

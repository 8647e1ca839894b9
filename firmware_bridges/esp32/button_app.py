"""The highlight button: presses in, acks back, nothing lost while the agent is out of reach.

Each debounced press gets a msg_id and goes to the end of the queue on flash. The head of the queue is sent,
and sent again every `ack_timeout_ms` with the same msg_id until the agent's ack for that id arrives (or
`max_tries` sends went unanswered); only then is the next press sent, so the agent sees presses in the order
they were made, and at most once each, however many times one was resent.

The LED says what happened: steady on when ready, a slow blink while offline, a flicker at each press, three
quick flashes when the highlight is recorded on a running session, one long flash when it is recorded without
a session, rapid flashes when the agent refused it.
"""

import proto
from debounce import PressDetector
from pressqueue import Entry
from signals import OFFLINE_BLINK, ON
from ticks import ticks_diff

PRESSED = (40, 60, 40)
RECORDED = (80, 80, 80, 80, 80)
NO_SESSION = (600,)
REFUSED = (50, 50, 50, 50, 50, 50, 50)


class ButtonApp:
    def __init__(self, cfg, clock, wifi, link, button, led, queue, ids, buzzer=None, log=None):
        self.cfg = cfg
        self.clock = clock
        self.wifi = wifi  # .service(now) -> joined or not
        self.link = link
        self.button = button  # .samples(now) -> [(level, t)], level 1 = pressed
        self.led = led  # signals.Blinker
        self.buzzer = buzzer
        self.queue = queue
        self.ids = ids
        self._log = log or (lambda event, detail="": None)
        settings = cfg.button
        self.detector = PressDetector(settings["debounce_ms"], settings["long_press_ms"])
        self.ack_timeout_ms = settings["ack_timeout_ms"]
        self.max_tries = settings["max_tries"]
        self.send_gap_ms = settings["send_gap_ms"]
        self.press_topic = proto.press_topic(cfg.court_id)
        self.ack_topic = proto.ack_topic(cfg.court_id)
        self.status_topic = proto.status_topic("button", cfg.device_id)
        self.presses = 0
        self.sends = 0
        self.last_ack = None
        self._beat_at = None
        self._acked_at = None
        self._session = 0

    def step(self):
        now = self.clock.ticks_ms()
        self.link.service(now, self.wifi.service(now))
        for topic, payload in self.link.take():
            if topic == self.ack_topic:
                self._on_ack(proto.decode_reply(payload), now)
        for level, t in self.button.samples(now):
            for kind, pressed_at in self.detector.feed(level, t):
                self._pressed(kind, pressed_at, now)
        for kind, pressed_at in self.detector.poll(now):
            self._pressed(kind, pressed_at, now)
        self._send_head(now)
        self._heartbeat(now)
        self.led.idle(ON if self.link.up else OFFLINE_BLINK, now)
        self.led.update(now)
        if self.buzzer is not None:
            self.buzzer.update(now)
        return now

    def _pressed(self, kind, pressed_at, now):
        self.presses += 1
        self.queue.push(Entry(self.ids.next(), kind, self.ids.boot, pressed_at))
        self.led.play(PRESSED, now)
        if self.buzzer is not None:
            self.buzzer.play((30,), now)
        self._log("press", kind)

    def _send_head(self, now):
        entry = self.queue.head()
        if entry is None or not self.link.up:
            return
        if self._session != self.link.connects:
            # A new connection: whatever was in flight on the old one is sent again now, not after a timeout.
            self._session = self.link.connects
            entry.sent_at = None
        if entry.sent_at is not None:
            if ticks_diff(now, entry.sent_at) < self.ack_timeout_ms:
                return
            entry.sent_at = None
            self.link.unanswered(now)
            if entry.tries >= self.max_tries:
                self._log("press_given_up", entry.msg_id)
                self.queue.pop(entry.msg_id, gave_up=True)
                self.led.play(REFUSED, now)
                return
            if not self.link.up:
                return
        elif entry.tries == 0 and self._acked_at is not None and ticks_diff(now, self._acked_at) < self.send_gap_ms:
            # Draining a backlog: the agent takes a few presses per court at once, then two a second; faster
            # ones are dropped unanswered and would only come back after a timeout.
            return
        age = ticks_diff(now, entry.pressed_at) if entry.boot == self.ids.boot else None
        payload = proto.encode_press(self.cfg.device_id, entry.msg_id, entry.kind, age)
        if self.link.publish(self.press_topic, payload, now):
            entry.tries += 1
            entry.sent_at = now
            self.sends += 1

    def _on_ack(self, reply, now):
        if reply is None:
            return
        entry = self.queue.head()
        if entry is None or reply.msg_id != entry.msg_id:
            return  # another button of this court, or a late copy of an ack already taken
        self.link.answered()
        self._acked_at = now
        if reply.recorded:
            self.queue.pop(entry.msg_id)
            self.last_ack = reply
            self.led.play(RECORDED if reply.status == "ok" else NO_SESSION, now)
        elif reply.refused:
            self._log("press_refused", str(reply.reason))
            self.queue.pop(entry.msg_id, gave_up=True)
            self.last_ack = reply
            self.led.play(REFUSED, now)
        # anything else ("error": the agent could not store it now) is resent after the timeout

    def _heartbeat(self, now):
        if not self.link.up:
            self._beat_at = None
            return
        if self._beat_at is not None and ticks_diff(now, self._beat_at) < self.cfg.heartbeat_s * 1000:
            return
        extra = {"queued": len(self.queue), "dropped": self.queue.dropped, "given_up": self.queue.given_up}
        if self.link.publish(self.status_topic, proto.encode_status("online", extra), now):
            self._beat_at = now

"""The card reader: a UID in, the agent's decision back on the LEDs and the buzzer.

Every read is acknowledged on the spot with a short beep and a flash of the status LED, before the agent has
answered, so the player knows the card was seen and does not wave it again. The scan is then published with a
fresh msg_id and resent (same id: the agent answers again without deciding twice) until the response with that
id arrives or `max_tries` sends went unanswered. The response's color drives the green or the red LED for
`result_ms`, with one beep for granted and a long one for denied.

Scans are not queued while offline: a check-in answered minutes later would open a session for a player who
has long gone. Offline, a read is answered at once by the red LED blinking and five short beeps.

A card held to the reader is read on every poll; it is reported once, and again only after it has been away
for `gone_ms` (RC522 polls miss a card now and then even when it does not move).
"""

import proto
from signals import OFF, OFFLINE_BLINK
from ticks import ticks_diff

SEEN = (60,)
BEEP_SEEN = (40,)
BEEP_GRANTED = (150,)
BEEP_DENIED = (500,)
BEEP_NO_ANSWER = (80, 80, 80, 80, 80)
NO_ANSWER = (100, 100, 100, 100, 100, 100, 100, 100, 100)


class RepeatFilter:
    def __init__(self, gone_ms):
        self.gone_ms = gone_ms
        self._uid = None
        self._seen_at = None

    def new_card(self, uid, now):
        """True when this read is a new presentation, not the same card still lying on the reader."""
        same = uid == self._uid and self._seen_at is not None and ticks_diff(now, self._seen_at) < self.gone_ms
        self._uid = uid
        self._seen_at = now
        return not same


class ReaderApp:
    def __init__(self, cfg, clock, wifi, link, rfid, green, red, buzzer, status, ids, log=None):
        self.cfg = cfg
        self.clock = clock
        self.wifi = wifi
        self.link = link
        self.rfid = rfid  # .read_uid() -> bytes or None
        self.green = green  # signals.Blinker, as are the three below
        self.red = red
        self.buzzer = buzzer
        self.status = status
        self.ids = ids
        self._log = log or (lambda event, detail="": None)
        settings = cfg.reader
        self.poll_ms = settings["poll_ms"]
        self.timeout_ms = settings["response_timeout_ms"]
        self.max_tries = settings["max_tries"]
        self.result_ms = settings["result_ms"]
        self.repeats = RepeatFilter(settings["gone_ms"])
        self.scan_topic = proto.scan_topic(cfg.device_id)
        self.response_topic = proto.response_topic(cfg.device_id)
        self.status_topic = proto.status_topic("reader", cfg.device_id)
        self.pending = None  # [msg_id, card_id, sent_at, tries] of the scan waiting for its response
        self.reads = 0
        self.sends = 0
        self.last_reply = None
        self._polled_at = None
        self._beat_at = None
        self._outputs = (green, red, buzzer, status)

    @property
    def waiting(self):
        return self.pending is not None

    def step(self):
        now = self.clock.ticks_ms()
        self.link.service(now, self.wifi.service(now))
        for topic, payload in self.link.take():
            if topic == self.response_topic:
                self._on_response(proto.decode_reply(payload), now)
        if self._polled_at is None or ticks_diff(now, self._polled_at) >= self.poll_ms:
            self._polled_at = now
            uid = self.rfid.read_uid()
            if uid is not None and self.repeats.new_card(uid, now):
                self._read(proto.uid_hex(uid), now)
        self._resend(now)
        self._heartbeat(now)
        self.status.idle(OFF if self.link.up else OFFLINE_BLINK, now)
        for output in self._outputs:
            output.update(now)
        return now

    def _read(self, card_id, now):
        self.reads += 1
        self.buzzer.play(BEEP_SEEN, now)
        self.status.play(SEEN, now)
        self.green.play((), now)  # a new card clears the last card's result
        self.red.play((), now)
        self._log("card", card_id)
        self.pending = [self.ids.next(), card_id, None, 0]
        self._send(now)

    def _send(self, now):
        msg_id, card_id, _sent_at, tries = self.pending
        if self.link.publish(self.scan_topic, proto.encode_scan(card_id, msg_id), now):
            self.pending[2] = now
            self.pending[3] = tries + 1
            self.sends += 1
        else:
            self._no_answer(now)  # the link is down (publish takes it down when the send fails)

    def _resend(self, now):
        if self.pending is None or ticks_diff(now, self.pending[2]) < self.timeout_ms:
            return
        self.link.unanswered(now)
        if self.pending[3] >= self.max_tries or not self.link.up:
            self._no_answer(now)
        else:
            self._send(now)

    def _no_answer(self, now):
        self.pending = None
        self.red.play(NO_ANSWER, now)
        self.buzzer.play(BEEP_NO_ANSWER, now)
        self._log("no_answer", "")

    def _on_response(self, reply, now):
        if reply is None or self.pending is None or reply.msg_id != self.pending[0]:
            return  # an answer to a scan already given up on: its card is gone, showing it now would mislead
        self.pending = None
        self.link.answered()
        self.last_reply = reply
        granted = reply.color == "green" if reply.color else reply.granted
        (self.green if granted else self.red).play((self.result_ms,), now)
        self.buzzer.play(BEEP_GRANTED if granted else BEEP_DENIED, now)
        self._log("response", str(reply.reason))

    def _heartbeat(self, now):
        if not self.link.up:
            self._beat_at = None
            return
        if self._beat_at is not None and ticks_diff(now, self._beat_at) < self.cfg.heartbeat_s * 1000:
            return
        if self.link.publish(self.status_topic, proto.encode_status("online"), now):
            self._beat_at = now

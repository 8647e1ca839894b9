"""The MQTT contract with the club agent (DESIGN 2.1), as the devices speak it: topics, message ids, payloads.

Payloads are small JSON objects. The agent ignores fields it does not know, so a field added here for
diagnosis (`age_ms`, `dropped`) never breaks an older agent.
"""

import json
from binascii import hexlify

VERSION = "esp32-1.0.0"
MAX_ID = 64  # the agent refuses longer ids


def scan_topic(reader_id):
    return "rfid/" + reader_id + "/scan"


def response_topic(reader_id):
    return "rfid/" + reader_id + "/response"


def press_topic(court_id):
    return "court/" + court_id + "/button/pressed"


def ack_topic(court_id):
    return "court/" + court_id + "/button/ack"


def status_topic(role, device_id):
    # The agent's status topics are named by device kind: rfid/{id}/status for readers, button/{id}/status.
    return ("rfid/" if role == "reader" else "button/") + device_id + "/status"


class MsgIds:
    """Message ids unique per device across reboots, and stable across resends of one message.

    The agent answers a repeated (device, msg_id) from its store instead of acting twice, so an id must never be
    reused for a different press: a random boot token (from the hardware RNG, drawn after the radio is on so it
    is really random) followed by a counter. 48 random bits make a clash between two boots negligible over the
    few days the agent remembers answers.
    """

    def __init__(self, random_bytes):
        self.boot = hexlify(random_bytes(6)).decode()
        self._count = 0

    def next(self):
        self._count += 1
        return self.boot + "-" + str(self._count)


def uid_hex(uid):
    """A card UID (bytes) as the agent's canonical card id: upper-case hex, no separators."""
    return hexlify(bytes(uid)).decode().upper()


def encode_press(button_id, msg_id, kind, age_ms=None):
    body = {"button_id": button_id, "msg_id": msg_id, "kind": kind}
    if age_ms is not None:
        # How long ago the press happened, for a press that waited in the offline queue.
        body["age_ms"] = age_ms
    return json.dumps(body).encode()


def encode_scan(card_id, msg_id):
    return json.dumps({"card_id": card_id, "msg_id": msg_id}).encode()


def encode_status(state, extra=None):
    body = {"state": state, "app_version": VERSION}
    if extra:
        body.update(extra)
    return json.dumps(body).encode()


class Reply:
    """An answer from the agent: its msg_id, status and the fields the device acts on."""

    def __init__(self, doc):
        self.msg_id = doc.get("msg_id")
        self.status = doc.get("status")
        self.color = doc.get("color")
        self.reason = doc.get("reason")
        self.message = doc.get("message")
        self.highlight_id = doc.get("highlight_id")
        self.doc = doc

    @property
    def granted(self):
        return self.status == "granted"

    @property
    def recorded(self):
        """A button ack that says the press is stored (with or without a session to attach it to)."""
        return self.status in ("ok", "no_session")

    @property
    def refused(self):
        """A button ack that says the press will never be accepted: resending it cannot help."""
        return self.status == "invalid"


def decode_reply(payload):
    """A Reply, or None for anything that is not a JSON object with a string msg_id (never raises)."""
    try:
        doc = json.loads(payload if isinstance(payload, str) else bytes(payload).decode())
    except Exception:  # bad UTF-8 or bad JSON: MicroPython and CPython raise different types for each
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("msg_id"), str):
        return None
    return Reply(doc)

"""Presses waiting for the agent's ack, in press order, kept in a small file on flash.

The file is rewritten whole (it holds at most `limit` short entries) to a temporary name and renamed over the
old one, so a power cut in the middle leaves the previous version or the new one, never half of one. It is
written when a press is added and when one is settled, not on every resend, to spare the flash.

When full, the oldest press is dropped: a highlight of the last minutes is worth more than one from an hour
ago, which the camera's buffer no longer holds anyway. Drops are counted, on flash too, and reported in the
device's status message.
"""

import json
import os


class Entry:
    def __init__(self, msg_id, kind, boot, pressed_at):
        self.msg_id = msg_id
        self.kind = kind
        self.boot = boot  # the boot token of the run that saw the press: its tick time means nothing in another
        self.pressed_at = pressed_at
        self.tries = 0  # sends in this run; not kept on flash, so a reboot gives each press a fresh budget
        self.sent_at = None


class PressQueue:
    def __init__(self, path, limit):
        self.path = path
        self.limit = limit
        self.items = []
        self.dropped = 0  # pushed out because the queue was full
        self.given_up = 0  # sent max_tries times without an ack
        self.load_error = None

    def __len__(self):
        return len(self.items)

    def head(self):
        return self.items[0] if self.items else None

    def push(self, entry):
        self.items.append(entry)
        while len(self.items) > self.limit:
            # The oldest press not sent yet: one already sent may be recorded, and its ack must still find it.
            self.items.pop(1 if self.items[0].tries and len(self.items) > 1 else 0)
            self.dropped += 1
        self.save()

    def pop(self, msg_id, gave_up=False):
        """Remove the press with this id; False if it is not queued (a late duplicate ack)."""
        for i, entry in enumerate(self.items):
            if entry.msg_id == msg_id:
                self.items.pop(i)
                if gave_up:
                    self.given_up += 1
                self.save()
                return True
        return False

    def save(self):
        doc = {
            "v": 1,
            "dropped": self.dropped,
            "given_up": self.given_up,
            "items": [[e.msg_id, e.kind, e.boot, e.pressed_at] for e in self.items],
        }
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(doc))
        try:
            os.rename(tmp, self.path)
        except OSError:
            # FAT will not rename over an existing file (LittleFS, the default on ESP32, does, atomically).
            _remove(self.path)
            os.rename(tmp, self.path)

    def load(self):
        """Read the queue back after a boot. A damaged file is set aside, not fatal: the device must still work."""
        for path in (self.path, self.path + ".tmp"):
            try:
                with open(path) as f:
                    doc = json.loads(f.read())
                items = [Entry(str(i[0]), str(i[1]), str(i[2]), int(i[3])) for i in doc["items"]]
            except OSError:
                continue  # no file: nothing was queued
            except Exception as exc:  # damaged: JSON, types and shape errors differ between ports
                self.load_error = path + ": " + repr(exc)
                continue
            self.items = items[-self.limit :]
            self.dropped = int(doc.get("dropped", 0)) + len(items) - len(self.items)
            self.given_up = int(doc.get("given_up", 0))
            return
        self.items = []


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        return False
    return True

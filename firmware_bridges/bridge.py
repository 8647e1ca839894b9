"""An attached device speaking the MQTT contract (DESIGN 2.1), whatever carries the messages.

A `CardRead` becomes an `rfid/{reader}/scan`; the answer on `rfid/{reader}/response` becomes the reader's
granted/denied `Feedback`. A `ButtonPress` becomes a `court/{court}/button/pressed`; its ack on
`court/{court}/button/ack` becomes a flash. `Heartbeat` and `Fault` become the device's status topic, so the
device registry shows an unplugged reader as offline with its reason. Every read is acknowledged locally at once
(a chirp and a flash) before the decision arrives: the person knows the card was seen.

The `Link` is either the agent's own dispatcher (in-process: `agent.lan.dispatcher.Dispatcher.local_link`) or an
MQTT client on the agent's broker (`python -m firmware_bridges`): the messages and the decision path are the same.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from .device import Adapter, ButtonPress, CardRead, Color, DeviceEvent, Fault, Feedback, Heartbeat

Listener = Callable[[bytes], None]
MAX_PENDING = 64


class Link(Protocol):
    """Publishes contract messages and hands back the ones addressed to this device."""

    async def publish(self, topic: str, payload: bytes) -> None: ...

    def listen(self, topic: str, listener: Listener) -> None: ...


@dataclass(frozen=True, slots=True)
class Role:
    """What the device is on the contract: a reader (`device_id` is its reader id; the agent knows where it
    stands) or a court's button box."""

    kind: Literal["reader", "button"]
    device_id: str
    court: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "button" and not self.court:
            raise ValueError(f"button box '{self.device_id}' needs its court")


class Bridge:
    def __init__(self, adapter: Adapter, role: Role, link: Link, *, on_event: Callable[[DeviceEvent], None] = print):
        self.adapter, self.role, self.link = adapter, role, link
        self._on_event = on_event
        # msg ids unique across restarts of this process (the agent de-duplicates on them)
        self._ids = itertools.count(1)
        self._prefix = f"{role.device_id}-{os.getpid():x}{int(time.time()) & 0xFFFFFF:06x}"
        self._pending: OrderedDict[str, None] = OrderedDict()  # msg ids awaiting their answer, newest last
        self._tasks: set[asyncio.Task[None]] = set()
        self._status_topic = f"{'rfid' if role.kind == 'reader' else 'button'}/{role.device_id}/status"
        if role.kind == "reader":
            link.listen(f"rfid/{role.device_id}/response", self._response)
        else:
            link.listen(f"court/{role.court}/button/ack", self._ack)

    def _msg_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _expect(self, msg_id: str) -> None:
        self._pending[msg_id] = None
        while len(self._pending) > MAX_PENDING:  # answers that never came: forget the oldest
            self._pending.popitem(last=False)

    async def handle(self, event: DeviceEvent) -> None:
        self._on_event(event)
        match event:
            case CardRead(card_id=card_id) if self.role.kind == "reader":
                await self.adapter.send(Feedback.acknowledge())
                msg_id = self._msg_id()
                self._expect(msg_id)
                body = {"card_id": card_id, "msg_id": msg_id}
                await self.link.publish(f"rfid/{self.role.device_id}/scan", json.dumps(body).encode())
            case ButtonPress(long=long) if self.role.kind == "button":
                await self.adapter.send(Feedback.acknowledge())
                msg_id = self._msg_id()
                self._expect(msg_id)
                body = {"button_id": self.role.device_id, "msg_id": msg_id, "kind": "long" if long else "short"}
                await self.link.publish(f"court/{self.role.court}/button/pressed", json.dumps(body).encode())
            case Heartbeat():
                await self.link.publish(self._status_topic, json.dumps({"state": "online"}).encode())
            case Fault(reason=reason) if reason.startswith(("cannot open", "serial link lost", "offline")):
                body = {"state": "offline", "reason": reason[:200]}
                await self.link.publish(self._status_topic, json.dumps(body).encode())
            case _:
                pass  # a bad frame: the host logs it; the device stays as it was

    def _answer(self, payload: bytes) -> dict[str, object] | None:
        try:
            doc = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(doc, dict) or doc.get("msg_id") not in self._pending:
            return None  # someone else's answer (a shared court topic) or a repeat
        del self._pending[str(doc["msg_id"])]
        return doc

    def _response(self, payload: bytes) -> None:
        doc = self._answer(payload)
        if doc is not None:
            feedback = Feedback.decision(doc.get("status") == "granted", str(doc.get("message") or ""))
            self._spawn(feedback)

    def _ack(self, payload: bytes) -> None:
        doc = self._answer(payload)
        if doc is None:
            return
        match doc.get("status"):
            case "ok":
                self._spawn(Feedback(Color.GREEN, beeps=1))
            case "no_session":  # the moment is marked, but nobody is playing on the court to own it
                self._spawn(Feedback(Color.AMBER, beeps=1))
            case _:
                self._spawn(Feedback(Color.RED, long_beep=True))

    def _spawn(self, feedback: Feedback) -> None:
        task = asyncio.get_running_loop().create_task(self.adapter.send(feedback))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        """Run the adapter, handling its events in order, until cancelled."""
        queue: asyncio.Queue[DeviceEvent] = asyncio.Queue(maxsize=256)

        def sink(event: DeviceEvent) -> None:
            if not queue.full():  # a flooding device loses its own excess, never the loop
                queue.put_nowait(event)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.adapter.run(sink))
            while True:
                await self.handle(await queue.get())

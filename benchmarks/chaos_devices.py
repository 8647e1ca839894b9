"""The chaos run's devices: MQTT devices that reconnect by themselves, and an RDM6300 reader on a pty that can be
unplugged and plugged in again.

`MqttLink` is one device's connection to the agent's broker, kept up for the whole run: the agent is killed and
restarted under it, so it reconnects with a short backoff and answers each request by its `msg_id` (a request
whose connection dropped gets no answer, and the caller repeats it with the same `msg_id`, as the crash rig's
devices do). `SerialLine` is a USB-serial RDM6300 reader: the agent's `[[readers]]` port is a stable symlink
(as udev's /dev/serial/by-id/ names are) to the slave side of a pty; unplugging closes the master and removes the
link, plugging opens a new pty behind the same name, and the agent's serial adapter has to find it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import tty
from pathlib import Path
from typing import Any

import aiomqtt

from agent.lan import topics
from firmware_bridges import rdm6300
from firmware_bridges.errors import FrameError
from firmware_bridges.feedback import decode_line

KEEPALIVE_S = 10
CONNECT_TIMEOUT_S = 10.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 2.0


class MqttLink:
    """One device's MQTT connection, reconnected until `stop` is set; requests wait for their reply by msg_id."""

    def __init__(self, host: str, port: int, device_id: str, password: str, reply_topic: str) -> None:
        self.host, self.port = host, port
        self.device_id, self.password, self.reply_topic = device_id, password, reply_topic
        self.up = asyncio.Event()
        self.connects = 0
        self.drops = 0
        self._client: aiomqtt.Client | None = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any] | None]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        delay = BACKOFF_MIN_S
        while not stop.is_set():
            try:
                async with aiomqtt.Client(
                    self.host,
                    self.port,
                    username=self.device_id,
                    password=self.password,
                    identifier=self.device_id,
                    keepalive=KEEPALIVE_S,
                    timeout=CONNECT_TIMEOUT_S,
                    socket_options=topics.NODELAY,
                ) as client:
                    await client.subscribe(self.reply_topic, qos=1)
                    self._client = client
                    self.connects += 1
                    self.up.set()
                    delay = BACKOFF_MIN_S
                    async for message in client.messages:
                        self._deliver(message.payload)
            except aiomqtt.MqttError:
                pass
            finally:
                if self._client is not None:
                    self.drops += 1
                self._client = None
                self.up.clear()
                for future in self._waiting.values():  # their answers cannot come on a new connection
                    if not future.done():
                        future.set_result(None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(BACKOFF_MAX_S, delay * 2)

    def _deliver(self, payload: Any) -> None:
        try:
            doc = json.loads(bytes(payload) if isinstance(payload, bytes | bytearray) else str(payload))
        except (ValueError, TypeError):
            return
        if isinstance(doc, dict):
            future = self._waiting.get(str(doc.get("msg_id")))
            if future is not None and not future.done():
                future.set_result(doc)

    async def request(self, topic: str, body: dict[str, Any], within: float) -> dict[str, Any] | None:
        """Publish and wait for the reply with the same msg_id; None when none came within `within` seconds
        (or the connection went while waiting)."""
        client = self._client
        if client is None:
            return None
        msg_id = str(body["msg_id"])
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = future
        try:
            async with asyncio.timeout(within):
                await client.publish(topic, json.dumps(body), qos=1)
                return await future
        except (TimeoutError, aiomqtt.MqttError):
            return None
        finally:
            if self._waiting.get(msg_id) is future:
                del self._waiting[msg_id]


class SerialLine:
    """An RDM6300 reader behind a stable device name; `tap()` presents a card and reads the feedback lines."""

    def __init__(self, link: Path) -> None:
        self.link = link  # what the agent's config names as the port
        self.master: int | None = None
        self.plugged = asyncio.Event()
        self.plugs = 0
        self._buf = b""
        self._lines: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    def plug(self) -> str:
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        name = os.ttyname(slave)
        os.close(slave)  # the agent opens its own
        os.set_blocking(master, False)
        tmp = self.link.with_name(self.link.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(name)
        tmp.replace(self.link)  # atomic: the name is never half there
        self.master, self._buf = master, b""
        self._drain()
        asyncio.get_running_loop().add_reader(master, self._readable)
        self.plugs += 1
        self.plugged.set()
        return name

    def unplug(self) -> None:
        self.plugged.clear()
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        if self.master is not None:
            asyncio.get_running_loop().remove_reader(self.master)
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = None

    def _readable(self) -> None:
        if self.master is None:
            return
        now = time.monotonic()
        try:
            self._buf += os.read(self.master, 4096)
        except BlockingIOError:
            return
        except OSError:  # EIO: nobody holds the slave side just now (the agent is reopening it)
            return
        while b"\n" in self._buf:
            line, _, self._buf = self._buf.partition(b"\n")
            self._lines.put_nowait((now, line + b"\n"))

    def _drain(self) -> list[bytes]:
        out = []
        while not self._lines.empty():
            out.append(self._lines.get_nowait()[1])
        return out

    async def next_line(self, within: float) -> bytes | None:
        try:
            async with asyncio.timeout(within):
                return (await self._lines.get())[1]
        except TimeoutError:
            return None

    def present(self, card: str) -> None:
        """The card held to the reader: one whole frame on the wire (the reader repeats it while the card stays;
        once is enough for the agent, which keeps one read per presentation)."""
        if self.master is None:
            raise OSError("reader unplugged")
        os.write(self.master, rdm6300.encode(bytes.fromhex(card)))

    def stale(self) -> list[bytes]:
        """Lines that came while nobody was waiting (a late answer): taken out before the next card."""
        return self._drain()

    async def tap(self, card: str, within: float) -> tuple[bool, str | None, str]:
        """(heard: the ACK chirp came, decision: GRANTED/DENIED or None, the display text)."""
        self.present(card)
        ack = await self.next_line(within)
        if ack is None:
            return False, None, ""
        return True, *(await self.decision(within))

    async def decision(self, within: float) -> tuple[str | None, str]:
        """The next decision line (ACK lines skipped), or (None, '') when none came within `within` seconds."""
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            line = await self.next_line(left)
            if line is None:
                break
            try:
                feedback = decode_line(line)
            except FrameError:
                continue
            if feedback.granted is not None:
                return ("GRANTED" if feedback.granted else "DENIED"), feedback.text
        return None, ""

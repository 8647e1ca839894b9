"""A minimal raw MQTT 3.1.1 client over asyncio streams, for what paho and aiomqtt will not do on purpose.

It never sends a PINGREQ or a PUBACK by itself, reports the DUP/RETAIN/QoS flags and packet id of every PUBLISH
it receives, and can write arbitrary bytes (an oversized packet, a header that lies about its remaining length).

    async with WireClient.connect(host, port, client_id="t1", username="t1", password=pw, clean_session=False) as c:
        assert c.connack.return_code == 0
        assert await c.subscribe([("court/c1/state", 1)]) == [1]
        message = await c.next_publish(within=2)
        await c.puback(message.packet_id)

Only MQTT 3.1.1 (protocol level 4) and only what the broker tests need: no QoS 2 flow, no UNSUBSCRIBE.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Self

MAX_REMAINING_LENGTH = 268_435_455  # the largest value the 4-byte variable length encoding can carry


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class ConnackCode(IntEnum):
    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


SUBACK_FAILURE = 0x80


class ProtocolError(Exception):
    """The peer sent something this client cannot parse, or not the packet the exchange requires."""


class ConnectionClosed(ConnectionError):
    """The peer closed (or reset) the network connection."""


# --- packets -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool
    return_code: int


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None  # present when qos > 0


@dataclass(frozen=True, slots=True)
class Puback:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Suback:
    packet_id: int
    return_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Pingresp:
    pass


@dataclass(frozen=True, slots=True)
class OtherPacket:
    """Any packet type the tests do not need decoded (PUBREC, UNSUBACK, ...)."""

    packet_type: int
    flags: int
    body: bytes


Packet = Connack | Publish | Puback | Suback | Pingresp | OtherPacket


# --- encoding ------------------------------------------------------------------------------------------------


def encode_remaining_length(length: int) -> bytes:
    """MQTT 3.1.1 section 2.2.3 variable length encoding (1 to 4 bytes)."""
    if not 0 <= length <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {length} is outside 0..{MAX_REMAINING_LENGTH}")
    out = bytearray()
    while True:
        length, digit = divmod(length, 128)
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _packet(packet_type: PacketType, flags: int, body: bytes) -> bytes:
    return bytes([packet_type << 4 | flags]) + encode_remaining_length(len(body)) + body


def encode_connect(
    client_id: str,
    *,
    clean_session: bool = True,
    keepalive: int = 60,
    username: str | None = None,
    password: str | bytes | None = None,
    will: Will | None = None,
) -> bytes:
    flags = 0x02 if clean_session else 0
    payload = _string(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _string(will.topic) + _string(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
    if password is not None:
        flags |= 0x40
        payload += _string(password)
    variable_header = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    return _packet(PacketType.CONNECT, 0, variable_header + payload)


def encode_publish(
    topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, dup: bool = False, packet_id: int | None = None
) -> bytes:
    if (qos > 0) != (packet_id is not None):
        raise ValueError("a packet id is required exactly when qos > 0")
    flags = (0x08 if dup else 0) | qos << 1 | (0x01 if retain else 0)
    body = _string(topic) + (struct.pack("!H", packet_id) if packet_id is not None else b"") + payload
    return _packet(PacketType.PUBLISH, flags, body)


def encode_puback(packet_id: int) -> bytes:
    return _packet(PacketType.PUBACK, 0, struct.pack("!H", packet_id))


def encode_subscribe(packet_id: int, filters: Iterable[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_string(f) + bytes([qos]) for f, qos in filters)
    return _packet(PacketType.SUBSCRIBE, 0x02, body)  # MQTT-3.8.1-1: reserved flags are 0010


PINGREQ = _packet(PacketType.PINGREQ, 0, b"")
DISCONNECT = _packet(PacketType.DISCONNECT, 0, b"")


# --- decoding ------------------------------------------------------------------------------------------------


def decode_packet(first_byte: int, body: bytes) -> Packet:
    packet_type, flags = first_byte >> 4, first_byte & 0x0F
    if packet_type == PacketType.CONNACK and len(body) == 2:
        return Connack(session_present=bool(body[0] & 0x01), return_code=body[1])
    if packet_type == PacketType.PUBLISH:
        qos = (flags >> 1) & 0x03
        (topic_length,) = struct.unpack_from("!H", body)
        topic = body[2 : 2 + topic_length].decode()
        offset = 2 + topic_length
        packet_id = None
        if qos:
            (packet_id,) = struct.unpack_from("!H", body, offset)
            offset += 2
        return Publish(topic, body[offset:], qos, bool(flags & 0x01), bool(flags & 0x08), packet_id)
    if packet_type == PacketType.PUBACK and len(body) == 2:
        return Puback(struct.unpack("!H", body)[0])
    if packet_type == PacketType.SUBACK and len(body) >= 2:
        return Suback(struct.unpack_from("!H", body)[0], tuple(body[2:]))
    if packet_type == PacketType.PINGRESP:
        return Pingresp()
    return OtherPacket(packet_type, flags, body)


async def read_packet(reader: asyncio.StreamReader) -> Packet:
    """One packet from the stream; ConnectionClosed at EOF or reset."""
    try:
        first = (await reader.readexactly(1))[0]
        length, multiplier = 0, 1
        for _ in range(4):
            digit = (await reader.readexactly(1))[0]
            length += (digit & 0x7F) * multiplier
            multiplier *= 128
            if not digit & 0x80:
                break
        else:
            raise ProtocolError("malformed remaining length")
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ConnectionClosed("connection closed by peer") from exc
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as exc:
        raise ConnectionClosed(str(exc)) from exc
    return decode_packet(first, body)


# --- the client ----------------------------------------------------------------------------------------------


class WireClient:
    """One MQTT connection; packets that arrive while an exchange waits for its reply are kept for next_packet."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.connack = Connack(False, -1)
        self._pending: deque[Packet] = deque()
        self._next_id = 0
        self._eof = False

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        client_id: str,
        username: str | None = None,
        password: str | bytes | None = None,
        clean_session: bool = True,
        keepalive: int = 60,
        will: Will | None = None,
        ssl_context: ssl.SSLContext | None = None,
        within: float = 5.0,
    ) -> Self:
        """Connect and wait for the CONNACK; a refused CONNACK is returned in `.connack`, not raised."""
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
        client = cls(reader, writer)
        try:
            connect = encode_connect(
                client_id,
                clean_session=clean_session,
                keepalive=keepalive,
                username=username,
                password=password,
                will=will,
            )
            await client.send(connect)
            packet = await client._read(within)
            if not isinstance(packet, Connack):
                raise ProtocolError(f"expected CONNACK, got {packet}")
            client.connack = packet
        except BaseException:
            client.abort()
            raise
        return client

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, host: str, port: int, **options: Any) -> AsyncIterator[Self]:
        """`open` (same options) as a context manager: a graceful DISCONNECT at exit unless the connection is
        already gone."""
        client = await cls.open(host, port, **options)
        try:
            yield client
        finally:
            await client.disconnect()

    # -- sending

    async def send(self, data: bytes) -> None:
        """Write raw bytes: any packet, well formed or not."""
        self.writer.write(data)
        await self.writer.drain()

    def packet_id(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, within: float = 5.0
    ) -> int | None:
        """Publish; at QoS 1 wait for the matching PUBACK. Returns the packet id (None at QoS 0)."""
        packet_id = self.packet_id() if qos else None
        await self.send(encode_publish(topic, payload, qos=qos, retain=retain, packet_id=packet_id))
        if qos == 1:
            await self._expect(lambda p: isinstance(p, Puback) and p.packet_id == packet_id, within)
        return packet_id

    async def subscribe(self, filters: Iterable[tuple[str, int]], *, within: float = 5.0) -> list[int]:
        """One SUBSCRIBE with every (filter, qos); the SUBACK's return codes (granted QoS or 0x80)."""
        packet_id = self.packet_id()
        await self.send(encode_subscribe(packet_id, filters))
        suback = await self._expect(lambda p: isinstance(p, Suback) and p.packet_id == packet_id, within)
        assert isinstance(suback, Suback)
        return list(suback.return_codes)

    async def puback(self, packet_id: int | None) -> None:
        assert packet_id is not None, "PUBACK needs the packet id of a QoS 1 PUBLISH"
        await self.send(encode_puback(packet_id))

    async def ping(self, within: float = 5.0) -> None:
        """PINGREQ and wait for the PINGRESP."""
        await self.send(PINGREQ)
        await self._expect(lambda p: isinstance(p, Pingresp), within)

    # -- receiving

    async def next_packet(self, within: float = 5.0) -> Packet:
        """The next packet received; TimeoutError if none arrives in time, ConnectionClosed at EOF."""
        if self._pending:
            return self._pending.popleft()
        return await self._read(within)

    async def next_publish(self, within: float = 5.0) -> Publish:
        packet = await self.next_packet(within)
        if not isinstance(packet, Publish):
            raise ProtocolError(f"expected PUBLISH, got {packet}")
        return packet

    async def drain(self, quiet: float = 0.5) -> list[Packet]:
        """Every packet received until none has arrived for `quiet` seconds (or the connection closed)."""
        packets: list[Packet] = []
        while True:
            try:
                packets.append(await self.next_packet(quiet))
            except (TimeoutError, ConnectionClosed):
                return packets

    async def closed(self, within: float = 5.0) -> bool:
        """Whether the peer closes the connection in the next `within` s; packets read meanwhile are kept."""
        try:
            async with asyncio.timeout(within):
                while not self._eof:
                    self._pending.append(await read_packet(self.reader))
        except ConnectionClosed:
            self._eof = True
        except TimeoutError:
            return False
        return True

    async def _read(self, within: float) -> Packet:
        if self._eof:
            raise ConnectionClosed("connection already closed by peer")
        try:
            async with asyncio.timeout(within):
                return await read_packet(self.reader)
        except ConnectionClosed:
            self._eof = True
            raise

    async def _expect(self, wanted: Callable[[Packet], bool], within: float) -> Packet:
        """Read until a packet satisfies `wanted`; others are kept, in order, for next_packet."""
        async with asyncio.timeout(within):
            while True:
                packet = await self._read(within)
                if wanted(packet):
                    return packet
                self._pending.append(packet)

    # -- closing

    def abort(self) -> None:
        """Drop the TCP connection without a DISCONNECT (the broker must treat it as a network failure)."""
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()

    async def disconnect(self, linger: float = 1.0) -> None:
        """A graceful DISCONNECT and close; harmless when the connection is already gone.

        After the DISCONNECT the client half-closes and waits (up to `linger` s) for the broker to close its side,
        so the broker has handled the DISCONNECT (and ended the session's connection) when this returns.
        """
        if not self.writer.is_closing() and not self._eof:
            with contextlib.suppress(ConnectionError):
                await self.send(DISCONNECT)
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                await self.closed(linger)
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()

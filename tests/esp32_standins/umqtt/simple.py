"""Stand-in for micropython-lib's `umqtt.simple`, speaking MQTT 3.1.1 over a real TCP socket.

It keeps umqtt.simple's interface and its behaviour where the firmware depends on it: `connect` returns the
session-present flag and raises MQTTException(code) on a refusal; a QoS 1 `publish` and `subscribe` block
until their acknowledgement, handing any message that arrives meanwhile to the callback; `wait_msg` returns
None for a PINGRESP, the packet type for other non-PUBLISH packets, and raises OSError(-1) when the broker
closes; `check_msg` returns None at once when nothing has arrived. A stream cut in the middle of a reply fails
the way umqtt.simple does (IndexError, AssertionError), which the firmware must survive.

One deliberate difference: blocking reads give up after READ_TIMEOUT_S (umqtt.simple would wait forever), so
a firmware bug that waits for a packet that never comes fails a test instead of hanging it.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

READ_TIMEOUT_S = 5.0


class MQTTException(Exception):
    pass


class MQTTClient:
    def __init__(
        self,
        client_id: str,
        server: str,
        port: int = 0,
        user: str | None = None,
        password: str | None = None,
        keepalive: int = 0,
        ssl: object | None = None,
    ):
        if port == 0:
            port = 8883 if ssl else 1883
        self.client_id = client_id
        self.sock: socket.socket | None = None
        self.server = server
        self.port = port
        self.pid = 0
        self.cb: Callable[[bytes, bytes], object] | None = None
        self.user = user
        self.pswd = password
        self.keepalive = keepalive
        self.lw_topic: str | None = None
        self.lw_msg: bytes = b""
        self.lw_qos = 0
        self.lw_retain = False

    # -- the socket, as MicroPython's stream methods ------------------------------------------------------------

    def _sock(self) -> socket.socket:
        if self.sock is None:
            raise OSError(9, "not connected")  # EBADF, as a closed MicroPython socket says
        return self.sock

    def _write(self, data: bytes | bytearray) -> None:
        self._sock().sendall(bytes(data))

    def _read(self, n: int) -> bytes:
        """Up to n bytes: fewer only at end of stream (MicroPython's blocking stream read)."""
        out = b""
        while len(out) < n:
            chunk = self._sock().recv(n - len(out))
            if not chunk:
                break
            out += chunk
        return out

    def _send_str(self, s: str | bytes) -> None:
        data = s.encode() if isinstance(s, str) else bytes(s)
        self._write(struct.pack("!H", len(data)) + data)

    def _recv_len(self) -> int:
        n = 0
        sh = 0
        while True:
            b = self._read(1)[0]
            n |= (b & 0x7F) << sh
            if not b & 0x80:
                return n
            sh += 7

    # -- umqtt.simple's interface -------------------------------------------------------------------------------

    def set_callback(self, f: Callable[[bytes, bytes], object]) -> None:
        self.cb = f

    def set_last_will(self, topic: str, msg: bytes | str, retain: bool = False, qos: int = 0) -> None:
        assert 0 <= qos <= 2
        assert topic
        self.lw_topic = topic
        self.lw_msg = msg.encode() if isinstance(msg, str) else msg
        self.lw_qos = qos
        self.lw_retain = retain

    def connect(self, clean_session: bool = True, timeout: float | None = None) -> int:
        sock = socket.create_connection((self.server, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(READ_TIMEOUT_S)
        self.sock = sock
        flags = int(clean_session) << 1
        body = b""
        if self.lw_topic:
            flags |= 0x4 | (self.lw_qos << 3) | (int(self.lw_retain) << 5)
        if self.user:
            flags |= 0xC0
        variable = b"\x00\x04MQTT\x04" + bytes((flags,)) + struct.pack("!H", self.keepalive)
        body += _string(self.client_id)
        if self.lw_topic:
            body += _string(self.lw_topic) + _string(self.lw_msg)
        if self.user:
            body += _string(self.user) + _string(self.pswd or "")
        self._write(b"\x10" + _length(len(variable) + len(body)) + variable + body)
        resp = self._read(4)
        assert resp[0] == 0x20
        assert resp[1] == 0x02
        if resp[3] != 0:
            raise MQTTException(resp[3])
        return resp[2] & 1

    def disconnect(self) -> None:
        self._write(b"\xe0\x00")
        self._sock().close()

    def ping(self) -> None:
        self._write(b"\xc0\x00")

    def publish(self, topic: str, msg: bytes | str, retain: bool = False, qos: int = 0) -> None:
        payload = msg.encode() if isinstance(msg, str) else bytes(msg)
        variable = _string(topic)
        pid = 0
        if qos > 0:
            self.pid += 1
            pid = self.pid
            variable += struct.pack("!H", pid)
        header = 0x30 | qos << 1 | int(retain)
        self._write(bytes((header,)) + _length(len(variable) + len(payload)) + variable + payload)
        if qos == 1:
            while True:
                op = self.wait_msg()
                if op == 0x40:
                    sz = self._read(1)
                    assert sz == b"\x02"
                    rcv = self._read(2)
                    if pid == rcv[0] << 8 | rcv[1]:
                        return
        elif qos == 2:
            raise AssertionError("QoS 2 is not supported by umqtt.simple")

    def subscribe(self, topic: str, qos: int = 0) -> None:
        assert self.cb is not None, "Subscribe callback is not set"
        self.pid += 1
        pid = self.pid
        body = struct.pack("!H", pid) + _string(topic) + bytes((qos,))
        self._write(b"\x82" + _length(len(body)) + body)
        while True:
            op = self.wait_msg()
            if op == 0x90:
                resp = self._read(4)
                assert resp[1:3] == struct.pack("!H", pid)
                if resp[3] == 0x80:
                    raise MQTTException(resp[3])
                return

    def wait_msg(self) -> int | None:
        sock = self._sock()
        try:
            res: bytes | None = self._read(1)
        except BlockingIOError:
            res = None
        sock.settimeout(READ_TIMEOUT_S)
        if res is None:
            return None
        if res == b"":
            raise OSError(-1)
        if res == b"\xd0":  # PINGRESP
            sz = self._read(1)[0]
            assert sz == 0
            return None
        op = res[0]
        if op & 0xF0 != 0x30:
            return op
        sz = self._recv_len()
        topic_len_bytes = self._read(2)
        topic_len = (topic_len_bytes[0] << 8) | topic_len_bytes[1]
        topic = self._read(topic_len)
        sz -= topic_len + 2
        pid = 0
        if op & 6:
            pid_bytes = self._read(2)
            pid = pid_bytes[0] << 8 | pid_bytes[1]
            sz -= 2
        msg = self._read(sz)
        assert self.cb is not None
        self.cb(topic, msg)
        if op & 6 == 2:
            self._write(b"\x40\x02" + struct.pack("!H", pid))
        elif op & 6 == 4:
            raise AssertionError("QoS 2 is not supported by umqtt.simple")
        return op

    def check_msg(self) -> int | None:
        self._sock().setblocking(False)
        return self.wait_msg()


def _string(s: str | bytes) -> bytes:
    data = s.encode() if isinstance(s, str) else bytes(s)
    return struct.pack("!H", len(data)) + data


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)

"""Wi-Fi and MQTT connections that come back by themselves, over small injected interfaces.

`Wifi` drives an object with network.WLAN's methods (active, connect, disconnect, isconnected, status);
`MqttLink` drives clients made by a factory with umqtt.simple.MQTTClient's methods. Neither imports anything
of MicroPython's, so the reconnect logic runs unchanged on a host against a stand-in or a real broker.

Nothing here blocks for long: a Wi-Fi join runs in the radio's own task and is only polled; an MQTT connect
blocks for at most the socket's timeout (current umqtt.simple takes one; with an older one the loop's watchdog
is the bound).
"""

from ticks import ticks_add, ticks_diff

# Refusals of the broker that a retry cannot fix soon (4: bad user name or password, 5: not authorized).
# Retrying them fast would only load the agent's password check; an installer fixing the config reboots anyway.
AUTH_REFUSED = (4, 5)
AUTH_BACKOFF_MS = 60000
INBOX_LIMIT = 16
READS_PER_SERVICE = 8
UNANSWERED_LIMIT = 3


def _no_log(event, detail=""):
    return None


class Backoff:
    """Doubling delays with jitter, so a room of devices that lost the same access point does not come back
    in one burst."""

    def __init__(self, first_ms, max_ms, random_bytes):
        self.first_ms = first_ms
        self.max_ms = max_ms
        self._random_bytes = random_bytes
        self._next = first_ms

    def reset(self):
        self._next = self.first_ms

    def delay(self):
        base = self._next
        self._next = min(self.max_ms, self._next * 2)
        return base // 2 + (base // 2) * self._random_bytes(1)[0] // 255


class Wifi:
    # How long one join may take before it is abandoned and started again (DHCP on a busy club network is slow).
    ATTEMPT_MS = 15000

    def __init__(self, wlan, ssid, password, backoff, log=_no_log):
        self._wlan = wlan
        self._ssid = ssid
        self._password = password
        self._backoff = backoff
        self._log = log
        self._attempt_until = None
        self._retry_at = None
        self.up = False
        self.joins = 0

    def service(self, now):
        """True while joined. Starts, times out and retries joins; never waits for one."""
        if self._wlan.isconnected():
            if not self.up:
                self.up = True
                self.joins += 1
                self._attempt_until = None
                self._backoff.reset()
                self._log("wifi_up", self._ssid)
            return True
        if self.up:
            self.up = False
            self._log("wifi_down", str(self._wlan.status()))
        if self._attempt_until is not None and ticks_diff(now, self._attempt_until) < 0:
            return False  # a join is under way
        if self._attempt_until is not None:
            self._attempt_until = None
            self._retry_at = ticks_add(now, self._backoff.delay())
            self._log("wifi_join_failed", str(self._wlan.status()))
            try:
                self._wlan.disconnect()  # some ports refuse a new connect while the old one is still trying
            except OSError as exc:
                self._log("wifi_disconnect_failed", repr(exc))
        if self._retry_at is not None and ticks_diff(now, self._retry_at) < 0:
            return False
        self._retry_at = None
        try:
            self._wlan.connect(self._ssid, self._password)
        except OSError as exc:
            self._log("wifi_connect_failed", repr(exc))
        self._attempt_until = ticks_add(now, self.ATTEMPT_MS)
        return False


class MqttLink:
    """One MQTT session to the agent's broker: connect with credentials, will and birth, subscribe, keep alive,
    read without blocking, and reconnect with backoff after any failure.

    Messages are published at QoS 0 on purpose. Every request of the contract is answered by the agent with the
    same msg_id, and the device resends until it hears that answer, so delivery is already end to end; a QoS 1
    publish in umqtt.simple would block the loop until its PUBACK, possibly forever on a half-dead connection.
    """

    def __init__(
        self,
        make_client,
        client_id,
        user,
        password,
        keepalive_s,
        subscriptions,
        status_topic,
        birth,
        will,
        backoff,
        connect_timeout_s=3,
        log=_no_log,
    ):
        self._make_client = make_client
        self._client_id = client_id
        self._user = user
        self._password = password
        self.keepalive_ms = keepalive_s * 1000
        self._subscriptions = subscriptions
        self._status_topic = status_topic
        self._birth = birth
        self._will = will
        self._backoff = backoff
        self._connect_timeout_s = connect_timeout_s
        self._log = log
        self._client = None
        self._retry_at = None
        self._last_out = 0
        self._unanswered = 0
        self.inbox = []
        self.connects = 0
        self.failures = 0
        self.last_error = None

    @property
    def up(self):
        return self._client is not None

    def service(self, now, network_up):
        """Connect when due, keep the session alive, and move arrived messages to `inbox`."""
        if not network_up:
            if self._client is not None:
                self.drop("network down", now)
            return
        if self._client is None:
            if self._retry_at is None or ticks_diff(now, self._retry_at) >= 0:
                self._connect(now)
            return
        if ticks_diff(now, self._last_out) >= self.keepalive_ms // 2:
            try:
                self._client.ping()
            except Exception as exc:  # umqtt raises OSError, and IndexError or AssertionError on a cut stream
                self.drop("ping: " + repr(exc), now)
                return
            self._last_out = now
        for _ in range(READS_PER_SERVICE):
            try:
                if self._client.check_msg() is None:
                    break
            except Exception as exc:
                self.drop("read: " + repr(exc), now)
                return

    def publish(self, topic, payload, now, retain=False):
        """True if handed to the network; False (and the link goes down) otherwise."""
        if self._client is None:
            return False
        try:
            self._client.publish(topic, payload, retain, 0)
        except Exception as exc:
            self.drop("publish: " + repr(exc), now)
            return False
        self._last_out = now
        return True

    def take(self):
        messages, self.inbox = self.inbox, []
        return messages

    def answered(self):
        self._unanswered = 0

    def unanswered(self, now):
        """A request went unanswered. A few in a row mean the session is dead without the socket knowing (a
        broker host that lost power sends no reset): reconnect rather than wait for TCP to give up."""
        self._unanswered += 1
        if self._unanswered >= UNANSWERED_LIMIT and self._client is not None:
            self.drop("no answers", now)

    def drop(self, why, now, retry_ms=None):
        client, self._client = self._client, None
        self._unanswered = 0
        self.failures += 1
        self.last_error = why
        if retry_ms is None:
            retry_ms = self._backoff.delay()
        self._retry_at = ticks_add(now, retry_ms)
        self._log("mqtt_down", why)
        if client is not None:
            _close(client)  # not disconnect(): a clean DISCONNECT would cancel the will the agent should see

    def _on_message(self, topic, payload):
        if len(self.inbox) >= INBOX_LIMIT:
            self.inbox.pop(0)
        self.inbox.append((bytes(topic).decode(), bytes(payload)))

    def _connect(self, now):
        client = self._make_client(
            self._client_id, user=self._user, password=self._password, keepalive=self.keepalive_ms // 1000
        )
        client.set_callback(self._on_message)
        client.set_last_will(self._status_topic, self._will, True, 1)
        try:
            try:
                client.connect(True, self._connect_timeout_s)
            except TypeError:
                client.connect(True)  # an older umqtt.simple: connect takes no timeout
            for topic in self._subscriptions:
                client.subscribe(topic, 0)  # QoS 0 both ways: see the class docstring
            # Retained, so an agent that restarts sees at once which devices are up; the will replaces it.
            client.publish(self._status_topic, self._birth, True, 0)
        except Exception as exc:
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
            refused = type(exc).__name__ == "MQTTException" and code in AUTH_REFUSED
            self._client = client
            self.drop("connect: " + repr(exc), now, AUTH_BACKOFF_MS if refused else None)
            return
        self._client = client
        self._last_out = now
        self._unanswered = 0
        self.connects += 1
        self._backoff.reset()
        self._log("mqtt_up", str(self.connects))


def _close(client):
    sock = getattr(client, "sock", None)
    if sock is None:
        return
    try:
        sock.close()
    except OSError:
        return

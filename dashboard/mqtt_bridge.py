"""The dashboard's single MQTT connection (dashboard certificate, MQTT v5, a persistent session), shared by
every feature.

Features register handlers for topic filters; subscriptions are (re)made in on_connect so a reconnect
restores them. Handlers run on paho's network thread: they must be quick (hand heavy work to a pool) and
exceptions are caught and logged so they never stop the network loop.

Only one connection per certificate can exist (the broker forces client id = CN), so everything that
speaks MQTT as `dashboard` goes through this object.

Under a telemetry flood this connection is the dashboard's ingest path, so its per-message cost matters
(docs/benchmarks.md): paho reads the socket in large chunks here (ChunkedReadClient), and the dispatch
reads an immutable snapshot of the subscriptions instead of copying a list under a lock per message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from lab.mqtt import Identity, make_client
from lab.rotation import Pair, PairWatcher
from pki.config import Settings

log = logging.getLogger(__name__)

Handler = Callable[[mqtt.MQTTMessage], None]


@dataclass
class Subscription:
    topic_filter: str  # may be a shared subscription: $share/<group>/<filter>
    qos: int
    handler: Handler
    # MQTT v5 subscription identifier: Mosquitto 2.0 delivers one copy of a message per matching
    # subscription (e.g. `ssl/#` and `ssl/sign`), tagged with its identifier; each copy goes to its own handler
    # only, so overlapping filters never run a handler twice (a CA request signed twice).
    identifier: int = 0
    # Deliver messages with the retain flag as published (MQTT v5), so a handler can tell a retained publish
    # from a live one even while subscribed (the CA ignores retained requests).
    retain_as_published: bool = False

    def subscribe_on(self, client: mqtt.Client) -> None:
        options = SubscribeOptions(qos=self.qos, retainAsPublished=self.retain_as_published)
        client.subscribe(self.topic_filter, options=options, properties=self.properties)

    @property
    def properties(self) -> Properties:
        properties = Properties(PacketTypes.SUBSCRIBE)
        properties.SubscriptionIdentifier = self.identifier
        return properties

    @property
    def match_filter(self) -> str:
        if self.topic_filter.startswith("$share/"):
            return self.topic_filter.split("/", 2)[2]
        return self.topic_filter


SUBSCRIPTION_IDENTIFIER = 11  # MQTT v5 property id
# The dashboard's session outlives its connection by this long (MQTT v5 Session Expiry Interval, seconds): while
# it is away (a broker restart, its own restart) the broker keeps its subscriptions and queues what matches them
# (QoS 0 too: `queue_qos0_messages` in mosquitto.conf), so readings that devices flush before the dashboard is
# back are delivered when it is. Persisted by the broker (autosave_interval), so a kill -9 of the broker keeps it.
SESSION_EXPIRY = 3600
PUBLISH_QOS0 = 0x30  # first byte of a PUBLISH with QoS 0, once the DUP and RETAIN bits are masked out (0xF6)


class PublishProperties(Properties):
    """paho's Properties of a received PUBLISH, without the lookup tables paho rebuilds for every instance.

    paho builds three tables (27 property names) in every Properties() (~10 µs) and walks them again to decode
    each property; at 10,000 messages/s that alone is a tenth of a core. The tables are only read, so here they
    are built once and shared; every Properties method (getattr, json(), str()) works as before.
    """

    _tables = Properties(PacketTypes.PUBLISH)
    types, names, properties = _tables.types, _tables.names, _tables.properties

    def __init__(self, subscription_identifiers: list[int]) -> None:
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        if subscription_identifiers:
            object.__setattr__(self, "SubscriptionIdentifier", subscription_identifiers)


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, position after it) of an MQTT variable byte integer, or None when truncated or too long."""
    value = shift = 0
    for index in range(pos, min(pos + 4, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    return None


def decode_plain_publish(packet: bytes) -> tuple[bytes, list[int], bytes] | None:
    """(topic, subscription identifiers, payload) of the body of a QoS 0 MQTT v5 PUBLISH whose only properties
    are subscription identifiers (the telemetry the broker forwards); None for anything else, which paho's own
    decoder then handles (and rejects when malformed)."""
    if len(packet) < 3:
        return None
    end_of_topic = 2 + ((packet[0] << 8) | packet[1])
    if end_of_topic == 2 or end_of_topic >= len(packet):  # an empty topic means a topic alias: paho's job
        return None
    decoded = _varint(packet, end_of_topic)
    if decoded is None:
        return None
    length, pos = decoded
    end = pos + length
    if end > len(packet):
        return None
    identifiers = []
    while pos < end:
        if packet[pos] != SUBSCRIPTION_IDENTIFIER:
            return None
        decoded = _varint(packet, pos + 1)
        if decoded is None or decoded[1] > end or decoded[0] == 0:
            return None
        identifiers.append(decoded[0])
        pos = decoded[1]
    return packet[2:end_of_topic], identifiers, packet[end:]


class ChunkedReadClient(mqtt.Client):
    """paho's Client with a cheaper receive path for a flood of small QoS 0 messages (py-spy: docs/benchmarks.md).

    - paho 2.2 reads every packet with one recv() for the type, one per length byte and one for the rest, and
      goes back to select() after each packet; over TLS each recv() is an SSL_read. Here `_sock_recv` serves
      those small reads from one READ_SIZE read, and `loop_read` goes on handling packets while that chunk
      holds any, so paho is back in select() only with an empty chunk: nothing buffered here ever waits for the
      socket to become readable again.
    - paho decodes an MQTT v5 PUBLISH in ~30 µs, mostly building Properties; a QoS 0 PUBLISH that carries only
      subscription identifiers is decoded here in ~2 µs into the same MQTTMessage (PublishProperties). When
      paho is between two packets, such PUBLISHes lying whole in the chunk are taken from it directly,
      without paho's per-packet read state machine (half of what was left of paho's time). QoS 1 and 2
      (acknowledgements, duplicates), every other packet and every other property stay with paho.
    - Every message goes straight to `on_message`: the bridge routes by subscription identifier itself, so
      paho's per-topic callbacks (`message_callback_add`) are not offered, and their topic-tree walk per
      message (~7% of the network thread) is skipped.
    """

    READ_SIZE = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chunk = b""
        self._chunk_pos = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._chunk_pos >= len(self._chunk):
            self._chunk = self._read_chunk()  # BlockingIOError when nothing is there
            self._chunk_pos = 0
            if not self._chunk:
                return b""  # the connection closed: paho handles an empty read
        start = self._chunk_pos
        self._chunk_pos = min(start + bufsize, len(self._chunk))
        return self._chunk[start:self._chunk_pos]

    def _read_chunk(self) -> bytes:
        """What the socket has now, up to READ_SIZE. One TLS read returns one TLS record, and Mosquitto sends each
        packet in a record of its own: so read until the socket has no more (or the chunk is full)."""
        parts: list[bytes] = []
        size = 0
        while size < self.READ_SIZE:
            try:
                data = super()._sock_recv(self.READ_SIZE - size)
            except BlockingIOError:
                if parts:
                    break
                raise
            if not data:  # closed: hand over what came before; the next read returns b"" again
                break
            parts.append(data)
            size += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while rc == mqtt.MQTT_ERR_SUCCESS and self._chunk_pos < len(self._chunk) and self._sock is not None:
            if self._in_packet["command"] == 0 and self._protocol == mqtt.MQTTv5:  # paho is between packets
                self._take_plain_publishes()
                if self._chunk_pos >= len(self._chunk):
                    break
            rc = super().loop_read(max_packets)
        return rc

    def _take_plain_publishes(self) -> None:
        """Deliver the QoS 0 PUBLISHes lying whole at the head of the chunk; stop at anything else (paho's)."""
        chunk, end, taken = self._chunk, len(self._chunk), False
        while self._chunk_pos < end and self._sock is not None:
            pos = self._chunk_pos
            command = chunk[pos]
            if command & 0xF6 != PUBLISH_QOS0:  # another packet type, or QoS 1/2
                break
            length = _varint(chunk, pos + 1)
            if length is None or length[1] + length[0] > end:  # split across reads (or malformed: paho says so)
                break
            body_end = length[1] + length[0]
            decoded = decode_plain_publish(chunk[length[1]:body_end])
            if decoded is None:
                break
            self._chunk_pos = body_end  # taken before the handler runs
            self._deliver_plain_publish(command, *decoded)
            taken = True
        if taken:
            with self._msgtime_mutex:  # what paho's keepalive check reads
                self._last_bytes_received = mqtt.time_func()

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self._chunk, self._chunk_pos = b"", 0  # bytes of the old connection never reach the new one
        return super().reconnect()

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        command = self._in_packet["command"]
        decoded = None
        if not command & 0x06 and self._protocol == mqtt.MQTTv5:  # QoS 0
            decoded = decode_plain_publish(bytes(self._in_packet["packet"]))
        if decoded is None:
            return super()._handle_publish()
        self._deliver_plain_publish(command, *decoded)
        return mqtt.MQTT_ERR_SUCCESS

    def _deliver_plain_publish(self, command: int, topic: bytes, identifiers: list[int], payload: bytes) -> None:
        message = mqtt.MQTTMessage(topic=topic)
        message.dup = bool(command & 0x08)
        message.retain = bool(command & 0x01)
        message.payload = payload
        message.properties = PublishProperties(identifiers)
        message.timestamp = mqtt.time_func()
        self._handle_on_message(message)

    def message_callback_add(self, sub: str, callback: Any) -> None:
        raise TypeError("per-topic paho callbacks are not used here: register with MqttBridge.subscribe")

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        on_message = self.on_message
        if on_message is None:
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception:
                log.exception("on_message failed on a message to %r", message._topic)
                if not self.suppress_exceptions:
                    raise


class MqttBridge:
    def __init__(self, settings: Settings, identity: Identity | None = None, name: str = "dashboard") -> None:
        self.settings = settings
        self.name = name
        self.identity = identity or Identity.of(settings.certs_dir, name)
        # Replaced (never changed in place) under the lock, so the network thread reads it without one.
        self._subscriptions: tuple[Subscription, ...] = ()
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self.on_state_change: list[Callable[[bool], None]] = []
        self.client: mqtt.Client | None = None
        self._watcher: PairWatcher | None = None

    # -- registration ----------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, retain_as_published: bool = False) -> None:
        with self._lock:
            sub = Subscription(topic_filter, qos, handler, identifier=len(self._subscriptions) + 1,
                               retain_as_published=retain_as_published)
            self._subscriptions = (*self._subscriptions, sub)
        if self.client is not None and self.connected.is_set():
            sub.subscribe_on(self.client)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        # Watching from before the client reads the files: a renewal in between is seen on the first look.
        self._watcher = PairWatcher(self.identity.cert, self.identity.key, self._files_renewed,
                                    ca=self.identity.ca_cert, interval=self.settings.cert_watch_seconds,
                                    name="mqtt-cert-watch")
        self.client = self._new_client()
        self._connect(self.client)
        self._watcher.start()

    def _new_client(self) -> mqtt.Client:
        client = make_client(self.identity, self.name, protocol=mqtt.MQTTv5, client_class=ChunkedReadClient)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        # Jittered backoff between 1 and 30 s (paho's own doubling has no jitter).
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        return client

    def _connect(self, client: mqtt.Client) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY
        client.connect_async(self.settings.broker_address, self.settings.broker_port, keepalive=30,
                             clean_start=False, properties=properties)
        client.loop_start()

    def reconnect_with_files(self) -> None:
        """A new client that reads the certificate files again (paho cannot change a client's TLS identity).

        The old client disconnects cleanly first (the same client id would otherwise kick the new one off); the
        new one resumes the persistent session, in which the broker queued what matched the subscriptions
        meanwhile (SESSION_EXPIRY), so no reading is lost across the switch.
        """
        old = self.client
        if old is None:
            return
        new = self._new_client()
        self.client = new  # publishes from now on wait in the new client (QoS 1 goes out once it is connected)
        self.connected.clear()
        self.connected_since = None
        old.disconnect()
        old.loop_stop()
        self._connect(new)

    def _files_renewed(self, pair: Pair) -> bool:
        """The watcher's callback: the generator (or the CA) renewed this identity's certificate files."""
        log.info("MQTT certificate of %s renewed (serial %s): reconnecting with it", self.name, pair.serial)
        self.reconnect_with_files()
        return True

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self.client is None:
            return
        self.client.disconnect()
        self.client.loop_stop()
        self.client = None
        self.connected.clear()

    @property
    def started(self) -> bool:
        """The process runs this connection (start() was called, stop() not yet): only then can it be down."""
        return self.client is not None

    def wait_connected(self, timeout: float = 10) -> bool:
        return self.connected.wait(timeout)

    # -- publishing ------------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo | None:
        if self.client is None:
            log.warning("MQTT not started; dropped a message for %s", topic)
            return None
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected.is_set(),
            "broker": f"{self.settings.broker_address}:{self.settings.broker_port}",
            "since": self.connected_since,
            "last_error": self.last_error,
        }

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if client is not self.client:  # replaced by reconnect_with_files
            return
        if reason.is_failure:
            self.last_error = f"connection refused: {reason}"
            log.warning("MQTT %s", self.last_error)
            return
        for sub in self._subscriptions:
            sub.subscribe_on(client)
        self.connected_since = time.time()
        self.last_error = None
        self.connected.set()
        log.info("MQTT connected to %s:%s as %s", self.settings.broker_address, self.settings.broker_port, self.name)
        self._notify(True)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if client is not self.client:  # replaced by reconnect_with_files: its goodbye concerns nobody
            return
        was = self.connected.is_set()
        self.connected.clear()
        self.connected_since = None
        if reason is not None and getattr(reason, "is_failure", False):
            self.last_error = f"disconnected: {reason}"
            log.warning("MQTT %s; reconnecting", self.last_error)
        if was:
            self._notify(False)
        # Spread fleets of reconnecting clients out a little.
        time.sleep(random.uniform(0, 0.5))  # noqa: S311 - jitter, not security

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        identifiers = getattr(message.properties, "SubscriptionIdentifier", None)
        for sub in self._subscriptions:
            if (sub.identifier in identifiers) if identifiers else mqtt.topic_matches_sub(sub.match_filter,
                                                                                           message.topic):
                try:
                    sub.handler(message)
                except Exception:  # a bad message must never stop the network loop
                    log.exception("handler for %s failed on a message to %s", sub.topic_filter, message.topic)

    def _notify(self, connected: bool) -> None:
        for callback in list(self.on_state_change):
            try:
                callback(connected)
            except Exception:
                log.exception("MQTT state callback failed")

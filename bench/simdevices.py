"""Simulated devices for the benchmarks: many mutual-TLS MQTT connections in one asyncio loop.

Why not paho here: paho needs a network thread per client (`loop_start`) and spends tens of microseconds
of Python on every packet, so 2,000 devices or a 20,000 msg/s publisher would measure the load generator,
not the lab. This client speaks only what a thermometer uses of MQTT 3.1.1 (CONNECT with the retained
`offline` will, PUBLISH QoS 0/1, PUBACK, PINGREQ, DISCONNECT), on one event loop, and frames packets
with a few byte joins. TLS is `lab.mqtt.tls_context`: the broker's chain and host name are verified and
each device presents its own certificate, exactly as lab/publisher.py does.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lab.mqtt import Identity, tls_context
from lab.testing import mqtt_varint

CONNECT, CONNACK, PUBLISH, PUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x10, 0x20, 0x30, 0x40, 0xC0, 0xD0, 0xE0
CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def connect_packet(
    client_id: str,
    keepalive: int,
    will_topic: str | None = None,
    will_payload: bytes = b"",
    will_retain: bool = True,
    will_qos: int = 1,
) -> bytes:
    flags = 0x02  # clean session
    payload = _string(client_id.encode())
    if will_topic is not None:
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        payload += _string(will_topic.encode()) + _string(will_payload)
    body = _string(b"MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload
    return bytes([CONNECT]) + mqtt_varint(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, qos: int = 0, packet_id: int = 0, retain: bool = False) -> bytes:
    """`topic` is already length-prefixed (see DeviceConnection), so a hot loop encodes it once."""
    body_len = len(topic) + len(payload) + (2 if qos else 0)
    header = bytes([PUBLISH | (qos << 1) | (1 if retain else 0)]) + mqtt_varint(body_len)
    if qos:
        return b"".join((header, topic, packet_id.to_bytes(2, "big"), payload))
    return b"".join((header, topic, payload))


def iso_time(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="microseconds")


class MqttRefused(ConnectionError):
    pass


class DeviceConnection(asyncio.Protocol):
    """One device: a TLS connection to the broker; counts its publishes and the broker's PUBACKs."""

    def __init__(self, name: str, keepalive: int = 60) -> None:
        self.name = name
        self.keepalive = keepalive
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.temperature_topic = _string(f"iot/thermometer/{name}/temperature".encode())
        self.status_topic = _string(f"iot/thermometer/{name}/status".encode())
        self._buffer = bytearray()
        self._packet_id = 0
        self.seq = 0
        self.published = 0  # QoS 1 publishes written
        self.acked = 0  # PUBACKs received
        self.last_write = 0.0
        self.sent_at: list[float] | None = None  # publish time of reading `seq` at [seq - 1], when recording
        self.on_ack: Callable[[DeviceConnection], None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._write(connect_packet(self.name, self.keepalive, f"iot/thermometer/{self.name}/status", b"offline"))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        pos, end = 0, len(buffer)
        while end - pos >= 2:
            kind = buffer[pos] & 0xF0
            length, shift, i, header_done = 0, 0, pos + 1, False
            while i < end and i - pos <= 4:  # remaining length: 1-4 bytes
                byte = buffer[i]
                i += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    header_done = True
                    break
            if not header_done or end - i < length:
                break  # incomplete packet: wait for more bytes
            if kind == PUBACK:
                self.acked += 1
                if self.on_ack is not None:
                    self.on_ack(self)
            elif kind == CONNACK and not self.connack.done():
                code = buffer[i + 1]
                if code:
                    self.connack.set_exception(MqttRefused(f"{self.name}: {CONNACK_CODES.get(code, code)}"))
                else:
                    self.connack.set_result(None)
            pos = i + length
        del buffer[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(exc or ConnectionError(f"{self.name}: closed before CONNACK"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.transport = None

    # -- sending -----------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.last_write = time.monotonic()

    def _next_id(self) -> int:
        self._packet_id = self._packet_id % 65535 + 1
        return self._packet_id

    def publish(self, topic: bytes, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self._write(publish_packet(topic, payload, qos, self._next_id() if qos else 0, retain))
        if qos:
            self.published += 1

    def publish_reading(
        self, temperature: float, qos: int = 1, now: float | None = None, stamp: str | None = None
    ) -> None:
        """The thermometer's payload; `timestamp` is the publish time (ISO 8601, microseconds), `seq` counts.

        `stamp` is `now` already formatted (a tick of publish_at_rate formats it once for all its messages).
        """
        self.seq += 1
        now = now or time.time()
        if self.sent_at is not None:
            self.sent_at.append(now)
        stamp = stamp or iso_time(now)
        payload = (
            f'{{"device_id":"{self.name}","timestamp":"{stamp}","temperature":{temperature:.2f},"seq":{self.seq}}}'
        ).encode()
        self.publish(self.temperature_topic, payload, qos)

    def publish_status(self, status: str) -> None:
        self.publish(self.status_topic, status.encode(), qos=1, retain=True)

    def ping(self) -> None:
        self._write(bytes([PINGREQ, 0]))

    @property
    def unacked(self) -> int:
        return self.published - self.acked

    def disconnect(self) -> None:
        if self.transport is not None:
            self._write(bytes([DISCONNECT, 0]))
            self.transport.close()


@dataclass
class Fleet:
    """Many DeviceConnections on the running event loop, connected in paced waves."""

    identities: dict[str, Identity]
    host: str
    port: int
    keepalive: int = 60
    connections: dict[str, DeviceConnection] = field(default_factory=dict)
    connect_seconds: list[float] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    _contexts: dict[str, ssl.SSLContext] = field(default_factory=dict)

    def prepare(self, progress: Callable[[int], None] | None = None) -> None:
        """Load every device's key and certificate into its TLS context (before any clock starts)."""
        for name, identity in self.identities.items():
            if name not in self._contexts:
                self._contexts[name] = tls_context(identity)
                if progress:
                    progress(1)

    async def connect_one(self, name: str, timeout: float = 30) -> DeviceConnection:
        loop = asyncio.get_running_loop()
        context = self._contexts.get(name) or tls_context(self.identities[name])
        started = time.monotonic()
        _transport, connection = await asyncio.wait_for(
            loop.create_connection(
                lambda: DeviceConnection(name, self.keepalive),
                self.host,
                self.port,
                ssl=context,
                server_hostname=self.host,
            ),
            timeout,
        )
        await asyncio.wait_for(connection.connack, timeout)
        self.connect_seconds.append(time.monotonic() - started)
        self.connections[name] = connection
        return connection

    async def connect_all(
        self,
        names: Iterable[str] | None = None,
        concurrency: int = 50,
        progress: Callable[[int], None] | None = None,
        online: bool = True,
    ) -> float:
        """Connect (at most `concurrency` handshakes at once: the broker's listen backlog is 100).

        With `online`, each device then publishes its retained `online`, as lab/publisher.py does.
        Returns the wall time it took; failures are recorded in `failures`.
        """
        semaphore = asyncio.Semaphore(concurrency)

        async def one(name: str) -> None:
            async with semaphore:
                try:
                    connection = await self.connect_one(name)
                    if online:
                        connection.publish_status("online")
                except (TimeoutError, OSError, MqttRefused, ssl.SSLError) as ex:
                    self.failures[name] = f"{type(ex).__name__}: {ex}"
                if progress:
                    progress(1)

        started = time.monotonic()
        await asyncio.gather(*(one(name) for name in (names if names is not None else self.identities)))
        return time.monotonic() - started

    @property
    def open_connections(self) -> list[DeviceConnection]:
        return [c for c in self.connections.values() if c.is_open]

    def unacked(self) -> int:
        return sum(c.unacked for c in self.connections.values())

    def acked(self) -> int:
        return sum(c.acked for c in self.connections.values())

    def published(self) -> int:
        return sum(c.published for c in self.connections.values())

    async def wait_acked(self, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while self.unacked() > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def keep_alive(self) -> None:
        """PINGREQ from every device idle for half its keepalive (run as a task; cancel it to stop)."""
        while True:
            await asyncio.sleep(self.keepalive / 4)
            limit = time.monotonic() - self.keepalive / 2
            for connection in self.open_connections:
                if connection.last_write < limit:
                    connection.ping()

    async def close(self, offline: bool = True) -> None:
        """Clean disconnect (retained `offline` first, as the thermometer does on SIGTERM)."""
        for connection in self.open_connections:
            if offline:
                connection.publish_status("offline")
        if offline:
            await self.wait_acked(timeout=10)
        for connection in self.open_connections:
            connection.disconnect()
        await asyncio.sleep(0)


@dataclass(frozen=True)
class Pace:
    """`rate` messages/s for `duration` s, looked at every `tick` s."""

    rate: float
    duration: float
    tick: float = 0.005


async def publish_at_rate(
    connections: list[DeviceConnection],
    pace: Pace,
    *,
    qos: int = 1,
    on_tick: Callable[[float, int], None] | None = None,
    temperature: Callable[[DeviceConnection, int], float] | None = None,
) -> tuple[int, float]:
    """Spread `pace.rate` messages/s round-robin over `connections` for `pace.duration` s; returns (sent, elapsed).

    Paced by the clock (what is due since the start), so a slow tick catches up rather than drifting.
    """
    if not connections:
        raise ValueError("no connected devices to publish from")
    rate, duration, tick = pace.rate, pace.duration, pace.tick
    sent, index, n = 0, 0, len(connections)
    started = time.monotonic()
    wall0 = time.time()
    while True:
        elapsed = time.monotonic() - started
        if elapsed >= duration:
            break
        due = min(int(rate * elapsed) + 1, int(rate * duration))
        now = wall0 + elapsed
        stamp = iso_time(now)
        while sent < due:
            connection = connections[index]
            index = (index + 1) % n
            if connection.is_open:
                value = temperature(connection, sent) if temperature else 20.0 + (sent % 50) / 10
                connection.publish_reading(value, qos, now, stamp)
            sent += 1
        if on_tick is not None:
            on_tick(elapsed, sent)
        await asyncio.sleep(tick)
    return sent, time.monotonic() - started

"""Live telemetry: MQTT messages -> in-memory state -> batched Socket.IO pushes, readings -> database.

The MQTT handlers run on paho's network thread, so they only parse and record under a lock. A single
emitter thread (started with `socketio.start_background_task`) wakes every FLUSH_INTERVAL, drains what
changed since the last flush and sends ONE `batch` event to every browser, then writes the new readings
in one transaction. Under a flood (thousands of messages per second) the browsers therefore get a few
pushes per second whatever the message rate, the log is capped at LOG_LIMIT lines, and the chart keeps
one point per device per second (the mean of that second's readings).

A new tab gets `snapshot()` on connect (see events.py), then the deltas.

Readings and presence come from the telemetry ingest's own connection (dashboard/ingest.py), the CA's traffic
from the dashboard's (dashboard/mqtt_bridge.py). `on_temperature` is the ingest's per-message cost, measured by
bench/telemetry.py (docs/benchmarks.md): a log line is only turned into a dict if it is ever shown, and the
emitter runs on a fixed 100 ms clock so a reading waits at most one period for its push.

The parts: live_state.py (a device card, a chart point, the payload parsers), live_log.py (the MQTT log and
its redaction), live_emitter.py (the emitter: the thread, pushes, database writes, certificate refreshes), which
the hub owns and hands what it drains from its state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from flask import Flask

from pki.config import Settings

from .bus import ReadingsBus, Received
from .certificates import CertificateView
from .ingest import TelemetryIngest
from .live_emitter import FLUSH_INTERVAL, LiveEmitter
from .live_log import LogLine, direction_of
from .live_state import Bucket, DeviceState, device_of, parse_status, parse_temperature
from .mqtt_bridge import MqttBridge
from .readings import ReadingIn, ReadingStore

log = logging.getLogger(__name__)

LOG_LIMIT = 500  # lines kept server-side and in the browser
LOG_BATCH_LIMIT = 50  # newest lines per push (at most 500 a second): past that nobody reads them anyway
HISTORY_SECONDS = 3600  # what the chart shows, and what a restarted dashboard reloads
MAX_DEVICES = 20_000  # new device ids beyond this are logged but not tracked (memory bound: ~1 KiB each)
HISTORY_DEVICES = 1000  # devices with a chart history (up to HISTORY_SECONDS points each); the rest show cards
PENDING_READINGS_LIMIT = 100_000  # unsaved readings kept if the database falls behind
IDLE_STATS_INTERVAL = 2.0  # an idle dashboard still gets its message rate refreshed


class LiveHub:
    """Thread-safe live state, and its emitter (`self.emitter`) that batches it to every connected browser."""

    def __init__(
        self,
        settings: Settings,
        emit: Callable[..., Any],
        store: ReadingStore | None = None,
        certificates: CertificateView | None = None,
        bridge_status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.certificates = certificates or CertificateView(settings)
        self.emitter = LiveEmitter(self.drain, emit, store, self.certificates, self._apply_certificate_states)
        self._bridge_status = bridge_status or (lambda: {"connected": False})
        self._lock = threading.Lock()
        self.devices: dict[str, DeviceState] = {d: DeviceState(d, configured=True) for d in settings.devices}
        self.history: dict[str, deque[Bucket]] = {}
        self.log: deque[LogLine] = deque(maxlen=LOG_LIMIT)
        self._next_log_id = 1
        # What changed since the last flush.
        self._dirty_devices: set[str] = set()
        self._dirty_points: dict[str, dict[int, Bucket]] = {}
        self._pending_log: deque[LogLine] = deque(maxlen=LOG_BATCH_LIMIT)
        self._skipped_log = 0
        self._pending_readings: deque[ReadingIn] = deque(maxlen=PENDING_READINGS_LIMIT)
        # With dashboard replicas: what this process's ingest received goes to the other processes (dashboard/bus.py).
        self.bus: ReadingsBus | None = None
        self._broker_changed = False
        # Counters for the header and /healthz.
        self.messages_total = 0
        self.readings_total = 0
        self.rejected_total = 0
        self._rate_samples: deque[tuple[float, int]] = deque(maxlen=64)
        self._last_emit = 0.0
        # The emitter's part, called by its owner: the store, the certificate table, one tick, the thread.
        self.certs, self.refresh_certs, self.flush = self.emitter.certs, self.emitter.refresh_certs, self.emitter.flush
        self.request_certs_refresh = self.emitter.request_certs_refresh
        self.certificates_changed = self.emitter.certificates_changed
        self.start = self.emitter.start

    @property
    def stored_total(self) -> int:
        return self.emitter.stored_total

    @property
    def db_error(self) -> str | None:
        """The last database failure (storing on the emitter, or reloading here); None once it works again."""
        return self.emitter.db_error

    @db_error.setter
    def db_error(self, error: str | None) -> None:
        self.emitter.db_error = error

    # -- wiring ----------------------------------------------------------------------------------

    def attach(self, bridge: MqttBridge) -> None:
        """Follow the dashboard connection's state. It reads nothing under ssl/ (the ACL: requests carry passphrases,
        `create` replies private keys; the CA service answers there with its own identities), so the CA's traffic
        is not in the MQTT log; `on_ca_message` is the redaction any such message would get."""
        bridge.on_state_change.append(self.on_broker_state)

    def load_history(self, now: float | None = None) -> int:
        """Refill the chart and the cards from the database (a restarted dashboard shows the last hour)."""
        if self.store is None:
            return 0
        now = time.time() if now is None else now
        try:
            latest = self.store.latest()
            recent = self.store.since(now - HISTORY_SECONDS)
        except Exception as ex:
            self.db_error = f"{type(ex).__name__}: {ex}"
            log.exception("could not load readings from the database")
            return 0
        with self._lock:
            for reading in recent:
                self._add_point(reading.device_id, reading.received_at, reading.temperature)
            for device_id, reading in latest.items():
                device = self._device(device_id)
                if device is None:
                    continue
                device.temperature = reading.temperature
                device.last_seen = reading.received_at
                device.device_timestamp = reading.device_timestamp
                device.seq = reading.seq
                device.follow_trend(self.history.get(device_id))
            self._dirty_points.clear()
            self._dirty_devices.clear()
        return len(recent)

    # -- MQTT handlers (paho's network thread: quick, no I/O) --------------------------------------

    def on_temperature(
        self, message: mqtt.MQTTMessage, received_at: float | None = None, from_peer: bool = False
    ) -> None:
        """A reading from this process's ingest (stored on the next flush, and published on the readings bus when
        there is one), or `from_peer`: one another process's ingest received and stored (dashboard/bus.py)."""
        now = time.time() if received_at is None else received_at
        topic = message.topic  # a property that decodes the bytes on every access
        device_id = device_of(topic)
        note = None
        reading = None
        if device_id is None:
            note = "rejected: bad topic"
        else:
            try:
                temperature, stamp, seq = parse_temperature(message.payload)
                reading = ReadingIn(device_id, now, temperature, stamp, seq)
            except ValueError as ex:
                note = f"rejected: {ex}"
        with self._lock:
            self._log_locked(message, now, note, topic)
            if self.bus is not None and not from_peer:
                self.bus.offer(topic, now, message.payload)
            if reading is None:
                self.rejected_total += 1
                return
            device = self._device(reading.device_id)
            if device is None:
                return
            device.temperature = reading.temperature
            device.last_seen = now
            device.device_timestamp = reading.device_timestamp
            device.seq = reading.seq
            device.readings += 1
            if device.status == "unknown":  # no retained presence yet: data means it is up
                device.status, device.status_since = "online", now
            self._add_point(reading.device_id, now, reading.temperature)
            self._dirty_devices.add(device.device_id)  # its trend is computed once per push, in drain()
            if not from_peer:
                self._pending_readings.append(reading)
            self.readings_total += 1

    def apply_peer(self, received: list[Received]) -> None:
        """Readings another process's ingest received (the readings bus's thread): shown here, stored there."""
        for topic, when, payload in received:
            message = mqtt.MQTTMessage(topic=topic.encode())
            message.payload = payload
            self.on_temperature(message, received_at=when, from_peer=True)

    def on_status(self, message: mqtt.MQTTMessage) -> None:
        now = time.time()
        device_id = device_of(message.topic)
        status = parse_status(message.payload)
        note = None if (device_id and status) else "rejected: expected online or offline"
        with self._lock:
            self._log_locked(message, now, note)
            if note:
                self.rejected_total += 1
                return
            assert device_id is not None and status is not None
            device = self._device(device_id)
            if device is None:
                return
            if status == "online" and device.certificate == "revoked":
                # Only possible from a connection opened before the broker reloaded its CRL, which the CA closes
                # again (ca/revocation.py): a revoked identity is never shown online.
                return
            if device.status != status:
                device.status, device.status_since = status, now
            self._dirty_devices.add(device_id)

    def on_ca_message(self, message: mqtt.MQTTMessage) -> None:
        """CA traffic only goes to the log; a reply means the certificate table may have changed."""
        with self._lock:
            self._log_locked(message, time.time(), None).to_dict()  # redacted now: keys are never kept raw
            if direction_of(message.topic) == "out":
                self.emitter.certs_due = True  # the emitter re-checks on its next tick

    def device_revoked(self, device_id: str) -> None:
        """The CA revoked this device: revoked and offline now (its open connection is being closed)."""
        now = time.time()
        with self._lock:
            device = self._device(device_id)
            if device is None:
                return
            device.certificate = "revoked"
            if device.status != "offline":
                device.status, device.status_since = "offline", now
            self._dirty_devices.add(device_id)

    def _apply_certificate_states(self, entities: dict[str, Any]) -> None:
        with self._lock:
            for device_id, device in self.devices.items():
                entity = entities.get(device_id)
                state = entity.get("status") if isinstance(entity, dict) else None
                if state != device.certificate:
                    if "revoked" in (state, device.certificate):  # pushed now; other states with its next change
                        self._dirty_devices.add(device_id)
                    device.certificate = state

    def on_broker_state(self, connected: bool) -> None:
        with self._lock:
            self._broker_changed = True

    # -- state helpers (lock held) ---------------------------------------------------------------

    def _device(self, device_id: str) -> DeviceState | None:
        device = self.devices.get(device_id)
        if device is None:
            if len(self.devices) >= MAX_DEVICES:
                return None
            device = self.devices[device_id] = DeviceState(device_id)
        return device

    def _add_point(self, device_id: str, when: float, value: float) -> None:
        buckets = self.history.get(device_id)
        if buckets is None:
            if len(self.history) >= HISTORY_DEVICES:
                return  # a fleet this large gets cards, not one chart line per device
            buckets = self.history[device_id] = deque()
        second = int(when)
        if buckets and second <= buckets[-1].second:  # same second (or a clock step back): same point
            buckets[-1].add(value)
            bucket = buckets[-1]
        else:
            bucket = Bucket(second, value)
            buckets.append(bucket)
        horizon = second - HISTORY_SECONDS
        while buckets and buckets[0].second < horizon:
            buckets.popleft()
        self._dirty_points.setdefault(device_id, {})[bucket.second] = bucket

    def _log_locked(
        self, message: mqtt.MQTTMessage, when: float, note: str | None, topic: str | None = None
    ) -> LogLine:
        self.messages_total += 1
        line = LogLine(self._next_log_id, when, topic or message.topic, message, note)
        self._next_log_id += 1
        self.log.append(line)
        if len(self._pending_log) == self._pending_log.maxlen:
            self._skipped_log += 1
        self._pending_log.append(line)
        return line

    # -- reading the state -----------------------------------------------------------------------

    def drain(self) -> tuple[dict[str, Any] | None, list[ReadingIn]]:
        """Take what changed since the last call: (the batch to push or None, the readings to store)."""
        now = time.time()
        with self._lock:
            readings = list(self._pending_readings)
            self._pending_readings.clear()
            if not (self._dirty_devices or self._dirty_points or self._pending_log or self._broker_changed) and (
                now - self._last_emit < IDLE_STATS_INTERVAL
            ):
                return None, readings
            for device_id in self._dirty_devices:
                if device_id in self.devices:
                    self.devices[device_id].follow_trend(self.history.get(device_id))
            batch: dict[str, Any] = {
                "server_time": now,
                "devices": [self.devices[d].to_dict() for d in sorted(self._dirty_devices) if d in self.devices],
                "points": {d: [b.point() for b in buckets.values()] for d, buckets in self._dirty_points.items()},
                "log": [line.to_dict() for line in self._pending_log],
                "skipped": self._skipped_log,
                "stats": self._stats_locked(now),
            }
            if self._broker_changed:
                batch["broker"] = self._bridge_status()
            self._dirty_devices.clear()
            self._dirty_points.clear()
            self._pending_log.clear()
            self._skipped_log = 0
            self._broker_changed = False
            self._last_emit = now
        return batch, readings

    def _stats_locked(self, now: float) -> dict[str, Any]:
        self._rate_samples.append((now, self.messages_total))
        while len(self._rate_samples) > 1 and now - self._rate_samples[0][0] > 5:
            self._rate_samples.popleft()
        first_t, first_n = self._rate_samples[0]
        rate = (self.messages_total - first_n) / (now - first_t) if now - first_t >= 0.5 else 0.0
        return {
            "messages": self.messages_total,
            "readings": self.readings_total,
            "rejected": self.rejected_total,
            "rate": round(rate, 1),
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything a new tab needs; later changes come as `batch` events."""
        certs = self.certs()
        now = time.time()
        with self._lock:
            return {
                "server_time": now,
                "config": self.client_config(),
                "broker": self._bridge_status(),
                "devices": [d.to_dict() for _, d in sorted(self.devices.items())],
                "history": {d: [b.point() for b in buckets] for d, buckets in self.history.items()},
                "log": [line.to_dict() for line in self.log],
                "stats": self._stats_locked(now),
                "certs": certs,
            }

    def client_config(self) -> dict[str, Any]:
        return {
            "log_limit": LOG_LIMIT,
            "history_seconds": HISTORY_SECONDS,
            "flush_interval": FLUSH_INTERVAL,
            "renew_before_days": self.settings.renew_before_days,
            "publish_interval": self.settings.publish_interval,
        }

    def device_data(self) -> dict[str, Any]:
        """`device_data` of /api/data: the seed's per-device view, with the last hour of points."""
        with self._lock:
            return {
                device_id: {
                    **device.to_dict(),
                    "history": [b.point() for b in self.history.get(device_id, ())],
                }
                for device_id, device in sorted(self.devices.items())
            }

    def logs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [line.to_dict() for line in self.log]

    def close(self) -> None:
        self.emitter.stop()
        self.certificates.close()
        if self.store is not None:
            self.store.close()

    def counts(self) -> dict[str, int]:
        """Totals since start for /metrics (plain reads of ints: no lock on the message path)."""
        return {"messages": self.messages_total, "readings": self.readings_total, "rejected": self.rejected_total}

    def devices_online(self) -> int:
        with self._lock:
            return sum(1 for device in self.devices.values() if device.status == "online")

    def health(self) -> dict[str, Any]:
        ok, error = (True, None) if self.store is None else self.store.ping()
        if ok and self.db_error:
            ok, error = False, self.db_error
        return {"ok": ok, "error": error, "readings_stored_since_start": self.readings_total}


def init_app(app: Flask) -> None:
    """Create the hub and its ingest connection (not started: `dashboard.start`), reload the last hour."""
    from . import socketio

    settings: Settings = app.extensions["lab_settings"]
    bridge: MqttBridge = app.extensions["mqtt_bridge"]
    server = socketio.server  # this app's Socket.IO server (a test may create several apps)

    def emit(event: str, data: dict[str, Any]) -> None:
        # To this process's tabs only, even with a message queue: every process's hub holds the whole live state
        # (its own ingest's readings and, over the readings bus, the others'), so each pushes to its own tabs.
        server.emit(event, data, namespace="/", ignore_queue=True)

    def broker_status() -> dict[str, Any]:
        """The page's broker pill: the dashboard's connection, or the ingest's in a replica without one."""
        ingest = app.extensions.get("ingest")
        if settings.dashboard_mqtt or ingest is None:
            return bridge.status()
        return {**bridge.status(), "connected": ingest.connected.is_set(), "last_error": ingest.last_error}

    store = ReadingStore(settings.effective_database_url)
    hub = LiveHub(settings, emit, store=store, bridge_status=broker_status)
    hub.load_history()
    hub.attach(bridge)
    app.extensions["live_hub"] = hub
    # The ingest replica inside this process (INGEST_EMBEDDED, the default); replicas share the readings with a
    # shared subscription once dashboards share a Redis (SOCKETIO_MESSAGE_QUEUE).
    shared = bool(settings.socketio_message_queue)
    if shared:  # replicas: what this process ingests goes to the others, and theirs comes here
        hub.bus = app.extensions["readings_bus"] = ReadingsBus(settings.socketio_message_queue)
    app.extensions["ingest"] = (
        TelemetryIngest(settings, hub.on_temperature, shared=shared, presence=hub.on_status)
        if settings.ingest_embedded
        else None
    )


def start_live(app: Flask, emitter: bool) -> None:
    """Part of `dashboard.start`: the emitter thread (batched pushes, database writes)."""
    from . import socketio

    hub: LiveHub = app.extensions["live_hub"]
    if hub.bus is not None:
        hub.bus.start()
        hub.bus.listen(hub.apply_peer)
    if emitter:
        hub.start(socketio.start_background_task)

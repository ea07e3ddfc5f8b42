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
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from flask import Flask

from pki.config import DEVICE_ID_RE, Settings

from .bus import ReadingsBus, Received
from .certificates import CertificateView
from .ingest import TelemetryIngest
from .mqtt_bridge import MqttBridge
from .readings import ReadingIn, ReadingStore

log = logging.getLogger(__name__)

CA_REQUEST_TOPICS = ("ssl/sign", "ssl/create")
CA_RENEW_PREFIX = "ssl/renew/"

LOG_LIMIT = 500  # lines kept server-side and in the browser
LOG_BATCH_LIMIT = 50  # newest lines per push (at most 500 a second): past that nobody reads them anyway
HISTORY_SECONDS = 3600  # what the chart shows, and what a restarted dashboard reloads
# Seconds between two pushes to the browsers (at most 10 per second). A reading waits up to one interval for
# its push, so this bounds the publish-to-browser latency (the bench's p99 target is 250 ms).
FLUSH_INTERVAL = 0.1
CERTS_POLL_INTERVAL = 2.0  # how often the emitter checks whether the certificate table changed
# A CA reply makes the emitter re-check sooner, but not more often than this: rebuilding the table walks the
# whole inventory, and under an issuance storm replies come thousands of times a second.
CERTS_DUE_MIN_GAP = 1.0
# Rebuilding the table costs time proportional to the inventory (every certificate ever issued): after a
# rebuild that took t seconds the next waits at least CERTS_COST_FACTOR * t, so however large the inventory
# grows the table never takes more than ~5% of the process (it lags instead; a browser's refresh is not held).
CERTS_COST_FACTOR = 20
CERTS_FULL_REFRESH = 60.0  # days-left values age even when nothing changes
PRUNE_INTERVAL = 300.0
IDLE_STATS_INTERVAL = 2.0  # an idle dashboard still gets its message rate refreshed
PAYLOAD_PREVIEW = 400  # characters of payload kept per log line
TREND_WINDOW = 60  # seconds: the trend compares the newest reading with the mean of this window's start
TREND_THRESHOLD = 0.1  # °C
MAX_DEVICES = 20_000  # new device ids beyond this are logged but not tracked (memory bound: ~1 KiB each)
HISTORY_DEVICES = 1000  # devices with a chart history (up to HISTORY_SECONDS points each); the rest show cards
PENDING_READINGS_LIMIT = 100_000  # unsaved readings kept if the database falls behind

SECRET_FIELDS = {"key", "pass", "passphrase", "password", "token", "private_key"}
PEM_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.S)


@dataclass
class DeviceState:
    device_id: str
    configured: bool = False
    temperature: float | None = None
    last_seen: float | None = None  # server receive time of the newest reading
    device_timestamp: str | None = None
    seq: int | None = None
    status: str = "unknown"  # online | offline | unknown (nothing retained yet)
    certificate: str | None = None  # its certificate's state (valid, expiring, expired, revoked, ...), if known
    status_since: float | None = None
    readings: int = 0
    trend: str = "flat"  # up | down | flat
    delta: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)  # every field is a plain value: asdict()'s deep copy is not needed


class Bucket:
    """All readings of one device within one second: the chart's point is their mean."""

    __slots__ = ("second", "total", "count")

    def __init__(self, second: int, value: float) -> None:
        self.second = second
        self.total = value
        self.count = 1

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1

    @property
    def mean(self) -> float:
        return round(self.total / self.count, 3)

    def point(self) -> list[float]:
        return [self.second, self.mean]


class LogLine:
    """One MQTT message in the log. Its dict (payload preview, redaction) is built only when a push or a
    snapshot shows it: under a flood most lines are dropped from the capped log before anyone sees them."""

    __slots__ = ("id", "time", "topic", "payload", "qos", "retained", "note", "_entry")

    def __init__(self, line_id: int, when: float, topic: str, payload: bytes, qos: int, retained: bool,
                 note: str | None) -> None:
        self.id, self.time, self.topic, self.payload = line_id, when, topic, payload
        self.qos, self.retained, self.note = qos, retained, note
        self._entry: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self._entry is None:
            try:
                preview = preview_payload(self.topic, self.payload)
            except Exception:  # a line that cannot be shown must not stop every later push
                log.exception("could not preview a payload on %s", self.topic)
                preview = "«unreadable payload»"
            entry = {
                "id": self.id,
                "time": self.time,
                "topic": self.topic,
                "payload": preview,
                "size": len(self.payload),
                "direction": direction_of(self.topic),
                "qos": self.qos,
                "retained": self.retained,
            }
            if self.note:
                entry["note"] = self.note
            self._entry, self.payload = entry, b""  # the raw bytes are not kept once previewed (redacted)
        return self._entry


def _redact(value: Any) -> Any:
    """Never show secrets in the log: private keys, passphrases, tokens; shorten PEM blobs."""
    if isinstance(value, dict):
        return {k: ("«redacted»" if k.lower() in SECRET_FIELDS and v else _redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, str):
        return _shorten_pem(value)
    return value


def _shorten_pem(text: str) -> str:
    def repl(match: re.Match[str]) -> str:
        if "PRIVATE KEY" in match.group(1):
            return "«private key redacted»"
        return f"«{match.group(1).lower()}, {len(match.group(0))} bytes»"

    return PEM_RE.sub(repl, text)


def is_ca_request(topic: str) -> bool:
    return topic in CA_REQUEST_TOPICS or topic.startswith(CA_RENEW_PREFIX)


def preview_payload(topic: str, payload: bytes) -> str:
    """What the log shows of a payload: text, secrets redacted, at most PAYLOAD_PREVIEW characters.

    A CA request (passphrase, token, CSR) is never shown, whatever it contains: redaction that depends on
    parsing misses a passphrase in a payload that is not valid JSON. A reply under ssl/ is shown only as JSON
    with its secrets redacted.
    """
    if is_ca_request(topic):
        return f"«CA request, {len(payload)} bytes, not shown»"
    text = payload.decode("utf-8", errors="replace")
    if topic.startswith("ssl/") or "PRIVATE KEY" in text:
        try:
            text = json.dumps(_redact(json.loads(text)), separators=(",", ":"))
        except (ValueError, RecursionError):  # not JSON, or nested too deep to walk
            if topic.startswith("ssl/"):
                return f"«{len(payload)} bytes, not JSON, not shown»"
            text = "«private key redacted»" if "PRIVATE KEY" in text else _shorten_pem(text)
    if len(text) > PAYLOAD_PREVIEW:
        text = text[: PAYLOAD_PREVIEW - 1] + "…"
    return text


def direction_of(topic: str) -> str:
    """`in`: to the dashboard (telemetry, presence, CA requests); `out`: the dashboard's CA replies."""
    if topic.startswith("ssl/") and not is_ca_request(topic):
        return "out"
    return "in"


def parse_temperature(payload: bytes) -> tuple[float, str | None, int | None]:
    """(temperature, device timestamp, seq) from a telemetry payload; ValueError says what is wrong."""
    try:
        data = json.loads(payload.decode())  # str: json skips sniffing the encoding of bytes
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; [[[[...]]]] a RecursionError
        raise ValueError("not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    value = data.get("temperature")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("temperature is not a number")
    stamp = data.get("timestamp")
    seq = data.get("seq")
    return float(value), (str(stamp)[:64] if stamp is not None else None), (
        seq if isinstance(seq, int) and not isinstance(seq, bool) else None
    )


def parse_status(payload: bytes) -> str | None:
    text = payload.decode("utf-8", errors="replace").strip()
    if text.startswith("{"):
        try:
            text = str(json.loads(text).get("status", ""))
        except (ValueError, AttributeError, RecursionError):
            return None
    text = text.lower()
    return text if text in ("online", "offline") else None


def device_of(topic: str) -> str | None:
    parts = topic.split("/")
    if len(parts) == 4 and DEVICE_ID_RE.match(parts[2]):
        return parts[2]
    return None


class LiveHub:
    """Thread-safe live state plus the emitter that batches it to every connected browser."""

    def __init__(
        self,
        settings: Settings,
        emit: Callable[..., Any],
        store: ReadingStore | None = None,
        certificates: CertificateView | None = None,
        bridge_status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.settings = settings
        self._emit = emit
        self.store = store
        self.certificates = certificates or CertificateView(settings)
        self._bridge_status = bridge_status or (lambda: {"connected": False})
        self._lock = threading.Lock()
        self._certs_lock = threading.Lock()
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
        self.stored_total = 0  # readings this process wrote to the database
        self.rejected_total = 0
        self.emits_total = 0
        self._rate_samples: deque[tuple[float, int]] = deque(maxlen=64)
        self._last_emit = 0.0
        self.db_error: str | None = None
        self._certs: dict[str, Any] | None = None
        self._certs_signature: Any = None
        self._certs_due = True
        self._certs_forced = False
        self._stop = threading.Event()
        self._thread: Any = None

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
                self._update_trend(device)
            self._dirty_points.clear()
            self._dirty_devices.clear()
        return len(recent)

    # -- MQTT handlers (paho's network thread: quick, no I/O) --------------------------------------

    def on_temperature(self, message: mqtt.MQTTMessage, received_at: float | None = None,
                       from_peer: bool = False) -> None:
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
                self._certs_due = True  # the emitter re-checks on its next tick

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

    def _update_trend(self, device: DeviceState) -> None:
        buckets = self.history.get(device.device_id)
        if not buckets or device.temperature is None:
            device.trend, device.delta = "flat", 0.0
            return
        # The oldest point inside the window, walking back from the newest (at most TREND_WINDOW steps).
        start = buckets[-1].second - TREND_WINDOW
        reference = buckets[-1]
        for bucket in reversed(buckets):
            if bucket.second < start:
                break
            reference = bucket
        delta = round(device.temperature - reference.mean, 2)
        device.delta = delta
        device.trend = "up" if delta >= TREND_THRESHOLD else "down" if delta <= -TREND_THRESHOLD else "flat"

    def _log_locked(self, message: mqtt.MQTTMessage, when: float, note: str | None,
                    topic: str | None = None) -> LogLine:
        self.messages_total += 1
        line = LogLine(self._next_log_id, when, topic or message.topic, message.payload, message.qos,
                       bool(message.retain), note)
        self._next_log_id += 1
        self.log.append(line)
        if len(self._pending_log) == self._pending_log.maxlen:
            self._skipped_log += 1
        self._pending_log.append(line)
        return line

    # -- reading the state -----------------------------------------------------------------------

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

    # -- certificates ----------------------------------------------------------------------------

    def certs(self) -> dict[str, Any]:
        if self._certs is None:
            self.refresh_certs(force=True, broadcast=False)
        return self._certs or {"certs": [], "crl": {"present": False}, "summary": {}}

    def refresh_certs(self, force: bool = False, broadcast: bool = True) -> bool:
        """Recompute the certificate table when it changed (or when forced); True when it was sent."""
        with self._certs_lock:
            try:
                signature = self.certificates.signature()
                if not force and signature == self._certs_signature:
                    return False
                self._certs = self.certificates.snapshot()
                self._certs_signature = signature
            except Exception:
                log.exception("could not read the certificate state")
                return False
            data = self._certs
        self._apply_certificate_states(data.get("entities") or {})
        if broadcast:
            self._send("certs", data)
        return True

    def request_certs_refresh(self) -> None:
        """A browser asks for a fresh table: the emitter does it on its next tick (so at most 4/s)."""
        if self._thread is not None:
            self._certs_due = True
            self._certs_forced = True
        else:  # no emitter (tests, MQTT disabled): answer now
            self.refresh_certs(force=True)

    def certificates_changed(self) -> None:
        """The CA in this process issued, renewed or revoked something: re-read the table on a coming tick (not
        forced, so the emitter's spacing still holds under an issuance storm)."""
        if self._thread is not None:
            self._certs_due = True
        else:  # no emitter (tests, MQTT disabled): now
            self.refresh_certs()

    # -- the emitter -----------------------------------------------------------------------------

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
                    self._update_trend(self.devices[device_id])
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

    def flush(self) -> dict[str, Any] | None:
        """One emitter tick: push the batch (one event for everything), then store the readings."""
        batch, readings = self.drain()
        if batch is not None:
            self._send("batch", batch)
        if readings and self.store is not None:
            try:
                self.store.add_many(readings)
                self.stored_total += len(readings)
                self.db_error = None
            except Exception as ex:
                self.db_error = f"{type(ex).__name__}: {ex}"
                log.exception("could not store %d readings; they are dropped", len(readings))
        return batch

    def _send(self, event: str, data: dict[str, Any]) -> None:
        try:
            self._emit(event, data)
            self.emits_total += 1
        except Exception:
            log.exception("could not push %s to the browsers", event)

    def prune(self) -> None:
        if self.store is None:
            return
        try:
            self.store.prune()
        except Exception:
            log.exception("could not prune old readings")

    def run(self) -> None:
        """The emitter loop (a background task): flush, watch the certificates, prune."""
        next_certs = last_certs = 0.0
        certs_gap = CERTS_DUE_MIN_GAP
        next_full = time.monotonic() + CERTS_FULL_REFRESH
        next_prune = time.monotonic() + 30
        next_flush = time.monotonic()
        while True:
            # A fixed clock rather than a fixed pause, so a slow flush does not stretch every reading's wait;
            # at least a quarter interval between two flushes, so a flush slower than the interval cannot spin.
            next_flush = max(next_flush + FLUSH_INTERVAL, time.monotonic() + FLUSH_INTERVAL / 4)
            if self._stop.wait(next_flush - time.monotonic()):
                break
            try:
                self.flush()
                now = time.monotonic()
                if self._certs_forced or (now >= last_certs + certs_gap and (now >= next_certs or self._certs_due)):
                    self._certs_due = False
                    last_certs = now
                    full = now >= next_full or self._certs_forced
                    self._certs_forced = False
                    self.refresh_certs(force=full)
                    certs_gap = max(CERTS_DUE_MIN_GAP, CERTS_COST_FACTOR * (time.monotonic() - now))
                    next_certs = now + max(CERTS_POLL_INTERVAL, certs_gap)
                    if full:
                        next_full = now + CERTS_FULL_REFRESH
                if now >= next_prune:
                    self.prune()
                    next_prune = now + PRUNE_INTERVAL
            except Exception:  # the loop must survive anything
                log.exception("live emitter tick failed")
        self.flush()

    def start(self, start_task: Callable[..., Any]) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = start_task(self.run)

    def stop(self, timeout: float = 5) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and hasattr(thread, "join"):
            thread.join(timeout)

    def close(self) -> None:
        self.stop()
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
    app.extensions["ingest"] = (TelemetryIngest(settings, hub.on_temperature, shared=shared, presence=hub.on_status)
                                if settings.ingest_embedded else None)


def start_live(app: Flask, emitter: bool) -> None:
    """Part of `dashboard.start`: the emitter thread (batched pushes, database writes)."""
    from . import socketio

    hub: LiveHub = app.extensions["live_hub"]
    if hub.bus is not None:
        hub.bus.start()
        hub.bus.listen(hub.apply_peer)
    if emitter:
        hub.start(socketio.start_background_task)

"""A simulated thermometer: mutual-TLS MQTT client that publishes a plausible temperature every interval.

`thermometer.py` is the thin entry point; everything lives here so tests can import the pieces.

- Configuration: the seed's environment variables (DEVICE_ID, CA_CERT_PATH, CLIENT_CERT_PATH,
  CLIENT_KEY_PATH, BROKER_ADDRESS, BROKER_PORT, PUBLISH_INTERVAL), `.env` underneath, flags on top.
  With only DEVICE_ID the files default to `<CERTS_DIR>/<id>/...` as the generator writes them.
- Certificate problems are found before connecting (one-line error naming the file, exit 2): a device
  that cannot authenticate would otherwise retry forever with the broker's opaque "verify failed".
- Readings are produced on schedule whether or not the broker is reachable; the ones that could not be
  sent wait in a bounded buffer and go out, oldest first, after the reconnect. `seq` numbers each
  reading of this process (1, 2, ...), so a consumer can prove there is no gap.
- Revocation: when a connection is lost or refused, one TLS handshake asks the broker whether it refuses this
  certificate as revoked (`lab.mqtt.certificate_revoked`). If so the thermometer logs one line saying so and
  what to do, never connects with that certificate again, and exits with EXIT_REVOKED (3); with
  ON_REVOKED=wait (the compose lab, whose restart policy would otherwise start it again) it waits instead
  until a new certificate replaces the file, then carries on with it.
- SIGTERM/SIGINT: the last readings are delivered, retained `offline` is acknowledged, then a clean
  DISCONNECT (so the broker does not also fire the will), exit 0.
- Certificate lifecycle: with no certificate but an enrolment token (ENROL_TOKEN, or a line claimed from
  ENROL_TOKEN_FILE) the device first enrols over the CA's HTTP API (`lab/enrolment.py`); afterwards it renews
  its certificate itself over MQTT (`lab/renewal.py`), switching to a new client without losing a reading.
  With ENROL=est (`--enrol est`) both go over EST instead (`lab/est.py`).
- Files renewed under it (the generator, `./setup.sh certs`, or the CA): every CERT_WATCH_SECONDS (default 5)
  it looks at its certificate and key files (`lab/rotation.py`); once they hold another complete pair that
  passes the checks above, it switches to a new client with them the same way, long before the superseded
  certificate goes on the CRL (SUPERSEDED_GRACE_SECONDS, default 900).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import hashlib
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from cryptography import x509

from pki.authority import (
    CAError,
    WrongPassphrase,
    common_name,
    load_certificate,
    load_private_key,
    public_key_matches,
    utcnow,
    verify_leaf,
)
from pki.config import DEVICE_ID_RE, ConfigError, Settings, lab_environ, revoked_next_step

from . import est
from .credentials import has_previous, recover
from .enrolment import EnrolmentError, EnrolmentRefused, enrol_if_needed, with_claimed_token
from .mqtt import Identity, certificate_revoked, make_client
from .renewal import CONNECT_TIMEOUT, DRAIN_TIMEOUT, RENEW_CHECK_INTERVAL, RenewalPolicy, Renewer
from .rotation import WATCH_SECONDS, Pair, PairWatcher

log = logging.getLogger("thermometer")

EXIT_OK = 0
EXIT_UNAVAILABLE = 1
EXIT_CONFIG = 2
EXIT_REVOKED = 3  # the broker refuses this certificate as revoked; not restarted (lab/native.py, compose: wait)
ON_REVOKED = ("exit", "wait")
NEW_CERTIFICATE_POLL = 5.0  # seconds between two looks at the certificate file while waiting (ON_REVOKED=wait)

BUFFER_SIZE = 1000  # readings kept while the broker is unreachable (~83 min at the default 5 s)
MAX_IN_FLIGHT = 100  # messages handed to paho and not yet acknowledged; the rest wait in the buffer
RECONNECT_MIN_DELAY = 1.0
RECONNECT_MAX_DELAY = 30.0
KEEPALIVE = 30
SHUTDOWN_ACK_TIMEOUT = 5.0
SWITCH_ATTEMPTS = 3  # failed connections with a renewed certificate before it is rolled back
STOP_POLL = 0.1  # how quickly the loop notices a stop request (a signal handler must not touch locks)


class DeviceConfigError(ValueError):
    """The thermometer cannot start; the message is one line and names the setting or file."""


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceConfig:
    device_id: str
    identity: Identity
    broker_address: str = "localhost"
    broker_port: int = 8883
    interval: float = 5.0
    renew_before_days: float = 30.0
    renew_check_interval: float = RENEW_CHECK_INTERVAL  # 0: never renew
    watch_interval: float = WATCH_SECONDS  # seconds between looks at the certificate files (CERT_WATCH_SECONDS)

    @property
    def temperature_topic(self) -> str:
        return f"iot/thermometer/{self.device_id}/temperature"

    @property
    def status_topic(self) -> str:
        return f"iot/thermometer/{self.device_id}/status"


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not between 1 and 65535")
    return port


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds > 0 or math.isinf(seconds):
        raise argparse.ArgumentTypeError("the interval must be a positive number of seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thermometer.py",
        description="A simulated thermometer: publishes its temperature over mutual-TLS MQTT. Every flag "
        "overrides the environment variable named in its help (and .env underneath).",
        epilog="Certificate lifecycle (environment only): RENEW_CHECK_INTERVAL (seconds between checks of the "
        "certificate, default 3600, 0: never renew) and RENEW_BEFORE_DAYS (default 30): the device renews its "
        "certificate itself over MQTT once inside that window or past two thirds of its lifetime. Without a "
        "certificate, ENROL_TOKEN (a single-use token from POST /v1/ssl/tokens) makes it enrol first at CA_URL "
        "(default http://127.0.0.1:<DASHBOARD_PORT>); ENROL_TOKEN_FILE instead claims a `name token` line of a "
        "shared file and takes its name as DEVICE_ID.",
    )
    parser.add_argument("--device-id", help="device id = certificate CN (DEVICE_ID)")
    parser.add_argument("--ca-cert", type=Path, help="root CA the broker must chain to (CA_CERT_PATH; "
                        "default <CERTS_DIR>/<id>/root_ca.crt)")
    parser.add_argument("--cert", type=Path, help="client certificate (CLIENT_CERT_PATH; "
                        "default <CERTS_DIR>/<id>/<id>.crt)")
    parser.add_argument("--key", type=Path, help="client private key, unencrypted (CLIENT_KEY_PATH; "
                        "default <CERTS_DIR>/<id>/<id>.key)")
    parser.add_argument("--broker", help="broker host name or IP, must be in its certificate (BROKER_ADDRESS; "
                        "default localhost)")
    parser.add_argument("--port", type=_port, help="broker TLS port (BROKER_PORT; default 8883)")
    parser.add_argument("--interval", type=_seconds, help="seconds between readings (PUBLISH_INTERVAL; default 5)")
    parser.add_argument("--enrol", choices=est.ENROL_MODES, help="how the device enrols and renews (ENROL; "
                        "default mqtt: a token at CA_URL's v1/ssl/sign, renewal over MQTT; est: EST simpleenroll "
                        "and simplereenroll at EST_URL, default https://localhost:<CA_HTTPS_PORT>/.well-known/est)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every reading (LOG_LEVEL=DEBUG)")
    return parser


def load_config(args: argparse.Namespace, environ: Mapping[str, str]) -> DeviceConfig:
    """Flags over the environment over `.env`; raises DeviceConfigError with a one-line message."""
    try:
        settings = Settings.from_env(environ)
    except ConfigError as ex:
        raise DeviceConfigError(str(ex)) from None
    device_id = (args.device_id or environ.get("DEVICE_ID") or "").strip()
    if not device_id:
        raise DeviceConfigError("DEVICE_ID is not set: export DEVICE_ID=device001 or pass --device-id")
    if not DEVICE_ID_RE.match(device_id):
        raise DeviceConfigError(
            f"device id {device_id!r} is not allowed: 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    defaults = Identity.of(settings.certs_dir, device_id)

    def path(flag: Path | None, key: str, default: Path) -> Path:
        raw = flag if flag is not None else (environ.get(key) or "").strip()
        return Path(raw).expanduser() if raw else default

    identity = Identity(
        path(args.ca_cert, "CA_CERT_PATH", defaults.ca_cert),
        path(args.cert, "CLIENT_CERT_PATH", defaults.cert),
        path(args.key, "CLIENT_KEY_PATH", defaults.key),
    )
    port = args.port if args.port is not None else settings.broker_port
    if port > 65535:
        raise DeviceConfigError(f"BROKER_PORT={port} is not a port number")
    check_raw = (environ.get("RENEW_CHECK_INTERVAL") or "").strip()
    try:
        check_interval = float(check_raw) if check_raw else RENEW_CHECK_INTERVAL
    except ValueError:
        check_interval = -1.0
    if not 0 <= check_interval < math.inf:
        raise DeviceConfigError(f"RENEW_CHECK_INTERVAL={check_raw!r} is not a number of seconds (0: never renew)")
    return DeviceConfig(
        device_id=device_id,
        identity=identity,
        broker_address=(args.broker or settings.broker_address).strip(),
        broker_port=port,
        interval=args.interval if args.interval is not None else settings.publish_interval,
        renew_before_days=settings.renew_before_days,
        renew_check_interval=check_interval,
        watch_interval=settings.cert_watch_seconds,
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DeviceConfigError(f"{what} {path} does not exist (run ./setup.sh certs to generate it)") from None
    except OSError as ex:
        raise DeviceConfigError(f"cannot read {what} {path}: {ex.strerror or ex}") from None


def check_identity(config: DeviceConfig) -> x509.Certificate:
    """Fail fast, naming the file, on what the TLS handshake would only report as 'verify failed'.

    Returns the client certificate. Nothing here ever logs key material.
    """
    identity = config.identity
    ca_data = _read(identity.ca_cert, "CA certificate")
    cert_data = _read(identity.cert, "client certificate")
    key_data = _read(identity.key, "client key")
    try:
        roots = x509.load_pem_x509_certificates(ca_data)
    except ValueError:
        raise DeviceConfigError(f"CA certificate {identity.ca_cert} is not a PEM certificate") from None
    try:
        cert = load_certificate(cert_data)
    except CAError:
        raise DeviceConfigError(f"client certificate {identity.cert} is not a PEM certificate") from None
    try:
        key = load_private_key(key_data)
    except WrongPassphrase:
        raise DeviceConfigError(f"client key {identity.key} is encrypted; the device needs it unencrypted") from None
    except CAError:
        raise DeviceConfigError(f"client key {identity.key} is not a readable PEM private key") from None
    if not public_key_matches(cert, key):
        raise DeviceConfigError(f"client key {identity.key} does not match certificate {identity.cert}")
    if not any(verify_leaf(root, cert) for root in roots):
        raise DeviceConfigError(f"client certificate {identity.cert} was not issued by the CA in {identity.ca_cert}")
    cn = common_name(cert)
    if cn != config.device_id:
        # The broker takes the CN as user name and client id: the device's topic would be denied.
        raise DeviceConfigError(
            f"client certificate {identity.cert} is for {cn!r}, not for device {config.device_id!r}"
        )
    now = utcnow()
    if cert.not_valid_after_utc <= now:
        log.warning("certificate %s expired on %s: the broker will refuse it", identity.cert,
                    cert.not_valid_after_utc.isoformat())
    elif cert.not_valid_before_utc > now:
        log.warning("certificate %s is not valid before %s: is this machine's clock right?", identity.cert,
                    cert.not_valid_before_utc.isoformat())
    return cert


# -- the temperature -----------------------------------------------------------------------------


def baseline_for(device_id: str) -> float:
    """A per-device mean between 18.00 and 25.99 °C, the same on every start (derived from the id)."""
    digest = hashlib.sha256(device_id.encode()).digest()
    return 18.0 + int.from_bytes(digest[:4], "big") % 800 / 100


class TemperatureWalk:
    """A mean-reverting random walk (Ornstein-Uhlenbeck), clamped to baseline ± `bound` °C.

    Exact discretisation, so the statistics do not depend on the interval: with the defaults the
    temperature wanders ~0.8 °C around the baseline, returns with a 10-minute time constant, and moves
    ~0.1 °C between two readings 5 s apart: it looks like a room, not like noise.
    """

    def __init__(self, baseline: float, *, spread: float = 0.8, reversion_seconds: float = 600.0,
                 bound: float = 3.0, rng: random.Random | None = None) -> None:
        self.baseline = baseline
        self.spread = spread  # stationary standard deviation, °C
        self.reversion_seconds = reversion_seconds
        self.bound = bound
        self.rng = rng or random.Random()  # noqa: S311 - a simulation, not security
        self.value = baseline + self.rng.gauss(0, spread / 2)
        self.value = min(max(self.value, baseline - bound), baseline + bound)

    def step(self, seconds: float) -> float:
        decay = math.exp(-seconds / self.reversion_seconds)
        noise = self.spread * math.sqrt(1 - decay * decay)
        value = self.baseline + (self.value - self.baseline) * decay + self.rng.gauss(0, noise)
        self.value = min(max(value, self.baseline - self.bound), self.baseline + self.bound)
        return self.value


def iso_utc(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_reading(device_id: str, seq: int, temperature: float, now: dt.datetime | None = None) -> dict[str, Any]:
    """The telemetry payload (CONTRACT: device_id, timestamp, temperature; `seq` is extra)."""
    return {"device_id": device_id, "timestamp": iso_utc(now or utcnow()), "temperature": round(temperature, 2),
            "seq": seq}


# -- the MQTT device --------------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., None])


def _guarded(callback: F) -> F:
    """paho callbacks log their own failures: an exception must never reach (and stop) the network loop."""

    def wrapper(*args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("error in %s (ignored, the connection carries on)", callback.__name__)

    wrapper.__name__ = callback.__name__
    return wrapper  # type: ignore[return-value]


class Thermometer:
    """One device's MQTT session. `run()` publishes until `request_stop()`, then shuts down cleanly."""

    def __init__(self, config: DeviceConfig, walk: TemperatureWalk | None = None,
                 buffer_size: int = BUFFER_SIZE, renewal: RenewalPolicy | None = None,
                 renew_request: Callable[[str], dict[str, Any]] | None = None) -> None:
        self.config = config
        self.walk = walk or TemperatureWalk(baseline_for(config.device_id))
        self.seq = 0
        self.pending: collections.deque[dict[str, Any]] = collections.deque(maxlen=buffer_size)
        self.dropped = 0
        self.connected = threading.Event()
        self._wake = threading.Event()  # set by on_connect: flush the buffer now
        self._stop_reason: str | None = None  # a plain attribute: set from a signal handler, no lock
        self._closing = threading.Event()
        self._lock = threading.Lock()  # guards client, _outstanding, _inflight (main, paho and renewal threads)
        self._outstanding = 0
        # QoS 1 messages handed to the current client and not acknowledged yet: mid -> reading (None for other
        # messages). If the client is replaced (renewal), its unacknowledged readings go back to the buffer.
        self._inflight: dict[int, dict[str, Any] | None] = {}
        self._acked_early: set[int] = set()  # PUBACKs that beat publish() returning its mid
        self._sending = threading.Event()  # cleared while the client is being replaced: readings stay buffered
        self._sending.set()
        self._send_lock = threading.Lock()  # held by flush() while it hands readings to the client
        self._failures = 0  # connection attempts since the last success, for the backoff
        self.revoked = False  # the broker refused the certificate as revoked: run() returns, never reconnects
        self.reply_handler: Callable[[bytes], None] | None = None  # CA replies on ssl/<id> (renewal)
        # Its `in_use` is the pair the current client was built from; it calls back when the files hold another.
        self.watcher = PairWatcher(config.identity.cert, config.identity.key, self._files_renewed,
                                   ca=config.identity.ca_cert, interval=config.watch_interval, name="cert-watch")
        self._switch_lock = threading.RLock()  # one client replacement at a time (renewer, watcher)
        self._refused_pair: Pair | None = None  # renewed files that failed check_identity (warned once)
        self.client = self._build_client()
        self.renewer = Renewer(self, renewal, request=renew_request) if renewal is not None else None

    def _build_client(self) -> mqtt.Client:
        self.watcher.in_use = self.watcher.files.read()  # read before the TLS context loads the files
        client = make_client(self.config.identity, self.config.device_id)
        client.will_set(self.config.status_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_DELAY, max_delay=RECONNECT_MAX_DELAY)  # type: ignore[arg-type]
        client.on_connect = _guarded(self._on_connect)
        client.on_connect_fail = _guarded(self._on_connect_fail)
        client.on_disconnect = _guarded(self._on_disconnect)
        client.on_publish = _guarded(self._on_publish)
        client.on_message = _guarded(self._on_message)
        return client

    @property
    def device_id(self) -> str:
        return self.config.device_id

    @property
    def identity(self) -> Identity:
        return self.config.identity

    # -- paho callbacks (paho's network thread) ---------------------------------------------------

    # Every callback first checks that `client` is still the current one: a client replaced during a renewal
    # may still report its disconnect or late acknowledgements, which concern nobody any more.

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if client is not self.client:
            return
        if reason.is_failure:  # the broker closes the connection next: on_disconnect schedules the retry
            log.warning("broker %s:%s refused %s: %s", self.config.broker_address, self.config.broker_port,
                        self.config.device_id, reason)
            return
        self._failures = 0
        self._publish(self.config.status_topic, "online", retain=True, client=client)
        self.connected.set()
        self._wake.set()
        log.info("%s connected to %s:%s; status online", self.config.device_id, self.config.broker_address,
                 self.config.broker_port)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # Called inside paho's `except OSError`: the exception says why (refused, TLS verify failed, ...).
        if client is not self.client:
            return
        error = sys.exc_info()[1]
        if self._refused_as_revoked(client):
            return
        delay = self._schedule_reconnect(client)
        log.warning("cannot connect to %s:%s: %s; retrying in %.1f s", self.config.broker_address,
                    self.config.broker_port, error or "connection failed", delay)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if client is not self.client:
            return
        self.connected.clear()
        if self._closing.is_set() or self._refused_as_revoked(client):
            return
        delay = self._schedule_reconnect(client)
        log.info("%s lost the broker (%s); reconnecting in %.1f s, readings are buffered meanwhile",
                 self.config.device_id, reason, delay)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            if client is not self.client:
                return
            self._outstanding -= 1
            if mid in self._inflight:
                del self._inflight[mid]
            else:
                self._acked_early.add(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        handler = self.reply_handler
        if client is self.client and handler is not None and message.topic == f"ssl/{self.config.device_id}":
            handler(bytes(message.payload))

    def _refused_as_revoked(self, client: mqtt.Client) -> bool:
        """After a lost or refused connection: is it the CA's revocation? Then stop instead of retrying."""
        if self.revoked:
            return True
        if certificate_revoked(self.config.identity, self.config.broker_address, self.config.broker_port) is not True:
            return False
        self.revoked = True
        # No retry before run() notices (within STOP_POLL) and shuts the client down.
        client.reconnect_delay_set(min_delay=RECONNECT_MAX_DELAY, max_delay=RECONNECT_MAX_DELAY)  # type: ignore[arg-type]
        self.request_stop("its certificate is revoked")
        return True

    def _schedule_reconnect(self, client: mqtt.Client) -> float:
        """Exponential backoff with jitter: the n-th retry waits a random time in [b/2, b], b = min(1 * 2^(n-1), 30).

        paho doubles its delay without jitter (so a fleet reconnects in lockstep); setting min = max
        resets its timer, and its next wait is exactly our delay. (Before the very first connection paho
        waits twice.)
        """
        self._failures += 1
        base = min(RECONNECT_MAX_DELAY, RECONNECT_MIN_DELAY * 2 ** (self._failures - 1))
        delay = random.uniform(base / 2, base)  # noqa: S311 - jitter, not security
        client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]
        return delay

    # -- publishing -----------------------------------------------------------------------------

    def _publish(self, topic: str, payload: str, *, retain: bool = False, reading: dict[str, Any] | None = None,
                 client: mqtt.Client | None = None) -> mqtt.MQTTMessageInfo:
        with self._lock:  # count first: the PUBACK (on_publish) may arrive before publish() returns
            client = client or self.client
            tracked = client is self.client
            if tracked:
                self._outstanding += 1
        # Never under self._lock: paho calls on_publish holding its own lock, which publish() also takes.
        info = client.publish(topic, payload, qos=1, retain=retain)
        with self._lock:
            if not tracked or client is not self.client:
                pass  # the client was replaced meanwhile: its counters were reset with it
            elif info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                self._outstanding -= 1
            elif info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
            else:
                self._inflight[info.mid] = reading
        return info

    @property
    def outstanding(self) -> int:
        with self._lock:
            return self._outstanding

    def take_reading(self, seconds: float) -> dict[str, Any]:
        """Advance the walk by `seconds` and queue the next reading (the oldest is dropped when full)."""
        self.seq += 1
        reading = make_reading(self.config.device_id, self.seq, self.walk.step(seconds))
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("buffer full (%d readings): dropped the oldest, %d so far", self.pending.maxlen,
                            self.dropped)
        self.pending.append(reading)
        return reading

    def flush(self) -> int:
        """Hand buffered readings to paho, oldest first, while connected and under MAX_IN_FLIGHT.

        A reading handed over while the link drops is kept by paho (QoS 1) and resent on reconnect,
        so it is never put back here (that would duplicate it).
        """
        sent = 0
        with self._send_lock:
            while (self.pending and self._sending.is_set() and self.connected.is_set()
                   and self.outstanding < MAX_IN_FLIGHT):
                reading = self.pending[0]
                info = self._publish(self.config.temperature_topic, json.dumps(reading), reading=reading)
                if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                    break
                self.pending.popleft()
                sent += 1
                log.debug("seq=%d temperature=%.2f -> %s", reading["seq"], reading["temperature"],
                          self.config.temperature_topic)
        return sent

    # -- what the renewer uses (lab/renewal.py; its own thread) ------------------------------------

    def wait_connected(self, timeout: float, stop: threading.Event) -> bool:
        deadline = time.monotonic() + timeout
        while not self.connected.wait(STOP_POLL):
            if time.monotonic() > deadline or stop.is_set() or self._stop_reason is not None:
                return False
        return True

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    def unsubscribe(self, topic: str) -> None:
        self.client.unsubscribe(topic)

    def publish_request(self, topic: str, payload: str) -> None:
        self._publish(topic, payload)

    def reconnect_with_files(self, drain_timeout: float, connect_timeout: float, stop: threading.Event,
                             which: str = "new") -> bool:
        """Replace the MQTT client by a new one that reads the certificate files again; True once it connected.

        paho cannot change the TLS identity of a client, so a renewed certificate needs a new client (same
        client id: it takes the broker session over). Readings keep going into the buffer meanwhile; the old
        client gets `drain_timeout` to have its QoS 1 messages acknowledged, and the readings it still had
        unacknowledged are put back in front of the buffer (sent again: at least once, never lost). It
        disconnects cleanly, so the broker does not publish its will (`offline`).
        """
        with self._switch_lock:
            return self._reconnect_with_files(drain_timeout, connect_timeout, stop, which)

    def _reconnect_with_files(self, drain_timeout: float, connect_timeout: float, stop: threading.Event,
                              which: str) -> bool:
        self._sending.clear()
        with self._send_lock:  # a flush in progress finishes; later ones hand nothing to the old client
            pass
        log.info("%s switches to its %s certificate after reading %d; readings wait in the buffer until the new "
                 "connection is up", self.config.device_id, which, self.seq)
        try:
            deadline = time.monotonic() + drain_timeout
            while self.outstanding > 0 and self.connected.is_set() and time.monotonic() < deadline:
                if stop.is_set() or self._stop_reason is not None:
                    break
                time.sleep(0.01)
            new = self._build_client()
            with self._lock:
                old, self.client = self.client, new
                unacked = [r for r in self._inflight.values() if r is not None]
                self._inflight.clear()
                self._acked_early.clear()
                self._outstanding = 0
                self._failures = 0
                self.connected.clear()
        finally:
            self._sending.set()
        self._requeue(unacked)
        old.disconnect()
        old.loop_stop()
        new.connect_async(self.config.broker_address, self.config.broker_port, keepalive=KEEPALIVE)
        new.loop_start()
        deadline = time.monotonic() + connect_timeout
        while not self.connected.wait(STOP_POLL):
            # SWITCH_ATTEMPTS refused connections in a row: the broker does not take the new pair (~3 s).
            if (time.monotonic() > deadline or self._failures >= SWITCH_ATTEMPTS or stop.is_set()
                    or self._stop_reason is not None):
                return False
        return True

    def _files_renewed(self, pair: Pair) -> bool:
        """The watcher's callback: the files hold another complete pair than the client's (the generator or the CA
        renewed them). Switch to it as a renewal does; True once the client is built from it."""
        if has_previous(self.config.identity):
            return False  # this device's own renewal is switching to the files, or rolling back (lab/renewal.py)
        with self._switch_lock:
            if self.watcher.files.read() == self.watcher.in_use:
                return True  # the renewer switched meanwhile
            try:
                check_identity(self.config)
            except DeviceConfigError as ex:
                if self._refused_pair != pair:
                    self._refused_pair = pair
                    log.warning("%s: the renewed certificate files are not usable (%s); staying on serial %s",
                                self.config.device_id, ex, self.watcher.in_use.serial if self.watcher.in_use else "?")
                return False
            was = self.watcher.in_use.serial if self.watcher.in_use else "?"
            log.info("%s: its certificate files were renewed (serial %s -> %s): switching to the new pair",
                     self.config.device_id, was, pair.serial)
            if not self._reconnect_with_files(DRAIN_TIMEOUT, CONNECT_TIMEOUT, self._closing, "renewed"):
                if self._stop_reason is None:
                    log.warning("%s: the broker has not accepted the renewed certificate (serial %s) yet; it keeps "
                                "trying", self.config.device_id, pair.serial)
            return True

    def _requeue(self, readings: list[dict[str, Any]]) -> None:
        """Put unacknowledged readings back in front of the buffer, oldest first (the oldest go if it is full)."""
        if not readings:
            return
        readings.sort(key=lambda r: r["seq"])
        maxlen = self.pending.maxlen or len(readings)
        room = max(0, maxlen - len(self.pending))
        if len(readings) > room:
            self.dropped += len(readings) - room
            readings = readings[len(readings) - room:]
        self.pending.extendleft(reversed(readings))
        log.info("%s: %d readings not acknowledged before the switch will be sent again", self.config.device_id,
                 len(readings))

    # -- the loop -------------------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        """Safe from a signal handler (takes no lock): `run()` notices within STOP_POLL, shuts down, returns."""
        self._stop_reason = reason

    def run(self) -> None:
        config = self.config
        log.info("%s starting: broker %s:%s, a reading every %g s", config.device_id, config.broker_address,
                 config.broker_port, config.interval)
        self.client.connect_async(config.broker_address, config.broker_port, keepalive=KEEPALIVE)
        self.client.loop_start()
        if self.renewer is not None:
            self.renewer.start()
        self.watcher.start()
        try:
            next_due = time.monotonic()
            last = next_due - config.interval
            while self._stop_reason is None:
                self._wake.clear()  # before flushing: a reconnect from here on wakes the wait below
                now = time.monotonic()
                if now >= next_due:
                    self.take_reading(now - last)
                    last = now
                    # Fixed rate, not fixed delay; after a stall (suspend) resume instead of bursting.
                    next_due = max(next_due + config.interval, now)
                backlog = len(self.pending)
                sent = self.flush()
                if sent > 1 and backlog > 1:
                    log.info("%s sent %d readings buffered while offline", config.device_id, sent)
                self._wait(next_due - time.monotonic())
            log.info("%s stopping (%s)", config.device_id, self._stop_reason)
        finally:
            self.shutdown()

    def _wait(self, seconds: float) -> None:
        """Sleep until the next reading, a reconnect (flush now) or a stop request."""
        deadline = time.monotonic() + seconds
        while self._stop_reason is None and not self._wake.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.wait(min(remaining, STOP_POLL))

    def shutdown(self) -> None:
        """Deliver what is in flight, publish retained `offline`, wait for the acks, then disconnect."""
        config = self.config
        self.watcher.stop()
        if self.renewer is not None:
            self.renewer.stop()
        if self.connected.is_set():
            self.flush()
            self._publish(config.status_topic, "offline", retain=True)  # after the readings, on the same link
            deadline = time.monotonic() + SHUTDOWN_ACK_TIMEOUT
            while self.outstanding > 0 and self.connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            if self.outstanding <= 0:
                log.info("%s status offline acknowledged", config.device_id)
            else:
                log.warning("%s: the broker did not acknowledge status offline (and %d more); its last will "
                            "says offline instead", config.device_id, self.outstanding - 1)
        if self.pending:
            log.warning("%s stopping while disconnected: %d buffered readings are lost", config.device_id,
                        len(self.pending))
        self._closing.set()
        self.client.disconnect()
        self.client.loop_stop()
        log.info("%s stopped after %d readings", config.device_id, self.seq)


# -- the command line ---------------------------------------------------------------------------


def est_renewal(config: DeviceConfig, environ: Mapping[str, str]) -> Callable[[str], dict[str, Any]] | None:
    """With ENROL=est the renewer asks the CA by EST simplereenroll instead of MQTT; None: over MQTT."""
    try:
        if est.enrol_mode(environ) != "est":
            return None
        return est.renewal_request(est.est_url(environ, Settings.from_env(environ)), config.identity)
    except (ValueError, ConfigError) as ex:
        raise DeviceConfigError(str(ex)) from None


def _configure_logging(verbose: bool, environ: Mapping[str, str]) -> None:
    level_name = "DEBUG" if verbose else (environ.get("LOG_LEVEL") or "INFO").strip().upper()
    level = logging.getLevelName(level_name)
    logging.basicConfig(level=level if isinstance(level, int) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)


def revoked_line(config: DeviceConfig, serial: str, waiting: bool) -> str:
    """The one line a revoked thermometer logs: what happened and the next step (the same as ./setup.sh status)."""
    then = (f"waiting for a new certificate in {config.identity.cert}" if waiting
            else f"exiting with code {EXIT_REVOKED}, not to be restarted")
    return (f"{config.device_id}: the CA revoked its certificate (serial {serial}, {config.identity.cert}); it will "
            f"not connect with it again. Next step: {revoked_next_step(config.device_id)}. Now {then}.")


def wait_for_new_certificate(config: DeviceConfig, revoked: bytes, stopped: Callable[[], bool]) -> bool:
    """ON_REVOKED=wait: True once the certificate file holds another certificate that passes check_identity."""
    while not stopped():
        deadline = time.monotonic() + NEW_CERTIFICATE_POLL
        while time.monotonic() < deadline:
            if stopped():
                return False
            time.sleep(STOP_POLL)
        try:
            if config.identity.cert.read_bytes() == revoked:
                continue
            check_identity(config)
        except (OSError, DeviceConfigError) as ex:
            log.debug("no usable new certificate yet: %s", ex)
            continue
        log.info("%s found a new certificate in %s: connecting with it", config.device_id, config.identity.cert)
        return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 stopped by SIGTERM/SIGINT, 1 the CA could not be reached to enrol, 2 configuration or
    certificate problem, or the CA refused the enrolment token, 3 the CA revoked the certificate (EXIT_REVOKED)."""
    args = build_parser().parse_args(argv)
    environ = lab_environ()
    _configure_logging(args.verbose, environ)
    if args.enrol:
        environ = {**environ, "ENROL": args.enrol}
    try:
        environ = with_claimed_token(environ)
        config = load_config(args, environ)
        renew_request = est_renewal(config, environ)
        recover(config.identity)
        enrol_if_needed(config.device_id, config.identity, environ)
        check_identity(config)
    except (DeviceConfigError, EnrolmentRefused) as ex:
        print(f"error: {ex}", file=sys.stderr)
        return EXIT_CONFIG
    except EnrolmentError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    on_revoked = (environ.get("ON_REVOKED") or "exit").strip().lower()
    if on_revoked not in ON_REVOKED:
        print(f"error: ON_REVOKED={on_revoked!r} must be one of {', '.join(ON_REVOKED)}", file=sys.stderr)
        return EXIT_CONFIG
    renewal = None
    if config.renew_check_interval > 0:
        renewal = RenewalPolicy.for_device(config.renew_before_days, config.renew_check_interval)
    # Plain values, set from the signal handler (which must not take locks).
    stop: list[str] = []
    current: list[Thermometer] = []

    def request_stop(signum: int, _frame: Any) -> None:
        stop.append(signal.Signals(signum).name)
        if current:
            current[-1].request_stop(stop[0])

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    while True:
        try:
            thermometer = Thermometer(config, renewal=renewal, renew_request=renew_request)
        except (OSError, ValueError) as ex:  # ssl could still refuse the files (e.g. an unsupported key)
            print(f"error: cannot use {config.identity.cert} / {config.identity.key}: {ex}", file=sys.stderr)
            return EXIT_CONFIG
        current.append(thermometer)
        if stop:
            thermometer.request_stop(stop[0])
        thermometer.run()
        if not thermometer.revoked:
            return EXIT_OK
        try:
            revoked = config.identity.cert.read_bytes()
            serial = format(load_certificate(revoked).serial_number, "x")
        except (OSError, CAError):
            revoked, serial = b"", "?"
        log.error(revoked_line(config, serial, on_revoked == "wait"))
        if on_revoked != "wait" or not wait_for_new_certificate(config, revoked, lambda: bool(stop)):
            return EXIT_REVOKED

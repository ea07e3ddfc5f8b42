"""One device's MQTT session: mutual TLS, reconnects with jittered backoff, and a certificate switch without loss.

The thermometer (`lab/publisher.py`) owns the readings: it puts them in its bounded buffer (`lab/buffer.py`),
lends the session that buffer and tells it how many readings it took. The session hands the buffered readings
to paho, QoS 1, while the broker is reachable (`flush`); what is unacknowledged is tracked in `lab/inflight.py`.
A connection lost or refused is checked for revocation (`lab.mqtt.certificate_revoked`): then `revoked` is set
and the session asks to stop. The renewer (`lab/renewal.py`, given this session) and the file watcher
(`lab/rotation.py`) switch clients without losing a reading. `start()` connects, `close()` delivers what is
in flight, says `offline` and disconnects.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as mqtt

from .buffer import ReadingBuffer
from .credentials import has_previous
from .device_config import DeviceConfig, DeviceConfigError, check_identity
from .inflight import InFlight
from .mqtt import Identity, certificate_revoked, make_client
from .renewal import CONNECT_TIMEOUT, DRAIN_TIMEOUT
from .rotation import Pair, PairWatcher

log = logging.getLogger("thermometer")

MAX_IN_FLIGHT = 100  # messages handed to paho and not yet acknowledged; the rest wait in the buffer
RECONNECT_MIN_DELAY = 1.0
RECONNECT_MAX_DELAY = 30.0
KEEPALIVE = 30
SWITCH_ATTEMPTS = 3  # failed connections with a renewed certificate before it is rolled back
STOP_POLL = 0.1  # how quickly a stop request is noticed (a signal handler must not touch locks)
SHUTDOWN_ACK_TIMEOUT = 5.0  # how long close() waits for the broker to acknowledge the last messages

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


class DeviceSession:
    """One device's MQTT session. It sends the readings of `buffer` (its owner fills it); `readings_taken`
    says how many readings the owner has taken so far (for the log)."""

    def __init__(self, config: DeviceConfig, buffer: ReadingBuffer, readings_taken: Callable[[], int]) -> None:
        self.config = config
        self.buffer = buffer
        self._readings_taken = readings_taken
        self.connected = threading.Event()
        self._wake = threading.Event()  # set by on_connect, cleared by flush(): wakes sleep() to flush now
        self._stop_reason: str | None = None  # a plain attribute: set from a signal handler, no lock
        self._closing = threading.Event()
        self._sending = threading.Event()  # cleared while the client is being replaced: readings stay buffered
        self._sending.set()
        self._send_lock = threading.Lock()  # held by flush() while it hands readings to the client
        self._failures = 0  # connection attempts since the last success, for the backoff
        self.revoked = False  # the broker refused the certificate as revoked: stop requested, never reconnects
        self.reply_handler: Callable[[bytes], None] | None = None  # CA replies on ssl/<id> (renewal)
        # Its `in_use` is the pair the current client was built from; it calls back when the files hold another.
        self.watcher = PairWatcher(
            config.identity.cert,
            config.identity.key,
            self._files_renewed,
            ca=config.identity.ca_cert,
            interval=config.watch_interval,
            name="cert-watch",
        )
        self._switch_lock = threading.RLock()  # one client replacement at a time (renewer, watcher)
        self._refused_pair: Pair | None = None  # renewed files that failed check_identity (warned once)
        # The current client and its unacknowledged QoS 1 messages: those go back to the buffer if it is replaced.
        self.inflight = InFlight(self._build_client())

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
    def client(self) -> mqtt.Client:
        return self.inflight.client

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
            log.warning(
                "broker %s:%s refused %s: %s",
                self.config.broker_address,
                self.config.broker_port,
                self.config.device_id,
                reason,
            )
            return
        self._failures = 0
        self.inflight.publish(self.config.status_topic, "online", retain=True, client=client)
        self.connected.set()
        self._wake.set()
        log.info(
            "%s connected to %s:%s; status online",
            self.config.device_id,
            self.config.broker_address,
            self.config.broker_port,
        )

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # Called inside paho's `except OSError`: the exception says why (refused, TLS verify failed, ...).
        if client is not self.client:
            return
        error = sys.exc_info()[1]
        if self._refused_as_revoked(client):
            return
        delay = self._schedule_reconnect(client)
        log.warning(
            "cannot connect to %s:%s: %s; retrying in %.1f s",
            self.config.broker_address,
            self.config.broker_port,
            error or "connection failed",
            delay,
        )

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if client is not self.client:
            return
        self.connected.clear()
        if self._closing.is_set() or self._refused_as_revoked(client):
            return
        delay = self._schedule_reconnect(client)
        log.info(
            "%s lost the broker (%s); reconnecting in %.1f s, readings are buffered meanwhile",
            self.config.device_id,
            reason,
            delay,
        )

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self.inflight.acknowledged(client, mid)

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
        # No retry before the owner's loop (Thermometer.run) notices (within STOP_POLL) and closes the session.
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

    # -- lifecycle and publishing (the owner's thread) -----------------------------------------------

    def start(self) -> None:
        """Connect in the background (paho's network thread) and start watching the certificate files."""
        self.client.connect_async(self.config.broker_address, self.config.broker_port, keepalive=KEEPALIVE)
        self.client.loop_start()
        self.watcher.start()

    @property
    def stop_reason(self) -> str | None:
        """Why a stop was requested (`request_stop`; a revoked certificate), None while the session should run."""
        return self._stop_reason

    def request_stop(self, reason: str = "stop requested") -> None:
        """Safe from a signal handler (takes no lock): the owner's loop (`Thermometer.run()`) notices within
        STOP_POLL and closes the session."""
        self._stop_reason = reason

    def sleep(self, seconds: float) -> None:
        """Wait `seconds`, less if a connection came up since the last flush() (flush now) or a stop is requested."""
        deadline = time.monotonic() + seconds
        while self._stop_reason is None and not self._wake.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.wait(min(remaining, STOP_POLL))

    @property
    def outstanding(self) -> int:
        return self.inflight.outstanding

    def flush(self) -> int:
        """Hand buffered readings to paho, oldest first, while connected and under MAX_IN_FLIGHT.

        A reading handed over while the link drops is kept by paho (QoS 1) and resent on reconnect,
        so it is never put back here (that would duplicate it).
        """
        self._wake.clear()  # before flushing: a connection that comes up from here on wakes sleep()
        readings, sent = self.buffer.readings, 0
        with self._send_lock:
            while readings and self._sending.is_set() and self.connected.is_set() and self.outstanding < MAX_IN_FLIGHT:
                reading = readings[0]
                info = self.inflight.publish(self.config.temperature_topic, json.dumps(reading), reading=reading)
                if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                    break
                readings.popleft()
                sent += 1
                log.debug(
                    "seq=%d temperature=%.2f -> %s",
                    reading["seq"],
                    reading["temperature"],
                    self.config.temperature_topic,
                )
        return sent

    def stop_following(self) -> None:
        """No more switches to renewed files from here on (the first step of a shutdown; idempotent)."""
        self.watcher.stop()

    def close(self) -> None:
        """Deliver what is in flight, publish retained `offline`, wait for the acks, then disconnect."""
        config = self.config
        self.stop_following()
        if self.connected.is_set():
            self.flush()
            self.inflight.publish(config.status_topic, "offline", retain=True)  # after the readings, on the same link
            deadline = time.monotonic() + SHUTDOWN_ACK_TIMEOUT
            while self.outstanding > 0 and self.connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            if self.outstanding <= 0:
                log.info("%s status offline acknowledged", config.device_id)
            else:
                log.warning(
                    "%s: the broker did not acknowledge status offline (and %d more); its last will "
                    "says offline instead",
                    config.device_id,
                    self.outstanding - 1,
                )
        if unsent := len(self.buffer.readings):
            log.warning("%s stopping while disconnected: %d buffered readings are lost", config.device_id, unsent)
        self._closing.set()
        self.client.disconnect()
        self.client.loop_stop()

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
        self.inflight.publish(topic, payload)

    def reconnect_with_files(
        self, drain_timeout: float, connect_timeout: float, stop: threading.Event, which: str = "new"
    ) -> bool:
        """Replace the MQTT client by a new one that reads the certificate files again; True once it connected.

        paho cannot change the TLS identity of a client, so a renewed certificate needs a new client (same
        client id: it takes the broker session over). Readings keep going into the buffer meanwhile; the old
        client gets `drain_timeout` to have its QoS 1 messages acknowledged, and the readings it still had
        unacknowledged are put back in front of the buffer (sent again: at least once, never lost). It
        disconnects cleanly, so the broker does not publish its will (`offline`).
        """
        with self._switch_lock:
            return self._reconnect_with_files(drain_timeout, connect_timeout, stop, which)

    def _reconnect_with_files(
        self, drain_timeout: float, connect_timeout: float, stop: threading.Event, which: str
    ) -> bool:
        self._sending.clear()
        with self._send_lock:  # a flush in progress finishes; later ones hand nothing to the old client
            pass
        log.info(
            "%s switches to its %s certificate after reading %d; readings wait in the buffer until the new "
            "connection is up",
            self.config.device_id,
            which,
            self._readings_taken(),
        )
        try:
            deadline = time.monotonic() + drain_timeout
            while self.outstanding > 0 and self.connected.is_set() and time.monotonic() < deadline:
                if stop.is_set() or self._stop_reason is not None:
                    break
                time.sleep(0.01)
            new = self._build_client()
            old, unacked = self.inflight.replace(new)
            # After the swap: the old client's callbacks are ignored from now on, the new one is not started yet.
            self._failures = 0
            self.connected.clear()
        finally:
            self._sending.set()
        if unacked:
            log.info(
                "%s: %d readings not acknowledged before the switch will be sent again",
                self.config.device_id,
                self.buffer.requeue(unacked),
            )
        old.disconnect()
        old.loop_stop()
        new.connect_async(self.config.broker_address, self.config.broker_port, keepalive=KEEPALIVE)
        new.loop_start()
        deadline = time.monotonic() + connect_timeout
        while not self.connected.wait(STOP_POLL):
            # SWITCH_ATTEMPTS refused connections in a row: the broker does not take the new pair (~3 s).
            if (
                time.monotonic() > deadline
                or self._failures >= SWITCH_ATTEMPTS
                or stop.is_set()
                or self._stop_reason is not None
            ):
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
                    log.warning(
                        "%s: the renewed certificate files are not usable (%s); staying on serial %s",
                        self.config.device_id,
                        ex,
                        self.watcher.in_use.serial if self.watcher.in_use else "?",
                    )
                return False
            was = self.watcher.in_use.serial if self.watcher.in_use else "?"
            log.info(
                "%s: its certificate files were renewed (serial %s -> %s): switching to the new pair",
                self.config.device_id,
                was,
                pair.serial,
            )
            if not self._reconnect_with_files(DRAIN_TIMEOUT, CONNECT_TIMEOUT, self._closing, "renewed"):
                if self._stop_reason is None:
                    log.warning(
                        "%s: the broker has not accepted the renewed certificate (serial %s) yet; it keeps trying",
                        self.config.device_id,
                        pair.serial,
                    )
            return True

"""The thermometer renews its own certificate over MQTT, with the current certificate as the credential.

When: at start and then every RENEW_CHECK_INTERVAL seconds (default 3600) the device looks at its certificate.
It is due once it is inside RENEW_BEFORE_DAYS of expiry or past two thirds of its lifetime, whichever comes
first, moved earlier by a per-device random share of up to 5 % of the lifetime so that a fleet issued on one
day does not renew in the same minute. A certificate is never due before half its lifetime: one shorter than
twice the window (say 10 days against the 30-day window) would otherwise be renewed again and again, since a
renewal keeps the lifetime.

How: a new EC P-256 key made here, a CSR with CN = device id published at QoS 1 to `ssl/renew/<id>` (the
broker lets only this certificate write there), the reply read on `ssl/<id>`. The new certificate is checked
against the device's CA file and the new key, stored atomically with the previous pair kept as `.previous`,
and a new MQTT client takes over with it (paho cannot change a client's TLS identity; the same client id takes
the session over). Readings wait in the thermometer's buffer meanwhile, and what the old client had in flight
unacknowledged is sent again, so no reading is lost. If the new pair does not connect, the previous pair is
put back and the renewal is tried again later; a failed request is retried with a jittered backoff. The old
certificate keeps working until it expires, so a CA that is down for a while costs nothing.

Nothing here logs a key: serials and dates only.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509

from pki.authority import (
    CAError,
    cert_pem,
    key_pem,
    load_certificate,
    public_key_matches,
    serial_hex,
    utcnow,
)
from pki.store import read_optional

from .credentials import (
    CredentialError,
    check_issued,
    discard_previous,
    has_previous,
    lab_lock,
    load_roots,
    new_key_and_csr,
    not_writable,
    restore_previous,
    store,
)
from .mqtt import Identity

log = logging.getLogger("thermometer")

RENEW_CHECK_INTERVAL = 3600.0
JITTER_FRACTION = 0.05  # renewal moves earlier by up to this share of the lifetime, per device
START_SPREAD = 30.0  # the first check waits a random 0..min(this, interval) seconds: fleets start together
REPLY_TIMEOUT = 30.0  # seconds for the CA's reply
DRAIN_TIMEOUT = 10.0  # seconds the old client gets to have its QoS 1 messages acknowledged
CONNECT_TIMEOUT = 20.0  # seconds the new pair gets to connect before it is rolled back
RETRY_MIN = 30.0  # first retry after a failure; doubles up to the check interval


class RenewalError(Exception):
    """One renewal attempt failed; the message is one line and says why."""


class RenewingDevice(Protocol):
    """What the renewer needs from the device's MQTT session (lab.session.DeviceSession)."""

    @property
    def device_id(self) -> str: ...

    @property
    def identity(self) -> Identity: ...

    reply_handler: Callable[[bytes], None] | None

    def wait_connected(self, timeout: float, stop: threading.Event) -> bool: ...

    def subscribe(self, topic: str) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...

    def publish_request(self, topic: str, payload: str) -> None: ...

    def reconnect_with_files(
        self, drain_timeout: float, connect_timeout: float, stop: threading.Event, which: str = "new"
    ) -> bool: ...


@dataclass(frozen=True)
class RenewalPolicy:
    renew_before_days: float = 30.0
    check_interval: float = RENEW_CHECK_INTERVAL
    jitter: float = 0.0  # share of the lifetime by which this device renews earlier, 0..JITTER_FRACTION

    @classmethod
    def for_device(
        cls, renew_before_days: float, check_interval: float, rng: random.Random | None = None
    ) -> RenewalPolicy:
        jitter = (rng or random.Random()).uniform(0, JITTER_FRACTION)  # noqa: S311 - spreading, not security
        return cls(renew_before_days, check_interval, jitter)

    def due_at(self, cert: x509.Certificate) -> dt.datetime:
        """When `cert` should be renewed (see the module docstring)."""
        born, dies = cert.not_valid_before_utc, cert.not_valid_after_utc
        life = dies - born
        due = min(dies - dt.timedelta(days=self.renew_before_days), born + life * 2 / 3)
        due = max(due, born + life / 2)
        return due - life * self.jitter


def retry_delay(failures: int, cap: float, rng: random.Random) -> float:
    """RETRY_MIN, doubling per failure, at most `cap` (the check interval); a random point in [d/2, d]."""
    base = min(cap, RETRY_MIN * 2 ** (failures - 1))
    return rng.uniform(base / 2, base)


@dataclass(frozen=True)
class RenewalTimeouts:
    """How long one renewal waits for the CA's reply, for the old client's acks, and for the new connection."""

    reply: float = REPLY_TIMEOUT
    drain: float = DRAIN_TIMEOUT
    connect: float = CONNECT_TIMEOUT


DEFAULT_TIMEOUTS = RenewalTimeouts()


class Renewer:
    """A background thread that keeps the device's certificate renewed (`start`, `stop`)."""

    def __init__(
        self,
        device: RenewingDevice,
        policy: RenewalPolicy,
        *,
        rng: random.Random | None = None,
        timeouts: RenewalTimeouts = DEFAULT_TIMEOUTS,
        request: Callable[[str], dict[str, Any]] | None = None,
    ) -> None:
        self.device = device
        # How the CSR reaches the CA: over MQTT (`ssl/renew/<id>`) unless another transport is given (EST,
        # lab/est.py); either returns the CA's answer with the certificate in "crt", or raises RenewalError.
        self.request = request
        self.policy = policy
        self.rng = rng or random.Random()  # noqa: S311 - spreading, not security
        self.reply_timeout = timeouts.reply
        self.drain_timeout = timeouts.drain
        self.connect_timeout = timeouts.connect
        self.renewals = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="renewal", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        try:
            self._confirm_previous()
            self._announce()
        except Exception:  # the loop below must run whatever happened
            log.exception("certificate renewal: start-up check failed")
        delay = self.rng.uniform(0, min(self.policy.check_interval, START_SPREAD))
        failures = 0
        while not self._stop.wait(delay):
            try:
                self.check_once()
            except RenewalError as ex:
                failures += 1
                delay = retry_delay(failures, self.policy.check_interval, self.rng)
                log.warning(
                    "certificate renewal failed (attempt %d): %s; retrying in %.3g s, the current "
                    "certificate stays in use meanwhile",
                    failures,
                    ex,
                    delay,
                )
                continue
            except Exception:
                failures += 1
                delay = retry_delay(failures, self.policy.check_interval, self.rng)
                log.exception(
                    "certificate renewal failed unexpectedly (attempt %d); retrying in %.3g s", failures, delay
                )
                continue
            failures = 0
            delay = self.policy.check_interval

    # -- the decision ----------------------------------------------------------------------------

    def current_certificate(self) -> x509.Certificate:
        data = read_optional(self.device.identity.cert)
        if data is None:
            raise RenewalError(f"certificate {self.device.identity.cert} is missing")
        try:
            return load_certificate(data)
        except CAError:
            raise RenewalError(f"certificate {self.device.identity.cert} is not readable") from None

    def _announce(self) -> None:
        cert = self.current_certificate()
        log.info(
            "certificate serial %s valid until %s; renewal from %s (checked every %g s)",
            serial_hex(cert),
            cert.not_valid_after_utc.isoformat(timespec="seconds"),
            self.policy.due_at(cert).isoformat(timespec="seconds"),
            self.policy.check_interval,
        )

    def check_once(self) -> bool:
        """Renew when due; True when it did. Raises RenewalError when a due renewal failed."""
        cert = self.current_certificate()
        if utcnow() < self.policy.due_at(cert):
            return False
        problem = not_writable(self.device.identity)
        if problem:
            if self._warned != problem:  # once per problem, not every hour
                self._warned = problem
                log.warning(
                    "certificate renewal is due but %s, so the new pair could not be stored; the "
                    "certificate expires on %s (give the device a writable folder, or renew it with "
                    "./setup.sh certs)",
                    problem,
                    cert.not_valid_after_utc.isoformat(timespec="seconds"),
                )
            return False
        if not self.device.wait_connected(self.reply_timeout, self._stop):
            raise RenewalError("not connected to the broker")
        self.renew(cert)
        return True

    # -- the renewal -------------------------------------------------------------------------------

    def renew(self, old: x509.Certificate) -> x509.Certificate:
        started = time.monotonic()
        device_id, identity = self.device.device_id, self.device.identity
        key, csr = new_key_and_csr(device_id)
        reply = self.request(csr) if self.request is not None else self._request(csr, key)
        try:
            new = check_issued(reply, key, load_roots(identity.ca_cert), device_id)
            with lab_lock(identity):
                store(identity, cert_pem(new), key_pem(key), keep_previous=True)
        except (CredentialError, OSError) as ex:
            raise RenewalError(str(ex)) from None
        round_trip = time.monotonic() - started
        if not self._switch("new"):
            if self._stop.is_set():  # stopping: the next start confirms or rolls back (.previous is kept)
                return new
            restore_previous(identity)
            self._switch("previous")
            raise RenewalError(
                f"the broker did not accept the new certificate (serial {serial_hex(new)}); back on "
                f"serial {serial_hex(old)}"
            )
        discard_previous(identity)
        self.renewals += 1
        log.info(
            "renewed the certificate: serial %s -> %s, valid until %s (request %.2f s, reconnected in %.2f s)",
            serial_hex(old),
            serial_hex(new),
            new.not_valid_after_utc.isoformat(timespec="seconds"),
            round_trip,
            time.monotonic() - started - round_trip,
        )
        return new

    def _switch(self, which: str) -> bool:
        try:
            return self.device.reconnect_with_files(self.drain_timeout, self.connect_timeout, self._stop, which)
        except (OSError, ValueError) as ex:  # the TLS library refused the files
            log.warning("cannot use the certificate files: %s", ex)
            return False

    def _request(self, csr: str, key: object) -> dict:
        """Publish the CSR to ssl/renew/<id>; the CA's answer on ssl/<id> (an error reply raises)."""
        device_id = self.device.device_id
        reply_topic = f"ssl/{device_id}"
        replies: queue.Queue[bytes] = queue.Queue()
        self.device.reply_handler = replies.put
        try:
            # Subscribe first: on one connection the broker handles the SUBSCRIBE before the PUBLISH.
            self.device.subscribe(reply_topic)
            self.device.publish_request(f"ssl/renew/{device_id}", json.dumps({"csr": csr}))
            deadline = time.monotonic() + self.reply_timeout
            while (remaining := deadline - time.monotonic()) > 0 and not self._stop.is_set():
                try:
                    payload = replies.get(timeout=min(remaining, 0.1))
                except queue.Empty:
                    continue
                try:
                    body = json.loads(payload)
                except ValueError:
                    continue
                if not isinstance(body, dict):
                    continue
                if "error" in body:
                    raise RenewalError(f"the CA refused the renewal: {body['error']}")
                if self._for_key(body, key):
                    return body
                # another answer on our topic (an older request's): keep waiting for ours
            raise RenewalError(
                f"no reply on {reply_topic} within {self.reply_timeout:g} s (is the dashboard, "
                "the CA's MQTT endpoint, running?)"
            )
        finally:
            self.device.reply_handler = None
            self.device.unsubscribe(reply_topic)

    @staticmethod
    def _for_key(body: dict, key: object) -> bool:
        pem = body.get("crt")
        if not isinstance(pem, str):
            return False
        try:
            return public_key_matches(load_certificate(pem.encode()), key)  # type: ignore[arg-type]
        except CAError:
            return False

    def _confirm_previous(self) -> None:
        """A `.previous` pair at start: the last renewal never confirmed its new pair. Confirm it now, or roll back."""
        identity = self.device.identity
        if not has_previous(identity):
            return
        if self.device.wait_connected(self.connect_timeout, self._stop):
            discard_previous(identity)
            log.info("the certificate from the last renewal connected; the previous pair is removed")
        elif not self._stop.is_set():
            restore_previous(identity)
            log.warning("the certificate from the last renewal did not connect; back on the previous pair")
            self._switch("previous")

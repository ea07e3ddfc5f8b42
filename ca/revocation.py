"""Revocation takes the live connection: after the CA revoked an identity, close its open MQTT sessions.

Mosquitto 2.0.11 does not drop a connection when the ACL or the CRL changes. Its dynamic-security plugin
(loaded by mosquitto.conf, defining no clients) can: the CA, over its own MQTT connection (ca/mqtt.py), sends
the plugin `disconnect_command(name)` on `$CONTROL/dynamic-security/v1` (only the CA identities may write it).
The CRL was reloaded before (natively the CA signals the broker; in Docker the broker container polls
certs/ every second), so the device's reconnect is refused in the TLS handshake ("certificate revoked"),
which the thermometer recognises (lab/device.py, exit code 3).

The device's retained presence is corrected to `offline` by the CA: once revoked, the device's own `offline`
and its last will are denied by the ACL, so the retained `online` would otherwise stay forever. The dashboard
sees that presence, and the revoked status in the inventory it reads (it no longer shares a process with the CA).

In Docker the reload can lag the revocation by the broker container's poll (about a second): a device that
reconnected in that gap is disconnected again by the later rounds (ENFORCE_AGAIN_AFTER), each one only while
the name's newest certificate is still the revoked one (a new certificate for the name is never kicked).
"""

from __future__ import annotations

import logging
import threading

from pki.broker import DYNSEC_TOPIC, disconnect_command
from pki.inventory import REVOKED
from pki.service import CAService

from .mqtt import CAConnection

log = logging.getLogger(__name__)

# Seconds after the revocation at which the disconnect and the presence correction are repeated: the first
# comes after the Docker broker's reload (its poll is 1 s), so a device back in that gap is out for good by 2 s.
ENFORCE_AGAIN_AFTER = (1.5, 3.0, 6.0)


def presence_topic(name: str) -> str:
    return f"iot/thermometer/{name}/status"


class RevocationEnforcer:
    def __init__(self, service: CAService, connection: CAConnection) -> None:
        self.service = service
        self.connection = connection
        self._timers: set[threading.Timer] = set()
        self._lock = threading.Lock()
        self._closed = False

    def revoked(self, name: str) -> None:
        """The CA revoked `name` (its files are written and the broker signalled): cut it off now."""
        self.enforce(name)
        with self._lock:
            if self._closed:
                return
            for delay in ENFORCE_AGAIN_AFTER:
                timer = threading.Timer(delay, self._again, args=(name,))
                timer.daemon = True
                self._timers.add(timer)
                timer.start()

    def close(self) -> None:
        """Cancel the repeated rounds still due (the app is shutting down)."""
        with self._lock:
            self._closed = True
            timers, self._timers = self._timers, set()
        for timer in timers:
            timer.cancel()

    def _again(self, name: str) -> None:
        with self._lock:
            self._timers = {t for t in self._timers if t.is_alive() and t is not threading.current_thread()}
            if self._closed:
                return
        try:
            self.enforce(name, again=True)
        except Exception:  # a timer thread: log, never raise
            log.exception("could not repeat the disconnect of revoked %s", name)

    def enforce(self, name: str, again: bool = False) -> None:
        if again:
            latest = self.service.inventory.latest(name)
            if latest is None or latest.status != REVOKED:
                return  # reissued meanwhile: the new certificate's session is not ours to close
        if self.connection.publish(DYNSEC_TOPIC, disconnect_command(name), qos=1) is None:
            log.warning(
                "revoked %s, but MQTT is not connected: its open connection stays until it reconnects "
                "(then the broker refuses it)",
                name,
            )
            return
        self.connection.publish(presence_topic(name), "offline", qos=1, retain=True)
        if not again:
            log.info("asked the broker to disconnect %s and set its presence to offline", name)

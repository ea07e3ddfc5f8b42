"""The QoS 1 messages a device has handed to its current paho client and not seen acknowledged yet.

The device's MQTT session (`lab/session.py`) replaces its client when its certificate is renewed (paho cannot
change a client's TLS identity). This ledger is what makes that lossless: it knows which readings the old client
still had unacknowledged, so they go back to the buffer (sent again: at least once, never lost), and it ignores
the late acknowledgements of a client that is no longer the current one.
"""

from __future__ import annotations

import threading
from typing import Any

import paho.mqtt.client as mqtt


class InFlight:
    """The current client and its unacknowledged messages: mid -> reading (None for other messages).

    One lock guards both, because the main, paho and renewal threads read and replace them.
    """

    def __init__(self, client: mqtt.Client) -> None:
        self.lock = threading.Lock()
        self.client = client
        self._outstanding = 0
        self._messages: dict[int, dict[str, Any] | None] = {}
        self._acked_early: set[int] = set()  # PUBACKs that beat publish() returning its mid

    @property
    def outstanding(self) -> int:
        with self.lock:
            return self._outstanding

    def publish(
        self,
        topic: str,
        payload: str,
        *,
        retain: bool = False,
        reading: dict[str, Any] | None = None,
        client: mqtt.Client | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """QoS 1 through `client` (the current one by default); counted only if it is the current one."""
        with self.lock:  # count first: the PUBACK (on_publish) may arrive before publish() returns
            client = client or self.client
            tracked = client is self.client
            if tracked:
                self._outstanding += 1
        # Never under self.lock: paho calls on_publish holding its own lock, which publish() also takes.
        info = client.publish(topic, payload, qos=1, retain=retain)
        with self.lock:
            if not tracked or client is not self.client:
                pass  # the client was replaced meanwhile: its counters were reset with it
            elif info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                self._outstanding -= 1
            elif info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
            else:
                self._messages[info.mid] = reading
        return info

    def acknowledged(self, client: mqtt.Client, mid: int) -> None:
        """paho's on_publish: the broker acknowledged `mid` (ignored if `client` was replaced)."""
        with self.lock:
            if client is not self.client:
                return
            self._outstanding -= 1
            if mid in self._messages:
                del self._messages[mid]
            else:
                self._acked_early.add(mid)

    def replace(self, new: mqtt.Client) -> tuple[mqtt.Client, list[dict[str, Any]]]:
        """Make `new` the current client; the old one, and the readings it had not seen acknowledged."""
        with self.lock:
            old, self.client = self.client, new
            unacked = [r for r in self._messages.values() if r is not None]
            self._messages.clear()
            self._acked_early.clear()
            self._outstanding = 0
        return old, unacked

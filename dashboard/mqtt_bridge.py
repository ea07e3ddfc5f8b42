"""The dashboard's MQTT connection (dashboard certificate, MQTT v5, a persistent session), shared by every
feature but the telemetry ingest (dashboard/ingest.py has a connection and identity of its own).

Features register handlers for topic filters; subscriptions are (re)made in on_connect so a reconnect
restores them. Handlers run on paho's network thread: they must be quick (hand heavy work to a pool) and
exceptions are caught and logged so they never stop the network loop. Stock paho, public API only.

Only one connection per certificate can exist (the broker forces client id = CN), so everything that
speaks MQTT as `dashboard` goes through this object.
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
from lab.rotation import PairWatcher, follow_renewals
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


# The dashboard's session outlives its connection by this long (MQTT v5 Session Expiry Interval, seconds): while
# it is away the broker keeps its subscriptions (presence, the CA's topics) and queues what matches them.
SESSION_EXPIRY = 3600


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
            sub = Subscription(
                topic_filter,
                qos,
                handler,
                identifier=len(self._subscriptions) + 1,
                retain_as_published=retain_as_published,
            )
            self._subscriptions = (*self._subscriptions, sub)
        if self.client is not None and self.connected.is_set():
            sub.subscribe_on(self.client)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        # Watching from before the client reads the files: a renewal in between is seen on the first look.
        self._watcher = follow_renewals(
            self.identity, self.settings.cert_watch_seconds, self.reconnect_with_files, f"MQTT {self.name}"
        )
        self.client = self._new_client()
        self._connect(self.client)

    def _new_client(self) -> mqtt.Client:
        client = make_client(self.identity, self.name, protocol=mqtt.MQTTv5)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        # Jittered backoff between 1 and 30 s (paho's own doubling has no jitter).
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        return client

    def _connect(self, client: mqtt.Client) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY
        client.connect_async(
            self.settings.broker_address,
            self.settings.broker_port,
            keepalive=30,
            clean_start=False,
            properties=properties,
        )
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
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
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
            if (
                (sub.identifier in identifiers)
                if identifiers
                else mqtt.topic_matches_sub(sub.match_filter, message.topic)
            ):
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

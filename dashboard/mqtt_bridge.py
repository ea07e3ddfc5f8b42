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
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from lab.mqtt import ConnectionPolicy, Identity, IdentityConnection
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


class MqttBridge(IdentityConnection):
    """The connection (lab/mqtt.py `IdentityConnection`): MQTT v5, a persistent session, renewed certificate files
    taken into use at once. The new client resumes the session, in which the broker queued what matched the
    subscriptions meanwhile (SESSION_EXPIRY), so nothing is lost across the switch."""

    policy = ConnectionPolicy(protocol=mqtt.MQTTv5, clean=False, session_expiry=SESSION_EXPIRY)

    def __init__(self, settings: Settings, identity: Identity | None = None, name: str = "dashboard") -> None:
        super().__init__(settings, name, identity=identity, label=f"MQTT {name}")
        # Replaced (never changed in place) under the lock, so the network thread reads it without one.
        self._subscriptions: tuple[Subscription, ...] = ()
        self._lock = threading.Lock()

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
        client = self.client
        if client is not None and self.connected.is_set():
            sub.subscribe_on(client)

    # -- state -----------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """The process runs this connection (start() was called, stop() not yet): only then can it be down."""
        return self.client is not None

    def status(self) -> dict[str, Any]:
        return {**super().status(), "broker": self.broker, "since": self.connected_since}

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _configure(self, client: mqtt.Client) -> None:
        client.on_message = self._on_message

    def _on_up(self, client: mqtt.Client) -> None:
        for sub in self._subscriptions:
            sub.subscribe_on(client)

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

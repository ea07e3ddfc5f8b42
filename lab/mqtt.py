"""One way to open an MQTT connection with a lab identity: mutual TLS, broker hostname verified.

`make_client` builds the paho client; `IdentityConnection` keeps a service's connection up (the CA's, the
dashboard's, the telemetry ingest's) and moves it to its renewed certificate files (lab/rotation.py).
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .rotation import PairWatcher, follow_renewals

if TYPE_CHECKING:
    from pki.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """A certificate, its key and the root that the broker's certificate must chain to."""

    ca_cert: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, certs_dir: Path, name: str) -> Identity:
        folder = Path(certs_dir) / name
        return cls(folder / "root_ca.crt", folder / f"{name}.crt", folder / f"{name}.key")


def tls_context(identity: Identity) -> ssl.SSLContext:
    """Verify the broker (chain + hostname), present our certificate, TLS 1.2 at least."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(identity.ca_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(identity.cert), str(identity.key))
    return context


def certificate_revoked(identity: Identity, host: str, port: int, timeout: float = 5.0) -> bool | None:
    """Ask the broker whether it refuses this certificate as revoked: True, False, or None (could not tell).

    A TLS handshake only, no MQTT CONNECT (so an open session with this identity is not taken over), capped at
    TLS 1.2, where the server checks the client certificate inside the handshake: a CRL-listed certificate gets
    the alert `certificate_revoked` (Mosquitto's log says only "verify failed", for every kind of refusal).
    """
    try:
        context = tls_context(identity)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return False
    except ssl.SSLError as ex:
        return True if ex.reason == "SSLV3_ALERT_CERTIFICATE_REVOKED" else None
    except (OSError, ValueError):
        return None


def _nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    # Request/reply and QoS 1 acks otherwise wait on Nagle + delayed ACK (40-90 ms per round trip).
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def make_client(
    identity: Identity,
    client_id: str = "",
    *,
    protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311,
    clean_session: bool | None = True,
    userdata: Any = None,
) -> mqtt.Client:
    """A paho 2.x client (VERSION2 callbacks) with TLS set up; the caller connects.

    Exceptions raised inside callbacks are logged, not allowed to kill the network loop.
    """
    kwargs: dict[str, Any] = {
        "callback_api_version": CallbackAPIVersion.VERSION2,
        "client_id": client_id,
        "protocol": protocol,
        "userdata": userdata,
    }
    if protocol != mqtt.MQTTv5:
        kwargs["clean_session"] = clean_session
    client = mqtt.Client(**kwargs)
    client.tls_set_context(tls_context(identity))
    client.on_socket_open = _nodelay
    client.suppress_exceptions = True
    return client


@dataclass(frozen=True)
class ConnectionPolicy:
    """How an `IdentityConnection` meets the broker, and when it takes renewed certificate files into use."""

    protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5
    clean: bool = True  # a clean session (3.1.1) / clean start (v5); False resumes what the broker kept
    session_expiry: int | None = None  # MQTT v5 Session Expiry Interval (seconds) sent with each CONNECT
    max_delay: int = 30  # paho's reconnect backoff doubles from 1 s up to this
    jitter: float = 0.5  # up to this many seconds' pause after a drop, so replicas do not reconnect in step
    # Renewed files: a new client at once, or (False) only when the connection drops anyway.
    switch_at_once: bool = True


class IdentityConnection:
    """A service's own MQTT connection as one identity (stock paho, public API): paho reconnects it, and a new
    client that reads the certificate files again replaces it once they were renewed (paho cannot change a
    client's TLS identity). The old client disconnects cleanly first: the broker forces client id = CN, so the
    two would kick each other off.

    A service's connection is one of these (the CA's `CAConnection`, the dashboard's `MqttBridge`, the ingest's
    `TelemetryIngest`): it sets `policy` and overrides the hooks `_configure(client)` (its callbacks on every new
    client), `_on_up(client)` (its subscriptions, on every connect, so a reconnect resubscribes) and `_on_down()`
    (what to forget when the connection is gone); `on_state_change` callbacks are told True once connected, False
    when it drops. Callbacks of a replaced or stopped client reach none of them.
    """

    policy = ConnectionPolicy()

    def __init__(self, settings: Settings, name: str, *, identity: Identity | None = None, label: str = "") -> None:
        self.settings = settings
        self.name = name
        self.identity = identity or Identity.of(settings.certs_dir, name)
        self.label = label or name
        self.client: mqtt.Client | None = None
        self.connected = threading.Event()
        self.connected_since: float | None = None
        self.last_error: str | None = None
        self.on_state_change: list[Callable[[bool], None]] = []
        self._watcher: PairWatcher | None = None
        self._renewed = threading.Event()  # with switch_at_once=False: renewed, switch at the next reconnect

    # -- the owner's hooks -----------------------------------------------------------------------

    def _configure(self, client: mqtt.Client) -> None:
        """Set the owner's callbacks (on_message, ...) on a new client."""

    def _on_up(self, client: mqtt.Client) -> None:
        """Connected: subscribe (before `connected` is set)."""

    def _on_down(self) -> None:
        """The connection is gone (dropped, replaced or stopped)."""

    # -- life cycle ------------------------------------------------------------------------------

    @property
    def broker(self) -> str:
        return f"{self.settings.broker_address}:{self.settings.broker_port}"

    @property
    def switch_pending(self) -> bool:
        """Renewed files wait for the next reconnect (`switch_at_once=False`)."""
        return self._renewed.is_set()

    def status(self) -> dict[str, Any]:
        """Up or not, and why not; each service adds what its health check reports of the connection."""
        return {"connected": self.connected.is_set(), "last_error": self.last_error}

    def start(self) -> None:
        # Watching from before the client reads the files: a renewal in between is seen on the first look.
        self._renewed.clear()  # the new client reads the files as they are now
        renewed = self.reconnect_with_files if self.policy.switch_at_once else self._renewed.set
        self._watcher = follow_renewals(self.identity, self.settings.cert_watch_seconds, renewed, self.label)
        self.client = self._new_client()
        self._connect(self.client)

    def reconnect_with_files(self) -> None:
        """A new client that reads the certificate files again; publishes from now on wait in it."""
        old = self.client
        if old is None:
            return
        new = self._new_client()
        self.client = new
        old.disconnect()
        old.loop_stop()
        self._down()
        self._connect(new)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        client, self.client = self.client, None  # from now on its callbacks concern nobody (nor start a switch)
        if client is None:
            return
        was_connected = self.connected.is_set()
        client.disconnect()
        client.loop_stop()
        self._down()
        if was_connected:  # the client's own disconnect callback now concerns nobody: say it here
            self._notify(False)

    def wait_connected(self, timeout: float = 10) -> bool:
        return self.connected.wait(timeout)

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, properties: Properties | None = None
    ) -> mqtt.MQTTMessageInfo | None:
        client = self.client
        if client is None:
            log.warning("%s: MQTT not started; dropped a message for %s", self.label, topic)
            return None
        return client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def _new_client(self) -> mqtt.Client:
        client = make_client(self.identity, self.name, protocol=self.policy.protocol, clean_session=self.policy.clean)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.reconnect_delay_set(min_delay=1, max_delay=self.policy.max_delay)
        self._configure(client)
        return client

    def _connect(self, client: mqtt.Client) -> None:
        session: dict[str, Any] = {}
        if self.policy.protocol == mqtt.MQTTv5:  # (3.1.1 takes the clean session flag when the client is made)
            session["clean_start"] = self.policy.clean
            if self.policy.session_expiry is not None:
                session["properties"] = properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = self.policy.session_expiry
        client.connect_async(self.settings.broker_address, self.settings.broker_port, keepalive=30, **session)
        client.loop_start()

    def _down(self) -> None:
        self.connected.clear()
        self.connected_since = None
        self._on_down()

    def _notify(self, connected: bool) -> None:
        for callback in list(self.on_state_change):
            try:
                callback(connected)
            except Exception:
                log.exception("%s: MQTT state callback failed", self.label)

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if client is not self.client:  # replaced by reconnect_with_files, or stopped
            return
        if reason.is_failure:
            self.last_error = f"connection refused: {reason}"
            log.warning("%s: %s", self.label, self.last_error)
            return
        self._on_up(client)
        self.connected_since = time.time()
        self.last_error = None
        self.connected.set()
        log.info("MQTT connected to %s as %s", self.broker, self.name)
        self._notify(True)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if client is not self.client:  # replaced or stopped: its goodbye concerns nobody
            return
        if self._renewed.is_set():  # down anyway: come back with the renewed files
            self._renewed.clear()
            threading.Thread(target=self.reconnect_with_files, name=f"{self.name}-renewed", daemon=True).start()
        was = self.connected.is_set()
        self._down()
        if reason is not None and getattr(reason, "is_failure", False):
            self.last_error = f"disconnected: {reason}"
            log.warning("%s: %s; reconnecting", self.label, self.last_error)
        if was:
            self._notify(False)
        if self.policy.jitter:
            time.sleep(random.uniform(0, self.policy.jitter))  # noqa: S311 - spreading reconnects, not security

"""One way to open an MQTT connection with a lab identity: mutual TLS, broker hostname verified."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


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

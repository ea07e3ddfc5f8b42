"""The broker lets in exactly who it should: real Mosquitto, the lab's own generated config."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from lab.mqtt import Identity, tls_context
from lab.testing import mosquitto_tls_args
from pki.authority import CertificateAuthority, cert_pem, generate_private_key, key_pem
from pki.profiles import DEVICE

from .conftest import LabEnv
from .support import Broker, Collector, lab_identity, refused, s_client, wait_for

pytestmark = pytest.mark.integration


def test_device_readings_reach_the_dashboard(session_lab: LabEnv, session_broker: Broker) -> None:
    dashboard = Collector(session_lab.certs_dir, "dashboard", session_broker.port).connect()
    device = Collector(session_lab.certs_dir, "device001", session_broker.port).connect()
    try:
        dashboard.subscribe("iot/thermometer/#")
        reading = {"device_id": "device001", "timestamp": "2026-11-22T15:00:00Z", "temperature": 21.5}
        device.publish("iot/thermometer/device001/temperature", json.dumps(reading))
        message = dashboard.expect("iot/thermometer/device001/temperature")
        assert json.loads(message.payload) == reading
    finally:
        device.close()
        dashboard.close()


def _foreign_identity(
    tmp_path: Path,
    cn: str,
    *,
    days: int = 30,
    now: dt.datetime | None = None,
    ca: CertificateAuthority | None = None,
    root: Path,
) -> Identity:
    """A client certificate with `cn`, from `ca` (default: a foreign CA); the broker root as trust anchor."""
    ca = ca or CertificateAuthority.create()
    key = generate_private_key()
    cert = ca.issue(key.public_key(), DEVICE, cn, days=days, now=now)
    (tmp_path / f"{cn}.crt").write_bytes(cert_pem(cert))
    (tmp_path / f"{cn}.key").write_bytes(key_pem(key))
    return Identity(root, tmp_path / f"{cn}.crt", tmp_path / f"{cn}.key")


def test_client_without_a_certificate_is_refused(session_lab: LabEnv, session_broker: Broker) -> None:
    root = session_lab.certs_dir / "root_ca" / "root_ca.crt"
    result = subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            "localhost",
            "-p",
            str(session_broker.port),
            "--cafile",
            str(root),
            "-t",
            "iot/thermometer/device001/temperature",
            "-m",
            "x",
            "-q",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode != 0
    # and paho, trusting the broker but presenting nothing, never gets a CONNACK
    connected = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.tls_set_context(ssl.create_default_context(cafile=str(root)))
    client.on_connect = lambda *args: connected.append(args[3])
    try:
        client.connect("localhost", session_broker.port)
        for _ in range(20):
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
    except (ssl.SSLError, OSError):
        pass
    assert not [reason for reason in connected if not reason.is_failure]


def test_self_signed_client_is_refused(session_lab: LabEnv, session_broker: Broker, tmp_path: Path) -> None:
    key = generate_private_key()
    self_signed = CertificateAuthority.create(private_key=key, common_name_="device001").certificate
    (tmp_path / "ss.crt").write_bytes(cert_pem(self_signed))
    (tmp_path / "ss.key").write_bytes(key_pem(key))
    identity = Identity(session_lab.certs_dir / "root_ca" / "root_ca.crt", tmp_path / "ss.crt", tmp_path / "ss.key")
    assert refused(session_broker.port, identity)


def test_certificate_from_another_ca_with_the_same_cn_is_refused(
    session_lab: LabEnv, session_broker: Broker, tmp_path: Path
) -> None:
    identity = _foreign_identity(tmp_path, "device001", root=session_lab.certs_dir / "root_ca" / "root_ca.crt")
    assert refused(session_broker.port, identity)


def test_expired_certificate_is_refused(session_lab: LabEnv, session_broker: Broker, tmp_path: Path) -> None:
    root_dir = session_lab.certs_dir / "root_ca"
    ca = CertificateAuthority.load(
        (root_dir / "root_ca.crt").read_bytes(), (root_dir / "root_ca.key").read_bytes(), session_lab.passphrase
    )
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    identity = _foreign_identity(tmp_path, "device001", days=2, now=past, ca=ca, root=root_dir / "root_ca.crt")
    assert refused(session_broker.port, identity)
    # the same CA's fresh certificate is accepted, so the refusal above is about the dates
    fresh = _foreign_identity(tmp_path, "device001", days=2, ca=ca, root=root_dir / "root_ca.crt")
    assert not refused(session_broker.port, fresh)


def test_tls_1_1_is_refused(session_lab: LabEnv, session_broker: Broker) -> None:
    result = s_client(session_broker.port, session_lab.certs_dir, "-tls1_1")
    assert result.returncode != 0
    ok = s_client(session_broker.port, session_lab.certs_dir, "-tls1_2", "-verify_return_error")
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]


def test_client_expecting_another_hostname_refuses_the_broker(session_lab: LabEnv, session_broker: Broker) -> None:
    context = tls_context(Identity.of(session_lab.certs_dir, "device001"))
    with socket.create_connection(("127.0.0.1", session_broker.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            context.wrap_socket(raw, server_hostname="broker.not-in-the-sans.example")
    # the names in the SANs are accepted by the very same context
    for name in ("localhost", "127.0.0.1", "mosquitto"):
        with socket.create_connection(("127.0.0.1", session_broker.port), timeout=5) as raw:
            context.wrap_socket(raw, server_hostname=name).close()


def test_device_cannot_write_or_read_another_devices_topics(session_lab: LabEnv, session_broker: Broker) -> None:
    port = session_broker.port
    dashboard = Collector(session_lab.certs_dir, "dashboard", port).connect()
    ca = Collector(session_lab.certs_dir, "ca-1", port).connect()  # the CA role writes the replies
    device1 = Collector(session_lab.certs_dir, "device001", port).connect()
    device2 = Collector(session_lab.certs_dir, "device002", port).connect()
    try:
        dashboard.subscribe("#")
        # device001 writes into device002's topic: the broker drops it
        device1.publish("iot/thermometer/device002/temperature", '{"forged": true}')
        # device001 subscribes to device002's reply topic and to everything: denied (0x80) or nothing arrives
        # (Mosquitto 2.0.11 grants the SUBACK and then filters every message by the ACL.)
        device1.subscribe("ssl/device002")
        device1.subscribe("ssl/device001")
        device1.subscribe("iot/thermometer/#")
        device2.publish("iot/thermometer/device002/temperature", '{"genuine": true}')
        ca.publish("ssl/device002", '{"for": "device002"}')
        ca.publish("ssl/device001", '{"for": "device001"}')
        got = dashboard.expect("iot/thermometer/device002/temperature")
        assert json.loads(got.payload) == {"genuine": True}
        assert dashboard.nothing("iot/thermometer/device002/temperature", within=0.5)
        # device001 does get what is addressed to it, and nothing of device002's
        assert json.loads(device1.expect("ssl/device001").payload) == {"for": "device001"}
        assert [m.topic for m in device1.received] == ["ssl/device001"]
    finally:
        for c in (device1, device2, dashboard, ca):
            c.close()


def test_second_client_with_device001s_cert_gets_no_device002_data(session_lab: LabEnv, session_broker: Broker) -> None:
    port = session_broker.port
    first = Collector(session_lab.certs_dir, "device001", port).connect()
    # Same certificate, different client id: the broker forces the client id to the CN, so this takes
    # over the session of `first` instead of running beside it; and it still sees only device001's topics.
    second = Collector(session_lab.certs_dir, "device001", port, client_id="spoofed-id").connect()
    device2 = Collector(session_lab.certs_dir, "device002", port).connect()
    try:
        wait_for(lambda: first.disconnected.is_set(), timeout=5, what="the first session to be taken over")
        second.subscribe("iot/thermometer/+/temperature")
        second.subscribe("ssl/#")
        device2.publish("iot/thermometer/device002/temperature", '{"temperature": 20}')
        assert second.nothing(within=1.0)
    finally:
        for c in (first, second, device2):
            c.client.loop_stop()
            c.client.disconnect()


def test_mosquitto_pub_and_sub_with_device_certificates(session_lab: LabEnv, session_broker: Broker) -> None:
    """The README's mosquitto_pub/mosquitto_sub examples work as written."""
    if not shutil.which("mosquitto_pub"):
        raise AssertionError("mosquitto-clients missing: ./setup.sh test installs it")
    certs, port = session_lab.certs_dir, session_broker.port
    as_dashboard = mosquitto_tls_args(lab_identity(certs, "dashboard"), port)
    as_device = mosquitto_tls_args(lab_identity(certs, "device002"), port)
    # -R: not the retained messages other tests' thermometers left on this shared broker (their presence).
    sub = subprocess.Popen(
        ["mosquitto_sub", *as_dashboard, "-t", "iot/thermometer/device002/#", "-R", "-C", "1", "-W", "20", "-v"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The broker logs no line for the SUBSCRIBE that follows mosquitto_sub's CONNECT: publish until it has
    # received one (each publish is a whole QoS 1 exchange, acknowledged before mosquitto_pub exits).
    reading_topic = "iot/thermometer/device002/temperature"
    deadline = time.monotonic() + 20
    while sub.poll() is None and time.monotonic() < deadline:
        pub = subprocess.run(
            ["mosquitto_pub", *as_device, "-t", reading_topic, "-m", '{"temperature": 19.5}', "-q", "1"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert pub.returncode == 0, pub.stderr
    out, err = sub.communicate(timeout=20)
    assert sub.returncode == 0, err
    assert out.strip() == 'iot/thermometer/device002/temperature {"temperature": 19.5}'

"""Step 9, identities: the CA mints no identity it should not, and nothing it issues can pose as the broker.

An attacker here holds the CA passphrase a device operator uses (or a device certificate): every request they
can make is tried, and whatever certificate comes back is put behind a real TLS server of our own on a free
loopback port, posing as the broker. The thermometer, `mosquitto_sub --cafile <root>` and the dashboard's MQTT
client must all refuse it. The real broker must refuse every CBC and SHA-1 suite on TLS 1.2.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flask.testing import FlaskClient

from lab.testing import mosquitto_tls_args
from pki.identity import is_protected_identity

from .ca_support import BackgroundServer, api_token, close_app, lab_state, make_app, make_csr
from .conftest import LabEnv
from .support import (
    Broker,
    free_port,
    lab_identity,
    s_client,
    start_ca_service,
    start_https_dashboard,
    stop_process,
    wait_for,
)

PROTECTED = [
    "root_ca",
    "ROOT_CA",
    "mosquitto",
    "Dashboard",
    "provisioner",
    "policy",
    "ca",
    "CA",
    "ca-1",
    "ca-12",
    "ingest",
    "Ingest-3",
]


def _cert(body: dict[str, Any]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(body["crt"].encode())


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _sans(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v).lower() for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.mark.parametrize("name", PROTECTED)
def test_protected_identities_are_refused_through_every_field(
    generated_lab: LabEnv, client: FlaskClient, name: str
) -> None:
    passphrase = generated_lab.passphrase
    assert is_protected_identity(name)
    before = lab_state(generated_lab)
    attempts = [
        ("sign", {"name": name, "days": 5, "pass": passphrase, "csr": make_csr(name)[0]}),
        ("sign", {"name": name, "days": 5, "pass": passphrase}),
        ("create", {"name": name, "days": 5, "pass": passphrase}),
        ("create", {"name": "innocent1", "days": 5, "pass": passphrase, "cn": name}),
    ]
    if "_" not in name:  # a protected identity as a DNS SAN of someone else's CSR
        attempts.append(
            ("sign", {"name": "innocent2", "days": 5, "pass": passphrase, "csr": make_csr("innocent2", dns=[name])[0]})
        )
    for route, body in attempts:
        reply = client.post(f"/v1/ssl/{route}", json=body)
        assert reply.status_code == 409, (route, body, reply.status_code, reply.json)
        assert reply.json["field"] in ("name", "cn", "csr"), reply.json
    assert lab_state(generated_lab) == before, "a refused request changed something"


def test_create_cn_never_becomes_the_broker_identity(generated_lab: LabEnv, client: FlaskClient) -> None:
    """Rule: the CN is always the entity name; a differing `cn` is only a DNS SAN (README, "create's cn")."""
    passphrase = generated_lab.passphrase
    reply = client.post(
        "/v1/ssl/create",
        json={"name": "collector7", "days": 5, "pass": passphrase, "cn": "collector7.example.com", "org": "ACME"},
    )
    assert reply.status_code == 201, reply.json
    cert = _cert(reply.json)
    assert _cn(cert) == "collector7"
    assert "collector7.example.com" in _sans(cert)
    # another entity's name as cn: still this entity's CN, so it logs in as collector8, never as device002
    reply = client.post("/v1/ssl/create", json={"name": "collector8", "days": 5, "pass": passphrase, "cn": "device002"})
    assert reply.status_code == 201, reply.json
    assert _cn(_cert(reply.json)) == "collector8"
    # a cn that is not a host name cannot be a SAN: refused, not silently used as the identity
    reply = client.post(
        "/v1/ssl/create", json={"name": "collector9", "days": 5, "pass": passphrase, "cn": "under_score"}
    )
    assert (reply.status_code, reply.json["field"]) == (400, "cn")
    # a revoke of the entity covers every certificate with its identity (one identity, one entity)
    rows = client.get("/v1/ssl/certs", headers={"Authorization": f"Bearer {api_token(client.application)}"}).json[
        "certificates"
    ]
    assert {r["common_name"] for r in rows if r["name"].startswith("collector")} == {"collector7", "collector8"}


@pytest.mark.parametrize(
    "san",
    [
        "localhost",
        "LocalHost",
        "mosquitto",
        "dashboard",
        "127.0.0.1",
        "127.0.0.2",
        "::1",
        "broker.lab.example",
        "mqtt.lab.example",
        "10.9.8.7",
    ],
)
def test_lab_server_names_are_never_issued_to_another_certificate(lab_env: LabEnv, san: str) -> None:
    lab_env.env.update(BROKER_ADDRESS="broker.lab.example", BROKER_SANS="mqtt.lab.example,10.9.8.7")
    lab_env.lab().generate()
    app = make_app(lab_env)
    try:
        client = app.test_client()
        before = lab_state(lab_env)
        is_ip = san[0].isdigit() or ":" in san
        csr = make_csr("sensor5", ips=[san] if is_ip else [], dns=[] if is_ip else [san])[0]
        reply = client.post("/v1/ssl/sign", json={"name": "sensor5", "days": 5, "pass": lab_env.passphrase, "csr": csr})
        assert (reply.status_code, reply.json.get("field")) == (409, "csr"), reply.json
        if not is_ip:
            reply = client.post(
                "/v1/ssl/create", json={"name": "sensor6", "days": 5, "pass": lab_env.passphrase, "cn": san}
            )
            assert (reply.status_code, reply.json.get("field")) == (409, "cn"), reply.json
        assert lab_state(lab_env) == before
    finally:
        close_app(app)


def test_api_certificates_are_tls_clients_only(generated_lab: LabEnv, client: FlaskClient) -> None:
    passphrase = generated_lab.passphrase
    issued = [
        client.post(
            "/v1/ssl/sign",
            json={
                "name": "gw1",
                "days": 5,
                "pass": passphrase,
                "csr": make_csr("gw1", dns=["gw1.example.com"], ips=["192.0.2.7"])[0],
            },
        ),
        client.post("/v1/ssl/create", json={"name": "gw2", "days": 5, "pass": passphrase, "cn": "gw2.example.com"}),
        client.post("/v1/ssl/sign", json={"name": "gw2", "days": 5, "pass": passphrase}),  # renewal, stored key
        client.post("/v1/ssl/sign", json={"name": "device001", "days": 5, "pass": passphrase}),
    ]
    for reply in issued:
        assert reply.status_code == 201, reply.json
        cert = _cert(reply.json)
        assert _eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}, cert.subject
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert not constraints.ca and not usage.key_cert_sign and not usage.crl_sign
    # only the broker and the dashboard carry serverAuth
    for name, server in [("mosquitto", True), ("dashboard", True), ("provisioner", False), ("device002", False)]:
        cert = x509.load_pem_x509_certificate((generated_lab.certs_dir / name / f"{name}.crt").read_bytes())
        assert (ExtendedKeyUsageOID.SERVER_AUTH in _eku(cert)) is server, name


# -- TLS suites of the real broker --------------------------------------------------------------------------


def _tls12_suites() -> list[str]:
    out = subprocess.run(
        ["openssl", "ciphers", "-v", "ALL:COMPLEMENTOFALL:@SECLEVEL=0"], capture_output=True, text=True, check=True
    ).stdout
    suites = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ("TLSv1.2", "TLSv1", "SSLv3"):
            suites.append(parts[0])
    return suites


def weak_tls12_suites() -> list[str]:
    """Every TLS 1.2 suite OpenSSL knows that is CBC (or otherwise not AEAD) or has a SHA-1 MAC."""
    weak = [s for s in _tls12_suites() if "GCM" not in s and "CHACHA20" not in s and "CCM" not in s]
    weak += [s for s in _tls12_suites() if s.endswith("-SHA") and s not in weak]
    assert "ECDHE-ECDSA-AES128-SHA" in weak and "ECDHE-ECDSA-AES256-SHA384" in weak
    return weak


def assert_intermediate_tls_only(port: int, certs: Path) -> None:
    """The server on `port` refuses every weak TLS 1.2 suite and accepts ECDHE + AEAD on TLS 1.2, and TLS 1.3."""
    for suite in weak_tls12_suites():
        result = s_client(port, certs, "-tls1_2", "-cipher", f"{suite}:@SECLEVEL=0")
        assert "Cipher is" not in result.stdout + result.stderr and "CONNECTION ESTABLISHED" not in result.stderr, (
            port,
            suite,
            result.stderr[-500:],
        )
    for args in (
        ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
        ["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"],
        ["-tls1_3"],
    ):
        result = s_client(port, certs, *args)
        assert "CONNECTION ESTABLISHED" in result.stderr, (port, args, result.stderr[-500:])


def test_broker_refuses_every_cbc_and_sha1_suite_on_tls12(session_lab: LabEnv, session_broker: Broker) -> None:
    assert_intermediate_tls_only(session_broker.port, session_lab.certs_dir)


def test_the_dashboards_https_and_the_ca_port_refuse_every_cbc_and_sha1_suite(
    session_lab: LabEnv, tmp_path: Path
) -> None:
    """`python -m dashboard` with DASHBOARD_TLS=1 and `python -m ca`: the dashboard's HTTPS port and the CA's
    EST/ACME port offer what the broker offers (pki/tls.py), and nothing weaker."""
    port, ca_port = free_port(), free_port()
    ca, ca_url = start_ca_service(session_lab.env, tmp_path / "ca.log", ca_port)
    log = tmp_path / "dashboard.log"
    server = start_https_dashboard({**session_lab.env, "DASHBOARD_FLASK_MQTT_ENABLED": "false"}, log, port, ca_url)
    try:
        wait_for(
            lambda: server.poll() is not None or "Dashboard on https://" in log.read_text(),
            timeout=30,
            what="the dashboard to start",
        )
        assert server.poll() is None, log.read_text()
        for served in (port, ca_port):
            wait_for(
                lambda p=served: "CONNECTION ESTABLISHED" in s_client(p, session_lab.certs_dir, "-tls1_3").stderr,
                timeout=20,
                interval=0.2,
                what=f"HTTPS on {served}\n{log.read_text()}",
            )
            assert_intermediate_tls_only(served, session_lab.certs_dir)
    finally:
        server.terminate()
        server.wait(timeout=20)
        stop_process(ca)


# -- a fake broker with every certificate the API or `create` hands out ---------------------------------------


class FakeBroker(BackgroundServer):
    """A real TLS server on a free loopback port presenting a certificate of our choice; counts handshakes."""

    def __init__(self, cert_path: Path, key_path: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_path, key_path)
        self.port = free_port()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.sock.settimeout(0.2)
        self.attempts = 0
        self.handshakes = 0
        self._stop = threading.Event()
        super().__init__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.sock.close()

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.attempts += 1
            conn.settimeout(5)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1  # the client accepted our certificate: it would send its CONNECT now
                    try:
                        tls.recv(1024)
                    except (OSError, ssl.SSLError):
                        pass
            except (OSError, ssl.SSLError):
                conn.close()


def _attacker_certificates(lab: LabEnv, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """Every certificate an attacker with the CA passphrase can get, the most broker-like first."""
    app = make_app(lab)
    client = app.test_client()
    passphrase = lab.passphrase
    try:
        candidates: list[tuple[str, dict[str, Any], Any]] = []
        for label, dns, ips in [("broker-sans", ["localhost", "mosquitto"], ["127.0.0.1", "::1"]), ("plain", [], [])]:
            pem, key = make_csr("mosquitto-" + label, dns=dns, ips=ips)
            candidates.append(
                (
                    f"sign {label}",
                    {"route": "sign", "name": f"mosquitto-{label}", "days": 5, "pass": passphrase, "csr": pem},
                    key,
                )
            )
        candidates.append(
            (
                "create cn=localhost",
                {"route": "create", "name": "evil-create", "days": 5, "pass": passphrase, "cn": "localhost"},
                None,
            )
        )
        candidates.append(("create", {"route": "create", "name": "evil-create2", "days": 5, "pass": passphrase}, None))
        got = []
        for label, body, key in candidates:
            route = body.pop("route")
            reply = client.post(f"/v1/ssl/{route}", json=body)
            if reply.status_code >= 300:
                continue
            from pki.authority import key_pem

            folder = tmp_path / label.replace(" ", "_").replace("=", "_")
            folder.mkdir()
            (folder / "c.crt").write_text(reply.json["crt"] + reply.json["ca"])
            (folder / "c.key").write_bytes(key_pem(key) if key is not None else reply.json["key"].encode())
            os.chmod(folder / "c.key", 0o600)
            got.append((label, folder / "c.crt", folder / "c.key"))
        assert got, "the API issued nothing at all: the test would prove nothing"
        yield from got
    finally:
        close_app(app)


def _refused_by_every_client(lab: LabEnv, fake: FakeBroker, start_thermometer: Any) -> None:
    device001 = lab_identity(lab.certs_dir, "device001")
    # mosquitto_sub with the root as its only trust anchor
    assert shutil.which("mosquitto_sub"), "mosquitto-clients missing: ./setup.sh test installs it"
    sub = subprocess.run(
        ["mosquitto_sub", *mosquitto_tls_args(device001, fake.port), "-t", "ssl/device001", "-C", "1", "-W", "3"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert sub.returncode != 0 and fake.attempts >= 1 and fake.handshakes == 0, (sub.returncode, sub.stderr)
    # the thermometer
    attempts = fake.attempts
    env = {k: v for k, v in lab.env.items() if k != "CA_PASSPHRASE"}
    thermometer = start_thermometer(
        {
            **env,
            "DEVICE_ID": "device001",
            "BROKER_ADDRESS": "localhost",
            "BROKER_PORT": str(fake.port),
            "PUBLISH_INTERVAL": "0.2",
        }
    )
    wait_for(lambda: fake.attempts > attempts, timeout=15, what="the thermometer to try the fake broker")
    time.sleep(0.5)
    thermometer.stop()
    assert fake.handshakes == 0, thermometer.output()
    # the dashboard's MQTT client (MqttBridge, the dashboard identity) and the CA's (ca/mqtt.py, ca-1)
    attempts = fake.attempts
    app = make_app(
        lab, MQTT_ENABLED=True, LAB_SETTINGS=lab.settings(BROKER_PORT=str(fake.port), BROKER_ADDRESS="localhost")
    )
    try:
        wait_for(lambda: fake.attempts > attempts, timeout=15, what="the dashboard to try the fake broker")
        time.sleep(0.5)
        assert not app.extensions["mqtt_bridge"].connected.is_set()
        assert not app.extensions["test_ca"].connection.connected.is_set()  # nor the CA's (identity ca-1)
        assert fake.handshakes == 0
    finally:
        close_app(app)


def test_a_fake_broker_with_any_issued_certificate_is_refused(
    generated_lab: LabEnv, tmp_path: Path, start_thermometer: Any
) -> None:
    tried = []
    for label, cert_path, key_path in _attacker_certificates(generated_lab, tmp_path):
        with FakeBroker(cert_path, key_path) as fake:
            _refused_by_every_client(generated_lab, fake, start_thermometer)
        tried.append(label)
    assert "create" in tried and "sign plain" in tried, tried
    # and the real broker certificate in the same setting is accepted (the fake broker can tell acceptance)
    certs = generated_lab.certs_dir
    device001 = lab_identity(certs, "device001")
    with FakeBroker(certs / "mosquitto" / "mosquitto.crt", certs / "mosquitto" / "mosquitto.key") as real:
        subprocess.run(
            ["mosquitto_sub", *mosquitto_tls_args(device001, real.port), "-t", "x", "-C", "1", "-W", "2"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert real.handshakes >= 1

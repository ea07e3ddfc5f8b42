"""Operability: GET /metrics (Prometheus text, a viewer's token) moves with what the CA does, and /healthz answers 503
with the reason while the broker is down, the database fails or the CRL is expired, 200 again once repaired."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from pki.authority import CertificateAuthority
from pki.broker import BrokerFiles
from pki.lockout import LOCKOUT_ATTEMPTS
from pki.store import atomic_write

from .ca_support import ServerThread, api_token, close_app, make_app, make_csr
from .conftest import PROJECT_ROOT, LabEnv, bearer
from .support import Broker, Collector, wait_for

FAMILIES = {
    "iotca_certificates_issued",
    "iotca_certificates_renewed",
    "iotca_certificates_revoked",
    "iotca_ca_requests_refused",
    "iotca_lockouts",
    "iotca_ca_request_duration_seconds",
    "iotca_mqtt_connected",
    "iotca_mqtt_messages_received",
    "iotca_readings_ingested",
    "iotca_messages_rejected",
    "iotca_devices_online",
    "iotca_certificate_earliest_expiry_days",
    "iotca_certificates",
    "iotca_crl_next_update_timestamp_seconds",
}


def scrape(client: FlaskClient, headers: dict[str, str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}, parsed by prometheus-client's own parser."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    families = set()
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    missing = FAMILIES - families
    assert not missing, f"families missing from /metrics: {sorted(missing)}"
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name` over the series carrying `labels` (PromQL's `sum without (...)`): the CA's counters come
    from each CA replica, labelled `ca` (pki/metrics.py ReplicaCollector)."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in samples.items() if n == name and wanted <= set(series))


def test_metrics_need_a_login_and_move_with_issuance_renewal_revocation_refusal_and_lockout(
    generated_lab: LabEnv, app: Flask, client: FlaskClient, viewer_headers: dict[str, str]
) -> None:
    assert client.get("/metrics").status_code == 401  # Step 11: a viewer's session or API token, like /api/data
    before = scrape(client, viewer_headers)
    assert value(before, "iotca_certificates_issued_total", transport="http", kind="create") == 0
    assert value(before, "iotca_mqtt_connected", client="dashboard") == 0  # MQTT is off in this app
    # The CA's counters come from its replica (python -m ca's, here in this process), labelled with its address.
    assert [labels for (name, labels), up in before.items() if name == "iotca_ca_replica_up" and up == 1]
    assert before[("iotca_certificate_earliest_expiry_days", ())] > 300  # the generator's certificates
    crl_next = before[("iotca_crl_next_update_timestamp_seconds", ())]
    assert crl_next > dt.datetime.now(dt.UTC).timestamp()
    passphrase = generated_lab.passphrase

    assert client.post("/v1/ssl/create", json={"name": "m01", "days": 2, "pass": passphrase}).status_code == 201
    csr, _ = make_csr("m02")
    assert (
        client.post(
            "/v1/ssl/sign",
            json={"name": "m02", "days": 3, "pass": passphrase, "csr": csr},
            headers={"User-Agent": "iotca/1"},
        ).status_code
        == 201
    )  # the CLI's requests
    assert client.post("/v1/ssl/sign", json={"name": "m01", "days": 5, "pass": passphrase}).status_code == 201
    assert (
        client.post("/v1/ssl/revoke", json={"name": "m02", "pass": passphrase, "reason": "keyCompromise"}).status_code
        == 200
    )
    for _ in range(LOCKOUT_ATTEMPTS):
        assert client.post("/v1/ssl/create", json={"name": "m03", "days": 1, "pass": "wrong"}).status_code == 403
    assert client.post("/v1/ssl/create", json={"name": "m03", "days": 1, "pass": passphrase}).status_code == 429
    assert client.post("/v1/ssl/create", json={"name": "m04", "days": "x", "pass": passphrase}).status_code == 400

    after = scrape(client, viewer_headers)
    assert value(after, "iotca_certificates_issued_total", transport="http", kind="create") == 1
    assert value(after, "iotca_certificates_issued_total", transport="cli", kind="csr") == 1
    assert value(after, "iotca_certificates_renewed_total", transport="http") == 1
    assert value(after, "iotca_certificates_revoked_total", transport="http", reason="keyCompromise") == 1
    assert (
        value(after, "iotca_ca_requests_refused_total", transport="http", operation="create", reason="wrong_passphrase")
        == LOCKOUT_ATTEMPTS
    )
    assert (
        value(after, "iotca_ca_requests_refused_total", transport="http", operation="create", reason="locked_out") == 1
    )
    assert (
        value(after, "iotca_ca_requests_refused_total", transport="http", operation="create", reason="invalid_request")
        == 1
    )
    assert value(after, "iotca_lockouts_total", transport="http") == 1
    # every request answered is in the histogram (4 + 5 + 1 + 1 create, 2 sign, 1 revoke)
    assert value(after, "iotca_ca_request_duration_seconds_count", transport="http", operation="create") == 8
    assert value(after, "iotca_ca_request_duration_seconds_count", transport="cli", operation="sign") == 1
    assert value(after, "iotca_ca_request_duration_seconds_count", transport="http", operation="sign") == 1
    # from the inventory at scrape time: m01's renewal (5 days) is now the earliest expiry; m02 is revoked
    assert 4.9 < after[("iotca_certificate_earliest_expiry_days", ())] < 5.1
    assert (
        value(after, "iotca_certificates", state="revoked") == value(before, "iotca_certificates", state="revoked") + 1
    )
    assert (
        value(after, "iotca_certificates", state="superseded")
        == value(before, "iotca_certificates", state="superseded") + 1
    )
    assert value(after, "iotca_certificates", state="expiring") == 1  # m01, inside RENEW_BEFORE_DAYS
    # the revocation rewrote the CRL: a new next update, read from the file the broker enforces
    assert after[("iotca_crl_next_update_timestamp_seconds", ())] >= crl_next


def test_two_apps_in_one_process_count_apart(generated_lab: LabEnv, app: Flask, viewer_headers: dict[str, str]) -> None:
    """A private registry per app: a second app neither collides at registration nor sees the first one's counts."""
    other = make_app(generated_lab)
    try:
        assert (
            app.test_client()
            .post("/v1/ssl/create", json={"name": "m05", "days": 1, "pass": generated_lab.passphrase})
            .status_code
            == 201
        )
        mine = scrape(app.test_client(), viewer_headers)
        theirs = scrape(other.test_client(), bearer(api_token(other)))
        assert value(mine, "iotca_certificates_issued_total", transport="http", kind="create") == 1
        assert value(theirs, "iotca_certificates_issued_total", transport="http", kind="create") == 0
    finally:
        close_app(other)


def test_healthz_is_503_with_the_reason_while_the_database_fails_or_the_crl_has_expired(
    generated_lab: LabEnv, app: Flask, client: FlaskClient
) -> None:
    healthy = client.get("/healthz")
    assert healthy.status_code == 200 and healthy.json["status"] == "ok" and healthy.json["reasons"] == []
    assert healthy.json["mqtt"]["enabled"] is False  # this app runs no MQTT connection: not a fault

    app.extensions["live_hub"].db_error = "OperationalError: disk I/O error"  # what a failed store sets
    down = client.get("/healthz")
    assert down.status_code == 503 and down.json["status"] == "degraded"
    assert down.json["reasons"] == ["database: OperationalError: disk I/O error"]
    app.extensions["live_hub"].db_error = None

    # A CRL past its next update, signed by the real root: Mosquitto would refuse every client.
    crl_path = BrokerFiles(generated_lab.certs_dir, generated_lab.data_dir).crl
    good = crl_path.read_bytes()
    root = generated_lab.certs_dir / "root_ca"
    ca = CertificateAuthority.load(
        (root / "root_ca.crt").read_bytes(), (root / "root_ca.key").read_bytes(), generated_lab.passphrase
    )
    stale = ca.build_crl(
        [], crl_number=99, next_update=dt.timedelta(days=1), now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    )
    atomic_write(crl_path, stale.public_bytes(Encoding.PEM))
    expired = client.get("/healthz")
    assert expired.status_code == 503
    assert len(expired.json["reasons"]) == 1 and expired.json["reasons"][0].startswith("crl: expired")
    atomic_write(crl_path, good)
    assert client.get("/healthz").status_code == 200


@pytest.fixture
def mqtt_app(generated_lab: LabEnv, broker: Broker) -> Iterator[Flask]:
    """The dashboard with its real MQTT connection to this test's own broker (which the test stops)."""
    app = make_app(generated_lab, MQTT_ENABLED=True)
    bridge = app.extensions["mqtt_bridge"]
    if not bridge.started:  # the serving entry point starts it; create_app may leave that to it
        bridge.start()
    yield app
    close_app(app)


def compose_healthcheck(port: int, lab: LabEnv) -> bool:
    """docker-compose.yml's own dashboard healthcheck command, pointed at this test's server: passes or fails."""
    command = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())["services"]["dashboard"]["healthcheck"]
    argv = [
        sys.executable if word == "python" else word.replace("https://127.0.0.1:5000/", f"http://127.0.0.1:{port}/")
        for word in command["test"][1:]
    ]
    env = {**os.environ, "CERTS_DIR": str(lab.certs_dir)}
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0


@pytest.mark.integration
def test_healthz_is_503_while_the_broker_is_down_and_200_after_it_restarts(
    generated_lab: LabEnv, broker: Broker, mqtt_app: Flask
) -> None:
    """And the compose healthcheck, which relies on it, fails while it is 503."""
    with ServerThread(mqtt_app) as server:
        _broker_down_and_up(generated_lab, broker, mqtt_app, server.port)


def _broker_down_and_up(generated_lab: LabEnv, broker: Broker, mqtt_app: Flask, port: int) -> None:
    client = mqtt_app.test_client()
    headers = bearer(api_token(mqtt_app))
    wait_for(lambda: client.get("/healthz").status_code == 200, timeout=20, what="the dashboard's MQTT connection")
    device = Collector(generated_lab.certs_dir, "device001", broker.port).connect()
    try:
        device.publish("iot/thermometer/device001/status", "online", retain=True)
        device.publish(
            "iot/thermometer/device001/temperature",
            json.dumps({"device_id": "device001", "timestamp": "2026-12-01T12:00:00Z", "temperature": 21.5}),
        )
        wait_for(
            lambda: value(scrape(client, headers), "iotca_readings_ingested_total") == 1,
            timeout=10,
            what="the reading counted",
        )
    finally:
        device.close()
    up = scrape(client, headers)
    assert value(up, "iotca_mqtt_connected", client="dashboard") == 1
    assert value(up, "iotca_mqtt_messages_received_total") >= 2
    assert value(up, "iotca_devices_online") == 1
    assert compose_healthcheck(port, generated_lab)

    broker.stop()
    down = wait_for(
        lambda: (r := client.get("/healthz")).status_code == 503 and r,
        timeout=20,
        what="/healthz to say the broker is down",
    )
    assert down.json["status"] == "degraded" and down.json["mqtt"]["connected"] is False
    assert [r for r in down.json["reasons"] if r.startswith("mqtt: not connected to")], down.json
    assert value(scrape(client, headers), "iotca_mqtt_connected", client="dashboard") == 0
    assert not compose_healthcheck(port, generated_lab)  # urllib raises on the 503: the container is unhealthy

    broker.start()
    wait_for(
        lambda: client.get("/healthz").status_code == 200,
        timeout=45,
        what="/healthz back to 200 after the broker restarted",
    )
    assert value(scrape(client, headers), "iotca_mqtt_connected", client="dashboard") == 1
    assert compose_healthcheck(port, generated_lab)

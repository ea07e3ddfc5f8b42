"""The device certificate lifecycle with a real broker, the real dashboard (the CA's MQTT and HTTP endpoints, in
this process) and real thermometer processes: self-renewal without a lost reading, renewals the CA or the
broker refuse, and first enrolment with a single-use token. The same without a broker: tests/test_enrolment.py
(token files, the native runner) and tests/test_generator_inventory.py (the CLI's view of revoked certificates
and the CRL)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from flask import Flask
from sqlalchemy import update

from lab.credentials import has_previous, previous, recover, store
from lab.mqtt import Identity
from lab.renewal import RenewalPolicy
from pki.authority import (
    CertificateAuthority,
    cert_pem,
    generate_private_key,
    key_pem,
    load_certificate,
    load_private_key,
    public_key_matches,
    verify_leaf,
)
from pki.broker import BrokerFiles
from pki.inventory import CertificateRecord, EnrolmentToken
from pki.service import CAService, token_digest
from pki.store import atomic_write

from .ca_support import (
    ServerThread,
    certs_state,
    close_app,
    issue_aged_certificate,
    lab_state,
    make_app,
    make_csr,
    mqtt_connected,
    post_json,
)
from .conftest import LabEnv
from .support import Broker, Collector, ThermometerProcess, wait_for

RENEWED_RE = re.compile(r"renewed the certificate: serial (\w+) -> (\w+)")


def device_env(lab: LabEnv, device_id: str, **extra: str) -> dict[str, str]:
    """What a device gets: the lab's folders and broker port, never the CA passphrase."""
    env = {k: v for k, v in lab.env.items() if k != "CA_PASSPHRASE"}
    return {**env, "DEVICE_ID": device_id, "PUBLISH_INTERVAL": "0.2", **extra}


@pytest.fixture
def mqtt_app(generated_lab: LabEnv, broker: Broker) -> Iterator[Flask]:
    """The dashboard app with its MQTT connection: the CA endpoint and the readings ingest."""
    app = make_app(generated_lab, MQTT_ENABLED=True)
    assert mqtt_connected(app), app.extensions["mqtt_bridge"].status()
    yield app
    app.extensions["live_hub"].close()
    close_app(app)


def stored_seqs(app: Flask, device_id: str) -> list[int]:
    """Sequence numbers of the readings the dashboard received from `device_id` and stored."""
    return sorted(r.seq for r in app.extensions["live_hub"].store.since(0) if r.device_id == device_id)


def stop_and_wait_for_the_last_reading(thermometer: ThermometerProcess, app: Flask, device_id: str) -> int:
    """SIGTERM the thermometer (it exits 0, saying how many readings it took) and wait until its last reading is
    stored at the dashboard; returns that reading's number."""
    assert thermometer.terminate() == 0
    last = int(re.findall(r"stopped after (\d+) readings", thermometer.output())[-1])
    wait_for(
        lambda: max(stored_seqs(app, device_id), default=0) >= last,
        timeout=10,
        what=f"reading {last} at the dashboard",
    )
    return last


def cert_file(lab: LabEnv, name: str) -> x509.Certificate:
    return load_certificate((lab.certs_dir / name / f"{name}.crt").read_bytes())


def reply_status(message: mqtt.MQTTMessage) -> int | None:
    for key, value in getattr(message.properties, "UserProperty", None) or []:
        if key == "status":
            return int(value)
    return None


# -- renewal -------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_device_inside_its_renewal_window_renews_itself_without_losing_a_reading(
    generated_lab: LabEnv, mqtt_app: Flask, start_thermometer: Callable[..., ThermometerProcess]
) -> None:
    old = issue_aged_certificate(generated_lab, "device001", days=365, days_left=10)
    old_key = (generated_lab.certs_dir / "device001" / "device001.key").read_bytes()
    thermometer = start_thermometer(device_env(generated_lab, "device001", RENEW_CHECK_INTERVAL="0.5"))
    thermometer.wait_output("renewed the certificate", timeout=30)
    match = RENEWED_RE.search(thermometer.output())
    assert match is not None and match.group(1) == format(old.serial_number, "x")
    switched_after = int(re.findall(r"switches to its new certificate after reading (\d+)", thermometer.output())[0])
    # readings keep arriving with the new certificate
    wait_for(
        lambda: len([s for s in stored_seqs(mqtt_app, "device001") if s > switched_after]) >= 5,
        timeout=15,
        what="readings after the renewal",
    )
    last = stop_and_wait_for_the_last_reading(thermometer, mqtt_app, "device001")

    # no gap: every reading the device took reached the dashboard, before, during and after the switch
    seqs = stored_seqs(mqtt_app, "device001")
    assert set(seqs) == set(range(1, last + 1)), sorted(set(range(1, last + 1)) - set(seqs))
    assert 1 <= switched_after < last - 4  # readings went out with the old certificate and with the new one

    # a new certificate for a new key, with the same lifetime, from the same CA; no previous pair left behind
    new = cert_file(generated_lab, "device001")
    identity = Identity.of(generated_lab.certs_dir, "device001")
    new_key = identity.key.read_bytes()
    assert format(new.serial_number, "x") == match.group(2) != match.group(1)
    assert new_key != old_key and public_key_matches(new, load_private_key(new_key))
    assert not public_key_matches(new, load_private_key(old_key))
    assert new.not_valid_after_utc - new.not_valid_before_utc == old.not_valid_after_utc - old.not_valid_before_utc
    assert new.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=360)
    assert verify_leaf(load_certificate(identity.ca_cert.read_bytes()), new)
    assert (identity.key.stat().st_mode & 0o777) == 0o600
    assert not has_previous(identity) and not previous(identity.key).exists()

    # the inventory has both: the old one superseded, the new one current and issued by renewal
    rows = {r.serial: r for r in mqtt_app.extensions["test_ca"].service.inventory.list(name="device001")}
    assert rows[match.group(1)].status == "superseded"
    assert (rows[match.group(2)].status, rows[match.group(2)].issued_via, rows[match.group(2)].requester) == (
        "active",
        "renew",
        "mqtt:device001",
    )
    # serials in the log, never key material
    assert "PRIVATE KEY" not in thermometer.output()


@pytest.mark.integration
def test_a_renewed_certificate_the_broker_refuses_is_rolled_back(
    generated_lab: LabEnv, mqtt_app: Flask, start_thermometer: Callable[..., ThermometerProcess]
) -> None:
    """The CA issues what the broker will not accept (here: its inventory says the entity is a server, so the
    renewal carries serverAuth only); the device notices on connecting, goes back to its previous pair, loses no
    reading, and tries again later."""
    old = issue_aged_certificate(generated_lab, "device001", days=365, days_left=10)
    identity = Identity.of(generated_lab.certs_dir, "device001")
    old_files = (identity.cert.read_bytes(), identity.key.read_bytes())
    inventory = mqtt_app.extensions["test_ca"].service.inventory
    with inventory.session() as session:
        session.execute(
            update(CertificateRecord)
            .where(CertificateRecord.serial == format(old.serial_number, "x"))
            .values(role="broker")
        )
    thermometer = start_thermometer(device_env(generated_lab, "device001", RENEW_CHECK_INTERVAL="0.5"))
    thermometer.wait_output("back on serial", timeout=30)
    thermometer.wait_output("renewal failed", timeout=10)
    first = stored_seqs(mqtt_app, "device001")
    wait_for(
        lambda: len(stored_seqs(mqtt_app, "device001")) >= len(first) + 5,
        timeout=15,
        what="readings with the previous certificate",
    )
    last = stop_and_wait_for_the_last_reading(thermometer, mqtt_app, "device001")
    assert set(stored_seqs(mqtt_app, "device001")) == set(range(1, last + 1))
    assert "renewed the certificate" not in thermometer.output()
    assert (identity.cert.read_bytes(), identity.key.read_bytes()) == old_files
    assert not has_previous(identity)


def test_renewal_rules_in_the_service(generated_lab: LabEnv) -> None:
    """CAService.renew: every refusal writes nothing; a renewal writes no file and supersedes the old row."""
    service = CAService(generated_lab.settings())
    try:
        current = cert_file(generated_lab, "device001")
        current_key = load_private_key((generated_lab.certs_dir / "device001" / "device001.key").read_bytes())
        before = lab_state(generated_lab)
        refusals = {
            "other CN": (service.renew("device001", {"csr": make_csr("device002")[0]}), 400, "csr"),
            "same key": (service.renew("device001", {"csr": make_csr("device001", current_key)[0]}), 400, "csr"),
            "no csr": (service.renew("device001", {"days": 3}), 400, "csr"),
            "not json object": (service.renew("device001", ["csr"]), 400, None),
            "bad days": (service.renew("device001", {"csr": make_csr("device001")[0], "days": 0}), 400, "days"),
            "unknown": (service.renew("ghost", {"csr": make_csr("ghost")[0]}), 404, "name"),
            "protected": (service.renew("dashboard", {"csr": make_csr("dashboard")[0]}), 409, "name"),
            "bad name": (service.renew("a+b", {"csr": make_csr("ab")[0]}), 400, "name"),
        }
        for what, (reply, status, field) in refusals.items():
            assert (reply.status, reply.body.get("field")) == (status, field), (what, reply.body)
        assert lab_state(generated_lab) == before

        files = certs_state(generated_lab)
        pem, key = make_csr("device001")
        reply = service.renew("device001", {"csr": pem}, requester="mqtt:device001")
        assert reply.status == 201, reply.body
        assert set(reply.body) == {"name", "ca", "crt", "serial", "not_after"}  # sign's shape, no key
        new = load_certificate(reply.body["crt"].encode())
        assert public_key_matches(new, key) and new.subject == current.subject
        assert new.extensions.get_extension_for_class(
            x509.ExtendedKeyUsage
        ) == current.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        assert (
            new.not_valid_after_utc - new.not_valid_before_utc
            == current.not_valid_after_utc - current.not_valid_before_utc
        )
        assert certs_state(generated_lab) == files, "renewal must not write the device's files"
        rows = {r.serial: r for r in service.inventory.list(name="device001")}
        assert rows[format(current.serial_number, "x")].status == "superseded"
        assert (rows[reply.body["serial"]].status, rows[reply.body["serial"]].issued_via) == ("active", "renew")
        # a shorter lifetime may be asked for, never a longer one
        shorter = service.renew("device001", {"csr": make_csr("device001")[0], "days": 30})
        assert 29 <= (dt.datetime.fromisoformat(shorter.body["not_after"]) - dt.datetime.now(dt.UTC)).days <= 30
        longer = service.renew("device001", {"csr": make_csr("device001")[0], "days": 3000})
        assert (dt.datetime.fromisoformat(longer.body["not_after"]) - dt.datetime.now(dt.UTC)).days <= 30

        # revoked: refused, nothing written
        assert service.revoke({"name": "device002", "pass": generated_lab.passphrase}, source="t").ok
        before = lab_state(generated_lab)
        revoked = service.renew("device002", {"csr": make_csr("device002")[0]})
        assert revoked.status == 403 and "revoked" in revoked.body["error"]
        # expired: refused
        issue_aged_certificate(generated_lab, "device003", days=30, days_left=-1)
        before = lab_state(generated_lab)
        expired = service.renew("device003", {"csr": make_csr("device003")[0]})
        assert expired.status == 403 and "expired" in expired.body["error"]
        assert lab_state(generated_lab) == before
    finally:
        service.close()


@pytest.mark.integration
def test_renewal_over_mqtt_is_refused_for_a_wrong_cn_another_device_and_a_revoked_one(
    generated_lab: LabEnv, mqtt_app: Flask, broker: Broker
) -> None:
    endpoint = mqtt_app.extensions["test_ca"].mqtt
    inventory = mqtt_app.extensions["test_ca"].service.inventory
    device1 = Collector(generated_lab.certs_dir, "device001", broker.port, protocol=mqtt.MQTTv5).connect()
    device2 = Collector(generated_lab.certs_dir, "device002", broker.port, protocol=mqtt.MQTTv5).connect()
    try:
        device1.subscribe("ssl/device001")
        device2.subscribe("ssl/device002")
        # a CSR whose CN is not the topic's: 400, answered on the topic's reply topic
        device1.publish("ssl/renew/device001", json.dumps({"csr": make_csr("device002")[0]}))
        message = device1.expect("ssl/device001")
        assert reply_status(message) == 400 and json.loads(message.payload)["field"] == "csr"

        # device002 publishing to device001's renew topic: the broker drops it, the CA never sees it
        rows_before = [r.serial for r in inventory.list(name="device001")]
        received = endpoint.stats()["received"]
        device2.publish("ssl/renew/device001", json.dumps({"csr": make_csr("device001")[0]}))
        # then a legitimate renewal of its own, which is answered; the forbidden one never was
        pem, key = make_csr("device002")
        device2.publish("ssl/renew/device002", json.dumps({"csr": pem}))
        reply = json.loads(device2.expect("ssl/device002").payload)
        assert public_key_matches(load_certificate(reply["crt"].encode()), key)
        wait_for(lambda: endpoint.idle, what="the endpoint to be idle")
        assert endpoint.stats()["received"] == received + 1
        assert [r.serial for r in inventory.list(name="device001")] == rows_before
        assert device1.nothing("ssl/device001", within=0.5)

        # revoked: denied every topic by the ACL...
        reloads = broker.log().count("Reloading config")
        assert (
            mqtt_app.test_client()
            .post("/v1/ssl/revoke", json={"name": "device002", "pass": generated_lab.passphrase})
            .status_code
            == 200
        )
        assert _acl_denies(generated_lab, "device002")
        wait_for(lambda: broker.log().count("Reloading config") > reloads, what="the broker to reload its ACL")
        rows_before = [r.serial for r in inventory.list(name="device002")]
        received = endpoint.stats()["received"]
        # ...and the CA has the broker close its connection: a request it still sends never gets anywhere
        wait_for(device2.disconnected.is_set, timeout=2, what="the broker to close device002's connection")
        device2.client.publish("ssl/renew/device002", json.dumps({"csr": make_csr("device002")[0]}), qos=1)
        assert device2.nothing("ssl/device002", within=1.0)
        assert endpoint.stats()["received"] == received
        assert [r.serial for r in inventory.list(name="device002")] == rows_before
    finally:
        device1.close()
        device2.close()


def _acl_denies(lab: LabEnv, name: str) -> bool:
    return f"user {name}\ntopic deny #" in BrokerFiles(lab.certs_dir, lab.data_dir).acl.read_text()


def test_openapi_documents_mqtt_renewal(generated_lab: LabEnv) -> None:
    app = make_app(generated_lab)
    try:
        document = app.test_client().get("/v1/openapi.json").json
    finally:
        close_app(app)
    assert "ssl/renew/<its CN>" in document["info"]["description"]
    assert "/v1/asyncapi.json" in document["info"]["description"]  # the MQTT API's own document (test_docs.py)
    assert set(document["components"]["schemas"]["RenewRequest"]["properties"]) == {"csr", "days"}


def test_renewal_schedule() -> None:
    ca = CertificateAuthority.create()
    now = dt.datetime.now(dt.UTC)

    def due(days: int, renew_before: float = 30, jitter: float = 0.0) -> float:
        cert = ca.issue(generate_private_key().public_key(), _device_profile(), "d", days=days, now=now)
        when = RenewalPolicy(renew_before, 3600, jitter).due_at(cert)
        return (when - cert.not_valid_before_utc).total_seconds() / 86400

    assert due(365) == pytest.approx(365 * 2 / 3, abs=0.01)  # two thirds come before the 30-day window
    assert due(60) == pytest.approx(30, abs=0.01)  # the window comes first
    assert due(10) == pytest.approx(5, abs=0.01)  # born inside the window: not before half its life (no loop)
    assert due(365, jitter=0.05) == pytest.approx(365 * 2 / 3 - 365 * 0.05, abs=0.01)  # jitter: earlier only
    policies = {RenewalPolicy.for_device(30, 3600, random.Random(seed)).jitter for seed in range(20)}
    assert len(policies) == 20 and all(0 <= j <= 0.05 for j in policies)


def _device_profile() -> Any:
    from pki.profiles import DEVICE

    return DEVICE


def test_an_interrupted_switch_is_repaired_from_the_previous_pair(tmp_path: Path) -> None:
    identity = Identity(tmp_path / "root_ca.crt", tmp_path / "d.crt", tmp_path / "d.key")
    ca = CertificateAuthority.create()
    old_key, new_key = generate_private_key(), generate_private_key()
    old = ca.issue(old_key.public_key(), _device_profile(), "d", days=30)
    new = ca.issue(new_key.public_key(), _device_profile(), "d", days=30)
    store(identity, cert_pem(old), key_pem(old_key), keep_previous=True, ca_pem=ca.cert_pem)
    assert not has_previous(identity)  # nothing to keep on a first store
    store(identity, cert_pem(new), key_pem(new_key), keep_previous=True)
    assert has_previous(identity) and (previous(identity.key).stat().st_mode & 0o777) == 0o600
    assert recover(identity) is False  # the new pair is whole: the renewer confirms it by connecting
    # the device stopped between writing the key and the certificate: the pair does not match
    atomic_write(identity.cert, cert_pem(old))
    atomic_write(previous(identity.cert), cert_pem(old))
    atomic_write(previous(identity.key), key_pem(old_key), 0o600)
    assert recover(identity) is True
    assert public_key_matches(load_certificate(identity.cert.read_bytes()), load_private_key(identity.key.read_bytes()))
    assert not has_previous(identity)


# -- enrolment with a token ----------------------------------------------------------------------------


@pytest.mark.integration
def test_a_thermometer_with_only_a_token_enrols_once_and_publishes(
    generated_lab: LabEnv,
    mqtt_app: Flask,
    start_thermometer: Callable[..., ThermometerProcess],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    service = mqtt_app.extensions["test_ca"].service
    with ServerThread(mqtt_app) as server:
        ca_url = server.url("").rstrip("/")

        def token(name: str) -> str:
            status, body = post_json(
                server.url("/v1/ssl/tokens"), {"name": name, "pass": generated_lab.passphrase, "ttl": 600}
            )
            assert status == 201, body
            return body["token"]

        tokens = {name: token(name) for name in ("device007", "device008", "device009")}
        env = device_env(generated_lab, "device007", ENROL_TOKEN=tokens["device007"], CA_URL=ca_url)
        first = start_thermometer(env)
        wait_for(
            lambda: len(stored_seqs(mqtt_app, "device007")) >= 3, timeout=20, what="readings from the enrolled device"
        )
        identity = Identity.of(generated_lab.certs_dir, "device007")
        cert = load_certificate(identity.cert.read_bytes())
        assert public_key_matches(cert, load_private_key(identity.key.read_bytes()))
        assert (identity.key.stat().st_mode & 0o777) == 0o600
        assert identity.ca_cert.read_bytes() == (generated_lab.certs_dir / "root_ca" / "root_ca.crt").read_bytes()
        row = service.inventory.by_serial(format(cert.serial_number, "x"))
        assert (row.name, row.role, row.issued_via) == ("device007", "device", "http")
        assert service.inventory.token(token_digest(tokens["device007"])).used_serial == row.serial

        outputs: list[str] = []

        def refused(device_id: str, token_value: str, folder: str) -> str:
            other = device_env(
                generated_lab, device_id, ENROL_TOKEN=token_value, CA_URL=ca_url, CERTS_DIR=str(tmp_path / folder)
            )
            process = start_thermometer(other)
            assert process.process is not None and process.process.wait(timeout=30) == 2, process.output()
            outputs.append(process.output())
            return process.output()

        # the same token again (a second device claiming to be device007): refused, with the server's reason
        assert "already been used" in refused("device007", tokens["device007"], "again")
        assert "another name" in refused("device009", tokens["device008"], "wrong-name")
        assert "unknown enrolment token" in refused("device008", "forged-" + tokens["device008"][7:], "forged")
        with service.inventory.session() as session:
            session.execute(
                update(EnrolmentToken)
                .where(EnrolmentToken.name == "device009")
                .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
            )
        assert "has expired" in refused("device009", tokens["device009"], "expired")
        for folder in ("again", "wrong-name", "forged", "expired"):
            assert not any((tmp_path / folder).rglob("*.crt")), folder
        assert [r.name for r in service.inventory.list(name="device007")] == ["device007"]  # exactly one
        assert first.terminate() == 0
        outputs.append(first.output())
    logs = "\n".join([*outputs, caplog.text])
    for value in tokens.values():
        assert value not in logs and value[:16] not in logs

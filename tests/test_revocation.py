"""Revocation that the broker enforces: CRL for new connections, an ACL deny for connections already open,
both kept across a broker restart; and a CRL that is always fresh, and never fails open when damaged or missing."""

from __future__ import annotations

import datetime as dt
import subprocess
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Flask
from flask.testing import FlaskClient

from ca.process import CRL_CHECK_INTERVAL
from lab.mqtt import Identity, certificate_revoked
from pki.authority import CertificateAuthority, load_certificate
from pki.broker import CRL_LIFETIME, BrokerFiles, broker_command, current_crl_number
from pki.service import CAService
from pki.store import atomic_write

from .ca_support import (
    ca_of,
    close_app,
    lab_state,
    make_app,
    make_csr,
)
from .conftest import LabEnv, serial_of
from .support import Broker, Collector, ThermometerProcess, refused, wait_for


def crl_serials(data: bytes) -> set[str]:
    return {format(entry.serial_number, "x") for entry in x509.load_pem_x509_crl(data)}


def thermometer(lab: LabEnv, device: str) -> ThermometerProcess:
    env = {k: v for k, v in lab.env.items() if k != "CA_PASSPHRASE"}
    return ThermometerProcess({**env, "DEVICE_ID": device, "PUBLISH_INTERVAL": "0.2"}).start()


def from_device(messages: list[Any], device: str) -> list[Any]:
    return [m for m in messages if m.topic == f"iot/thermometer/{device}/temperature"]


@pytest.mark.integration
def test_revoking_a_connected_device_cuts_it_off(generated_lab: LabEnv, broker: Broker, client: FlaskClient) -> None:
    observer = Collector(generated_lab.certs_dir, "dashboard", broker.port).connect()
    devices = [thermometer(generated_lab, "device001"), thermometer(generated_lab, "device002")]
    try:
        observer.subscribe("iot/thermometer/+/temperature")
        wait_for(
            lambda: (
                len(from_device(observer.received, "device001")) >= 3
                and len(from_device(observer.received, "device002")) >= 3
            ),
            timeout=20,
            what="readings from both thermometers",
        )
        serial = serial_of(generated_lab, "device001")

        response = client.post(
            "/v1/ssl/revoke", json={"name": "device001", "pass": generated_lab.passphrase, "reason": "keyCompromise"}
        )
        assert response.status_code == 200, response.json
        assert response.json["revoked"] == [serial] and response.json["reason"] == "keyCompromise"

        # Within 2 s device001's readings stop arriving while device002's keep coming: three of device002's
        # after device001's last one (its thermometer is still connected and publishing into the deny rule).
        def cut_off() -> bool:
            received = list(observer.received)
            last = max((i for i, m in enumerate(received) if m.topic.endswith("/device001/temperature")), default=-1)
            return len(from_device(received[last + 1 :], "device002")) >= 3

        wait_for(cut_off, timeout=2.0, interval=0.05, what="device001's readings to stop")
        seen = len(from_device(observer.received, "device001"))
        wait_for(
            lambda: len(from_device(observer.received, "device002")) >= seen + 5,
            timeout=10,
            what="more device002 readings",
        )
        assert len(from_device(observer.received, "device001")) == seen
        # (no dashboard MQTT connection in this test to close it: it stays connected, every publish denied)
        assert devices[0].process is not None and devices[0].process.poll() is None

        # A new connection with the revoked certificate is refused; device002 is unaffected.
        assert refused(broker.port, Identity.of(generated_lab.certs_dir, "device001"))
        assert not refused(broker.port, Identity.of(generated_lab.certs_dir, "device002"))

        # The revocation survives a broker restart: CRL and ACL are files the broker reads at start.
        observer.close()
        broker.restart()
        observer = Collector(generated_lab.certs_dir, "dashboard", broker.port).connect()
        observer.subscribe("iot/thermometer/+/temperature")
        wait_for(
            lambda: len(from_device(observer.received, "device002")) >= 5,
            timeout=20,
            what="device002's thermometer to reconnect and publish",
        )
        assert from_device(observer.received, "device001") == []
        assert refused(broker.port, Identity.of(generated_lab.certs_dir, "device001"))
        assert serial in crl_serials(client.get("/v1/ssl/crl").data)
    finally:
        for device in devices:
            device.stop()
        observer.close()


def test_revocation_requests(
    generated_lab: LabEnv, app: Flask, client: FlaskClient, viewer_headers: dict[str, str]
) -> None:
    passphrase = generated_lab.passphrase
    files = BrokerFiles(generated_lab.certs_dir, generated_lab.data_dir)
    before = lab_state(generated_lab)
    for body, status, field in [
        ({"name": "device002", "pass": "wrong"}, 403, "pass"),
        ({"name": "ghost", "pass": passphrase}, 404, "name"),
        ({"serial": "abcdef", "pass": passphrase}, 404, "serial"),
        ({"name": "dashboard", "pass": passphrase}, 409, "name"),
        ({"serial": serial_of(generated_lab, "mosquitto"), "pass": passphrase}, 409, "serial"),
        ({"name": "device002", "pass": passphrase, "reason": "bored"}, 400, "reason"),
        ({"pass": passphrase}, 400, "name"),
    ]:
        response = client.post("/v1/ssl/revoke", json=body)
        assert (response.status_code, response.json.get("field")) == (status, field), body
    assert lab_state(generated_lab) == before  # nothing written by any refusal

    serial = serial_of(generated_lab, "device002")
    response = client.post("/v1/ssl/revoke", json={"serial": serial.upper(), "pass": passphrase})
    assert response.status_code == 200 and response.json["revoked"] == [serial]
    assert serial in crl_serials(client.get("/v1/ssl/crl").data)
    assert "user device002\ntopic deny #" in files.acl.read_text()
    row = app.extensions["test_ca"].service.inventory.by_serial(serial)
    assert (row.status, row.revocation_reason) == ("revoked", "unspecified")
    listed = client.get("/v1/ssl/certs?name=device002&status=revoked", headers=viewer_headers).json["certificates"]
    assert [r["serial"] for r in listed] == [serial]

    again = client.post("/v1/ssl/revoke", json={"name": "device002", "pass": passphrase})
    assert again.status_code == 200 and (again.json["revoked"], again.json["already_revoked"]) == ([], [])

    # the revoked key is never re-signed (Step 9: renewal takes only the current certificate)...
    refused = client.post("/v1/ssl/sign", json={"name": "device002", "pass": passphrase, "days": 30})
    assert refused.status_code == 403 and "user device002\ntopic deny #" in files.acl.read_text()
    # ...a new certificate for a new key lifts the ACL deny; the old serial stays on the CRL
    renewed = client.post(
        "/v1/ssl/sign", json={"name": "device002", "pass": passphrase, "days": 30, "csr": make_csr("device002")[0]}
    )
    assert renewed.status_code == 201
    assert "user device002" not in files.acl.read_text()
    assert serial in crl_serials(files.crl.read_bytes())
    assert renewed.json["serial"] not in crl_serials(files.crl.read_bytes())


def _stale_crl(lab: LabEnv, days_left: int) -> None:
    root = lab.certs_dir / "root_ca"
    ca = CertificateAuthority.load(
        (root / "root_ca.crt").read_bytes(), (root / "root_ca.key").read_bytes(), lab.passphrase
    )
    crl = ca.build_crl([], crl_number=7, next_update=dt.timedelta(days=days_left))
    atomic_write(BrokerFiles(lab.certs_dir, lab.data_dir).crl, crl.public_bytes(serialization.Encoding.PEM))


def test_crl_is_refreshed_well_before_next_update(generated_lab: LabEnv) -> None:
    files = BrokerFiles(generated_lab.certs_dir, generated_lab.data_dir)
    _stale_crl(generated_lab, days_left=3)
    app = make_app(generated_lab, CRL_REFRESH_SECONDS=0.2)  # the app's timer, checking often
    try:

        def refreshed() -> bool:
            crl = x509.load_pem_x509_crl(files.crl.read_bytes())
            return crl.next_update_utc - dt.datetime.now(dt.UTC) > CRL_LIFETIME - dt.timedelta(hours=1)

        wait_for(refreshed, timeout=10, what="the CRL to be rewritten")
        assert current_crl_number(files.crl) == 8
        # a missing CRL is rewritten too: revocation is never silently off
        files.crl.unlink()
        wait_for(files.crl.exists, timeout=10, what="the CRL to be restored")
        assert x509.load_pem_x509_crl(files.crl.read_bytes()).is_signature_valid(
            load_certificate((generated_lab.certs_dir / "root_ca" / "root_ca.crt").read_bytes()).public_key()
        )
    finally:
        close_app(app)


def test_crl_refresh_needs_the_unlocked_key(generated_lab: LabEnv, caplog: pytest.LogCaptureFixture) -> None:
    _stale_crl(generated_lab, days_left=3)
    stale = BrokerFiles(generated_lab.certs_dir, generated_lab.data_dir).crl.read_bytes()
    service = CAService(generated_lab.settings(CA_PASSPHRASE=""))
    try:
        assert service.refresh_crl() is False
        assert "CA key is locked" in caplog.text
        # the first request with the right passphrase unlocks it; from then on the refresh works
        assert service.sign({"name": "device001", "pass": generated_lab.passphrase, "days": 5}, source="t").ok
        assert service.refresh_crl() is True
        assert BrokerFiles(generated_lab.certs_dir, generated_lab.data_dir).crl.read_bytes() != stale
    finally:
        service.close()


def revoked_at_broker(lab: LabEnv, port: int, name: str) -> bool | None:
    return certificate_revoked(Identity.of(lab.certs_dir, name), "localhost", port)


def crl_lists(lab: LabEnv, path: Any, serial: str) -> bool:
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return False
    root = load_certificate((lab.certs_dir / "root_ca" / "root_ca.crt").read_bytes())
    return crl.is_signature_valid(root.public_key()) and serial in {format(e.serial_number, "x") for e in crl}


@pytest.mark.integration
def test_a_damaged_or_missing_crl_never_fails_open_and_is_repaired(generated_lab: LabEnv, broker: Broker) -> None:
    files = BrokerFiles(generated_lab.certs_dir, generated_lab.data_dir)
    app = make_app(generated_lab, CRL_REFRESH_SECONDS=CRL_CHECK_INTERVAL)  # the running lab's timer
    try:
        serial = serial_of(generated_lab, "device001")
        assert (
            app.test_client()
            .post("/v1/ssl/revoke", json={"name": "device001", "pass": generated_lab.passphrase})
            .status_code
            == 200
        )
        wait_for(lambda: revoked_at_broker(generated_lab, broker.port, "device001"), what="the CRL to be enforced")

        # junk in the published CRL, then a reload: the broker still refuses the revoked certificate
        reloads = broker.log().count("Reloading config")
        files.crl.write_bytes(b"junk\n")
        broker.reload()
        wait_for(lambda: broker.log().count("Reloading config") > reloads, what="the reload")
        assert revoked_at_broker(generated_lab, broker.port, "device001") is True
        assert revoked_at_broker(generated_lab, broker.port, "device002") is False
        wait_for(lambda: crl_lists(generated_lab, files.crl, serial), timeout=10, what="the CRL to be repaired")

        # deleted before a broker start: the same
        broker.stop()
        files.crl.unlink()
        broker.start()
        assert revoked_at_broker(generated_lab, broker.port, "device001") is True
        assert revoked_at_broker(generated_lab, broker.port, "device002") is False
        wait_for(lambda: crl_lists(generated_lab, files.crl, serial), timeout=10, what="the CRL to be repaired")

        # the broker's own copy gone too: Mosquitto refuses to start at all (everyone refused, never open)...
        ca_of(app).stop_crl_refresh()  # (the CA's timer paused, or it could repair first)
        broker.stop()
        files.crl.unlink()
        files.broker_crl.write_bytes(b"")
        # (It may open its listening socket before it reads the CRL: so wait for its exit, not for a refused connect.)
        with open(broker.log_path, "ab") as log:
            refused_start = subprocess.Popen(broker_command(broker.files), stdout=log, stderr=log)
        assert refused_start.wait(timeout=30) != 0, broker.log()
        # ...until the CA (its timer running again) rewrote both from the inventory, within 10 s
        ca_of(app).start_crl_refresh(CRL_CHECK_INTERVAL)
        wait_for(
            lambda: crl_lists(generated_lab, files.broker_crl, serial) and crl_lists(generated_lab, files.crl, serial),
            timeout=10,
            what="both CRLs to be rewritten",
        )
        broker.start()
        assert revoked_at_broker(generated_lab, broker.port, "device001") is True
        assert revoked_at_broker(generated_lab, broker.port, "device002") is False
    finally:
        close_app(app)

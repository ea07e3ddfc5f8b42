"""Revocation that the broker enforces: CRL for new connections, an ACL deny for connections already open,
both kept across a broker restart; and a CRL that is always fresh."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import time
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Flask
from flask.testing import FlaskClient

from ca.process import CRL_CHECK_INTERVAL
from lab.mqtt import Identity, certificate_revoked
from pki.authority import CertificateAuthority, load_certificate
from pki.broker import CRL_LIFETIME, DYNSEC_TOPIC, BrokerFiles, broker_command, current_crl_number, disconnect_command
from pki.service import CAService
from pki.store import atomic_write

from .ca_support import (
    api_token,
    ca_of,
    close_app,
    disconnect_as_the_ca,
    lab_state,
    make_app,
    make_csr,
    mqtt_connected,
    revoke_in_process,
)
from .conftest import PROJECT_ROOT, LabEnv
from .support import Broker, Collector, ThermometerProcess, established_to, refused, wait_for


def serial_of(lab: LabEnv, name: str) -> str:
    return format(load_certificate((lab.certs_dir / name / f"{name}.crt").read_bytes()).serial_number, "x")


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


# -- Step 10: revocation takes the live connection ------------------------------------------------------


def page_data(client: FlaskClient) -> dict[str, Any]:
    """/api/data as a logged-in viewer sees it (a viewer token of the app, made once)."""
    app = client.application
    if "test_viewer" not in app.config:
        app.config["test_viewer"] = {"Authorization": f"Bearer {api_token(app)}"}
    response = client.get("/api/data", headers=app.config["test_viewer"])
    assert response.status_code == 200
    return response.json


def dashboard_device(client: FlaskClient, device: str) -> dict[str, Any]:
    return page_data(client)["device_data"].get(device) or {}


@pytest.mark.integration
def test_revocation_closes_the_connection_and_the_thermometer_stops(
    generated_lab: LabEnv, broker: Broker, start_thermometer: Any
) -> None:
    app = make_app(generated_lab, MQTT_ENABLED=True)
    client = app.test_client()
    try:
        assert mqtt_connected(app)
        env = {k: v for k, v in generated_lab.env.items() if k != "CA_PASSPHRASE"}
        devices = {
            d: start_thermometer({**env, "DEVICE_ID": d, "PUBLISH_INTERVAL": "0.2"}) for d in ("device001", "device002")
        }
        pids = {d: t.process.pid for d, t in devices.items()}
        wait_for(
            lambda: (
                all(
                    dashboard_device(client, d).get("status") == "online"
                    and dashboard_device(client, d).get("readings", 0) >= 3
                    for d in devices
                )
                and all(established_to(pids[d], broker.port) == 1 for d in devices)
            ),
            timeout=20,
            what="both thermometers connected and publishing",
        )
        serial = serial_of(generated_lab, "device001")

        response = client.post("/v1/ssl/revoke", json={"name": "device001", "pass": generated_lab.passphrase})
        assert response.status_code == 200 and response.json["revoked"] == [serial]
        replied = time.monotonic()

        # Within 2 s of the reply: the broker closed the connection, and the dashboard says revoked and offline.
        wait_for(
            lambda: established_to(pids["device001"], broker.port) == 0,
            timeout=2,
            interval=0.02,
            what="device001's TCP connection to close",
        )

        def shown_revoked_and_offline() -> bool:
            data = page_data(client)
            device = data["device_data"].get("device001") or {}
            rows = [r["status"] for r in data["certs_info"] if r["name"] == "device001" and r["current"]]
            return (device.get("status"), device.get("certificate"), rows) == ("offline", "revoked", ["revoked"])

        wait_for(
            shown_revoked_and_offline,
            timeout=max(0.1, replied + 2 - time.monotonic()),
            interval=0.02,
            what="/api/data to show device001 revoked and offline",
        )
        assert "device001 been disconnected by administrative action" in broker.log()

        # The thermometer recognises the revocation, says so in one line, and exits with its own code.
        thermometer = devices["device001"]
        assert thermometer.process.wait(timeout=15) == 3, thermometer.output()
        lines = [line for line in thermometer.lines if "the CA revoked its certificate" in line]
        assert len(lines) == 1 and serial in lines[0] and "--devices device001" in lines[0], thermometer.output()

        # The retained presence a newcomer sees is `offline`; device002 never noticed anything.
        observer = Collector(generated_lab.certs_dir, "dashboard", broker.port, client_id="observer").connect()
        try:
            observer.subscribe("iot/thermometer/+/status")
            wait_for(
                lambda: (
                    {m.topic: m.payload for m in observer.received}.get("iot/thermometer/device001/status")
                    == b"offline"
                ),
                timeout=5,
                what="retained offline",
            )
        finally:
            observer.close()
        before = dashboard_device(client, "device002")["readings"]
        wait_for(
            lambda: dashboard_device(client, "device002")["readings"] >= before + 5,
            timeout=10,
            what="more device002 readings",
        )
        assert established_to(pids["device002"], broker.port) == 1
        assert dashboard_device(client, "device002")["status"] == "online"
        assert "lost the broker" not in devices["device002"].output()
    finally:
        app.extensions["live_hub"].close()
        close_app(app)


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


@pytest.mark.integration
def test_on_revoked_wait_keeps_the_thermometer_waiting_until_a_new_certificate(
    generated_lab: LabEnv, broker: Broker, start_thermometer: Any
) -> None:
    """The compose lab's setting (a restart policy would restart an exiting thermometer in a loop)."""
    env = {k: v for k, v in generated_lab.env.items() if k != "CA_PASSPHRASE"}
    device = start_thermometer({**env, "DEVICE_ID": "device001", "PUBLISH_INTERVAL": "0.2", "ON_REVOKED": "wait"})
    device.wait_output("device001 connected")
    revoke_in_process(generated_lab, "device001")
    wait_for(lambda: "Reloading config" in broker.log(), what="the broker to reload")
    disconnect_as_the_ca(generated_lab, broker.port, "device001")
    device.wait_output("waiting for a new certificate")
    assert device.process.poll() is None
    attempts = broker.log().count("New connection from")
    time.sleep(2)  # a reconnect loop would show here
    assert broker.log().count("New connection from") == attempts
    assert established_to(device.process.pid, broker.port) == 0

    # the next step it printed: a new certificate; it notices and carries on with it
    generated_lab.lab().generate(["device001"], reissue_revoked=True)
    device.wait_output("found a new certificate", timeout=15)
    wait_for(lambda: device.output().count("device001 connected") == 2, timeout=15, what="the reconnect")
    assert device.terminate() == 0


@pytest.mark.integration
def test_only_the_ca_identity_can_disconnect_a_client(generated_lab: LabEnv, broker: Broker) -> None:
    """A device (or the provisioner) publishing the plugin's commands kicks nobody and learns nothing."""
    victim = Collector(generated_lab.certs_dir, "device001", broker.port).connect()
    attackers = [
        Collector(generated_lab.certs_dir, name, broker.port).connect() for name in ("device002", "provisioner")
    ]
    try:
        for attacker in attackers:
            assert attacker.subscribe("$CONTROL/#")[0].is_failure or attacker.nothing(within=0.1)
            attacker.client.publish(DYNSEC_TOPIC, disconnect_command("device001"), qos=1)
            attacker.client.publish(DYNSEC_TOPIC, b'{"commands":[{"command":"listClients"}]}', qos=1)
        assert victim.nothing(within=1.0)
        assert victim.connected.is_set() and not victim.disconnected.is_set()
        assert "administrative action" not in broker.log() and "dynsec:" not in broker.log()
        for attacker in attackers:
            assert attacker.nothing(within=0.2)  # no response from the plugin
    finally:
        for collector in (victim, *attackers):
            collector.close()


@pytest.mark.integration
def test_revocation_with_a_broker_that_reloads_only_by_polling_as_in_docker(
    generated_lab: LabEnv, start_thermometer: Any
) -> None:
    """The compose lab's broker: nobody can signal it, its entrypoint polls the files every second
    (mosquitto/entrypoint.sh). The connection is still closed for good within 2 s, and the thermometer
    (ON_REVOKED=wait, as compose sets it) waits instead of reconnecting."""
    files = BrokerFiles(generated_lab.certs_dir, generated_lab.data_dir)
    conf = generated_lab.root / "polled.conf"  # the CA finds no pid file: it cannot SIGHUP this broker
    conf.write_text(files.conf.read_text().replace(str(files.pid_file), str(generated_lab.root / "polled.pid")))
    log_path = generated_lab.root / "entrypoint.log"
    env = {**os.environ, "POLL_SECONDS": "1", "TMPDIR": str(generated_lab.root)}
    with open(log_path, "wb") as out:
        entry = subprocess.Popen(
            ["sh", str(PROJECT_ROOT / "mosquitto" / "entrypoint.sh"), str(conf)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    app = None
    try:
        wait_for(lambda: "running" in log_path.read_text(), what="the broker")
        app = make_app(generated_lab, MQTT_ENABLED=True)
        client = app.test_client()
        assert mqtt_connected(app)
        env = {k: v for k, v in generated_lab.env.items() if k != "CA_PASSPHRASE"}
        devices = {
            d: start_thermometer({**env, "DEVICE_ID": d, "PUBLISH_INTERVAL": "0.2", "ON_REVOKED": "wait"})
            for d in ("device001", "device002")
        }
        pid = devices["device001"].process.pid
        port = generated_lab.broker_port
        wait_for(
            lambda: all(dashboard_device(client, d).get("readings", 0) >= 3 for d in devices),
            timeout=20,
            what="both thermometers publishing",
        )
        assert (
            client.post("/v1/ssl/revoke", json={"name": "device001", "pass": generated_lab.passphrase}).status_code
            == 200
        )
        replied = time.monotonic()
        wait_for(
            lambda: (
                established_to(pid, port) == 0
                and (
                    dashboard_device(client, "device001").get("status"),
                    dashboard_device(client, "device001").get("certificate"),
                )
                == ("offline", "revoked")
            ),
            timeout=2,
            interval=0.02,
            what="device001 closed, revoked and offline",
        )
        # A reconnect before the broker's poll reloaded the CRL is closed again by 2 s, and then for good.
        while time.monotonic() < replied + 2:
            time.sleep(0.05)
        until = time.monotonic() + 3
        while time.monotonic() < until:
            assert established_to(pid, port) == 0, devices["device001"].output()
            assert dashboard_device(client, "device001").get("status") == "offline"
            time.sleep(0.05)
        devices["device001"].wait_output("waiting for a new certificate", timeout=10)
        assert devices["device001"].process.poll() is None
        assert established_to(devices["device002"].process.pid, port) == 1
        assert dashboard_device(client, "device002").get("status") == "online"
    finally:
        if app is not None:
            app.extensions["live_hub"].close()
            close_app(app)
        os.killpg(entry.pid, signal.SIGTERM)
        entry.wait(timeout=15)

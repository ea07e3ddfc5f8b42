"""Revocation takes the live connection: the CA has the broker close it within 2 s, the dashboard shows the device
revoked and offline, the thermometer stops (or waits, as in Docker); and only the CA identity can disconnect."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import pytest
from flask.testing import FlaskClient

from pki.broker import DYNSEC_TOPIC, BrokerFiles, disconnect_command

from .ca_support import (
    api_token,
    close_app,
    disconnect_as_the_ca,
    make_app,
    mqtt_connected,
    revoke_in_process,
)
from .conftest import PROJECT_ROOT, LabEnv, serial_of
from .support import Broker, Collector, established_to, wait_for


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

"""Step 9, secrets: no passphrase, token or private key leaks, whatever a publisher sends; only the CA reads the
request topics; a retained request is never processed; a failure is never answered on a third party's topic.

Real Mosquitto with the generated ACL, the real app (its MQTT client holds the `dashboard` identity, which is the
CA role until Step 12), real device and provisioner certificates.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from flask import Flask
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dashboard import socketio
from pki.authority import generate_private_key, key_pem

from .ca_support import api_token, close_app, lab_state, make_app, make_csr
from .conftest import LabEnv
from .support import Broker, Collector, wait_for
from .test_ca_mqtt import ask, start_app, wait_ready

pytestmark = pytest.mark.integration

REQUEST_TOPICS = ("ssl/sign", "ssl/create", "ssl/renew/device001")


def _secret_payloads(passphrase: str, token: str, key: str) -> list[bytes]:
    """A secret in every shape a careless or hostile publisher might send: JSON, not JSON, binary, truncated."""
    secrets_ = [passphrase, token, key]
    payloads: list[bytes] = []
    for secret in secrets_:
        payloads += [
            json.dumps({"name": "leak1", "days": 5, "pass": secret}).encode(),
            json.dumps({"name": "leak1", "days": 5, "pass": secret})[:-3].encode(),  # truncated
            f"{{'name': 'leak1', 'pass': '{secret}'}}".encode(),  # single quotes
            f"pass={secret}".encode(),
            secret.encode(),
            b"\xff\x00" + secret.encode() + b"\xfe",  # binary around it
            json.dumps({"name": "leak1", "days": 5, "token": secret, "csr": "junk"}).encode(),
            json.dumps({"csr": secret}).encode(),
            json.dumps([{"pass": secret}]).encode(),
            json.dumps({"name": "leak1", "days": 5, "pass": passphrase, "key": secret, "cn": "x" * 80}).encode(),
        ]
    return payloads


def _markers(passphrase: str, token: str, key: str) -> list[str]:
    body = key.splitlines()[1]  # the first base64 line of the private key
    return [passphrase, token, body]


def test_request_payloads_are_never_shown_raw(generated_lab: LabEnv) -> None:
    """The dashboard's MQTT log, /api/data and Socket.IO: a request topic's payload is never shown, JSON or not."""
    app = make_app(generated_lab)
    try:
        hub = app.extensions["live_hub"]
        viewer = {"Authorization": f"Bearer {api_token(app)}"}  # a logged-in console sees what is shown
        tab = socketio.test_client(app, headers=viewer)
        assert tab.is_connected()
        passphrase, token = generated_lab.passphrase, "tok_" + uuid.uuid4().hex
        key = key_pem(generate_private_key("ec")).decode()
        for topic in REQUEST_TOPICS:
            for payload in _secret_payloads(passphrase, token, key):
                msg = mqtt.MQTTMessage(topic=topic.encode())
                msg.payload = payload
                hub.on_ca_message(msg)
        # a reply that is not JSON is not shown either (only the CA writes there, but still)
        msg = mqtt.MQTTMessage(topic=b"ssl/leak1")
        msg.payload = f"key={key}; pass={passphrase}".encode()
        hub.on_ca_message(msg)
        hub.flush()
        data = app.test_client().get("/api/data", headers=viewer)
        assert data.status_code == 200
        shown = json.dumps(data.get_json())
        shown += json.dumps(tab.get_received()) + json.dumps(hub.snapshot())
        for marker in _markers(passphrase, token, key):
            assert marker not in shown
        assert "not shown" in shown
        tab.disconnect()
    finally:
        close_app(app)


@pytest.fixture
def mqtt_app(generated_lab: LabEnv, broker: Broker) -> Iterator[Flask]:
    app = start_app(generated_lab)
    yield app
    close_app(app)


def test_only_the_ca_reads_request_topics_and_nobody_reads_anothers_reply(
    generated_lab: LabEnv, mqtt_app: Flask, broker: Broker
) -> None:
    certs, port = generated_lab.certs_dir, broker.port
    provisioner = Collector(certs, "provisioner", port, protocol=mqtt.MQTTv5).connect()
    snoop = Collector(certs, "device002", port).connect()
    device = Collector(certs, "device001", port, protocol=mqtt.MQTTv5).connect()
    try:
        for client in (provisioner, snoop):
            for topic in ("ssl/#", "ssl/sign", "ssl/create", "ssl/renew/+", "ssl/+", "#"):
                client.subscribe(topic)
        device.subscribe("ssl/device001/#")
        wait_ready(device, "device001")
        # device001 creates an entity over MQTT: the reply carries a private key, for the one who asked only
        body = {"name": "sensor-k", "days": 5, "pass": generated_lab.passphrase, "org": "ACME"}
        reply = json.loads(ask(device, "ssl/create", json.dumps(body), "ssl/device001/replies").payload)
        assert "PRIVATE KEY" in reply["key"]
        pem, _key = make_csr("device001")
        device.publish("ssl/renew/device001", json.dumps({"csr": pem}))
        device.publish("ssl/sign", json.dumps({"name": "device002", "days": 5, "pass": "wrong"}))
        wait_for(lambda: mqtt_app.extensions["test_ca"].mqtt.idle, what="the CA to finish")
        for client in (provisioner, snoop):
            assert client.nothing(within=0.5), [(m.topic, m.payload[:60]) for m in client.received]
    finally:
        for client in (provisioner, snoop, device):
            client.close()


def test_retained_requests_are_never_processed(generated_lab: LabEnv, broker: Broker) -> None:
    app = start_app(generated_lab)
    device = Collector(generated_lab.certs_dir, "device001", broker.port).connect()
    try:
        device.subscribe("ssl/device001")
        wait_ready(device, "device001", v5=False)
        before = lab_state(generated_lab)
        pem, _key = make_csr("device001")
        request = json.dumps({"name": "device001", "days": 5, "pass": generated_lab.passphrase, "csr": pem})
        device.publish("ssl/sign", request, retain=True)
        endpoint = app.extensions["test_ca"].mqtt
        assert device.nothing("ssl/device001", within=1.5), "a retained request was answered"
        assert endpoint.stats()["retained_ignored"] == 1
        # the CA reconnects (a restart): still nothing, the broker no longer holds the request
        close_app(app)
        app = start_app(generated_lab)
        wait_ready(device, "device001", v5=False)
        assert app.extensions["test_ca"].mqtt.stats()["retained_ignored"] == 0
        assert device.nothing("ssl/device001", within=1.0)
        assert lab_state(generated_lab) == before
    finally:
        device.close()
        close_app(app)


def test_failures_are_never_answered_on_a_third_partys_topic(
    generated_lab: LabEnv, mqtt_app: Flask, broker: Broker
) -> None:
    certs, port = generated_lab.certs_dir, broker.port
    victim = Collector(certs, "device002", port).connect()
    attacker = Collector(certs, "device001", port, protocol=mqtt.MQTTv5).connect()
    try:
        victim.subscribe("ssl/device002")
        attacker.subscribe("ssl/device001/#")
        wait_ready(attacker, "device001")
        bad = [
            {"name": "device002", "days": 5, "pass": "wrong"},
            {"name": "device002"},
            {"name": "device002", "days": 5, "pass": generated_lab.passphrase, "csr": make_csr("device001")[0]},
        ]
        for body in bad:
            attacker.publish("ssl/sign", json.dumps(body))
            if "csr" in body:  # create ignores a csr: that one would be a valid create of device002
                continue
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = "ssl/device002"  # an attempt to aim the failure at the victim
            attacker.publish("ssl/create", json.dumps(body), properties=properties)
        attacker.publish("ssl/sign", b"not json")
        # the attacker's own failures still reach it, on its own response topic
        status = ask(attacker, "ssl/sign", json.dumps(bad[0]), "ssl/device001/replies").properties.UserProperty
        assert ("status", "403") in status
        wait_for(lambda: mqtt_app.extensions["test_ca"].mqtt.idle, what="the CA to finish")
        assert victim.nothing(within=0.5), [m.payload[:80] for m in victim.received]
    finally:
        victim.close()
        attacker.close()


def test_fuzzing_the_ca_topics_leaks_no_secret(
    generated_lab: LabEnv, mqtt_app: Flask, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """Thousands of random, malformed and secret-carrying payloads on every CA topic: no secret in /api/data,
    Socket.IO, the logs (the app's and the broker's) or the database."""
    caplog.set_level(logging.DEBUG)
    rng = random.Random(9)
    passphrase = generated_lab.passphrase
    token = mqtt_app.test_client().post("/v1/ssl/tokens", json={"name": "fuzz-t", "pass": passphrase}).json["token"]
    key = key_pem(generate_private_key("ec")).decode()
    shapes = _secret_payloads(passphrase, token, key)
    secrets_ = [passphrase, token, key]
    payloads: list[bytes] = []
    for i in range(3000):
        kind = i % 4
        if kind == 0:
            payloads.append(rng.choice(shapes))
        elif kind == 1:  # random bytes with a secret spliced in
            noise = rng.randbytes(rng.randrange(0, 64))
            cut = rng.randrange(0, len(noise) + 1)
            payloads.append(noise[:cut] + rng.choice(secrets_).encode() + noise[cut:])
        elif kind == 2:  # a plausible request, mutated
            body: dict[str, Any] = {
                "name": rng.choice(["fuzz1", "fuzz2", "AA:BB:CC:DD:EE:0F", "device001", "x/y"]),
                "days": rng.choice([1, "5", -1, "x"]),
                "pass": rng.choice(secrets_),
                rng.choice(["token", "key", "csr", "cn"]): rng.choice(secrets_),
            }
            text = json.dumps(body)
            payloads.append(text[: rng.randrange(1, len(text) + 1)].encode())
        else:
            payloads.append(rng.randbytes(rng.randrange(0, 200)))
    device = Collector(generated_lab.certs_dir, "device001", broker.port).connect()
    viewer = {"Authorization": f"Bearer {api_token(mqtt_app)}"}  # a logged-in console sees what is shown
    tab = socketio.test_client(mqtt_app, headers=viewer)
    assert tab.is_connected()
    endpoint = mqtt_app.extensions["test_ca"].mqtt
    start = endpoint.stats()["handled"]
    try:
        for i, payload in enumerate(payloads):
            device.client.publish(REQUEST_TOPICS[i % 3], payload, qos=1)
        wait_for(
            lambda: endpoint.stats()["handled"] - start >= len(payloads),
            timeout=60,
            what="every fuzz request to be handled",
        )
    finally:
        device.close()
    assert "500" not in endpoint.stats()["by_status"]
    hub = mqtt_app.extensions["live_hub"]
    hub.flush()
    data = mqtt_app.test_client().get("/api/data", headers=viewer)
    assert data.status_code == 200
    shown = json.dumps(data.get_json()) + json.dumps(tab.get_received())
    tab.disconnect()
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records) + broker.log()
    database = b"".join(p.read_bytes() for p in generated_lab.data_dir.rglob("*.db*"))
    for marker in _markers(passphrase, token, key):
        assert marker not in shown
        assert marker not in logged
        assert marker.encode() not in database
    # The dashboard is not the CA (Step 12): its identity reads nothing under ssl/, so its log has no CA traffic.
    assert not [line for line in hub.logs() if line["topic"].startswith("ssl/")]

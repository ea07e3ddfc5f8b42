"""The CA's MQTT endpoint through a real Mosquitto: the CA replica (identity `ca-1`, the CA role) answers on
ssl/<name>; devices and the `provisioner` publish requests and read only their own replies
(ssl/<CN>, and MQTT v5 response topics under ssl/<CN>/)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .ca_support import check_issued, close_app, concrete_body, json_values, lab_state, make_app, make_csr, request_like
from .conftest import LabEnv
from .support import Broker, Collector, wait_for

pytestmark = pytest.mark.integration


def _status(message: mqtt.MQTTMessage) -> int | None:
    for key, value in getattr(message.properties, "UserProperty", None) or []:
        if key == "status":
            return int(value)
    return None


def wait_ready(client: Collector, cn: str = "provisioner", v5: bool = True) -> None:
    """The app has subscribed once a probe request gets its (error) reply; MQTT gives no other signal.

    A v5 client asks with a response topic under its own CN; a v3.1.1 device sends an empty renewal of its own
    certificate (failures of sign/create are answered only on a response topic, renewals on ssl/<CN>).
    """
    reply_topic = f"ssl/{cn}/ready" if v5 else f"ssl/{cn}"
    if v5:
        client.subscribe(reply_topic)

    def answered() -> bool:
        if v5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = reply_topic
            client.publish("ssl/sign", json.dumps({"name": "probe"}), properties=properties)
        else:
            client.publish(f"ssl/renew/{cn}", "{}")
        try:
            client.expect(reply_topic, timeout=0.5)
        except AssertionError:
            return False
        return True

    wait_for(answered, timeout=15, interval=0, what="the CA endpoint to answer a probe")


REPLIES = "ssl/provisioner/replies"


def ask(client: Collector, topic: str, payload: bytes | str, reply_topic: str = REPLIES) -> mqtt.MQTTMessage:
    """One request with a response topic of the asker's own, and its reply (matched by CorrelationData)."""
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = reply_topic
    correlation = uuid.uuid4().bytes
    properties.CorrelationData = correlation
    client.publish(topic, payload, properties=properties)
    while True:
        message = client.expect(reply_topic)
        if message.properties.CorrelationData == correlation:
            return message


def expect_success(client: Collector, topic: str) -> dict[str, Any]:
    """The next reply on `topic` that is not an error (late answers to readiness probes are skipped)."""
    while True:
        reply = json.loads(client.expect(topic).payload)
        if "error" not in reply:
            return reply


def start_app(lab: LabEnv, **config: Any) -> Flask:
    app = make_app(lab, MQTT_ENABLED=True, **config)
    assert app.extensions["mqtt_bridge"].wait_connected(10), app.extensions["mqtt_bridge"].status()
    ca = app.extensions["test_ca"]
    assert ca.connection.wait_connected(10), ca.health()
    return app


@pytest.fixture
def mqtt_app(generated_lab: LabEnv, broker: Broker) -> Iterator[Flask]:
    app = start_app(generated_lab)
    yield app
    close_app(app)


@pytest.fixture
def provisioner(generated_lab: LabEnv, mqtt_app: Flask, broker: Broker) -> Iterator[Collector]:
    """The provisioner identity (MQTT v5): may publish requests for any name; reads replies on its own topics."""
    client = Collector(generated_lab.certs_dir, "provisioner", broker.port, protocol=mqtt.MQTTv5).connect()
    client.subscribe("ssl/provisioner/#")
    wait_ready(client)
    yield client
    client.close()


def test_device_publishes_a_csr_and_gets_its_certificate(
    generated_lab: LabEnv, mqtt_app: Flask, provisioner: Collector, broker: Broker
) -> None:
    device = Collector(generated_lab.certs_dir, "device001", broker.port).connect()  # MQTT 3.1.1
    try:
        device.subscribe("ssl/device001")
        pem, key = make_csr("device001")
        device.publish(
            "ssl/sign", json.dumps({"name": "device001", "days": "90", "pass": generated_lab.passphrase, "csr": pem})
        )
        reply = json.loads(device.expect("ssl/device001").payload)
        assert "error" not in reply, reply
        cert = check_issued(reply, key)
        assert "key" not in reply
        assert 89 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 90
        record = mqtt_app.extensions["test_ca"].service.inventory.by_serial(reply["serial"])
        assert (record.name, record.issued_via, record.requester) == ("device001", "mqtt", "mqtt:device001")
    finally:
        device.close()


def test_v5_request_gets_its_reply_on_the_response_topic(
    generated_lab: LabEnv, mqtt_app: Flask, provisioner: Collector
) -> None:
    pem, key = make_csr("sensor-v5")
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = "ssl/provisioner/replies/7"
    properties.CorrelationData = b"\x00req-42\xff"
    provisioner.publish(
        "ssl/sign",
        json.dumps({"name": "sensor-v5", "days": 30, "pass": generated_lab.passphrase, "csr": pem}),
        properties=properties,
    )
    message = provisioner.expect("ssl/provisioner/replies/7")
    assert message.properties.CorrelationData == b"\x00req-42\xff"
    assert _status(message) == 201
    check_issued(json.loads(message.payload), key)
    # the same reply also went to ssl/<name>, as for every certificate; the provisioner does not read it there
    # (it is not its reply topic), nor does the dashboard (not the CA since Step 12: nothing under ssl/ for it)
    assert not [m for m in provisioner.received if m.topic == "ssl/sensor-v5"], "not the provisioner's topic"
    assert not [line for line in mqtt_app.extensions["live_hub"].logs() if line["topic"].startswith("ssl/")]
    endpoint = mqtt_app.extensions["test_ca"].mqtt
    wait_for(lambda: endpoint.idle, what="the endpoint to be idle")
    assert len(mqtt_app.extensions["test_ca"].service.inventory.list(name="sensor-v5")) == 1
    # a request with no usable name can still be answered on its response topic
    properties.CorrelationData = b"bad-1"
    provisioner.publish("ssl/create", b"{not json", properties=properties)
    error = provisioner.expect("ssl/provisioner/replies/7")
    assert (error.properties.CorrelationData, _status(error)) == (b"bad-1", 400)
    assert json.loads(error.payload) == {"error": "the payload is not valid JSON"}


def test_mqtt_and_http_give_the_same_answers(generated_lab: LabEnv, mqtt_app: Flask, provisioner: Collector) -> None:
    passphrase = generated_lab.passphrase
    bodies: list[dict[str, Any]] = [
        {"name": "answer1"},
        {"name": "answer1", "days": "soon", "pass": passphrase},
        {"name": "answer1", "days": 10, "pass": 7},
        {"name": "answer1", "days": 10, "pass": "wrong"},
        {"name": "dashboard", "days": 10, "pass": passphrase},
        {"name": "answer1", "days": 10, "pass": passphrase, "country": "Brazil"},
    ]
    client = mqtt_app.test_client()
    for route, body in [
        *[("sign", b) for b in bodies],
        *[("create", b) for b in bodies],
        ("sign", {"name": "ghost", "days": 10, "pass": passphrase}),
        ("sign", {"name": "answer1", "days": 10, "pass": passphrase, "csr": make_csr("other")[0]}),
    ]:
        http = client.post(f"/v1/ssl/{route}", json=body)
        message = ask(provisioner, f"ssl/{route}", json.dumps(body))
        assert (_status(message), json.loads(message.payload)) == (http.status_code, http.json), (route, body)
    # an identical create over HTTP and then MQTT: the same certificate, whichever transport asks
    create = {"name": "answer2", "days": 10, "pass": passphrase, "org": "ACME"}
    first = client.post("/v1/ssl/create", json=create)
    again = ask(provisioner, "ssl/create", json.dumps(create))
    assert (first.status_code, _status(again)) == (201, 200)
    assert json.loads(again.payload) == first.json


def test_malformed_input_never_stops_the_subscriber(
    generated_lab: LabEnv, mqtt_app: Flask, provisioner: Collector
) -> None:
    endpoint = mqtt_app.extensions["test_ca"].mqtt
    start = endpoint.stats()["received"]
    junk: list[bytes] = [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[]",
        b"null",
        b'"text"',
        b"[" * 50000,
        b'{"name": 5}',
        b'{"name": "a/b", "days": 1}',
        b'{"name": "+"}',
        b'{"name": "#"}',
    ]
    for payload in junk:
        provisioner.publish("ssl/sign", payload)
        provisioner.publish("ssl/create", payload)
    # wrong passphrases for one name: five 403s, then the name is locked out
    statuses = [
        _status(ask(provisioner, "ssl/sign", json.dumps({"name": "victim", "days": 1, "pass": "guess"})))
        for _ in range(6)
    ]
    wait_for(lambda: endpoint.stats()["handled"] == start + 2 * len(junk) + 6, what="every request handled")
    assert statuses == [403] * 5 + [429]
    assert "500" not in endpoint.stats()["by_status"]
    assert mqtt_app.extensions["mqtt_bridge"].connected.is_set()
    # still serving
    pem, key = make_csr("after-junk")
    reply = ask(
        provisioner,
        "ssl/sign",
        json.dumps({"name": "after-junk", "days": 5, "pass": generated_lab.passphrase, "csr": pem}),
    )
    check_issued(json.loads(reply.payload), key)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(json_values, request_like, request_like),
    topic=st.sampled_from(["ssl/sign", "ssl/create"]),
    raw=st.one_of(st.none(), st.binary(max_size=64)),
)
def test_arbitrary_payloads_never_break_the_endpoint(
    generated_lab: LabEnv, mqtt_app: Flask, provisioner: Collector, body: Any, topic: str, raw: bytes | None
) -> None:
    endpoint = mqtt_app.extensions["test_ca"].mqtt
    payload = raw if raw is not None else json.dumps(concrete_body(body, generated_lab.passphrase)).encode()
    before_state = lab_state(generated_lab)
    before = endpoint.stats()
    provisioner.publish(topic, payload)
    wait_for(lambda: endpoint.stats()["handled"] > before["handled"], what="the request to be handled")
    after = endpoint.stats()["by_status"]
    new = [int(s) for s, n in after.items() if n > before["by_status"].get(s, 0)]
    assert len(new) == 1 and new[0] in (200, 201, 400, 403, 404, 409, 429), (new, after)
    if new[0] >= 400:
        assert lab_state(generated_lab) == before_state, "a refused request changed something"
    assert mqtt_app.extensions["mqtt_bridge"].connected.is_set()


def test_shared_subscription_serves_requests(generated_lab: LabEnv, broker: Broker) -> None:
    """The CA always subscribes through the share group `ca`, so its replicas split the requests."""
    app = start_app(generated_lab)
    device = Collector(generated_lab.certs_dir, "device002", broker.port).connect()
    try:
        assert app.extensions["test_ca"].mqtt.topic_filters() == [
            "$share/ca/ssl/sign",
            "$share/ca/ssl/create",
            "$share/ca/ssl/renew/+",
            "$share/ca/ssl/sign/+",
            "$share/ca/ssl/create/+",
        ]
        device.subscribe("ssl/device002")
        wait_ready(device, "device002", v5=False)
        device.publish("ssl/sign", json.dumps({"name": "device002", "days": 7, "pass": generated_lab.passphrase}))
        check_issued(expect_success(device, "ssl/device002"))
    finally:
        device.close()
        close_app(app)


def test_a_device_that_rotates_names_is_locked_out_by_its_certificate(
    generated_lab: LabEnv, mqtt_app: Flask, broker: Broker
) -> None:
    """200 guesses on ssl/sign/<CN>, each for another name: five 403s, then 429 for the CN, whatever it names.

    The broker's ACL lets only <CN> write ssl/sign/<CN>, so the CA counts on the certificate, not the body.
    Another device's correct passphrase is not blocked; the guesser's own correct one is, until the window ends.
    """
    endpoint = mqtt_app.extensions["test_ca"].mqtt
    guesser = Collector(generated_lab.certs_dir, "device002", broker.port, protocol=mqtt.MQTTv5).connect()
    honest = Collector(generated_lab.certs_dir, "device001", broker.port).connect()
    try:
        honest.subscribe("ssl/device001")
        guesser.subscribe("ssl/device002")
        wait_ready(honest, "device001", v5=False)
        start = endpoint.stats()
        for i in range(200):
            guesser.publish("ssl/sign/device002", json.dumps({"name": f"rotated{i}", "days": 1, "pass": f"g{i}"}))
        wait_for(lambda: endpoint.stats()["handled"] >= start["handled"] + 200, timeout=30, what="200 guesses handled")
        after = endpoint.stats()["by_status"]
        grown = {s: n - start["by_status"].get(s, 0) for s, n in after.items() if n > start["by_status"].get(s, 0)}
        assert grown == {"403": 5, "429": 195}, grown
        # the ACL: nobody may speak for another CN (the broker drops the publish; the CA never sees it)
        handled = endpoint.stats()["handled"]
        guesser.publish("ssl/sign/device001", json.dumps({"name": "device001", "days": 1, "pass": "x"}))
        assert honest.nothing("ssl/device001", within=1.0) and endpoint.stats()["handled"] == handled
        # Every failure was answered on the guesser's own ssl/<CN> (it proved its CN), and only there.
        answered = [_status(guesser.expect("ssl/device002")) for _ in range(200)]
        assert (answered.count(403), answered.count(429)) == (5, 195)
        good = {"days": 5, "pass": generated_lab.passphrase}
        honest.publish("ssl/sign/device001", json.dumps({**good, "name": "device001"}))
        check_issued(expect_success(honest, "ssl/device001"))
        guesser.publish("ssl/sign/device002", json.dumps({**good, "name": "device002"}))
        assert _status(guesser.expect("ssl/device002")) == 429
    finally:
        guesser.close()
        honest.close()

"""The dashboard's MQTT bridge: its faster receive path decodes exactly what paho decodes, and routes a real
broker's flood and overlapping subscriptions to the right handlers, nothing lost or duplicated."""

from __future__ import annotations

import json
import socket
import threading

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dashboard.mqtt_bridge import ChunkedReadClient, MqttBridge, PublishProperties, decode_plain_publish
from lab.testing import mqtt_varint as varint

from .conftest import LabEnv
from .support import Broker, Collector, wait_for

pytestmark = pytest.mark.integration


def publish_body(topic: bytes, identifiers: list[int], payload: bytes, extra_properties: bytes = b"") -> bytes:
    """The body (after the fixed header) of a QoS 0 MQTT v5 PUBLISH, as a broker sends it."""
    properties = b"".join(bytes([11]) + varint(i) for i in identifiers) + extra_properties
    return len(topic).to_bytes(2, "big") + topic + varint(len(properties)) + properties + payload


topics = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1,
                 max_size=80).map(str.encode).filter(lambda t: len(t) < 65536)


@settings(max_examples=300, deadline=None)
@given(topic=topics, identifiers=st.lists(st.integers(1, 268_435_455), max_size=3), payload=st.binary(max_size=300))
def test_fast_decode_matches_paho(topic: bytes, identifiers: list[int], payload: bytes) -> None:
    body = publish_body(topic, identifiers, payload)
    paho = _packet.decode_publish(0x30, body, mqtt.MQTTv5)
    fast = decode_plain_publish(body)
    assert fast is not None
    assert fast[0] == paho.topic and fast[2] == paho.payload
    assert fast[1] == getattr(paho.properties, "SubscriptionIdentifier", [])
    assert PublishProperties(fast[1]).json() == paho.properties.json()


def test_anything_else_is_left_to_paho() -> None:
    topic, payload = b"ssl/sign", b"{}"
    response_topic = Properties(PacketTypes.PUBLISH)
    response_topic.ResponseTopic = "ssl/device001"
    packed = response_topic.pack()  # length + properties
    with_other_property = len(topic).to_bytes(2, "big") + topic + packed + payload
    assert _packet.decode_publish(0x30, with_other_property, mqtt.MQTTv5).properties.ResponseTopic == "ssl/device001"
    assert decode_plain_publish(with_other_property) is None
    assert decode_plain_publish(publish_body(b"", [1], payload)) is None  # topic alias: paho's job
    whole = publish_body(topic, [3], payload)
    assert decode_plain_publish(whole[:len(topic) + 3]) is None  # truncated inside the properties
    assert decode_plain_publish(b"\x00") is None
    assert decode_plain_publish(len(topic).to_bytes(2, "big") + topic + b"\x05\x0b\x01") is None  # length too long
    assert decode_plain_publish(len(topic).to_bytes(2, "big") + topic + b"\x02\x0b\x00") is None  # identifier 0


def fixed_header(command: int, body: bytes) -> bytes:
    return bytes([command]) + varint(len(body)) + body


def test_whole_qos0_publishes_are_taken_from_the_chunk_and_the_rest_left_to_paho() -> None:
    client = ChunkedReadClient(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    got: list[mqtt.MQTTMessage] = []
    client.on_message = lambda _client, _userdata, message: got.append(message)
    client._sock = socket.socket()  # "connected": the method only checks that there is one
    first = fixed_header(0x30, publish_body(b"a/1", [1], b"one"))
    retained = fixed_header(0x31, publish_body(b"a/2", [1, 2], b"two"))
    qos1 = fixed_header(0x32, b"\x00\x03a/3" + b"\x00\x07" + b"\x00" + b"three")  # packet id 7, no properties
    last = fixed_header(0x30, publish_body(b"a/4", [], b"four"))
    client._chunk, client._chunk_pos = first + retained + qos1 + last, 0
    client._last_bytes_received = 0.0
    client._take_plain_publishes()
    assert [(m.topic, m.payload, m.retain, m.qos) for m in got] == [("a/1", b"one", False, 0),
                                                                    ("a/2", b"two", True, 0)]
    assert got[1].properties.SubscriptionIdentifier == [1, 2]
    assert client._chunk_pos == len(first + retained)  # the QoS 1 packet (acknowledged by paho) is paho's
    assert client._last_bytes_received > 0  # paho's keepalive clock sees the traffic
    # A PUBLISH split across two reads waits for paho, which reads the rest from the socket.
    got.clear()
    client._chunk, client._chunk_pos = last + first[:6], 0
    client._take_plain_publishes()
    assert [m.topic for m in got] == ["a/4"] and client._chunk_pos == len(last)
    client._sock_close()


def test_per_topic_paho_callbacks_are_refused() -> None:
    client = ChunkedReadClient(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    with pytest.raises(TypeError, match="MqttBridge.subscribe"):
        client.message_callback_add("iot/#", lambda *_: None)


class Recorder:
    def __init__(self) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()

    def __call__(self, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(message)


def test_a_flood_and_overlapping_subscriptions_reach_the_right_handlers(generated_lab: LabEnv,
                                                                       broker: Broker) -> None:
    """2,000 QoS 0 telemetry messages in a burst, a retained status at QoS 1, and an event matched by two
    filters: each handler gets exactly its messages, in order, and a broker restart changes nothing.
    (The dashboard reads nothing under ssl/ since the CA is a process of its own: the overlap is on telemetry.)"""
    bridge = MqttBridge(generated_lab.settings())
    telemetry, status, events_any, events_own = Recorder(), Recorder(), Recorder(), Recorder()
    bridge.subscribe("iot/thermometer/+/temperature", telemetry, qos=0)
    bridge.subscribe("iot/thermometer/+/status", status, qos=1)
    bridge.subscribe("iot/thermometer/+/event", events_any, qos=1)
    bridge.subscribe("iot/thermometer/device001/event", events_own, qos=1)
    device = Collector(generated_lab.certs_dir, "device001", broker.port)
    bridge.start()
    try:
        assert bridge.wait_connected(10), bridge.status()
        device.connect()
        # Once the status arrives, the telemetry subscription (sent before it) is in place too.
        device.publish("iot/thermometer/device001/status", "online", qos=1, retain=True)
        wait_for(lambda: status.messages, what="the status message")

        def burst(first: int, count: int) -> None:
            for seq in range(first, first + count):
                device.client.publish("iot/thermometer/device001/temperature",
                                      json.dumps({"temperature": 20.5, "seq": seq}), qos=1)
            device.publish("iot/thermometer/device001/event", json.dumps({"name": "x"}), qos=1)

        burst(0, 2000)
        wait_for(lambda: len(telemetry.messages) >= 2000 and len(events_own.messages) >= 1, timeout=30,
                 what=f"the burst ({len(telemetry.messages)} telemetry messages so far)")
        wait_for(lambda: len(events_any.messages) >= 1, what="the wildcard copy")

        broker.restart()  # a new connection: nothing of the old one's read chunk may leak into it
        assert bridge.wait_connected(15)
        wait_for(lambda: bridge.connected.is_set() and device.connected.is_set(), timeout=30,
                 what="both clients back")
        wait_for(lambda: len(status.messages) >= 2, timeout=15, what="the retained status after resubscribing")
        burst(2000, 500)
        wait_for(lambda: len(telemetry.messages) >= 2500 and len(events_own.messages) >= 2, timeout=30,
                 what=f"the second burst ({len(telemetry.messages)} telemetry messages so far)")
    finally:
        device.close()
        bridge.stop()

    seqs = [json.loads(m.payload)["seq"] for m in telemetry.messages]
    assert seqs == list(range(2500))  # none lost, none twice, in order
    assert all(m.qos == 0 and m.topic == "iot/thermometer/device001/temperature" for m in telemetry.messages)
    assert isinstance(telemetry.messages[0].properties, PublishProperties)
    assert telemetry.messages[0].properties.SubscriptionIdentifier == [1]
    assert [m.retain for m in status.messages[:2]] == [False, True]  # live, then retained after resubscribing
    assert [m.topic for m in events_own.messages] == ["iot/thermometer/device001/event"] * 2
    assert [m.topic for m in events_any.messages] == ["iot/thermometer/device001/event"] * 2  # one copy each

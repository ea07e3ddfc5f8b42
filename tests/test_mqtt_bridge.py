"""The dashboard's MQTT connections on stock paho: the bridge routes overlapping subscriptions to the right
handlers, the telemetry ingest (its own identity) gets a real broker's flood whole and in order across a broker
restart, and nothing in the project touches a private name of paho or of any other library."""

from __future__ import annotations

import json
import re
import threading

import paho.mqtt.client as mqtt
import pytest

from dashboard.ingest import TelemetryIngest
from dashboard.mqtt_bridge import MqttBridge

from .conftest import PROJECT_ROOT, LabEnv
from .support import Broker, Collector, wait_for

pytestmark = pytest.mark.integration


class Recorder:
    def __init__(self) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()

    def __call__(self, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(message)


# Private names of paho's Client (and the kind of use a subclass makes of them): reading or overriding any of
# these breaks on paho's next release (one was renamed between 2.1 and 2.2).
PRIVATE_PAHO = (
    "_sock_recv",
    "_in_packet",
    "_handle_",
    "_last_bytes_received",
    "_msgtime_mutex",
    "._userdata",
    "_in_callback_mutex",
    "message._topic",
    "_packet_read",
    "_out_packet",
    "._sock",
    "._protocol",
    "from paho.mqtt import _",
    "paho.mqtt._",
)


def test_nothing_in_the_project_uses_a_private_name_of_paho() -> None:
    """A grep of the project's Python files, tests included (none needs paho's internals either). Not `git
    ls-files`: the fresh-machine check runs the suite on a copy without git."""
    skipped = {".venv", ".git", "build", "test-output", "node_modules", ".docker-build"}
    files = sorted(
        str(path.relative_to(PROJECT_ROOT))
        for path in PROJECT_ROOT.rglob("*.py")
        if not skipped & set(path.relative_to(PROJECT_ROOT).parts[:-1])
        and not any(part.endswith(".egg-info") for part in path.parts)
    )
    assert "dashboard/mqtt_bridge.py" in files and "lab/mqtt.py" in files, files[:20]
    hits = []
    for name in files:
        if name == "tests/test_mqtt_bridge.py":  # this list itself
            continue
        text = (PROJECT_ROOT / name).read_text(errors="replace")
        for needle in PRIVATE_PAHO:
            if needle in text:
                hits.append(f"{name}: {needle}")
        # super()._x(...): overriding a private method of a base class from a library.
        hits += [f"{name}: {m.group(0)}" for m in re.finditer(r"super\(\)\._[a-z]\w*", text)]
    assert hits == []


def test_overlapping_subscriptions_reach_the_right_handlers(generated_lab: LabEnv, broker: Broker) -> None:
    """A retained status at QoS 1, and a device event matched by two filters: each handler gets exactly its
    messages (routed by MQTT v5 subscription identifier), and a broker restart changes nothing. (Nothing under
    ssl/: the dashboard's identity may not read it, the CA service answers there.)"""
    bridge = MqttBridge(generated_lab.settings())
    status, events_any, events_own = Recorder(), Recorder(), Recorder()
    bridge.subscribe("iot/thermometer/+/status", status, qos=1)
    bridge.subscribe("iot/thermometer/+/event", events_any, qos=1)
    bridge.subscribe("iot/thermometer/device001/event", events_own, qos=1)
    states: list[bool] = []  # what the live hub hears of the broker's state
    bridge.on_state_change.append(states.append)
    device = Collector(generated_lab.certs_dir, "device001", broker.port)
    bridge.start()
    try:
        assert bridge.wait_connected(10), bridge.status()
        device.connect()
        device.publish("iot/thermometer/device001/status", "online", qos=1, retain=True)
        wait_for(lambda: status.messages, what="the status message")
        device.publish("iot/thermometer/device001/event", json.dumps({"name": "x"}), qos=1)
        wait_for(lambda: events_own.messages and events_any.messages, what="the event")
        broker.restart()
        assert bridge.wait_connected(15)
        wait_for(lambda: bridge.connected.is_set() and device.connected.is_set(), timeout=30, what="both clients back")
        wait_for(lambda: len(status.messages) >= 2, timeout=15, what="the retained status after resubscribing")
        device.publish("iot/thermometer/device001/event", json.dumps({"name": "x"}), qos=1)
        wait_for(
            lambda: len(events_own.messages) >= 2 and len(events_any.messages) >= 2, timeout=15, what="the second event"
        )
    finally:
        device.close()
        bridge.stop()
    # up, down at the restart, up again, and down at stop(): every change said once, the last one by stop() itself
    assert states == [True, False, True, False], states
    assert [m.retain for m in status.messages[:2]] == [False, True]  # live, then retained after resubscribing
    assert [m.topic for m in events_own.messages] == ["iot/thermometer/device001/event"] * 2
    assert [m.topic for m in events_any.messages] == ["iot/thermometer/device001/event"] * 2  # one copy each


def test_the_ingest_gets_a_flood_whole_and_in_order_across_a_broker_restart(
    generated_lab: LabEnv, broker: Broker
) -> None:
    """2,000 + 500 QoS 1 readings in bursts, with a broker restart between them: the ingest (identity
    ingest-1, MQTT 3.1.1, persistent session) gets each once, in order; it may read telemetry (and presence)
    and nothing else."""
    telemetry = Recorder()
    ingest = TelemetryIngest(generated_lab.settings(), telemetry)
    device = Collector(generated_lab.certs_dir, "device001", broker.port)
    ingest.start()
    try:
        assert ingest.wait_subscribed(10), ingest.status()
        device.connect()

        def burst(first: int, count: int) -> None:
            for seq in range(first, first + count):
                device.client.publish(
                    "iot/thermometer/device001/temperature", json.dumps({"temperature": 20.5, "seq": seq}), qos=1
                )
            device.publish("iot/thermometer/device001/status", "online", qos=1)  # not for the ingest
            device.publish("ssl/sign", json.dumps({"name": "x"}), qos=1)  # nor this

        burst(0, 2000)
        wait_for(
            lambda: len(telemetry.messages) >= 2000,
            timeout=30,
            what=f"the burst ({len(telemetry.messages)} readings so far)",
        )
        broker.restart()
        wait_for(lambda: ingest.subscribed.is_set() and device.connected.is_set(), timeout=30, what="both clients back")
        burst(2000, 500)
        wait_for(
            lambda: len(telemetry.messages) >= 2500,
            timeout=30,
            what=f"the second burst ({len(telemetry.messages)} readings so far)",
        )
        # A subscription beyond telemetry and presence gets nothing (the ACL: the ingest's role reads those only).
        refused = Recorder()
        ingest_client = ingest.client
        assert ingest_client is not None
        ingest_client.message_callback_add("ssl/#", lambda _c, _u, m: refused(m))
        ingest_client.message_callback_add("iot/thermometer/+/other", lambda _c, _u, m: refused(m))
        ingest_client.subscribe("ssl/#", qos=1)
        ingest_client.subscribe("iot/thermometer/+/other", qos=1)
        device.publish("ssl/sign", json.dumps({"name": "y"}), qos=1)
        device.publish("iot/thermometer/device001/other", "x", qos=1)
        device.publish("iot/thermometer/device001/temperature", json.dumps({"temperature": 1, "seq": 2500}), qos=1)
        wait_for(lambda: len(telemetry.messages) >= 2501, what="the last reading")
    finally:
        device.close()
        ingest.stop()
    seqs = [json.loads(m.payload)["seq"] for m in telemetry.messages]
    assert seqs == list(range(2501))  # none lost, none twice, in order; no status or CA message among them
    assert refused.messages == []
    assert all(m.topic == "iot/thermometer/device001/temperature" for m in telemetry.messages)

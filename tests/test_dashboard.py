"""The dashboard in-process: pages, /api/data, /healthz, Socket.IO snapshot and batches, stored readings.

MQTT messages are fed straight into the live hub's handlers (the functions the MQTT bridge calls), so
these tests need no broker; tests/test_browser.py runs the same code against a real Mosquitto. The certificate
views (statuses, the banner, the pushed `certs` table) are in tests/test_dashboard_certificates.py.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from flask import Flask

from dashboard import create_app, start
from dashboard.live import LOG_BATCH_LIMIT, LOG_LIMIT
from dashboard.readings import ReadingIn, ReadingStore
from pki.authority import generate_private_key
from pki.authority import key_pem as key_pem_of

from .ca_support import api_token, login
from .conftest import LabEnv, bearer
from .dashboard_support import events, hub_of, live_tab
from .support import wait_for

LAB_NAMES = ("root_ca", "mosquitto", "dashboard", "provisioner", "device001", "device002")


def message(topic: str, payload: Any, *, retain: bool = False, qos: int = 1) -> mqtt.MQTTMessage:
    """A message exactly as paho hands it to the bridge's handlers."""
    msg = mqtt.MQTTMessage(topic=topic.encode())
    msg.payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    msg.retain = retain
    msg.qos = qos
    return msg


def reading(device: str, temperature: float, seq: int = 0) -> mqtt.MQTTMessage:
    return message(
        f"iot/thermometer/{device}/temperature",
        {"device_id": device, "timestamp": "2030-01-01T00:00:00.000Z", "temperature": temperature, "seq": seq},
    )


def make_app(lab: LabEnv, **config: Any) -> Flask:
    """The app as the serving process starts it (`dashboard.start`), with MQTT off unless asked for."""
    return start(create_app({"LAB_SETTINGS": lab.settings(), "MQTT_ENABLED": False, "TESTING": True, **config}))


@pytest.fixture
def app(generated_lab: LabEnv) -> Iterator[Flask]:
    app = make_app(generated_lab)
    yield app
    hub_of(app).close()
    app.extensions["users"].close()


# -- Socket.IO ---------------------------------------------------------------------------------


def test_new_tab_gets_a_snapshot_of_the_current_state(app: Flask) -> None:
    hub = hub_of(app)
    for seq, value in enumerate((21.0, 21.5, 22.0)):
        hub.on_temperature(reading("device001", value, seq))
    hub.on_status(message("iot/thermometer/device001/status", b"online", retain=True))
    hub.flush()

    client = live_tab(app)
    received = client.get_received()
    assert [e["name"] for e in received] == ["snapshot"]
    snap = received[0]["args"][0]
    devices = {d["device_id"]: d for d in snap["devices"]}
    assert set(devices) == {"device001", "device002"}  # configured devices show before any data
    assert devices["device001"]["temperature"] == 22.0
    assert devices["device001"]["status"] == "online"
    assert devices["device001"]["readings"] == 3
    assert devices["device002"]["status"] == "unknown"
    assert snap["history"]["device001"]  # chart points (one per second)
    assert [e["topic"] for e in snap["log"]][-1] == "iot/thermometer/device001/status"
    names = {row["name"] for row in snap["certs"]["certs"]}
    assert set(LAB_NAMES) <= names
    assert snap["config"]["log_limit"] == LOG_LIMIT


def test_snapshot_goes_only_to_the_tab_that_connected(app: Flask) -> None:
    first = live_tab(app)
    assert events(first, "snapshot")
    second = live_tab(app)
    assert events(second, "snapshot")
    assert first.get_received() == []  # the first tab got nothing when the second one connected


def test_a_reading_reaches_every_tab_as_one_batch(app: Flask) -> None:
    tabs = [live_tab(app), live_tab(app)]
    for tab in tabs:
        tab.get_received()
    hub = hub_of(app)
    hub.on_temperature(reading("device002", 19.25, seq=7))
    hub.flush()
    for tab in tabs:
        (batch,) = events(tab, "batch")
        (device,) = batch["devices"]
        assert device["device_id"] == "device002"
        assert device["temperature"] == 19.25
        assert device["seq"] == 7
        assert device["status"] == "online"  # data without a retained status yet means it is up
        assert batch["points"]["device002"][0][1] == 19.25
        (line,) = batch["log"]
        assert line["topic"] == "iot/thermometer/device002/temperature"
        assert line["direction"] == "in"
        assert '"temperature": 19.25' in line["payload"]


def test_presence_offline_reaches_the_page(app: Flask) -> None:
    client = live_tab(app)
    client.get_received()
    hub = hub_of(app)
    hub.on_status(message("iot/thermometer/device001/status", b"online", retain=True))
    hub.flush()
    hub.on_status(message("iot/thermometer/device001/status", b"offline", retain=True))
    hub.flush()
    batches = events(client, "batch")
    assert [b["devices"][0]["status"] for b in batches] == ["online", "offline"]
    assert batches[-1]["log"][0]["retained"] is True


def test_trend_follows_the_readings(app: Flask) -> None:
    hub = hub_of(app)
    hub.on_temperature(reading("device001", 20.0))
    hub.on_temperature(reading("device001", 21.0))
    hub.flush()
    assert hub.devices["device001"].trend == "up"
    hub.on_temperature(reading("device001", 19.0))
    hub.flush()
    assert hub.devices["device001"].trend == "down"


def test_a_burst_is_batched_and_the_log_capped(generated_lab: LabEnv) -> None:
    """5,000 messages as fast as the handler takes them: a few pushes, never one per message."""
    app = make_app(generated_lab, LIVE_EMITTER=True)  # the real emitter thread, as in production
    hub = hub_of(app)
    try:
        client = live_tab(app)
        client.get_received()
        burst = 5000
        for seq in range(burst):
            hub.on_temperature(reading(f"device00{seq % 2 + 1}", 20 + (seq % 100) / 100, seq))
        batches: list[dict[str, Any]] = []

        def all_delivered() -> bool:
            batches.extend(events(client, "batch"))
            return bool(batches) and batches[-1]["stats"]["readings"] == burst

        wait_for(all_delivered, timeout=10, what="the burst's last batch")
    finally:
        hub.close()
    assert len(batches) < 100, f"{len(batches)} pushes for {burst} messages: not batched"
    assert all(len(b["log"]) <= LOG_BATCH_LIMIT for b in batches)
    # Every message is accounted for: sent as a log line, or counted as skipped in a batch.
    assert sum(len(b["log"]) + b["skipped"] for b in batches) == burst
    assert len(hub.logs()) == LOG_LIMIT
    assert hub.logs()[-1]["id"] == burst
    device = hub.device_data()["device002"]
    assert device["readings"] == burst // 2
    # One chart point per device per second, however many readings arrived in it.
    assert len(device["history"]) <= len(batches) + 10
    # And the readings were stored, every one of them, in a few transactions.
    assert hub.store is not None
    assert hub.store.count() == burst


def test_refresh_certs_event_sends_the_table_to_every_tab(app: Flask) -> None:
    tabs = [live_tab(app), live_tab(app)]
    for tab in tabs:
        tab.get_received()
    tabs[0].emit("refresh_certs")
    for tab in tabs:
        (certs,) = events(tab, "certs")
        assert {row["name"] for row in certs["certs"]} >= set(LAB_NAMES)


# -- what gets logged ---------------------------------------------------------------------------


def test_secrets_never_reach_the_log(app: Flask, generated_lab: LabEnv) -> None:
    hub = hub_of(app)
    passphrase = "correct horse battery staple"
    hub.on_ca_message(message("ssl/create", {"name": "sensor9", "pass": passphrase, "days": 30}))
    key_pem = key_pem_of(generate_private_key("ec")).decode()
    crt_pem = (generated_lab.certs_dir / "device001" / "device001.crt").read_text()
    hub.on_ca_message(message("ssl/sensor9", {"name": "sensor9", "crt": crt_pem, "key": key_pem, "serial": "ab"}))
    hub.on_ca_message(message("ssl/renew/sensor9", key_pem.encode()))
    request, reply, renew = hub.logs()
    assert (request["direction"], reply["direction"], renew["direction"]) == ("in", "out", "in")
    text = json.dumps(app.test_client().get("/api/data", headers=bearer(api_token(app))).get_json()["logs"])
    assert passphrase not in text
    assert "PRIVATE KEY" not in text and key_pem.splitlines()[1] not in text
    assert '"serial":"ab"' in reply["payload"]  # the rest of the reply is still shown
    assert "certificate, " in reply["payload"]  # PEM blobs are shortened, not dumped


def test_bad_telemetry_is_logged_and_rejected(app: Flask) -> None:
    hub = hub_of(app)
    hub.on_temperature(message("iot/thermometer/device001/temperature", b"not json"))
    hub.on_temperature(message("iot/thermometer/device001/temperature", {"temperature": "hot"}))
    hub.on_temperature(message("iot/thermometer/device001/temperature", {"temperature": float("nan")}))
    hub.on_status(message("iot/thermometer/device001/status", b"sleeping"))
    assert hub.rejected_total == 4
    assert [line.get("note", "")[:9] for line in hub.logs()] == ["rejected:"] * 4
    device = hub.device_data()["device001"]
    assert device["temperature"] is None and device["readings"] == 0 and device["status"] == "unknown"


# -- HTTP ---------------------------------------------------------------------------------------


def test_api_data_keeps_the_seed_shape(app: Flask) -> None:
    hub = hub_of(app)
    hub.on_temperature(reading("device001", 23.5))
    data = app.test_client().get("/api/data", headers=bearer(api_token(app))).get_json()
    assert set(data) == {"certs_info", "device_data", "logs"}
    assert data["device_data"]["device001"]["temperature"] == 23.5
    assert data["device_data"]["device001"]["history"][0][1] == 23.5
    assert data["logs"][0]["topic"] == "iot/thermometer/device001/temperature"
    rows = {row["name"]: row for row in data["certs_info"]}
    for name in LAB_NAMES:
        assert rows[name]["status"] == "valid", rows[name]
        assert rows[name]["days_left"] > 300
        assert rows[name]["issuer"] == "CN=IoT Lab Root CA,O=IoT CA Lab"
    assert "pem" not in rows["device001"]


def test_healthz_reports_broker_and_database(app: Flask) -> None:
    response = app.test_client().get("/healthz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["mqtt"]["connected"] is False and body["mqtt"]["enabled"] is False  # MQTT is off in this test
    assert body["db"]["ok"] is True
    assert body["status"] == "ok"
    hub_of(app).db_error = "OperationalError: disk I/O error"
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["db"] == {
        "ok": False,
        "error": "OperationalError: disk I/O error",
        "readings_stored_since_start": 0,
    }


def test_the_page_is_self_contained(app: Flask, generated_lab: LabEnv) -> None:
    client = app.test_client()
    login(client, generated_lab.admin_password)
    response = client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert not re.search(r'(src|href)="(https?:)?//', html), "the page must not load anything from elsewhere"
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert {a.split("?")[0] for a in assets} == {
        "/static/app.css",
        "/static/app.js",
        "/static/vendor/chart.umd.min.js",
        "/static/vendor/socket.io.min.js",
    }
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    # app.js is the entry of native ES modules (no build step); every module it reaches is served from here and
    # renders text only (no innerHTML, no eval, nothing CSP's script-src 'self' would have to allow).
    assert re.search(r'<script type="module" src="/static/app.js\?', html)
    seen, todo = set(), ["app.js"]
    while todo:
        module = todo.pop()
        source = client.get(f"/static/{module}")
        assert source.status_code == 200 and "javascript" in source.content_type, module
        text = source.get_data(as_text=True)
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|\beval\(|new Function", text), module
        seen.add(module)
        base = module.rsplit("/", 1)[0] + "/" if "/" in module else ""
        for found in re.findall(r'^import (?:.* from )?"\./([^"]+)";', text, re.MULTILINE):
            name = base + found
            if name not in seen:
                todo.append(name)
    assert len(seen) >= 8, seen
    assert 'aria-live="polite"' in html and 'role="log"' in html
    assert 'data-devices="device001,device002"' in html
    # The certificate banner links to the table; renew/revoke confirm in a dialog, without the CA passphrase
    # (the operator's session is the credential).
    assert 'id="cert-banner"' in html and 'href="#certificates"' in html
    assert '<dialog class="action-dialog"' in html and 'name="pass"' not in html


def test_errors_are_json_for_the_api_and_a_page_otherwise(app: Flask, generated_lab: LabEnv) -> None:
    client = app.test_client()
    assert client.get("/api/nothing-here").status_code == 401  # logged out, nothing is told
    login(client, generated_lab.admin_password)
    api = client.get("/api/nothing-here")
    assert api.status_code == 404 and "error" in api.get_json()
    page = client.get("/nothing-here")
    assert page.status_code == 404 and page.mimetype == "text/html"
    assert "Back to the dashboard" in page.get_data(as_text=True)


# -- persistence --------------------------------------------------------------------------------


def test_readings_survive_a_dashboard_restart(generated_lab: LabEnv) -> None:
    first = make_app(generated_lab)
    hub = hub_of(first)
    for seq, value in enumerate((20.5, 20.75, 21.0)):
        hub.on_temperature(reading("device001", value, seq))
    hub.flush()  # what the emitter does every 250 ms: push, then store
    hub.close()

    second = make_app(generated_lab)  # a new process would do exactly this with the same DATABASE_URL
    try:
        device = hub_of(second).device_data()["device001"]
        assert device["temperature"] == 21.0
        assert device["seq"] == 2
        assert device["history"] and device["history"][-1][1] == pytest.approx((20.5 + 20.75 + 21.0) / 3, abs=0.01)
        snap = events(live_tab(second), "snapshot")[0]
        assert snap["history"]["device001"] == device["history"]
    finally:
        hub_of(second).close()


@pytest.mark.databases
def test_stored_readings_are_pruned_by_age_and_count(generated_lab: LabEnv) -> None:
    store = ReadingStore(generated_lab.settings().effective_database_url, retention_seconds=3600, max_rows=5)
    try:
        now = time.time()
        store.add_many([ReadingIn("device001", now - 7200 + i, 20.0) for i in range(3)])  # too old
        store.add_many([ReadingIn("device001", now - 60 + i, 21.0 + i) for i in range(8)])
        assert store.count() == 11
        assert store.prune(now) == 6  # 3 by age, then 3 more above the row cap
        kept = store.since(0)
        assert [r.temperature for r in kept] == [24.0, 25.0, 26.0, 27.0, 28.0]  # the newest survive
        assert store.latest()["device001"].temperature == 28.0
    finally:
        store.close()


def test_only_the_dashboards_own_origin_may_open_the_live_stream(app: Flask) -> None:
    """Another web page open in the user's browser must not be able to read readings or the MQTT log."""
    client = app.test_client()
    foreign = client.get(
        "/socket.io/?EIO=4&transport=polling",
        headers={"Origin": "http://evil.example", **bearer(api_token(app))},
        base_url="http://127.0.0.1:5000",
    )
    assert foreign.status_code == 400  # even with valid credentials
    anonymous = client.get(
        "/socket.io/?EIO=4&transport=polling",
        headers={"Origin": "http://127.0.0.1:5000"},
        base_url="http://127.0.0.1:5000",
    )
    assert anonymous.status_code == 401 and b'"sid"' not in anonymous.data  # no session, no stream
    own = client.get(
        "/socket.io/?EIO=4&transport=polling",
        headers={"Origin": "http://127.0.0.1:5000", **bearer(api_token(app))},
        base_url="http://127.0.0.1:5000",
    )
    assert own.status_code == 200 and b'"sid"' in own.data

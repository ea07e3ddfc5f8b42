"""The dashboard in-process: pages, /api/data, /healthz, Socket.IO snapshot and batches, stored readings.

MQTT messages are fed straight into the live hub's handlers (the functions the MQTT bridge calls), so
these tests need no broker; tests/test_browser.py runs the same code against a real Mosquitto.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from flask import Flask
from sqlalchemy import update

from dashboard import create_app, socketio, start
from dashboard.certificates import attention
from dashboard.live import LOG_BATCH_LIMIT, LOG_LIMIT, LiveHub
from dashboard.readings import ReadingIn, ReadingStore
from pki.authority import cert_pem, generate_private_key, load_certificate
from pki.authority import key_pem as key_pem_of
from pki.inventory import REVOKED, CertificateRecord, Inventory
from pki.service import CAService
from pki.store import KEY_MODE, atomic_write

from .ca_support import api_token, close_app, issue_aged_certificate, login, make_csr
from .ca_support import make_app as make_app_with_ca
from .conftest import LabEnv, bearer
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


def hub_of(app: Flask) -> LiveHub:
    return app.extensions["live_hub"]


@pytest.fixture
def app(generated_lab: LabEnv) -> Iterator[Flask]:
    app = make_app(generated_lab)
    yield app
    hub_of(app).close()
    app.extensions["users"].close()


@pytest.fixture
def app_with_ca(generated_lab: LabEnv) -> Iterator[Callable[..., Flask]]:
    """Makes the app with its CA replica (ca_support.make_app) once the test has set the lab up; the hub and the
    app are closed after the test."""
    made: list[Flask] = []

    def make(**config: Any) -> Flask:
        made.append(make_app_with_ca(generated_lab, **config))
        return made[-1]

    yield make
    for app in made:
        hub_of(app).close()
        close_app(app)


def live_tab(app: Flask) -> Any:
    """A Socket.IO client as a logged-in tab: the handshake carries a viewer API token (refused without one)."""
    client = socketio.test_client(app, headers={"Authorization": f"Bearer {api_token(app)}"})
    assert client.is_connected()
    return client


def events(client: Any, name: str) -> list[dict[str, Any]]:
    return [e["args"][0] for e in client.get_received() if e["name"] == name]


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


# -- certificates -------------------------------------------------------------------------------


def test_certificate_statuses_follow_the_renewal_window_and_revocation(generated_lab: LabEnv) -> None:
    inventory = Inventory(generated_lab.settings().effective_database_url)
    with inventory.session() as session:
        session.execute(
            update(CertificateRecord)
            .where(CertificateRecord.name == "device002", CertificateRecord.status == "active")
            .values(status=REVOKED)
        )
    inventory.close()
    (generated_lab.certs_dir / "provisioner" / "provisioner.key").unlink()
    # A 400-day renewal window puts every 365-day leaf inside it; the 10-year root stays valid.
    app = create_app({"LAB_SETTINGS": generated_lab.settings(RENEW_BEFORE_DAYS="400"), "MQTT_ENABLED": False})
    try:
        certs = hub_of(app).certs()
    finally:
        hub_of(app).close()
    status = {row["name"]: row["status"] for row in certs["certs"]}
    assert status["root_ca"] == "valid"
    assert status["mosquitto"] == status["dashboard"] == status["ca-1"] == status["device001"] == "expiring"
    assert status["device002"] == "revoked"
    assert status["provisioner"] == "invalid"  # its key file is gone: the check says so
    assert status["ingest-1"] == status["ingest-2"] == "expiring"
    assert certs["summary"]["revoked"] == 1 and certs["summary"]["expiring"] == 6
    assert certs["crl"]["present"] is True and certs["crl"]["next_update"]


# -- certificate lifecycle: per-entity states, the banner, the refresh after a change --------------------


def ca_of(app: Flask) -> CAService:
    return app.extensions["test_ca"].service


def renew_as_the_device(app: Flask, name: str) -> tuple[str, Any]:
    """What the MQTT endpoint does with a CSR on ssl/renew/<name>: the new serial and the device's new key."""
    csr, key = make_csr(name)
    reply = ca_of(app).renew(name, {"csr": csr}, via="mqtt")
    assert reply.status == 201, reply.body
    # The CA is another process: the dashboard sees the change at its periodic check of the inventory (the
    # emitter's, every CERTS_POLL_INTERVAL), done here at once.
    assert hub_of(app).refresh_certs(), "the inventory's change went unnoticed"
    return reply.body["serial"], key


def test_entity_states_show_the_status_the_last_renewal_and_who_renews(
    generated_lab: LabEnv, app_with_ca: Callable[..., Flask]
) -> None:
    aged = format(issue_aged_certificate(generated_lab, "device001", days=365, days_left=10).serial_number, "x")
    app = app_with_ca()
    hub = hub_of(app)
    entities = hub.certs()["entities"]
    device = entities["device001"]
    assert (device["status"], device["serial"], round(device["days_left"])) == ("expiring", aged, 10)
    assert device["last_renewal"]["renewed"] is False and device["last_renewal"]["via"] == "cli"
    assert device["renewal"] == {"self": True, "server": True}  # a thermometer, and the CA holds its key
    assert entities["device002"]["last_renewal"] == {
        "at": entities["device002"]["last_renewal"]["at"],
        "via": "cli",
        "serial": entities["device002"]["serial"],
        "renewed": False,
    }
    for name in ("root_ca", "mosquitto", "dashboard", "provisioner"):  # the lab's own: the generator renews
        assert entities[name]["renewal"] == {"self": False, "server": False}, name

    # The device renews over MQTT: the new certificate counts, its renewal is the last one, and the CA's
    # copy of the key is now stale, so a server-side renewal would no longer apply...
    new_serial, new_key = renew_as_the_device(app, "device001")
    device = hub.certs()["entities"]["device001"]
    assert (device["status"], device["serial"], round(device["days_left"])) == ("valid", new_serial, 365)
    assert device["last_renewal"]["renewed"] is True and device["last_renewal"]["via"] == "renew"
    assert device["last_renewal"]["serial"] == new_serial
    assert device["renewal"] == {"self": True, "server": False}
    # ...until the device stores its new pair where the CA keeps the lab's files (the native lab does).
    record = Inventory(generated_lab.settings().effective_database_url)
    try:
        pem = record.by_serial(new_serial).pem.encode()
    finally:
        record.close()
    atomic_write(generated_lab.certs_dir / "device001" / "device001.key", key_pem_of(new_key), KEY_MODE)
    atomic_write(generated_lab.certs_dir / "device001" / "device001.crt", cert_pem(load_certificate(pem)))
    hub.refresh_certs(force=True)
    assert hub.certs()["entities"]["device001"]["renewal"] == {"self": True, "server": True}

    # `create` leaves the key with the CA (renewable here); a CSR keeps it with its owner (not renewable here).
    passphrase = generated_lab.passphrase
    assert ca_of(app).create({"name": "sensor-9", "days": 30, "pass": passphrase}, source="t").status == 201
    csr, _ = make_csr("sensor-10")
    assert ca_of(app).sign({"name": "sensor-10", "days": 30, "pass": passphrase, "csr": csr}, source="t").status == 201
    assert ca_of(app).revoke({"name": "device002", "pass": passphrase}, source="t").status == 200
    assert hub.refresh_certs()  # the dashboard's periodic check sees what the CA process did
    entities = hub.certs()["entities"]
    assert entities["sensor-9"]["renewal"] == {"self": False, "server": True}
    assert entities["sensor-9"]["last_renewal"]["via"] == "http"
    assert entities["sensor-10"]["renewal"] == {"self": False, "server": False}
    assert entities["device002"]["status"] == "revoked"
    assert entities["device002"]["renewal"] == {"self": False, "server": False}  # a revoked one renews no more


def test_the_banner_counts_what_needs_attention(generated_lab: LabEnv, app_with_ca: Callable[..., Flask]) -> None:
    app = app_with_ca()
    hub = hub_of(app)
    healthy = hub.certs()["attention"]
    assert healthy == {
        "count": 0,
        "counts": dict.fromkeys(("expired", "revoked", "invalid", "missing", "expiring"), 0),
        "items": [],
        "crl": None,
        "level": None,
    }
    issue_aged_certificate(generated_lab, "device001", days=365, days_left=10)
    issue_aged_certificate(generated_lab, "sensor-old", days=30, days_left=-2)
    assert ca_of(app).revoke({"name": "device002", "pass": generated_lab.passphrase}, source="t").status == 200
    (generated_lab.certs_dir / "provisioner" / "provisioner.key").unlink()
    hub.refresh_certs(force=True)
    banner = hub.certs()["attention"]
    assert banner["counts"] == {"expired": 1, "revoked": 1, "invalid": 1, "missing": 0, "expiring": 1}
    assert banner["count"] == 4 and banner["level"] == "bad" and banner["crl"] is None
    # Worst first: expired, revoked, invalid, then what is merely expiring.
    assert [(i["name"], i["status"]) for i in banner["items"]] == [
        ("sensor-old", "expired"),
        ("device002", "revoked"),
        ("provisioner", "invalid"),
        ("device001", "expiring"),
    ]
    assert round(banner["items"][-1]["days_left"]) == 10

    # Only something expiring: a warning, not an alarm.
    entities = hub.certs()["entities"]
    only_expiring = {"device001": entities["device001"]}
    crl = hub.certificates.crl()
    assert attention(only_expiring, crl)["level"] == "warn"

    # The CRL's own expiry: due for refresh inside its window, then expired (Mosquitto refuses everyone).
    now = dt.datetime.now(dt.UTC)
    assert crl["status"] == "valid"
    due = hub.certificates.crl(now=now + dt.timedelta(days=15))
    assert due["status"] == "expiring"
    assert attention({}, due) == {
        "count": 1,
        "counts": healthy["counts"],
        "items": [],
        "level": "warn",
        "crl": {
            "status": "expiring",
            "detail": due["detail"],
            "next_update": due["next_update"],
            "days_left": due["days_left"],
        },
    }
    late = hub.certificates.crl(now=now + dt.timedelta(days=31))
    assert late["status"] == "expired"
    assert attention({}, late)["level"] == "bad"


def test_every_tab_gets_the_table_as_soon_as_the_ca_changes_a_certificate(
    generated_lab: LabEnv, app_with_ca: Callable[..., Flask]
) -> None:
    """No emitter here: nothing but the CA's change notification can push `certs` to the tabs."""
    issue_aged_certificate(generated_lab, "device001", days=365, days_left=10)
    app = app_with_ca()
    tab = live_tab(app)
    tab.get_received()
    http = app.test_client()  # the renewal through the dashboard's (forwarded) API: re-sign the stored key
    renewed = http.post("/v1/ssl/sign", json={"name": "device001", "days": 365, "pass": generated_lab.passphrase})
    assert renewed.status_code == 201, renewed.json
    new_serial = renewed.json["serial"]
    (certs,) = events(tab, "certs")
    device = certs["entities"]["device001"]
    assert (device["status"], device["serial"]) == ("valid", new_serial)
    assert device["last_renewal"]["serial"] == new_serial
    assert certs["attention"]["count"] == 0

    refused = http.post("/v1/ssl/revoke", json={"name": "device002", "pass": "wrong passphrase"})
    assert refused.status_code == 403
    token = http.post("/v1/ssl/tokens", json={"name": "sensor-7", "pass": generated_lab.passphrase})
    assert token.status_code == 201
    assert events(tab, "certs") == []  # a refusal or a token changes no certificate: nothing pushed
    revoked = http.post("/v1/ssl/revoke", json={"name": "device002", "pass": generated_lab.passphrase})
    assert revoked.status_code == 200
    (certs,) = events(tab, "certs")
    assert certs["entities"]["device002"]["status"] == "revoked"
    assert certs["attention"]["counts"]["revoked"] == 1 and certs["attention"]["level"] == "bad"


def test_the_emitter_pushes_a_renewal_without_waiting_for_its_poll(
    generated_lab: LabEnv, monkeypatch: pytest.MonkeyPatch, app_with_ca: Callable[..., Flask]
) -> None:
    """With the running emitter, a change made through the dashboard's CA API is pushed on a coming tick, not at
    the next poll (changes the CA makes over MQTT show at the poll, CERTS_POLL_INTERVAL)."""
    monkeypatch.setattr("dashboard.live_emitter.CERTS_POLL_INTERVAL", 3600.0)  # the periodic check alone: not
    app = app_with_ca(LIVE_EMITTER=True)
    tab = live_tab(app)
    wait_for(lambda: events(tab, "snapshot"), timeout=5, what="the snapshot")
    time.sleep(0.3)  # the emitter's first tick reads the table once
    tab.get_received()
    renewed = app.test_client().post(
        "/v1/ssl/sign", json={"name": "device001", "days": 365, "pass": generated_lab.passphrase}
    )
    assert renewed.status_code == 201, renewed.json
    new_serial = renewed.json["serial"]
    pushed: list[dict[str, Any]] = []

    def renewal_pushed() -> bool:
        pushed.extend(events(tab, "certs"))
        return any(c["entities"]["device001"]["serial"] == new_serial for c in pushed)

    wait_for(renewal_pushed, timeout=10, what="the renewed certificate pushed to the tab")


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

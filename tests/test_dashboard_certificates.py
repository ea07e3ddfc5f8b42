"""The dashboard's certificate views in-process: statuses, per-entity states and last renewals, the attention
banner, and the `certs` table pushed to every tab when the CA changes a certificate.

The dashboard runs with its CA replica (ca_support.make_app) where a test changes certificates through it;
tests/test_dashboard.py has the pages, the live stream and the stored readings.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import update

from dashboard import create_app
from dashboard.certificates import attention
from pki.authority import cert_pem, load_certificate
from pki.authority import key_pem as key_pem_of
from pki.inventory import REVOKED, CertificateRecord, Inventory
from pki.service import CAService
from pki.store import KEY_MODE, atomic_write

from .ca_support import close_app, issue_aged_certificate, make_csr
from .ca_support import make_app as make_app_with_ca
from .conftest import LabEnv
from .dashboard_support import events, hub_of, live_tab
from .support import wait_for


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

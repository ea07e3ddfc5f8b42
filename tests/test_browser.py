"""End to end in a real browser: Mosquitto, `python -m dashboard`, two `thermometer.py`, headless Chromium.

Everything is real: mutual TLS on every MQTT connection, the dashboard's own server and Socket.IO, the
CA API behind the form, signals to stop a device. The screenshot lands in test-output/dashboard.png.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from lab.testing import DashboardProcess

from .ca_support import issue_aged_certificate
from .conftest import PROJECT_ROOT, LabEnv
from .support import Broker, ThermometerProcess, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
OUTPUT = PROJECT_ROOT / "test-output"
DEVICES = ("device001", "device002")


@pytest.fixture
def running_lab(broker: Broker, generated_lab: LabEnv, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The native lab: broker (fixture), dashboard and one thermometer per device publishing every second."""
    dashboard = DashboardProcess(generated_lab.env, tmp_path / "dashboard.log")
    thermometers = {
        d: ThermometerProcess({**generated_lab.env, "DEVICE_ID": d, "PUBLISH_INTERVAL": "1"}) for d in DEVICES
    }
    try:
        dashboard.start()
        for thermometer in thermometers.values():
            thermometer.start()
        yield {"dashboard": dashboard, "thermometers": thermometers, "lab": generated_lab}
    finally:
        for thermometer in thermometers.values():
            thermometer.stop()
        dashboard.stop()


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def card(page: Page, device: str) -> Any:
    return page.locator(f'.device-card[data-device="{device}"]')


def log_in(page: Page, dashboard: DashboardProcess, username: str, password: str) -> None:
    """Open the dashboard logged out: it sends the browser to the login page; log in there."""
    page.goto(dashboard.url)
    assert page.url.startswith(dashboard.url + "login")
    page.fill("#login-form input[name=username]", username)
    page.fill("#login-form input[name=password]", password)
    page.click("#login-form button[type=submit]")
    page.wait_for_load_state()
    assert page.url == dashboard.url, (page.url, page.inner_text("body")[:500])


def test_live_dashboard_in_chromium(running_lab: dict[str, Any], browser: Browser) -> None:
    dashboard: DashboardProcess = running_lab["dashboard"]
    lab: LabEnv = running_lab["lab"]
    page = browser.new_page(viewport={"width": 1440, "height": 900}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda ex: errors.append(str(ex)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    outside: list[str] = []
    page.on(
        "request",
        lambda req: outside.append(req.url) if not req.url.startswith((dashboard.url, "data:", "blob:")) else None,
    )
    log_in(page, dashboard, "admin", lab.admin_password)
    cookie = next(c for c in page.context.cookies() if c["name"] == "iotca_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # Both devices online, each showing at least two different temperatures, within 10 s.
    seen: dict[str, set[str]] = {d: set() for d in DEVICES}

    def both_online_and_changing() -> bool:
        for device in DEVICES:
            if card(page, device).locator(".status-badge").inner_text() != "Online":
                return False
            value = card(page, device).locator(".reading .value").inner_text()
            if re.fullmatch(r"-?\d+\.\d+", value):
                seen[device].add(value)
        return all(len(values) >= 2 for values in seen.values())

    wait_for(
        both_online_and_changing,
        timeout=10,
        interval=0.2,
        what=f"both devices online with changing temperatures (seen {seen})",
    )

    # The chart has points for both devices.
    lengths = page.evaluate("Object.fromEntries(labDashboard.chart.data.datasets.map(d => [d.label, d.data.length]))")
    assert all(lengths.get(device, 0) >= 2 for device in DEVICES), lengths

    # The log shows telemetry; the filter keeps only what matches.
    topics = page.locator("#log-list .log-row .topic")
    wait_for(
        lambda: "iot/thermometer/device001/temperature" in topics.all_inner_texts(),
        timeout=5,
        what="a telemetry line in the log",
    )
    page.fill("#log-filter", "device002/temperature")
    wait_for(
        lambda: topics.count() > 0 and all("device002/temperature" in t for t in topics.all_inner_texts()),
        timeout=5,
        what="only device002 telemetry in the filtered log",
    )
    page.fill("#log-filter", "no-such-topic-xyz")
    wait_for(lambda: topics.count() == 0, timeout=5, what="an empty log for a filter that matches nothing")
    assert "No message matches" in page.inner_text("#log-list")
    page.fill("#log-filter", "")
    wait_for(lambda: topics.count() > 0, timeout=5, what="the whole log back after clearing the filter")

    # Pause freezes the log while messages keep arriving (counted on the button); resume shows them.
    page.click("#log-pause")
    frozen = page.locator("#log-list .log-row").first.get_attribute("data-id")
    wait_for(
        lambda: re.fullmatch(r"Resume \(\d+\)", page.inner_text("#log-pause")),
        timeout=5,
        what="messages counted while paused",
    )
    assert page.locator("#log-list .log-row").first.get_attribute("data-id") == frozen
    page.click("#log-pause")
    assert int(page.locator("#log-list .log-row").first.get_attribute("data-id") or 0) > int(frozen or 0)

    # The certificate table: root, broker, dashboard and both devices, each with its days remaining.
    for name in ("root_ca", "mosquitto", "dashboard", *DEVICES):
        row = page.locator(f'#cert-rows tr[data-name="{name}"]').first
        assert re.fullmatch(r"\d+ d", row.locator(".days-left").inner_text()), name
        assert row.locator(".status").inner_text().lower() == "valid"
    assert "Next update" in page.inner_text("#crl-bar")

    # Create a certificate through the CA form, as the operator, without the CA passphrase (the page has no
    # field for it): the result offers the PEMs, and a new row appears.
    assert page.locator("input[name=pass]").count() == 0
    page.fill("#panel-create input[name=name]", "sensor-e2e")
    page.fill("#panel-create input[name=days]", "30")
    page.click("#panel-create button[type=submit]")
    page.locator("#ca-result .alert-ok").wait_for(timeout=10_000)
    with page.expect_download() as download_info:
        page.click('#ca-result [data-file="crt"]')
    download = download_info.value
    assert download.suggested_filename == "sensor-e2e.crt"
    assert Path(download.path()).read_text().startswith("-----BEGIN CERTIFICATE-----")
    page.locator('#cert-rows tr[data-name="sensor-e2e"]').wait_for(timeout=10_000)

    # An API token from the page: shown once, works as `Authorization: Bearer`, then revoked.
    page.fill("#token-form input[name=label]", "e2e script")
    page.click("#token-form button[type=submit]")
    secret = page.locator("#token-secret").inner_text()
    assert secret.startswith("iotca_")
    bearer = {"Authorization": f"Bearer {secret}"}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    api_data = urllib.request.Request(dashboard.url + "api/data", headers=bearer)  # noqa: S310 - http://127.0.0.1
    with opener.open(api_data, timeout=5) as response:
        assert response.status == 200
    assert secret not in page.inner_text("#token-rows")
    page.locator("#token-rows button[data-revoke-token]").last.click()
    wait_for(
        lambda: page.locator("#token-rows tr .token-state").last.inner_text().startswith("revoked"),
        timeout=10,
        what="the token revoked on the page",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(api_data, timeout=5)
    assert refused.value.code == 401

    # Take the product shot while both devices are live.
    page.click('.segmented button[data-range="300"]')
    page.evaluate("window.scrollTo(0, 0)")
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "dashboard.png"), full_page=True)

    # Revoke it again from the Revoke form, still without the passphrase: the table shows it revoked.
    page.click("#tab-revoke")
    page.fill("#panel-revoke input[name=name]", "sensor-e2e")
    page.select_option("#panel-revoke select[name=reason]", "keyCompromise")
    page.click("#panel-revoke button[type=submit]")
    wait_for(
        lambda: "Revoked sensor-e2e" in page.inner_text("#ca-result .alert-ok"),
        timeout=10,
        what="the revocation's result on the page",
    )
    wait_for(
        lambda: page.locator('#cert-rows tr[data-name="sensor-e2e"] .status').first.inner_text().lower() == "revoked",
        timeout=10,
        what="sensor-e2e revoked in the table",
    )

    # Stopping a thermometer (SIGTERM) turns it offline on the page; the other stays online.
    assert running_lab["thermometers"]["device002"].terminate() == 0
    wait_for(
        lambda: card(page, "device002").locator(".status-badge").inner_text() == "Offline",
        timeout=10,
        what="device002 offline on the page",
    )
    assert card(page, "device001").locator(".status-badge").inner_text() == "Online"
    page.screenshot(path=str(OUTPUT / "dashboard-device-offline.png"), full_page=True)

    assert not errors, errors
    assert not outside, f"the page loaded something from elsewhere: {outside}"
    check_viewer_and_logged_out(browser, dashboard)


def check_viewer_and_logged_out(browser: Browser, dashboard: DashboardProcess) -> None:
    """Logged out: the login page, 401s, no live stream. A viewer: devices, chart, log and certificates, and a
    403 from the server for every CA action, whatever the page shows."""
    anonymous = browser.new_context().new_page()
    anonymous.goto(dashboard.url)
    assert anonymous.url.startswith(dashboard.url + "login") and anonymous.locator("#login-form").is_visible()
    statuses = anonymous.evaluate("""async () => Promise.all(
        ['/api/data', '/v1/ssl/certs', '/socket.io/?EIO=4&transport=polling']
            .map(async (u) => (await fetch(u)).status))""")
    assert statuses == [401, 401, 401]
    anonymous.fill("#login-form input[name=username]", "admin")
    anonymous.fill("#login-form input[name=password]", "not the password")
    anonymous.click("#login-form button[type=submit]")
    assert "Wrong user name or password" in anonymous.inner_text("#login-error")
    anonymous.context.close()

    password = "a-viewer-password"
    added = subprocess.run(
        [sys.executable, "-m", "dashboard.users", "add", "vera", "--role", "viewer", "--password-stdin"],
        input=password + "\n",
        env=dashboard.env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stdout + added.stderr
    page = browser.new_context().new_page()
    log_in(page, dashboard, "vera", password)
    wait_for(
        lambda: card(page, "device001").locator(".status-badge").inner_text() == "Online",
        timeout=10,
        what="device001 online for the viewer",
    )
    assert page.inner_text("#user-role") == "viewer"
    assert page.locator("#log-list .log-row").count() > 0
    assert page.locator('#cert-rows tr[data-name="device001"]').count() >= 1
    assert page.evaluate("labDashboard.chart.data.datasets.length") >= 1
    assert page.locator("#ca").is_hidden() and page.locator("#api-tokens").is_hidden()
    assert not page.locator('#device-grid button[data-action="revoke"]').first.is_visible()
    # the buttons are hidden, and the server refuses anyway (with the page's own CSRF token)
    statuses = page.evaluate("""async () => {
        const csrf = document.querySelector('meta[name="csrf-token"]').content;
        const post = (u, b) => fetch(u, {method: 'POST', body: JSON.stringify(b),
            headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf}}).then((r) => r.status);
        return [await post('/v1/ssl/create', {name: 'viewer-made', days: 5}),
                await post('/v1/ssl/revoke', {name: 'device001'}),
                await post('/v1/ssl/sign', {name: 'device001', days: 5}),
                await post('/api/tokens', {label: 'x', role: 'viewer'})];
    }""")
    assert statuses == [403, 403, 403, 403]
    page.click("#logout")
    page.wait_for_url(dashboard.url + "login")
    assert page.evaluate("fetch('/api/data').then((r) => r.status)") == 401
    page.context.close()


@pytest.fixture
def expiring_lab(broker: Broker, generated_lab: LabEnv, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The broker and the dashboard, with device001's certificate ten days from expiry (inside the window)."""
    aged = issue_aged_certificate(generated_lab, "device001", days=365, days_left=10)
    dashboard = DashboardProcess(generated_lab.env, tmp_path / "dashboard.log")
    thermometer = ThermometerProcess(
        {**generated_lab.env, "DEVICE_ID": "device001", "PUBLISH_INTERVAL": "0.2", "RENEW_CHECK_INTERVAL": "0.5"}
    )
    try:
        dashboard.start()
        yield {"dashboard": dashboard, "thermometer": thermometer, "lab": generated_lab, "aged": aged}
    finally:
        thermometer.stop()
        dashboard.stop()


def test_expiring_certificate_renews_itself_and_the_page_follows(
    expiring_lab: dict[str, Any], browser: Browser
) -> None:
    """Banner and badge show device001 expiring; its thermometer renews over MQTT; the page shows it valid."""
    dashboard: DashboardProcess = expiring_lab["dashboard"]
    lab: LabEnv = expiring_lab["lab"]
    old_serial = format(expiring_lab["aged"].serial_number, "x")
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda ex: errors.append(str(ex)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    log_in(page, dashboard, "admin", lab.admin_password)

    banner = page.locator("#cert-banner")
    banner.wait_for(state="visible", timeout=10_000)
    assert re.search(r"^1 certificate needs attention$", page.inner_text("#cert-banner-title"))
    assert "device001 expires in 10 days" in banner.inner_text()
    assert banner.locator('.tag[data-status="expiring"]').text_content() == "1 expiring"
    assert page.get_attribute("#cert-banner a", "href") == "#certificates"
    badge = card(page, "device001").locator(".cert-badge")
    assert badge.get_attribute("class") == "cert-badge cert-expiring"
    assert re.fullmatch(r"Expiring · (9|10) d left", badge.inner_text())
    assert "Renews itself over MQTT" in card(page, "device001").locator(".renewal-mode").inner_text()
    assert card(page, "device002").locator(".cert-badge").inner_text() == "Valid · 365 d left"
    row = page.locator(f'#cert-rows tr[data-serial="{old_serial}"]')
    assert row.locator(".status").inner_text().lower() == "expiring"
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "dashboard-expiring.png"), full_page=True)

    # The thermometer finds its certificate inside the window and renews it over MQTT (ssl/renew/device001).
    thermometer: ThermometerProcess = expiring_lab["thermometer"].start()
    thermometer.wait_output("renewed the certificate", timeout=20)
    wait_for(
        lambda: badge.get_attribute("class") == "cert-badge cert-valid",
        timeout=10,
        what=f"device001's badge valid after the renewal (now {badge.inner_text()!r})",
    )
    assert badge.inner_text() == "Valid · 365 d left"  # a renewal keeps the lifetime
    assert banner.is_hidden()
    current = page.locator('#cert-rows tr[data-name="device001"]')
    assert current.count() == 1  # the old certificate is superseded: hidden unless asked for
    assert current.get_attribute("data-serial") != old_serial
    assert current.locator(".status").inner_text().lower() == "valid"
    assert current.locator(".days-left").inner_text() == "365 d"
    renewal = card(page, "device001").locator(".last-renewal")
    assert renewal.locator(".sub").inner_text() == "over MQTT"
    assert re.fullmatch(r"just now|\d+ s ago", renewal.locator(".when").inner_text())
    assert current.get_attribute("data-serial") in (renewal.get_attribute("title") or "")
    page.check("#cert-history")
    assert page.locator(f'#cert-rows tr[data-serial="{old_serial}"]').get_attribute("data-status") == "superseded"
    page.uncheck("#cert-history")

    # device002 (its key is the CA's): renewed on the server, then revoked, from its card, in the dialog; the
    # operator's session is the credential (no passphrase field).
    card(page, "device002").locator('[data-action="renew"]').click()
    dialog = page.locator("#action-dialog")
    assert dialog.is_visible() and "renews itself over MQTT" in dialog.inner_text()
    assert dialog.locator("input[name=pass]").count() == 0
    old_device002 = page.get_attribute('#cert-rows tr[data-name="device002"]', "data-serial")
    page.click("#action-submit")
    page.locator("#toast").wait_for(timeout=10_000)
    assert page.inner_text("#toast").startswith("Renewed device002")
    wait_for(
        lambda: page.get_attribute('#cert-rows tr[data-name="device002"]', "data-serial") != old_device002,
        timeout=10,
        what="device002's new certificate in the table",
    )
    card(page, "device002").locator('[data-action="revoke"]').click()
    page.select_option("#action-form select[name=reason]", "cessationOfOperation")
    page.click("#action-submit")
    wait_for(
        lambda: card(page, "device002").locator(".cert-badge").inner_text() == "Revoked",
        timeout=10,
        what="device002 revoked on its card",
    )
    banner.wait_for(state="visible", timeout=10_000)
    assert banner.get_attribute("data-level") == "bad"
    assert banner.locator('.tag[data-status="revoked"]').text_content() == "1 revoked"
    stored = page.evaluate("JSON.stringify({...localStorage}) + JSON.stringify({...sessionStorage})")
    assert lab.passphrase not in stored
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(OUTPUT / "dashboard-renewed.png"), full_page=True)
    assert errors == [], errors

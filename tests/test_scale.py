"""Dashboard replicas, all real: Mosquitto, a Redis server, two `python -m dashboard` (each its own ingest
replica, `ingest-1` and `ingest-2`, sharing the telemetry through `$share/ingest/...`), nginx in front with
sticky sessions (deploy/nginx), and Chromium with a tab on each dashboard.

Also the process shape of one dashboard: `create_app` starts nothing, `shutdown` stops all that `start`
started, and `flask --app dashboard routes` never connects to the broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from dashboard import create_app, shutdown, start
from dashboard.readings import ReadingStore
from lab.scale import NginxServer, RedisServer
from lab.testing import CAServiceProcess
from pki.generator import LabCertificates

from .conftest import PROJECT_ROOT, LabEnv, make_lab_env
from .support import Broker, Collector, established_to, free_port, wait_for
from .test_browser import DashboardProcess, browser, card  # noqa: F401 - the browser fixture

pytestmark = [pytest.mark.integration, pytest.mark.browser]


class Replicas:
    """The scaled lab of this module: broker, Redis, two dashboards, nginx, and one device's connection."""

    def __init__(self, root: Path) -> None:
        self.lab = make_lab_env(root)
        root.mkdir(parents=True, exist_ok=True)
        LabCertificates(self.lab.settings()).generate()
        self.broker = Broker(self.lab.certs_dir, self.lab.data_dir, self.lab.broker_port).start()
        self.redis = RedisServer(root / "redis", free_port()).start()
        # One CA replica (ca-1) that both dashboards forward /v1/ssl/* to (each starting its own would make two
        # `ca-1` connections, which the broker lets kick each other off).
        self.ca = CAServiceProcess({**self.lab.env, "CA_HTTPS_PORT": "0"}, 1, root / "ca.log").start()
        shared = {
            **self.lab.env,
            "SOCKETIO_MESSAGE_QUEUE": self.redis.url,
            "CA_URLS": self.ca.url,
            "DASHBOARD_SECRET_KEY": "scale-test-" + "k" * 40,
        }  # both sign the same session cookies
        # One process holds the `dashboard` connection (CA over MQTT, revocation); the broker allows one per CN.
        self.envs = [{**shared, "INGEST_ID": "ingest-1"}, {**shared, "INGEST_ID": "ingest-2", "DASHBOARD_MQTT": "0"}]
        self.dashboards: list[DashboardProcess] = []
        for index, env in enumerate(self.envs):  # one after the other: the first creates the admin user
            dashboard = DashboardProcess(env, root / f"dashboard-{index + 1}.log")
            self.dashboards.append(dashboard.start())
        self.nginx = NginxServer(root / "nginx", free_port(), [f"127.0.0.1:{d.port}" for d in self.dashboards]).start()
        self.routes = self._routes()
        self.device = Collector(self.lab.certs_dir, "device001", self.broker.port)
        self.device.connect()
        self.seq = 0

    def _routes(self) -> dict[str, str]:
        """A value of the `iotlab_route` cookie that nginx sends to each dashboard, by its ingest identity."""
        routes: dict[str, str] = {}
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for n in range(64):
            request = urllib.request.Request(  # noqa: S310 - our loopback nginx
                self.nginx.url + "/healthz",
                headers={"Cookie": f"iotlab_route=r{n}"},
            )
            with opener.open(request, timeout=5) as response:
                routes.setdefault(json.load(response)["ingest"]["identity"], f"r{n}")
            if len(routes) == 2:
                return routes
        raise AssertionError(f"nginx sent 64 cookies to {routes} only")

    def publish(self, temperature: float) -> int:
        self.seq += 1
        info = self.device.client.publish(
            "iot/thermometer/device001/temperature",
            json.dumps(
                {
                    "device_id": "device001",
                    "timestamp": "2030-01-01T00:00:00Z",
                    "temperature": temperature,
                    "seq": self.seq,
                }
            ),
            qos=1,
        )
        info.wait_for_publish(10)  # acknowledged by the broker
        return self.seq

    def stored(self, device: str = "device001") -> list[int]:
        store = ReadingStore(self.lab.settings().effective_database_url)
        try:
            return [r.seq for r in store.since(0) if r.device_id == device and r.seq is not None]
        finally:
            store.close()

    def close(self) -> None:
        self.device.close()
        self.nginx.stop()
        for dashboard in self.dashboards:
            dashboard.stop()
        self.ca.stop()
        self.redis.stop()
        self.broker.stop()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    scaled = Replicas(tmp_path_factory.mktemp("replicas"))
    try:
        yield scaled
    finally:
        scaled.close()


def tab_on(chromium: Browser, replicas: Replicas, ingest: str) -> Page:
    """A logged-in tab that nginx sends to the dashboard whose ingest is `ingest` (its route cookie)."""
    context = chromium.new_context()
    context.add_cookies([{"name": "iotlab_route", "value": replicas.routes[ingest], "url": replicas.nginx.url}])
    page = context.new_page()
    page.goto(replicas.nginx.url + "/login")
    page.fill("#login-form input[name=username]", "admin")
    page.fill("#login-form input[name=password]", replicas.lab.admin_password)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(replicas.nginx.url + "/")
    served_by = page.evaluate("fetch('/healthz').then((r) => r.json()).then((h) => h.ingest.identity)")
    assert served_by == ingest
    return page


def shown(page: Page) -> str:
    return card(page, "device001").locator(".reading .value").inner_text()


def test_a_tab_on_each_dashboard_shows_every_new_reading_within_a_second(replicas: Replicas, browser: Browser) -> None:  # noqa: F811
    tabs = [tab_on(browser, replicas, "ingest-1"), tab_on(browser, replicas, "ingest-2")]
    wait_for(
        lambda: all(card(tab, "device001").count() == 1 for tab in tabs),
        timeout=10,
        what="both tabs' snapshot (Socket.IO connected)",
    )
    seqs = []
    for n in range(6):  # round-robin: each replica ingests half of them; every tab must show each one
        temperature = 30.0 + n + 0.25
        seqs.append(replicas.publish(temperature))
        sent = time.monotonic()
        wait_for(
            lambda t=f"{temperature:.2f}": all(shown(tab) == t for tab in tabs),
            timeout=5,
            interval=0.02,
            what=f"{temperature} on both tabs (shown: {[shown(tab) for tab in tabs]})",
        )
        assert time.monotonic() - sent < 1.0, "a tab showed the reading only after a second"
    # Each reading is stored once, by the replica that received it; both replicas took a share.
    wait_for(lambda: set(seqs) <= set(replicas.stored()), timeout=10, what="every reading stored")
    stored = replicas.stored()
    assert sorted(s for s in stored if s in seqs) == seqs, stored
    received = [d.health()["ingest"]["received"] for d in replicas.dashboards]  # type: ignore[index]
    assert all(count >= 2 for count in received), received
    for tab in tabs:
        tab.context.close()


def broker_noticed(replicas: Replicas, identity: str, since: int) -> bool:
    text = replicas.broker.log_path.read_text(errors="replace")[since:]
    return any(
        f"client {identity}" in line.lower() and ("closed" in line or "disconnect" in line.lower())
        for line in text.splitlines()
    )


def test_killing_an_ingest_replica_loses_no_acknowledged_reading(replicas: Replicas) -> None:
    """kill -9 of the dashboard holding ingest-2. Once the broker noticed, every reading it acknowledges is
    stored exactly once: ingest-1's share at once, and ingest-2's share, which Mosquitto 2.0.11 keeps queuing for
    ingest-2's persistent session (shared subscription + persistent session), when ingest-2 comes back."""
    second = replicas.dashboards[1]
    assert second.process is not None
    log_size = replicas.broker.log_path.stat().st_size
    second.process.send_signal(signal.SIGKILL)
    second.process.wait()
    wait_for(lambda: broker_noticed(replicas, "ingest-2", log_size), timeout=40, what="the broker noticing")
    seqs = [replicas.publish(20.0 + n / 10) for n in range(20)]
    # ingest-1 stores its half; ingest-2's half waits in its session at the broker, not lost, not rerouted.
    wait_for(
        lambda: len(set(seqs) & set(replicas.stored())) >= len(seqs) // 2, timeout=10, what="ingest-1's share stored"
    )
    # Every one of them was acknowledged, so Mosquitto has routed them all already: a reading rerouted to ingest-1
    # would be on its way with the others. A short margin for it to land, then: exactly half.
    time.sleep(0.5)
    assert len(set(seqs) & set(replicas.stored())) == len(seqs) // 2
    second.start()  # the same INGEST_ID: its session, and the readings queued in it, are delivered
    wait_for(
        lambda: set(seqs) <= set(replicas.stored()),
        timeout=20,
        what=f"every reading stored; missing {sorted(set(seqs) - set(replicas.stored()))}",
    )
    stored = [s for s in replicas.stored() if s in seqs]
    assert sorted(stored) == seqs  # each exactly once


def test_flask_routes_does_not_connect_to_the_broker(replicas: Replicas) -> None:
    """`flask --app dashboard routes` with the lab's settings, while that very dashboard runs: it lists the
    routes, opens no MQTT connection, and the running dashboard is not kicked off."""
    log_size = replicas.broker.log_path.stat().st_size
    env = {**os.environ, **replicas.envs[0], "FLASK_RUN_FROM_CLI": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "dashboard", "routes"],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "/healthz" in result.stdout and "/v1/ssl/sign" in result.stdout
    first = replicas.dashboards[0]
    health = first.health()
    assert health is not None and health["status"] == "ok"
    assert health["mqtt"]["since"] < time.time() - 0.5  # the same connection as before
    new = replicas.broker.log_path.read_text(errors="replace")[log_size:]
    assert "New client connected" not in new and "New connection" not in new, new


def test_create_app_starts_nothing_and_shutdown_stops_everything(generated_lab: LabEnv, broker: Broker) -> None:
    threads = set(threading.enumerate())
    pid = os.getpid()
    app = create_app({"LAB_SETTINGS": generated_lab.settings(), "TESTING": True})  # MQTT_ENABLED by default
    assert set(threading.enumerate()) == threads
    assert established_to(pid, broker.port) == 0
    start(app)
    assert app.extensions["ingest"].wait_subscribed(10) and app.extensions["mqtt_bridge"].wait_connected(10)
    assert established_to(pid, broker.port) == 2  # the dashboard's connection and the ingest's
    assert len(set(threading.enumerate()) - threads) >= 3  # two network loops, the emitter, the CRL timer
    shutdown(app)
    wait_for(lambda: established_to(pid, broker.port) == 0, what="both connections closed")
    wait_for(
        lambda: {t for t in threading.enumerate() if t.is_alive()} <= threads,
        timeout=10,
        what=f"every thread stopped: {set(threading.enumerate()) - threads}",
    )

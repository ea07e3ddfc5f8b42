"""Faults lose nothing: a broker killed with SIGKILL while thermometers publish (Step 10)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask

from dashboard.accounts import UserStore
from pki.authority import load_certificate

from .ca_support import close_app, make_app, make_csr, post_json
from .conftest import PROJECT_ROOT, LabEnv
from .support import Broker, ThermometerProcess, free_port, wait_for

pytestmark = pytest.mark.integration

KILLS = 4
DOWN_SECONDS = 1.5  # readings are taken (and buffered by the thermometers) while the broker is down
STOPPED_RE = re.compile(r"stopped after (\d+) readings")


def stored_seqs(app: Flask, device_id: str) -> set[int]:
    return {r.seq for r in app.extensions["live_hub"].store.since(0) if r.device_id == device_id}


def test_kill_9_of_the_broker_four_times_loses_no_reading(
    generated_lab: LabEnv, broker: Broker, start_thermometer: Callable[..., ThermometerProcess]
) -> None:
    app = make_app(generated_lab, MQTT_ENABLED=True)
    bridge, ingest = app.extensions["mqtt_bridge"], app.extensions["ingest"]
    try:
        assert bridge.wait_connected(10) and ingest.wait_subscribed(10)
        # The broker keeps the ingest's persistent session on disk from its first autosave (autosave_interval,
        # 5 s) after the ingest subscribed: a running lab has long done that; this fresh broker has to first.
        db = generated_lab.data_dir / "mosquitto" / "mosquitto.db"
        subscribed = time.time()
        wait_for(lambda: db.exists() and db.stat().st_mtime > subscribed, timeout=10, what="the first autosave")

        env = {k: v for k, v in generated_lab.env.items() if k != "CA_PASSPHRASE"}
        devices = {
            d: start_thermometer({**env, "DEVICE_ID": d, "PUBLISH_INTERVAL": "0.5"}) for d in ("device001", "device002")
        }
        for device, thermometer in devices.items():
            thermometer.wait_output(f"{device} connected")
        for kill in range(1, KILLS + 1):
            wait_for(
                lambda k=kill: all(len(stored_seqs(app, d)) >= 3 * k for d in devices),
                timeout=20,
                what="readings stored before the next kill",
            )
            assert broker.process is not None
            broker.process.send_signal(signal.SIGKILL)
            broker.process.wait()
            time.sleep(DOWN_SECONDS)
            broker.start()
            for device, thermometer in devices.items():
                wait_for(
                    lambda t=thermometer, d=device, k=kill: t.output().count(f"{d} connected") == k + 1,
                    timeout=40,
                    what=f"{device} to reconnect after kill {kill}",
                )
            # The consumer back too: readings queued for it while it is away live in the broker's memory until the
            # next autosave, and the next kill -9 would take them (as it would in a lab killed twice in 5 s).
            assert bridge.wait_connected(40) and ingest.wait_subscribed(40)

        last = {}
        for device, thermometer in devices.items():
            assert thermometer.terminate() == 0, thermometer.output()
            last[device] = int(STOPPED_RE.findall(thermometer.output())[-1])
            assert "buffered readings are lost" not in thermometer.output()
            # what is at stake: after each kill it flushed readings buffered while the broker was down
            assert thermometer.output().count("readings buffered while offline") >= KILLS, thermometer.output()
        for device, count in last.items():
            wait_for(
                lambda d=device, n=count: stored_seqs(app, d) >= set(range(1, n + 1)),
                timeout=20,
                what=f"every reading of {device} stored; missing: "
                f"{sorted(set(range(1, count + 1)) - stored_seqs(app, device))[:20]}",
            )
    finally:
        app.extensions["live_hub"].close()
        close_app(app)


# -- a CA killed while it issues ---------------------------------------------------------------------------


def _ca_process(lab: LabEnv, port: int) -> subprocess.Popen[bytes]:
    """The CA service (`python -m ca`, replica ca-1) with its internal API on `port`; no broker here."""
    env = {
        **os.environ,
        **lab.env,
        "CA_INSTANCE": "1",
        "CA_INTERNAL_PORT": str(port),
        "CA_HTTPS_PORT": "0",
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "ca"], env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _dashboard_process(lab: LabEnv, port: int, ca_port: int) -> subprocess.Popen[bytes]:
    """The dashboard on `port`, forwarding /v1/ssl/* to the CA on `ca_port`."""
    env = {
        **os.environ,
        **lab.env,
        "DASHBOARD_PORT": str(port),
        "CA_URLS": f"http://127.0.0.1:{ca_port}",
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "dashboard"],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):  # noqa: S310 - loopback
            return True
    except urllib.error.HTTPError as ex:  # 503: the CA answers; degraded only because no broker runs here
        return ex.code == 503
    except (OSError, ValueError):
        return False


def test_kill_9_of_the_ca_under_200_requests_leaves_every_certificate_listed_and_revocable(
    generated_lab: LabEnv,
) -> None:
    port, ca_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"  # the dashboard's port: the CA API as users call it, forwarded to the CA
    ca = _ca_process(generated_lab, ca_port)
    dashboard = _dashboard_process(generated_lab, port, ca_port)
    replies: list[dict[str, Any]] = []
    try:
        wait_for(lambda: _healthy(ca_port) and _healthy(port), timeout=30, what="the CA and the dashboard to answer")
        bodies = [
            {
                "name": f"crash-create-{i:03d}",
                "days": 30,
                "pass": generated_lab.passphrase,
                "country": "BR",
                "org": "lab",
                "cn": f"crash-create-{i:03d}",
            }
            for i in range(100)
        ]
        bodies += [
            {
                "name": f"crash-sign-{i:03d}",
                "days": 30,
                "pass": generated_lab.passphrase,
                "csr": make_csr(f"crash-sign-{i:03d}")[0],
            }
            for i in range(100)
        ]

        def send(body: dict[str, Any]) -> None:
            route = "sign" if "csr" in body else "create"
            try:
                status, reply = post_json(f"{base}/v1/ssl/{route}", body, timeout=20)
            except (OSError, http.client.HTTPException, ValueError):  # the CA was killed under this request
                return
            if status in (200, 201):
                replies.append(reply)

        with ThreadPoolExecutor(max_workers=200) as pool:
            futures = [pool.submit(send, body) for body in bodies]
            wait_for(lambda: len(replies) >= 20, timeout=60, what="some certificates issued")
            ca.send_signal(signal.SIGKILL)  # in the middle of the storm
            ca.wait()
            for future in futures:
                future.result()
        assert len(replies) < len(bodies), "the kill came too late to test anything"

        ca = _ca_process(generated_lab, ca_port)
        wait_for(lambda: _healthy(ca_port), timeout=30, what="the restarted CA to answer")
        certs_dir = generated_lab.certs_dir
        # No temporary file holds a certificate (a crash inside atomic_write leaves one behind otherwise).
        leftovers = [p for p in certs_dir.rglob(".*.tmp") if b"CERTIFICATE" in p.read_bytes()]
        assert leftovers == []
        found = {r["serial"] for r in replies}
        for path in certs_dir.glob("crash-*/crash-*.crt"):  # (not the root_ca.crt copies)
            found.add(format(load_certificate(path.read_bytes()).serial_number, "x"))
        users = UserStore(generated_lab.settings().effective_database_url)
        _, token = users.create_token("fault-tests", "viewer")  # the inventory is for logged-in readers
        users.close()
        request = urllib.request.Request(  # noqa: S310 - loopback
            f"{base}/v1/ssl/certs",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            listed = [row["serial"] for row in json.loads(response.read())["certificates"]]
        assert len(listed) == len(set(listed)), "duplicate serials"
        assert found - set(listed) == set(), "certificates the inventory does not list"
        for serial in sorted(found):
            status, reply = post_json(f"{base}/v1/ssl/revoke", {"serial": serial, "pass": generated_lab.passphrase})
            assert status == 200 and reply["revoked"] == [serial], reply
    finally:
        for process in (ca, dashboard):
            if process.poll() is None:
                process.kill()
                process.wait()

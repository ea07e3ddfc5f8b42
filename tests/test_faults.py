"""Faults lose nothing: a broker killed with SIGKILL while thermometers publish (Step 10)."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable

import pytest
from flask import Flask

from .ca_support import close_app, make_app
from .conftest import LabEnv
from .support import Broker, ThermometerProcess, wait_for

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
    bridge = app.extensions["mqtt_bridge"]
    try:
        assert bridge.wait_connected(10)
        # The broker keeps the dashboard's persistent session on disk from its first autosave (autosave_interval,
        # 5 s) after the dashboard subscribed: a running lab has long done that; this fresh broker has to first.
        db = generated_lab.data_dir / "mosquitto" / "mosquitto.db"
        subscribed = time.time()
        wait_for(lambda: db.exists() and db.stat().st_mtime > subscribed, timeout=10, what="the first autosave")

        env = {k: v for k, v in generated_lab.env.items() if k != "CA_PASSPHRASE"}
        devices = {d: start_thermometer({**env, "DEVICE_ID": d, "PUBLISH_INTERVAL": "0.5"})
                   for d in ("device001", "device002")}
        for device, thermometer in devices.items():
            thermometer.wait_output(f"{device} connected")
        for kill in range(1, KILLS + 1):
            wait_for(lambda k=kill: all(len(stored_seqs(app, d)) >= 3 * k for d in devices), timeout=20,
                     what="readings stored before the next kill")
            assert broker.process is not None
            broker.process.send_signal(signal.SIGKILL)
            broker.process.wait()
            time.sleep(DOWN_SECONDS)
            broker.start()
            for device, thermometer in devices.items():
                wait_for(lambda t=thermometer, d=device, k=kill: t.output().count(f"{d} connected") == k + 1,
                         timeout=40, what=f"{device} to reconnect after kill {kill}")
            assert bridge.wait_connected(40)

        last = {}
        for device, thermometer in devices.items():
            assert thermometer.terminate() == 0, thermometer.output()
            last[device] = int(STOPPED_RE.findall(thermometer.output())[-1])
            assert "buffered readings are lost" not in thermometer.output()
            # what is at stake: after each kill it flushed readings buffered while the broker was down
            assert thermometer.output().count("readings buffered while offline") >= KILLS, thermometer.output()
        for device, count in last.items():
            wait_for(lambda d=device, n=count: stored_seqs(app, d) >= set(range(1, n + 1)), timeout=20,
                     what=f"every reading of {device} stored; missing: "
                          f"{sorted(set(range(1, count + 1)) - stored_seqs(app, device))[:20]}")
    finally:
        app.extensions["live_hub"].close()
        close_app(app)

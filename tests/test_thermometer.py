"""The simulated thermometer: real `thermometer.py` subprocesses against the real broker, plus its model."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lab import device
from lab.device import TemperatureWalk, Thermometer, baseline_for, make_reading
from lab.mqtt import Identity
from pki.authority import CertificateAuthority, cert_pem

from .conftest import PROJECT_ROOT, LabEnv
from .support import Broker, Collector, ThermometerProcess, wait_for

StartThermometer = Callable[..., ThermometerProcess]


def device_env(lab: LabEnv, device_id: str | None = "device001", **extra: str) -> dict[str, str]:
    """What a device gets: the lab's folders and broker port (never the CA passphrase)."""
    env = {k: v for k, v in lab.env.items() if k != "CA_PASSPHRASE"}
    env["PUBLISH_INTERVAL"] = "0.2"
    if device_id:
        env["DEVICE_ID"] = device_id
    return {**env, **extra}


def readings(collector: Collector, device_id: str, count: int, timeout: float = 15) -> list[dict]:
    topic = f"iot/thermometer/{device_id}/temperature"
    return [json.loads(collector.expect(topic, timeout=timeout).payload) for _ in range(count)]


def expect_status(collector: Collector, device_id: str, wanted: str, timeout: float = 10) -> bool:
    """Wait for `wanted` on the device's status topic (skipping older values); returns its retain flag."""
    topic = f"iot/thermometer/{device_id}/status"
    while True:
        message = collector.expect(topic, timeout=timeout)
        if message.payload.decode() == wanted:
            return bool(message.retain)


def retained_status(lab: LabEnv, port: int, device_id: str, wanted: str) -> bool:
    """What a subscriber that arrives later learns: is `wanted` the device's retained status?"""
    late = Collector(lab.certs_dir, "dashboard", port).connect()
    try:
        late.subscribe(f"iot/thermometer/{device_id}/status")
        return expect_status(late, device_id, wanted) is True
    finally:
        late.close()


# -- against the broker -----------------------------------------------------------------------------


@pytest.mark.integration
def test_readings_reach_the_dashboard_with_the_contract_shape(
    session_lab: LabEnv, session_broker: Broker, start_thermometer: StartThermometer
) -> None:
    dashboard = Collector(session_lab.certs_dir, "dashboard", session_broker.port).connect()
    try:
        dashboard.subscribe("iot/thermometer/device001/temperature")
        thermometer = start_thermometer(device_env(session_lab))
        got = readings(dashboard, "device001", 8)
    finally:
        dashboard.close()
    assert [r["seq"] for r in got] == list(range(1, 9))  # subscribed before it started: every reading, in order
    now = dt.datetime.now(dt.UTC)
    for reading in got:
        assert set(reading) == {"device_id", "timestamp", "temperature", "seq"}
        assert reading["device_id"] == "device001"
        assert reading["timestamp"].endswith("Z")
        stamp = dt.datetime.fromisoformat(reading["timestamp"])
        assert stamp.utcoffset() == dt.timedelta(0)
        assert abs(now - stamp) < dt.timedelta(minutes=5)
        assert isinstance(reading["temperature"], float)
        assert round(reading["temperature"], 2) == reading["temperature"]
        assert abs(reading["temperature"] - baseline_for("device001")) <= 3.0
    steps = [abs(b["temperature"] - a["temperature"]) for a, b in zip(got, got[1:], strict=False)]
    assert max(steps) < 0.5, steps  # a smooth walk, not uniform noise
    assert len({r["temperature"] for r in got}) > 1  # and not a constant either

    # A subscriber that arrives later learns the device is online from the retained status.
    assert retained_status(session_lab, session_broker.port, "device001", "online")
    assert thermometer.terminate() == 0


@pytest.mark.integration
def test_sigterm_publishes_offline_delivers_everything_and_exits_0(
    session_lab: LabEnv, session_broker: Broker, start_thermometer: StartThermometer
) -> None:
    identity = Identity.of(session_lab.certs_dir, "device002")
    dashboard = Collector(session_lab.certs_dir, "dashboard", session_broker.port).connect()
    try:
        dashboard.subscribe("iot/thermometer/device002/#")
        # Flags instead of the environment this time (no DEVICE_ID, no BROKER_PORT, no paths).
        env = {k: v for k, v in device_env(session_lab, None).items() if k not in ("BROKER_PORT", "CERTS_DIR")}
        thermometer = start_thermometer(
            env,
            "--device-id",
            "device002",
            "--ca-cert",
            str(identity.ca_cert),
            "--cert",
            str(identity.cert),
            "--key",
            str(identity.key),
            "--broker",
            "localhost",
            "--port",
            str(session_broker.port),
            "--interval",
            "0.2",
        )
        expect_status(dashboard, "device002", "online")
        readings(dashboard, "device002", 3)
        assert thermometer.terminate() == 0
        expect_status(dashboard, "device002", "offline")
        sent = [json.loads(m.payload)["seq"] for m in dashboard.received if m.topic.endswith("/temperature")]
    finally:
        dashboard.close()
    output = thermometer.output()
    assert f"stopped after {max(sent)} readings" in output, output  # the last reading was delivered too
    assert sorted(set(sent)) == list(range(1, max(sent) + 1))
    assert "offline acknowledged" in output
    # A new subscriber sees the retained `offline` (the device said goodbye; no will was needed).
    assert retained_status(session_lab, session_broker.port, "device002", "offline")
    assert "Client device002 disconnected." in session_broker.log()  # a clean DISCONNECT, not a timeout


@pytest.mark.integration
def test_broker_restart_loses_no_reading(
    generated_lab: LabEnv, broker: Broker, start_thermometer: StartThermometer
) -> None:
    # A persistent session: the broker keeps the subscription and queues for it across its own restart.
    dashboard = Collector(
        generated_lab.certs_dir, "dashboard", broker.port, client_id="dashboard", clean_session=False
    ).connect()
    try:
        dashboard.subscribe("iot/thermometer/device001/temperature")
        thermometer = start_thermometer(device_env(generated_lab))
        before = max(r["seq"] for r in readings(dashboard, "device001", 5))
        broker.restart()
        thermometer.wait_output("lost the broker")
        wait_for(
            lambda: thermometer.output().count("status online") >= 2,
            timeout=20,
            what=f"the thermometer to reconnect:\n{thermometer.output()}",
        )

        def seqs() -> list[int]:
            return [json.loads(m.payload)["seq"] for m in list(dashboard.received)]

        # until well past the outage (the subscriber reconnects on its own, its queued messages follow)
        wait_for(lambda: max(seqs()) >= before + 15, timeout=30, what="readings after the restart")
        seen = seqs()
    finally:
        dashboard.close()
    assert sorted(set(seen)) == list(range(1, max(seen) + 1)), "a reading was lost across the restart"
    assert thermometer.terminate() == 0


def run_thermometer(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "thermometer.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_ROOT,
    )


def test_missing_certificate_file_exits_2_naming_it(session_lab: LabEnv, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "device001.crt"
    result = run_thermometer({**os.environ, **device_env(session_lab), "CLIENT_CERT_PATH": str(missing)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(missing) in lines[0] and lines[0].startswith("error: ")


def _foreign_root(tmp_path: Path) -> Path:
    path = tmp_path / "foreign_root.crt"
    path.write_bytes(cert_pem(CertificateAuthority.create().certificate))
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("key of another device", "does not match certificate"),
        ("CA that did not issue it", "was not issued by the CA in"),
        ("certificate of another device", "is for 'device002', not for device 'device001'"),
        ("unreadable key", "is not a readable PEM private key"),
        ("no device id", "DEVICE_ID is not set"),
    ],
)
def test_bad_identity_exits_2_with_one_line(
    session_lab: LabEnv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
    expected: str,
) -> None:
    certs = session_lab.certs_dir
    env = device_env(session_lab)
    named = ""
    if case == "key of another device":
        env["CLIENT_KEY_PATH"] = named = str(certs / "device002" / "device002.key")
    elif case == "CA that did not issue it":
        env["CA_CERT_PATH"] = named = str(_foreign_root(tmp_path))
    elif case == "certificate of another device":
        env["CLIENT_CERT_PATH"] = named = str(certs / "device002" / "device002.crt")
        env["CLIENT_KEY_PATH"] = str(certs / "device002" / "device002.key")
    elif case == "unreadable key":
        junk = tmp_path / "junk.key"
        junk.write_text("not a key\n")
        env["CLIENT_KEY_PATH"] = named = str(junk)
    elif case == "no device id":
        del env["DEVICE_ID"]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert device.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert named in err[0]


# -- the model ----------------------------------------------------------------------------------------


def test_temperature_walk_is_bounded_smooth_and_mean_reverting() -> None:
    baseline = 21.0
    walk = TemperatureWalk(baseline, rng=random.Random(7))
    values = [walk.step(5.0) for _ in range(20_000)]  # ~28 hours of readings every 5 s
    assert all(baseline - walk.bound <= v <= baseline + walk.bound for v in values)
    steps = [abs(b - a) for a, b in zip(values, values[1:], strict=False)]
    assert max(steps) < 0.6 and statistics.mean(steps) < 0.15  # small moves between readings...
    assert 0.4 < statistics.pstdev(values) < 1.2  # ...that still wander, around the baseline
    assert abs(statistics.mean(values) - baseline) < 0.3
    assert statistics.correlation(values[:-1], values[1:]) > 0.95  # uniform noise would give ~0

    walk.value = baseline + walk.bound  # pushed to the edge, it comes back
    later = [walk.step(5.0) for _ in range(1_440)][-120:]  # after 2 hours, the last 10 minutes
    assert abs(statistics.mean(later) - baseline) < 1.0

    fine = TemperatureWalk(baseline, rng=random.Random(7))
    fine_steps = [abs(fine.value - fine.step(0.2)) for _ in range(2_000)]
    assert statistics.mean(fine_steps) < statistics.mean(steps) / 2  # shorter interval, smaller moves


def test_baseline_is_per_device_and_stable() -> None:
    assert baseline_for("device001") == baseline_for("device001")
    assert baseline_for("device001") != baseline_for("device002")
    assert all(18.0 <= baseline_for(f"dev{i}") < 26.0 for i in range(200))


def test_reading_payload() -> None:
    moment = dt.datetime(2026, 11, 22, 15, 0, 1, 234567, tzinfo=dt.UTC)
    assert make_reading("device001", 3, 21.456, moment) == {
        "device_id": "device001",
        "timestamp": "2026-11-22T15:00:01.234Z",
        "temperature": 21.46,
        "seq": 3,
    }


def test_offline_buffer_is_bounded_and_drops_the_oldest(session_lab: LabEnv) -> None:
    config = device.DeviceConfig("device001", Identity.of(session_lab.certs_dir, "device001"))
    thermometer = Thermometer(config, buffer_size=50)  # never connected: everything stays buffered
    for _ in range(60):
        thermometer.take_reading(5.0)
    assert thermometer.flush() == 0
    assert [r["seq"] for r in thermometer.buffer.readings] == list(range(11, 61))
    assert thermometer.buffer.dropped == 10

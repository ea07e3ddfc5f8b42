"""Docker mode without a Docker engine: the commands the images run (a device's thermometer.py, the dashboard's
gunicorn, the broker's entrypoint), run here as real processes with the compose settings."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.testing import child_pids, processes
from pki.broker import DYNSEC_INITIAL, DYNSEC_TOPIC, BrokerFiles, disconnect_command, render_acl
from pki.store import CERT_MODE, atomic_write

from .compose_support import (
    dockerfile_instruction,
    environment,
    host_path,
)
from .conftest import PROJECT_ROOT, LabEnv
from .support import Broker, Collector, ThermometerProcess, free_port, wait_for

ENTRYPOINT = PROJECT_ROOT / "mosquitto" / "entrypoint.sh"


# -- the images' commands, run here -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_broker(compose_lab: LabEnv) -> Iterator[Broker]:
    broker = Broker(compose_lab.certs_dir, compose_lab.data_dir, compose_lab.broker_port).start()
    yield broker
    broker.stop()


def container_env(service: dict[str, Any], lab: LabEnv, **changes: str) -> dict[str, str]:
    """The service's environment with its container paths mapped to where the mounts come from on this host."""
    env = environment(service)
    for key, value in env.items():
        if value.startswith("/"):
            mapped = host_path(service, value)
            env[key] = str(mapped) if mapped is not None else str(lab.root / value.lstrip("/"))
    # Outside Docker there is no `mosquitto` host name; the broker certificate also names localhost.
    env.update(
        BROKER_ADDRESS="localhost", BROKER_PORT=str(lab.broker_port), LAB_ENV_FILE=str(lab.root / "no.env"), **changes
    )
    return env


@pytest.mark.integration
def test_a_device_container_command_publishes_with_the_override_settings(
    services: dict[str, dict[str, Any]], compose_lab: LabEnv, compose_broker: Broker
) -> None:
    env = container_env(services["device003_thermometer"], compose_lab)
    assert env["CLIENT_KEY_PATH"] == str(compose_lab.certs_dir / "device003" / "device003.key")
    watcher = Collector(compose_lab.certs_dir, "dashboard", compose_lab.broker_port).connect()
    device = ThermometerProcess(env)
    try:
        watcher.subscribe("iot/thermometer/device003/temperature")
        device.start()
        reading = json.loads(watcher.expect("iot/thermometer/device003/temperature", timeout=20).payload)
        assert reading["device_id"] == "device003"
        assert device.terminate() == 0
    finally:
        device.stop()
        watcher.close()


@pytest.mark.integration
def test_the_dashboard_container_command_serves_the_healthcheck(
    services: dict[str, dict[str, Any]], compose_lab: LabEnv, compose_broker: Broker
) -> None:
    port = free_port()
    command = dockerfile_instruction(PROJECT_ROOT / "dashboard" / "Dockerfile", "CMD")
    command = [sys.executable, "-m", "gunicorn", *command[1:]]
    command[command.index("--bind") + 1] = f"127.0.0.1:{port}"
    service = services["dashboard"]
    env = {**os.environ, **container_env(service, compose_lab, DATABASE_URL=f"sqlite:///{compose_lab.root}/dash.db")}
    healthcheck = [
        sys.executable if word == "python" else word.replace(":5000/", f":{port}/")
        for word in service["healthcheck"]["test"][1:]
    ]
    log = compose_lab.root / "gunicorn.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:

        def healthy() -> bool:
            assert server.poll() is None, log.read_text()
            # in the container's environment (CERTS_DIR says where the root certificate is)
            return subprocess.run(healthcheck, capture_output=True, timeout=10, env=env).returncode == 0

        wait_for(healthy, timeout=60, interval=0.5, what=f"the dashboard healthcheck\n{log.read_text()}")
        # 0.0.0.0 in the container: HTTPS only, with the dashboard certificate, verified against the lab's root
        context = ssl.create_default_context(cafile=str(compose_lab.certs_dir / "root_ca" / "root_ca.crt"))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )

        def connected() -> bool:
            with opener.open(f"https://127.0.0.1:{port}/healthz", timeout=5) as response:
                return json.loads(response.read())["mqtt"]["connected"]

        wait_for(connected, timeout=20, interval=0.3, what="the dashboard's MQTT connection")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(timeout=20) == 0, log.read_text()
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()


# -- the broker's entrypoint ---------------------------------------------------------------------------


@pytest.mark.integration
def test_the_broker_entrypoint_reloads_on_revocation_and_stops_on_sigterm(generated_lab: LabEnv) -> None:
    files = BrokerFiles(generated_lab.certs_dir, generated_lab.data_dir)
    port = generated_lab.broker_port
    log_path = generated_lab.root / "entrypoint.log"
    env = {**os.environ, "POLL_SECONDS": "0.2", "TMPDIR": str(generated_lab.root)}
    health = ["sh", str(ENTRYPOINT), "health", str(files.conf)]
    files.dynsec_file.unlink()  # a new data volume: the entrypoint writes the plugin's state file
    with open(log_path, "wb") as out:
        entry = subprocess.Popen(
            ["sh", str(ENTRYPOINT), str(files.conf)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    watcher = device = ca = None
    try:
        wait_for(
            lambda: subprocess.run(health, capture_output=True, timeout=10).returncode == 0,
            timeout=15,
            what=f"the healthcheck\n{log_path.read_text()}",
        )
        children = set(child_pids(entry.pid))

        def is_the_broker(proc: Path) -> bool:
            # Mosquitto itself, not a short-lived child of the poll loop (`$(stamp ...)`, stat: their command
            # lines name mosquitto/ paths too, and one may exit meanwhile, which processes() skips).
            argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0]
            return int(proc.name) in children and Path(os.fsdecode(argv0)).name == "mosquitto"

        (broker_pid,) = processes(is_the_broker)
        assert json.loads(files.dynsec_file.read_text()) == json.loads(DYNSEC_INITIAL)
        watcher = Collector(generated_lab.certs_dir, "dashboard", port).connect()
        watcher.subscribe("iot/thermometer/#")
        ca = Collector(generated_lab.certs_dir, "ca-1", port).connect()
        device = Collector(generated_lab.certs_dir, "device001", port).connect()
        device.publish("iot/thermometer/device001/temperature", "20.5")
        watcher.expect("iot/thermometer/device001/temperature")

        # What the CA does when it revokes: the ACL (and CRL) replaced by rename. Nobody signals the broker.
        atomic_write(files.acl, render_acl(["device001"]).encode(), CERT_MODE)
        wait_for(lambda: "Reloading config" in log_path.read_text(), timeout=10, what="Mosquitto reloading")
        device.publish("iot/thermometer/device001/temperature", "21.5")
        assert watcher.nothing("iot/thermometer/device001/temperature", within=1.5), "the revoked device still writes"
        # ...and the CA has the plugin close its connection (ca/revocation.py)
        ca.publish(DYNSEC_TOPIC, disconnect_command("device001"))
        wait_for(device.disconnected.is_set, timeout=2, what="the broker to close device001's connection")

        entry.send_signal(signal.SIGTERM)
        assert entry.wait(timeout=15) == 0, log_path.read_text()
        assert not Path(f"/proc/{broker_pid}").exists(), "Mosquitto outlived its entrypoint"
        assert "terminating" in log_path.read_text()
        assert subprocess.run(health, capture_output=True, timeout=10).returncode == 1
    finally:
        for client in (device, watcher, ca):
            if client is not None:
                client.close()
        if entry.poll() is None:
            entry.kill()
            entry.wait()
        for pid in child_pids(entry.pid):
            os.kill(pid, signal.SIGKILL)


def test_the_broker_entrypoint_names_the_fix_when_it_cannot_read_its_config(tmp_path: Path) -> None:
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), str(tmp_path / "missing.conf")], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 1
    assert "LAB_UID/LAB_GID" in result.stderr and "./setup.sh" in result.stderr

"""`python -m lab.native`: the whole lab as real local processes; Ctrl-C leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.processes import spawn
from lab.supervisor import PIDS_FILE, pid_alive, port_accepts, read_pids

from .ca_support import disconnect_as_the_ca, revoke_in_process
from .conftest import PROJECT_ROOT, LabEnv
from .support import Collector, free_port, wait_for

pytestmark = pytest.mark.integration


class NativeLab:
    """The runner as a subprocess in its own session, as a terminal would run it; output collected."""

    def __init__(self, lab: LabEnv, *args: str) -> None:
        self.lab = lab
        self.env = {
            **os.environ,
            **lab.env,
            "DASHBOARD_PORT": str(free_port()),
            "PUBLISH_INTERVAL": "0.5",
            "CA_HTTPS_PORT": str(free_port()),
            "PYTHONUNBUFFERED": "1",
        }
        self.process = spawn([sys.executable, "-m", "lab.native", *args], self.env, text=True, new_session=True)
        self.lines: list[str] = []
        self.seen_pids: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def pids_file(self) -> Path:
        return self.lab.data_dir / PIDS_FILE

    @property
    def dashboard_port(self) -> int:
        return int(self.env["DASHBOARD_PORT"])

    def output(self) -> str:
        return "\n".join(self.lines)

    def pids(self) -> dict[str, int]:
        """name -> pid from lab.pids (remembered, to check later that every one of them is gone)."""
        entries = {name: pid for pid, name in read_pids(self.pids_file)}
        self.seen_pids.update(entries.values())
        return entries

    def wait_output(self, text: str, timeout: float = 30) -> None:
        def seen() -> bool:
            if text in self.output():
                return True
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                if text not in self.output():
                    raise AssertionError(f"the runner exited with {self.process.returncode}:\n{self.output()}")
            return text in self.output()

        wait_for(seen, timeout=timeout, what=f"{text!r} in the runner's output:\n{self.output()}")

    def ctrl_c(self, timeout: float = 45) -> int:
        """SIGINT to the runner's whole process group: what the terminal does on Ctrl-C."""
        os.killpg(self.process.pid, signal.SIGINT)
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def cleanup(self) -> None:
        """Whatever the test did, kill the runner and everything it listed."""
        self.pids()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in self.seen_pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def native_labs(lab_env: LabEnv) -> Iterator[list[NativeLab]]:
    labs: list[NativeLab] = []
    yield labs
    for lab in labs:
        lab.cleanup()


def start(labs: list[NativeLab], lab_env: LabEnv, *args: str) -> NativeLab:
    lab = NativeLab(lab_env, *args)
    labs.append(lab)
    return lab


def assert_all_gone(lab: NativeLab, ports: list[int]) -> None:
    alive = [pid for pid in lab.seen_pids if pid_alive(pid)]
    assert not alive, f"left behind: {alive}\n{lab.output()}"
    assert not lab.pids_file.exists()
    for port in ports:
        assert not port_accepts("127.0.0.1", port), f"port {port} still open"


def test_readings_flow_a_killed_thermometer_restarts_and_ctrl_c_stops_all(
    lab_env: LabEnv, native_labs: list[NativeLab]
) -> None:
    lab = start(native_labs, lab_env, "--no-dashboard")
    lab.wait_output("The lab is up")
    assert {"runner", "mosquitto", "device001", "device002"} <= set(lab.pids())
    assert lab.pids()["runner"] == lab.process.pid
    # No dashboard app in this run, so the test may hold the dashboard identity.
    dashboard = Collector(lab_env.certs_dir, "dashboard", lab_env.broker_port).connect()
    try:
        dashboard.subscribe("iot/thermometer/#")

        def readings(device: str) -> list[dict]:
            return [
                json.loads(m.payload)
                for m in list(dashboard.received)
                if m.topic == f"iot/thermometer/{device}/temperature"
            ]

        wait_for(lambda: readings("device001") and readings("device002"), timeout=20, what="both devices' readings")
        assert {r["device_id"] for r in readings("device002")} == {"device002"}

        old = lab.pids()["device001"]
        os.kill(old, signal.SIGKILL)
        lab.wait_output("[runner] device001 was killed by SIGKILL; restarting in 1s")
        wait_for(lambda: lab.pids().get("device001", old) != old, timeout=20, what="a new device001 process")
        # The new process numbers its readings from 1 again: proof that it is the restarted one publishing.
        seen_before = len(readings("device001"))
        wait_for(
            lambda: any(r["seq"] == 1 for r in readings("device001")[seen_before:]),
            timeout=20,
            what="readings from the restarted device001",
        )

        mark = len(dashboard.received)
        assert lab.ctrl_c() == 0, lab.output()
        # Thermometers were stopped before the broker: both said `offline` while it still ran.
        offline = {m.topic for m in list(dashboard.received)[mark:] if m.payload == b"offline"}
        assert offline == {"iot/thermometer/device001/status", "iot/thermometer/device002/status"}
    finally:
        dashboard.client.loop_stop()
    assert "[runner] stopped; nothing left running" in lab.output()
    assert_all_gone(lab, [lab_env.broker_port])


def test_full_lab_with_dashboard_comes_up_and_ctrl_c_leaves_nothing(
    lab_env: LabEnv, native_labs: list[NativeLab]
) -> None:
    lab = start(native_labs, lab_env, "--enrol", "device003")  # device003 is not generated: it enrols itself
    lab.wait_output("The lab is up", timeout=45)
    assert f"http://127.0.0.1:{lab.dashboard_port}/" in lab.output()
    assert {"runner", "mosquitto", "dashboard", "device001", "device002", "device003"} <= set(lab.pids())
    for device in ("device001", "device002", "device003"):
        lab.wait_output(f"{device} connected to localhost:{lab_env.broker_port}", timeout=20)
    assert "[device003] " in lab.output() and "enrolled device003 with the CA" in lab.output()

    def healthz() -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{lab.dashboard_port}/healthz", timeout=2) as resp:
                body = json.loads(resp.read())
        except OSError:
            return None
        return body if body.get("mqtt", {}).get("connected") else None

    wait_for(healthz, timeout=30, what=f"the dashboard connected to the broker:\n{lab.output()}")

    # A second runner refuses to start over this one, and changes nothing.
    second = subprocess.run(
        [sys.executable, "-m", "lab.native"], env=lab.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 1
    assert "already running" in second.stderr and "./setup.sh down" in second.stderr
    assert lab.pids()["runner"] == lab.process.pid

    assert lab.ctrl_c() == 0, lab.output()
    assert_all_gone(lab, [lab_env.broker_port, lab.dashboard_port])


def test_children_do_not_outlive_a_killed_runner(lab_env: LabEnv, native_labs: list[NativeLab]) -> None:
    lab = start(native_labs, lab_env, "--no-dashboard", "--devices", "device001")
    lab.wait_output("The lab is up")
    lab.wait_output("device001 connected")
    children = {name: pid for name, pid in lab.pids().items() if name != "runner"}
    assert set(children) == {"mosquitto", "device001"}
    os.kill(lab.process.pid, signal.SIGKILL)  # no chance to clean up
    lab.process.wait(timeout=10)
    wait_for(
        lambda: not any(pid_alive(pid) for pid in children.values()),
        timeout=20,
        what=f"the children {children} to die with the runner",
    )


def test_wrong_passphrase_exits_2_and_starts_nothing(generated_lab: LabEnv) -> None:
    env = {**os.environ, **generated_lab.env, "CA_PASSPHRASE": "not-the-passphrase-of-this-ca"}
    result = subprocess.run(
        [sys.executable, "-m", "lab.native"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "CA_PASSPHRASE does not unlock" in result.stderr
    assert "[mosquitto]" not in result.stdout
    assert not (generated_lab.data_dir / PIDS_FILE).exists()
    assert not port_accepts("127.0.0.1", generated_lab.broker_port)


def test_a_revoked_thermometer_is_not_restarted_nor_started_again(
    lab_env: LabEnv, native_labs: list[NativeLab]
) -> None:
    lab = start(native_labs, lab_env, "--no-dashboard")
    lab.wait_output("The lab is up")
    lab.wait_output("device001 connected")
    revoke_in_process(lab_env, "device001")
    # No CA service in this run (--no-dashboard): the test closes the revoked connection as the CA would.
    disconnect_as_the_ca(lab_env, lab_env.broker_port, "device001")
    lab.wait_output("[runner] device001's certificate is revoked (exit 3): not restarted", timeout=20)
    assert "the CA revoked its certificate" in lab.output()
    assert "--devices device001" in lab.output()
    wait_for(lambda: "device001" not in lab.pids(), timeout=5, what="device001 to leave lab.pids")
    lab.wait_output("device002 connected")
    assert lab.ctrl_c() == 0, lab.output()
    assert "restarting device001" not in lab.output()

    # The next run does not start it, and says the one next step.
    again = start(native_labs, lab_env, "--no-dashboard")
    again.wait_output("The lab is up")
    assert "not starting device001: certificate revoked" in again.output()
    assert "./setup.sh certs --devices device001" in again.output()
    assert "device001" not in again.pids() and "device002" in again.pids()
    assert again.ctrl_c() == 0, again.output()

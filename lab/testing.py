"""The lab's real parts as subprocesses, for the tests (tests/) and the benchmarks (bench/) alike.

A Mosquitto on the config the generator rendered, the dashboard (`python -m dashboard`, or gunicorn as in
dashboard/Dockerfile), and the helpers both need: a free loopback port, waiting on a condition, stopping a
child. Nothing here is mocked; bench/ imports this module, never tests/ (`python -m bench.…` works alone).
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab.mqtt import Identity
from lab.processes import spawn, stop_process
from pki.broker import BrokerFiles, broker_command
from pki.config import PROJECT_ROOT, Settings

# No proxy for our own loopback services, whatever the environment says.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# Ports handed to servers the tests (and benches) start. The suite runs in several pytest-xdist workers at once,
# and a port that bind(0) found free in one worker could be taken by another before its server binds it. So
# each worker draws from its own block, below the kernel's ephemeral range (net.ipv4.ip_local_port_range starts
# at 32768 on Linux; outgoing connections take theirs from there), and never hands out the same port twice.
PORT_BASE, PORT_BLOCK = 10000, 2500
_ports_given: set[int] = set()
_ports_lock = threading.Lock()


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ... (unset without xdist)
    return int(worker[2:]) if worker[2:].isdigit() else 0


def free_port() -> int:
    """A loopback TCP port that is free now and that no other worker of this test run will hand out."""
    first = PORT_BASE + (_worker_index() % 8) * PORT_BLOCK
    with _ports_lock:
        for port in random.sample(range(first, first + PORT_BLOCK), PORT_BLOCK):
            if port in _ports_given:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _ports_given.add(port)
            return port
    raise RuntimeError(f"no free port left in {first}-{first + PORT_BLOCK - 1}")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def mqtt_varint(n: int) -> bytes:
    """MQTT's variable byte integer (the remaining length, v5 property lengths and identifiers), for raw packets."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def start_client(client: Any, port: int, ready: threading.Event, timeout: float, keepalive: int = 30) -> bool:
    """Connect a paho client to the local broker and start its network loop; False (loop stopped) when `ready`
    is not set within `timeout` seconds."""
    client.connect("localhost", port, keepalive=keepalive)
    client.loop_start()
    if ready.wait(timeout):
        return True
    client.loop_stop()
    return False


def mosquitto_tls_args(identity: Identity, port: int, host: str = "localhost") -> list[str]:
    """The options that connect `mosquitto_pub` / `mosquitto_sub` to the local broker as `identity` (mutual TLS)."""
    return [
        "-h",
        host,
        "-p",
        str(port),
        "--cafile",
        str(identity.ca_cert),
        "--cert",
        str(identity.cert),
        "--key",
        str(identity.key),
    ]


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def processes(matching: Callable[[Path], bool]) -> list[int]:
    """The PIDs whose /proc/<pid> folder `matching` accepts (Linux); one that vanishes meanwhile is skipped."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if matching(entry):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (a gunicorn master's worker)."""
    return processes(lambda proc: int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid)


class Broker:
    """Mosquitto running the config the generator rendered into `certs/mosquitto/mosquitto.conf`."""

    def __init__(self, certs_dir: Path, data_dir: Path, port: int) -> None:
        self.files = BrokerFiles(certs_dir, data_dir)
        self.port = port
        self.log_path = data_dir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        self.files.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(broker_command(self.files), stdout=log, stderr=log)
        wait_for(self._accepting, timeout=10, what=f"mosquitto on port {self.port}; log:\n{self.log()}")
        return self

    def reload(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def log(self) -> str:
        return read_log(self.log_path)

    def _accepting(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"mosquitto exited with {self.process.returncode}:\n{self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class CAServiceProcess:
    """One CA service replica (`python -m ca`) as a real subprocess, identity `ca-<instance>`."""

    def __init__(self, env: dict[str, str], instance: int, log_path: Path) -> None:
        self.instance = instance
        self.port = free_port()
        self.env = {
            **env,
            "CA_INSTANCE": str(instance),
            "CA_INTERNAL_PORT": str(self.port),
            **({} if instance == 1 else {"CA_HTTPS_PORT": "0"}),
        }
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def start(self, timeout: float = 30) -> CAServiceProcess:
        with open(self.log_path, "ab") as out:
            self.process = spawn([sys.executable, "-m", "ca"], self.env, out)
        wait_for(
            self._connected,
            timeout=timeout,
            interval=0.1,
            what=f"ca-{self.instance} connected to MQTT; log:\n{self.log()[-3000:]}",
        )
        return self

    def _connected(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"ca-{self.instance} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
        try:
            with LOCAL.open(self.url + "/healthz", timeout=5) as response:
                return bool(json.loads(response.read())["mqtt"]["connected"])
        except OSError:  # not up yet, or 503 while its MQTT connection is not
            return False

    def stop(self) -> None:
        stop_process(self.process, timeout=15)
        self.process = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class DashboardProcess:
    """The dashboard as a real subprocess with the lab's environment, as `./setup.sh native` runs it (or gunicorn,
    as in Docker), ready once its MQTT client is connected; `pid` is the process that does the work.

    It forwards /v1/ssl/* to the CA replicas in CA_URLS; without CA_URLS it starts one of its own first (`ca`, a
    `python -m ca` subprocess, stopped with it). The dashboard itself never gets CA_PASSPHRASE."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None, server: str = "werkzeug") -> None:
        if server not in ("werkzeug", "gunicorn"):
            raise ValueError(f"unknown server {server!r}: werkzeug or gunicorn")
        self.port = port or free_port()
        base = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.ca: CAServiceProcess | None = None
        if not base.get("CA_URLS"):
            self.ca = CAServiceProcess(
                {**base, "CA_HTTPS_PORT": str(free_port())}, 1, log_path.with_name(log_path.stem + "-ca.log")
            )
            base["CA_URLS"] = self.ca.url
        self.env = {**{k: v for k, v in base.items() if k != "CA_PASSPHRASE"}, "DASHBOARD_PORT": str(self.port)}
        self.log_path = log_path
        self.server = server
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @functools.cached_property
    def token(self) -> str:
        """A viewer API token for everything but /healthz, made in the lab's database on first use."""
        from dashboard.accounts import UserStore

        store = UserStore(Settings.from_env(self.env).effective_database_url)
        try:
            return store.create_token("test-rig", "viewer")[1]
        finally:
            store.close()

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self, timeout: float = 30) -> DashboardProcess:
        if self.ca is not None:
            self.ca.start(timeout)
        argv = [sys.executable, "-m", "dashboard"]
        if self.server == "gunicorn":
            argv = [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers",
                "1",
                "--threads",
                "50",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--graceful-timeout",
                "5",
                "--no-control-socket",
                "--config",
                "python:dashboard.gunicorn_conf",
                "dashboard:create_app()",
            ]
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                argv, env=self.env, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        wait_for(
            self._mqtt_connected,
            timeout=timeout,
            interval=0.1,
            what=f"the dashboard on {self.url} connected to MQTT; log:\n{self.log()[-3000:]}",
        )
        self.pid = self.process.pid
        if self.server == "gunicorn":
            master = self.process.pid
            self.pid = wait_for(lambda: next(iter(child_pids(master)), 0), timeout=5, what="the gunicorn worker")
        return self

    def get_json(self, path: str, timeout: float = 10) -> Any:
        """GET a path of the dashboard ("api/data" or "/api/data") with the viewer token."""
        request = urllib.request.Request(self.url + path.lstrip("/"), headers=self.auth_headers)  # noqa: S310 - http://127.0.0.1
        with LOCAL.open(request, timeout=timeout) as response:
            return json.loads(response.read())

    def health(self) -> dict[str, Any] | None:
        """/healthz (public), healthy (200) or degraded (503: the broker is down, say, in a fault run); None while
        nothing answers."""
        try:
            with LOCAL.open(self.url + "healthz", timeout=5) as response:
                return json.load(response)
        except urllib.error.HTTPError as ex:
            if ex.code != 503:
                raise
            return json.loads(ex.read())
        except OSError:
            return None

    def _mqtt_connected(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the dashboard exited with {self.process.returncode}:\n{self.log()[-3000:]}")
        health = self.health()  # its MQTT connections (the ingest's too) and the database are up
        return bool(health and health["status"] == "ok")

    def readings_ingested(self) -> int:
        """Readings the live hub accepted since the dashboard started (the ingest counter behind /healthz)."""
        health = self.health()
        if health is None:
            raise RuntimeError(f"the dashboard on {self.url} does not answer")
        return int(health["db"]["readings_stored_since_start"])

    def log(self) -> str:
        return read_log(self.log_path)

    def errors(self, limit: int = 20) -> list[str]:
        """ERROR lines, tracebacks and refused requests in the dashboard's log, for a results file."""
        return [
            line
            for line in self.log().splitlines()
            if " ERROR " in line or "Traceback" in line or "Bad request" in line
        ][:limit]

    def stop(self, timeout: float = 15) -> None:
        stop_process(self.process, timeout)
        if self.ca is not None:
            self.ca.stop()

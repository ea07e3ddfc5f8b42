"""A throwaway lab for the benchmarks: its own certificates, Mosquitto and dashboard, on free loopback ports.

Everything lives in one temporary folder (removed on close) so a bench never touches the developer's
`certs/`, `data/` or `.env`, and two benches can run side by side. The lab is the real one: certificates
from `pki.lab.LabCertificates`, the broker config the generator renders (mutual TLS, ACL, CRL), the
dashboard as a subprocess (`python -m dashboard`, or gunicorn as in dashboard/Dockerfile).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lab.mqtt import Identity
from pki.authority import CertificateAuthority, cert_pem, generate_private_key, key_pem
from pki.config import PROJECT_ROOT, Settings
from pki.lab import LabCertificates
from pki.profiles import DEVICE
from pki.store import CertsLayout
from tests.support import Broker, free_port, wait_for

log = logging.getLogger(__name__)


def raise_fd_limit(wanted: int) -> int:
    """Lift the soft open-files limit towards `wanted` (capped by the hard limit); returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (a gunicorn master's worker), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def api_token(database_url: str, label: str, role: str = "viewer") -> str:
    """A new API token in the lab's database, as `python -m dashboard.users token` makes one."""
    from dashboard.accounts import UserStore

    store = UserStore(database_url)
    try:
        return store.create_token(label, role)[1]
    finally:
        store.close()


class DashboardProcess:
    """The dashboard as a real subprocess; `pid` is the process that does the work (the gunicorn worker)."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path, server: str = "werkzeug") -> None:
        if server not in ("werkzeug", "gunicorn"):
            raise ValueError(f"unknown server {server!r}: werkzeug or gunicorn")
        self.env = env
        self.port = port
        self.log_path = log_path
        self.server = server
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0
        # A viewer API token for everything but /healthz (the dashboard needs a login since Step 11).
        self.token = api_token(Settings.from_env(env).effective_database_url, "bench")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self, timeout: float = 30) -> DashboardProcess:
        if self.server == "gunicorn":
            argv = [sys.executable, "-m", "gunicorn", "--workers", "1", "--threads", "50", "--bind",
                    f"127.0.0.1:{self.port}", "--graceful-timeout", "5", "--no-control-socket",
                    "--config", "python:dashboard.gunicorn_conf", "dashboard:create_app()"]
        else:
            argv = [sys.executable, "-m", "dashboard"]
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(argv, env=self.env, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._healthy, timeout=timeout, interval=0.1,
                 what=f"the dashboard on {self.url} connected to MQTT; log:\n{self.log()[-3000:]}")
        self.pid = self.process.pid
        if self.server == "gunicorn":
            self.pid = wait_for(lambda: next(iter(child_pids(self.process.pid)), 0), timeout=5,  # type: ignore[union-attr]
                                what="the gunicorn worker")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"the dashboard exited with {self.process.returncode}:\n{self.log()[-3000:]}")
        try:  # its MQTT connections (the ingest's too) and the database are up
            return self.health()["status"] == "ok"
        except OSError:
            return False

    def get_json(self, path: str, timeout: float = 10) -> Any:
        request = urllib.request.Request(self.url + path, headers=self.auth_headers)  # noqa: S310 - our loopback URL
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - our loopback URL
            return json.loads(response.read())

    def health(self) -> dict[str, Any]:
        return self.get_json("/healthz", timeout=5)

    def readings_ingested(self) -> int:
        """Readings the live hub accepted since the dashboard started (the ingest counter behind /healthz)."""
        return int(self.health()["db"]["readings_stored_since_start"])

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def errors(self, limit: int = 20) -> list[str]:
        """ERROR lines, tracebacks and refused requests in the dashboard's log, for the results file."""
        return [line for line in self.log().splitlines()
                if " ERROR " in line or "Traceback" in line or "Bad request" in line][:limit]


class BenchLab:
    """Certificates, broker and dashboard of one bench run, all under `root` (a temp folder by default)."""

    def __init__(self, root: Path | None = None, keep: bool = False) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="iot-bench-"))
        self.keep = keep
        self.broker_port = free_port()
        self.dashboard_port = free_port()
        self.env: dict[str, str] = {
            **os.environ,
            "CERTS_DIR": str(self.root / "certs"),
            "DATA_DIR": str(self.root / "data"),
            "DATABASE_URL": f"sqlite:///{self.root / 'data' / 'lab.db'}",
            "CA_PASSPHRASE": secrets.token_urlsafe(24),
            "DEVICES": "device001,device002",
            "LAB_ENV_FILE": str(self.root / "no.env"),  # never the developer's .env
            "BROKER_ADDRESS": "localhost",
            "BROKER_PORT": str(self.broker_port),
            "DASHBOARD_HOST": "127.0.0.1",
            "DASHBOARD_PORT": str(self.dashboard_port),
            "CA_HTTPS_PORT": str(free_port()),
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
        self.settings = Settings.from_env(self.env)
        self.layout = CertsLayout(self.settings.certs_dir)
        self.broker: Broker | None = None
        self.dashboard: DashboardProcess | None = None
        self._ca: CertificateAuthority | None = None

    def __enter__(self) -> BenchLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- certificates ------------------------------------------------------------------------------

    def generate(self) -> BenchLab:
        """The lab's own certificates (root, broker, dashboard, provisioner, two devices) and broker files."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        LabCertificates(self.settings).generate()
        return self

    def identity(self, name: str) -> Identity:
        return Identity.of(self.settings.certs_dir, name)

    @property
    def ca(self) -> CertificateAuthority:
        if self._ca is None:
            self._ca = CertificateAuthority.load(self.layout.ca_cert.read_bytes(), self.layout.ca_key.read_bytes(),
                                                 self.settings.ca_passphrase)
        return self._ca

    def issue_devices(self, names: Sequence[str], progress: Callable[[int], None] | None = None) -> dict[str, Identity]:
        """Device certificates from the in-process CA, in the generator's layout (EC P-256, DEVICE profile).

        Faster than the generator (no fsync, no inventory rows): these certificates die with the temp lab.
        """
        ca, root_pem = self.ca, self.ca.cert_pem
        identities = {}
        for name in names:
            key = generate_private_key("ec")
            cert = ca.issue(key.public_key(), DEVICE, name, days=2)
            folder = self.layout.entity_dir(name)
            folder.mkdir(mode=0o700, exist_ok=True)
            key_path = self.layout.key(name)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key_pem(key))
            self.layout.cert(name).write_bytes(cert_pem(cert))
            self.layout.ca_copy(name).write_bytes(root_pem)
            identities[name] = self.identity(name)
            if progress:
                progress(1)
        return identities

    # -- processes ---------------------------------------------------------------------------------

    def start_broker(self) -> Broker:
        self.broker = Broker(self.settings.certs_dir, self.settings.data_dir, self.broker_port).start()
        return self.broker

    def start_dashboard(self, server: str = "werkzeug", env: dict[str, str] | None = None) -> DashboardProcess:
        self.dashboard = DashboardProcess({**self.env, **(env or {})}, self.dashboard_port,
                                          self.settings.data_dir / "dashboard.log", server).start()
        return self.dashboard

    def stop_dashboard(self) -> None:
        if self.dashboard is not None:
            self.dashboard.stop()
            self.dashboard = None

    def close(self) -> None:
        self.stop_dashboard()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self._own_root and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.keep:
            print(f"bench lab kept in {self.root}")


class SocketIOWatcher:
    """A Socket.IO client of the dashboard (the `browser`): calls `on_batch(received_at, batch)` per push."""

    def __init__(self, url: str, on_batch: Callable[[float, dict[str, Any]], None] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        import socketio  # python-socketio's client needs requests + websocket-client (requirements-dev.txt)

        self.url = url
        self.headers = headers or {}
        self.client = socketio.Client(reconnection=False)
        self.on_batch = on_batch
        self.snapshot: dict[str, Any] | None = None
        self.snapshot_event = threading.Event()
        self.batches = 0
        self.client.on("snapshot", self._on_snapshot)
        self.client.on("batch", self._on_batch)

    def _on_snapshot(self, data: dict[str, Any]) -> None:
        self.snapshot = data
        self.snapshot_event.set()

    def _on_batch(self, data: dict[str, Any]) -> None:
        received = time.time()
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(received, data)

    def connect(self, timeout: float = 10) -> SocketIOWatcher:
        self.client.connect(self.url, transports=["websocket"], wait_timeout=timeout, headers=self.headers)
        if not self.snapshot_event.wait(timeout):
            raise RuntimeError("the dashboard sent no snapshot")
        return self

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()


def busy_cpu_percent(seconds: float = 1.0) -> float:
    """How busy the whole machine is (all cores, 0-100) over `seconds`, from /proc/stat."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return idle, sum(values)

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return round(100 * (1 - (idle1 - idle0) / max(total1 - total0, 1)), 1)


def wait_until_quiet(threshold: float = 15.0, timeout: float = 120.0) -> float:
    """Benchmarks on a busy machine measure the other load: wait (up to `timeout`) until CPU use is below
    `threshold` percent, and return the last reading so the results can say how quiet it was."""
    deadline = time.monotonic() + timeout
    busy = busy_cpu_percent()
    warned = False
    while busy > threshold and time.monotonic() < deadline:
        if not warned:
            print(f"the machine is {busy:.0f}% busy with other work: waiting up to {timeout:.0f} s for it to "
                  "calm down (figures from a busy machine are not comparable)", flush=True)
            warned = True
        busy = busy_cpu_percent(2.0)
    if busy > threshold:
        print(f"warning: still {busy:.0f}% busy; the figures below include that load", flush=True)
    return busy


class MachineMeter:
    """Whole-machine CPU between start() and stop(), in percent of one core (2 cores fully busy = 200)."""

    def __init__(self) -> None:
        self._start = (0, 0)

    @staticmethod
    def _sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return sum(values) - values[3] - (values[4] if len(values) > 4 else 0), sum(values)

    def start(self) -> MachineMeter:
        self._start = self._sample()
        return self

    def stop(self) -> float:
        busy, total = self._sample()
        cores = os.cpu_count() or 1
        return round(100 * cores * (busy - self._start[0]) / max(total - self._start[1], 1), 1)

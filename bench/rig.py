"""A throwaway lab for the benchmarks: its own certificates, Mosquitto and dashboard, on free loopback ports.

Everything lives in one temporary folder (removed on close) so a bench never touches the developer's
`certs/`, `data/` or `.env`, and two benches can run side by side. The lab is the real one: certificates
from `pki.generator.LabCertificates`, the broker config the generator renders (mutual TLS, ACL, CRL), the
dashboard as a subprocess (`lab.testing.DashboardProcess`: `python -m dashboard`, or gunicorn as in
dashboard/Dockerfile).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from bench.common import DOCS_DIR, RESULTS_DIR
from lab.mqtt import Identity
from lab.testing import Broker, CAServiceProcess, DashboardProcess, free_port
from pki.authority import CertificateAuthority, generate_private_key
from pki.config import Settings
from pki.entity_files import EntityFiles
from pki.generator import LabCertificates
from pki.profiles import DEVICE
from pki.store import CertsLayout

log = logging.getLogger(__name__)


def raise_fd_limit(wanted: int) -> int:
    """Lift the soft open-files limit towards `wanted` (capped by the hard limit); returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


SERVERS = ("werkzeug", "gunicorn")  # lab.testing.DashboardProcess: `python -m dashboard`, or gunicorn as in Docker


def lab_bench_parser(module: str, description: str | None, *, from_docstring: bool = False) -> argparse.ArgumentParser:
    """The parser of a bench that runs on a BenchLab of its own (`python -m bench.<module>`), with the options all
    of them take: the dashboard's server, where results go, the lab folder, the wait for a quiet machine."""
    formatter = argparse.RawDescriptionHelpFormatter if from_docstring else argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{module}", description=description, formatter_class=formatter
    )
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default="werkzeug",
        help="how the dashboard/CA is served: `python -m dashboard` (Werkzeug, as natively) or "
        "gunicorn with one worker and threads (as in Docker)",
    )
    add_lab_options(parser)
    return parser


def add_lab_options(parser: argparse.ArgumentParser) -> None:
    """The options of every bench on a BenchLab: where results go, the lab folder, the wait for a quiet machine."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write results JSON and plots here instead of bench/results and docs/bench",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary lab folder (logs, database)")
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=120,
        help="first wait up to this many seconds for the machine to be idle (0: do not wait)",
    )


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return number


def rate_list(value: str) -> list[float]:
    """Comma-separated rates in messages per second, each positive."""
    parts = [v for v in value.split(",") if v.strip()]
    if not all(_is_float(v) for v in parts):
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of rates")
    rates = [float(v) for v in parts]
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive numbers of messages per second")
    return rates


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


Figures = dict[str, Any]


def run_on_lab(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace, BenchLab], Coroutine[Any, Any, Figures]],
    report: Callable[[Figures, Path, Path], None],
) -> int:
    """A bench's main: wait for a quiet machine, run on a fresh lab, then report (results and plots to --out, else
    bench/results and docs/bench)."""
    results_dir, plots_dir = (args.out, args.out) if args.out else (RESULTS_DIR, DOCS_DIR)
    busy = wait_until_quiet(timeout=args.quiet_timeout) if args.quiet_timeout > 0 else None
    with BenchLab(keep=args.keep) as lab:
        lab.generate()
        figures = asyncio.run(run(args, lab))
    figures["machine_busy_pct_before"] = busy
    report(figures, results_dir, plots_dir)
    return 0


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
            # BENCH_DATABASE_URL: run on another database (e.g. a PostgreSQL server), else the lab's SQLite file.
            "DATABASE_URL": os.environ.get("BENCH_DATABASE_URL") or f"sqlite:///{self.root / 'data' / 'lab.db'}",
            "CA_PASSPHRASE": secrets.token_urlsafe(24),
            "DEVICES": "device001,device002",
            "LAB_ENV_FILE": str(self.root / "no.env"),  # never the developer's .env
            "BROKER_ADDRESS": "localhost",
            "BROKER_PORT": str(self.broker_port),
            "DASHBOARD_HOST": "127.0.0.1",
            "DASHBOARD_PORT": str(self.dashboard_port),
            "CA_HTTPS_PORT": str(free_port()),
            # Certificates for two CA replicas (ca-1, ca-2): the benchmarks compare 1 and 2.
            "CA_REPLICAS": "2",
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
        self.settings = Settings.from_env(self.env)
        self.layout = CertsLayout(self.settings.certs_dir)
        self.broker: Broker | None = None
        self.dashboard: DashboardProcess | None = None
        self.cas: list[CAServiceProcess] = []
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
            self._ca = CertificateAuthority.load(
                self.layout.ca_cert.read_bytes(), self.layout.ca_key.read_bytes(), self.settings.ca_passphrase
            )
        return self._ca

    def issue_devices(self, names: Sequence[str], progress: Callable[[int], None] | None = None) -> dict[str, Identity]:
        """Device certificates from the in-process CA, written as the CA writes an entity's files (EC P-256, DEVICE
        profile). Faster than the generator (no inventory rows): these certificates die with the temp lab.
        """
        ca, root_pem = self.ca, self.ca.cert_pem
        files = EntityFiles(self.layout)
        identities = {}
        for name in names:
            key = generate_private_key("ec")
            files.write(name, ca.issue(key.public_key(), DEVICE, name, days=2), root_pem, key)
            identities[name] = self.identity(name)
            if progress:
                progress(1)
        return identities

    # -- processes ---------------------------------------------------------------------------------

    def start_broker(self) -> Broker:
        self.broker = Broker(self.settings.certs_dir, self.settings.data_dir, self.broker_port).start()
        return self.broker

    def start_cas(self, replicas: int = 1) -> list[CAServiceProcess]:
        """`replicas` CA service processes (ca-1 ...), started before the dashboard that forwards to them."""
        self.stop_cas()
        self.cas = [
            CAServiceProcess(self.env, n, self.settings.data_dir / f"ca-{n}.log").start()
            for n in range(1, replicas + 1)
        ]
        return self.cas

    def stop_cas(self) -> None:
        for ca in self.cas:
            ca.stop()
        self.cas = []

    def start_dashboard(self, server: str = "werkzeug", env: dict[str, str] | None = None) -> DashboardProcess:
        """The dashboard, forwarding /v1/ssl/* to the running CA replicas (one is started when none runs)."""
        if not self.cas:
            self.start_cas(1)
        urls = ",".join(ca.url for ca in self.cas)
        self.dashboard = DashboardProcess(
            {**self.env, "CA_URLS": urls, **(env or {})},
            self.settings.data_dir / "dashboard.log",
            self.dashboard_port,
            server,
        ).start()
        return self.dashboard

    def stop_dashboard(self) -> None:
        if self.dashboard is not None:
            self.dashboard.stop()
            self.dashboard = None

    def close(self) -> None:
        """The dashboard and its CA replicas, then the broker."""
        self.stop_dashboard()
        self.stop_cas()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self._own_root and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.keep:
            print(f"bench lab kept in {self.root}")


class SocketIOWatcher:
    """A Socket.IO client of the dashboard (the `browser`): calls `on_batch(received_at, batch)` per push."""

    def __init__(
        self,
        url: str,
        on_batch: Callable[[float, dict[str, Any]], None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
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
            print(
                f"the machine is {busy:.0f}% busy with other work: waiting up to {timeout:.0f} s for it to "
                "calm down (figures from a busy machine are not comparable)",
                flush=True,
            )
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

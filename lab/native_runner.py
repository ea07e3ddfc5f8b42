"""The native lab's runner (lab/native.py): the certificates and enrolment tokens of the services it starts
(which ones, with what environment: lab/native_services.py), then starts, supervises and stops them (each
process itself: lab/supervisor.py)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from pki.authority import CAError, WrongPassphrase
from pki.broker import BrokerConfigError, find_dynsec_plugin
from pki.config import ConfigError, Settings, revoked_next_step
from pki.entity_files import EntityFiles
from pki.generator import LabCertificates
from pki.service import CAService
from pki.store import CERT_MODE, CertsLayout, atomic_write

from .device import EXIT_REVOKED
from .mqtt import Identity
from .native_services import build_services
from .processes import spawn
from .supervisor import (
    PIDS_FILE,
    STABLE_AFTER,
    STOP_TIMEOUTS,
    PrefixedOutput,
    Service,
    die_with_runner,
    exit_description,
    local_address,
    pid_alive,
    port_accepts,
    read_pids,
    restart_delay,
)

BROKER_START_TIMEOUT = 15.0
BROKER_RUNNING_RE = re.compile(r"mosquitto version \S+ running")
BROKER_LOG_GRACE = 3.0  # after this long without that line, probe the port instead
DASHBOARD_START_TIMEOUT = 30.0
ENROL_TOKEN_TTL = 3600  # seconds; a thermometer that crashes before enrolling restarts with the same token

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class RunnerError(Exception):
    """The lab cannot start; `code` is the exit status (2: settings or passphrase, 1: anything else)."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class LabRunner:
    def __init__(
        self,
        settings: Settings,
        devices: Sequence[str] | None = None,
        *,
        dashboard: bool = True,
        output: PrefixedOutput | None = None,
        enrol: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.devices = list(devices if devices is not None else settings.devices)
        self.enrol = [d for d in enrol if d not in self.devices]  # DEVICES get theirs from the generator
        self.want_dashboard = dashboard
        self.out = output or PrefixedOutput()
        self.services: list[Service] = []
        self.pids_file = settings.data_dir / PIDS_FILE
        # Plain attributes, set from signal handlers (which must not take locks); the loops poll them.
        self._stopping = False
        self._hurry = False  # a second Ctrl-C: kill instead of waiting
        self._banner_shown = False
        self._broker_running = threading.Event()

    def say(self, text: str) -> None:
        self.out.line("runner", text)

    # -- before anything starts -----------------------------------------------------------------

    def ensure_certificates(self) -> None:
        """The generator's logic: issue what is missing or stale; wrong passphrase stops here (exit 2)."""
        lab = LabCertificates(self.settings)
        try:
            report = lab.generate(self.devices)
        except WrongPassphrase:
            raise RunnerError(
                f"CA_PASSPHRASE does not unlock {lab.layout.ca_key}. Nothing was written or started. Put the "
                f"passphrase this CA was created with into .env; if it is lost, delete {lab.layout.ca_dir} "
                "to start a new CA (every certificate is then reissued).",
                EXIT_CONFIG,
            ) from None
        except (ConfigError, CAError) as ex:
            raise RunnerError(str(ex), EXIT_CONFIG) from None
        changed = [r for r in report.results if r.action != "kept"]
        for result in changed:
            self.out.line("certs", result.line())
        # A revoked device is not started (it could not connect); its line above says the next step.
        revoked = {r.name for r in report.results if r.action == "revoked"}
        if revoked:
            self.devices = [d for d in self.devices if d not in revoked]
            self.out.line("certs", f"not starting {', '.join(sorted(revoked))}: certificate revoked")
        self.out.line(
            "certs",
            f"{len(report.results)} certificates current ({len(changed)} issued now) in {self.settings.certs_dir}",
        )

    def enrolment_tokens(self) -> dict[str, str | None]:
        """A single-use token for each self-enrolling device without a certificate (None: it has one)."""
        tokens: dict[str, str | None] = {}
        if not self.enrol:
            return tokens
        service = CAService(self.settings)
        try:
            for device in self.enrol:
                if Identity.of(self.settings.certs_dir, device).cert.exists():
                    tokens[device] = None  # enrolled before; it renews itself
                    continue
                reply = service.issue_token(
                    {"name": device, "pass": self.settings.ca_passphrase or "", "ttl": ENROL_TOKEN_TTL},
                    source="native runner",
                )
                if not reply.ok:
                    raise RunnerError(f"no enrolment token for {device}: {reply.body.get('error')}", EXIT_CONFIG)
                tokens[device] = reply.body["token"]
                # Pin the root: the device then checks that the CA it enrols with is this lab's.
                EntityFiles(CertsLayout(self.settings.certs_dir)).write_root_copy(device, service.ca_pem())
                self.out.line(
                    "certs", f"{device:<14} enrols itself with a single-use token (valid {ENROL_TOKEN_TTL // 60} min)"
                )
        finally:
            service.close()
        return tokens

    def check_not_running(self) -> None:
        """Refuse to start a second lab over a running one (its ports and pid file are taken)."""
        for pid, name in read_pids(self.pids_file):
            if pid != os.getpid() and pid_alive(pid):
                raise RunnerError(
                    f"a native lab is already running ({name}, pid {pid}, from {self.pids_file}); "
                    "stop it with ./setup.sh down"
                )
        busy = [
            f"{what} port {port}"
            for what, host, port in (
                ("broker", self.settings.broker_bind, self.settings.broker_port),
                ("dashboard", self.settings.dashboard_host, self.settings.dashboard_port),
            )
            if (what == "broker" or self.want_dashboard) and port_accepts(host, port)
        ]
        if busy:
            raise RunnerError(
                f"{' and '.join(busy)} already in use: another lab or broker runs (./setup.sh down, or "
                "`./setup.sh docker` is up, or a system mosquitto listens there); or choose BROKER_PORT / "
                "DASHBOARD_PORT in .env"
            )

    # -- children --------------------------------------------------------------------------------

    def start(self, service: Service) -> None:
        """Start a child in its own session (Ctrl-C reaches only the runner). Main thread only."""
        service.restart_at = None
        try:
            process = spawn(service.argv, service.env, new_session=True, preexec_fn=die_with_runner(os.getpid()))
        except OSError as ex:
            self.say(f"cannot start {service.name}: {ex}")
            self._schedule_restart(service)
            return
        service.process = process
        service.started_at = time.monotonic()
        assert process.stdout is not None
        watch = self._watch_broker if service.kind == "broker" else None
        service.output = self.out.pump(service.name, process.stdout, watch)
        self.write_pids()

    def _schedule_restart(self, service: Service) -> float:
        if time.monotonic() - service.started_at > STABLE_AFTER:
            service.failures = 0
        service.failures += 1
        delay = restart_delay(service.failures)
        service.restart_at = time.monotonic() + delay
        return delay

    def _reap(self, service: Service) -> None:
        """A child exited on its own: report it, schedule its restart."""
        assert service.process is not None
        returncode = service.process.returncode
        if service.output is not None:
            service.output.join(timeout=1)  # its last lines first, then our report
        service.process = None
        if service.kind == "device" and returncode == EXIT_REVOKED:  # it said why; it would only be refused again
            self.say(
                f"{service.name}'s certificate is revoked (exit {EXIT_REVOKED}): not restarted. Next step: "
                f"{revoked_next_step(service.name)}, then restart the lab"
            )
            self.write_pids()
            return
        delay = self._schedule_restart(service)
        service.restarts += 1
        self.say(f"{service.name} {exit_description(returncode)}; restarting in {delay:g}s")
        self.write_pids()

    def signal_service(self, service: Service, signum: int) -> None:
        """Signal the child's whole process group while its leader is alive (its pgid is then ours)."""
        process = service.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:
                process.send_signal(signum)

    def _watch_broker(self, line: str) -> None:
        if BROKER_RUNNING_RE.search(line):
            self._broker_running.set()

    def _broker_ready(self, since: float) -> bool:
        """Mosquitto says it is running (then its listeners are open); a TCP probe only if it never says so.

        (A probe is logged by Mosquitto as a failed TLS connection: noise the user should not see.)
        """
        if self._broker_running.is_set():
            return True
        return time.monotonic() - since > BROKER_LOG_GRACE and port_accepts(
            self.settings.broker_bind, self.settings.broker_port
        )

    def wait_for_broker(self, broker: Service) -> None:
        started = time.monotonic()
        deadline = started + BROKER_START_TIMEOUT
        while not self._broker_ready(started):
            if self._stopping:
                return
            if broker.process is None or broker.process.poll() is not None:
                code = broker.process.returncode if broker.process else "?"
                raise RunnerError(f"mosquitto exited with {code} while starting (its output is above)")
            if time.monotonic() > deadline:
                raise RunnerError(
                    f"mosquitto did not accept connections on port {self.settings.broker_port} "
                    f"within {BROKER_START_TIMEOUT:g}s (its output is above)"
                )
            time.sleep(0.05)

    # -- pid file -----------------------------------------------------------------------------------

    def write_pids(self) -> None:
        lines = [f"{os.getpid()} runner"]
        lines += [f"{s.process.pid} {s.name}" for s in self.services if s.process is not None]
        self.pids_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.pids_file, ("\n".join(lines) + "\n").encode(), CERT_MODE)

    def remove_pids(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pids_file.unlink()

    # -- signals -----------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._stopping:
            self._hurry = True
        self._stopping = True

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def request_stop(self) -> None:
        self._stopping = True

    # -- the whole run -------------------------------------------------------------------------------

    def run(self) -> int:
        """Prepare, start everything, supervise until a signal, stop everything. Returns the exit code."""
        self.install_signal_handlers()
        try:
            self.check_not_running()
            self.ensure_certificates()
            tokens = self.enrolment_tokens()
            self.services = build_services(self.settings, self.devices, dashboard=self.want_dashboard, enrol=tokens)
        except BrokerConfigError as ex:  # mosquitto missing: the message says what to install
            return self._fail(RunnerError(str(ex)))
        except RunnerError as ex:
            return self._fail(ex)
        if find_dynsec_plugin() is None:
            self.say(
                "warning: Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) was not found: a "
                "revoked device is denied every topic but its open connection is not closed; set "
                "MOSQUITTO_DYNSEC_PLUGIN to its path, then run ./setup.sh certs"
            )
        try:
            broker, *others = self.services
            self.start(broker)
            self.wait_for_broker(broker)
            for service in others:
                if self._stopping:
                    break
                self.start(service)
            self.supervise()
        except RunnerError as ex:
            return self._fail(ex)
        finally:
            self.stop_all()
            self.remove_pids()
        self.say("stopped; nothing left running")
        return EXIT_OK

    def _fail(self, error: RunnerError) -> int:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.code

    def supervise(self) -> None:
        started = time.monotonic()
        while not self._stopping:
            now = time.monotonic()
            for service in self.services:
                if service.process is not None and service.process.poll() is not None:
                    self._reap(service)
                elif service.process is None and service.restart_at is not None and now >= service.restart_at:
                    self.say(f"restarting {service.name}")
                    self.start(service)
            if not self._banner_shown and (self._dashboard_ready() or now - started > DASHBOARD_START_TIMEOUT):
                self.banner()
            time.sleep(0.1)

    def _dashboard_ready(self) -> bool:
        if not any(s.kind == "dashboard" for s in self.services):
            return True
        return port_accepts(self.settings.dashboard_host, self.settings.dashboard_port, timeout=0.2)

    def banner(self) -> None:
        self._banner_shown = True
        s = self.settings
        rows = []
        if any(svc.kind == "dashboard" for svc in self.services):
            scheme = "https" if s.dashboard_tls else "http"
            rows.append(("dashboard", f"{scheme}://{local_address(s.dashboard_host)}:{s.dashboard_port}/"))
        rows.append(
            (
                "broker",
                f"{s.broker_address}:{s.broker_port} (MQTT over mutual TLS; CA "
                f"{s.certs_dir / 'root_ca' / 'root_ca.crt'})",
            )
        )
        rows.append(
            ("devices", f"{', '.join(self.devices + self.enrol) or 'none'} (a reading every {s.publish_interval:g} s)")
        )
        rows.append(("pid file", f"{self.pids_file} (./setup.sh down stops the lab from another terminal)"))
        self.say("The lab is up (native mode). Ctrl-C stops everything.")
        for label, value in rows:
            self.say(f"  {label:<10} {value}")

    def stop_all(self) -> None:
        """Thermometers (they publish `offline`), the dashboard, the CA replicas, Mosquitto; SIGKILL stragglers."""
        for kind in ("device", "dashboard", "ca", "broker"):
            group = [s for s in self.services if s.kind == kind and s.running]
            if not group:
                continue
            self.say(f"stopping {', '.join(s.name for s in group)}")
            for service in group:
                self.signal_service(service, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUTS[kind]
            for service in group:
                self._wait_or_kill(service, deadline)
        for service in self.services:
            service.restart_at = None

    def _wait_or_kill(self, service: Service, deadline: float) -> None:
        process = service.process
        assert process is not None
        while process.poll() is None and time.monotonic() < deadline and not self._hurry:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.1)
        if process.poll() is None:
            self.say(f"{service.name} did not stop in time: SIGKILL")
            self.signal_service(service, signal.SIGKILL)
            process.wait()
        if service.output is not None:
            service.output.join(timeout=2)
        service.process = None
        self.write_pids()

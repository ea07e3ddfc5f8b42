"""Test support: a real Mosquitto started with the lab's own generated config, and MQTT helpers."""

from __future__ import annotations

import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509

from lab.mqtt import Identity, make_client
from lab.processes import spawn
from lab.testing import Broker, free_port, start_client, stop_process, wait_for
from pki.config import PROJECT_ROOT

__all__ = [
    "Broker",
    "Collector",
    "ThermometerProcess",
    "established_to",
    "free_port",
    "refused",
    "stop_process",
    "wait_for",
]


def served_serial(port: int, cafile: Path, host: str = "localhost") -> str:
    """Serial (hex) of the certificate a TLS server on `port` presents to a client that verifies it (chain to
    `cafile`, host name `host`)."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def established_to(pid: int, port: int) -> int:
    """How many ESTABLISHED TCP connections process `pid` has to local port `port` (Linux /proc)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:  # the process is gone: it has no connections
        return 0
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl local rem st ... inode (field 9); st 01 = ESTABLISHED
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                count += 1
    return count


class Collector:
    """An MQTT client with a given identity that records every message it receives."""

    def __init__(
        self,
        certs_dir: Path,
        name: str,
        port: int,
        *,
        client_id: str = "",
        protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311,
        identity: Identity | None = None,
        clean_session: bool = True,
    ) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.received: list[mqtt.MQTTMessage] = []
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connect_reason: Any = None
        self.subscribed: dict[int, list[Any]] = {}
        self.published: set[int] = set()
        self.port = port
        # clean_session=False: the broker keeps the subscription and queues QoS 1 messages across a restart.
        self.client = make_client(
            identity or Identity.of(certs_dir, name), client_id or "", protocol=protocol, clean_session=clean_session
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connect_reason = reason
        if not reason.is_failure:
            self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        self.disconnected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.received.append(message)
        self.messages.put(message)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        self.subscribed[mid] = list(reasons)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self.published.add(mid)

    def connect(self, timeout: float = 10) -> Collector:
        if not start_client(self.client, self.port, self.connected, timeout):
            raise AssertionError(f"could not connect (reason {self.connect_reason})")
        return self

    def subscribe(self, topic: str, qos: int = 1) -> list[Any]:
        _, mid = self.client.subscribe(topic, qos)
        return wait_for(lambda: self.subscribed.get(mid), timeout=5, what=f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, **kwargs: Any) -> None:
        info = self.client.publish(topic, payload, qos=qos, **kwargs)
        if qos:
            wait_for(lambda: info.mid in self.published, timeout=5, what=f"PUBACK for {topic}")

    def expect(self, topic: str | None = None, timeout: float = 10) -> mqtt.MQTTMessage:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no message on {topic or 'any topic'} within {timeout}s")
            try:
                message = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if topic is None or message.topic == topic:
                return message

    def nothing(self, topic: str | None = None, within: float = 1.0) -> bool:
        """True when no message (on `topic`) arrives within `within` seconds."""
        deadline = time.monotonic() + within
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = self.messages.get(timeout=remaining)
            except queue.Empty:
                return True
            if topic is None or message.topic == topic:
                return False
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def refused(port: int, identity: Identity) -> bool:
    """A fresh connection with `identity` gets no CONNACK (the TLS handshake fails, or the broker says no)."""
    client = Collector(Path("."), "", port, identity=identity)  # the identity names its own files
    try:
        client.client.connect("localhost", port, keepalive=10)
    except (ssl.SSLError, OSError):
        return True
    client.client.loop_start()
    try:
        return not client.connected.wait(3)
    finally:
        client.client.disconnect()
        client.client.loop_stop()


class ThermometerProcess:
    """`thermometer.py` as a real subprocess (real TLS, real signals); its output is collected for assertions."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.args = args
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self) -> ThermometerProcess:
        self.process = spawn([sys.executable, str(PROJECT_ROOT / "thermometer.py"), *self.args], self.env, text=True)
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()
        return self

    def _read(self, pipe: Any) -> None:
        for line in pipe:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_output(self, text: str, timeout: float = 15) -> None:
        def seen() -> bool:
            if text in self.output():
                return True
            assert self.process is not None and self._reader is not None
            if self.process.poll() is not None and not self._reader.is_alive():
                raise AssertionError(
                    f"thermometer exited with {self.process.returncode} before printing {text!r}:\n{self.output()}"
                )
            return False

        wait_for(seen, timeout=timeout, what=f"{text!r} in the thermometer output")

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM, as `docker stop` or the native runner send it; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        """Cleanup: make sure the process is gone, whatever the test did."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def lab_identity(certs_dir: Path, name: str) -> Identity:
    """`name`'s certificate and key from certs/<name>/ with the lab's root, certs/root_ca/root_ca.crt, as the trust
    anchor: the files the README's client examples name."""
    folder = certs_dir / name
    return Identity(certs_dir / "root_ca" / "root_ca.crt", folder / f"{name}.crt", folder / f"{name}.key")


def s_client(port: int, certs_dir: Path, *args: str, name: str = "device001") -> subprocess.CompletedProcess[str]:
    """`openssl s_client` to 127.0.0.1:`port` (SNI localhost) with `name`'s certificate, trusting the lab's root;
    `args` add to it (a protocol, suites). Its output tells the handshake's outcome."""
    identity = lab_identity(certs_dir, name)
    files = ["-CAfile", str(identity.ca_cert), "-cert", str(identity.cert), "-key", str(identity.key)]
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-brief", *files, *args],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )


def run_module(module: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m <module>` from the project root with `env` over this environment and no stdin, run to its end;
    its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module],
        env={**os.environ, **env},
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn_module(module: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`python -m <module>` started with `env` over this environment (lab.processes.spawn: project root, no
    stdin); its stdout and stderr go to `log_path`."""
    with open(log_path, "wb") as out:
        return spawn([sys.executable, "-m", module], {**os.environ, **env}, out)


def start_ca_service(env: dict[str, str], log_path: Path, https_port: int) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m ca` as replica ca-1, EST/ACME on `https_port` (no broker needed to serve them): the process, and
    the internal URL a dashboard forwards /v1/ssl/* to (CA_URLS)."""
    internal = free_port()
    ca_env = {
        **env,
        "CA_INSTANCE": "1",
        "CA_INTERNAL_PORT": str(internal),
        "CA_HTTPS_PORT": str(https_port),
        "PYTHONUNBUFFERED": "1",
    }
    return spawn_module("ca", ca_env, log_path), f"http://127.0.0.1:{internal}"


def start_https_dashboard(env: dict[str, str], log_path: Path, port: int, ca_url: str) -> subprocess.Popen[bytes]:
    """`python -m dashboard` with DASHBOARD_TLS=1 on `port`, forwarding /v1/ssl/* to the CA at `ca_url`; its log
    in `log_path`."""
    return spawn_module(
        "dashboard", {**env, "DASHBOARD_TLS": "1", "DASHBOARD_PORT": str(port), "CA_URLS": ca_url}, log_path
    )

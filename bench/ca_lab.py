"""What the CA benches share on top of bench.rig's throwaway lab: the CA's key type, CSRs made ahead of
time, MQTT v5 requesters matched by CorrelationData, keep-alive HTTP clients, and closed-loop results.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.common import DOCS_DIR, RESULTS_DIR, Progress
from bench.rig import BenchLab, lab_bench_parser, wait_until_quiet
from lab.credentials import store
from lab.mqtt import Identity, make_client
from lab.testing import start_client, wait_for
from pki.authority import PrivateKey, generate_private_key, key_pem, load_certificate, verify_leaf
from pki.config import Settings


def bench_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of a CA bench (`python -m bench.<module>`), with the options every one of them takes."""
    parser = lab_bench_parser(module, doc, from_docstring=True)
    parser.add_argument(
        "--key-type",
        choices=("ec", "rsa"),
        default="ec",
        help="the root CA's key: EC P-256 or RSA-2048 (KEY_TYPE); the devices' CSRs are EC P-256 "
        "either way, as the lab's devices are (default ec)",
    )
    return parser


def wait_for_quiet(args: argparse.Namespace) -> float | None:
    """Figures from a machine busy with other work are not comparable: wait for it to calm down first."""
    return wait_until_quiet(timeout=args.quiet_timeout) if args.quiet_timeout > 0 else None


def output_dirs(out: Path | None) -> tuple[Path, Path]:
    """(results folder, plots folder)."""
    return (out, out) if out is not None else (RESULTS_DIR, DOCS_DIR)


# -- the lab ------------------------------------------------------------------------------------------


class CALab(BenchLab):
    """bench.rig's throwaway lab, with the key type of the CA under test (EC P-256 or RSA-2048)."""

    def __init__(self, key_type: str = "ec", keep: bool = False) -> None:
        super().__init__(keep=keep)
        self.env["KEY_TYPE"] = key_type
        self.settings = Settings.from_env(self.env)

    @property
    def passphrase(self) -> str:
        return self.env["CA_PASSPHRASE"]

    def root_certificate(self) -> x509.Certificate:
        return load_certificate(self.layout.ca_cert.read_bytes())

    def http(self) -> HttpClient:
        """A keep-alive client that sends the running dashboard's viewer token (for /api/data and the like)."""
        return HttpClient(self.dashboard_port, headers=self.dashboard.auth_headers if self.dashboard else None)


def enrol(lab: CALab, names: Sequence[str], label: str = "enrolling devices") -> dict[str, Identity]:
    """Devices enrolled as a real one is: its own key and CSR, `POST /v1/ssl/sign`, the reply stored with the key.

    The files go under `<lab>/enrolled/<name>/` (the device's own storage, not the CA's `certs/`).
    """
    client = lab.http()
    root_pem = lab.layout.ca_cert.read_bytes()
    identities = {}
    progress = Progress(len(names), label)
    try:
        for name in names:
            key = generate_private_key("ec")
            status, body = client.post_json(
                "/v1/ssl/sign", {"name": name, "days": 30, "pass": lab.passphrase, "csr": make_csr(name, key)}
            )
            if status != 201:
                raise RuntimeError(f"enrolling {name} failed: {status} {body}")
            folder = lab.root / "enrolled" / name
            identity = Identity(folder / "root_ca.crt", folder / f"{name}.crt", folder / f"{name}.key")
            store(identity, body["crt"].encode(), key_pem(key), keep_previous=False, ca_pem=root_pem)
            identities[name] = identity
            progress.update()
    finally:
        client.close()
        progress.close()
    return identities


# -- CSRs -------------------------------------------------------------------------------------------------


def make_csr(cn: str, key: PrivateKey) -> str:
    """A PEM CSR with just a CN, as a device makes it."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(Encoding.PEM).decode()


@dataclass(frozen=True)
class Csr:
    name: str
    pem: str
    key: PrivateKey


def make_csrs(names: Sequence[str], label: str = "making CSRs") -> list[Csr]:
    """One CSR with a new EC P-256 key per name, made before any clock starts."""
    progress = Progress(len(names), label)
    csrs = []
    for name in names:
        key = generate_private_key("ec")
        csrs.append(Csr(name, make_csr(name, key), key))
        progress.update()
    progress.close()
    return csrs


def check_certificate(root: x509.Certificate, reply: dict[str, Any], csr: Csr) -> str | None:
    """None when the reply carries a certificate for the CSR's key and name, signed by the root; else why not."""
    try:
        cert = load_certificate(reply["crt"].encode())
    except Exception as ex:  # noqa: BLE001 - whatever is wrong with the reply is a finding, not a crash
        return f"no readable certificate ({ex})"
    if not verify_leaf(root, cert):
        return "not signed by the root"
    der, spki = Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(der, spki) != csr.key.public_key().public_bytes(der, spki):
        return "public key differs from the CSR's"
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns or cns[0].value != csr.name:
        return "wrong CN"
    return None


# -- HTTP -----------------------------------------------------------------------------------------------


class HttpClient:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1 (what a busy API client holds open)."""

    def __init__(self, port: int, timeout: float = 30, headers: dict[str, str] | None = None) -> None:
        self.port = port
        self.timeout = timeout
        # Sent with GETs only (Authorization: Bearer <viewer token> for the routes behind the login); the POSTs
        # carry `pass` like the seed's scripts, and a viewer's token would get them refused.
        self.read_headers = headers or {}
        self.conn: http.client.HTTPConnection | None = None

    def _request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if method == "GET":
            headers.update(self.read_headers)
        for attempt in (0, 1):  # a server may close an idle keep-alive connection: reconnect once
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                if response.will_close:
                    self.close()
                return response.status, data
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        return self._request("POST", path, body)

    def post_json(self, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        status, data = self.post(path, json.dumps(body).encode())
        return status, json.loads(data)

    def get_json(self, path: str) -> tuple[int, dict[str, Any]]:
        status, data = self._request("GET", path)
        return status, json.loads(data)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# -- MQTT -----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request/reply round trip."""

    sent: float
    received: float = 0.0
    status: int = 0
    payload: bytes = b""

    @property
    def latency(self) -> float:
        return self.received - self.sent


@dataclass
class _InFlight:
    outcome: Outcome
    on_reply: Callable[[Outcome], None] | None = None


def reply_status(message: mqtt.MQTTMessage) -> int:
    """The HTTP status the CA puts in the v5 user property `status` (0 when absent)."""
    for key, value in getattr(message.properties, "UserProperty", None) or []:
        if key == "status":
            return int(value)
    return 0


class Requester:
    """One MQTT v5 connection (one certificate) that sends CA requests and matches replies by CorrelationData.

    Replies come on `ssl/<own CN>/replies` (the ResponseTopic; every certificate holder may read the topics under
    its own CN, and failures are answered only there), so one connection can have many requests for other
    names in flight, as a gateway or provisioning station would.
    """

    def __init__(self, identity: Identity, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.reply_topic = f"ssl/{name}/replies"
        self.client = make_client(identity, name, protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.ready = threading.Event()
        self.disconnects = 0
        self._pending: dict[bytes, _InFlight] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.unmatched = 0

    def connect(self, timeout: float = 15) -> Requester:
        if not start_client(self.client, self.port, self.ready, timeout, keepalive=60):
            raise RuntimeError(f"{self.name} could not connect and subscribe to {self.reply_topic}")
        return self

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.reply_topic, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        self.ready.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.disconnects += 1

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        correlation = getattr(message.properties, "CorrelationData", None)
        with self._lock:
            entry = self._pending.pop(correlation, None) if correlation is not None else None
        if entry is None:
            self.unmatched += 1
            return
        entry.outcome.received = now
        entry.outcome.status = reply_status(message)
        entry.outcome.payload = message.payload
        if entry.on_reply is not None:
            entry.on_reply(entry.outcome)

    def send(self, topic: str, body: bytes, on_reply: Callable[[Outcome], None] | None = None) -> Outcome:
        correlation = f"{self.name}:{next(self._ids)}".encode()
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = self.reply_topic
        properties.CorrelationData = correlation
        outcome = Outcome(sent=time.perf_counter())
        with self._lock:
            self._pending[correlation] = _InFlight(outcome, on_reply)
        self.client.publish(topic, body, qos=1, properties=properties)
        return outcome

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect_requesters(lab: BenchLab, identities: dict[str, Identity]) -> list[Requester]:
    """One MQTT v5 connection per identity (name -> its certificate and key), connected and subscribed."""
    requesters = []
    try:
        for name, identity in identities.items():
            requesters.append(Requester(identity, name, lab.broker_port).connect())
    except BaseException:
        for requester in requesters:
            requester.close()
        raise
    return requesters


def wait_ca_answers(requester: Requester, timeout: float = 20) -> None:
    """The dashboard has subscribed to ssl/sign once a probe gets its (error) reply; MQTT gives no other sign."""

    def answered() -> bool:
        done = threading.Event()
        requester.send(
            "ssl/sign", json.dumps({"name": f"probe-{secrets.token_hex(4)}"}).encode(), lambda _outcome: done.set()
        )
        return done.wait(0.5)

    wait_for(answered, timeout=timeout, interval=0, what="the CA's MQTT endpoint to answer a probe")


# -- closed-loop load ------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What a closed-loop run produced: every finished round trip, in completion order."""

    started: float
    finished: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        return max(self.finished - self.started, 1e-9)

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if 200 <= o.status < 300]

    def throughput(self) -> float:
        return len(self.ok) / self.elapsed

    def by_status(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes:
            counts[str(outcome.status)] = counts.get(str(outcome.status), 0) + 1
        return dict(sorted(counts.items()))

    def rate_series(self, bucket: float = 0.5) -> tuple[list[float], list[float]]:
        """Completions per second in `bucket`-second slices, for a throughput-over-time plot."""
        if not self.outcomes:
            return [], []
        slots = int(self.elapsed / bucket) + 1
        counts = [0] * slots
        for outcome in self.outcomes:
            counts[min(int((outcome.received - self.started) / bucket), slots - 1)] += 1
        return [round((i + 0.5) * bucket, 3) for i in range(slots)], [c / bucket for c in counts]


def environment_note(busy_before: float | None) -> dict[str, Any]:
    """What the numbers depend on besides the code: the disk's fsync cost, and how busy the machine was."""
    return {"tmpdir": tempfile.gettempdir(), "fsync_ms": round(_fsync_ms(), 3), "machine_busy_pct_before": busy_before}


def _fsync_ms(rounds: int = 50) -> float:
    """The cost of one small write + fsync in the temporary folder: what durable writes are built from."""
    fd, path = tempfile.mkstemp(prefix="bench-fsync-")
    try:
        start = time.perf_counter()
        for _ in range(rounds):
            os.write(fd, b"x" * 128)
            os.fsync(fd)
        return (time.perf_counter() - start) / rounds * 1000
    finally:
        os.close(fd)
        os.unlink(path)

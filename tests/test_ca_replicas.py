"""Two CA service replicas (`python -m ca`, real processes) on one real PostgreSQL and one real Mosquitto.

The replicas start without CA_INSTANCE, as compose's `--scale ca=2` containers do, so each claims its own
identity (`ca-1`, `ca-2`) in the database (ca/slots.py). MQTT requests reach them through the shared
subscription `$share/ca/...`; the lockout is in the database. One lab, broker and pair of replicas serves the
module (the last test kills a replica).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from lab.native_runner import build_services
from lab.processes import spawn
from pki.config import PROJECT_ROOT
from pki.generator import LabCertificates
from pki.inventory import Inventory

from .ca_support import make_csr
from .conftest import LabEnv, make_lab_env
from .pgserver import PostgresServer
from .support import Broker, Collector, free_port, run_module, wait_for

pytestmark = pytest.mark.integration

REPLIES = "ssl/provisioner/replicas"


@dataclass
class Replica:
    """`python -m ca` as a subprocess; its log (stdout and stderr) in a file."""

    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        with self.log_path.open("ab") as out:
            self.process = spawn([sys.executable, "-m", "ca"], self.env, out)
        wait_for(lambda: self._ready(), timeout=30, interval=0.1, what=f"the CA replica ({self.log_path.name})")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the CA replica exited with {self.process.returncode}:\n{self.log()}")
        return "MQTT connected" in self.log() and "internal API" in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def name(self) -> str:
        match = re.search(r"CA service (ca-\d+)", self.log())
        assert match, self.log()
        return match.group(1)

    def served(self, status: int) -> int:
        return len(re.findall(rf"ssl/\w+ \S+ from \S+ -> {status}\b", self.log()))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Pair:
    lab: LabEnv
    broker: Broker
    replicas: list[Replica]
    provisioner: Collector
    replies: dict[bytes, list[dict[str, Any]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_reply(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        status = next(
            (int(v) for k, v in getattr(message.properties, "UserProperty", None) or [] if k == "status"), None
        )
        with self.lock:
            self.replies.setdefault(bytes(correlation or b""), []).append(
                {"status": status, "body": json.loads(message.payload)}
            )

    def ask(self, topic: str, body: dict[str, Any], correlation: bytes | None = None) -> bytes:
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = REPLIES
        properties.CorrelationData = correlation or uuid.uuid4().bytes
        self.provisioner.client.publish(topic, json.dumps(body), qos=1, properties=properties)
        return properties.CorrelationData

    def answered(self, correlations: list[bytes]) -> list[bytes]:
        with self.lock:
            return [c for c in correlations if c in self.replies]


@pytest.fixture(scope="module")
def pair(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("replicas") / "lab"
    lab = make_lab_env(root, postgres.create_database())
    lab.env["CA_REPLICAS"] = "2"
    root.mkdir()
    LabCertificates(lab.settings()).generate()
    broker = Broker(lab.certs_dir, lab.data_dir, lab.broker_port).start()
    base = {**os.environ, **lab.env, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1", "CA_HTTPS_PORT": "0"}
    base.pop("CA_INSTANCE", None)
    replicas: list[Replica] = []
    provisioner = None
    try:
        for n in (1, 2):  # no CA_INSTANCE: each claims a free identity in the database
            env = {**base, "CA_INTERNAL_PORT": str(free_port())}
            replicas.append(Replica(env, root.parent / f"replica{n}.log").start())
        assert sorted(r.name for r in replicas) == ["ca-1", "ca-2"]
        provisioner = Collector(lab.certs_dir, "provisioner", broker.port, protocol=mqtt.MQTTv5).connect()
        pair = Pair(lab, broker, replicas, provisioner)
        provisioner.client.message_callback_add(REPLIES, pair.on_reply)
        provisioner.subscribe(REPLIES)
        yield pair
    finally:
        if provisioner is not None:
            provisioner.close()
        for replica in replicas:
            replica.stop()
        broker.stop()


def test_500_sign_requests_get_500_replies_with_distinct_serials_from_both_replicas(pair: Pair) -> None:
    before = [r.served(201) for r in pair.replicas]
    correlations = [
        pair.ask(
            "ssl/sign",
            {"name": f"fleet-{i}", "days": 30, "pass": pair.lab.passphrase, "csr": make_csr(f"fleet-{i}")[0]},
        )
        for i in range(500)
    ]
    wait_for(lambda: len(pair.answered(correlations)) == 500, timeout=120, interval=0.2, what="500 replies")
    with pair.lock:
        replies = [pair.replies[c] for c in correlations]
    assert all(len(r) == 1 for r in replies), "a request was answered twice"
    assert {r[0]["status"] for r in replies} == {201}
    serials = {r[0]["body"]["serial"] for r in replies}
    assert len(serials) == 500
    served = [r.served(201) - b for r, b in zip(pair.replicas, before, strict=True)]
    assert all(n > 0 for n in served) and sum(served) == 500, served  # both served, none twice
    inventory = Inventory(pair.lab.settings().effective_database_url)
    try:
        assert {row.serial for row in inventory.list() if row.name.startswith("fleet-")} == serials
    finally:
        inventory.close()


def test_wrong_passphrases_split_across_replicas_still_lock_after_5(pair: Pair) -> None:
    """The proven-identity topic `ssl/sign/provisioner`: counted per CN, in the database, by both replicas."""
    before = [r.log().count("wrong CA passphrase from cn:provisioner") for r in pair.replicas]
    correlations = [
        pair.ask("ssl/sign/provisioner", {"name": f"guess-{i}", "days": 1, "pass": f"wrong-{i}"}) for i in range(12)
    ]
    wait_for(lambda: len(pair.answered(correlations)) == 12, timeout=60, what="12 answers")
    with pair.lock:
        statuses = sorted(pair.replies[c][0]["status"] for c in correlations)
    assert statuses == [403] * 5 + [429] * 7
    counted = [
        r.log().count("wrong CA passphrase from cn:provisioner") - b for r, b in zip(pair.replicas, before, strict=True)
    ]
    assert sum(counted) == 5
    # both replicas answered some of the burst (the shared subscription splits it)
    assert all(r.log().count("from cn:provisioner -> ") > 0 for r in pair.replicas)
    # locked on both: even the right passphrase gets 429, whichever replica answers
    right = [
        pair.ask(
            "ssl/sign/provisioner",
            {"name": "guess-ok", "days": 1, "pass": pair.lab.passphrase, "csr": make_csr("guess-ok")[0]},
        )
        for _ in range(4)
    ]
    wait_for(lambda: len(pair.answered(right)) == 4, timeout=30, what="4 answers")
    with pair.lock:
        assert {pair.replies[c][0]["status"] for c in right} == {429}


def test_a_replica_beyond_ca_replicas_finds_no_free_identity_and_says_so(pair: Pair) -> None:
    env = {**pair.replicas[0].env, "CA_INTERNAL_PORT": str(free_port()), "CA_SLOT_WAIT": "0"}
    extra = run_module("ca", env)
    assert extra.returncode == 2
    assert "all 2 CA identities (ca-1 ... ca-2) are held by running replicas: raise CA_REPLICAS" in extra.stderr


def test_killing_a_replica_mid_burst_leaves_no_request_unanswered(pair: Pair) -> None:
    """A request the killed replica had taken is lost with it (QoS 0 to the CA, no redelivery in Mosquitto
    2.0.11); the documented client retry (same CorrelationData, after a reply timeout) gets it answered by the
    survivor. None is left unanswered."""
    bodies = {
        uuid.uuid4().bytes: {
            "name": f"burst-{i}",
            "days": 30,
            "pass": pair.lab.passphrase,
            "csr": make_csr(f"burst-{i}")[0],
        }
        for i in range(200)
    }
    correlations = list(bodies)
    for index, correlation in enumerate(correlations):
        pair.ask("ssl/sign", bodies[correlation], correlation)
        if index == 60:
            pair.replicas[1].stop(signal.SIGKILL)
    survivor = pair.replicas[0]
    for _round in range(5):  # the client's retry: ask again for what is still unanswered after a timeout
        try:
            wait_for(
                lambda: len(pair.answered(correlations)) == len(correlations),
                timeout=5,
                interval=0.2,
                what="every request answered",
            )
            break
        except AssertionError:
            for correlation in set(correlations) - set(pair.answered(correlations)):
                pair.ask("ssl/sign", bodies[correlation], correlation)
    assert pair.answered(correlations) == correlations
    with pair.lock:
        assert {pair.replies[c][0]["status"] for c in correlations} == {201}
    assert survivor.process is not None and survivor.process.poll() is None


def test_the_native_runner_gives_the_ca_replicas_the_passphrase_and_the_dashboard_none(tmp_path: Path) -> None:
    lab = make_lab_env(tmp_path / "lab")
    settings = lab.settings(CA_REPLICAS="2")
    services = build_services(settings, ["device001"], dashboard=True, base_env={**lab.env, "CA_INTERNAL_PORT": "5300"})
    kinds = [s.kind for s in services]
    assert kinds == ["broker", "ca", "ca", "dashboard", "device"]  # the CA replicas before the dashboard
    cas = [s for s in services if s.kind == "ca"]
    dashboard = next(s for s in services if s.kind == "dashboard")
    assert [(s.name, s.env["CA_INSTANCE"], s.env["CA_INTERNAL_PORT"]) for s in cas] == [
        ("ca-1", "1", "5300"),
        ("ca-2", "2", "5301"),
    ]
    assert all(s.env["CA_PASSPHRASE"] == lab.passphrase for s in cas)
    assert "CA_PASSPHRASE" not in dashboard.env
    assert dashboard.env["CA_URLS"] == "http://127.0.0.1:5300,http://127.0.0.1:5301"
    assert cas[1].env["CA_HTTPS_PORT"] == "0"  # EST/ACME on the first replica only

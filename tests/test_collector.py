"""Step 9, the seed's collector flow: a collector named by its MAC with colons gets its reply on
`ssl/AA:BB:CC:DD:EE:01`, the topic the seed names, and then connects with the certificate it got.

Before it holds a certificate of its own the collector speaks through the bootstrap identity (`provisioner`,
MQTT v5, replies on a response topic under `ssl/provisioner/`, which only that identity reads); once it has its
certificate (CN `AABBCCDDEE01`: colons removed) the ACL lets it read `ssl/AA:BB:CC:DD:EE:01` and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from flask.testing import FlaskClient

from lab.mqtt import Identity
from pki.authority import key_pem as pem_of
from pki.broker import BrokerFiles

from .ca_support import check_issued, close_app, make_csr
from .conftest import LabEnv
from .support import Broker, Collector
from .test_ca_mqtt import ask, start_app, wait_ready

pytestmark = pytest.mark.integration

MAC = "AA:BB:CC:DD:EE:01"
CN = "AABBCCDDEE01"


def _identity(lab: LabEnv, tmp_path: Path, reply: dict[str, str], key_pem: bytes | None = None) -> Identity:
    folder = tmp_path / "collector"
    folder.mkdir(exist_ok=True)
    (folder / "c.crt").write_text(reply["crt"])
    (folder / "c.key").write_bytes(key_pem if key_pem is not None else reply["key"].encode())
    (folder / "c.key").chmod(0o600)
    return Identity(ca_cert=lab.certs_dir / "root_ca" / "root_ca.crt", cert=folder / "c.crt", key=folder / "c.key")


@pytest.mark.parametrize("route", ["create", "sign"])
def test_a_collector_named_by_its_mac_gets_its_reply_on_the_seeds_topic(
    generated_lab: LabEnv, broker: Broker, tmp_path: Path, route: str
) -> None:
    app = start_app(generated_lab)
    passphrase = generated_lab.passphrase
    bootstrap = Collector(generated_lab.certs_dir, "provisioner", broker.port, protocol=mqtt.MQTTv5).connect()
    collector: Collector | None = None
    try:
        bootstrap.subscribe("ssl/provisioner/#")
        wait_ready(bootstrap)
        body: dict[str, object] = {"name": MAC, "days": 30, "pass": passphrase}
        key = None
        if route == "sign":
            pem, key = make_csr(CN)
            body["csr"] = pem
        message = ask(bootstrap, f"ssl/{route}", json.dumps(body), f"ssl/provisioner/{MAC}")
        reply = json.loads(message.payload)
        assert "error" not in reply, reply
        cert = check_issued(reply, key)
        assert reply["name"] == CN and cert.subject.rfc4514_string().startswith(f"CN={CN}")
        # the collector connects with the certificate it got, and now asks for itself on the seed's topic
        identity = _identity(generated_lab, tmp_path, reply, pem_of(key) if key is not None else None)
        collector = Collector(generated_lab.certs_dir, CN, broker.port, identity=identity).connect()
        collector.subscribe(f"ssl/{MAC}")
        collector.publish(f"iot/thermometer/{CN}/temperature", json.dumps({"temperature": 20}))
        again: dict[str, object] = {"name": MAC, "days": 30, "pass": passphrase}
        new_key = None
        if route == "sign":
            pem, new_key = make_csr(CN)
            again["csr"] = pem
        own_reply = None
        for _ in range(20):  # the broker re-reads the ACL that grants ssl/<MAC> on SIGHUP: allow it a moment
            collector.publish(f"ssl/{route}", json.dumps(again))
            try:
                own_reply = json.loads(collector.expect(f"ssl/{MAC}", timeout=1).payload)
                break
            except AssertionError:
                continue
        assert own_reply is not None and "error" not in own_reply, own_reply
        check_issued(own_reply, new_key)
        # the bootstrap identity reads neither the collector's topic nor anyone else's
        assert not [m for m in bootstrap.received if m.topic == f"ssl/{MAC}"]
    finally:
        bootstrap.close()
        if collector is not None:
            collector.close()
        close_app(app)


def test_the_mac_reply_topic_belongs_to_that_collector_only(generated_lab: LabEnv, client: FlaskClient) -> None:
    """The ACL grants `ssl/AA:BB:CC:DD:EE:01` to CN `AABBCCDDEE01` alone, once it holds a certificate."""
    assert (
        client.post("/v1/ssl/create", json={"name": MAC, "days": 5, "pass": generated_lab.passphrase}).status_code
        == 201
    )
    acl = BrokerFiles(generated_lab.certs_dir, generated_lab.data_dir).acl.read_text()
    assert f"user {CN}\ntopic read ssl/{MAC}\n" in acl
    assert acl.count(f"ssl/{MAC}") == 1

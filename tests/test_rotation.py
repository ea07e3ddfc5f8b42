"""Step 9, key rotation by the generator: running processes follow the files renewed under them, and the superseded
certificates are refused by the real broker once SUPERSEDED_GRACE_SECONDS end (lab/rotation.py, pki/inventory.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

import generate_ca_and_device_certs as generator
from lab.mqtt import Identity, certificate_revoked
from lab.rotation import PairWatcher
from lab.testing import mosquitto_tls_args
from pki.authority import load_certificate, serial_hex
from pki.broker import BrokerFiles
from pki.store import CERT_MODE, KEY_MODE, atomic_write

from .ca_support import close_app
from .conftest import LabEnv
from .support import Broker, ThermometerProcess, established_to, served_serial, wait_for
from .test_ca_mqtt import start_app

GRACE = "3"  # seconds: long enough for both switches below, short enough for a lean test
WATCH = "0.3"  # CERT_WATCH_SECONDS


def serial_of(path: Path) -> str:
    return serial_hex(load_certificate(path.read_bytes()))


def keep_pair(lab: LabEnv, name: str, folder: Path) -> Identity:
    """A copy of `name`'s current pair, as a thief of the old key would have it."""
    identity = Identity.of(lab.certs_dir, name)
    folder.mkdir()
    kept = Identity(identity.ca_cert, folder / "old.crt", folder / "old.key")
    shutil.copy2(identity.cert, kept.cert)
    shutil.copy2(identity.key, kept.key)
    return kept


def crl_reason(lab: LabEnv, serial: str) -> x509.ReasonFlags | None:
    crl = x509.load_pem_x509_crl(BrokerFiles(lab.certs_dir, lab.data_dir).crl.read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    if entry is None:
        return None
    return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason


def mosquitto_pub(lab: LabEnv, identity: Identity, topic: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mosquitto_pub", *mosquitto_tls_args(identity, lab.broker_port), "-t", topic, "-m", "{}", "-q", "1"],
        capture_output=True,
        text=True,
        timeout=20,
    )


@pytest.mark.integration
def test_a_generator_renewal_is_followed_by_the_running_lab_and_the_old_pairs_die_after_the_grace(
    generated_lab: LabEnv,
    broker: Broker,
    start_thermometer: Callable[..., ThermometerProcess],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """`./setup.sh certs --force` renews every leaf with a new key under a running thermometer and dashboard:
    both reconnect with their new pair (the thermometer with no gap in its readings, the dashboard's MQTT
    connection with its persistent session, the CA's at once too; the ingest only at its next reconnect), the
    broker serves its own new certificate, and once the grace ends the dashboard's CA puts the superseded
    certificates on the CRL (reason superseded): Mosquitto refuses the old pairs, while the thermometer stays
    connected. A broker restart then proves both run on their new pairs (and brings the ingest onto its own)."""
    lab = generated_lab
    for key, value in {"SUPERSEDED_GRACE_SECONDS": GRACE, "CERT_WATCH_SECONDS": WATCH}.items():
        monkeypatch.setenv(key, value)
    app = start_app(
        lab,
        LAB_SETTINGS=lab.settings(SUPERSEDED_GRACE_SECONDS=GRACE, CERT_WATCH_SECONDS=WATCH),
        CRL_REFRESH_SECONDS=0.3,
    )
    bridge = app.extensions["mqtt_bridge"]
    store = app.extensions["live_hub"].store

    def seqs() -> list[int]:
        return sorted(r.seq for r in store.since(0) if r.device_id == "device001")

    try:
        env = {k: v for k, v in lab.env.items() if k != "CA_PASSPHRASE"}
        thermometer = start_thermometer(
            {
                **env,
                "DEVICE_ID": "device001",
                "PUBLISH_INTERVAL": "0.2",
                "CERT_WATCH_SECONDS": WATCH,
                "RENEW_CHECK_INTERVAL": "0",
            }
        )
        wait_for(lambda: len(seqs()) >= 5, timeout=20, what="readings before the renewal")
        old_device, old_dashboard = (
            keep_pair(lab, "device001", tmp_path / "d"),
            keep_pair(lab, "dashboard", tmp_path / "b"),
        )
        old_serials = {name: serial_of(p.cert) for name, p in (("device001", old_device), ("dashboard", old_dashboard))}
        old_client = bridge.client
        ca_connection, ingest = app.extensions["test_ca"].connection, app.extensions["ingest"]
        old_ca_client, old_ingest_client = ca_connection.client, ingest.client
        assert old_ingest_client is not None and ingest.connected.is_set()

        assert generator.main(["--force"]) == 0
        new_device = serial_of(lab.certs_dir / "device001" / "device001.crt")
        assert new_device != old_serials["device001"]

        thermometer.wait_output(f"(serial {old_serials['device001']} -> {new_device}): switching", timeout=20)
        wait_for(
            lambda: thermometer.output().count("device001 connected") >= 2,
            timeout=20,
            what=f"the thermometer to reconnect with its new pair:\n{thermometer.output()}",
        )
        wait_for(
            lambda: bridge.client is not old_client and bridge.connected.is_set(),
            timeout=20,
            what="the dashboard's MQTT connection with its new pair",
        )
        wait_for(
            lambda: ca_connection.client is not old_ca_client and ca_connection.connected.is_set(),
            timeout=20,
            what="the CA's MQTT connection (ca-1) with its new pair",
        )
        # the ingest has seen its renewed pair, but keeps its open connection (and the QoS 0 readings in it)
        wait_for(lambda: ingest.switch_pending, timeout=20, what="the ingest to see its renewed pair")
        assert ingest.client is old_ingest_client and ingest.connected.is_set()
        # the broker's own certificate: the generator made it reload (SIGHUP), new handshakes get the new one
        broker_serial = serial_of(lab.certs_dir / "mosquitto" / "mosquitto.crt")

        def broker_serves_the_new_certificate() -> bool:
            try:
                return served_serial(broker.port, old_device.ca_cert) == broker_serial
            except OSError:  # a handshake during the reload: look again
                return False

        wait_for(broker_serves_the_new_certificate, timeout=10, what="the broker's new certificate")

        # the grace ends: the running CA lists the superseded certificates, the broker reloads and refuses them
        for serial in old_serials.values():
            wait_for(
                lambda s=serial: crl_reason(lab, s) == x509.ReasonFlags.superseded,
                timeout=20,
                what=f"{serial} on the CRL as superseded",
            )
        wait_for(
            lambda: certificate_revoked(old_device, "localhost", broker.port) is True,
            timeout=10,
            what="the broker to refuse the old device certificate as revoked",
        )
        refused = mosquitto_pub(lab, old_device, "iot/thermometer/device001/temperature")
        assert refused.returncode != 0, refused.stdout + refused.stderr
        assert mosquitto_pub(lab, old_dashboard, "iot/thermometer/x/status").returncode != 0
        # (the new pairs are not tried this way: the same client id would kick the running thermometer off)

        # the thermometer stayed connected and kept publishing through it
        assert thermometer.process.poll() is None
        assert established_to(thermometer.process.pid, broker.port) == 1
        listed_at = max(seqs())
        wait_for(lambda: max(seqs()) >= listed_at + 5, timeout=15, what="readings after the grace ended")

        # a reconnect now needs the new pairs: a broker restart, and both are back
        broker.restart()
        wait_for(
            lambda: thermometer.output().count("device001 connected") >= 3,
            timeout=30,
            what=f"the thermometer back after the restart:\n{thermometer.output()}",
        )
        assert bridge.wait_connected(30), bridge.status()
        wait_for(
            lambda: ingest.client is not old_ingest_client and ingest.subscribed.is_set() and not ingest.switch_pending,
            timeout=30,
            what=f"the ingest back with its new pair: {ingest.status()}",
        )
        restarted_at = max(seqs())
        wait_for(lambda: max(seqs()) >= restarted_at + 5, timeout=30, what="readings after the broker restart")
        assert "revoked" not in thermometer.output()
        assert thermometer.terminate() == 0
        last = int(re.findall(r"stopped after (\d+) readings", thermometer.output())[-1])
        wait_for(lambda: max(seqs(), default=0) >= last, timeout=15, what=f"reading {last} at the dashboard")
        assert set(seqs()) == set(range(1, last + 1)), sorted(set(range(1, last + 1)) - set(seqs()))
        assert "PRIVATE KEY" not in thermometer.output()
    finally:
        app.extensions["live_hub"].close()
        close_app(app)


def test_the_watcher_switches_only_to_a_complete_new_pair(generated_lab: LabEnv) -> None:
    """A renewal replaces the key, then the certificate (two renames, pki/generator.py): in between the files are no
    pair and nothing switches. Then one callback with the new serial; a callback that could not switch is asked again,
    one that did is not asked twice for the same pair. A new root file (a new root reissues every leaf and then
    each folder's root_ca.crt) counts as a change too."""
    identity = Identity.of(generated_lab.certs_dir, "device001")
    old_cert, old_key = identity.cert.read_bytes(), identity.key.read_bytes()
    generated_lab.lab().generate(["device001"], force=True)
    new_cert, new_key = identity.cert.read_bytes(), identity.key.read_bytes()
    atomic_write(identity.cert, old_cert, CERT_MODE)
    atomic_write(identity.key, old_key, KEY_MODE)

    answers, seen = [False, True], []
    watcher = PairWatcher(
        identity.cert, identity.key, lambda pair: seen.append(pair.serial) or answers.pop(0), ca=identity.ca_cert
    )
    assert watcher.in_use is not None and watcher.in_use.serial == serial_of(identity.cert)
    assert not watcher.check() and seen == []
    atomic_write(identity.key, new_key, KEY_MODE)  # half-way: the new key beside the old certificate
    assert not watcher.check() and seen == []
    atomic_write(identity.cert, new_cert, CERT_MODE)
    new_serial = serial_of(identity.cert)
    assert not watcher.check() and seen == [new_serial]  # the callback could not switch: asked again next round
    assert watcher.check() and seen == [new_serial, new_serial]
    assert watcher.in_use.serial == new_serial
    assert not watcher.check() and len(seen) == 2
    answers.append(True)
    atomic_write(identity.ca_cert, identity.ca_cert.read_bytes() + b"\n", CERT_MODE)
    assert watcher.check() and len(seen) == 3

"""Step 9, renewal and supersession: renewal takes only the current certificate; a superseded certificate goes on
the CRL with reason `superseded` after the grace (SUPERSEDED_GRACE_SECONDS, 0 = at once); CRL entries carry the
RFC 5280 reason given to `revoke`; `GET /v1/ssl/crl` serves DER when asked."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from flask.testing import FlaskClient

from lab.mqtt import Identity
from pki.authority import key_pem
from pki.broker import BrokerFiles
from pki.service import CAService

from .ca_support import api_token, close_app, lab_state, make_csr
from .conftest import LabEnv
from .support import Broker, Collector, wait_for
from .test_ca_mqtt import start_app, wait_ready


def _crl(lab: LabEnv) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(BrokerFiles(lab.certs_dir, lab.data_dir).crl.read_bytes())


def _reason(crl: x509.CertificateRevocationList, serial: str) -> x509.ReasonFlags | None:
    entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    assert entry is not None, f"{serial} is not on the CRL"
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


def _listed(lab: LabEnv, serial: str) -> bool:
    return _crl(lab).get_revoked_certificate_by_serial_number(int(serial, 16)) is not None


@pytest.fixture
def service_for(generated_lab: LabEnv) -> Iterator[object]:
    made: list[CAService] = []

    def make(grace: str) -> CAService:
        made.append(CAService(generated_lab.settings(SUPERSEDED_GRACE_SECONDS=grace)))
        return made[-1]

    yield make
    for service in made:
        service.close()


def _listed_as_superseded_once_a_short_grace_ends(
    lab: LabEnv, service_for: Callable[[str], CAService], serial: str, what: str
) -> None:
    """A CA service with a 1 s grace lists `serial` (`what`) on its CRL refresh soon, with reason superseded."""
    short = service_for("1")
    wait_for(
        lambda: short.refresh_crl() and _listed(lab, serial),
        timeout=15,
        interval=0.2,
        what=f"{what} to be listed once its grace ended",
    )
    assert _reason(_crl(lab), serial) == x509.ReasonFlags.superseded


def _sign(service: CAService, lab: LabEnv, name: str) -> str:
    reply = service.sign({"name": name, "days": 5, "pass": lab.passphrase, "csr": make_csr(name)[0]}, source="t")
    assert reply.status == 201, reply.body
    return reply.body["serial"]


def _viewer(client: FlaskClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_token(client.application)}"}


def test_revocation_reasons_are_rfc5280_codes_in_the_crl(generated_lab: LabEnv, client: FlaskClient) -> None:
    passphrase = generated_lab.passphrase
    for name, reason in [("device001", "keyCompromise"), ("device002", None)]:
        body = {"name": name, "pass": passphrase, **({"reason": reason} if reason else {})}
        assert client.post("/v1/ssl/revoke", json=body).status_code == 200
    listed = client.get("/v1/ssl/certs?status=revoked", headers=_viewer(client)).json["certificates"]
    rows = {r["name"]: r["serial"] for r in listed}
    crl = _crl(generated_lab)
    assert _reason(crl, rows["device001"]) == x509.ReasonFlags.key_compromise
    assert _reason(crl, rows["device002"]) is None  # unspecified: RFC 5280 5.3.1, no reason code extension
    created = client.post("/v1/ssl/create", json={"name": "gw-r", "days": 5, "pass": passphrase}).json
    assert (
        client.post(
            "/v1/ssl/revoke", json={"serial": created["serial"], "pass": passphrase, "reason": "cessationOfOperation"}
        ).status_code
        == 200
    )
    assert _reason(_crl(generated_lab), created["serial"]) == x509.ReasonFlags.cessation_of_operation


def test_crl_is_served_as_der_when_asked(generated_lab: LabEnv, client: FlaskClient) -> None:
    der = client.get("/v1/ssl/crl", headers={"Accept": "application/pkix-crl"})
    assert der.status_code == 200 and der.mimetype == "application/pkix-crl"
    crl = x509.load_der_x509_crl(der.data)
    assert crl.public_bytes(Encoding.DER) == _crl(generated_lab).public_bytes(Encoding.DER)
    pem = client.get("/v1/ssl/crl")
    assert pem.data.startswith(b"-----BEGIN X509 CRL-----")


def test_superseded_certificates_go_on_the_crl_at_once_with_no_grace(generated_lab: LabEnv, service_for) -> None:
    service = service_for("0")
    first = _sign(service, generated_lab, "sensor-s")
    assert not _listed(generated_lab, first)
    second = _sign(service, generated_lab, "sensor-s")
    assert _reason(_crl(generated_lab), first) == x509.ReasonFlags.superseded
    assert not _listed(generated_lab, second)


def test_a_re_signed_key_lists_nothing_until_the_key_rotates(generated_lab: LabEnv, service_for) -> None:
    """`sign` without a CSR re-signs the same key: nothing goes on the CRL, the key is still in use. Once the
    generator renews with a new key, both certificates of the old key are superseded onto the CRL, like an API
    renewal (was: the generator's renewals listed nothing); the current one is not."""
    service = service_for("0")
    old = format(
        x509.load_pem_x509_certificate(
            (generated_lab.certs_dir / "device001" / "device001.crt").read_bytes()
        ).serial_number,
        "x",
    )
    reply = service.sign({"name": "device001", "days": 5, "pass": generated_lab.passphrase}, source="t")
    assert reply.status == 201, reply.body
    assert not _listed(generated_lab, old)
    generated_lab.lab(SUPERSEDED_GRACE_SECONDS="0").generate(["device001"], force=True)
    current = service.inventory.current("device001").serial
    assert current not in (old, reply.body["serial"])
    crl = _crl(generated_lab)
    assert _reason(crl, old) == x509.ReasonFlags.superseded
    assert _reason(crl, reply.body["serial"]) == x509.ReasonFlags.superseded
    assert not _listed(generated_lab, current)


def test_superseded_certificates_go_on_the_crl_after_the_grace(generated_lab: LabEnv, service_for) -> None:
    patient = service_for("3600")
    first = _sign(patient, generated_lab, "sensor-g")
    _sign(patient, generated_lab, "sensor-g")
    patient.refresh_crl()
    assert not _listed(generated_lab, first), "listed before its grace ended"
    _listed_as_superseded_once_a_short_grace_ends(generated_lab, service_for, first, "the superseded certificate")


def test_a_generator_renewal_goes_on_the_crl_after_the_grace(generated_lab: LabEnv, service_for) -> None:
    """The generator renews with a new key: within the grace its own CRL does not list the old certificate; the
    CA's refresh lists it once the grace ended (was: never)."""
    identity = Identity.of(generated_lab.certs_dir, "device001")
    old = format(x509.load_pem_x509_certificate(identity.cert.read_bytes()).serial_number, "x")
    generated_lab.lab(SUPERSEDED_GRACE_SECONDS="3600").generate(["device001"], force=True)
    assert not _listed(generated_lab, old), "listed before its grace ended"
    _listed_as_superseded_once_a_short_grace_ends(
        generated_lab, service_for, old, "the certificate the generator superseded"
    )


def test_renewal_takes_only_the_current_certificate(generated_lab: LabEnv, client: FlaskClient) -> None:
    """`sign` without a CSR re-signs the stored key only while it is the current certificate's (403 otherwise)."""
    passphrase = generated_lab.passphrase
    created = client.post("/v1/ssl/create", json={"name": "gw-c", "days": 5, "pass": passphrase}).json
    # the entity moves to a new key through a CSR: the stored key belongs to a superseded certificate now
    assert (
        client.post(
            "/v1/ssl/sign", json={"name": "gw-c", "days": 5, "pass": passphrase, "csr": make_csr("gw-c")[0]}
        ).status_code
        == 201
    )
    before = lab_state(generated_lab)
    stale = client.post("/v1/ssl/sign", json={"name": "gw-c", "days": 5, "pass": passphrase})
    assert stale.status_code == 403, stale.json
    assert lab_state(generated_lab) == before
    # a revoked certificate's key is never re-signed either
    client.post("/v1/ssl/create", json={"name": "gw-d", "days": 5, "pass": passphrase})
    assert (
        client.post("/v1/ssl/revoke", json={"name": "gw-d", "pass": passphrase, "reason": "keyCompromise"}).status_code
        == 200
    )
    before = lab_state(generated_lab)
    revoked = client.post("/v1/ssl/sign", json={"name": "gw-d", "days": 5, "pass": passphrase})
    assert revoked.status_code == 403, revoked.json
    assert lab_state(generated_lab) == before
    active = client.get("/v1/ssl/certs?status=active", headers=_viewer(client)).json["certificates"]
    assert created["serial"] not in {r["serial"] for r in active}


@pytest.mark.integration
def test_a_superseded_certificate_no_longer_connects(generated_lab: LabEnv, broker: Broker, tmp_path) -> None:
    """With no grace, the moment a device renews over MQTT its old certificate is refused by the real broker."""
    app = start_app(generated_lab, LAB_SETTINGS=generated_lab.settings(SUPERSEDED_GRACE_SECONDS="0"))
    old = Identity.of(generated_lab.certs_dir, "device001")
    device = Collector(generated_lab.certs_dir, "device001", broker.port).connect()
    try:
        device.subscribe("ssl/device001")
        wait_ready(device, "device001", v5=False)
        pem, key = make_csr("device001")
        device.publish("ssl/renew/device001", json.dumps({"csr": pem}))
        while "error" in (reply := json.loads(device.expect("ssl/device001").payload)):
            pass
        new_crt, new_key = tmp_path / "new.crt", tmp_path / "new.key"
        new_crt.write_text(reply["crt"])
        new_key.write_bytes(key_pem(key))
        new_key.chmod(0o600)
        assert (
            _reason(
                _crl(generated_lab), format(x509.load_pem_x509_certificate(old.cert.read_bytes()).serial_number, "x")
            )
            == x509.ReasonFlags.superseded
        )
        refused = Collector(generated_lab.certs_dir, "device001", broker.port, client_id="x", identity=old)
        with pytest.raises(AssertionError):
            refused.connect(timeout=3)
        refused.client.loop_stop()
        fresh = Identity(ca_cert=old.ca_cert, cert=new_crt, key=new_key)
        Collector(
            generated_lab.certs_dir, "device001", broker.port, identity=fresh, protocol=mqtt.MQTTv311
        ).connect().close()
    finally:
        device.close()
        close_app(app)

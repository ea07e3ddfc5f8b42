"""CAService on a generated lab: the seed's bodies, replay, renewal, CSRs, refusals that write nothing, tokens."""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import update

from dashboard.openapi import SEED_CREATE
from pki.authority import CA_KEY_USAGE, load_certificate, load_private_key, public_key_matches
from pki.inventory import ACTIVE, SUPERSEDED, EnrolmentToken, Inventory
from pki.lockout import LOCKOUT_WINDOW, SOURCE_ATTEMPTS, Lockout
from pki.profiles import PROTECTED_NAMES
from pki.service import CAService

from .ca_support import check_issued, lab_state, make_csr
from .conftest import LabEnv


class FakeClock:
    """Lockout windows are 15 minutes; the test moves time instead of waiting."""

    def __init__(self) -> None:
        self.now = 2_000_000_000.0  # wall-clock seconds, as the lockout stores them

    def __call__(self) -> float:
        return self.now


pytestmark = pytest.mark.databases


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(generated_lab: LabEnv, clock: FakeClock) -> Iterator[CAService]:
    yield from _service_with_clock(generated_lab, clock)


def _service_with_clock(lab: LabEnv, clock: FakeClock) -> Iterator[CAService]:
    inventory = Inventory(lab.settings().effective_database_url)
    ca = CAService(lab.settings(), inventory=inventory, lockout=Lockout(inventory, clock=clock))
    yield ca
    ca.close()


@pytest.mark.parametrize("operation", ["sign", "create"])
def test_a_caller_keyword_the_service_does_not_know_is_a_type_error(
    generated_lab: LabEnv, service: CAService, operation: str
) -> None:
    body = {"name": "device001", "pass": generated_lab.passphrase, "days": 360}
    before = sorted(path.name for path in (generated_lab.certs_dir / "device001").iterdir())
    records = len(service.inventory.list("device001"))
    with pytest.raises(TypeError, match="source="):
        getattr(service, operation)(body, sourc="t")  # a typo: as a plain signature would, refuse it
    with pytest.raises(TypeError, match="source="):
        getattr(service, operation)(body, via="http")  # no source: the lockout would have no key
    assert sorted(path.name for path in (generated_lab.certs_dir / "device001").iterdir()) == before
    assert len(service.inventory.list("device001")) == records  # refused before anything was signed


def test_seed_sign_body_renews_a_generated_device(generated_lab: LabEnv, service: CAService, tmp_path: Path) -> None:
    before = load_certificate((generated_lab.certs_dir / "device001" / "device001.crt").read_bytes())
    stored_key = (generated_lab.certs_dir / "device001" / "device001.key").read_bytes()
    reply = service.sign({"name": "device001", "pass": generated_lab.passphrase, "days": 360}, source="t")
    assert reply.status == 201, reply.body
    cert = check_issued(reply.body, tmp_path=tmp_path)
    # renewal: same key, same subject and SANs, new serial, device profile kept
    assert reply.body["key"].encode() == stored_key
    assert cert.serial_number != before.serial_number
    assert cert.subject == before.subject
    assert (
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        == before.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert (generated_lab.certs_dir / "device001" / "device001.crt").read_text() == reply.body["crt"]
    rows = service.inventory.list(name="device001")
    assert [r.status for r in rows] == [SUPERSEDED, ACTIVE]
    assert (rows[-1].serial, rows[-1].issued_via, rows[-1].requester) == (reply.body["serial"], "http", "t")
    # the generator accepts the renewed pair as current (it keeps it)
    results = {r.name: r.action for r in generated_lab.lab().generate().results}
    assert results["device001"] == "kept"


def test_seed_create_body_then_seed_sign_body(generated_lab: LabEnv, service: CAService, tmp_path: Path) -> None:
    body = {**SEED_CREATE, "pass": generated_lab.passphrase}  # the body the API document shows
    created = service.create(body, source="t")
    assert created.status == 201, created.body
    assert created.body["name"] == "AABBCCDDEEFF"
    cert = check_issued(created.body, tmp_path=tmp_path)
    subject = {a.oid: a.value for a in cert.subject}
    assert subject == {
        NameOID.COUNTRY_NAME: "BR",
        NameOID.STATE_OR_PROVINCE_NAME: "SP",
        NameOID.LOCALITY_NAME: "Campinas",
        NameOID.ORGANIZATION_NAME: "ACME",
        NameOID.ORGANIZATIONAL_UNIT_NAME: "Sensors",
        NameOID.EMAIL_ADDRESS: "ops@example.com",
        NameOID.COMMON_NAME: "AABBCCDDEEFF",
    }
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["ops@example.com"]
    folder = generated_lab.certs_dir / "AABBCCDDEEFF"
    assert (folder / "AABBCCDDEEFF.key").stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / "root_ca.crt").read_text() == created.body["ca"]
    assert (
        load_private_key((folder / "AABBCCDDEEFF.key").read_bytes()).private_numbers()
        == load_private_key(created.body["key"].encode()).private_numbers()
    )
    assert service.inventory.current("AABBCCDDEEFF").role == "entity"

    # the seed's sign body for the entity just created: renewal of its stored key, same subject
    renewed = service.sign({"name": "AA:BB:CC:DD:EE:FF", "pass": generated_lab.passphrase, "days": 360}, source="t")
    assert renewed.status == 201, renewed.body
    renewed_cert = check_issued(renewed.body)
    assert renewed.body["key"] == created.body["key"]
    assert renewed_cert.subject == cert.subject and renewed_cert.serial_number != cert.serial_number


def test_identical_create_is_replayed_with_the_same_serial(generated_lab: LabEnv, service: CAService) -> None:
    body = {"name": "client", "days": 30, "pass": generated_lab.passphrase, "org": "ACME"}
    first = service.create(body, source="t")
    again = service.create({**body, "days": "30"}, source="other")  # the same request, days as a string
    assert (first.status, again.status) == (201, 200)
    assert again.body == first.body
    assert len(service.inventory.list(name="client")) == 1
    # any field changed: a new certificate
    changed = service.create({**body, "org": "Other"}, source="t")
    assert changed.status == 201 and changed.body["serial"] != first.body["serial"]
    # the replay never skips the passphrase
    assert service.create({**body, "org": "Other", "pass": "wrong"}, source="t").status == 403


def test_replay_stops_once_the_certificate_is_revoked(generated_lab: LabEnv, service: CAService) -> None:
    body = {"name": "client", "days": 30, "pass": generated_lab.passphrase}
    first = service.create(body, source="t")
    assert service.revoke({"name": "client", "pass": generated_lab.passphrase}, source="t").status == 200
    after = service.create(body, source="t")
    assert after.status == 201 and after.body["serial"] != first.body["serial"]


def test_sign_with_a_csr_copies_only_allowed_names(generated_lab: LabEnv, service: CAService) -> None:
    pem, key = make_csr(
        "sensor-7",
        dns=["sensor-7.example.com"],
        ips=["10.1.2.3"],
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (CA_KEY_USAGE, True),  # the root's own: certificate and CRL signing
        ],
        subject=x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp"),
                x509.NameAttribute(NameOID.COMMON_NAME, "sensor-7"),
            ]
        ),
    )
    reply = service.sign({"name": "sensor-7", "pass": generated_lab.passphrase, "days": 10, "csr": pem}, source="t")
    assert reply.status == 201, reply.body
    assert "key" not in reply.body
    cert = check_issued(reply.body, key)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert not usage.key_cert_sign and not usage.crl_sign
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value != "Evil Corp"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"sensor-7", "sensor-7.example.com"}
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert 9 < (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 10
    assert not (generated_lab.certs_dir / "sensor-7" / "sensor-7.key").exists()


def test_a_csr_for_a_generated_device_never_breaks_its_file_pair(generated_lab: LabEnv, service: CAService) -> None:
    """The CA does not hold the CSR's key, so the device's key and certificate files stay as they were, a matching
    pair (never a certificate without its key, never a key moved aside); the new certificate is the current one."""
    folder = generated_lab.certs_dir / "device002"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    pem, key = make_csr("device002")
    reply = service.sign({"name": "device002", "pass": generated_lab.passphrase, "days": 10, "csr": pem}, source="t")
    assert reply.status == 201, reply.body
    assert service.inventory.current("device002").role == "device"
    assert service.inventory.current("device002").serial == reply.body["serial"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert public_key_matches(
        load_certificate((folder / "device002.crt").read_bytes()),
        load_private_key((folder / "device002.key").read_bytes()),
    )
    # the stored key now belongs to a superseded certificate: it is never re-signed (403), nothing changes
    state = lab_state(generated_lab)
    again = service.sign({"name": "device002", "pass": generated_lab.passphrase, "days": 10}, source="t")
    assert again.status == 403, again.body
    assert lab_state(generated_lab) == state


def test_wrong_passphrase_writes_nothing(generated_lab: LabEnv, service: CAService) -> None:
    pem, _ = make_csr("newcomer")
    before = lab_state(generated_lab)
    for reply in (
        service.sign({"name": "newcomer", "pass": "nope", "days": 10, "csr": pem}, source="a"),
        service.sign({"name": "device001", "pass": "nope", "days": 10}, source="b"),
        service.create({"name": "newcomer", "pass": "nope", "days": 10}, source="c"),
        service.revoke({"name": "device001", "pass": "nope"}, source="d"),
        service.issue_token({"name": "newcomer", "pass": "nope"}, source="e"),
    ):
        assert reply.status == 403 and reply.body == {"error": "wrong passphrase", "field": "pass"}
    assert lab_state(generated_lab) == before
    assert not (generated_lab.certs_dir / "newcomer").exists()


def guess_wrong(service: CAService, good: dict[str, Any], times: int, clock: FakeClock | None = None) -> None:
    """`times` sign requests like `good` but with a wrong passphrase, from 10.0.0.9: each refused with 403, not
    yet locked out; with `clock`, a minute passes after each."""
    for _ in range(times):
        assert service.sign({**good, "pass": "guess"}, source="10.0.0.9").status == 403
        if clock is not None:
            clock.now += 60


def test_five_failures_lock_the_requester_out_for_the_window(
    generated_lab: LabEnv, service: CAService, clock: FakeClock
) -> None:
    good = {"name": "device001", "pass": generated_lab.passphrase, "days": 10}
    guess_wrong(service, good, 5, clock=clock)
    locked = service.sign(good, source="10.0.0.9")  # even the right passphrase: guessing must stop
    assert locked.status == 429
    assert locked.headers["Retry-After"] == str(15 * 60 - 5 * 60)
    # every passphrase-protected operation of that requester (source and name) is locked ...
    assert service.revoke({"name": "device001", "pass": generated_lab.passphrase}, source="10.0.0.9").status == 429
    assert service.issue_token({"name": "device001", "pass": generated_lab.passphrase}, source="10.0.0.9").status == 429
    # ... and nobody else: another client on the same address asking for another name, another address,
    # and an operator whom the dashboard vouches for (no passphrase at all)
    assert service.issue_token({"name": "x", "pass": generated_lab.passphrase}, source="10.0.0.9").status == 201
    assert service.sign(good, source="10.0.0.10").status == 201
    assert service.sign({"name": "device001", "days": 10}, source="10.0.0.9", operator="admin").status == 201
    # once the oldest failure leaves the 15-minute window, the requester may try again
    clock.now += 15 * 60 - 5 * 60 - 1
    assert service.sign(good, source="10.0.0.9").status == 429
    clock.now += 1
    assert service.sign(good, source="10.0.0.9").status == 201


def test_rotating_names_does_not_escape_the_lockout(generated_lab: LabEnv, service: CAService) -> None:
    """A proven identity (an MQTT CN) is locked after five whatever it names; an address after SOURCE_ATTEMPTS."""
    statuses = [
        service.sign({"name": f"guess{i}", "pass": "guess", "days": 1}, source="cn:device002").status for i in range(20)
    ]
    assert statuses == [403] * 5 + [429] * 15
    good = {"name": "device001", "pass": generated_lab.passphrase, "days": 10}
    assert service.sign(good, source="cn:device002").status == 429
    assert service.sign(good, source="cn:device001").status == 201  # another device is not blocked
    statuses = [
        service.create({"name": f"n{i}", "pass": "guess", "days": 1}, source="192.0.2.1").status
        for i in range(SOURCE_ATTEMPTS + 3)
    ]
    assert statuses == [403] * SOURCE_ATTEMPTS + [429] * 3
    assert service.sign(good, source="192.0.2.1").status == 429  # a guessing attack from that address: all stop
    assert service.sign(good, source="192.0.2.2").status == 201


def test_the_lockout_survives_a_restart_and_is_shared(
    generated_lab: LabEnv, service: CAService, clock: FakeClock
) -> None:
    """The counts live in the database: a new CA process on the same DATABASE_URL sees them at once."""
    good = {"name": "device001", "pass": generated_lab.passphrase, "days": 10}
    guess_wrong(service, good, 3)
    other = _service_with_clock(generated_lab, clock)
    second = next(other)
    try:
        guess_wrong(second, good, 2)
        assert second.sign(good, source="10.0.0.9").status == 429
        assert service.sign(good, source="10.0.0.9").status == 429  # the first process counts the same
        clock.now += LOCKOUT_WINDOW
        assert second.sign(good, source="10.0.0.9").status == 201
    finally:
        second.close()


def test_unlocks_with_the_first_correct_pass_when_no_passphrase_is_configured(generated_lab: LabEnv) -> None:
    service = CAService(generated_lab.settings(CA_PASSPHRASE=""))
    try:
        assert service.settings.ca_passphrase is None
        body = {"name": "device001", "days": 10}
        assert service.sign({**body, "pass": "wrong"}, source="a").status == 403
        assert service.sign({**body, "pass": generated_lab.passphrase}, source="a").status == 201
        assert service.sign({**body, "pass": "wrong"}, source="a").status == 403
        assert service.sign({**body, "pass": generated_lab.passphrase + " "}, source="a").status == 403
        assert service.sign({**body, "pass": generated_lab.passphrase}, source="a").status == 201
    finally:
        service.close()


def test_unknown_entity_without_csr_is_404(generated_lab: LabEnv, service: CAService) -> None:
    reply = service.sign({"name": "nobody", "pass": generated_lab.passphrase, "days": 10}, source="t")
    assert (reply.status, reply.body["field"]) == (404, "name")


@pytest.mark.parametrize("name", sorted(PROTECTED_NAMES | {"Dashboard", "MOSQUITTO"}))
def test_protected_names_are_409_and_write_nothing(generated_lab: LabEnv, service: CAService, name: str) -> None:
    before = lab_state(generated_lab)
    pem, _ = make_csr(name)
    passphrase = generated_lab.passphrase
    for reply in (
        service.sign({"name": name, "pass": passphrase, "days": 10}, source="t"),
        service.sign({"name": name, "pass": passphrase, "days": 10, "csr": pem}, source="t"),
        service.create({"name": name, "pass": passphrase, "days": 10}, source="t"),
        service.revoke({"name": name, "pass": passphrase}, source="t"),
        service.issue_token({"name": name, "pass": passphrase}, source="t"),
    ):
        assert (reply.status, reply.body.get("field")) == (409, "name"), reply.body
    assert lab_state(generated_lab) == before


def test_days_beyond_the_ca_life_are_refused(generated_lab: LabEnv, service: CAService) -> None:
    reply = service.sign({"name": "device001", "pass": generated_lab.passphrase, "days": 3651}, source="t")
    assert (reply.status, reply.body["field"]) == (400, "days")
    reply = service.sign({"name": "device001", "pass": generated_lab.passphrase, "days": 3649}, source="t")
    assert reply.status == 201


def test_enrolment_token_works_once_for_one_name(
    generated_lab: LabEnv, service: CAService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    issued = service.issue_token({"name": "device042", "pass": generated_lab.passphrase, "ttl": 600}, source="t")
    assert issued.status == 201 and issued.body["name"] == "device042"
    token = issued.body["token"]
    pem, key = make_csr("device042")
    reply = service.sign({"name": "device042", "days": 30, "token": token, "csr": pem}, source="dev")
    assert reply.status == 201, reply.body
    check_issued(reply.body, key)
    refusals = {
        "reuse": service.sign({"name": "device042", "days": 30, "token": token, "csr": pem}, source="dev"),
        "forged": service.sign(
            {"name": "device042", "days": 30, "token": "forged-" + token[7:], "csr": pem}, source="dev"
        ),
    }
    other = service.issue_token({"name": "device043", "pass": generated_lab.passphrase}, source="t").body["token"]
    pem42, _ = make_csr("device042")
    refusals["other name"] = service.sign(
        {"name": "device042", "days": 30, "token": other, "csr": pem42}, source="dev2"
    )
    expired = service.issue_token({"name": "device044", "pass": generated_lab.passphrase}, source="t").body["token"]
    with service.inventory.session() as session:
        session.execute(
            update(EnrolmentToken)
            .where(EnrolmentToken.name == "device044")
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    pem44, _ = make_csr("device044")
    refusals["expired"] = service.sign({"name": "device044", "days": 30, "token": expired, "csr": pem44}, source="dev3")
    messages = {what: (r.status, r.body.get("field"), r.body["error"]) for what, r in refusals.items()}
    assert all(status == 403 and field == "token" for status, field, _ in messages.values()), messages
    assert "already been used" in messages["reuse"][2]
    assert "unknown" in messages["forged"][2]
    assert "another name" in messages["other name"][2]
    assert "expired" in messages["expired"][2]
    assert len(service.inventory.list(name="device042")) == 1
    assert not (generated_lab.certs_dir / "device044").exists()
    # tokens never reach the log, nor does the passphrase
    for secret in (token, other, expired, generated_lab.passphrase):
        assert secret not in caplog.text


def test_secrets_never_appear_in_logs_or_errors(
    generated_lab: LabEnv, service: CAService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-passphrase-but-close"
    replies = [
        service.sign({"name": "device001", "pass": wrong, "days": 10}, source="t"),
        service.sign({"name": "device001", "pass": generated_lab.passphrase, "days": 10}, source="t"),
        service.sign({"name": "device001", "pass": generated_lab.passphrase, "days": "x"}, source="t"),
        service.create({"name": "c1", "pass": generated_lab.passphrase, "days": 10}, source="t"),
    ]
    key_pem = replies[1].body["key"]
    for secret in (wrong, generated_lab.passphrase, key_pem.splitlines()[1]):
        assert secret not in caplog.text
    for reply in replies:
        assert generated_lab.passphrase not in str(reply.body) and wrong not in str(reply.body)


def test_a_new_root_is_picked_up_without_a_restart(generated_lab: LabEnv, service: CAService) -> None:
    body = {"name": "device001", "pass": generated_lab.passphrase, "days": 10}
    first = service.sign(body, source="t")
    for path in (generated_lab.certs_dir / "root_ca").iterdir():
        os.unlink(path)
    generated_lab.lab().generate()
    second = service.sign(body, source="t")
    assert second.status == 201
    assert second.body["ca"] != first.body["ca"]
    assert second.body["ca"] == (generated_lab.certs_dir / "root_ca" / "root_ca.crt").read_text()
    check_issued(second.body)

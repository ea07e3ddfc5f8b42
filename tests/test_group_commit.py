"""The issuance fast path: certificates for CSRs recorded by group commit (one transaction, one fsync, for many
concurrent requests), no files for entities whose key the CA never held, and per-request reads that stat
instead of re-reading files."""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import select

from pki.authority import CertificateAuthority, generate_private_key, serial_hex
from pki.inventory import (
    ACTIVE,
    SUPERSEDED,
    CertificateRecord,
    Inventory,
    IssuedAs,
    TokenAlreadyUsed,
    _PendingIssue,
)
from pki.inventory import _issued_values as issued_values
from pki.profiles import ENTITY
from pki.service import CAService
from pki.store import FileSnapshot, atomic_write

from .ca_support import check_issued, make_csr
from .conftest import LabEnv


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


pytestmark = pytest.mark.databases


@pytest.fixture
def inventory(database_url: str) -> Inventory:
    inventory = Inventory(database_url)
    yield inventory
    inventory.close()


TOKEN = "t" * 64
FAR_FUTURE = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)


def leaf(ca: CertificateAuthority, name: str) -> x509.Certificate:
    return ca.issue(generate_private_key("ec").public_key(), ENTITY, name, days=30)


def pending(cert: x509.Certificate, name: str, token: str | None = None, unless: bool = False) -> _PendingIssue:
    values = issued_values(cert, name=name, role=ENTITY.role, via="t", requester="r")
    return _PendingIssue(values, token, (lambda: True) if unless else None)


def rows(inventory: Inventory, name: str) -> list[tuple[str, str]]:
    with inventory.reading() as session:
        return [
            (r.serial, r.status)
            for r in session.scalars(
                select(CertificateRecord).where(CertificateRecord.name == name).order_by(CertificateRecord.id)
            )
        ]


def test_one_batch_is_one_transaction_with_per_caller_outcomes(ca: CertificateAuthority, inventory: Inventory) -> None:
    older = leaf(ca, "gw")
    inventory.record_issued(older, name="gw", role=ENTITY.role, via="cli")
    inventory.add_token(TOKEN, "sensor", FAR_FUTURE, None)
    first, second, third = (leaf(ca, "gw") for _ in range(3))
    token_first, token_again = leaf(ca, "sensor"), leaf(ca, "sensor")
    batch = [
        pending(first, "gw"),
        pending(token_first, "sensor", TOKEN),
        pending(second, "gw"),
        pending(token_again, "sensor", TOKEN),  # the same token, second use: refused
        pending(leaf(ca, "has-files"), "has-files", unless=True),  # `unless` says no: nothing written
        pending(third, "gw"),
    ]
    inventory.recorder._commit(batch)
    assert (inventory.recorder.batches, inventory.recorder.rows) == (1, 4)
    assert [item.recorded for item in batch] == [True, True, True, False, False, True]
    assert isinstance(batch[3].error, TokenAlreadyUsed) and all(
        item.error is None for i, item in enumerate(batch) if i != 3
    )
    # within one batch and across batches: only the newest certificate of an entity is active
    assert rows(inventory, "gw") == [
        (serial_hex(older), SUPERSEDED),
        (serial_hex(first), SUPERSEDED),
        (serial_hex(second), SUPERSEDED),
        (serial_hex(third), ACTIVE),
    ]
    assert rows(inventory, "sensor") == [(serial_hex(token_first), ACTIVE)]
    assert rows(inventory, "has-files") == []
    assert inventory.token(TOKEN).used_serial == serial_hex(token_first)


def test_a_failed_commit_fails_every_caller_and_writes_nothing(ca: CertificateAuthority, inventory: Inventory) -> None:
    batch = [pending(leaf(ca, "fine"), "fine"), pending(leaf(ca, "broken"), "broken")]
    batch[1].values["subject"] = None  # NOT NULL: the insert fails, so the whole transaction rolls back
    inventory.recorder._commit(batch)
    assert all(item.error is not None and not item.recorded for item in batch)
    assert rows(inventory, "fine") == [] and rows(inventory, "broken") == []
    assert inventory.recorder.batches == 0


def test_concurrent_callers_all_return_durable_rows(
    ca: CertificateAuthority, inventory: Inventory, tmp_path: Path
) -> None:
    certs = [leaf(ca, f"dev{i % 8}") for i in range(48)]
    start = threading.Barrier(16)

    def record(i: int) -> bool:
        if i < 16:
            start.wait()
        return inventory.record_issued_grouped(certs[i], IssuedAs(f"dev{i % 8}", ENTITY.role, "t"))

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(record, range(48)))
    assert inventory.recorder.rows == 48 and inventory.recorder.batches <= 48
    other = Inventory(inventory.url)  # another connection sees every row: committed before the callers returned
    try:
        for i in range(8):
            statuses = [status for _, status in rows(other, f"dev{i}")]
            assert len(statuses) == 6 and statuses.count(ACTIVE) == 1
    finally:
        other.close()


def test_after_close_a_caller_still_gets_its_row_written(ca: CertificateAuthority, tmp_path: Path) -> None:
    inventory = Inventory(f"sqlite:///{tmp_path / 'closing.db'}")
    inventory.recorder.close()
    assert inventory.record_issued_grouped(leaf(ca, "late"), IssuedAs("late", ENTITY.role, "t"))
    assert [status for _, status in rows(inventory, "late")] == [ACTIVE]
    inventory.close()


def test_file_snapshot_follows_atomic_replacements(tmp_path: Path) -> None:
    path = tmp_path / "acl"
    snapshot = FileSnapshot(path)
    assert snapshot.read() is None
    atomic_write(path, b"one")
    assert snapshot.read() == b"one"
    atomic_write(path, b"two")  # same size, maybe the same mtime: a new inode all the same
    assert snapshot.read() == b"two"
    path.unlink()
    assert snapshot.read() is None


@pytest.fixture
def service(generated_lab: LabEnv) -> CAService:
    service = CAService(generated_lab.settings())
    yield service
    service.close()


def test_csr_entities_live_in_the_inventory_alone(generated_lab: LabEnv, service: CAService) -> None:
    pem, key = make_csr("sensor-9")
    reply = service.sign({"name": "sensor-9", "days": 5, "pass": generated_lab.passphrase, "csr": pem}, source="t")
    assert reply.status == 201, reply.body
    check_issued(reply.body, key)
    assert service.inventory.current("sensor-9").pem == reply.body["crt"]
    assert not (generated_lab.certs_dir / "sensor-9").exists()
    # an entity with a folder (a generated device) keeps its files as they are: the CA does not hold the new key,
    # and a certificate without its key would break the device (Step 9)
    files = {p.name: p.read_bytes() for p in (generated_lab.certs_dir / "device001").iterdir()}
    pem, key = make_csr("device001")
    reply = service.sign({"name": "device001", "days": 5, "pass": generated_lab.passphrase, "csr": pem}, source="t")
    assert reply.status == 201
    assert service.inventory.current("device001").pem == reply.body["crt"]
    assert {p.name: p.read_bytes() for p in (generated_lab.certs_dir / "device001").iterdir()} == files


def test_one_token_used_by_two_requests_at_once_issues_one_certificate(
    generated_lab: LabEnv, service: CAService
) -> None:
    token = service.issue_token({"name": "twin", "pass": generated_lab.passphrase}, source="t").body["token"]
    bodies = [{"name": "twin", "days": 5, "token": token, "csr": make_csr("twin")[0]} for _ in range(6)]
    start = threading.Barrier(len(bodies))

    def sign(body: dict[str, object]) -> int:
        start.wait()
        return service.sign(body, source="dev").status

    with ThreadPoolExecutor(len(bodies)) as pool:
        statuses = sorted(pool.map(sign, bodies))
    assert statuses == [201] + [403] * 5
    assert len(service.inventory.list(name="twin")) == 1


def test_roles_lists_every_role_a_name_was_issued(ca: CertificateAuthority, inventory: Inventory) -> None:
    assert inventory.roles("gw") == set()
    inventory.record_issued(leaf(ca, "gw"), name="gw", role="device", via="cli")
    inventory.record_issued(leaf(ca, "gw"), name="gw", role=ENTITY.role, via="t")
    inventory.record_issued(leaf(ca, "gw"), name="gw", role=ENTITY.role, via="t")
    assert inventory.roles("gw") == {"device", ENTITY.role}
    assert inventory.roles("gw'; --") == set()  # a bound parameter, never SQL

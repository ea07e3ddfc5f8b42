"""The generator CLI's view of the lab's state, in-process against a temporary lab: `--check`'s report of every
certificate, revocation and the CRL, and the inventory of what was issued (rebuilt, shared by concurrent runs,
keeping revocations). tests/test_generator.py has what gets issued, renewal, and the passphrase and file safety.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import generate_ca_and_device_certs as generator
from pki.authority import CertificateAuthority, serial_hex
from pki.broker import BrokerFiles
from pki.inventory import ACTIVE, Inventory
from pki.service import CAService
from pki.store import atomic_write

from .conftest import PROJECT_ROOT, LabEnv
from .generator_support import LEAVES, load_cert, replace_leaf, run

# -- --check ----------------------------------------------------------------------------------------


def test_check_all_valid_exits_0(generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--check")
    assert code == 0
    for name in ["root_ca", *LEAVES]:
        assert f"{name}" in out
    assert out.count(" valid ") == 2 + len(LEAVES)  # the root, every leaf and the CRL


def test_check_one_expiring_exits_1(generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    replace_leaf(generated_lab, "device002", days=10)
    code, out, _ = run(capsys, "--check")
    assert code == 1
    line = next(line for line in out.splitlines() if line.startswith("device002"))
    assert "expiring" in line
    assert out.count(" valid ") == 1 + len(LEAVES)  # the root, the other leaves and the CRL


def test_check_one_expired_exits_1(generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    replace_leaf(generated_lab, "device001", days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    code, out, _ = run(capsys, "--check")
    assert code == 1
    line = next(line for line in out.splitlines() if line.startswith("device001"))
    assert "expired" in line
    # and the generator replaces it
    code, out, _ = run(capsys)
    assert code == 0 and "device001      renewed" in out and "(expired)" in out
    assert run(capsys, "--check")[0] == 0


def test_check_reports_a_missing_lab(lab_env: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--check")
    assert code == 1 and "missing" in out


def test_check_lists_revoked_lab_certificates_and_the_crl(
    generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    assert generator.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^CRL\s+valid\b", out, re.M), out
    service = CAService(generated_lab.settings())
    try:
        assert service.revoke({"name": "device002", "pass": generated_lab.passphrase}, source="t").ok
    finally:
        service.close()
    assert generator.main(["--check"]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("device002"))
    assert " revoked " in line and "unspecified" in line
    assert next(line for line in out.splitlines() if line.startswith("device001")).split()[1] == "valid"

    # a CRL inside its refresh window is flagged, an expired one more loudly
    files = BrokerFiles(generated_lab.certs_dir, generated_lab.data_dir)
    root = generated_lab.certs_dir / "root_ca"
    ca = CertificateAuthority.load(
        (root / "root_ca.crt").read_bytes(), (root / "root_ca.key").read_bytes(), generated_lab.passphrase
    )
    for days, state in ((3, "expiring"), (-1, "expired")):
        now = dt.datetime.now(dt.UTC) - dt.timedelta(days=2) if days < 0 else None
        crl = ca.build_crl([], crl_number=9, next_update=dt.timedelta(days=days + (2 if days < 0 else 0)), now=now)
        atomic_write(files.crl, crl.public_bytes(serialization.Encoding.PEM))
        assert generator.main(["--check"]) == 1
        assert re.search(rf"^CRL\s+{state}\b", capsys.readouterr().out, re.M)


def test_check_never_creates_a_database(lab_env: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    assert generator.main(["--check"]) == 1
    assert not lab_env.data_dir.exists() or not any(lab_env.data_dir.iterdir())
    assert re.search(r"^CRL\s+missing\b", capsys.readouterr().out, re.M)


# -- the inventory ----------------------------------------------------------------------------------


def test_inventory_has_one_current_row_per_entity(generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys)
    run(capsys, "--force")
    run(capsys)
    inventory = Inventory(generated_lab.env["DATABASE_URL"])
    try:
        active = inventory.list(status=ACTIVE)
        assert sorted(r.name for r in active) == sorted(["root_ca", *LEAVES])
        for name in LEAVES:
            row = inventory.current(name)
            cert = load_cert(generated_lab.certs_dir / name / f"{name}.crt")
            assert row is not None and row.serial == serial_hex(cert)
            assert row.common_name == name and row.issued_via == "cli"
            assert len(row.fingerprint_sha256) == 64
        # the forced run superseded one generation of every leaf
        assert len(inventory.list()) == 1 + 2 * len(LEAVES)
    finally:
        inventory.close()


def test_lost_inventory_is_rebuilt_from_the_files(generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    db = Path(generated_lab.env["DATABASE_URL"].removeprefix("sqlite:///"))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    assert run(capsys)[0] == 0
    inventory = Inventory(generated_lab.env["DATABASE_URL"])
    try:
        assert len(inventory.list(status=ACTIVE)) == 1 + len(LEAVES)
    finally:
        inventory.close()


def test_two_generators_at_once_do_not_corrupt_the_lab(lab_env: LabEnv) -> None:
    env = {**os.environ, **lab_env.env}
    cmd = [sys.executable, str(PROJECT_ROOT / "generate_ca_and_device_certs.py")]
    procs = [
        subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    # Exactly one run created the root; the others found it and kept everything.
    created = sum(out.count(b"root_ca        created") for out, _ in outputs)
    assert created == 1
    check = subprocess.run([*cmd, "--check"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    inventory = Inventory(lab_env.env["DATABASE_URL"])
    try:
        assert len(inventory.list(status=ACTIVE)) == 1 + len(LEAVES)
        assert len(inventory.list()) == 1 + len(LEAVES)
    finally:
        inventory.close()


def test_regenerating_with_another_inventory_keeps_revocations(
    generated_lab: LabEnv, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revocation made by one inventory (say the Docker volume's) survives the generator run with another
    (the host's): the current CRL is the record the broker enforces, so it is merged, never dropped."""
    from pki.broker import BrokerFiles
    from pki.service import CAService

    service = CAService(generated_lab.settings())
    reply = service.revoke({"name": "device001", "pass": generated_lab.passphrase}, source="test")
    assert reply.status == 200, reply.body
    revoked_serial = load_cert(generated_lab.certs_dir / "device001" / "device001.crt").serial_number
    files = BrokerFiles(generated_lab.certs_dir, generated_lab.data_dir)
    assert b"user device001\ntopic deny #" in files.acl.read_bytes()

    other_db = generated_lab.root / "other.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{other_db}")
    code, out, _ = run(capsys)
    assert code == 0 and "1 revocation(s) found in the current CRL" in out
    crl = x509.load_pem_x509_crl(files.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(revoked_serial) is not None
    assert b"user device001\ntopic deny #" in files.acl.read_bytes()
    other = Inventory(f"sqlite:///{other_db}")
    try:
        row = other.by_serial(format(revoked_serial, "x"))
        assert row is not None and row.status == "revoked"
    finally:
        other.close()
    # and the revoked device is not silently re-issued by the generator
    assert load_cert(generated_lab.certs_dir / "device001" / "device001.crt").serial_number == revoked_serial


def test_a_revoked_device_is_reported_revoked_and_reissued_only_when_named(
    generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    from pki.service import CAService

    service = CAService(generated_lab.settings())
    try:
        assert service.revoke({"name": "device001", "pass": generated_lab.passphrase}, source="test").ok
    finally:
        service.close()
    path = generated_lab.certs_dir / "device001" / "device001.crt"
    revoked = load_cert(path).serial_number
    next_step = "issue it a new certificate with `./setup.sh certs --devices device001`"

    code, out, _ = run(capsys)  # DEVICES: reported, not reissued, never "kept"
    line = next(line for line in out.splitlines() if line.startswith("device001"))
    assert code == 0 and line.split()[1] == "revoked" and next_step in line, out
    assert "1 revoked (not reissued)" in out
    assert load_cert(path).serial_number == revoked

    code, out, _ = run(capsys, "--check")
    assert code == 1 and f"device001 is revoked: {next_step}" in out, out
    assert "renew them" not in out  # nothing else needs attention, and ./setup.sh certs alone would not help

    code, out, _ = run(capsys, "--devices", "device001")  # the next step, as printed
    line = next(line for line in out.splitlines() if line.startswith("device001"))
    assert code == 0 and line.split()[1] == "renewed" and "(revoked)" in line, out
    assert load_cert(path).serial_number != revoked
    code, out, _ = run(capsys, "--check")
    assert code == 0, out

"""What the generator's test modules share: the lab's leaves, reading certificates, putting a leaf of a chosen
lifetime in place, and running the CLI in-process."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

import generate_ca_and_device_certs as generator
from pki.authority import CertificateAuthority, generate_private_key, key_pem
from pki.profiles import DEVICE

from .conftest import LabEnv

LEAVES = ["mosquitto", "dashboard", "ca-1", "provisioner", "ingest-1", "ingest-2", "device001", "device002"]


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_ca(lab: LabEnv) -> CertificateAuthority:
    root = lab.certs_dir / "root_ca"
    return CertificateAuthority.load(
        (root / "root_ca.crt").read_bytes(), (root / "root_ca.key").read_bytes(), lab.passphrase
    )


def replace_leaf(lab: LabEnv, name: str, *, days: int, now: dt.datetime | None = None) -> x509.Certificate:
    """Put a genuine certificate from the lab's root with a chosen lifetime in place of `name`'s."""
    ca = load_ca(lab)
    key = generate_private_key("ec")
    cert = ca.issue(key.public_key(), DEVICE, name, days=days, now=now)
    (lab.certs_dir / name / f"{name}.key").write_bytes(key_pem(key))
    (lab.certs_dir / name / f"{name}.crt").write_bytes(cert.public_bytes(encoding=_pem()))
    return cert


def _pem():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = generator.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err

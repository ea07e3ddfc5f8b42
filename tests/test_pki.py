"""Unit tests of the PKI core: the CA, profiles, atomic files, the lock, settings."""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from pki.authority import CAError, CertificateAuthority, LeafNames, WrongPassphrase, generate_private_key, serial_hex
from pki.config import ConfigError, Settings
from pki.profiles import BROKER, DEVICE, ENTITY
from pki.store import CertsLayout, atomic_write, exclusive_lock


def test_leaf_validity_is_capped_by_the_ca() -> None:
    ca = CertificateAuthority.create(days=30)
    key = generate_private_key()
    cert = ca.issue(key.public_key(), DEVICE, "device001", days=365)
    assert cert.not_valid_after_utc == ca.not_after


def test_an_expired_ca_refuses_to_issue() -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    ca = CertificateAuthority.create(days=1, now=past)
    with pytest.raises(CAError, match="expired"):
        ca.issue(generate_private_key().public_key(), DEVICE, "device001", days=1)


def test_serials_are_random_and_distinct() -> None:
    ca = CertificateAuthority.create()
    key = generate_private_key()
    serials = {ca.issue(key.public_key(), DEVICE, "d", days=1).serial_number for _ in range(200)}
    assert len(serials) == 200
    assert all(0 < s < 2**159 for s in serials)


def test_ca_key_and_certificate_must_belong_together() -> None:
    ca = CertificateAuthority.create()
    with pytest.raises(CAError, match="does not belong"):
        CertificateAuthority(ca.certificate, generate_private_key())


def test_ca_round_trips_through_its_encrypted_pem() -> None:
    ca = CertificateAuthority.create()
    pem = ca.encrypted_key_pem("s3cret-passphrase")
    assert b"ENCRYPTED" in pem
    loaded = CertificateAuthority.load(ca.cert_pem, pem, "s3cret-passphrase")
    assert loaded.certificate == ca.certificate
    with pytest.raises(WrongPassphrase):
        CertificateAuthority.load(ca.cert_pem, pem, "wrong")
    with pytest.raises(CAError):
        ca.encrypted_key_pem("")


def test_issued_rejects_a_lookalike_from_another_ca() -> None:
    ours, theirs = CertificateAuthority.create(), CertificateAuthority.create()
    key = generate_private_key()
    assert ours.issued(ours.issue(key.public_key(), DEVICE, "d", days=1))
    assert not ours.issued(theirs.issue(key.public_key(), DEVICE, "d", days=1))


def test_entity_profile_sans_and_bad_names() -> None:
    ca = CertificateAuthority.create()
    key = generate_private_key()
    cert = ca.issue(key.public_key(), ENTITY, LeafNames("broker.example.com", emails=["ops@example.com"]), days=1)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.example.com"]
    assert sans.get_values_for_type(x509.RFC822Name) == ["ops@example.com"]
    with pytest.raises(CAError):
        ca.issue(key.public_key(), BROKER, LeafNames("mosquitto", dns_names=["bad name!"]), days=1)


def test_crl_lists_revoked_serials_and_is_signed_by_the_root() -> None:
    ca = CertificateAuthority.create()
    cert = ca.issue(generate_private_key().public_key(), DEVICE, "d", days=1)
    crl = ca.build_crl([(cert.serial_number, dt.datetime.now(dt.UTC))], crl_number=7)
    assert crl.is_signature_valid(ca.certificate.public_key())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    assert serial_hex(cert) == format(cert.serial_number, "x")


def test_atomic_write_sets_mode_and_skips_identical_bytes(tmp_path: Path) -> None:
    target = tmp_path / "k.key"
    assert atomic_write(target, b"one", 0o600) is True
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    inode = target.stat().st_ino
    assert atomic_write(target, b"one", 0o600) is False
    assert target.stat().st_ino == inode
    assert atomic_write(target, b"two", 0o600) is True
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key"]


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "c.crt"
    atomic_write(target, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.crt"]


def test_exclusive_lock_serialises_writers(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    inside = []
    overlap = []

    def worker() -> None:
        with exclusive_lock(lock):
            if inside:
                overlap.append(True)
            inside.append(1)
            threading.Event().wait(0.02)
            inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap


def test_layout_refuses_path_tricks(tmp_path: Path) -> None:
    layout = CertsLayout(tmp_path)
    for bad in ("../etc", "a/b", ".hidden", "", "root_ca"):
        with pytest.raises(ValueError):
            layout.entity_dir(bad)


def test_settings_defaults_and_passphrase_never_in_repr() -> None:
    settings = Settings.from_env({"CA_PASSPHRASE": "topsecret-value"})
    assert settings.devices == ["device001", "device002"]
    assert (settings.cert_days, settings.renew_before_days, settings.key_type) == (365, 30, "ec")
    assert (settings.broker_port, settings.dashboard_host, settings.dashboard_port) == (8883, "127.0.0.1", 5000)
    url = settings.effective_database_url
    assert url.startswith("sqlite:///") and url.endswith("lab.db")
    assert "topsecret-value" not in repr(settings)


def test_settings_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="BROKER_PORT"):
        Settings.from_env({"BROKER_PORT": "eighty"})
    with pytest.raises(ConfigError, match="device id"):
        Settings.from_env({"DEVICES": "good,bad/one"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CERT_DAYS": "a year"}, "CERT_DAYS='a year' is not a whole number"),
        ({"CERT_DAYS": "0"}, "CERT_DAYS=0 must be at least 1"),
        ({"CERT_WATCH_SECONDS": "soon"}, "CERT_WATCH_SECONDS='soon' is not a number of seconds"),
        ({"CERT_WATCH_SECONDS": "-1"}, "CERT_WATCH_SECONDS=-1 must be a positive number of seconds"),
        ({"CERT_WATCH_SECONDS": "inf"}, "CERT_WATCH_SECONDS=inf must be a positive number of seconds"),
    ],
)
def test_number_settings_say_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env(env)


def test_number_settings_blank_means_the_default() -> None:
    settings = Settings.from_env({"CERT_DAYS": " ", "CERT_WATCH_SECONDS": "", "BROKER_PORT": " 1884 "})
    assert (settings.cert_days, settings.cert_watch_seconds, settings.broker_port) == (365, 5.0, 1884)

"""The certificate generator CLI, run in-process against a temporary lab (trustme's test_cli style): what gets issued,
idempotence and renewal, the passphrase and file safety. tests/test_generator_inventory.py has `--check` and the
inventory."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.authority import (
    CertificateAuthority,
    WrongPassphrase,
    generate_private_key,
    key_pem,
    load_private_key,
)
from pki.profiles import DEVICE

from .conftest import LabEnv
from .generator_support import LEAVES, _pem, load_ca, load_cert, replace_leaf, run


def openssl_verify(certs: Path, name: str, purpose: str) -> subprocess.CompletedProcess[str]:
    """`openssl verify -x509_strict -purpose <purpose>` of `name`'s certificate against the lab's root."""
    root, cert = certs / "root_ca" / "root_ca.crt", certs / name / f"{name}.crt"
    return subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", purpose, "-CAfile", str(root), str(cert)],
        capture_output=True,
        text=True,
    )


def serials(lab: LabEnv) -> dict[str, int]:
    return {name: load_cert(lab.certs_dir / name / f"{name}.crt").serial_number for name in LEAVES}


# -- what gets issued -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "purpose"),
    [
        ("mosquitto", "sslserver"),
        ("dashboard", "sslclient"),
        ("dashboard", "sslserver"),
        ("provisioner", "sslclient"),
        ("ingest-1", "sslclient"),
        ("ingest-2", "sslclient"),
        ("device001", "sslclient"),
        ("device002", "sslclient"),
    ],
)
def test_every_leaf_passes_openssl_strict_verify(session_lab: LabEnv, name: str, purpose: str) -> None:
    result = openssl_verify(session_lab.certs_dir, name, purpose)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


def test_device_certificate_is_refused_as_a_server(session_lab: LabEnv) -> None:
    """The EKU really constrains: a device certificate must not pass as a TLS server."""
    assert openssl_verify(session_lab.certs_dir, "device001", "sslserver").returncode != 0


def _sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.DNSName)} | {
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    }


def test_profiles_carry_their_extensions(session_lab: LabEnv) -> None:
    certs = session_lab.certs_dir
    root = load_cert(certs / "root_ca" / "root_ca.crt")
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest

    expected_eku = {
        "mosquitto": {ExtendedKeyUsageOID.SERVER_AUTH},
        "dashboard": {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH},
        "provisioner": {ExtendedKeyUsageOID.CLIENT_AUTH},
        "ingest-1": {ExtendedKeyUsageOID.CLIENT_AUTH},
        "device001": {ExtendedKeyUsageOID.CLIENT_AUTH},
        "device002": {ExtendedKeyUsageOID.CLIENT_AUTH},
    }
    for name, eku in expected_eku.items():
        cert = load_cert(certs / name / f"{name}.crt")
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == eku
        leaf_ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert leaf_ku.critical and leaf_ku.value.digital_signature and not leaf_ku.value.key_cert_sign
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == root_ski
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"
        # Random serials (RFC 5280: positive, at most 20 octets) and a back-dated notBefore.
        assert 0 < cert.serial_number < 2**159
        assert cert.serial_number.bit_length() > 64
        age = dt.datetime.now(dt.UTC) - cert.not_valid_before_utc
        assert dt.timedelta(minutes=4) < age < dt.timedelta(hours=1)
        # Every entity folder carries the root next to its own pair.
        assert (certs / name / "root_ca.crt").read_bytes() == (certs / "root_ca" / "root_ca.crt").read_bytes()

    assert _sans(load_cert(certs / "mosquitto" / "mosquitto.crt")) == {"localhost", "mosquitto", "127.0.0.1", "::1"}
    assert _sans(load_cert(certs / "dashboard" / "dashboard.crt")) == {"localhost", "dashboard", "127.0.0.1"}


def test_broker_sans_setting_adds_names(
    lab_env: LabEnv, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_SANS", "broker.lab.example,10.0.0.5")
    monkeypatch.setenv("BROKER_ADDRESS", "mqtt.lab.example")
    assert run(capsys, "--devices", "device001")[0] == 0
    sans = _sans(load_cert(lab_env.certs_dir / "mosquitto" / "mosquitto.crt"))
    assert {"broker.lab.example", "10.0.0.5", "mqtt.lab.example", "localhost", "127.0.0.1"} <= sans
    # Changing the names later reissues only the broker.
    before = serials_of(lab_env, ["mosquitto", "device001"])
    monkeypatch.setenv("BROKER_SANS", "broker.lab.example")
    code, out, _ = run(capsys, "--devices", "device001")
    after = serials_of(lab_env, ["mosquitto", "device001"])
    assert code == 0 and "names changed" in out
    assert before["mosquitto"] != after["mosquitto"] and before["device001"] == after["device001"]


def serials_of(lab: LabEnv, names: list[str]) -> dict[str, int]:
    return {n: load_cert(lab.certs_dir / n / f"{n}.crt").serial_number for n in names}


def test_rsa_key_type(lab_env: LabEnv, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_TYPE", "rsa")
    assert run(capsys, "--devices", "device001")[0] == 0
    for name in ("mosquitto", "device001"):
        cert = load_cert(lab_env.certs_dir / name / f"{name}.crt")
        assert isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 2048
        assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    result = openssl_verify(lab_env.certs_dir, "mosquitto", "sslserver")
    assert result.returncode == 0, result.stderr


# -- idempotence and renewal ------------------------------------------------------------------------


def test_second_run_changes_no_file(generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    before = generated_lab.snapshot()
    code, out, _ = run(capsys)
    assert code == 0
    certs_only = {k: v for k, v in generated_lab.snapshot().items() if not k.startswith("data/")}
    assert certs_only == {k: v for k, v in before.items() if not k.startswith("data/")}
    assert out.count(" kept ") == 1 + len(LEAVES) and " created " not in out and " renewed " not in out


def test_leaf_near_expiry_is_renewed_and_others_kept(generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    replace_leaf(generated_lab, "device001", days=10)
    before = serials(generated_lab)
    code, out, _ = run(capsys)
    after = serials(generated_lab)
    assert code == 0
    assert after["device001"] != before["device001"]
    assert {k: v for k, v in after.items() if k != "device001"} == {k: v for k, v in before.items() if k != "device001"}
    assert "device001      renewed" in out and "expires in 10 days" in out
    renewed = load_cert(generated_lab.certs_dir / "device001" / "device001.crt")
    assert renewed.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=360)


def test_force_renews_every_leaf_but_keeps_the_root(generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    root_before = (generated_lab.certs_dir / "root_ca" / "root_ca.crt").read_bytes()
    before = serials(generated_lab)
    code, out, _ = run(capsys, "--force")
    after = serials(generated_lab)
    assert code == 0
    assert all(before[name] != after[name] for name in LEAVES)
    assert (generated_lab.certs_dir / "root_ca" / "root_ca.crt").read_bytes() == root_before
    assert out.count("(forced)") == len(LEAVES)


def test_deleting_the_root_reissues_everything(generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    old_root = load_cert(generated_lab.certs_dir / "root_ca" / "root_ca.crt")
    before = serials(generated_lab)
    shutil.rmtree(generated_lab.certs_dir / "root_ca")
    code, out, _ = run(capsys)
    assert code == 0
    new_root = load_cert(generated_lab.certs_dir / "root_ca" / "root_ca.crt")
    assert new_root.public_key() != old_root.public_key()
    after = serials(generated_lab)
    assert all(before[name] != after[name] for name in LEAVES)
    assert out.count("not from the current root") == len(LEAVES)
    for name in LEAVES:
        assert load_cert(generated_lab.certs_dir / name / f"{name}.crt").issuer == new_root.subject
        assert (generated_lab.certs_dir / name / "root_ca.crt").read_bytes() == new_root.public_bytes(_pem())


def test_leaf_from_a_foreign_root_is_reissued(generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = CertificateAuthority.create()
    key = generate_private_key()
    cert = foreign.issue(key.public_key(), DEVICE, "device002", days=300)
    folder = generated_lab.certs_dir / "device002"
    (folder / "device002.key").write_bytes(key_pem(key))
    (folder / "device002.crt").write_bytes(cert.public_bytes(_pem()))
    code, out, _ = run(capsys)
    assert code == 0 and "not from the current root" in out
    assert load_ca(generated_lab).issued(load_cert(folder / "device002.crt"))


def test_corrupt_certificate_is_reported_and_replaced(
    generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    path = generated_lab.certs_dir / "device002" / "device002.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    code, out, _ = run(capsys, "--check")
    assert code == 1 and "device002" in out and "invalid" in out
    code, out, _ = run(capsys)
    assert code == 0 and "device002      renewed" in out and "unreadable certificate" in out
    assert load_ca(generated_lab).issued(load_cert(path))


def test_key_not_matching_its_certificate_is_reissued(
    generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    (generated_lab.certs_dir / "device001" / "device001.key").write_bytes(key_pem(generate_private_key()))
    code, out, _ = run(capsys)
    assert code == 0 and "key does not match certificate" in out
    assert run(capsys, "--check")[0] == 0


def test_corrupt_root_certificate_is_re_signed_with_the_same_key(
    generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    before = serials(generated_lab)
    (generated_lab.certs_dir / "root_ca" / "root_ca.crt").write_text("garbage")
    code, out, _ = run(capsys)
    assert code == 0 and "root_ca        renewed" in out
    # Same key and name: the existing leaves still chain to it and are kept.
    assert serials(generated_lab) == before
    root = (generated_lab.certs_dir / "root_ca" / "root_ca.crt").read_bytes()
    assert all((generated_lab.certs_dir / name / "root_ca.crt").read_bytes() == root for name in before)  # their copies
    assert run(capsys, "--check")[0] == 0


def test_new_devices_are_added_and_existing_kept(generated_lab: LabEnv, capsys: pytest.CaptureFixture[str]) -> None:
    before = serials(generated_lab)
    code, out, _ = run(capsys, "--devices", "device001,device003")
    assert code == 0 and "device003      created" in out and "device001      kept" in out
    assert serials(generated_lab) == before
    assert (generated_lab.certs_dir / "device003" / "root_ca.crt").exists()


# -- the passphrase and file safety -----------------------------------------------------------------


def test_wrong_passphrase_changes_nothing_and_exits_2(
    generated_lab: LabEnv, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    replace_leaf(generated_lab, "device001", days=5)  # would be renewed with the right passphrase
    (generated_lab.certs_dir / "device002" / "device002.crt").unlink()  # would be created
    before = generated_lab.snapshot()
    monkeypatch.setenv("CA_PASSPHRASE", "not-the-passphrase")
    code, out, err = run(capsys)
    assert code == 2
    assert "does not unlock" in err and "Nothing was written" in err
    assert "Traceback" not in out + err and "not-the-passphrase" not in out + err
    assert generated_lab.snapshot() == before
    monkeypatch.setenv("CA_PASSPHRASE", "")
    code, _, err = run(capsys)
    assert code == 2 and generated_lab.snapshot() == before


def test_missing_passphrase_on_a_new_lab_is_a_clear_error(
    lab_env: LabEnv, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CA_PASSPHRASE")
    code, _, err = run(capsys)
    assert code == 2 and "CA_PASSPHRASE is not set" in err and "./setup.sh" in err
    assert not (lab_env.certs_dir / "root_ca").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("CERT_DAYS", "a year", "CERT_DAYS"),
        ("KEY_TYPE", "dsa", "KEY_TYPE"),
        ("DEVICES", "ok,../../etc", "device id"),
        ("RENEW_BEFORE_DAYS", "400", "RENEW_BEFORE_DAYS"),
    ],
)
def test_bad_settings_exit_2_with_the_setting_named(
    lab_env: LabEnv,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(key, value)
    code, out, err = run(capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (lab_env.certs_dir / "root_ca").exists()


def test_keys_are_private_and_the_ca_key_is_encrypted(generated_lab: LabEnv) -> None:
    certs = generated_lab.certs_dir
    for name in ["root_ca", *LEAVES]:
        folder = certs / name
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, name
        key_file = folder / f"{name}.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, name
    ca_key = (certs / "root_ca" / "root_ca.key").read_bytes()
    assert ca_key.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(WrongPassphrase):
        load_private_key(ca_key, None)
    with pytest.raises(WrongPassphrase):
        load_private_key(ca_key, "guess")
    assert load_private_key(ca_key, generated_lab.passphrase) is not None
    # No temp files left behind by the atomic writes.
    assert not [p for p in certs.rglob("*.tmp")]


# -- --out ------------------------------------------------------------------------------------------


def test_out_flag_writes_elsewhere(lab_env: LabEnv, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "elsewhere"
    assert run(capsys, "--out", str(out_dir), "--devices", "d1")[0] == 0
    assert (out_dir / "d1" / "d1.crt").exists() and not lab_env.certs_dir.exists()
    assert run(capsys, "--out", str(out_dir), "--devices", "d1", "--check")[0] == 0

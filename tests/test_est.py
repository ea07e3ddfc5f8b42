"""EST (RFC 7030) with clients no project code wrote: curl and openssl, the commands the README shows."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from flask import Flask

from ca.server import CAHttpsServer
from pki.config import ConfigError, Settings
from pki.service import CAService

from .ca_support import issue_aged_certificate, lab_state
from .conftest import LabEnv
from .support import Broker, ThermometerProcess, free_port, start_ca_service, wait_for
from .test_thermometer import device_env


@dataclass
class EST:
    """The CA's HTTPS endpoint over the test app's CAService, and a work folder for curl and openssl."""

    lab: LabEnv
    service: CAService
    base: str
    work: Path

    def sh(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`command` in bash, in the work folder; $ROOT is the lab's root certificate."""
        result = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + command],
            cwd=self.work,
            text=True,
            capture_output=True,
            timeout=60,
            env={**os.environ, "ROOT": str(self.lab.root_cert)},
        )
        if check:
            assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    def token(self, name: str) -> str:
        reply = self.service.issue_token({"name": name, "pass": self.lab.passphrase}, source="test")
        assert reply.status == 201, reply.body
        return reply.body["token"]

    def csr(self, name: str, stem: str) -> None:
        """`openssl req` -> base64: the key in <stem>.key, the request in <stem>.b64."""
        self.sh(
            f"openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {stem}.key "
            f"-subj /CN={shlex.quote(name)} -outform DER | base64 > {stem}.b64"
        )

    def enrol(self, user: str, secret: str, stem: str, *, extra: str = "") -> tuple[int, str]:
        """curl simpleenroll (or `extra` curl options); (HTTP status, headers). 200: <stem>.crt holds the cert."""
        result = self.sh(
            f"curl -sS --cacert $ROOT -u {shlex.quote(user + ':' + secret)} --data-binary @{stem}.b64 "
            f"-H 'Content-Type: application/pkcs10' -D {stem}.headers -o {stem}.p7.b64 -w '%{{http_code}}' "
            f"{extra} {self.base}/simpleenroll"
        )
        return int(result.stdout), (self.work / f"{stem}.headers").read_text()

    def reenrol(self, cert: str, key: str, stem: str) -> int:
        result = self.sh(
            f"curl -sS --cacert $ROOT --cert {cert} --key {key} --data-binary @{stem}.b64 "
            f"-H 'Content-Type: application/pkcs10' -o {stem}.p7.b64 -w '%{{http_code}}' {self.base}/simplereenroll"
        )
        return int(result.stdout)

    def unpack(self, stem: str) -> x509.Certificate:
        """`base64 -d` -> `openssl pkcs7 -print_certs` -> <stem>.crt."""
        self.sh(f"base64 -d {stem}.p7.b64 | openssl pkcs7 -inform DER -print_certs -out {stem}.crt")
        return x509.load_pem_x509_certificate((self.work / f"{stem}.crt").read_bytes())


@pytest.fixture
def est(app: Flask, generated_lab: LabEnv, tmp_path: Path) -> Iterator[EST]:
    server = CAHttpsServer(app.extensions["test_ca"].service, generated_lab.settings(), port=0).start()
    work = tmp_path / "client"
    work.mkdir()
    try:
        yield EST(
            generated_lab, app.extensions["test_ca"].service, f"https://localhost:{server.port}/.well-known/est", work
        )
    finally:
        server.stop()


def test_cacerts_gives_the_root(est: EST) -> None:
    est.sh(
        f"curl -sS --cacert $ROOT {est.base}/cacerts | base64 -d | "
        "openssl pkcs7 -inform DER -print_certs -out cacerts.pem"
    )
    got = x509.load_pem_x509_certificates((est.work / "cacerts.pem").read_bytes())
    assert got == [x509.load_pem_x509_certificate(est.lab.root_cert.read_bytes())]
    headers = est.sh(f"curl -sS --cacert $ROOT -D - -o /dev/null {est.base}/cacerts").stdout.lower()
    assert "content-type: application/pkcs7-mime; smime-type=certs-only" in headers
    assert "content-transfer-encoding: base64" in headers


def test_csrattrs_asks_for_ecdsa_with_sha256(est: EST) -> None:
    out = est.sh(f"curl -sS --cacert $ROOT {est.base}/csrattrs | base64 -d | openssl asn1parse -inform DER")
    assert "ecdsa-with-SHA256" in out.stdout


def test_simpleenroll_with_a_token_issues_a_client_certificate_that_connects_to_the_broker(
    est: EST, broker: Broker
) -> None:
    est.csr("est-device1", "dev")
    status, headers = est.enrol("est-device1", est.token("est-device1"), "dev")
    assert status == 200, (est.work / "dev.p7.b64").read_text()
    assert "content-type: application/pkcs7-mime; smime-type=certs-only" in headers.lower()
    cert = est.unpack("dev")
    est.sh("openssl verify -CAfile $ROOT -purpose sslclient dev.crt")
    assert est.sh("openssl verify -CAfile $ROOT -purpose sslserver dev.crt", check=False).returncode != 0
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "est-device1"
    (record,) = est.service.inventory.list(name="est-device1")
    assert (record.issued_via, record.role, record.status) == ("est", "device", "active")
    # The certificate and its key (made by openssl, never seen by the CA) log in to the real broker.
    est.sh(
        f"mosquitto_pub -h localhost -p {broker.port} --cafile $ROOT --cert dev.crt --key dev.key "
        "-i est-device1 -q 1 -t iot/thermometer/est-device1/temperature -m '{\"temperature\": 21.5}'"
    )


def test_a_reused_or_wrong_token_gets_401_and_nothing_is_written(est: EST) -> None:
    token = est.token("est-device2")
    est.csr("est-device2", "first")
    assert est.enrol("est-device2", token, "first")[0] == 200
    before = lab_state(est.lab)
    est.csr("est-device2", "again")
    for user, secret in (("est-device2", token), ("est-device2", "not-a-token"), ("est-device2", token + "x")):
        status, headers = est.enrol(user, secret, "again")
        assert status == 401, (user, (est.work / "again.p7.b64").read_text())
        assert 'www-authenticate: basic realm="iot-ca-est"' in headers.lower()
    # No credential at all: 401 with the challenge too.
    no_auth = est.sh(
        f"curl -sS --cacert $ROOT --data-binary @again.b64 -H 'Content-Type: application/pkcs10' "
        f"-D - -o /dev/null {est.base}/simpleenroll"
    ).stdout.lower()
    assert no_auth.startswith("http/1.1 401") and "www-authenticate: basic" in no_auth
    assert lab_state(est.lab) == before


def test_a_token_enrols_only_its_own_name(est: EST) -> None:
    """A token holder cannot get a certificate for another name, by the user name nor by the CSR's CN."""
    token = est.token("est-device3")
    before = lab_state(est.lab)
    est.csr("victim", "victim")
    assert est.enrol("victim", token, "victim")[0] == 401  # the token is bound to est-device3
    assert est.enrol("est-device3", token, "victim")[0] == 400  # CSR CN victim under user est-device3
    est.csr("dashboard", "protected")
    assert est.enrol("dashboard", token, "protected")[0] == 409  # the lab's own identities are never issued
    assert lab_state(est.lab) == before
    est.csr("est-device3", "own")
    assert est.enrol("est-device3", token, "own")[0] == 200  # still unused: every refusal above wrote nothing


def test_the_ca_passphrase_also_enrols(est: EST) -> None:
    est.csr("collector7", "c7")
    assert est.enrol("collector7", est.lab.passphrase, "c7")[0] == 200
    est.unpack("c7")
    est.sh("openssl verify -CAfile $ROOT -purpose sslclient c7.crt")


def test_bad_requests_get_400_and_415(est: EST) -> None:
    token = est.token("est-device4")
    before = lab_state(est.lab)
    (est.work / "junk.b64").write_text("this is not base64 DER!\n")
    assert est.enrol("est-device4", token, "junk")[0] == 400
    est.sh("printf 'hello' | base64 > notcsr.b64")
    assert est.enrol("est-device4", token, "notcsr")[0] == 400
    est.csr("est-device4", "dev")
    assert est.enrol("est-device4", token, "dev", extra="-H 'Content-Type: application/json'")[0] == 415
    assert lab_state(est.lab) == before


def test_simplereenroll_with_the_current_certificate_and_not_with_a_superseded_or_revoked_one(est: EST) -> None:
    est.csr("est-device5", "v1")
    assert est.enrol("est-device5", est.token("est-device5"), "v1")[0] == 200
    first = est.unpack("v1")
    # Renewal: the current certificate and its key as the TLS client credential, a CSR for a new key.
    est.csr("est-device5", "v2")
    assert est.reenrol("v1.crt", "v1.key", "v2") == 200
    second = est.unpack("v2")
    est.sh("openssl verify -CAfile $ROOT -purpose sslclient v2.crt")
    assert second.serial_number != first.serial_number and second.subject == first.subject
    # The superseded certificate cannot renew again (it would fork the identity).
    before = lab_state(est.lab)
    est.csr("est-device5", "v3")
    assert est.reenrol("v1.crt", "v1.key", "v3") == 403
    # Without a client certificate: 401; and with the current certificate the CSR must be for a new key.
    assert (
        int(
            est.sh(
                f"curl -sS --cacert $ROOT --data-binary @v3.b64 -H 'Content-Type: application/pkcs10' "
                f"-o /dev/null -w '%{{http_code}}' {est.base}/simplereenroll"
            ).stdout
        )
        == 401
    )
    (est.work / "same.b64").write_bytes((est.work / "v2.b64").read_bytes())
    assert est.reenrol("v2.crt", "v2.key", "same") == 400
    assert lab_state(est.lab) == before
    # Revoked: refused too.
    assert est.service.revoke({"name": "est-device5", "pass": est.lab.passphrase}, source="test").ok
    before = lab_state(est.lab)
    assert est.reenrol("v2.crt", "v2.key", "v3") == 403
    assert lab_state(est.lab) == before


def test_a_certificate_from_another_ca_is_refused_by_tls(est: EST, tmp_path: Path) -> None:
    est.sh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout rogue.key -out rogue.crt "
        "-subj /CN=est-device6 -days 1"
    )
    est.csr("est-device6", "new")
    result = est.sh(
        f"curl -sS --cacert $ROOT --cert rogue.crt --key rogue.key --data-binary @new.b64 "
        f"-H 'Content-Type: application/pkcs10' {est.base}/simplereenroll",
        check=False,
    )
    assert result.returncode != 0  # the handshake fails: the server verifies offered certificates against the root


def test_a_thermometer_enrols_and_renews_by_est(
    est: EST, broker: Broker, start_thermometer: Callable[..., ThermometerProcess], tmp_path: Path
) -> None:
    # First enrolment: a new device with only the root pinned and a token; ENROL=est.
    folder = tmp_path / "est-therm"
    folder.mkdir()
    shutil.copy(est.lab.root_cert, folder / "root_ca.crt")
    files = {
        "CA_CERT_PATH": str(folder / "root_ca.crt"),
        "CLIENT_CERT_PATH": str(folder / "est-therm.crt"),
        "CLIENT_KEY_PATH": str(folder / "est-therm.key"),
    }
    env = device_env(
        est.lab,
        "est-therm",
        ENROL="est",
        EST_URL=est.base,
        ENROL_TOKEN=est.token("est-therm"),
        RENEW_CHECK_INTERVAL="0",
        **files,
    )
    thermometer = start_thermometer(env)
    thermometer.wait_output("est-therm connected to localhost")
    (record,) = est.service.inventory.list(name="est-therm")
    assert record.issued_via == "est" and (folder / "est-therm.key").stat().st_mode & 0o777 == 0o600
    thermometer.terminate()
    # Renewal: a device inside its renewal window renews by simplereenroll (--enrol est), not over MQTT.
    aged = issue_aged_certificate(est.lab, "device002", days=365, days_left=10)
    renewing = start_thermometer(
        device_env(est.lab, "device002", EST_URL=est.base, RENEW_CHECK_INTERVAL="1"), "--enrol", "est"
    )
    renewing.wait_output("renewed the certificate", timeout=30)
    renewing.wait_output("device002 connected to localhost")
    current = est.service.inventory.current("device002")
    assert current is not None and current.serial != f"{aged.serial_number:x}"
    assert current.requester == "est:device002"


def test_wrong_secrets_lock_the_source_out(est: EST) -> None:
    """Guessing tokens or the passphrase over EST counts towards the same lockout as v1/ssl: 429 after five."""
    token = est.token("est-device7")
    est.csr("est-device7", "dev")
    for attempt in range(5):
        assert est.enrol("est-device7", f"guess-{attempt}", "dev")[0] == 401
    before = lab_state(est.lab)
    status, headers = est.enrol("est-device7", token, "dev")
    assert status == 429 and "retry-after:" in headers.lower()
    assert lab_state(est.lab) == before


def test_a_silent_client_does_not_stall_the_endpoint(est: EST) -> None:
    """A local process that connects and never starts TLS holds one connection, not the whole endpoint."""
    port = int(est.base.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port)):
        est.sh(f"curl -sS --max-time 10 --cacert $ROOT -o /dev/null {est.base}/cacerts")


def test_python_m_ca_serves_est_and_acme_on_ca_https_port(generated_lab: LabEnv, tmp_path: Path) -> None:
    """The CA service's entry point (`python -m ca`) starts the CA's HTTPS endpoint; SIGTERM stops it cleanly."""
    port = free_port()
    log_path = tmp_path / "ca.log"
    process, _ = start_ca_service(generated_lab.env, log_path, port)
    try:
        wait_for(
            lambda: process.poll() is None and f"EST and ACME on https://127.0.0.1:{port}/" in log_path.read_text(),
            timeout=20,
            what=f"the EST/ACME line; log:\n{log_path.read_text()}",
        )
        root = generated_lab.certs_dir / "root_ca" / "root_ca.crt"
        for path in ("/.well-known/est/cacerts", "/acme/directory"):
            result = subprocess.run(
                ["curl", "-sS", "--fail", "--cacert", str(root), f"https://localhost:{port}{path}", "-o", "/dev/null"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert result.returncode == 0, result.stderr
    finally:
        process.terminate()
        code = process.wait(timeout=20)
    assert code == 0, log_path.read_text()


@pytest.mark.parametrize(
    "key, value",
    [
        ("CA_HTTPS_PORT", "70000"),
        ("ACME_HTTP01_PORT", "0"),
        ("ACME_ALLOWED_NAMES", "*.example.com"),
        ("ACME_ALLOWED_NAMES", "a b"),
    ],
)
def test_bad_ca_https_settings_are_clear_errors(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        Settings.from_env({key: value})

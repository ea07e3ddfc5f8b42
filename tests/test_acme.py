"""ACME (RFC 8555) with Debian's certbot, the commands the README shows; and what an ACME client may not do."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import josepy as jose
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from flask import Flask

from ca.acme import AcmeJWS
from ca.server import CAHttpsServer
from pki.service import CAService

from .ca_support import lab_state, make_csr
from .conftest import LabEnv
from .support import ThermometerProcess, free_port, wait_for
from .test_thermometer import device_env

CERTBOT = shutil.which("certbot")


@pytest.fixture(autouse=True)
def _certbot_present() -> None:
    if CERTBOT is None:
        if os.environ.get("CI"):
            pytest.fail("certbot is not installed (./setup.sh test installs Debian's certbot)")
        pytest.skip("certbot is not installed: ./setup.sh test installs it")


@dataclass
class ACME:
    lab: LabEnv
    service: CAService
    directory: str
    http01_port: int
    work: Path

    def certbot(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """certbot with temporary dirs, trusting the lab root for its requests (REQUESTS_CA_BUNDLE)."""
        dirs = [
            "--config-dir",
            str(self.work / "config"),
            "--work-dir",
            str(self.work / "work"),
            "--logs-dir",
            str(self.work / "logs"),
        ]
        assert CERTBOT is not None
        result = subprocess.run(
            [CERTBOT, *args, *dirs],
            text=True,
            capture_output=True,
            timeout=120,
            env={**os.environ, "REQUESTS_CA_BUNDLE": str(self.lab.root_cert)},
            stdin=subprocess.DEVNULL,
        )
        if check:
            assert result.returncode == 0, f"certbot {args}\n{result.stdout}\n{result.stderr}\n{self.log()}"
        return result

    def certonly(self, name: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.certbot(
            "certonly",
            "--standalone",
            "--server",
            self.directory,
            "-d",
            name,
            "--http-01-port",
            str(self.http01_port),
            "--agree-tos",
            "--register-unsafely-without-email",
            check=check,
        )

    def live(self, name: str, file: str = "cert.pem") -> Path:
        return self.work / "config" / "live" / name / file

    def log(self) -> str:
        path = self.work / "logs" / "letsencrypt.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def openssl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", *args], text=True, capture_output=True, timeout=30)


@pytest.fixture
def acme(app: Flask, generated_lab: LabEnv, tmp_path: Path) -> Iterator[ACME]:
    http01 = free_port()
    settings = generated_lab.settings(ACME_HTTP01_PORT=str(http01))
    server = CAHttpsServer(app.extensions["test_ca"].service, settings, port=0).start()
    work = tmp_path / "certbot"
    work.mkdir()
    try:
        yield ACME(
            generated_lab,
            app.extensions["test_ca"].service,
            f"https://localhost:{server.port}/acme/directory",
            http01,
            work,
        )
    finally:
        server.stop()


def test_certbot_issues_renews_and_revokes_a_server_certificate(acme: ACME) -> None:
    acme.certonly("localhost")
    verify = acme.openssl(
        "verify", "-CAfile", str(acme.lab.root_cert), "-purpose", "sslserver", str(acme.live("localhost"))
    )
    assert verify.returncode == 0, verify.stderr
    first = x509.load_pem_x509_certificate(acme.live("localhost").read_bytes())
    san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = first.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert [oid.dotted_string for oid in eku] == ["1.3.6.1.5.5.7.3.1"]  # serverAuth only: not a client identity
    record = acme.service.inventory.by_serial(f"{first.serial_number:x}")
    assert record is not None and (record.role, record.issued_via) == ("server", "acme")

    # certbot's own renewal, at once (no random sleep, the certificate is not due yet).
    acme.certbot("renew", "--force-renewal", "--no-random-sleep-on-renew")
    second = x509.load_pem_x509_certificate(acme.live("localhost").read_bytes())
    assert second.serial_number != first.serial_number
    assert acme.service.inventory.by_serial(f"{first.serial_number:x}").status == "superseded"

    # certbot revoke: the serial is on the CRL the broker loads.
    acme.certbot(
        "revoke",
        "--server",
        acme.directory,
        "--cert-path",
        str(acme.live("localhost")),
        "--non-interactive",
        "--no-delete-after-revoke",
    )
    crl = x509.load_pem_x509_crl(acme.service.crl_pem())
    assert crl.get_revoked_certificate_by_serial_number(second.serial_number) is not None
    assert acme.service.inventory.by_serial(f"{second.serial_number:x}").status == "revoked"


def test_a_name_outside_the_allow_list_is_refused(acme: ACME) -> None:
    before = lab_state(acme.lab)
    result = acme.certonly("example.com", check=False)
    assert result.returncode != 0
    assert "urn:ietf:params:acme:error:rejectedIdentifier" in acme.log()
    assert not acme.live("example.com").exists()
    assert lab_state(acme.lab) == before


def test_mosquitto_runs_on_the_acme_certificate_and_a_thermometer_connects(
    acme: ACME, start_thermometer: Callable[..., ThermometerProcess]
) -> None:
    acme.certonly("localhost")
    conf = (acme.lab.certs_dir / "mosquitto" / "mosquitto.conf").read_text()
    port = free_port()
    conf = re.sub(r"^listener \d+", f"listener {port}", conf, flags=re.M)
    conf = re.sub(r"^certfile .*$", f"certfile {acme.live('localhost', 'fullchain.pem')}", conf, flags=re.M)
    conf = re.sub(r"^keyfile .*$", f"keyfile {acme.live('localhost', 'privkey.pem')}", conf, flags=re.M)
    conf = re.sub(r"^pid_file .*$", f"pid_file {acme.work / 'mosquitto.pid'}", conf, flags=re.M)
    conf = re.sub(r"^persistence true$", "persistence false", conf, flags=re.M)
    conf_path = acme.work / "mosquitto-acme.conf"
    conf_path.write_text(conf)
    log = open(acme.work / "mosquitto.log", "wb")  # noqa: SIM115 - handed to the child
    broker = subprocess.Popen(
        [os.environ.get("MOSQUITTO_BIN") or "mosquitto", "-c", str(conf_path)], stdout=log, stderr=log
    )
    log.close()
    try:
        wait_for(lambda: _accepting(port, broker), timeout=10, what="mosquitto on the ACME certificate")
        # The broker really presents the ACME certificate.
        shown = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"localhost:{port}",
                "-CAfile",
                str(acme.lab.root_cert),
                "-verify_return_error",
                "-verify_hostname",
                "localhost",
            ],
            input="",
            text=True,
            capture_output=True,
            timeout=30,
        )
        issued = x509.load_pem_x509_certificate(acme.live("localhost").read_bytes())
        assert _peer_serial(shown.stdout) == issued.serial_number, shown.stdout + shown.stderr
        thermometer = start_thermometer(device_env(acme.lab, BROKER_PORT=str(port), BROKER_ADDRESS="localhost"))
        thermometer.wait_output("device001 connected to localhost")
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def _accepting(port: int, process: subprocess.Popen[bytes]) -> bool:
    assert process.poll() is None, "mosquitto exited"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _peer_serial(s_client_output: str) -> int | None:
    match = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", s_client_output, re.S)
    return x509.load_pem_x509_certificate(match.group(0).encode()).serial_number if match else None


# -- what an ACME client may not do (a small JWS client on josepy, as an attacker would write it) -----------


class Client:
    def __init__(self, acme: ACME) -> None:
        self.acme = acme
        self.session = requests.Session()
        self.session.verify = str(acme.lab.root_cert)
        self.session.trust_env = False
        self.directory = self.session.get(acme.directory, timeout=10).json()
        self.key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        self.kid: str | None = None

    def nonce(self) -> str:
        return self.session.head(self.directory["newNonce"], timeout=10).headers["Replay-Nonce"]

    def post(
        self,
        url: str,
        payload: Any,
        *,
        nonce: str | None = None,
        signed_url: str | None = None,
        use_jwk: bool = False,
        alg: jose.JWASignature = jose.ES256,
        key: jose.JWK | None = None,
    ) -> requests.Response:
        protected = {"nonce", "url", "alg", "jwk" if use_jwk or self.kid is None else "kid"}
        extra = {"kid": self.kid} if "kid" in protected else {}
        body = b"" if payload is None else json.dumps(payload).encode()
        jws = AcmeJWS.sign(
            body,
            key=key or self.key,
            alg=alg,
            nonce=nonce or self.nonce(),
            url=signed_url or url,
            include_jwk="jwk" in protected,
            protect=frozenset(protected),
            **extra,
        )
        return self.session.post(
            url, data=jws.json_dumps(), headers={"Content-Type": "application/jose+json"}, timeout=30
        )

    def register(self) -> Client:
        response = self.post(self.directory["newAccount"], {"termsOfServiceAgreed": True}, use_jwk=True)
        assert response.status_code == 201, response.text
        self.kid = response.headers["Location"]
        return self


def test_jws_checks_nonce_url_algorithm_and_ownership(acme: ACME) -> None:
    alice, mallory = Client(acme).register(), Client(acme).register()
    order = alice.post(alice.directory["newOrder"], {"identifiers": [{"type": "dns", "value": "localhost"}]})
    assert order.status_code == 201, order.text
    order_url = order.headers["Location"]
    # A used nonce: badNonce.
    nonce = alice.nonce()
    assert alice.post(order_url, None, nonce=nonce).status_code == 200
    replay = alice.post(order_url, None, nonce=nonce)
    assert (replay.status_code, replay.json()["type"]) == (400, "urn:ietf:params:acme:error:badNonce")
    # A JWS signed for another URL (replayed elsewhere): unauthorized.
    moved = alice.post(order_url, None, signed_url=alice.directory["newOrder"])
    assert moved.status_code == 401
    # Another account's kid cannot read the order or its authorizations.
    assert mallory.post(order_url, None).status_code == 404
    authz_url = order.json()["authorizations"][0]
    assert mallory.post(authz_url, None).status_code == 404
    # Signed with a key other than the account's: the signature does not verify.
    forged = alice.post(order_url, None, key=mallory.key)
    assert forged.status_code == 400 and forged.json()["type"] == "urn:ietf:params:acme:error:malformed"
    # An HMAC "signature" (alg HS256, keyed with anything): refused.
    hmac_key = jose.JWKOct(key=b"k" * 32)
    hs = alice.post(order_url, None, alg=jose.HS256, key=hmac_key)
    assert hs.status_code == 400 and hs.json()["type"] == "urn:ietf:params:acme:error:badSignatureAlgorithm"
    # Finalizing before the challenge is valid: orderNotReady, nothing issued.
    before = lab_state(acme.lab)
    csr_pem, _key = make_csr("localhost", dns=["localhost"])
    csr_der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(Encoding.DER)
    early = alice.post(order.json()["finalize"], {"csr": jose.b64.b64encode(csr_der).decode()})
    assert early.status_code == 403 and early.json()["type"] == "urn:ietf:params:acme:error:orderNotReady"
    # An unanswered http-01 challenge fails validation: the order becomes invalid.
    challenge = alice.post(authz_url, None).json()["challenges"][0]
    answered = alice.post(challenge["url"], {})
    assert answered.json()["status"] == "invalid"
    assert alice.post(order_url, None).json()["status"] == "invalid"
    assert lab_state(acme.lab) == before  # no certificate issued, no file written


def test_only_the_ordering_account_or_the_certificate_key_may_revoke(acme: ACME) -> None:
    alice, mallory = Client(acme).register(), Client(acme).register()
    created = alice.post(alice.directory["newOrder"], {"identifiers": [{"type": "dns", "value": "localhost"}]})
    order, order_url = created.json(), created.headers["Location"]
    challenge = alice.post(order["authorizations"][0], None).json()["challenges"][0]
    answer = f"{challenge['token']}.{jose.b64.b64encode(alice.key.thumbprint()).decode()}".encode()
    with _serving(acme.http01_port, f"/.well-known/acme-challenge/{challenge['token']}", answer):
        assert alice.post(challenge["url"], {}).json()["status"] == "valid"
    cert_key = ec.generate_private_key(ec.SECP256R1())
    csr_pem, _ = make_csr("localhost", cert_key, dns=["localhost"])
    csr_der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(Encoding.DER)
    done = alice.post(order["finalize"], {"csr": jose.b64.b64encode(csr_der).decode()}).json()
    assert done["status"] == "valid", done
    chain = alice.post(done["certificate"], None)
    assert chain.headers["Content-Type"] == "application/pem-certificate-chain"
    cert = x509.load_pem_x509_certificates(chain.content)[0]
    der = jose.b64.b64encode(cert.public_bytes(Encoding.DER)).decode()
    assert mallory.post(done["certificate"], None).status_code == 404  # not hers to download
    account = alice.post(alice.kid, None).json()
    orders = alice.post(account["orders"], None).json()["orders"]
    assert orders == [order_url] and mallory.post(account["orders"], None).status_code == 403
    before = lab_state(acme.lab)
    refused = mallory.post(alice.directory["revokeCert"], {"certificate": der})
    assert (refused.status_code, refused.json()["type"]) == (403, "urn:ietf:params:acme:error:unauthorized")
    stranger = mallory.post(alice.directory["revokeCert"], {"certificate": der}, use_jwk=True)
    assert stranger.status_code == 403  # a key that is not the certificate's
    assert lab_state(acme.lab) == before
    # The certificate's own key (jwk) may revoke it, with a reason.
    holder = Client(acme)
    revoked = holder.post(
        alice.directory["revokeCert"], {"certificate": der, "reason": 1}, use_jwk=True, key=jose.JWKEC(key=cert_key)
    )
    assert revoked.status_code == 200, revoked.text
    record = acme.service.inventory.by_serial(f"{cert.serial_number:x}")
    assert (record.status, record.revocation_reason) == ("revoked", "keyCompromise")
    again = alice.post(alice.directory["revokeCert"], {"certificate": der})
    assert again.json()["type"] == "urn:ietf:params:acme:error:alreadyRevoked"


@contextlib.contextmanager
def _serving(port: int, path: str, body: bytes) -> Iterator[None]:
    """A throwaway http-01 responder on 127.0.0.1 (what certbot --standalone does)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            found = self.path == path
            self.send_response(200 if found else 404)
            self.end_headers()
            if found:
                self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()

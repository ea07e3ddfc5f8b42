"""Helpers for the CA service tests: CSRs, checking an issued reply, proving nothing was written, apps."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import secrets
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import strategies as st
from sqlalchemy import select
from werkzeug.serving import BaseWSGIServer, make_server

from ca.process import CAProcess, CAProcessOptions
from dashboard import create_app, shutdown, start
from dashboard.openapi import SEED_CREATE
from pki.authority import (
    CertificateAuthority,
    PrivateKey,
    generate_private_key,
    load_certificate,
    load_private_key,
    public_key_matches,
)
from pki.authority import verify_leaf as signed_by
from pki.broker import DYNSEC_TOPIC, disconnect_command
from pki.config import Settings
from pki.entity_files import EntityFiles
from pki.inventory import CertificateRecord, EnrolmentToken, Inventory
from pki.profiles import DEVICE
from pki.requests import readable_name
from pki.service import CAService
from pki.store import CertsLayout

from .conftest import LabEnv
from .support import Collector

ISSUED_FIELDS = {"name", "ca", "crt", "key", "serial", "not_after"}


def seed_create_body(name: str, passphrase: str, *, cn: str, **fields: Any) -> dict[str, Any]:
    """The seed's full /v1/ssl/create body (SEED_CREATE, the API document's example) for `name`, with the lab's
    passphrase and `cn`; `fields` override any other."""
    return {**SEED_CREATE, "name": name, "pass": passphrase, "cn": cn, **fields}


def make_csr(
    cn: str,
    key: PrivateKey | None = None,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    emails: Sequence[str] = (),
    extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
    subject: x509.Name | None = None,
) -> tuple[str, PrivateKey]:
    """A PEM CSR (and its key) as a device would make it, optionally asking for SANs and other extensions."""
    key = key or generate_private_key("ec")
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    names += [x509.RFC822Name(e) for e in emails]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.PEM).decode(), key


def check_issued(
    body: dict[str, Any], key: PrivateKey | None = None, *, tmp_path: Path | None = None, csr_key_unknown: bool = False
) -> x509.Certificate:
    """The reply has the contract's shape, its crt is signed by its ca, and matches its key (or `key`).

    `csr_key_unknown`: a CSR was signed whose key the test does not hold (generated input); skip that check.
    """
    assert set(body) <= ISSUED_FIELDS and ISSUED_FIELDS - {"key"} <= set(body), sorted(body)
    ca = load_certificate(body["ca"].encode())
    cert = load_certificate(body["crt"].encode())
    assert signed_by(ca, cert)
    assert format(cert.serial_number, "x") == body["serial"]
    assert cert.not_valid_after_utc.isoformat() == body["not_after"]
    if key is None and "key" not in body:
        assert csr_key_unknown, "no key in the reply and none given"
    else:
        assert public_key_matches(cert, key or load_private_key(body["key"].encode()))
    if tmp_path is not None:  # and OpenSSL agrees, strictly
        (tmp_path / "ca.pem").write_text(body["ca"])
        (tmp_path / "crt.pem").write_text(body["crt"])
        result = subprocess.run(
            ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "crt.pem")],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    return cert


def issue_aged_certificate(lab: LabEnv, name: str, *, days: int = 365, days_left: float = 10) -> x509.Certificate:
    """A genuine `days`-long device certificate from the lab's CA, issued long enough ago that `days_left` remain.

    Written to certs/<name>/ (key 0600) and recorded in the inventory as the entity's current certificate, as if
    the device had been running for most of its certificate's life: inside the renewal window, yet a renewal
    (which keeps the lifetime) gives a certificate that is plainly valid.
    """
    root = lab.certs_dir / "root_ca"
    ca = CertificateAuthority.load(
        (root / "root_ca.crt").read_bytes(), (root / "root_ca.key").read_bytes(), lab.passphrase
    )
    key = generate_private_key("ec")
    issued_at = dt.datetime.now(dt.UTC) - dt.timedelta(days=days - days_left)
    cert = ca.issue(key.public_key(), DEVICE, name, days=days, now=issued_at)
    EntityFiles(CertsLayout(lab.certs_dir)).write(name, cert, ca.cert_pem, key)
    inventory = Inventory(lab.settings().effective_database_url)
    try:
        inventory.record_issued(cert, name=name, role=DEVICE.role, via="cli")
    finally:
        inventory.close()
    return cert


def certs_state(lab: LabEnv) -> dict[str, tuple[bytes, int, int]]:
    """Every file under certs/: bytes, mode, mtime."""
    state = {}
    for path in sorted(lab.certs_dir.rglob("*")):
        if path.is_file() and path.name != ".lock":
            st = path.stat()
            state[str(path.relative_to(lab.certs_dir))] = (path.read_bytes(), st.st_mode, st.st_mtime_ns)
    return state


def inventory_state(lab: LabEnv) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every inventory row and token, as plain tuples."""
    inventory = Inventory(lab.settings().effective_database_url)
    try:
        with inventory.session() as session:
            rows = [
                (r.serial, r.name, r.status, r.revoked_at, r.issued_via)
                for r in session.scalars(select(CertificateRecord).order_by(CertificateRecord.id))
            ]
            tokens = [(t.token_sha256, t.used_at) for t in session.scalars(select(EnrolmentToken))]
        return rows, tokens
    finally:
        inventory.close()


def lab_state(lab: LabEnv) -> tuple[Any, ...]:
    return certs_state(lab), inventory_state(lab)


def api_token(app: Flask, role: str = "viewer", label: str = "tests") -> str:
    """A new API token of `role`, made as `python -m dashboard.users token` makes one (shown once)."""
    _, secret = app.extensions["users"].create_token(label, role)
    return secret


def revoke_in_process(lab: LabEnv, name: str) -> None:
    """Revoke `name` with a CA service in this process, as the CA API would."""
    service = CAService(lab.settings())
    try:
        assert service.revoke({"name": name, "pass": lab.passphrase}, source="test").ok
    finally:
        service.close()


def disconnect_as_the_ca(lab: LabEnv, port: int, name: str) -> None:
    """Close `name`'s open connection as ca/revocation.py does: a dynamic-security disconnect, as `ca-1`."""
    ca = Collector(lab.certs_dir, "ca-1", port).connect()
    try:
        ca.publish(DYNSEC_TOPIC, disconnect_command(name))
    finally:
        ca.close()


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf[-_]token" (?:value|content)="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def login(client: FlaskClient, password: str, username: str = "admin") -> str:
    """Log `client` in through the login form, as a browser does; returns the session's CSRF token."""
    form = client.get("/login")
    assert form.status_code == 200
    response = client.post(
        "/login", data={"username": username, "password": password, "csrf_token": csrf_of(form.get_data(as_text=True))}
    )
    assert response.status_code == 302, response.get_data(as_text=True)[:500]
    page = client.get("/")
    assert page.status_code == 200
    return csrf_of(page.get_data(as_text=True))


def start_ca(
    lab: LabEnv,
    settings: Settings | None = None,
    *,
    mqtt: bool = False,
    crl_interval: float = 0,
    name: str = "ca-1",
    secret: str | None = None,
) -> CAProcess:
    """A CA service replica in this process (as `python -m ca` runs one): internal API on a free port, its own
    MQTT connection as `name` when `mqtt` (connecting in the background); EST/ACME off (their tests start
    CAHttpsServer themselves)."""
    options = CAProcessOptions(mqtt=mqtt, https_port=0, crl_interval=crl_interval)
    return CAProcess(
        settings or lab.settings(), name=name, secret=secret or secrets.token_urlsafe(16), options=options
    ).start()


def make_app(lab: LabEnv, **config: Any) -> Flask:
    """The dashboard app, started as the serving process starts it (`dashboard.start`: MQTT only with
    MQTT_ENABLED=True), and the CA service replica it forwards /v1/ssl/* to (`app.extensions["test_ca"]`, for
    the tests' own inspection only: the dashboard itself knows just its URL and the shared secret)."""
    settings = config.get("LAB_SETTINGS") or lab.settings()
    mqtt = bool(config.get("MQTT_ENABLED", False))
    crl_interval = float(config.pop("CRL_REFRESH_SECONDS", 5 if mqtt else 0))
    secret = secrets.token_urlsafe(16)
    ca = start_ca(lab, settings, mqtt=mqtt, crl_interval=crl_interval, secret=secret)
    try:
        app = create_app(
            {
                "LAB_SETTINGS": settings,
                "MQTT_ENABLED": False,
                "TESTING": True,
                "CA_URLS": [ca.internal_url],
                "CA_INTERNAL_SECRET": secret,
                **config,
            }
        )
        app.extensions["test_ca"] = ca
        return start(app)
    except BaseException:
        ca.shutdown()
        raise


def mqtt_connected(app: Flask, timeout: float = 10) -> bool:
    """Both MQTT connections are up: the dashboard's and its CA replica's."""
    ca = ca_of(app)
    return app.extensions["mqtt_bridge"].wait_connected(timeout) and (
        ca.connection is None or ca.connection.wait_connected(timeout)
    )


def ca_of(app: Flask) -> CAProcess:
    """The CA replica started with this test app (make_app)."""
    return app.extensions["test_ca"]


def close_app(app: Flask) -> None:
    """Stop what `dashboard.start` started and release what create_app holds (`dashboard.shutdown`), then the
    app's CA replica."""
    shutdown(app)
    if "test_ca" in app.extensions:
        app.extensions["test_ca"].shutdown()


class BackgroundServer:
    """A server that runs on a daemon thread for the length of a `with` block: `serve` until `stop` is called."""

    def __init__(self) -> None:
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.thread.join(timeout=10)

    def serve(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class ServerThread(BackgroundServer):
    """The app behind a real threaded Werkzeug server on 127.0.0.1 (a free port)."""

    def __init__(self, app: Flask) -> None:
        self.server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.server_port
        super().__init__()

    def serve(self) -> None:
        self.server.serve_forever()

    def stop(self) -> None:
        self.server.shutdown()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def post_json(
    url: str, body: Any, timeout: float = 30, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST JSON with the standard library; returns (status, decoded body) for errors too."""
    assert url.startswith("http://127.0.0.1:")
    request = urllib.request.Request(  # noqa: S310
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http://127.0.0.1 only
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as ex:
        return ex.code, json.loads(ex.read())


# -- hypothesis strategies: arbitrary JSON, and request-like bodies with mostly plausible values ----------

RIGHT = "<the right passphrase>"
CSR_FOR_NAME = "<a CSR whose CN is the name>"
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=10,
)
fields = st.one_of(json_values, st.sampled_from(["", "360", "-1", "0", "1e9", "x" * 70, "BR", "a@b.example"]))
# Mostly plausible values, so that examples get past validation to the passphrase, lookup and signing steps.
names = st.one_of(
    st.sampled_from(["client", "device001", "device002", "AA:BB:CC:DD:EE:FF", "ghost", "dashboard", "Mosquitto"]),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_:-]{0,12}", fullmatch=True),
    st.sampled_from(["../../etc/passwd", "+", "#", "a/b", ""]),
    fields,
)
days = st.one_of(st.integers(1, 400), st.integers(-3, 4000), st.sampled_from(["360", " 30 ", "0", "ten"]), fields)
passes = st.one_of(st.just(RIGHT), st.just(RIGHT), st.text(max_size=10), fields)
optional = {
    "csr": st.one_of(st.just(CSR_FOR_NAME), fields),
    "token": fields,
    "country": fields,
    "state": fields,
    "locality": fields,
    "org": fields,
    "unit": fields,
    "cn": st.one_of(names, fields),
    "email": fields,
}
request_like = st.one_of(
    st.fixed_dictionaries({"name": names, "days": days, "pass": passes}, optional=optional),
    st.fixed_dictionaries({}, optional={"name": names, "days": days, "pass": passes, **optional}),
)


def concrete_body(body: Any, passphrase: str) -> Any:
    """Fill in the placeholders: the lab's passphrase, a real CSR for the body's name."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if body.get("pass") == RIGHT:
        body["pass"] = passphrase
    if body.get("csr") == CSR_FOR_NAME:
        name = readable_name(body)
        body["csr"] = make_csr(name)[0] if name else "junk"
    return body

"""Operator access in-process: what the logged out, viewers, operators, API tokens, other sites and guessers
can and cannot do. tests/test_browser.py does the same through real Chromium; this is the attacker's view."""

from __future__ import annotations

import http.client
import io
import json
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from cryptography import x509
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from dashboard import socketio
from dashboard.accounts import ApiToken, UserStore
from dashboard.users import main as users_main

from .ca_support import api_token, close_app, csrf_of, lab_state, login, make_app, make_csr, seed_create_body
from .conftest import LabEnv, bearer
from .support import (
    free_port,
    run_module,
    served_serial,
    start_ca_service,
    start_https_dashboard,
    stop_process,
    wait_for,
)

VIEWER_PASSWORD = "viewer-password-123"


@pytest.fixture
def viewer(app: Flask) -> str:
    app.extensions["users"].add("vera", VIEWER_PASSWORD, "viewer")
    return "vera"


def create_body(name: str, **extra: object) -> dict[str, object]:
    return {"name": name, "days": 30, "org": "ACME", **extra}


# -- logged out -------------------------------------------------------------------------------------


def test_logged_out_sees_only_the_public_routes(app: Flask, client: FlaskClient) -> None:
    page = client.get("/")
    assert page.status_code == 302 and page.headers["Location"].startswith("/login")
    for path in ("/api/data", "/v1/ssl/certs", "/api/tokens", "/api/session"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert "Bearer" in response.headers["WWW-Authenticate"] and set(response.json) == {"error"}
    for path in ("/healthz", "/login", "/static/app.css", "/v1/ssl/ca", "/v1/ssl/crl", "/v1/openapi.json"):
        assert client.get(path).status_code == 200, path
    # the live stream: the Engine.IO handshake over HTTP, and Socket.IO's own connect
    handshake = client.get("/socket.io/?EIO=4&transport=polling")
    assert handshake.status_code == 401 and b"sid" not in handshake.data
    tab = socketio.test_client(app)
    assert not tab.is_connected()
    # a made-up or revoked token is no better than none
    for header in ("Bearer iotca_made-up", "Basic YWRtaW46YWRtaW4=", "Bearer "):
        assert client.get("/api/data", headers={"Authorization": header}).status_code == 401, header


def test_the_seed_api_still_works_without_a_session(generated_lab: LabEnv, client: FlaskClient) -> None:
    """The seed's sign and create bodies with `pass` give 201 exactly as before; so does token enrolment."""
    passphrase = generated_lab.passphrase
    assert client.post("/v1/ssl/sign", json={"name": "device001", "days": 360, "pass": passphrase}).status_code == 201
    created = client.post("/v1/ssl/create", json=seed_create_body("AA:BB:CC:DD:EE:01", passphrase, cn="acme.example"))
    assert created.status_code == 201 and created.json["name"] == "AABBCCDDEE01"
    token = client.post("/v1/ssl/tokens", json={"name": "sensor-9", "pass": passphrase}).json["token"]
    pem, _ = make_csr("sensor-9")
    assert (
        client.post("/v1/ssl/sign", json={"name": "sensor-9", "days": 30, "token": token, "csr": pem}).status_code
        == 201
    )


# -- roles ------------------------------------------------------------------------------------------


def test_a_viewer_sees_everything_and_changes_nothing(generated_lab: LabEnv, app: Flask, viewer: str) -> None:
    client = app.test_client()
    csrf = login(client, VIEWER_PASSWORD, viewer)
    html = client.get("/").get_data(as_text=True)
    assert 'data-role="viewer"' in html and re.search(r'<section id="ca" [^>]*hidden', html)
    data = client.get("/api/data").json
    assert set(data) == {"certs_info", "device_data", "logs"} and data["certs_info"]
    assert client.get("/v1/ssl/certs").status_code == 200
    tab = socketio.test_client(app, flask_test_client=client)
    assert tab.is_connected() and [e["name"] for e in tab.get_received()] == ["snapshot"]
    before = lab_state(generated_lab)
    headers = {"X-CSRF-Token": csrf}
    passphrase = generated_lab.passphrase
    for route, body in (
        ("create", create_body("v1", **{"pass": passphrase})),
        ("sign", {"name": "device001", "days": 5, "pass": passphrase}),
        ("revoke", {"name": "device001", "pass": passphrase}),
        ("tokens", {"name": "v2", "pass": passphrase}),
    ):
        response = client.post(f"/v1/ssl/{route}", json=body, headers=headers)
        assert response.status_code == 403 and "operator" in response.json["error"], route
    assert client.post("/api/tokens", json={"label": "x", "role": "viewer"}, headers=headers).status_code == 403
    assert client.get("/api/tokens").status_code == 403
    # a viewer-scoped API token is refused the same way
    token_headers = bearer(api_token(app, "viewer"))
    assert client.post("/v1/ssl/create", json=create_body("v3"), headers=token_headers).status_code == 403
    assert lab_state(generated_lab) == before


def test_an_operator_acts_without_the_ca_passphrase(generated_lab: LabEnv, app: Flask) -> None:
    client = app.test_client()
    csrf = login(client, generated_lab.admin_password)
    headers = {"X-CSRF-Token": csrf}
    created = client.post("/v1/ssl/create", json=create_body("op-made"), headers=headers)
    assert created.status_code == 201 and "key" in created.json
    row = app.extensions["test_ca"].service.inventory.current("op-made")
    assert row is not None and row.requester.startswith("admin@")
    revoked = client.post("/v1/ssl/revoke", json={"name": "op-made", "reason": "keyCompromise"}, headers=headers)
    assert revoked.status_code == 200 and revoked.json["revoked"] == [created.json["serial"]]
    # the same with an operator API token instead of a session (no CSRF: no cookie, no browser)
    operator = bearer(api_token(app, "operator"))
    assert (
        client.application.test_client()
        .post("/v1/ssl/sign", json={"name": "device002", "days": 9}, headers=operator)
        .status_code
        == 201
    )


# -- cross-site, CSRF, Host -------------------------------------------------------------------------


def test_cross_site_requests_with_the_session_are_refused(generated_lab: LabEnv, app: Flask) -> None:
    client = app.test_client()
    csrf = login(client, generated_lab.admin_password)
    before = lab_state(generated_lab)
    # a form on another site posting to the CA with the session cookie (as a browser without SameSite would)
    form = client.post(
        "/v1/ssl/revoke",
        data={"name": "device001", "pass": generated_lab.passphrase},
        headers={"Origin": "http://evil.example"},
    )
    assert form.status_code == 403
    # the same without an Origin header, and JSON without the CSRF token or with a wrong one
    assert client.post("/v1/ssl/revoke", data={"name": "device001"}).status_code == 403
    assert client.post("/v1/ssl/revoke", json={"name": "device001"}).status_code == 403
    assert (
        client.post("/v1/ssl/revoke", json={"name": "device001"}, headers={"X-CSRF-Token": csrf[::-1]}).status_code
        == 403
    )
    assert (
        client.post(
            "/v1/ssl/revoke",
            json={"name": "device001"},
            headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
        ).status_code
        == 403
    )
    assert client.post("/api/tokens", json={"label": "x"}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert lab_state(generated_lab) == before
    # logging out needs the token too (no forced logout from another site), then the session is gone
    assert client.post("/logout").status_code == 403
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 302
    assert client.get("/api/data").status_code == 401


def test_a_foreign_host_header_gets_400(app: Flask, client: FlaskClient) -> None:
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 still sends Host: evil.example."""
    for path in ("/healthz", "/login", "/v1/ssl/ca", "/socket.io/?EIO=4&transport=polling", "/"):
        response = client.get(path, headers={"Host": "evil.example"})
        assert response.status_code == 400, path
    for host in ("localhost:5000", "127.0.0.1:5000", "[::1]:5000", "dashboard:5000"):
        assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
    assert client.post("/v1/ssl/sign", json={}, headers={"Host": "evil.example:5000"}).status_code == 400


# -- sessions ---------------------------------------------------------------------------------------


def test_the_session_cookie_is_httponly_strict_and_secure_under_https(generated_lab: LabEnv, app: Flask) -> None:
    client = app.test_client()
    cookie = client.get("/login").headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    tls = make_app(generated_lab, LAB_SETTINGS=generated_lab.settings(DASHBOARD_TLS="1"))
    try:
        cookie = tls.test_client().get("/login", base_url="https://localhost").headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" in cookie
    finally:
        close_app(tls)


def test_idle_sessions_end_and_account_changes_apply_at_once(generated_lab: LabEnv, app: Flask) -> None:
    client = app.test_client()
    login(client, generated_lab.admin_password)
    with client.session_transaction() as session:
        session["seen"] = int(time.time()) - generated_lab.settings().dashboard_idle_timeout - 1
    assert client.get("/api/data").status_code == 401
    assert client.get("/").status_code == 302
    # a role change is effective on the next request; a password reset ends the session
    users: UserStore = app.extensions["users"]
    csrf = login(client, generated_lab.admin_password)
    users.set_role("admin", "viewer")
    assert (
        client.post("/v1/ssl/create", json=create_body("after-demotion"), headers={"X-CSRF-Token": csrf}).status_code
        == 403
    )
    users.set_role("admin", "operator")
    users.set_password("admin", "a-brand-new-password")
    assert client.get("/api/data").status_code == 401


def test_login_redirects_only_to_this_site(generated_lab: LabEnv, app: Flask) -> None:
    for target, expected in (("//evil.example/x", "/"), ("https://evil.example/", "/"), ("/?tab=ca", "/?tab=ca")):
        client = app.test_client()
        query = urlencode({"next": target})
        form = client.get(f"/login?{query}")
        response = client.post(
            f"/login?{query}",
            data={
                "username": "admin",
                "password": generated_lab.admin_password,
                "csrf_token": csrf_of(form.get_data(as_text=True)),
            },
        )
        assert response.status_code == 302 and response.headers["Location"] == expected, target


def test_logins_are_throttled_per_account_and_per_source(generated_lab: LabEnv, app: Flask) -> None:
    client = app.test_client()
    csrf = csrf_of(client.get("/login").get_data(as_text=True))

    def attempt(username: str, password: str, source: str) -> int:
        return client.post(
            "/login",
            data={"username": username, "password": password, "csrf_token": csrf},
            environ_base={"REMOTE_ADDR": source},
        ).status_code

    # five wrong passwords for admin, each from another address: the account is throttled for everyone
    assert [attempt("admin", "wrong-password", f"10.1.0.{i}") for i in range(5)] == [401] * 5
    assert attempt("admin", generated_lab.admin_password, "10.1.0.99") == 429
    # one address spraying user names is throttled as a source
    codes = [attempt(f"user{i}", "wrong-password", "10.2.0.1") for i in range(21)]
    assert codes[:20] == [401] * 20 and codes[20] == 429
    assert attempt("other", "wrong-password", "10.2.0.2") == 401  # another source is not


# -- API tokens -------------------------------------------------------------------------------------


def test_api_tokens_are_shown_once_stored_hashed_and_revocable(generated_lab: LabEnv, app: Flask) -> None:
    client = app.test_client()
    csrf = login(client, generated_lab.admin_password)
    created = client.post("/api/tokens", json={"label": "grafana", "role": "viewer"}, headers={"X-CSRF-Token": csrf})
    assert created.status_code == 201 and created.json["token"].startswith("iotca_")
    secret = created.json["token"]
    listing = client.get("/api/tokens").json["tokens"]
    assert secret not in json.dumps(listing) and listing[-1]["label"] == "grafana"
    with app.extensions["users"].session() as session:
        stored = session.scalars(select(ApiToken)).all()
    assert all(secret not in (t.token_sha256, t.label) for t in stored)
    script = app.test_client()
    assert script.get("/api/data", headers=bearer(secret)).status_code == 200
    assert (
        script.post("/v1/ssl/create", json=create_body("from-viewer-token"), headers=bearer(secret)).status_code == 403
    )
    revoked = client.post(f"/api/tokens/{created.json['id']}/revoke", headers={"X-CSRF-Token": csrf})
    assert revoked.status_code == 200
    assert script.get("/api/data", headers=bearer(secret)).status_code == 401


def test_the_users_command(
    lab_env: LabEnv, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert users_main(["add", "otto", "--role", "operator"]) == 0
    password = re.search(r"password: (\S+)", capsys.readouterr().out).group(1)  # type: ignore[union-attr]
    store = UserStore(lab_env.settings().effective_database_url)
    try:
        assert store.authenticate("otto", password) is not None
        assert store.authenticate("otto", "not-the-password") is None
        assert users_main(["role", "otto", "viewer"]) == 0 and store.get("otto").role == "viewer"  # type: ignore[union-attr]
        monkeypatch.setattr("sys.stdin", io.StringIO("a-password-from-stdin\n"))
        assert users_main(["passwd", "otto", "--password-stdin"]) == 0
        assert store.authenticate("otto", "a-password-from-stdin") is not None
        assert store.get("otto").password_hash.startswith("$argon2id$")  # type: ignore[union-attr]
        monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
        assert users_main(["passwd", "otto", "--password-stdin"]) == 1
        assert users_main(["add", "otto"]) == 1 and "exists" in capsys.readouterr().err
        assert users_main(["token", "ci", "--role", "operator", "--owner", "otto"]) == 1  # a viewer's token
        assert users_main(["token", "ci", "--role", "viewer"]) == 0
        secret = capsys.readouterr().out.strip().splitlines()[-1]
        assert store.principal_for_token(secret) is not None
        assert users_main(["revoke-token", "1"]) == 0 and store.principal_for_token(secret) is None
        assert users_main(["remove", "otto"]) == 0 and store.get("otto") is None
        assert users_main(["remove", "otto"]) == 1
    finally:
        store.close()


# -- the lockout ------------------------------------------------------------------------------------


def test_one_clients_failures_block_neither_others_nor_the_operator_and_survive_a_restart(
    generated_lab: LabEnv,
) -> None:
    app = make_app(generated_lab)
    try:
        guesser = app.test_client()
        statuses = [
            guesser.post("/v1/ssl/sign", json={"name": "victim", "days": 1, "pass": f"guess{i}"}).status_code
            for i in range(6)
        ]
        assert statuses == [403] * 5 + [429]
        right = {"name": "device001", "days": 3, "pass": generated_lab.passphrase}
        assert guesser.post("/v1/ssl/sign", json={**right, "name": "victim"}).status_code == 429
        # another client on the same address, with the right passphrase for its own entity
        assert app.test_client().post("/v1/ssl/sign", json=right).status_code == 201
        # the operator, logged in or with a token, even for the locked name
        operator = app.test_client()
        csrf = login(operator, generated_lab.admin_password)
        assert (
            operator.post("/v1/ssl/create", json=create_body("victim"), headers={"X-CSRF-Token": csrf}).status_code
            == 201
        )
        assert (
            app.test_client()
            .post("/v1/ssl/sign", json={"name": "victim", "days": 2}, headers=bearer(api_token(app, "operator")))
            .status_code
            == 201
        )
    finally:
        close_app(app)
    restarted = make_app(generated_lab)  # a new CA process on the same database
    try:
        again = restarted.test_client().post(
            "/v1/ssl/sign", json={"name": "victim", "days": 1, "pass": generated_lab.passphrase}
        )
        assert again.status_code == 429 and int(again.headers["Retry-After"]) > 0
    finally:
        close_app(restarted)


# -- exposure ---------------------------------------------------------------------------------------


def test_beyond_loopback_the_dashboard_refuses_to_start_without_https(generated_lab: LabEnv) -> None:
    def start(**settings: str) -> subprocess.CompletedProcess[str]:
        return run_module("dashboard", {**generated_lab.env, "DASHBOARD_PORT": "1", **settings})

    result = start(DASHBOARD_HOST="0.0.0.0")  # noqa: S104
    assert result.returncode == 2
    assert "DASHBOARD_HOST=0.0.0.0 is not a loopback address" in result.stderr
    assert "set DASHBOARD_TLS=1" in result.stderr and "Traceback" not in result.stderr
    # a first admin password too weak to use: a clear error, not a traceback
    result = start(DASHBOARD_ADMIN_PASSWORD="short", DATABASE_URL=f"sqlite:///{generated_lab.root}/fresh.db")
    assert result.returncode == 2 and "DASHBOARD_ADMIN_PASSWORD" in result.stderr and "12" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def anonymous_app(generated_lab: LabEnv) -> Iterator[Flask]:
    app = make_app(generated_lab, LAB_SETTINGS=generated_lab.settings(DASHBOARD_ADMIN_PASSWORD=""))
    yield app
    close_app(app)


def test_no_admin_without_dashboard_admin_password(anonymous_app: Flask) -> None:
    assert anonymous_app.extensions["users"].users() == []


def test_dashboard_tls_serves_https_with_the_dashboard_certificate(generated_lab: LabEnv, tmp_path: Path) -> None:
    """DASHBOARD_TLS=1: the page, the login and the API over HTTPS, verified against the lab's root as
    `localhost` and `127.0.0.1`; the session cookie is Secure; plain HTTP gets no answer from the app. When the
    generator renews the dashboard certificate, new connections get the new one (CERT_WATCH_SECONDS), on the
    dashboard's port and on the CA's EST/ACME port, which serves the same certificate."""
    port, ca_port = free_port(), free_port()
    ca, ca_url = start_ca_service({**generated_lab.env, "CERT_WATCH_SECONDS": "0.3"}, tmp_path / "ca.log", ca_port)
    log = tmp_path / "dashboard.log"
    server = start_https_dashboard({**generated_lab.env, "CERT_WATCH_SECONDS": "0.3"}, log, port, ca_url)
    context = ssl.create_default_context(cafile=str(generated_lab.certs_dir / "root_ca" / "root_ca.crt"))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))

    def up() -> bool:
        assert server.poll() is None, log.read_text()
        try:
            with opener.open(f"https://127.0.0.1:{port}/healthz", timeout=2) as response:
                return response.status == 200
        except urllib.error.HTTPError as ex:  # 503: it answers, degraded (no broker in this test)
            return ex.code == 503
        except OSError:
            return False

    def ca_serves() -> bool:  # the dashboard may answer before the CA serves EST/ACME: wait for both
        log_text = (tmp_path / "ca.log").read_text()
        assert ca.poll() is None, log_text
        return f"EST and ACME on https://127.0.0.1:{ca_port}/" in log_text

    try:
        wait_for(up, timeout=30, interval=0.2, what=f"the dashboard over HTTPS\n{log.read_text()}")
        wait_for(ca_serves, timeout=30, interval=0.2, what="the CA's EST/ACME port")
        assert f"Dashboard on https://127.0.0.1:{port}/" in log.read_text()
        with opener.open(f"https://localhost:{port}/login", timeout=5) as response:
            assert response.status == 200
            cookie = response.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(f"https://127.0.0.1:{port}/api/data", timeout=5)
        assert refused.value.code == 401
        with pytest.raises((OSError, http.client.HTTPException)):  # no clear-text HTTP answer on the TLS port
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{port}/healthz", timeout=5
            )

        root, dashboard_cert = (
            generated_lab.certs_dir / "root_ca" / "root_ca.crt",
            generated_lab.certs_dir / "dashboard" / "dashboard.crt",
        )
        old = format(x509.load_pem_x509_certificate(dashboard_cert.read_bytes()).serial_number, "x")
        assert served_serial(port, root) == served_serial(ca_port, root) == old
        generated_lab.lab().generate(force=True)
        new = format(x509.load_pem_x509_certificate(dashboard_cert.read_bytes()).serial_number, "x")
        assert new != old
        wait_for(
            lambda: served_serial(port, root) == new and served_serial(ca_port, root) == new,
            timeout=20,
            interval=0.2,
            what=f"the renewed dashboard certificate on both ports\n{log.read_text()}",
        )
        with opener.open(f"https://localhost:{port}/login", timeout=5) as response:  # /healthz: 503, no broker here
            assert response.status == 200
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=20)
        stop_process(ca)

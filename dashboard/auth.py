"""Operator access: the login page, sessions, API tokens, CSRF, the Host check and who may do what.

- Public without a session: `/healthz`, `/login`, static files, `GET /v1/ssl/ca`, `GET /v1/ssl/crl`,
  `GET /v1/openapi.json`, and the seed's `POST /v1/ssl/{sign,create,revoke,tokens}`, which carry their own
  credential (`pass`, or an enrolment `token`) exactly as before. Everything else needs a session or
  `Authorization: Bearer <API token>`: the page redirects to the login, the JSON routes answer 401, the Socket.IO
  handshake is refused (dashboard/events.py).
- Sessions: Flask's signed cookie, HttpOnly, SameSite=Strict, Secure under HTTPS, ending after
  DASHBOARD_IDLE_TIMEOUT seconds without a request; the user and its role are re-read from the database on every
  request, so removing a user, changing its role or resetting its password takes effect at once.
- CSRF: a request with a session that changes state (any method but GET/HEAD/OPTIONS) must carry the session's
  token (header `X-CSRF-Token`, or the form field `csrf_token`), and a foreign `Origin` is refused outright.
- Roles: viewers read; CA actions and token management need an operator (403 otherwise). An operator's CA
  requests need no CA passphrase (the service trusts this module's word, `CAService(..., operator=...)`).
- Logins are throttled per source address and per account with flask-limiter (in-process memory storage).
- Every request whose Host is not one of the dashboard's names gets 400 (DNS rebinding), Socket.IO included.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.exceptions import MethodNotAllowed

from ca.internal import OPERATIONS
from lab.rotation import ServerContext
from pki.config import ConfigError, Settings
from pki.tls import server_context

from .accounts import Principal, UserError, UserStore, session_epoch, token_info
from .errors import json_error

log = logging.getLogger(__name__)

bp = Blueprint("auth", __name__)

SESSION_COOKIE = "iotca_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# Endpoints anyone may call; the seed's CA routes check their own credential (`pass` or an enrolment token).
PUBLIC_ENDPOINTS = {
    "static",
    "auth.login",
    "health.healthz",
    "ca_http.ca_certificate",
    "ca_http.crl",
    "ca_http.openapi",
}
SEED_CA_ENDPOINTS = {f"ca_http.{operation}" for operation in OPERATIONS}  # POST /v1/ssl/<operation>
LOGIN_LIMIT_PER_SOURCE = "20 per minute;100 per hour"
LOGIN_LIMIT_PER_ACCOUNT = "5 per minute;30 per hour"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SERVICE_NAME = "dashboard"  # the compose service name; the dashboard certificate names it too


# -- configuration checks, run before serving -------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Beyond loopback the dashboard serves only HTTPS: ConfigError (with what to set) otherwise."""
    if not is_loopback(settings.dashboard_host) and not settings.dashboard_tls:
        raise ConfigError(
            f"DASHBOARD_HOST={settings.dashboard_host} is not a loopback address, so the dashboard would serve "
            "logins and the CA API to the network in clear text: set DASHBOARD_TLS=1 (HTTPS with "
            "certs/dashboard/dashboard.crt), or DASHBOARD_HOST=127.0.0.1"
        )


def tls_files(settings: Settings) -> tuple[Path, Path]:
    folder = settings.certs_dir / "dashboard"
    cert, key = folder / "dashboard.crt", folder / "dashboard.key"
    for path in (cert, key):
        if not path.is_file():
            raise ConfigError(f"DASHBOARD_TLS=1 needs {path}: run ./setup.sh certs")
    return cert, key


def https_context(settings: Settings) -> ServerContext:
    """DASHBOARD_TLS=1 under `python -m dashboard`: the dashboard certificate, followed when the generator renews it
    (lab/rotation.py: new connections get the new pair within CERT_WATCH_SECONDS; start() the watcher). Under
    gunicorn (the Docker image) nothing is needed: its threaded worker loads certfile/keyfile for each connection."""
    cert, key = tls_files(settings)

    def make() -> ssl.SSLContext:
        return server_context(cert, key)

    return ServerContext(make, cert, key, interval=settings.cert_watch_seconds, name="https-cert-watch")


def allowed_hosts(settings: Settings) -> set[str]:
    names = {*LOOPBACK_NAMES, SERVICE_NAME, *(n.lower() for n in settings.dashboard_names)}
    host = settings.dashboard_host.lower()
    if host not in ("0.0.0.0", "::", ""):  # noqa: S104 - wildcards are no Host name
        names.add(host.strip("[]"))
    return names


def host_of(header: str) -> str:
    """`Host` without its port (and without the brackets of an IPv6 literal), lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Gate:
    """WSGI middleware in front of everything, Socket.IO included (which never reaches Flask's before_request):
    400 unless Host is one of ours; 401 for an Engine.IO handshake or WebSocket without a session or token."""

    def __init__(self, flask_app: Flask, app: Callable[..., Any], names: Iterable[str]) -> None:
        self.flask_app = flask_app
        self.app = app
        self.names = frozenset(names)

    @staticmethod
    def _answer(start_response: Callable[..., Any], status: str, message: str) -> list[bytes]:
        body = json.dumps({"error": message}).encode() + b"\n"
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if host_of(environ.get("HTTP_HOST", "")) not in self.names:
            return self._answer(start_response, "400 Bad Request", "unknown Host: use one of the dashboard's names")
        if environ.get("PATH_INFO", "").startswith("/socket.io"):
            with self.flask_app.request_context(environ):
                allowed = socket_allowed()
            if not allowed:
                return self._answer(start_response, "401 Unauthorized", "log in first: the live stream needs a session")
        return self.app(environ, start_response)


def session_key(settings: Settings) -> str:
    """DASHBOARD_SECRET_KEY, else a random key kept in the data folder (0600), shared by every process there."""
    if settings.dashboard_secret_key:
        return settings.dashboard_secret_key
    path = settings.data_dir / "dashboard-session.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
            handle.flush()
            os.fsync(handle.fileno())
    for _ in range(50):  # another process may be writing it this very moment
        key = path.read_text().strip()
        if key:
            return key
        time.sleep(0.02)
    raise ConfigError(f"{path} is empty: delete it and start again")


# -- who is asking ----------------------------------------------------------------------------------


def users() -> UserStore:
    return current_app.extensions["users"]


def _settings() -> Settings:
    return current_app.extensions["lab_settings"]


class Unauthorized(Exception):
    """A credential was sent and is not valid (as opposed to no credential at all)."""


def principal_from_request() -> Principal | None:
    """The API token's principal, else the session's; None without either. Unauthorized for a bad token."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized("use Authorization: Bearer <API token>")
        principal = users().principal_for_token(secret.strip())
        if principal is None:
            raise Unauthorized("unknown or revoked API token")
        return principal
    name = session.get("user")
    if not name:
        return None
    seen = session.get("seen", 0)
    if time.time() - seen > _settings().dashboard_idle_timeout:
        session.clear()
        return None
    user = users().get(name)
    if user is None or not hmac.compare_digest(session.get("epoch", ""), session_epoch(user)):
        session.clear()
        return None
    return Principal(user.username, user.role, "session")


def current_principal() -> Principal | None:
    return g.get("principal")


def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def _csrf_ok() -> bool:
    sent = request.headers.get(CSRF_HEADER) or request.form.get("csrf_token", "")
    expected = session.get("csrf", "")
    return bool(expected) and hmac.compare_digest(sent.encode(), expected.encode())


def _origin_ok() -> bool:
    """No Origin (scripts), or this very origin (the page)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.netloc}" == request.host_url.rstrip("/")


def _refuse(status: int, message: str) -> Response:
    response = json_error(status, message)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="iotca"'
    return response


def guard() -> Response | None:
    """before_request: who is asking, CSRF and Origin, and whether they may reach this endpoint at all."""
    endpoint = request.endpoint or ""
    try:
        principal = principal_from_request()
    except Unauthorized as ex:
        return _refuse(401, str(ex))
    g.principal = principal
    if principal is not None and principal.via == "session":
        session["seen"] = int(time.time())
        session.permanent = True
    if request.method not in SAFE_METHODS:
        if not _origin_ok():
            return _refuse(403, "cross-site request refused")
        if (principal is not None and principal.via == "session") or endpoint == "auth.login":
            if not _csrf_ok():
                return _refuse(403, "missing or wrong CSRF token: reload the page")
    if endpoint in PUBLIC_ENDPOINTS or principal is not None:
        return None
    if isinstance(request.routing_exception, MethodNotAllowed):
        return None  # a route every client may know of (the API document lists them): 405 with Allow, not 401
    if endpoint in SEED_CA_ENDPOINTS and request.method == "POST":
        return None  # the body's `pass` or enrolment token is the credential, checked by the CA service
    if endpoint == "auth.logout":
        return redirect(url_for("auth.login"))
    if request.method == "GET" and endpoint == "views.index":
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    return _refuse(401, "log in, or send Authorization: Bearer <API token>")


def require_operator() -> Response | None:
    """None for an operator (or nobody: the caller then needs its own credential); 403 for a viewer."""
    principal = current_principal()
    if principal is not None and not principal.is_operator:
        return _refuse(403, "this needs an operator; your role is viewer")
    return None


def socket_allowed() -> bool:
    """The Socket.IO handshake: the same session or API token as the page (any role)."""
    try:
        return principal_from_request() is not None
    except Unauthorized:
        return False


# -- pages and routes -------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Only a path on this site (never `//evil.example` or a full URL) after logging in."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("views.index")
    return target


def _login_page(error: str | None = None, status: int = 200) -> Response:
    response = Response(
        render_template("login.html", error=error, csrf_token=csrf_token(), next=request.args.get("next", "")),
        status=status,
        mimetype="text/html",
    )
    from .views import secure_headers

    return secure_headers(response)


def login() -> Any:
    if request.method == "GET":
        if current_principal() is not None:
            return redirect(_safe_next(request.args.get("next")))
        return _login_page()
    username = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    user = users().authenticate(username, password) if username and password else None
    if user is None:
        log.warning("failed dashboard login for %r from %s", username[:64], request.remote_addr)
        return _login_page("Wrong user name or password.", 401)
    session.clear()  # a fresh session (and CSRF token) at login: no fixation
    session.update(user=user.username, epoch=session_epoch(user), seen=int(time.time()), csrf=secrets.token_urlsafe(32))
    session.permanent = True
    log.info("dashboard login: %s (%s) from %s", user.username, user.role, request.remote_addr)
    return redirect(_safe_next(request.args.get("next")))


@bp.post("/logout")
def logout() -> Response:
    session.clear()
    return redirect(url_for("auth.login"))


@bp.get("/api/session")
def whoami() -> Response:
    principal = current_principal()
    assert principal is not None
    return jsonify({"name": principal.name, "role": principal.role, "via": principal.via})


@bp.get("/api/tokens")
def list_tokens() -> Response:
    if (refused := _operator_only()) is not None:
        return refused
    return jsonify({"tokens": [token_info(t) for t in users().tokens()]})


@bp.post("/api/tokens")
def create_token() -> Response:
    if (refused := _operator_only()) is not None:
        return refused
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return json_error(415, "send the request as JSON (Content-Type: application/json)")
    principal = current_principal()
    assert principal is not None
    owner = principal.name if principal.via == "session" else None
    try:
        token, secret = users().create_token(str(body.get("label", "")), str(body.get("role", "viewer")), owner)
    except UserError as ex:
        return json_error(400, str(ex))
    log.info("API token %s (%s) created by %s", token.id, token.role, principal.name)
    response = jsonify({**token_info(token), "token": secret})
    response.status_code = 201
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/api/tokens/<int:token_id>/revoke")
def revoke_token(token_id: int) -> Response:
    if (refused := _operator_only()) is not None:
        return refused
    try:
        users().revoke_token(token_id)
    except UserError as ex:
        return json_error(404, str(ex))
    log.info("API token %s revoked by %s", token_id, current_principal().name)  # type: ignore[union-attr]
    return jsonify({"id": token_id, "revoked": True})


def _operator_only() -> Response | None:
    principal = current_principal()
    if principal is None or not principal.is_operator:
        return _refuse(403, "this needs an operator")
    return None


def init_app(app: Flask) -> None:
    settings: Settings = app.extensions["lab_settings"]
    store = app.extensions.get("users") or UserStore(settings.effective_database_url)
    app.extensions["users"] = store
    if store.ensure_admin(settings.dashboard_admin_password):
        log.info("created the operator %r from DASHBOARD_ADMIN_PASSWORD", "admin")
    app.config["SECRET_KEY"] = session_key(settings)
    app.config.update(
        SESSION_COOKIE_NAME=SESSION_COOKIE,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=settings.dashboard_tls,
        PERMANENT_SESSION_LIFETIME=settings.dashboard_idle_timeout,
    )
    limiter = Limiter(
        get_remote_address, app=app, storage_uri="memory://", headers_enabled=True, retry_after="delta-seconds"
    )
    app.extensions["login_limiter"] = limiter
    # Only POSTs (attempts) count: per source, and per account whatever the source.
    view = limiter.limit(LOGIN_LIMIT_PER_SOURCE, methods=["POST"])(login)
    view = limiter.limit(
        LOGIN_LIMIT_PER_ACCOUNT,
        methods=["POST"],
        key_func=lambda: "account:" + request.form.get("username", "").strip().lower(),
    )(view)
    app.add_url_rule("/login", "auth.login", view, methods=["GET", "POST"])
    app.register_blueprint(bp)
    app.before_request(guard)
    app.wsgi_app = Gate(app, app.wsgi_app, allowed_hosts(settings))  # type: ignore[method-assign]

"""The seed's CA API under /v1/ssl on the dashboard's port, forwarded to the CA service (`python -m ca`).

The dashboard holds no CA key and no passphrase. It keeps the public contract of these routes (which need a
session, which are public, CSRF, the Host check: dashboard/auth.py) and forwards each request to a CA
replica's internal API (ca/http.py) with the body unchanged, the operator it proved (session or API token) and
the client's address, under the secret that only the dashboard and the CA share (ca/internal.py). The CA's
answer (status, JSON body, Retry-After, Cache-Control) comes back unchanged.

Replicas (CA_URLS, comma-separated; natively the runner sets one URL per replica) are used round-robin, one
persistent connection per replica and thread; a replica that refuses the connection is skipped, so a request
reaches a live replica while another one restarts. None reachable: 503.
"""

from __future__ import annotations

import http.client
import itertools
import logging
import threading
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from ca.internal import OPERATIONS, OPERATOR_HEADER, SECRET_HEADER, SOURCE_HEADER, ca_urls, internal_secret
from pki.authority import CAError, days_left, load_certificate
from pki.requests import MAX_DAYS_WITHOUT_CA
from pki.store import CertsLayout, read_optional

from .auth import current_principal, require_operator
from .errors import json_error
from .openapi import openapi_document

log = logging.getLogger(__name__)

bp = Blueprint("ca_http", __name__, url_prefix="/v1")

FORWARD_TIMEOUT = 60.0  # seconds: a signing with an RSA key generation, under load
# Answer headers worth passing back (the body is JSON or PEM/DER; Retry-After with 429, caching rules).
PASSED_HEADERS = ("Content-Type", "Retry-After", "Cache-Control", "Vary")
# Failures that mean the request never reached a replica's application: safe to try the next replica.
NOT_SENT = (ConnectionRefusedError, ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)


class CAClient:
    """Forwards requests to the CA replicas, round-robin, over persistent HTTP/1.1 connections."""

    def __init__(self, urls: list[str], secret: str, timeout: float = FORWARD_TIMEOUT) -> None:
        self.targets = [urlsplit(url) for url in urls]
        for target in self.targets:
            if target.scheme != "http" or not target.hostname:
                raise ValueError(f"CA_URLS: {target.geturl()!r} is not an http://host:port URL")
        self.secret = secret
        self.timeout = timeout
        self._next = itertools.count()
        self._local = threading.local()

    def _connection(self, index: int, fresh: bool = False) -> http.client.HTTPConnection:
        pool: dict[int, http.client.HTTPConnection] = self._local.__dict__.setdefault("pool", {})
        connection = pool.get(index)
        if connection is None or fresh:
            if connection is not None:
                connection.close()
            target = self.targets[index]
            connection = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=self.timeout)
            pool[index] = connection
        return connection

    def forward(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {**headers, SECRET_HEADER: self.secret}
        start = next(self._next)
        last: Exception | None = None
        for attempt in range(len(self.targets) * 2):
            index = (start + attempt // 2) % len(self.targets)
            connection = self._connection(index, fresh=attempt % 2 == 1)
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except NOT_SENT as ex:  # a stale kept-alive connection, or this replica is down: the next try
                connection.close()
                last = ex
                continue
            except OSError as ex:  # a timeout after sending: the request may have been served; do not repeat it
                connection.close()
                raise CAUnavailable(f"the CA service did not answer: {ex}") from ex
            if response.will_close:
                connection.close()
            return response.status, {k: v for k, v in response.getheaders() if k in PASSED_HEADERS}, data
        raise CAUnavailable(f"no CA replica is reachable ({last})")

    def each(self, path: str) -> list[tuple[str, bytes | None]]:
        """GET `path` from every replica in turn: (its host:port, the body of a 200, or None when it is down)."""
        answers: list[tuple[str, bytes | None]] = []
        for index, target in enumerate(self.targets):
            connection = self._connection(index, fresh=True)
            try:
                connection.request("GET", path, headers={SECRET_HEADER: self.secret})
                response = connection.getresponse()
                data = response.read()
                answers.append((target.netloc, data if response.status == 200 else None))
            except OSError:
                answers.append((target.netloc, None))
            finally:
                connection.close()
        return answers


class CAUnavailable(RuntimeError):
    pass


def client() -> CAClient:
    return current_app.extensions["ca_client"]


def _forward(method: str = "GET", *, operator: str | None = None) -> Response:
    headers = {SOURCE_HEADER: request.remote_addr or "unknown"}
    if operator:
        headers[OPERATOR_HEADER] = operator
    body = None
    if method == "POST":
        body = request.get_data(cache=False)  # 413 past MAX_CONTENT_LENGTH, before anything is forwarded
        if request.content_type:
            headers["Content-Type"] = request.content_type
    for passed in ("Accept", "User-Agent"):  # User-Agent: the CA's metrics tell `iotca` from other HTTP clients
        if request.headers.get(passed):
            headers[passed] = request.headers[passed]
    path = request.full_path if request.query_string else request.path
    try:
        status, answer_headers, data = client().forward(method, path, body, headers)
    except CAUnavailable as ex:
        log.warning("%s %s: %s", method, request.path, ex)
        return json_error(503, "the CA service is not reachable; retry in a few seconds", headers={"Retry-After": "5"})
    return Response(data, status=status, headers=answer_headers)


def _call() -> Response:
    # A logged-in operator (session or API token) needs no `pass`; a viewer may not act at all; without a
    # session the body's own credential decides, exactly as the seed's API always did (dashboard/auth.py).
    if (refused := require_operator()) is not None:
        return refused
    principal = current_principal()
    response = _forward("POST", operator=principal.name if principal is not None else None)
    hub = current_app.extensions.get("live_hub")
    if hub is None or response.status_code >= 300 or request.path == "/v1/ssl/tokens":
        return response
    if request.path == "/v1/ssl/revoke":  # the page says revoked and offline now, as the CA cuts the device off
        name = (response.get_json(silent=True) or {}).get("name")
        if isinstance(name, str):
            hub.device_revoked(name)
        hub.refresh_certs(force=True)
    else:
        hub.certificates_changed()  # every open page re-reads the table on its next tick (dashboard/events.py)
    return response


# Every route of the CA API, forwarded as it is: the POST operations through _call, the GETs as they are.
# Endpoints `ca_http.<name>`: dashboard/auth.py names them (which are public, which take the seed's credential).
for _operation in OPERATIONS:
    bp.add_url_rule(f"/ssl/{_operation}", _operation, _call, methods=["POST"])
for _endpoint, _path in (("ca_certificate", "/ssl/ca"), ("crl", "/ssl/crl"), ("certificates", "/ssl/certs")):
    bp.add_url_rule(_path, _endpoint, _forward, methods=["GET"])


def max_days() -> int:
    """The longest validity a request may ask for now, as the CA computes it (the root's remaining life), from the
    root certificate the dashboard has (public; no CA key here); MAX_DAYS_WITHOUT_CA while there is none."""
    data = read_optional(CertsLayout(current_app.extensions["lab_settings"].certs_dir).ca_cert)
    try:
        remaining = int(days_left(load_certificate(data))) if data else 0
    except CAError:
        remaining = 0
    return remaining if remaining >= 1 else MAX_DAYS_WITHOUT_CA


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document(max_days()))


def init_app(app: Flask) -> None:
    settings = app.extensions["lab_settings"]
    urls: Any = app.config.get("CA_URLS") or ca_urls()
    if isinstance(urls, str):
        urls = [u.strip() for u in urls.split(",") if u.strip()]
    secret = app.config.get("CA_INTERNAL_SECRET") or internal_secret(settings)
    app.extensions["ca_client"] = CAClient(list(urls), secret)
    app.register_blueprint(bp)

"""The CA's HTTP API under /v1/ssl on the internal port: a thin adapter over `pki.service.CAService`.

Only the dashboard calls it (ca/internal.py says how it proves that): the dashboard keeps the public routes,
their authentication and their answers; this side decodes, calls the service and encodes, so the answers
(status, body, headers) are the service's, byte for byte what the MQTT endpoint publishes. A request without
the internal secret gets 401 and changes nothing.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import CollectorRegistry
from werkzeug.exceptions import HTTPException

from pki.metrics import CONTENT_TYPE, exposition, new_registry
from pki.requests import BAD_REQUEST, UNSUPPORTED_MEDIA_TYPE, RequestError
from pki.service import CAService, Reply

from .internal import OPERATIONS, OPERATOR_HEADER, SECRET_HEADER, SOURCE_HEADER, secret_matches

log = logging.getLogger(__name__)

bp = Blueprint("ca_http", __name__, url_prefix="/v1")

MAX_BODY = 64 * 1024
PEM_MIMETYPE = "application/x-pem-file"
CLI_USER_AGENT = "iotca/"
DER_CRL_MIMETYPE = "application/pkix-crl"


def service() -> CAService:
    return current_app.extensions["ca_service"]


@bp.before_request
def _only_the_dashboard() -> Response | None:
    if not secret_matches(request.headers.get(SECRET_HEADER), current_app.config["CA_INTERNAL_SECRET"]):
        return _refused(
            RequestError(401, "the CA's internal port answers only the dashboard; use the dashboard's /v1/ssl/*")
        )
    return None


def _source() -> str:
    """The address the dashboard's client connected from (the lockout counts per address)."""
    return request.headers.get(SOURCE_HEADER) or "unknown"


def _json_body() -> Any:
    if not request.is_json:
        raise RequestError(UNSUPPORTED_MEDIA_TYPE, "send the request as JSON (Content-Type: application/json)")
    data = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise RequestError(BAD_REQUEST, "the body is not valid JSON") from None


def _respond(reply: Reply) -> Response:
    # json.dumps keeps the contract's field order ({"name", "ca", "crt", "key", "serial", "not_after"}).
    response = Response(json.dumps(reply.body), status=reply.status, mimetype="application/json")
    response.headers.update(reply.headers)
    response.headers["Cache-Control"] = "no-store"  # replies may carry private keys and tokens
    return response


def _refused(ex: RequestError) -> Response:
    """A refusal in the one error shape, `{"error", "field"?}` (pki.request_errors), as the service replies it."""
    return _respond(Reply(ex.status, ex.body(), ex.headers()))


def _call(operation: str) -> Response:
    source = _source()
    try:
        body = _json_body()
    except RequestError as ex:
        log.info("ssl/%s from %s -> %s (%s)", operation, source, ex.status, ex.message)
        return _refused(ex)
    ca = service()
    # The operator the dashboard proved (session or API token): no `pass` needed (dashboard/auth.py).
    operator = request.headers.get(OPERATOR_HEADER) or None
    requester = f"{operator}@{source}" if operator else source
    transport = _transport()
    if operation == "sign":
        reply = ca.sign(body, source=source, via="http", requester=requester, operator=operator, transport=transport)
    elif operation == "create":
        reply = ca.create(body, source=source, via="http", requester=requester, operator=operator, transport=transport)
    elif operation == "revoke":
        reply = ca.revoke(body, source=source, operator=operator, transport=transport)
    else:
        reply = ca.issue_token(body, source=source, operator=operator, transport=transport)
    return _respond(reply)


def _transport() -> str:
    """`cli` for the `iotca` command line (its User-Agent, lab/cli.py, passed on by the dashboard), `http` for
    everything else: a metrics label only, never a credential."""
    return "cli" if request.user_agent.string.startswith(CLI_USER_AGENT) else "http"


for _operation in OPERATIONS:  # POST /v1/ssl/<operation>, endpoint `ca_http.<operation>`
    bp.add_url_rule(f"/ssl/{_operation}", _operation, functools.partial(_call, _operation), methods=["POST"])


@bp.get("/ssl/ca")
def ca_certificate() -> Response:
    try:
        return Response(service().ca_pem(), mimetype=PEM_MIMETYPE)
    except RequestError as ex:
        return _refused(ex)


@bp.get("/ssl/crl")
def crl() -> Response:
    """PEM by default; DER (RFC 5280 4.2.1.13, as distribution points serve it) with Accept: application/pkix-crl."""
    try:
        pem = service().crl_pem()
    except RequestError as ex:
        return _refused(ex)
    headers = {"Cache-Control": "no-cache", "Vary": "Accept"}
    if request.accept_mimetypes.best_match([PEM_MIMETYPE, DER_CRL_MIMETYPE], default=PEM_MIMETYPE) == DER_CRL_MIMETYPE:
        der = x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER)
        return Response(der, mimetype=DER_CRL_MIMETYPE, headers=headers)
    return Response(pem, mimetype=PEM_MIMETYPE, headers=headers)


@bp.get("/ssl/certs")
def certificates() -> Response:
    return _respond(service().certificates(request.args.get("name"), request.args.get("status")))


@bp.get("/metrics")
def metrics() -> Response:
    """This replica's counters in the Prometheus text format, for the dashboard's /metrics (which adds the
    replica's label): behind the shared secret like every internal route."""
    body = exposition(current_app.extensions["metrics_registry"])
    return Response(body, headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"})


def create_internal_app(
    service: CAService, secret: str, health: Any = None, registry: CollectorRegistry | None = None
) -> Flask:
    """The internal API over the process's one CAService; `health()` answers GET /healthz (compose, the runner)."""
    app = Flask("ca.http")
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY, CA_INTERNAL_SECRET=secret, JSON_SORT_KEYS=False)
    app.extensions["ca_service"] = service
    app.extensions["metrics_registry"] = registry if registry is not None else new_registry()
    app.register_blueprint(bp)

    @app.get("/healthz")
    def healthz() -> Response:  # no secret needed: 200 while the replica serves, 503 while its MQTT is down
        report = health() if health is not None else {"status": "ok"}
        response = jsonify(report)
        response.status_code = 200 if report.get("status") == "ok" else 503
        return response

    @app.errorhandler(HTTPException)
    def _http_error(ex: HTTPException) -> Response:  # 404, 405, 413 ... as JSON, like every other answer
        return _refused(RequestError(ex.code or 500, ex.description or ex.name))

    return app

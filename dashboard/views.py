"""Pages and read-only JSON: `/` (the live dashboard), `/api/data` (the seed's shape) and `/healthz`."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template, url_for

from pki.config import Settings

from .auth import csrf_token, current_principal
from .live import LiveHub

bp = Blueprint("views", __name__)

STATIC = Path(__file__).parent / "static"

# The page loads nothing from elsewhere (it works offline); say so to the browser as well.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


def _hub() -> LiveHub:
    return current_app.extensions["live_hub"]


def static_url(filename: str) -> str:
    """A static URL that changes with the file, so a browser never runs an old app.js after an update."""
    try:
        version = int((STATIC / filename).stat().st_mtime)
    except OSError:
        version = 0
    return url_for("static", filename=filename, v=version)


def secure_headers(response: Response) -> Response:
    """The headers of every page: strict CSP, no sniffing, no referrer, never cached, never framed."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    # same-origin, not no-referrer: with no-referrer Chrome sends `Origin: null` on the page's own form posts.
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    return response


@bp.get("/")
def index() -> Response:
    """The live dashboard (auth.guard sends the logged-out to /login first)."""
    settings: Settings = current_app.extensions["lab_settings"]
    principal = current_principal()
    assert principal is not None
    html = render_template(
        "index.html",
        static_url=static_url,
        devices=settings.devices,
        broker=f"{settings.broker_address}:{settings.broker_port}",
        renew_before_days=settings.renew_before_days,
        cert_days=settings.cert_days,
        user=principal,
        csrf_token=csrf_token(),
    )
    return secure_headers(Response(html, mimetype="text/html"))


@bp.get("/api/data")
def api_data() -> Response:
    """The seed's polling endpoint, kept for scripts: certificates, per-device data and the MQTT log."""
    hub = _hub()
    return jsonify({"certs_info": hub.certs()["certs"], "device_data": hub.device_data(), "logs": hub.logs()})


@bp.get("/healthz")
def healthz() -> Response:
    """200 while the app runs; the body says whether the broker connections and the database are up."""
    bridge = current_app.extensions["mqtt_bridge"]
    ingest = current_app.extensions.get("ingest")
    hub = _hub()
    mqtt_state = bridge.status()
    ingest_state = ingest.status() if ingest is not None else None
    db_state = hub.health()
    settings = current_app.extensions["lab_settings"]
    mqtt_ok = mqtt_state["connected"] or not settings.dashboard_mqtt  # a replica without the `dashboard` connection
    ok = mqtt_ok and (ingest_state is None or ingest_state["connected"]) and db_state["ok"]
    return jsonify({"status": "ok" if ok else "degraded", "mqtt": mqtt_state, "ingest": ingest_state,
                    "db": db_state})


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)

"""Pages and read-only JSON: `/`, `/api/data`, `/healthz`. (Placeholder until Step 4 fills it in.)"""

from __future__ import annotations

from flask import Blueprint, Flask, current_app, jsonify

bp = Blueprint("views", __name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    bridge = current_app.extensions["mqtt_bridge"]
    return jsonify({"status": "ok", "mqtt": bridge.status()})


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)

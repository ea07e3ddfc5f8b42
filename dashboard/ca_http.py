"""The CA's HTTP API under /v1/ssl (placeholder until Step 3 fills it in)."""

from __future__ import annotations

from flask import Blueprint, Flask

bp = Blueprint("ca_http", __name__, url_prefix="/v1")


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)

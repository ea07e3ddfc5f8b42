"""The dashboard: live readings, the MQTT log, certificate status, and the CA's HTTP API (forwarded to `python -m ca`).

`create_app(test_config=None)` builds a fresh app (one per test); `socketio` is shared at package level
(Flask-SocketIO's threading mode with simple-websocket). The MQTT connection is started only when
MQTT_ENABLED is true (the default outside tests), once per process, never under a reloader.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

from flask import Flask
from flask.logging import default_handler
from flask_socketio import SocketIO
from socketio.packet import Packet

from pki.config import Settings
from pki.metrics import new_registry

from .auth import check_exposure
from .errors import register_error_handlers
from .mqtt_bridge import MqttBridge

socketio = SocketIO()


class JsonPacket(Packet):
    """Socket.IO packets without binary attachments: the page only ever sends and receives JSON, and for each
    push python-socketio would otherwise walk the whole batch looking for bytes first (~5% of the dashboard's
    time under a telemetry flood, docs/benchmarks.md)."""

    uses_binary_events = False


MAX_BODY = 64 * 1024


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        # Replaced by dashboard/auth.py with DASHBOARD_SECRET_KEY or the data folder's key (sessions are logins).
        SECRET_KEY=secrets.token_hex(32),
        MAX_CONTENT_LENGTH=MAX_BODY,
        MQTT_ENABLED=True,
        JSON_SORT_KEYS=False,
    )
    app.config.from_prefixed_env(prefix="DASHBOARD_FLASK")
    if test_config:
        app.config.update(test_config)
    settings: Settings = app.config.get("LAB_SETTINGS") or Settings.from_env()
    check_exposure(settings)  # beyond loopback: HTTPS or nothing (ConfigError says what to set)
    app.extensions["lab_settings"] = settings
    configure_logging()
    # Our records go through the root handler (configure_logging); Flask's own would print each twice.
    app.logger.removeHandler(default_handler)

    register_error_handlers(app)
    # cors_allowed_origins left at None: same-origin only, so no other web page can read the live stream.
    socketio.init_app(app, async_mode="threading", serializer=JsonPacket)

    # This app's own Prometheus registry (GET /metrics, dashboard/health.py), never the process-global one.
    app.extensions["metrics_registry"] = new_registry()
    bridge = MqttBridge(settings)
    app.extensions["mqtt_bridge"] = bridge

    # Each feature registers its routes, Socket.IO events and MQTT handlers.
    # The CA API is forwarded to the CA service (`python -m ca`, which alone holds the CA key): dashboard/ca_http.py.
    from . import auth, ca_http, docs, events, health, live, views

    for feature in (auth, ca_http, live, events, views, health, docs):
        feature.init_app(app)

    if app.config["MQTT_ENABLED"]:
        bridge.start()
    return app


def configure_logging() -> None:
    """One handler on the root logger at LOG_LEVEL (default INFO); idempotent for many apps per process."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level if level in logging.getLevelNamesMapping() else "INFO",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Werkzeug's request lines and development-server banner are noise next to the lab's own log.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


def settings_of(app: Flask) -> Settings:
    return app.extensions["lab_settings"]


def bridge_of(app: Flask) -> MqttBridge:
    return app.extensions["mqtt_bridge"]

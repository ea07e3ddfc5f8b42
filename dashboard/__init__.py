"""The dashboard: live readings, the MQTT log, certificate status, and the CA's HTTP API (forwarded to `python -m ca`).

`create_app(test_config=None)` builds a fresh app (one per test) and only wires it: it starts no thread and
opens no connection, so `flask --app dashboard routes` (or any import) never touches the broker. The serving
entry points (`python -m dashboard`, gunicorn's worker hook in dashboard/gunicorn_conf.py) call `start(app)`:
the MQTT connections (when MQTT_ENABLED, the default outside tests), the live emitter, the CRL timer;
`shutdown(app)` stops every one of them. `socketio` is shared at package level (Flask-SocketIO's threading
mode with simple-websocket), with SOCKETIO_MESSAGE_QUEUE (Redis) as its message queue when set.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

import socketio as socketio_server
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
    # The client manager is given each time: Flask-SocketIO keeps init_app's options on the shared `socketio`,
    # so an app with a message queue would otherwise hand it on to every later app of the process.
    socketio.init_app(app, async_mode="threading", serializer=JsonPacket, client_manager=client_manager(settings))
    app.extensions["socketio_server"] = socketio.server  # this app's (a test process makes many)

    # This app's own Prometheus registry (GET /metrics, dashboard/health.py), never the process-global one.
    app.extensions["metrics_registry"] = new_registry()
    bridge = MqttBridge(settings)
    app.extensions["mqtt_bridge"] = bridge

    # Each feature registers its routes, Socket.IO events and MQTT handlers.
    # The CA API is forwarded to the CA service (`python -m ca`, which alone holds the CA key): dashboard/ca_http.py.
    from . import auth, ca_http, docs, events, health, live, views

    for feature in (auth, ca_http, live, events, views, health, docs):
        feature.init_app(app)

    return app


def start(app: Flask) -> Flask:
    """Start the services of a serving process (once); `shutdown(app)` stops them."""
    if app.extensions.get("started"):
        return app
    app.extensions["started"] = True
    mqtt_enabled = app.config["MQTT_ENABLED"]
    if mqtt_enabled:
        if settings_of(app).dashboard_mqtt:
            app.extensions["mqtt_bridge"].start()
        if app.extensions.get("ingest") is not None:
            app.extensions["ingest"].start()
    from .live import start_live

    start_live(app, emitter=app.config.get("LIVE_EMITTER", mqtt_enabled))
    return app


def shutdown(app: Flask) -> None:
    """Stop everything `start` (and `python -m dashboard`) started, and release the app's resources."""
    extensions = app.extensions
    for name in ("ingest", "mqtt_bridge", "readings_bus"):  # the bus last: it sends what the ingest took
        if extensions.get(name) is not None:
            extensions[name].stop()
    if "live_hub" in extensions:
        extensions["live_hub"].close()
    # Engine.IO's ping task (started with the first tab). With a message queue, python-socketio's Redis listener
    # thread has no public stop: it is a daemon thread and ends with the process.
    extensions["socketio_server"].shutdown()
    extensions["users"].close()
    extensions["started"] = False


def client_manager(settings: Settings) -> socketio_server.Manager:
    """Flask-SocketIO's message queue when SOCKETIO_MESSAGE_QUEUE is set (dashboard replicas: a Socket.IO
    event for a tab connected to another process, or to every tab, is relayed through Redis); else in-process."""
    if settings.socketio_message_queue:
        return socketio_server.RedisManager(settings.socketio_message_queue, channel="flask-socketio")
    return socketio_server.Manager()


def configure_logging() -> None:
    """One handler on the root logger at LOG_LEVEL (default INFO); idempotent for many apps per process."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Werkzeug's request lines and development-server banner are noise next to the lab's own log.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


def settings_of(app: Flask) -> Settings:
    return app.extensions["lab_settings"]


def bridge_of(app: Flask) -> MqttBridge:
    return app.extensions["mqtt_bridge"]

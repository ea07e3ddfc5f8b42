"""Socket.IO events of the dashboard page (namespace "/").

Server -> browser (sent by dashboard/live.py's LiveHub):
- `snapshot`: the whole state, to one tab, right after it connects (or reconnects);
- `batch`: what changed since the previous push (device cards, chart points, log lines, counters), to
  every tab, at most every FLUSH_INTERVAL, however many MQTT messages arrived;
- `certs`: the certificate table, the CRL, each entity's lifecycle state and the banner's data, to every tab,
  when they change: right after this app's CA issues, renews or revokes (`CAService.on_change`), within
  seconds of a change made elsewhere (the generator, another process), and every minute anyway (days age).

Browser -> server: `connect` and `refresh_certs` below.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app
from flask_socketio import emit

from . import socketio
from .auth import socket_allowed
from .live import LiveHub


def _hub() -> LiveHub:
    return current_app.extensions["live_hub"]


def on_connect(auth: Any = None) -> bool:
    """Sent by the page's Socket.IO client when a tab opens or reconnects: that tab gets a snapshot.

    Refused (False) without the page's session or an API token: the stream carries readings and the MQTT log.
    """
    if not socket_allowed():
        return False
    emit("snapshot", _hub().snapshot())
    return True


def on_refresh_certs(_data: Any = None) -> None:
    """Sent by the page after a CA form or a renew/revoke button succeeded: every tab gets the new table."""
    _hub().request_certs_refresh()


def init_app(app: Flask) -> None:
    """Register the handlers on this app's Socket.IO server.

    Not with `@socketio.on` at import time: Flask-SocketIO then binds them to whichever server exists at
    that moment only, and every later `create_app` (a test's fresh app) would have none.
    """
    socketio.on_event("connect", on_connect)
    socketio.on_event("refresh_certs", on_refresh_certs)
    # A certificate changed through this dashboard's forwarded CA API (dashboard/ca_http.py calls
    # `certificates_changed`): every tab gets the new table on the emitter's next tick. Changes over MQTT (made by
    # the CA process) show on the emitter's periodic check of the inventory.

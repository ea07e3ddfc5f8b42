"""`python -m dashboard`: serve the dashboard natively (Werkzeug via socketio.run, no reloader).

The serving entry point: it starts the app's services (`dashboard.start`: MQTT connections, emitter, timers) and
the EST/ACME server, and `dashboard.shutdown` stops all of them when the server returns (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from typing import Any

from werkzeug.serving import WSGIRequestHandler

from pki.config import ConfigError, Settings

from . import create_app, shutdown, socketio, start
from .auth import check_exposure, https_context


class RequestHandler(WSGIRequestHandler):
    """Werkzeug's handler, closing the connection once a WebSocket session on it has ended.

    A Socket.IO WebSocket ends with engine.io raising ConnectionError, which Werkzeug reports through
    `connection_dropped` and then, HTTP/1.1 keep-alive being on, reads the socket again as the next request:
    the client's WebSocket close frame arrives there and is logged as "Bad request version ('\\x88\\x82...')".
    Nothing more may be read from such a connection.
    """

    def connection_dropped(self, error: BaseException, environ: Any = None) -> None:
        self.close_connection = True


def main() -> int:
    try:
        # The dashboard never holds the CA passphrase (the CA service `python -m ca` does): dropped even when the
        # environment or .env carries it.
        settings = dataclasses.replace(Settings.from_env(), ca_passphrase=None)
        check_exposure(settings)
        https = https_context(settings) if settings.dashboard_tls else None
        app = create_app({"LAB_SETTINGS": settings})
    except ConfigError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop_serving)
    start(app)
    if https is not None:
        https.start()  # follows the dashboard certificate when the generator renews it
    scheme = "https" if https else "http"
    print(f"Dashboard on {scheme}://{settings.dashboard_host}:{settings.dashboard_port}/", flush=True)
    # The reloader would start a second MQTT client that kicks the first off: never use it.
    try:
        socketio.run(
            app,
            host=settings.dashboard_host,
            port=settings.dashboard_port,
            debug=False,
            use_reloader=False,
            allow_unsafe_werkzeug=True,
            log_output=False,
            request_handler=RequestHandler,
            ssl_context=https.context if https else None,
        )
    except KeyboardInterrupt:
        pass
    finally:
        if https is not None:
            https.stop()
        shutdown(app)
    return 0


def _stop_serving(_signum: int, _frame: Any) -> None:
    """SIGTERM ends the server like Ctrl-C does, so `shutdown` runs (the ingest's session is closed cleanly)."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())

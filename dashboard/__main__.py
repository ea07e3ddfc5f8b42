"""`python -m dashboard`: serve the dashboard natively (Werkzeug via socketio.run, no reloader)."""

from __future__ import annotations

import sys

from pki.config import ConfigError, Settings

from . import create_app, socketio
from .auth import check_exposure, tls_files


def main() -> int:
    try:
        settings = Settings.from_env()
        check_exposure(settings)
        ssl_context = tls_files(settings) if settings.dashboard_tls else None
        app = create_app({"LAB_SETTINGS": settings})
    except ConfigError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    scheme = "https" if ssl_context else "http"
    print(f"Dashboard on {scheme}://{settings.dashboard_host}:{settings.dashboard_port}/", flush=True)
    # The reloader would start a second MQTT client that kicks the first off: never use it.
    socketio.run(app, host=settings.dashboard_host, port=settings.dashboard_port, debug=False,
                 use_reloader=False, allow_unsafe_werkzeug=True, log_output=False,
                 ssl_context=tuple(str(p) for p in ssl_context) if ssl_context else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

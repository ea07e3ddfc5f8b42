"""`python -m dashboard`: serve the dashboard natively (Werkzeug via socketio.run, no reloader)."""

from __future__ import annotations

import sys

from pki.config import ConfigError, Settings

from . import create_app, socketio


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    app = create_app({"LAB_SETTINGS": settings})
    print(f"Dashboard on http://{settings.dashboard_host}:{settings.dashboard_port}/", flush=True)
    # The reloader would start a second MQTT client that kicks the first off: never use it.
    socketio.run(app, host=settings.dashboard_host, port=settings.dashboard_port, debug=False,
                 use_reloader=False, allow_unsafe_werkzeug=True, log_output=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

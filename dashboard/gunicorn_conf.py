"""gunicorn settings of the dashboard image (`gunicorn --config python:dashboard.gunicorn_conf`).

HTTPS with the lab's dashboard certificate when DASHBOARD_TLS=1, which beyond loopback (the container binds
0.0.0.0) is mandatory: the same check as `python -m dashboard`, before any worker starts. gunicorn's threaded
worker builds the TLS context from certfile/keyfile for each connection (gunicorn/sock.py `ssl_wrap_socket`), so
a dashboard certificate the generator renews is served from the next connection on.
"""

from __future__ import annotations

from pki.config import Settings

from .auth import check_exposure, tls_files

_settings = Settings.from_env()
check_exposure(_settings)
if _settings.dashboard_tls:
    _cert, _key = tls_files(_settings)
    certfile, keyfile = str(_cert), str(_key)

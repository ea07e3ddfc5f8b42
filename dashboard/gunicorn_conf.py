"""gunicorn settings of the dashboard image (`gunicorn --config python:dashboard.gunicorn_conf`).

HTTPS with the lab's dashboard certificate when DASHBOARD_TLS=1, which beyond loopback (the container binds
0.0.0.0) is mandatory: the same check as `python -m dashboard`, before any worker starts.

`dashboard:create_app()` only wires the app; the worker starts its services once it is loaded
(`post_worker_init`) and stops them when it exits (`worker_exit`), as `python -m dashboard` does.
"""

from __future__ import annotations

from typing import Any

from pki.config import Settings

from .auth import check_exposure, tls_files

_settings = Settings.from_env()
check_exposure(_settings)
if _settings.dashboard_tls:
    _cert, _key = tls_files(_settings)
    certfile, keyfile = str(_cert), str(_key)


def post_worker_init(worker: Any) -> None:
    from dashboard import start

    start(worker.wsgi)


def worker_exit(server: Any, worker: Any) -> None:
    from dashboard import shutdown

    if getattr(worker, "wsgi", None) is not None:
        shutdown(worker.wsgi)

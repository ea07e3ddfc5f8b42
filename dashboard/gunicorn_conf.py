"""gunicorn settings of the dashboard image (`gunicorn --config python:dashboard.gunicorn_conf`).

HTTPS with the lab's dashboard certificate when DASHBOARD_TLS=1, which beyond loopback (the container binds
0.0.0.0) is mandatory: the same check as `python -m dashboard`, before any worker starts. gunicorn's threaded
worker builds the TLS context from certfile/keyfile for each connection (gunicorn/sock.py `ssl_wrap_socket`), so
a dashboard certificate the generator renews is served from the next connection on.

`dashboard:create_app()` only wires the app; the worker starts its services once it is loaded
(`post_worker_init`) and stops them when it exits (`worker_exit`), as `python -m dashboard` does.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from pki.config import Settings
from pki.tls import TLS12_CIPHERS, apply_server_policy

from .auth import check_exposure, tls_files

_settings = Settings.from_env()
check_exposure(_settings)
if _settings.dashboard_tls:
    _cert, _key = tls_files(_settings)
    certfile, keyfile = str(_cert), str(_key)
    ciphers = TLS12_CIPHERS  # gunicorn sets them on its context for each connection


def ssl_context(config: Any, default_ssl_context_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """gunicorn's server hook: its context, with the lab's TLS policy (TLS 1.2 at least, pki/tls.py)."""
    return apply_server_policy(default_ssl_context_factory())


def post_worker_init(worker: Any) -> None:
    from dashboard import start

    start(worker.wsgi)


def worker_exit(server: Any, worker: Any) -> None:
    from dashboard import shutdown

    if getattr(worker, "wsgi", None) is not None:
        shutdown(worker.wsgi)

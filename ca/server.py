"""The CA's HTTPS endpoint: EST and ACME as one small Flask app on CA_HTTPS_PORT (default 8443, 127.0.0.1).

TLS with the dashboard's server certificate (issued by the root for `localhost`, `dashboard` and 127.0.0.1).
The server asks every client for a certificate chaining to the root but does not require one (CERT_OPTIONAL):
EST's simplereenroll authenticates with it, everything else uses HTTP Basic or JWS. Werkzeug's server puts a
verified client certificate in the WSGI environ as SSL_CLIENT_CERT (PEM).
"""

from __future__ import annotations

import logging
import ssl
import threading

from flask import Flask
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from lab.rotation import ServerContext
from pki.config import Settings
from pki.service import CAService
from pki.store import CertsLayout
from pki.tls import server_context

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
CLIENT_TIMEOUT = 30.0  # seconds a connection may stay silent, in the TLS handshake or between requests


def create_ca_app(service: CAService, settings: Settings) -> Flask:
    """The EST and ACME blueprints over one CAService (the caller's: the same lockout and unlocked key)."""
    from . import acme, est

    app = Flask("ca")
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY)
    app.extensions["ca_service"] = service
    app.extensions["lab_settings"] = settings
    est.init_app(app)
    acme.init_app(app)
    return app


def tls_context(settings: Settings) -> ssl.SSLContext:
    """TLS 1.2+, the dashboard's certificate, client certificates requested and checked against the root."""
    layout = CertsLayout(settings.certs_dir)
    context = server_context(layout.cert("dashboard"), layout.key("dashboard"))
    context.load_verify_locations(cafile=str(layout.ca_cert))
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


class _Handler(WSGIRequestHandler):
    """Werkzeug's handler with a socket timeout: a client that stalls (in the handshake too) is dropped."""

    timeout = CLIENT_TIMEOUT


class CAHttpsServer:
    """The app behind Werkzeug's threaded server with TLS, in a daemon thread (`start`, `stop`).

    The listening socket is wrapped with `do_handshake_on_connect=False`, so each TLS handshake runs in the
    connection's own thread (on its first read) under CLIENT_TIMEOUT: wrapped by Werkzeug, the handshake would
    run inside `accept`, and one local process that connects and never speaks would stall the endpoint.
    """

    def __init__(
        self, service: CAService, settings: Settings, *, host: str | None = None, port: int | None = None
    ) -> None:
        self.app = create_ca_app(service, settings)
        layout = CertsLayout(settings.certs_dir)
        # New handshakes get the dashboard certificate the generator renewed (lab/rotation.py).
        self.tls = ServerContext(
            lambda: tls_context(settings),
            layout.cert("dashboard"),
            layout.key("dashboard"),
            ca=layout.ca_cert,
            interval=settings.cert_watch_seconds,
            name="ca-https-cert-watch",
        )
        context = self.tls.context
        self.server = ThreadedWSGIServer(
            host or settings.ca_https_host,
            settings.ca_https_port if port is None else port,
            self.app,
            handler=_Handler,
        )
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.server.ssl_context = context  # Werkzeug then reports https and the client certificate
        self.port = self.server.server_port
        self._thread = threading.Thread(target=self.server.serve_forever, name="ca-https", daemon=True)

    def start(self) -> CAHttpsServer:
        self.tls.start()
        self._thread.start()
        log.info(
            "EST and ACME on https://%s:%d/ (.well-known/est/, acme/directory)",
            self.server.server_address[0],
            self.port,
        )
        return self

    def stop(self) -> None:
        self.tls.stop()
        self.server.shutdown()
        self._thread.join(timeout=10)
        self.server.server_close()


def start_ca_https(service: CAService, settings: Settings) -> CAHttpsServer | None:
    """Serve EST and ACME when CA_HTTPS_PORT is not 0 (the serving entry point calls this)."""
    if not settings.ca_https_port:
        return None
    return CAHttpsServer(service, settings).start()

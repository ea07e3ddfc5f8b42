"""One CA service replica: the only process that reads the CA key and CA_PASSPHRASE (`python -m ca`).

`CAProcess(settings, name="ca-<n>", secret=..., options=CAProcessOptions(...))` wires, `start()` starts and
`shutdown()` stops, in reverse order:

- the CAService (pki/service.py: the unlocked root, the inventory, the lockout, all in the shared database);
- the internal HTTP API (ca/http.py) on CA_INTERNAL_HOST:CA_INTERNAL_PORT, which the dashboard forwards
  `/v1/ssl/*` to (ca/internal.py: the shared secret);
- its own MQTT connection as `<name>` (ca/mqtt.py): the MQTT CA endpoint through `$share/ca/...`, and the
  revocation side-effects (ca/revocation.py: dynamic-security disconnect, presence `offline`);
- the CRL refresher (every CRL_CHECK_INTERVAL seconds; every replica runs one: the writes are serialised by the
  inventory's database lock, and a CRL that is already current is left alone);
- EST and ACME on CA_HTTPS_PORT (ca/server.py), when not 0.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server

from pki.config import Settings
from pki.metrics import CAMetrics, new_registry
from pki.service import CAService

from .http import create_internal_app
from .mqtt import CAConnection, CAMqttEndpoint
from .revocation import RevocationEnforcer
from .server import CAHttpsServer

log = logging.getLogger(__name__)

# Seconds between two checks of the CRL (a parse and a signature check, well under a millisecond): rewritten
# from the inventory when damaged, deleted or less than 20 days from its next update, so a damaged CRL is
# repaired within two checks (the contract: within 10 s).
CRL_CHECK_INTERVAL = 5.0


@dataclass(frozen=True)
class CAProcessOptions:
    """Where a replica listens and what it runs: the internal API's address (port 0: a free one), its own MQTT
    connection or not, EST/ACME's port (None: CA_HTTPS_PORT; 0: off), seconds between CRL checks (0: none)."""

    internal_host: str = "127.0.0.1"
    internal_port: int = 0
    mqtt: bool = True
    https_port: int | None = None
    crl_interval: float = CRL_CHECK_INTERVAL


class CAProcess:
    def __init__(
        self,
        settings: Settings,
        *,
        name: str = "ca-1",
        secret: str,
        options: CAProcessOptions | None = None,
        service: CAService | None = None,
    ) -> None:
        options = options or CAProcessOptions()
        mqtt = options.mqtt
        self.settings = settings
        self.name = name
        # This replica's counters (issued, refused, lockouts, latency: pki/metrics.py), served to the dashboard
        # on the internal port (GET /metrics, ca/http.py), which shows every replica's under its `/metrics`.
        self.registry = new_registry()
        self.service = service or CAService(settings, metrics=CAMetrics(self.registry))
        self.connection: CAConnection | None = CAConnection(settings, name) if mqtt else None
        self.mqtt: CAMqttEndpoint | None = None
        self.revocation: RevocationEnforcer | None = None
        if self.connection is not None:
            self.mqtt = CAMqttEndpoint(self.service, self.connection)
            self.mqtt.register()
            self.revocation = RevocationEnforcer(self.service, self.connection)
            self.service.on_revoked.append(self.revocation.revoked)
        self.app = create_internal_app(self.service, secret, health=self.health, registry=self.registry)
        self.server: BaseWSGIServer = make_server(options.internal_host, options.internal_port, self.app, threaded=True)
        self.internal_port = self.server.server_port
        self.https_port = settings.ca_https_port if options.https_port is None else options.https_port
        self.https: CAHttpsServer | None = None
        self.crl_interval = options.crl_interval
        self._crl_stop = threading.Event()
        self._crl_thread: threading.Thread | None = None
        self._http_thread: threading.Thread | None = None

    @property
    def internal_url(self) -> str:
        host = self.server.server_address[0]
        return f"http://{host}:{self.internal_port}"

    def health(self) -> dict[str, Any]:
        mqtt_state = self.connection.status() if self.connection is not None else {"connected": None}
        ok = mqtt_state["connected"] is not False
        return {"status": "ok" if ok else "degraded", "identity": self.name, "mqtt": mqtt_state}

    def start(self) -> CAProcess:
        self._http_thread = threading.Thread(target=self.server.serve_forever, name=f"{self.name}-http", daemon=True)
        self._http_thread.start()
        if self.connection is not None:
            self.connection.start()
        if self.crl_interval:
            self.start_crl_refresh()
        if self.https_port:
            self.https = CAHttpsServer(self.service, self.settings, port=self.https_port).start()
        log.info("%s: internal API on %s", self.name, self.internal_url)
        return self

    def start_crl_refresh(self, interval: float | None = None) -> None:
        """Check the CRL now and every `interval` seconds (a daemon thread); an expired CRL locks every client out."""
        self.stop_crl_refresh()
        every = interval or self.crl_interval or CRL_CHECK_INTERVAL
        stop = self._crl_stop = threading.Event()

        def refresh() -> None:
            while True:
                try:
                    self.service.refresh_crl()
                except Exception:  # keep the timer alive whatever happens; the next round tries again
                    log.exception("CRL refresh failed")
                if stop.wait(every):
                    return

        self._crl_thread = threading.Thread(target=refresh, name="crl-refresh", daemon=True)
        self._crl_thread.start()

    def stop_crl_refresh(self) -> None:
        self._crl_stop.set()
        if self._crl_thread is not None:
            self._crl_thread.join(timeout=10)
            self._crl_thread = None

    def shutdown(self) -> None:
        """Stop everything start() started, then close the database."""
        self.stop_crl_refresh()
        if self.https is not None:
            self.https.stop()
        self.server.shutdown()
        self.server.server_close()
        if self.revocation is not None:
            self.revocation.close()
        if self.connection is not None:
            self.connection.stop()
        if self.mqtt is not None:
            self.mqtt.close()
        if self._http_thread is not None:
            self._http_thread.join(timeout=10)
        self.service.close()

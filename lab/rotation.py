"""Running processes follow certificate files renewed under them (by the generator, the CA, or the device itself).

A renewal replaces the key and then the certificate, each by atomic rename (pki/entity_files.py `EntityFiles.write`
for the generator and the CA, lab/credentials.py `store` for a device's own renewal). A running process holds the
pair it loaded in memory (an MQTT client's TLS context, a TLS server's SSLContext), so it has to look: `PairWatcher`
reads both files every CERT_WATCH_SECONDS (default 5 s) and calls back once they hold another *complete* pair, the
key matching the certificate (never between the two renames). The superseded certificate goes on the CRL
SUPERSEDED_GRACE_SECONDS (default 900 s) after its successor was issued (pki/inventory.py `revoked_serials`), so a
process is on the new pair long before the old one is refused.

- MQTT clients (the thermometer, lab/device.py; the dashboard's bridge, dashboard/mqtt_bridge.py): paho cannot
  change a client's TLS identity, so the callback replaces the client by a new one that reads the files again.
- TLS servers (the dashboard's HTTPS, the CA's EST/ACME endpoint): `ServerContext` gives each new handshake the
  newest pair through the context's `sni_callback` (the public way to choose a certificate per connection);
  connections already open keep theirs.

Nothing here logs key material: serials only.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pki.authority import CAError, load_certificate, load_private_key, public_key_matches, serial_hex
from pki.store import FileSnapshot

log = logging.getLogger(__name__)

WATCH_SECONDS = 5.0  # the default of CERT_WATCH_SECONDS (pki/config.py)


@dataclass(frozen=True)
class Pair:
    """What a certificate and key file hold together: the certificate's serial and a digest of both files."""

    serial: str
    digest: str


class PairFiles:
    """A certificate file and its key file, read again only when one of them was replaced (FileSnapshot).

    With `ca`, the root the process verifies its peers with counts too: a new root (the generator reissues
    every leaf and rewrites each folder's root_ca.crt after the leaf) changes the pair once more.
    """

    def __init__(self, cert: Path, key: Path, ca: Path | None = None) -> None:
        self.cert, self.key = Path(cert), Path(key)
        self._cert, self._key = FileSnapshot(self.cert), FileSnapshot(self.key)
        self._ca = FileSnapshot(Path(ca)) if ca is not None else None
        self._last: tuple[bytes, bytes, bytes, Pair | None] | None = None
        self._lock = threading.Lock()  # the watcher's thread and the one replacing a client both read

    def read(self) -> Pair | None:
        """The pair in the files now; None while they are missing, unreadable or do not belong together."""
        with self._lock:
            return self._read()

    def _read(self) -> Pair | None:
        try:
            cert_data, key_data = self._cert.read(), self._key.read()
            ca_data = (self._ca.read() or b"") if self._ca is not None else b""
        except OSError:
            return None
        if cert_data is None or key_data is None:
            return None
        if self._last is not None and self._last[:3] == (cert_data, key_data, ca_data):
            return self._last[3]
        pair = None
        try:
            cert = load_certificate(cert_data)
            if public_key_matches(cert, load_private_key(key_data)):  # type: ignore[arg-type]
                digest = hashlib.sha256(
                    b"".join(b"%d:%s" % (len(part), part) for part in (cert_data, key_data, ca_data))
                ).hexdigest()
                pair = Pair(serial_hex(cert), digest)
        except CAError:  # unreadable, or an encrypted key: no pair a process could load
            pair = None
        self._last = (cert_data, key_data, ca_data, pair)
        return pair


class PairWatcher:
    """A daemon thread: every `interval` seconds, `on_change(pair)` when the files hold a complete pair other than
    `in_use`. The callback returns True once the pair is in use (then it is `in_use`); False, or an exception
    (logged), and the next round tries again."""

    def __init__(
        self,
        cert: Path,
        key: Path,
        on_change: Callable[[Pair], bool],
        *,
        ca: Path | None = None,
        interval: float = WATCH_SECONDS,
        name: str = "cert-watch",
    ) -> None:
        self.files = PairFiles(cert, key, ca)
        self.on_change = on_change
        self.interval = interval
        self.name = name
        self.in_use: Pair | None = self.files.read()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """One look at the files; True when a new pair was taken into use."""
        pair = self.files.read()
        if pair is None or pair == self.in_use:
            return False
        if not self.on_change(pair):
            return False
        self.in_use = pair
        return True

    def start(self) -> PairWatcher:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # keep watching whatever happened; the next round tries again
                log.exception("%s: switching to the renewed files %s failed", self.name, self.files.cert)


def follow_renewals(identity: Any, interval: float, reconnect: Callable[[], None], name: str) -> PairWatcher:
    """A started watcher of an MQTT identity's files (lab.mqtt.Identity: cert, key, ca_cert) that calls
    `reconnect()` (a new paho client reading the files again: paho cannot change a client's TLS identity) when
    they were renewed under the running process (the generator, the CA)."""

    def renewed(pair: Pair) -> bool:
        log.info("%s: certificate renewed (serial %s): taking it into use", name, pair.serial)
        reconnect()
        return True

    return PairWatcher(
        identity.cert, identity.key, renewed, ca=identity.ca_cert, interval=interval, name=f"{name}-cert-watch"
    ).start()


class ServerContext:
    """The SSLContext of a TLS server whose certificate follows its files.

    `context` wraps the listening socket once; its `sni_callback` hands every new handshake the context built
    from the newest complete pair (`make()` again, so every setting stays as the first one had it). Nothing is
    changed in a context that is in use: a handshake sees either the old pair or the new one, never half of each.
    """

    def __init__(
        self,
        make: Callable[[], ssl.SSLContext],
        cert: Path,
        key: Path,
        *,
        ca: Path | None = None,
        interval: float = WATCH_SECONDS,
        name: str = "tls-cert-watch",
    ) -> None:
        self._make = make
        self.context = make()
        self._current = self.context
        self.context.sni_callback = self._select
        self.watcher = PairWatcher(cert, key, self._reload, ca=ca, interval=interval, name=name)

    @property
    def serial(self) -> str | None:
        """Serial of the certificate new handshakes get."""
        return self.watcher.in_use.serial if self.watcher.in_use else None

    def start(self) -> ServerContext:
        self.watcher.start()
        return self

    def stop(self) -> None:
        self.watcher.stop()

    def _select(self, sock: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None, _context: ssl.SSLContext) -> None:
        current = self._current
        if sock.context is not current:
            sock.context = current

    def _reload(self, pair: Pair) -> bool:
        self._current = self._make()  # raises (logged by the watcher) if the files changed again meanwhile
        log.info(
            "%s: new TLS connections get certificate serial %s from %s",
            self.watcher.name,
            pair.serial,
            self.watcher.files.cert,
        )
        return True

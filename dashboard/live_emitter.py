"""The live hub's emitter (dashboard/live.py): one thread that pushes a batch to the browsers every FLUSH_INTERVAL,
stores the readings, keeps the certificate table fresh (spaced by its cost) and prunes old readings.

`LiveHub` owns a `LiveEmitter` and hands it `drain` (what changed in the hub's live state since the last call) and
`on_certificates` (the certificate states, for the hub's device cards); the emitter owns everything downstream of
the hub's state: the browsers' pushes, the readings store, the certificate table.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .certificates import CertificateView
from .readings import ReadingIn, ReadingStore

log = logging.getLogger(__name__)

# Seconds between two pushes to the browsers (at most 10 per second). A reading waits up to one interval for
# its push, so this bounds the publish-to-browser latency (the bench's p99 target is 250 ms).
FLUSH_INTERVAL = 0.1
CERTS_POLL_INTERVAL = 2.0  # how often the emitter checks whether the certificate table changed
# A CA reply makes the emitter re-check sooner, but not more often than this: rebuilding the table walks the
# whole inventory, and under an issuance storm replies come thousands of times a second.
CERTS_DUE_MIN_GAP = 1.0
# Rebuilding the table costs time proportional to the inventory (every certificate ever issued): after a
# rebuild that took t seconds the next waits at least CERTS_COST_FACTOR * t, so however large the inventory
# grows the table never takes more than ~5% of the process (it lags instead; a browser's refresh is not held).
CERTS_COST_FACTOR = 20
CERTS_FULL_REFRESH = 60.0  # days-left values age even when nothing changes
PRUNE_INTERVAL = 300.0


Drain = Callable[[], tuple[dict[str, Any] | None, list[ReadingIn]]]


class LiveEmitter:
    """Batched pushes, database writes, certificate refreshes and pruning, on one thread (or called directly when
    there is none: tests, MQTT disabled)."""

    def __init__(
        self,
        drain: Drain,
        emit: Callable[..., Any],
        store: ReadingStore | None,
        certificates: CertificateView,
        on_certificates: Callable[[dict[str, Any]], None],
    ) -> None:
        self.drain = drain
        self._emit = emit
        self.store = store
        self.certificates = certificates
        self._on_certificates = on_certificates
        self._certs_lock = threading.Lock()
        self._certs: dict[str, Any] | None = None
        self._certs_signature: Any = None
        self.certs_due = True  # re-check the certificate table on a coming tick (spaced: CERTS_DUE_MIN_GAP)
        self._certs_forced = False
        self.stored_total = 0  # readings this process wrote to the database
        self.emits_total = 0
        self.db_error: str | None = None
        self._stop = threading.Event()
        self._thread: Any = None

    # -- certificates ----------------------------------------------------------------------------

    def certs(self) -> dict[str, Any]:
        if self._certs is None:
            self.refresh_certs(force=True, broadcast=False)
        return self._certs or {"certs": [], "crl": {"present": False}, "summary": {}}

    def refresh_certs(self, force: bool = False, broadcast: bool = True) -> bool:
        """Recompute the certificate table when it changed (or when forced); True when it was sent."""
        with self._certs_lock:
            try:
                signature = self.certificates.signature()
                if not force and signature == self._certs_signature:
                    return False
                self._certs = self.certificates.snapshot()
                self._certs_signature = signature
            except Exception:
                log.exception("could not read the certificate state")
                return False
            data = self._certs
        self._on_certificates(data.get("entities") or {})
        if broadcast:
            self.send("certs", data)
        return True

    def request_certs_refresh(self) -> None:
        """A browser asks for a fresh table: the emitter does it on its next tick (so at most 4/s)."""
        if self._thread is not None:
            self.certs_due = True
            self._certs_forced = True
        else:  # no emitter (tests, MQTT disabled): answer now
            self.refresh_certs(force=True)

    def certificates_changed(self) -> None:
        """The CA in this process issued, renewed or revoked something: re-read the table on a coming tick (not
        forced, so the emitter's spacing still holds under an issuance storm)."""
        if self._thread is not None:
            self.certs_due = True
        else:  # no emitter (tests, MQTT disabled): now
            self.refresh_certs()

    # -- the emitter -----------------------------------------------------------------------------

    def flush(self) -> dict[str, Any] | None:
        """One emitter tick: push the batch (one event for everything), then store the readings."""
        batch, readings = self.drain()
        if batch is not None:
            self.send("batch", batch)
        if readings and self.store is not None:
            try:
                self.store.add_many(readings)
                self.stored_total += len(readings)
                self.db_error = None
            except Exception as ex:
                self.db_error = f"{type(ex).__name__}: {ex}"
                log.exception("could not store %d readings; they are dropped", len(readings))
        return batch

    def send(self, event: str, data: dict[str, Any]) -> None:
        try:
            self._emit(event, data)
            self.emits_total += 1
        except Exception:
            log.exception("could not push %s to the browsers", event)

    def prune(self) -> None:
        if self.store is None:
            return
        try:
            self.store.prune()
        except Exception:
            log.exception("could not prune old readings")

    def run(self) -> None:
        """The emitter loop (a background task): flush, watch the certificates, prune."""
        next_certs = last_certs = 0.0
        certs_gap = CERTS_DUE_MIN_GAP
        next_full = time.monotonic() + CERTS_FULL_REFRESH
        next_prune = time.monotonic() + 30
        next_flush = time.monotonic()
        while True:
            # A fixed clock rather than a fixed pause, so a slow flush does not stretch every reading's wait;
            # at least a quarter interval between two flushes, so a flush slower than the interval cannot spin.
            next_flush = max(next_flush + FLUSH_INTERVAL, time.monotonic() + FLUSH_INTERVAL / 4)
            if self._stop.wait(next_flush - time.monotonic()):
                break
            try:
                self.flush()
                now = time.monotonic()
                if self._certs_forced or (now >= last_certs + certs_gap and (now >= next_certs or self.certs_due)):
                    self.certs_due = False
                    last_certs = now
                    full = now >= next_full or self._certs_forced
                    self._certs_forced = False
                    self.refresh_certs(force=full)
                    certs_gap = max(CERTS_DUE_MIN_GAP, CERTS_COST_FACTOR * (time.monotonic() - now))
                    next_certs = now + max(CERTS_POLL_INTERVAL, certs_gap)
                    if full:
                        next_full = now + CERTS_FULL_REFRESH
                if now >= next_prune:
                    self.prune()
                    next_prune = now + PRUNE_INTERVAL
            except Exception:  # the loop must survive anything
                log.exception("live emitter tick failed")
        self.flush()

    def start(self, start_task: Callable[..., Any]) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = start_task(self.run)

    def stop(self, timeout: float = 5) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and hasattr(thread, "join"):
            thread.join(timeout)

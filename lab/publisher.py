"""The thermometer: one device that takes a reading every interval and publishes it over its MQTT session.

Readings wait in a bounded buffer (`lab/buffer.py`) while the broker is unreachable; `seq` numbers each reading
of this process, so a consumer can prove there is no gap. The session (`lab/session.py`) connects, reconnects,
notices a revoked certificate (then `run()` returns with `revoked` set) and switches to renewed certificates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .buffer import BUFFER_SIZE
from .device_config import DeviceConfig
from .renewal import RenewalPolicy, Renewer
from .session import KEEPALIVE, STOP_POLL, DeviceSession
from .temperature import TemperatureWalk, baseline_for, make_reading

log = logging.getLogger("thermometer")

SHUTDOWN_ACK_TIMEOUT = 5.0


class Thermometer(DeviceSession):
    """A device session that takes a reading every interval. `run()` publishes until `request_stop()`, then
    shuts down cleanly."""

    def __init__(
        self,
        config: DeviceConfig,
        walk: TemperatureWalk | None = None,
        buffer_size: int = BUFFER_SIZE,
        renewal: RenewalPolicy | None = None,
        renew_request: Callable[[str], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(config, buffer_size)
        self.walk = walk or TemperatureWalk(baseline_for(config.device_id))
        self.renewer = Renewer(self, renewal, request=renew_request) if renewal is not None else None

    def take_reading(self, seconds: float) -> dict[str, Any]:
        """Advance the walk by `seconds` and queue the next reading (the oldest is dropped when full)."""
        self.seq += 1
        reading = make_reading(self.config.device_id, self.seq, self.walk.step(seconds))
        self.buffer.add(reading)
        return reading

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        config = self.config
        log.info(
            "%s starting: broker %s:%s, a reading every %g s",
            config.device_id,
            config.broker_address,
            config.broker_port,
            config.interval,
        )
        self.client.connect_async(config.broker_address, config.broker_port, keepalive=KEEPALIVE)
        self.client.loop_start()
        if self.renewer is not None:
            self.renewer.start()
        self.watcher.start()
        try:
            next_due = time.monotonic()
            last = next_due - config.interval
            while self._stop_reason is None:
                self._wake.clear()  # before flushing: a reconnect from here on wakes the wait below
                now = time.monotonic()
                if now >= next_due:
                    self.take_reading(now - last)
                    last = now
                    # Fixed rate, not fixed delay; after a stall (suspend) resume instead of bursting.
                    next_due = max(next_due + config.interval, now)
                backlog = len(self.pending)
                sent = self.flush()
                if sent > 1 and backlog > 1:
                    log.info("%s sent %d readings buffered while offline", config.device_id, sent)
                self._wait(next_due - time.monotonic())
            log.info("%s stopping (%s)", config.device_id, self._stop_reason)
        finally:
            self.shutdown()

    def _wait(self, seconds: float) -> None:
        """Sleep until the next reading, a reconnect (flush now) or a stop request."""
        deadline = time.monotonic() + seconds
        while self._stop_reason is None and not self._wake.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.wait(min(remaining, STOP_POLL))

    def shutdown(self) -> None:
        """Deliver what is in flight, publish retained `offline`, wait for the acks, then disconnect."""
        config = self.config
        self.watcher.stop()
        if self.renewer is not None:
            self.renewer.stop()
        if self.connected.is_set():
            self.flush()
            self.inflight.publish(config.status_topic, "offline", retain=True)  # after the readings, on the same link
            deadline = time.monotonic() + SHUTDOWN_ACK_TIMEOUT
            while self.outstanding > 0 and self.connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            if self.outstanding <= 0:
                log.info("%s status offline acknowledged", config.device_id)
            else:
                log.warning(
                    "%s: the broker did not acknowledge status offline (and %d more); its last will "
                    "says offline instead",
                    config.device_id,
                    self.outstanding - 1,
                )
        if self.pending:
            log.warning(
                "%s stopping while disconnected: %d buffered readings are lost", config.device_id, len(self.pending)
            )
        self._closing.set()
        self.client.disconnect()
        self.client.loop_stop()
        log.info("%s stopped after %d readings", config.device_id, self.seq)

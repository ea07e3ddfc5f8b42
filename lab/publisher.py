"""The thermometer: one device that takes a reading every interval and publishes it over its MQTT session.

Readings wait in a bounded buffer (`lab/buffer.py`) while the broker is unreachable; `seq` numbers each reading
of this process, so a consumer can prove there is no gap. The thermometer owns both and composes its MQTT
session (`lab/session.py`: connects, reconnects, notices a revoked certificate, then `run()` returns with
`revoked` set, and switches to renewed certificates) and, with a renewal policy, its renewer (`lab/renewal.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .buffer import BUFFER_SIZE, ReadingBuffer
from .device_config import DeviceConfig
from .renewal import RenewalPolicy, Renewer
from .session import DeviceSession
from .temperature import TemperatureWalk, baseline_for, make_reading

log = logging.getLogger("thermometer")


class Thermometer:
    """A device that takes a reading every interval and sends it over its `session`. `run()` publishes until
    `request_stop()` (or a revoked certificate: then `revoked`), then shuts down cleanly.

    It owns `seq` and the `buffer` its readings wait in; the session gets the buffer to send from and asks
    `seq` for its log. The renewer (with `renewal`) works on the session, not on the thermometer.
    """

    def __init__(
        self,
        config: DeviceConfig,
        walk: TemperatureWalk | None = None,
        buffer_size: int = BUFFER_SIZE,
        renewal: RenewalPolicy | None = None,
        renew_request: Callable[[str], dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.walk = walk or TemperatureWalk(baseline_for(config.device_id))
        self.seq = 0
        self.buffer = ReadingBuffer(buffer_size)
        self.session = DeviceSession(config, self.buffer, lambda: self.seq)
        self.renewer = Renewer(self.session, renewal, request=renew_request) if renewal is not None else None

    @property
    def revoked(self) -> bool:
        """The broker refused the certificate as revoked: `run()` returned and the session never reconnects."""
        return self.session.revoked

    def request_stop(self, reason: str = "stop requested") -> None:
        """Safe from a signal handler (takes no lock): `run()` notices within STOP_POLL, shuts down, returns."""
        self.session.request_stop(reason)

    def take_reading(self, seconds: float) -> dict[str, Any]:
        """Advance the walk by `seconds` and queue the next reading (the oldest is dropped when full)."""
        self.seq += 1
        reading = make_reading(self.config.device_id, self.seq, self.walk.step(seconds))
        self.buffer.add(reading)
        return reading

    def flush(self) -> int:
        """Hand the buffered readings the session can send now to paho; how many it handed over."""
        return self.session.flush()

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        config, session = self.config, self.session
        log.info(
            "%s starting: broker %s:%s, a reading every %g s",
            config.device_id,
            config.broker_address,
            config.broker_port,
            config.interval,
        )
        session.start()
        if self.renewer is not None:
            self.renewer.start()
        try:
            next_due = time.monotonic()
            last = next_due - config.interval
            while session.stop_reason is None:
                now = time.monotonic()
                if now >= next_due:
                    self.take_reading(now - last)
                    last = now
                    # Fixed rate, not fixed delay; after a stall (suspend) resume instead of bursting.
                    next_due = max(next_due + config.interval, now)
                backlog = len(self.buffer.readings)
                sent = session.flush()
                if sent > 1 and backlog > 1:
                    log.info("%s sent %d readings buffered while offline", config.device_id, sent)
                session.sleep(next_due - time.monotonic())  # a connection since the flush ends it early
            log.info("%s stopping (%s)", config.device_id, session.stop_reason)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop following renewed files and renewing, then close the session: what is in flight is delivered and
        `offline` acknowledged. The watcher first, so that no switch starts while the renewer is being stopped."""
        self.session.stop_following()
        if self.renewer is not None:
            self.renewer.stop()
        self.session.close()
        log.info("%s stopped after %d readings", self.config.device_id, self.seq)

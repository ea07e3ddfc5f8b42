"""The offline buffer: readings are produced on schedule whether or not the broker is reachable; the ones that
could not be sent wait here, bounded, and go out oldest first after the reconnect."""

from __future__ import annotations

import collections
import logging
from typing import Any

log = logging.getLogger("thermometer")

BUFFER_SIZE = 1000  # readings kept while the broker is unreachable (~83 min at the default 5 s)


class ReadingBuffer:
    """Readings waiting for the broker, oldest first; when full the oldest is dropped (and counted in `dropped`)."""

    def __init__(self, size: int = BUFFER_SIZE) -> None:
        self.readings: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self.dropped = 0

    def add(self, reading: dict[str, Any]) -> None:
        if len(self.readings) == self.readings.maxlen:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning(
                    "buffer full (%d readings): dropped the oldest, %d so far", self.readings.maxlen, self.dropped
                )
        self.readings.append(reading)

    def requeue(self, readings: list[dict[str, Any]]) -> int:
        """Put unacknowledged readings back in front, oldest first (the oldest go if it is full); how many went back."""
        if not readings:
            return 0
        readings = sorted(readings, key=lambda r: r["seq"])
        maxlen = self.readings.maxlen or len(readings)
        room = max(0, maxlen - len(self.readings))
        if len(readings) > room:
            self.dropped += len(readings) - room
            readings = readings[len(readings) - room :]
        self.readings.extendleft(reversed(readings))
        return len(readings)

"""The live state's parts: a device's card, a chart point, and the parsers of telemetry and presence payloads."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pki.config import DEVICE_ID_RE

TREND_WINDOW = 60  # seconds: the trend compares the newest reading with the mean of this window's start
TREND_THRESHOLD = 0.1  # °C


@dataclass
class DeviceState:
    device_id: str
    configured: bool = False
    temperature: float | None = None
    last_seen: float | None = None  # server receive time of the newest reading
    device_timestamp: str | None = None
    seq: int | None = None
    status: str = "unknown"  # online | offline | unknown (nothing retained yet)
    certificate: str | None = None  # its certificate's state (valid, expiring, expired, revoked, ...), if known
    status_since: float | None = None
    readings: int = 0
    trend: str = "flat"  # up | down | flat
    delta: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)  # every field is a plain value: asdict()'s deep copy is not needed

    def follow_trend(self, buckets: Sequence[Bucket] | None) -> None:
        """Trend and delta from its chart points (oldest first): the temperature against the window's start."""
        if not buckets or self.temperature is None:
            self.trend, self.delta = "flat", 0.0
            return
        # The oldest point inside the window, walking back from the newest (at most TREND_WINDOW steps).
        start = buckets[-1].second - TREND_WINDOW
        reference = buckets[-1]
        for bucket in reversed(buckets):
            if bucket.second < start:
                break
            reference = bucket
        delta = round(self.temperature - reference.mean, 2)
        self.delta = delta
        self.trend = "up" if delta >= TREND_THRESHOLD else "down" if delta <= -TREND_THRESHOLD else "flat"


class Bucket:
    """All readings of one device within one second: the chart's point is their mean."""

    __slots__ = ("second", "total", "count")

    def __init__(self, second: int, value: float) -> None:
        self.second = second
        self.total = value
        self.count = 1

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1

    @property
    def mean(self) -> float:
        return round(self.total / self.count, 3)

    def point(self) -> list[float]:
        return [self.second, self.mean]


def parse_temperature(payload: bytes) -> tuple[float, str | None, int | None]:
    """(temperature, device timestamp, seq) from a telemetry payload; ValueError says what is wrong."""
    try:
        data = json.loads(payload.decode())  # str: json skips sniffing the encoding of bytes
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; [[[[...]]]] a RecursionError
        raise ValueError("not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    value = data.get("temperature")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("temperature is not a number")
    stamp = data.get("timestamp")
    seq = data.get("seq")
    return (
        float(value),
        (str(stamp)[:64] if stamp is not None else None),
        (seq if isinstance(seq, int) and not isinstance(seq, bool) else None),
    )


def parse_status(payload: bytes) -> str | None:
    text = payload.decode("utf-8", errors="replace").strip()
    if text.startswith("{"):
        try:
            text = str(json.loads(text).get("status", ""))
        except (ValueError, AttributeError, RecursionError):
            return None
    text = text.lower()
    return text if text in ("online", "offline") else None


def device_of(topic: str) -> str | None:
    parts = topic.split("/")
    if len(parts) == 4 and DEVICE_ID_RE.match(parts[2]):
        return parts[2]
    return None

"""The live state's parts: a device's card, a chart point, and the parsers of telemetry and presence payloads."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pki.config import DEVICE_ID_RE


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

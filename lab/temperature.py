"""What a thermometer measures: a plausible room temperature per device, and the telemetry payload."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import random
from typing import Any

from pki.authority import utcnow


def baseline_for(device_id: str) -> float:
    """A per-device mean between 18.00 and 25.99 °C, the same on every start (derived from the id)."""
    digest = hashlib.sha256(device_id.encode()).digest()
    return 18.0 + int.from_bytes(digest[:4], "big") % 800 / 100


class TemperatureWalk:
    """A mean-reverting random walk (Ornstein-Uhlenbeck), clamped to baseline ± `bound` °C.

    Exact discretisation, so the statistics do not depend on the interval: with the defaults the
    temperature wanders ~0.8 °C around the baseline, returns with a 10-minute time constant, and moves
    ~0.1 °C between two readings 5 s apart: it looks like a room, not like noise.
    """

    def __init__(
        self,
        baseline: float,
        *,
        spread: float = 0.8,
        reversion_seconds: float = 600.0,
        bound: float = 3.0,
        rng: random.Random | None = None,
    ) -> None:
        self.baseline = baseline
        self.spread = spread  # stationary standard deviation, °C
        self.reversion_seconds = reversion_seconds
        self.bound = bound
        self.rng = rng or random.Random()  # noqa: S311 - a simulation, not security
        self.value = baseline + self.rng.gauss(0, spread / 2)
        self.value = min(max(self.value, baseline - bound), baseline + bound)

    def step(self, seconds: float) -> float:
        decay = math.exp(-seconds / self.reversion_seconds)
        noise = self.spread * math.sqrt(1 - decay * decay)
        value = self.baseline + (self.value - self.baseline) * decay + self.rng.gauss(0, noise)
        self.value = min(max(value, self.baseline - self.bound), self.baseline + self.bound)
        return self.value


def iso_utc(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_reading(device_id: str, seq: int, temperature: float, now: dt.datetime | None = None) -> dict[str, Any]:
    """The telemetry payload (CONTRACT: device_id, timestamp, temperature; `seq` is extra)."""
    return {
        "device_id": device_id,
        "timestamp": iso_utc(now or utcnow()),
        "temperature": round(temperature, 2),
        "seq": seq,
    }

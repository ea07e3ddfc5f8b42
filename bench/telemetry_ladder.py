"""The unit of the telemetry bench's ladders: publish from the device fleet at a rate, then check what one
consumer got (`Phase`); a ladder steps the rate up until a step fails, then bisects (bench.telemetry)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.common import CpuMeter
from bench.rig import MachineMeter, wait_until_quiet
from bench.simdevices import DeviceConnection, Fleet, Pace, publish_at_rate

FOREIGN_LOAD_PCT = 25.0  # CPU used by processes outside the bench during a failed step: measure it again


@dataclass
class Step:
    rate: float
    published: int = 0
    achieved_rate: float = 0.0
    ingested: int = 0
    lost: int = 0
    lag_s: float = 0.0
    ok: bool = False
    why: str = ""
    cpu: dict[str, float] = field(default_factory=dict)
    started: float = 0.0  # wall clock, for the plots
    ended: float = 0.0


@dataclass(frozen=True)
class StepRule:
    """How long one step publishes, how soon the consumer must have caught up after it, and the QoS of the publishes."""

    seconds: float
    max_lag: float
    qos: int = 1


class Phase:
    """Publish at a rate, then check what one consumer (`count()`) got: the unit of the ladder."""

    def __init__(
        self,
        fleet: Fleet,
        connections: list[DeviceConnection],
        count: Callable[[], int],
        pids: dict[str, int],
        rule: StepRule,
    ) -> None:
        self.fleet = fleet
        self.connections = connections
        self.count = count
        self.pids = pids
        self.step_seconds = rule.seconds
        self.max_lag = rule.max_lag
        self.qos = rule.qos

    async def settle(self, quiet: float = 0.5, timeout: float = 30) -> None:
        """Wait until the consumer's counter stops moving (a failed step may leave a backlog draining)."""
        deadline = time.monotonic() + timeout
        last, since = self.count(), time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            now = self.count()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return

    async def run(self, rate: float, seconds: float | None = None) -> Step:
        seconds = seconds or self.step_seconds
        await self.settle()
        step = Step(rate)
        before, acked_before = self.count(), self.fleet.acked()
        meter, machine = CpuMeter(self.pids).start(), MachineMeter().start()
        step.started = time.time()
        sent, elapsed = await publish_at_rate(self.connections, Pace(rate, seconds), qos=self.qos)
        all_acked = await self.fleet.wait_acked(timeout=10) if self.qos else True
        step.cpu = meter.stop()
        # CPU the machine spent on anything but the lab's processes: another job skews the figures.
        step.cpu["other_cpu_pct"] = round(max(machine.stop() - sum(step.cpu.values()), 0.0), 1)
        published = self.fleet.acked() - acked_before if self.qos else sent
        # Caught up? Poll the consumer until it has everything, or max_lag (plus the counter's own delay) passed.
        last_publish = time.monotonic()
        deadline = last_publish + self.max_lag + 0.25
        got = self.count() - before
        while got < published and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            got = self.count() - before
        step.lag_s = round(time.monotonic() - last_publish, 3)
        if got < published:  # not caught up in time: how much was lost for good?
            await self.settle(quiet=1.0)
            got = self.count() - before
        step.ended = time.time()
        step.published, step.ingested = published, got
        step.lost = max(published - got, 0)
        step.achieved_rate = round(published / elapsed, 1)
        reasons = []
        if not all_acked:
            reasons.append("the broker did not acknowledge every publish")
        if step.achieved_rate < 0.95 * rate:
            reasons.append(f"the load generator reached only {step.achieved_rate:.0f} msg/s")
        if step.lost:
            reasons.append(f"{step.lost} lost")
        elif step.lag_s > self.max_lag:
            reasons.append(f"caught up only after {step.lag_s:.2f} s")
        step.ok, step.why = not reasons, "; ".join(reasons)
        return step


@dataclass(frozen=True)
class LadderPlan:
    """The rates of a ladder: `rates` as given, or from `start` growing by `factor` up to `max_rate` until a step
    fails, then `refine` bisections; a step that failed while other processes loaded the machine is measured again
    once it is quiet (waiting up to `quiet_timeout` seconds; 0: never)."""

    rates: list[float] | None
    start: float
    factor: float
    refine: int
    max_rate: float
    quiet_timeout: float = 120


async def ladder(phase: Phase, label: str, plan: LadderPlan) -> tuple[float, list[Step]]:
    """Step through `plan.rates`, or grow from `plan.start` until a step fails and bisect; returns (max sustained,
    steps)."""
    rates, start, factor, refine = plan.rates, plan.start, plan.factor, plan.refine
    max_rate, quiet_timeout = plan.max_rate, plan.quiet_timeout
    steps: list[Step] = []

    async def run(rate: float) -> Step:
        step = await phase.run(rate)
        for _ in range(1):  # a step that failed while something else loaded the machine is measured again
            if step.ok or step.cpu.get("other_cpu_pct", 0) < FOREIGN_LOAD_PCT or quiet_timeout <= 0:
                break
            print(
                f"  {label:<9} {rate:>8.0f} msg/s  failed while other processes used "
                f"{step.cpu['other_cpu_pct']:.0f}% CPU: again once the machine is quiet",
                flush=True,
            )
            await asyncio.to_thread(wait_until_quiet, timeout=quiet_timeout)
            step = await phase.run(rate)
        steps.append(step)
        mark = "ok" if step.ok else f"FAIL ({step.why})"
        cpu = "  ".join(f"{k.removesuffix('_cpu_pct')} {v:.0f}%" for k, v in step.cpu.items())
        print(
            f"  {label:<9} {rate:>8.0f} msg/s  published {step.published:>7}  ingested {step.ingested:>7}  "
            f"lag {step.lag_s:5.2f} s  cpu: {cpu}  {mark}",
            flush=True,
        )
        return step

    if rates:
        for rate in rates:
            await run(rate)
    else:
        low, high, rate = 0.0, 0.0, start
        while rate <= max_rate:
            if (await run(rate)).ok:
                low, rate = rate, rate * factor
            else:
                high = rate
                break
        for _ in range(refine if high else 0):
            mid = round((low + high) / 2, -2) if high - low > 200 else 0
            if not mid or mid in (low, high):
                break
            if (await run(mid)).ok:
                low = mid
            else:
                high = mid
    passed = [s.rate for s in steps if s.ok]
    return (max(passed) if passed else 0.0), steps

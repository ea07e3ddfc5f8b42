"""Telemetry pipeline bench: simulated mTLS devices -> Mosquitto -> the dashboard's ingest -> a Socket.IO client.

Three phases on one throwaway lab (bench.rig), all on loopback:

1. baseline: a bare paho subscriber (bench/paho_subscriber.py, its own process, the dashboard's identity,
   protocol and subscription QoS) while the dashboard is not running (one connection per certificate);
2. latency: the dashboard plus a Socket.IO client (the "browser"); devices publish at a fixed rate with
   their publish time in `timestamp`; every reading that reaches the client as a device's current value
   gives one publish-to-browser latency;
3. ingest: the same rate ladder as the baseline, against the dashboard.

A rate is *sustained* when every message the broker acknowledged was ingested (zero loss) and the
consumer caught up within --max-lag seconds of the last publish. The ladder multiplies the rate until a
step fails, then bisects. Broker, consumer and load-generator CPU come from /proc.

    python -m bench.telemetry                      # the full run (about 3 minutes)
    python -m bench.telemetry --devices 20 --rates 500,1000 --latency-seconds 5   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    CpuMeter,
    Progress,
    plot_latency_histograms,
    plot_timeseries,
    print_targets,
    summary_ms,
    write_results,
)
from bench.rig import BenchLab, MachineMeter, SocketIOWatcher, lab_bench_parser, run_on_lab, wait_until_quiet
from bench.simdevices import DeviceConnection, Fleet, Pace, publish_at_rate

TARGET_INGEST = 10_000  # messages/s with zero loss
TARGET_RATIO = 0.5  # of the bare paho subscriber
TARGET_P99_MS = 250.0  # publish-to-browser at 1,000 msg/s from 200 devices
FOREIGN_LOAD_PCT = 25.0  # CPU used by processes outside the bench during a failed step: measure it again


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return number


def rate_list(value: str) -> list[float]:
    try:
        rates = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of rates") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be positive numbers of messages per second")
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = lab_bench_parser(
        "telemetry",
        "Telemetry pipeline: highest sustained ingest rate with zero loss (dashboard vs a bare paho "
        "subscriber), and publish-to-browser latency at a fixed rate.",
    )
    parser.add_argument("--devices", type=positive_int, default=200,
                        help="simulated devices (one mTLS connection each)")
    parser.add_argument("--rates", type=rate_list, default=None,
                        help="comma-separated rates (msg/s) to step through instead of the automatic ladder")
    parser.add_argument("--start-rate", type=positive_float, default=2000, help="first rate of the automatic ladder")
    parser.add_argument("--factor", type=positive_float, default=1.5, help="ladder growth per passed step")
    parser.add_argument("--refine", type=int, default=3, help="bisection steps after the first failed rate")
    parser.add_argument("--max-rate", type=positive_float, default=60_000, help="the ladder stops here")
    parser.add_argument("--step-seconds", type=positive_float, default=6, help="duration of one ladder step")
    parser.add_argument("--max-lag", type=positive_float, default=0.5,
                        help="a step passes only if the consumer caught up within this many seconds")
    parser.add_argument("--latency-rate", type=positive_float, default=1000, help="msg/s of the latency phase")
    parser.add_argument("--latency-devices", type=positive_int, default=200, help="devices in the latency phase")
    parser.add_argument("--latency-seconds", type=positive_float, default=20, help="duration of the latency phase")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1, help="QoS the devices publish with")
    parser.add_argument("--baseline-qos", type=int, choices=(0, 1), default=None,
                        help="subscription QoS of the bare paho subscriber (default: the dashboard's)")
    parser.add_argument("--skip-baseline", action="store_true", help="no bare paho subscriber phase")
    parser.add_argument("--skip-ladder", action="store_true", help="no dashboard ingest ladder (latency only)")
    parser.add_argument("--profile", type=Path, default=None, metavar="SVG",
                        help="py-spy flame graph of the dashboard during one flood step, written here")
    parser.add_argument("--profile-rate", type=positive_float, default=8000, help="msg/s of the profiled step")
    return parser


def dashboard_subscription_qos() -> int:
    """The QoS the dashboard subscribes to telemetry with: the fair setting for the baseline subscriber."""
    from dashboard import live

    return int(getattr(live, "TEMPERATURE_QOS", 1))


# -- consumers ------------------------------------------------------------------------------------------


class BaselineSubscriber:
    """bench/paho_subscriber.py as a subprocess; `count` follows its stdout, `timeline` keeps (time, count)."""

    def __init__(self, lab: BenchLab, qos: int) -> None:
        argv = [sys.executable, "-m", "bench.paho_subscriber", "--certs-dir", str(lab.settings.certs_dir),
                "--port", str(lab.broker_port), "--name", "dashboard", "--qos", str(qos), "--protocol", "5"]
        self.process = subprocess.Popen(argv, cwd=Path(__file__).resolve().parent.parent, env=lab.env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.process.pid
        self.count = 0
        self.timeline: list[tuple[float, int]] = []
        assert self.process.stdout is not None
        first = self.process.stdout.readline().strip()
        if first != "ready":
            self.close()
            raise RuntimeError(f"the paho subscriber did not start: {first!r}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("count "):
                self.count = int(line.split()[1])
                self.timeline.append((time.time(), self.count))

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class BrowserProbe:
    """What the Socket.IO client saw: ingest counters over time and, while armed, publish-to-browser latencies.

    A push that shows seq `s` as a device's current value reflects every reading of that device up to `s`
    (the card, the chart's per-second mean, the log): each of them gets latency = push received - its publish
    time (recorded by the device, `DeviceConnection.sent_at`). So superseded readings count too, with the
    longer wait they had, rather than only the newest one of each push.
    """

    def __init__(self) -> None:
        self.timeline: list[tuple[float, int]] = []  # (server time, readings ingested)
        self.latencies: list[float] = []
        self.to_push: list[float] = []  # publish -> the dashboard builds the push (server_time)
        self.transport: list[float] = []  # the push's server_time -> the client has decoded it
        self.push_times: list[tuple[float, float]] = []
        self._devices: dict[str, DeviceConnection] = {}
        self._accounted: dict[str, int] = {}  # newest seq already counted, per device

    def arm(self, connections: list[DeviceConnection]) -> None:
        for connection in connections:
            connection.sent_at = [float("nan")] * connection.seq  # readings before the phase do not count
            self._accounted[connection.name] = connection.seq
        self._devices = {c.name: c for c in connections}

    def disarm(self) -> None:
        devices, self._devices = self._devices, {}
        for connection in devices.values():
            connection.sent_at = None

    def on_batch(self, received: float, batch: dict[str, Any]) -> None:
        stats = batch.get("stats") or {}
        if "readings" in stats:
            self.timeline.append((batch.get("server_time", received), int(stats["readings"])))
        devices = self._devices
        built = float(batch.get("server_time", received))
        if devices:
            self.transport.append(received - built)
            self.push_times.append((built, received))
        for device in batch.get("devices") or ():
            connection = devices.get(device.get("device_id"))
            seq = device.get("seq")
            if connection is None or not isinstance(seq, int) or connection.sent_at is None:
                continue
            sent_at, first = connection.sent_at, self._accounted[connection.name]
            for index in range(first, min(seq, len(sent_at))):
                self.latencies.append(received - sent_at[index])
                self.to_push.append(built - sent_at[index])
            self._accounted[connection.name] = max(first, seq)


# -- the ladder -----------------------------------------------------------------------------------------


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


class Phase:
    """Publish at a rate, then check what one consumer (`count()`) got: the unit of the ladder."""

    def __init__(self, fleet: Fleet, connections: list[DeviceConnection], count: Callable[[], int],
                 pids: dict[str, int], step_seconds: float, max_lag: float, qos: int) -> None:
        self.fleet = fleet
        self.connections = connections
        self.count = count
        self.pids = pids
        self.step_seconds = step_seconds
        self.max_lag = max_lag
        self.qos = qos

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


async def ladder(phase: Phase, label: str, rates: list[float] | None, start: float, factor: float, refine: int,
                 max_rate: float) -> tuple[float, list[Step]]:
    """Step through `rates`, or grow from `start` until a step fails and bisect; returns (max sustained, steps)."""
    steps: list[Step] = []

    async def run(rate: float) -> Step:
        step = await phase.run(rate)
        for _ in range(2):  # a step that failed while something else loaded the machine is measured again
            if step.ok or step.cpu.get("other_cpu_pct", 0) < FOREIGN_LOAD_PCT:
                break
            print(f"  {label:<9} {rate:>8.0f} msg/s  failed while other processes used "
                  f"{step.cpu['other_cpu_pct']:.0f}% CPU: again once the machine is quiet", flush=True)
            await asyncio.to_thread(wait_until_quiet)
            step = await phase.run(rate)
        steps.append(step)
        mark = "ok" if step.ok else f"FAIL ({step.why})"
        cpu = "  ".join(f"{k.removesuffix('_cpu_pct')} {v:.0f}%" for k, v in step.cpu.items())
        print(f"  {label:<9} {rate:>8.0f} msg/s  published {step.published:>7}  ingested {step.ingested:>7}  "
              f"lag {step.lag_s:5.2f} s  cpu: {cpu}  {mark}", flush=True)
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


# -- the run ----------------------------------------------------------------------------------------------


def profile_dashboard(pid: int, seconds: float, svg: Path) -> subprocess.Popen[bytes]:
    """py-spy (requirements-dev.txt) sampling the dashboard while the GIL is held: where its time goes."""
    svg.parent.mkdir(parents=True, exist_ok=True)
    local = Path(sys.executable).with_name("py-spy")
    spy = str(local) if local.exists() else shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("--profile needs py-spy: pip install -r requirements-dev.txt")
    argv = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250", "--gil",
            "--nonblocking", "--format", "flamegraph", "--output", str(svg)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def run(args: argparse.Namespace, lab: BenchLab) -> dict[str, Any]:
    dashboard_qos = dashboard_subscription_qos()
    baseline_qos = dashboard_qos if args.baseline_qos is None else args.baseline_qos
    n_devices = max(args.devices, args.latency_devices)
    names = [f"bench-{i:05d}" for i in range(n_devices)]

    progress = Progress(n_devices, "device certificates")
    identities = lab.issue_devices(names, progress=progress.update)
    progress.close()
    lab.start_broker()
    fleet = Fleet(identities, "localhost", lab.broker_port)
    fleet.prepare()
    progress = Progress(n_devices, "connecting devices")
    connect_wall = await fleet.connect_all(progress=progress.update)
    progress.close()
    if fleet.failures:
        example = next(iter(fleet.failures.items()))
        raise RuntimeError(f"{len(fleet.failures)} devices could not connect, e.g. {example}")
    await fleet.wait_acked()
    keepalive = asyncio.ensure_future(fleet.keep_alive())
    connections = [fleet.connections[name] for name in names]
    ladder_connections = connections[: args.devices]
    assert lab.broker is not None and lab.broker.process is not None
    broker_pid, bench_pid = lab.broker.process.pid, os.getpid()
    figures: dict[str, Any] = {
        "devices": args.devices, "qos": args.qos, "step_seconds": args.step_seconds, "max_lag_s": args.max_lag,
        "server": args.server, "dashboard_subscription_qos": dashboard_qos,
        "connect_seconds": round(connect_wall, 3),
    }
    print(f"{n_devices} devices connected over mTLS in {connect_wall:.1f} s")

    # 1. The baseline: a bare paho subscriber with the dashboard's identity (the dashboard is not running).
    if not args.skip_baseline:
        print(f"baseline: a bare paho subscriber (MQTT v5, QoS {baseline_qos}) as `dashboard`")
        subscriber = BaselineSubscriber(lab, baseline_qos)
        try:
            phase = Phase(fleet, ladder_connections, lambda: subscriber.count,
                          {"broker": broker_pid, "subscriber": subscriber.pid, "bench": bench_pid},
                          args.step_seconds, args.max_lag, args.qos)
            best, steps = await ladder(phase, "paho", args.rates, args.start_rate, args.factor, args.refine,
                                       args.max_rate)
        finally:
            subscriber.close()
        figures["baseline"] = {"max_sustained_rate": best, "subscription_qos": baseline_qos,
                               "steps": [asdict(s) for s in steps]}
        baseline_timeline = subscriber.timeline
    else:
        baseline_timeline = []

    # 2. and 3. The dashboard, watched by a Socket.IO client.
    dashboard = lab.start_dashboard(args.server)
    probe = BrowserProbe()
    watcher = SocketIOWatcher(dashboard.url, probe.on_batch, headers=dashboard.auth_headers).connect()
    try:
        pids = {"broker": broker_pid, "dashboard": dashboard.pid, "bench": bench_pid}
        count = dashboard.readings_ingested
        latency_phase = Phase(fleet, connections[: args.latency_devices], count, pids, args.latency_seconds,
                              args.max_lag, args.qos)
        print(f"latency: {args.latency_rate:.0f} msg/s from {args.latency_devices} devices for "
              f"{args.latency_seconds:.0f} s, publish -> dashboard -> Socket.IO client")
        probe.arm(connections[: args.latency_devices])
        step = await latency_phase.run(args.latency_rate)
        probe.disarm()
        browser = summary_ms(probe.latencies)
        figures["latency"] = {
            "rate": args.latency_rate, "devices": args.latency_devices, "seconds": args.latency_seconds,
            "published": step.published, "ingested": step.ingested, "lost": step.lost, "cpu": step.cpu,
            "browser_ms": browser, "batches": watcher.batches,
            "publish_to_push_built_ms": summary_ms(probe.to_push), "push_transport_ms": summary_ms(probe.transport),
        }
        print(f"  publish-to-browser: p50 {browser.get('p50_ms', 0):.0f} ms  p99 {browser.get('p99_ms', 0):.0f} ms  "
              f"max {browser.get('max_ms', 0):.0f} ms over {browser.get('count', 0)} readings; "
              f"lost {step.lost}; cpu {step.cpu}")
        built, transport = figures["latency"]["publish_to_push_built_ms"], figures["latency"]["push_transport_ms"]
        print(f"  of which publish -> push built: p50 {built.get('p50_ms')} p99 {built.get('p99_ms')} ms; "
              f"push -> client: p50 {transport.get('p50_ms')} p99 {transport.get('p99_ms')} ms")

        if args.profile:
            print(f"profile: py-spy on the dashboard at {args.profile_rate:.0f} msg/s -> {args.profile}")
            spy = profile_dashboard(dashboard.pid, args.step_seconds, args.profile)
            profiled = await Phase(fleet, ladder_connections, count, pids, args.step_seconds, args.max_lag,
                                   args.qos).run(args.profile_rate)
            _out, err = spy.communicate(timeout=60)
            figures["profile"] = {"rate": args.profile_rate, "svg": str(args.profile), "ok": profiled.ok,
                                  "ingested": profiled.ingested, "published": profiled.published}
            if spy.returncode:
                print(f"  py-spy failed: {err.decode(errors='replace').strip()[-300:]}")

        if not args.skip_ladder:
            print("ingest: the dashboard (MQTT bridge -> live hub -> database and Socket.IO)")
            phase = Phase(fleet, ladder_connections, count, pids, args.step_seconds, args.max_lag, args.qos)
            best, steps = await ladder(phase, "dashboard", args.rates, args.start_rate, args.factor, args.refine,
                                       args.max_rate)
            figures["dashboard"] = {"max_sustained_rate": best, "steps": [asdict(s) for s in steps]}
    finally:
        watcher.close()
        keepalive.cancel()
        await fleet.close(offline=False)

    figures["dashboard_log_errors"] = lab.dashboard.errors() if lab.dashboard else []
    base = figures.get("baseline", {}).get("max_sustained_rate")
    dash = figures.get("dashboard", {}).get("max_sustained_rate")
    if base and dash is not None:
        figures["ratio_to_baseline"] = round(dash / base, 3)
    figures["targets"] = {
        f"ingest >= {TARGET_INGEST} msg/s": None if dash is None else dash >= TARGET_INGEST,
        f"ratio >= {TARGET_RATIO}": None if "ratio_to_baseline" not in figures
        else figures["ratio_to_baseline"] >= TARGET_RATIO,
        f"p99 < {TARGET_P99_MS:.0f} ms": browser.get("p99_ms", float("inf")) < TARGET_P99_MS,
    }
    if os.environ.get("BENCH_DEBUG_PUSHES"):
        with open(os.environ["BENCH_DEBUG_PUSHES"], "w") as fh:
            for b, r in probe.push_times:
                fh.write(f"{b:.4f} {r:.4f}\n")
    figures["_series"] = {"baseline": baseline_timeline, "dashboard": probe.timeline, "latencies": probe.latencies}
    return figures


def rate_series(timeline: list[tuple[float, int]], t0: float, bucket: float = 1.0) -> tuple[list[float], list[float]]:
    """Messages/s per `bucket` seconds from a cumulative (time, count) series, from `t0` on."""
    xs: list[float] = []
    ys: list[float] = []
    timeline = [(t, n) for t, n in timeline if t >= t0 - bucket]
    if len(timeline) < 2:
        return xs, ys
    last_t, last_n = timeline[0]
    for t, n in timeline[1:]:
        if t - last_t >= bucket:
            xs.append(round(t - t0, 2))
            ys.append(max(n - last_n, 0) / (t - last_t))
            last_t, last_n = t, n
    return xs, ys


def offered_series(steps: list[dict[str, Any]], t0: float) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for s in steps:
        xs += [s["started"] - t0, s["ended"] - t0]
        ys += [s["rate"], s["rate"]]
    return xs, ys


def report(figures: dict[str, Any], results_dir: Path, plots_dir: Path) -> None:
    series = figures.pop("_series")
    plots = []
    if series["latencies"]:
        path = plot_latency_histograms(
            {f"publish -> Socket.IO client ({figures['latency']['rate']:.0f} msg/s, "
             f"{figures['latency']['devices']} devices)": series["latencies"]},
            "Telemetry: publish-to-browser latency", plots_dir / "telemetry-latency.png")
        plots.append(path)
    for name, label in (("baseline", "bare paho subscriber"), ("dashboard", "dashboard ingest")):
        if name in figures and series[name]:
            steps = figures[name]["steps"]
            t0 = steps[0]["started"]
            path = plot_timeseries(
                {f"{label} (received)": rate_series(series[name], t0), "offered": offered_series(steps, t0)},
                f"Telemetry ladder: {label}", "messages/s", plots_dir / f"telemetry-ladder-{name}.png")
            plots.append(path)
    figures["plots"] = [str(p) for p in plots if p]
    write_results("telemetry", figures, results_dir)
    print()
    if "baseline" in figures:
        print(f"bare paho subscriber: {figures['baseline']['max_sustained_rate']:.0f} msg/s sustained, zero loss")
    if "dashboard" in figures:
        print(f"dashboard ingest:     {figures['dashboard']['max_sustained_rate']:.0f} msg/s sustained, zero loss")
    if "ratio_to_baseline" in figures:
        print(f"ratio dashboard / paho: {figures['ratio_to_baseline']:.2f}")
    lat = figures["latency"]["browser_ms"]
    print(f"publish-to-browser at {figures['latency']['rate']:.0f} msg/s: p50 {lat.get('p50_ms', float('nan'))} ms, "
          f"p99 {lat.get('p99_ms', float('nan'))} ms")
    print_targets(figures["targets"])


def main(argv: list[str] | None = None) -> int:
    return run_on_lab(build_parser().parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())

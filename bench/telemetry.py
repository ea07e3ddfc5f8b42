"""Telemetry pipeline bench: the ingest on stock paho against a C-client pipeline, and publish-to-browser latency
through nginx with two dashboards. All on one throwaway lab (bench.rig), on loopback, same broker, same TLS.

1. ingest throughput, three consumers of the same flood. The flood: --publishers `mosquitto_pub` processes (C,
   mutual TLS, one device identity each), each publishing --messages readings as fast as it can (`--repeat`,
   QoS 0: mosquitto_pub keeps one QoS 1 message in flight, ~3,000/s each). The consumers:
   - the C reference: one `mosquitto_sub` (C) as `ingest-1`, QoS 0, counting what it receives;
   - 1 ingest replica: `python -m dashboard.ingest` (stock paho, MQTT 3.1.1, QoS 0, a persistent session,
     `$share/ingest/...`), which parses, stores every reading in the database and publishes it on the readings
     bus (Redis), exactly what it does in the lab;
   - 2 ingest replicas (ingest-1, ingest-2) splitting the flood through the shared subscription.
   A consumer's rate is what it received (stored, for the ingest) divided by the time from its first to its
   last message; a run counts only when it got every message the publishers sent (zero loss).
2. latency: Redis, two `python -m dashboard` (each an ingest replica), nginx in front (deploy/nginx); simulated
   devices (bench.simdevices) publish at --latency-rate with their publish time, and one Socket.IO client per
   dashboard, through nginx, records when each reading shows as a device's current value.

    python -m bench.telemetry                      # the full run (about 2 minutes)
    python -m bench.telemetry --publishers 2 --messages 5000 --latency-seconds 5   # a quick look
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
    DOCS_DIR,
    RESULTS_DIR,
    CpuMeter,
    Progress,
    plot_latency_histograms,
    summary_ms,
    write_results,
)
from bench.rig import BenchLab, MachineMeter, SocketIOWatcher, wait_until_quiet
from bench.simdevices import DeviceConnection, Fleet, Pace, publish_at_rate
from lab.mqtt import Identity
from lab.processes import stop_process
from lab.scale import NginxServer, RedisServer
from lab.testing import DashboardProcess, free_port

TARGET_RATIO = 0.3  # ingest / the C pipeline
TARGET_P99_MS = 150.0  # publish-to-browser at 1,000 msg/s from 200 devices, through nginx, two dashboards
TELEMETRY = "iot/thermometer/+/temperature"
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
    parser = argparse.ArgumentParser(
        prog="python -m bench.telemetry",
        description="Telemetry: ingest throughput (stock paho, 1 and 2 replicas) as a ratio to a C-client pipeline "
                    "(mosquitto_pub -> mosquitto_sub), and publish-to-browser latency through nginx.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--publishers", type=positive_int, default=4, help="mosquitto_pub processes in the flood")
    parser.add_argument("--messages", type=positive_int, default=50_000, help="readings each publisher sends")
    parser.add_argument("--replicas", type=str, default="1,2", help="ingest replica counts to measure")
    parser.add_argument("--devices", type=positive_int, default=200,
                        help="simulated devices (one mTLS connection each) feeding the ingest ladders")
    parser.add_argument("--rates", type=rate_list, default=None,
                        help="comma-separated rates (msg/s) to step through instead of the automatic ladder")
    parser.add_argument("--start-rate", type=positive_float, default=2000, help="first rate of the automatic ladder")
    parser.add_argument("--factor", type=positive_float, default=1.5, help="ladder growth per passed step")
    parser.add_argument("--refine", type=int, default=2, help="bisection steps after the first failed rate")
    parser.add_argument("--max-rate", type=positive_float, default=60_000, help="the ladder stops here")
    parser.add_argument("--step-seconds", type=positive_float, default=5, help="duration of one ladder step")
    parser.add_argument("--max-lag", type=positive_float, default=0.5,
                        help="a step passes only if the consumer caught up within this many seconds")
    parser.add_argument("--latency-rate", type=positive_float, default=1000, help="msg/s of the latency phase")
    parser.add_argument("--latency-devices", type=positive_int, default=200, help="devices in the latency phase")
    parser.add_argument("--latency-seconds", type=positive_float, default=20, help="duration of the latency phase")
    parser.add_argument("--dashboards", type=positive_int, default=2, help="dashboard processes behind nginx")
    parser.add_argument("--skip-latency", action="store_true", help="no latency phase")
    parser.add_argument("--out", type=Path, default=None,
                        help="write results JSON and plots here instead of bench/results and docs/bench")
    parser.add_argument("--keep", action="store_true", help="keep the temporary lab folder (logs, database)")
    parser.add_argument("--quiet-timeout", type=float, default=120,
                        help="first wait up to this many seconds for the machine to be idle (0: do not wait)")
    return parser


# -- the flood and its consumers --------------------------------------------------------------------------


def tls_args(identity: Identity, port: int) -> list[str]:
    return ["-h", "localhost", "-p", str(port), "--cafile", str(identity.ca_cert), "--cert", str(identity.cert),
            "--key", str(identity.key)]


class Consumer:
    """A consumer subprocess and its count over time; `pids` for the CPU meter."""

    label = "consumer"

    def __init__(self) -> None:
        self.count = 0
        self.timeline: list[tuple[float, int]] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def pids(self) -> dict[str, int]:
        return {f"{self.label}{i + 1}": p.pid for i, p in enumerate(self.processes)}

    def first_and_last(self, total: int) -> tuple[float, float] | None:
        """Time of the first message, and of the count reaching `total`."""
        first = next((t for t, n in self.timeline if n > 0), None)
        last = next((t for t, n in self.timeline if n >= total), None)
        return None if first is None or last is None else (first, last)

    def close(self) -> None:
        for process in self.processes:
            stop_process(process, timeout=15)


class CSubscriber(Consumer):
    """`mosquitto_sub` printing one byte per message (-N -F x); the bench counts bytes."""

    label = "mosquitto_sub"

    def __init__(self, lab: BenchLab) -> None:
        super().__init__()
        argv = ["mosquitto_sub", *tls_args(lab.identity("ingest-1"), lab.broker_port), "-i", "ingest-1", "-q", "0",
                "-t", TELEMETRY, "-N", "-F", "x"]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.processes.append(process)
        self._reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._reader.start()

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        fd = process.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            self.count += len(chunk)
            self.timeline.append((time.time(), self.count))

    def ready(self, lab: BenchLab) -> None:
        """Subscribed once a probe published through the broker arrives (mosquitto_sub says nothing before)."""
        probe = ["mosquitto_pub", *tls_args(lab.identity("flood-0"), lab.broker_port), "-i", "flood-0", "-q", "1",
                 "-t", "iot/thermometer/flood-0/temperature", "-m", "{}"]
        deadline = time.monotonic() + 30
        while self.count == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto_sub received nothing")
            subprocess.run(probe, check=True, timeout=30)
            time.sleep(0.2)
        self.count, self.timeline = 0, []


class IngestReplicas(Consumer):
    """`python -m dashboard.ingest --id ingest-<n> --stats 0.05`, n = 1..replicas; count = readings stored."""

    label = "ingest"

    def __init__(self, lab: BenchLab, replicas: int, env: dict[str, str]) -> None:
        super().__init__()
        self.stored = [0] * replicas
        for n in range(replicas):
            argv = [sys.executable, "-m", "dashboard.ingest", "--id", f"ingest-{n + 1}", "--stats", "0.05"]
            process = subprocess.Popen(argv, cwd=Path(__file__).resolve().parent.parent, env={**lab.env, **env},
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=False)
            self.processes.append(process)
        for n, process in enumerate(self.processes):
            assert process.stdout is not None
            line = process.stdout.readline().decode(errors="replace").strip()
            if "subscribed" not in line:
                self.close()
                raise RuntimeError(f"ingest-{n + 1} did not start: {line!r}")
            threading.Thread(target=self._read, args=(n, process), daemon=True).start()

    def _read(self, index: int, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            parts = raw.split()
            if len(parts) == 4 and parts[0] == b"received":
                self.stored[index] = int(parts[3])
                self.count = sum(self.stored)
                self.timeline.append((time.time(), self.count))


def flood(lab: BenchLab, publishers: int, messages: int) -> list[subprocess.Popen[bytes]]:
    """`publishers` mosquitto_pub processes, each sending `messages` readings as fast as it can."""
    started = []
    for n in range(publishers):
        name = f"flood-{n}"
        payload = f'{{"device_id": "{name}", "timestamp": "2030-01-01T00:00:00Z", "temperature": 21.5}}'
        argv = ["mosquitto_pub", *tls_args(lab.identity(name), lab.broker_port), "-i", name, "-q", "0",
                "-t", f"iot/thermometer/{name}/temperature", "-m", payload, "--repeat", str(messages),
                "--repeat-delay", "0"]
        started.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
    return started


def measure(lab: BenchLab, consumer: Consumer, publishers: int, messages: int, broker_pid: int) -> dict[str, Any]:
    """One flood into `consumer`: its rate from first to last message, its loss, and the CPU of each part."""
    total = publishers * messages
    before = consumer.count
    consumer.timeline = [(t, n - before) for t, n in consumer.timeline]
    meter = CpuMeter({"broker": broker_pid, **consumer.pids}).start()
    machine = MachineMeter().start()
    started = time.time()
    pubs = flood(lab, publishers, messages)
    codes = [p.wait(timeout=600) for p in pubs]
    published_at = time.time()
    last, since = consumer.count, time.monotonic()
    while consumer.count - before < total and time.monotonic() - since < 5:  # until everything or 5 s of silence
        time.sleep(0.05)
        if consumer.count != last:
            last, since = consumer.count, time.monotonic()
    cpu = meter.stop()
    cpu["machine_cpu_pct"] = machine.stop()
    got = consumer.count - before
    timeline = [(t, n - before) for t, n in consumer.timeline if t >= started]
    consumer.timeline = timeline
    span = consumer.first_and_last(total)
    result: dict[str, Any] = {"published": total, "received": got, "lost": max(total - got, 0),
                              "publisher_exit_codes": sorted(set(codes)), "cpu": cpu,
                              "publish_seconds": round(published_at - started, 3)}
    if span and got >= total:
        result["seconds"] = round(span[1] - span[0], 3)
        result["rate"] = round(total / max(span[1] - span[0], 1e-6), 1)
    else:
        result["rate"] = None
    return result


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


# -- the latency phase -------------------------------------------------------------------------------


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
                 max_rate: float, quiet_timeout: float = 120) -> tuple[float, list[Step]]:
    """Step through `rates`, or grow from `start` until a step fails and bisect; returns (max sustained, steps)."""
    steps: list[Step] = []

    async def run(rate: float) -> Step:
        step = await phase.run(rate)
        for _ in range(1):  # a step that failed while something else loaded the machine is measured again
            if step.ok or step.cpu.get("other_cpu_pct", 0) < FOREIGN_LOAD_PCT or quiet_timeout <= 0:
                break
            print(f"  {label:<9} {rate:>8.0f} msg/s  failed while other processes used "
                  f"{step.cpu['other_cpu_pct']:.0f}% CPU: again once the machine is quiet", flush=True)
            await asyncio.to_thread(wait_until_quiet, timeout=quiet_timeout)
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


async def latency_phase(args: argparse.Namespace, lab: BenchLab, redis_url: str, broker_pid: int, fleet: Fleet,
                        connections: list[DeviceConnection]) -> dict[str, Any]:
    """Two dashboards over Redis behind nginx; one Socket.IO client per dashboard, through nginx."""
    dashboards: list[DashboardProcess] = []
    nginx: NginxServer | None = None
    watchers: list[SocketIOWatcher] = []
    try:
        cas = lab.cas or lab.start_cas(1)  # the dashboards forward /v1/ssl/* there (none of them is the CA)
        for n in range(args.dashboards):
            port = free_port()
            env = {**lab.env, "SOCKETIO_MESSAGE_QUEUE": redis_url, "INGEST_ID": f"ingest-{n + 1}",
                   "DASHBOARD_PORT": str(port),
                   "DASHBOARD_MQTT": "1" if n == 0 else "0", "CA_HTTPS_PORT": "0",
                   "DASHBOARD_SECRET_KEY": "bench-" + "s" * 40, "CA_URLS": ",".join(ca.url for ca in cas)}
            dashboards.append(DashboardProcess(env, lab.settings.data_dir / f"dashboard-{n + 1}.log", port)
                              .start())
        nginx = NginxServer(lab.root / "nginx", free_port(), [f"127.0.0.1:{d.port}" for d in dashboards]).start()
        probes = []
        for dashboard in dashboards:
            probe = BrowserProbe()
            route = route_cookie(nginx, dashboard, dashboards)
            watchers.append(SocketIOWatcher(nginx.url, probe.on_batch,
                                            headers={**dashboard.auth_headers, "Cookie": f"iotlab_route={route}"})
                            .connect())
            probes.append(probe)
        pids = {"broker": broker_pid, **{f"dashboard{n + 1}": d.pid for n, d in enumerate(dashboards)},
                "bench": os.getpid()}
        # Every dashboard counts every reading (its own ingest's and, over the bus, the others'): the slowest one.
        count = lambda: min(d.readings_ingested() for d in dashboards)  # noqa: E731
        phase = Phase(fleet, connections, count, pids, args.latency_seconds, 0.5, 1)
        print(f"latency: {args.latency_rate:.0f} msg/s from {len(connections)} devices, {args.latency_seconds:.0f} s, "
              f"publish -> broker -> ingest replica -> (readings bus) -> dashboard -> nginx -> Socket.IO client, "
              f"{len(dashboards)} dashboards")
        for probe in probes:
            probe.arm(connections)
        step = await phase.run(args.latency_rate)
        for probe in probes:
            probe.disarm()
        per_tab = [summary_ms(p.latencies) for p in probes]
        every = summary_ms([x for p in probes for x in p.latencies])
        figures = {"rate": args.latency_rate, "devices": len(connections), "seconds": args.latency_seconds,
                   "dashboards": len(dashboards), "published": step.published, "lost": step.lost, "cpu": step.cpu,
                   "browser_ms": every, "per_dashboard_ms": per_tab,
                   "errors": [e for d in dashboards for e in d.errors()]}
        print(f"  publish-to-browser (both tabs): p50 {every.get('p50_ms')} ms  p99 {every.get('p99_ms')} ms  "
              f"max {every.get('max_ms')} ms over {every.get('count')} readings; cpu {step.cpu}")
        figures["_latencies"] = [x for p in probes for x in p.latencies]
        return figures
    finally:
        for watcher in watchers:
            watcher.close()
        if nginx is not None:
            nginx.stop()
        for dashboard in dashboards:
            dashboard.stop()


def route_cookie(nginx: NginxServer, dashboard: DashboardProcess, dashboards: list[DashboardProcess]) -> str:
    """A value of the iotlab_route cookie that nginx sends to `dashboard` (found by asking /healthz)."""
    import json
    import urllib.request

    wanted = dashboard.env["INGEST_ID"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for n in range(256):
        request = urllib.request.Request(nginx.url + "/healthz",  # noqa: S310 - our loopback nginx
                                         headers={"Cookie": f"iotlab_route=r{n}"})
        with opener.open(request, timeout=5) as response:
            if json.load(response)["ingest"]["identity"] == wanted:
                return f"r{n}"
    raise RuntimeError(f"nginx never routed to {wanted}")


async def fleet_phases(args: argparse.Namespace, lab: BenchLab, redis_url: str, broker_pid: int,
                       c_rate: float | None) -> dict[str, Any]:
    """The ingest ladders (the C subscriber, then 1 and 2 replicas) and the latency phase, on one device fleet."""
    n_devices = max(args.devices, args.latency_devices)
    names = [f"bench-{i:05d}" for i in range(n_devices)]
    progress = Progress(n_devices, "device certificates")
    identities = lab.issue_devices(names, progress=progress.update)
    progress.close()
    fleet = Fleet(identities, "localhost", lab.broker_port)
    fleet.prepare()
    await fleet.connect_all()
    if fleet.failures:
        example = next(iter(fleet.failures.items()))
        raise RuntimeError(f"{len(fleet.failures)} devices could not connect, e.g. {example}")
    await fleet.wait_acked()
    keepalive = asyncio.ensure_future(fleet.keep_alive())
    connections = [fleet.connections[name] for name in names]
    figures: dict[str, Any] = {}
    try:
        consumers: list[tuple[str, Callable[[], Consumer]]] = [("c_subscriber", lambda: CSubscriber(lab))]
        consumers += [(f"ingest_{r}", lambda r=r: IngestReplicas(lab, r, {"SOCKETIO_MESSAGE_QUEUE": redis_url}))
                      for r in (int(v) for v in args.replicas.split(",") if v.strip())]
        for key, make in consumers:
            consumer = make()
            try:
                if isinstance(consumer, CSubscriber):
                    consumer.ready(lab)
                print(f"ladder: {args.devices} devices (QoS 1) -> {key}")
                phase = Phase(fleet, connections[: args.devices], lambda c=consumer: c.count,
                              {"broker": broker_pid, **consumer.pids, "bench": os.getpid()}, args.step_seconds,
                              args.max_lag, 1)
                best, steps = await ladder(phase, key, args.rates, args.start_rate, args.factor, args.refine,
                                           args.max_rate, args.quiet_timeout)
            finally:
                consumer.close()
            figures[key] = {"max_sustained_rate": best, "steps": [asdict(s) for s in steps]}
            if c_rate:
                figures[key]["ratio_to_c"] = round(best / c_rate, 3)
        base = figures["c_subscriber"]["max_sustained_rate"]
        for key in figures:
            if key.startswith("ingest_") and base:
                figures[key]["ratio_to_c_subscriber"] = round(figures[key]["max_sustained_rate"] / base, 3)
        if not args.skip_latency:
            figures["latency"] = await latency_phase(args, lab, redis_url, broker_pid, fleet,
                                                     connections[: args.latency_devices])
    finally:
        keepalive.cancel()
        await fleet.close(offline=False)
    return figures


def run(args: argparse.Namespace, lab: BenchLab) -> dict[str, Any]:
    lab.issue_devices([f"flood-{n}" for n in range(args.publishers)])
    lab.start_broker()
    assert lab.broker is not None and lab.broker.process is not None
    broker_pid = lab.broker.process.pid
    redis = RedisServer(lab.root / "redis", free_port()).start()
    figures: dict[str, Any] = {"publishers": args.publishers, "messages_per_publisher": args.messages,
                               "devices": args.devices, "step_seconds": args.step_seconds, "max_lag_s": args.max_lag}
    try:
        print(f"C pipeline: {args.publishers} x mosquitto_pub --repeat {args.messages} (QoS 0, mTLS) -> mosquitto_sub")
        reference = CSubscriber(lab)
        try:
            reference.ready(lab)
            figures["c_pipeline"] = measure(lab, reference, args.publishers, args.messages, broker_pid)
        finally:
            reference.close()
        print(f"  {figures['c_pipeline']}")
        figures.update(asyncio.run(fleet_phases(args, lab, redis.url, broker_pid, figures["c_pipeline"]["rate"])))
    finally:
        redis.stop()
    ratios = {k: v.get("ratio_to_c") for k, v in figures.items() if k.startswith("ingest_")}
    p99 = figures.get("latency", {}).get("browser_ms", {}).get("p99_ms")
    figures["targets"] = {
        **{f"{k} ratio >= {TARGET_RATIO}": None if r is None else r >= TARGET_RATIO for k, r in ratios.items()},
        f"p99 < {TARGET_P99_MS:.0f} ms": None if p99 is None else p99 < TARGET_P99_MS,
    }
    return figures


def report(figures: dict[str, Any], results_dir: Path, plots_dir: Path) -> None:
    plots = []
    latencies = figures.get("latency", {}).pop("_latencies", None)
    if latencies:
        plots.append(plot_latency_histograms(
            {f"publish -> Socket.IO client via nginx ({figures['latency']['rate']:.0f} msg/s, "
             f"{figures['latency']['devices']} devices, {figures['latency']['dashboards']} dashboards)": latencies},
            "Telemetry: publish-to-browser latency", plots_dir / "telemetry-latency.png"))
    figures["plots"] = [str(p) for p in plots if p]
    write_results("telemetry", figures, results_dir)
    print()
    print(f"C pipeline (mosquitto_pub -> mosquitto_sub): {figures['c_pipeline'].get('rate')} msg/s, "
          f"lost {figures['c_pipeline']['lost']}")
    for key in (k for k in figures if k == "c_subscriber" or k.startswith("ingest_")):
        ratio = figures[key].get("ratio_to_c")
        print(f"{key:<13} {figures[key]['max_sustained_rate']:>9.0f} msg/s sustained, zero loss"
              + (f"  ratio to the C pipeline {ratio:.2f}" if ratio is not None else ""))
    if "latency" in figures:
        lat = figures["latency"]["browser_ms"]
        print(f"publish-to-browser at {figures['latency']['rate']:.0f} msg/s through nginx: "
              f"p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms")
    for target, met in figures["targets"].items():
        print(f"  target {target}: {'n/a' if met is None else 'met' if met else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_sub") is None:
        print("error: the C pipeline needs mosquitto_pub and mosquitto_sub (mosquitto-clients)", file=sys.stderr)
        return 2
    results_dir, plots_dir = (args.out, args.out) if args.out else (RESULTS_DIR, DOCS_DIR)
    busy = wait_until_quiet(timeout=args.quiet_timeout) if args.quiet_timeout > 0 else None
    with BenchLab(keep=args.keep) as lab:
        lab.generate()
        figures = run(args, lab)
    figures["machine_busy_pct_before"] = busy
    report(figures, results_dir, plots_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

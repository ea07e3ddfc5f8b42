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

The parts: bench.telemetry_pipeline (the flood and its consumers), bench.telemetry_ladder (one step at a rate,
and the ladder of steps), bench.telemetry_latency (the dashboards behind nginx and what each browser saw).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import DOCS_DIR, RESULTS_DIR, Progress, plot_latency_histograms, write_results
from bench.rig import BenchLab, add_lab_options, positive_float, positive_int, rate_list, wait_until_quiet
from bench.simdevices import Fleet
from bench.telemetry_ladder import LadderPlan, Phase, StepRule, ladder
from bench.telemetry_latency import latency_phase
from bench.telemetry_pipeline import Consumer, CSubscriber, IngestReplicas, measure
from lab.scale import RedisServer
from lab.testing import free_port

TARGET_RATIO = 0.3  # ingest / the C pipeline
TARGET_P99_MS = 150.0  # publish-to-browser at 1,000 msg/s from 200 devices, through nginx, two dashboards


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
    parser.add_argument(
        "--devices",
        type=positive_int,
        default=200,
        help="simulated devices (one mTLS connection each) feeding the ingest ladders",
    )
    parser.add_argument(
        "--rates",
        type=rate_list,
        default=None,
        help="comma-separated rates (msg/s) to step through instead of the automatic ladder",
    )
    parser.add_argument("--start-rate", type=positive_float, default=2000, help="first rate of the automatic ladder")
    parser.add_argument("--factor", type=positive_float, default=1.5, help="ladder growth per passed step")
    parser.add_argument("--refine", type=int, default=2, help="bisection steps after the first failed rate")
    parser.add_argument("--max-rate", type=positive_float, default=60_000, help="the ladder stops here")
    parser.add_argument("--step-seconds", type=positive_float, default=5, help="duration of one ladder step")
    parser.add_argument(
        "--max-lag",
        type=positive_float,
        default=0.5,
        help="a step passes only if the consumer caught up within this many seconds",
    )
    parser.add_argument("--latency-rate", type=positive_float, default=1000, help="msg/s of the latency phase")
    parser.add_argument("--latency-devices", type=positive_int, default=200, help="devices in the latency phase")
    parser.add_argument("--latency-seconds", type=positive_float, default=20, help="duration of the latency phase")
    parser.add_argument("--dashboards", type=positive_int, default=2, help="dashboard processes behind nginx")
    parser.add_argument("--skip-latency", action="store_true", help="no latency phase")
    add_lab_options(parser)
    return parser


async def fleet_phases(
    args: argparse.Namespace, lab: BenchLab, redis_url: str, broker_pid: int, c_rate: float | None
) -> dict[str, Any]:
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
        consumers += [
            (f"ingest_{r}", lambda r=r: IngestReplicas(lab, r, {"SOCKETIO_MESSAGE_QUEUE": redis_url}))
            for r in (int(v) for v in args.replicas.split(",") if v.strip())
        ]
        for key, make in consumers:
            consumer = make()
            try:
                if isinstance(consumer, CSubscriber):
                    consumer.ready(lab)
                print(f"ladder: {args.devices} devices (QoS 1) -> {key}")
                phase = Phase(
                    fleet,
                    connections[: args.devices],
                    lambda c=consumer: c.count,
                    {"broker": broker_pid, **consumer.pids, "bench": os.getpid()},
                    StepRule(args.step_seconds, args.max_lag, qos=1),
                )
                best, steps = await ladder(
                    phase,
                    key,
                    LadderPlan(
                        args.rates, args.start_rate, args.factor, args.refine, args.max_rate, args.quiet_timeout
                    ),
                )
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
            figures["latency"] = await latency_phase(
                args, lab, redis_url, broker_pid, fleet, connections[: args.latency_devices]
            )
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
    figures: dict[str, Any] = {
        "publishers": args.publishers,
        "messages_per_publisher": args.messages,
        "devices": args.devices,
        "step_seconds": args.step_seconds,
        "max_lag_s": args.max_lag,
    }
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
        latency = figures["latency"]
        label = (
            f"publish -> Socket.IO client via nginx ({latency['rate']:.0f} msg/s, {latency['devices']} devices, "
            f"{latency['dashboards']} dashboards)"
        )
        plots.append(
            plot_latency_histograms(
                {label: latencies}, "Telemetry: publish-to-browser latency", plots_dir / "telemetry-latency.png"
            )
        )
    figures["plots"] = [str(p) for p in plots if p]
    write_results("telemetry", figures, results_dir)
    print()
    print(
        f"C pipeline (mosquitto_pub -> mosquitto_sub): {figures['c_pipeline'].get('rate')} msg/s, "
        f"lost {figures['c_pipeline']['lost']}"
    )
    for key in (k for k in figures if k == "c_subscriber" or k.startswith("ingest_")):
        ratio = figures[key].get("ratio_to_c")
        print(
            f"{key:<13} {figures[key]['max_sustained_rate']:>9.0f} msg/s sustained, zero loss"
            + (f"  ratio to the C pipeline {ratio:.2f}" if ratio is not None else "")
        )
    if "latency" in figures:
        lat = figures["latency"]["browser_ms"]
        print(
            f"publish-to-browser at {figures['latency']['rate']:.0f} msg/s through nginx: "
            f"p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms"
        )
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

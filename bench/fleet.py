"""Fleet bench: N devices with their own certificates on one broker, all at once, watched by the dashboard.

One process holds every device (bench.simdevices: asyncio, one mTLS connection per device, no thread per
device). The device certificates are issued beforehand by the lab's CA in-process (the clock starts at the
first connect). Connects are paced (at most --concurrency TLS handshakes in flight: Mosquitto's listen
backlog is 100). Then every device publishes (--rate messages/s in total) while the bench checks that the
dashboard lists all N online (`GET /api/data`, as a script would) and ingested every reading.

Reported: connect rate and per-connect latency, broker memory per connection (RSS from /proc before and
after the connects, divided by N), broker and dashboard CPU while publishing, loss at the dashboard, and
how long after the last connect the dashboard showed all N online.

    python -m bench.fleet                                  # 2,000 devices (about 1 minute)
    python -m bench.fleet --devices 200 --seconds 5        # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    CpuMeter,
    Progress,
    print_targets,
    process_rss_kib,
    summary_ms,
    write_results,
)
from bench.rig import BenchLab, MachineMeter, lab_bench_parser, positive_float, positive_int, raise_fd_limit, run_on_lab
from bench.simdevices import Fleet, Pace, publish_at_rate

TARGET_DEVICES = 2000
FDS_PER_DEVICE = 2  # the device's socket here, and its socket in the broker (our child: it inherits the limit)


def build_parser() -> argparse.ArgumentParser:
    parser = lab_bench_parser(
        "fleet",
        "Fleet: N concurrent mTLS devices on one broker; connect rate, broker memory per connection, "
        "and whether the dashboard lists all N online.",
    )
    parser.add_argument("--devices", type=positive_int, default=TARGET_DEVICES, help="devices to connect")
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=50,
        help="TLS handshakes in flight at once (Mosquitto's listen backlog is 100)",
    )
    parser.add_argument(
        "--rate", type=positive_float, default=1000, help="total messages/s while all devices are connected"
    )
    parser.add_argument("--seconds", type=positive_float, default=20, help="how long the fleet publishes")
    parser.add_argument(
        "--online-timeout",
        type=positive_float,
        default=60,
        help="how long to wait for the dashboard to list every device online",
    )
    return parser


def online_devices(lab: BenchLab, names: set[str]) -> int:
    """How many of `names` the dashboard's /api/data lists with status online."""
    assert lab.dashboard is not None
    data = lab.dashboard.get_json("/api/data", timeout=30)["device_data"]
    return sum(1 for name, device in data.items() if name in names and device.get("status") == "online")


async def wait_online(lab: BenchLab, names: set[str], timeout: float) -> tuple[int, float]:
    """(devices listed online, seconds until all were, or until the timeout)."""
    started = time.monotonic()
    online = 0
    while time.monotonic() - started < timeout:
        online = await asyncio.to_thread(online_devices, lab, names)
        if online == len(names):
            break
        await asyncio.sleep(0.5)
    return online, round(time.monotonic() - started, 2)


async def run(args: argparse.Namespace, lab: BenchLab) -> dict[str, Any]:
    names = [f"fleet-{i:05d}" for i in range(args.devices)]
    wanted = args.devices * FDS_PER_DEVICE + 256
    fd_limit = raise_fd_limit(wanted)
    if fd_limit < wanted:
        print(
            f"warning: open-files limit {fd_limit} < {wanted} needed for {args.devices} devices: raise it (ulimit -n)"
        )

    progress = Progress(args.devices, "device certificates")
    started = time.monotonic()
    identities = lab.issue_devices(names, progress=progress.update)
    progress.close()
    issue_seconds = time.monotonic() - started

    broker = lab.start_broker()
    assert broker.process is not None
    broker_pid = broker.process.pid
    dashboard = lab.start_dashboard(args.server)
    await asyncio.sleep(1)
    rss_before = process_rss_kib(broker_pid)
    dashboard_rss_before = process_rss_kib(dashboard.pid)

    fleet = Fleet(identities, "localhost", lab.broker_port)
    samples: list[tuple[float, int, int]] = []  # (seconds, open connections, broker RSS KiB)
    clock0 = time.monotonic()

    async def sample() -> None:
        while True:
            samples.append((time.monotonic() - clock0, len(fleet.connections), process_rss_kib(broker_pid)))
            await asyncio.sleep(0.25)

    sampler = asyncio.ensure_future(sample())
    progress = Progress(args.devices, "loading TLS identities")
    fleet.prepare(progress=progress.update)
    progress.close()
    progress = Progress(args.devices, "connecting devices")
    meter = CpuMeter({"broker": broker_pid, "dashboard": dashboard.pid, "bench": os.getpid()}).start()
    connect_wall = await fleet.connect_all(concurrency=args.concurrency, progress=progress.update)
    connect_cpu = meter.stop()
    progress.close()
    connected = len(fleet.open_connections)
    names_set = set(names)
    # From the last connect: how long until the dashboard lists every device online (their retained `online`).
    online_task = asyncio.ensure_future(wait_online(lab, names_set, args.online_timeout))
    await fleet.wait_acked(timeout=30)  # the retained `online` of every device
    await asyncio.sleep(1)
    rss_after = process_rss_kib(broker_pid)
    keepalive = asyncio.ensure_future(fleet.keep_alive())
    print(
        f"{connected}/{args.devices} devices connected in {connect_wall:.1f} s "
        f"({connected / connect_wall:.0f}/s); broker RSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MiB"
    )
    figures: dict[str, Any] = {
        "devices": args.devices,
        "concurrency": args.concurrency,
        "server": args.server,
        "fd_limit": fd_limit,
        "certificates_issued_per_s": round(args.devices / issue_seconds, 1),
        "connected": connected,
        "connect_failures": len(fleet.failures),
        "connect_failure_examples": dict(list(fleet.failures.items())[:5]),
        "connect_seconds": round(connect_wall, 3),
        "connects_per_s": round(connected / connect_wall, 1),
        "connect_latency_ms": summary_ms(fleet.connect_seconds),
        "connect_cpu": connect_cpu,
        "broker_rss_kib_before": rss_before,
        "broker_rss_kib_after": rss_after,
        "broker_kib_per_connection": round((rss_after - rss_before) / max(connected, 1), 2),
    }

    try:
        # Publish while checking the dashboard: every device sends, the dashboard must list all online.
        ingested_before = dashboard.readings_ingested()
        acked_before = fleet.acked()
        timeline: list[tuple[float, int]] = []
        meter = CpuMeter({"broker": broker_pid, "dashboard": dashboard.pid, "bench": os.getpid()}).start()
        machine = MachineMeter().start()
        print(f"publishing {args.rate:.0f} msg/s from all {connected} devices for {args.seconds:.0f} s")
        progress = Progress(int(args.seconds), "publishing (seconds)")
        last_second = 0

        def on_tick(elapsed: float, sent: int) -> None:
            nonlocal last_second
            if int(elapsed) > last_second:
                progress.update(int(elapsed) - last_second)
                last_second = int(elapsed)
                timeline.append((elapsed, sent))

        sent, elapsed = await publish_at_rate(fleet.open_connections, Pace(args.rate, args.seconds), on_tick=on_tick)
        progress.close()
        await fleet.wait_acked(timeout=30)
        cpu = meter.stop()
        cpu["other_cpu_pct"] = round(max(machine.stop() - sum(cpu.values()), 0.0), 1)
        published = fleet.acked() - acked_before
        online, online_after = await online_task
        still_online = await asyncio.to_thread(online_devices, lab, names_set)
        deadline = time.monotonic() + 10
        ingested = dashboard.readings_ingested() - ingested_before
        while ingested < published and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            ingested = dashboard.readings_ingested() - ingested_before
        figures.update(
            {
                "rate": args.rate,
                "seconds": args.seconds,
                "published": published,
                "achieved_rate": round(published / elapsed, 1),
                "ingested": ingested,
                "lost": max(published - ingested, 0),
                "cpu": cpu,
                "dashboard_online": online,
                "all_online": online == args.devices == still_online,
                "dashboard_online_after_publishing": still_online,
                "seconds_until_all_online": online_after if online == args.devices else None,
                "broker_rss_kib_publishing": process_rss_kib(broker_pid),
                "dashboard_rss_kib_before": dashboard_rss_before,
                "dashboard_rss_kib": process_rss_kib(dashboard.pid),
            }
        )
        figures["_timeline"] = timeline
    finally:
        sampler.cancel()
        figures["_samples"] = samples
        keepalive.cancel()
        await fleet.close(offline=False)
    figures["dashboard_log_errors"] = dashboard.errors()
    figures["targets"] = {
        f"{TARGET_DEVICES} concurrent mTLS devices, all online on the dashboard": args.devices >= TARGET_DEVICES
        and figures["all_online"]
        and connected == args.devices
    }
    return figures


def plot_fleet(samples: list[tuple[float, int, int]], title: str, path: Path) -> Path | None:
    """Connected devices and broker RSS over the run (two y axes)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -r requirements-dev.txt)")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = [s[0] for s in samples]
    ax.plot(xs, [s[1] for s in samples], color="tab:blue", label="connected devices")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("connected devices", color="tab:blue")
    right = ax.twinx()
    right.plot(xs, [s[2] / 1024 for s in samples], color="tab:red", label="broker RSS")
    right.set_ylabel("broker RSS (MiB)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(figures: dict[str, Any], results_dir: Path, plots_dir: Path) -> None:
    timeline = figures.pop("_timeline", [])
    samples = figures.pop("_samples", [])
    plots = []
    if len(samples) > 1:
        plots.append(
            plot_fleet(
                samples,
                f"Fleet: {figures['connected']} mTLS devices on one broker",
                plots_dir / "fleet-connections.png",
            )
        )
    if len(timeline) > 1:  # the publish rate the fleet kept, per second
        figures["publish_rate_per_s"] = [
            round((n1 - n0) / (t1 - t0), 1) for (t0, n0), (t1, n1) in zip(timeline, timeline[1:], strict=False)
        ]
    figures["plots"] = [str(p) for p in plots if p]
    write_results("fleet", figures, results_dir)
    print()
    print(
        f"devices connected:      {figures['connected']}/{figures['devices']} ({figures['connect_failures']} failures)"
    )
    latency = figures["connect_latency_ms"]
    print(
        f"connect rate:           {figures['connects_per_s']:.0f}/s, p50 {latency.get('p50_ms')} "
        f"ms, p99 {latency.get('p99_ms')} ms per connect; cpu {figures['connect_cpu']}"
    )
    print(f"broker memory:          {figures['broker_kib_per_connection']:.1f} KiB per connection")
    print(
        f"published / ingested:   {figures.get('published')} / {figures.get('ingested')} "
        f"(lost {figures.get('lost')}) at {figures.get('achieved_rate')} msg/s; cpu {figures.get('cpu')}"
    )
    print(
        f"dashboard online:       {figures.get('dashboard_online')}/{figures['devices']}"
        + (
            f" (all within {figures['seconds_until_all_online']} s of the last connect)"
            if figures.get("seconds_until_all_online") is not None
            else ""
        )
        + f"; after publishing {figures.get('dashboard_online_after_publishing')}"
    )
    print_targets(figures["targets"])


def main(argv: list[str] | None = None) -> int:
    return run_on_lab(build_parser().parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())

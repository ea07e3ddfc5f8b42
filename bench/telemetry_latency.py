"""The telemetry bench's latency phase: two dashboards over Redis behind nginx, one Socket.IO client per
dashboard through nginx, and what each client saw (`BrowserProbe`) (bench.telemetry, part 2)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from bench.common import summary_ms
from bench.rig import BenchLab, SocketIOWatcher
from bench.simdevices import DeviceConnection, Fleet
from bench.telemetry_ladder import Phase, StepRule
from lab.scale import NginxServer
from lab.testing import DashboardProcess, free_port


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


async def latency_phase(
    args: argparse.Namespace,
    lab: BenchLab,
    redis_url: str,
    broker_pid: int,
    fleet: Fleet,
    connections: list[DeviceConnection],
) -> dict[str, Any]:
    """Two dashboards over Redis behind nginx; one Socket.IO client per dashboard, through nginx."""
    dashboards: list[DashboardProcess] = []
    nginx: NginxServer | None = None
    watchers: list[SocketIOWatcher] = []
    try:
        cas = lab.cas or lab.start_cas(1)  # the dashboards forward /v1/ssl/* there (none of them is the CA)
        for n in range(args.dashboards):
            port = free_port()
            env = {
                **lab.env,
                "SOCKETIO_MESSAGE_QUEUE": redis_url,
                "INGEST_ID": f"ingest-{n + 1}",
                "DASHBOARD_PORT": str(port),
                "DASHBOARD_MQTT": "1" if n == 0 else "0",
                "CA_HTTPS_PORT": "0",
                "DASHBOARD_SECRET_KEY": "bench-" + "s" * 40,
                "CA_URLS": ",".join(ca.url for ca in cas),
            }
            dashboards.append(DashboardProcess(env, lab.settings.data_dir / f"dashboard-{n + 1}.log", port).start())
        nginx = NginxServer(lab.root / "nginx", free_port(), [f"127.0.0.1:{d.port}" for d in dashboards]).start()
        probes = []
        for dashboard in dashboards:
            probe = BrowserProbe()
            route = route_cookie(nginx, dashboard, dashboards)
            watchers.append(
                SocketIOWatcher(
                    nginx.url, probe.on_batch, headers={**dashboard.auth_headers, "Cookie": f"iotlab_route={route}"}
                ).connect()
            )
            probes.append(probe)
        pids = {
            "broker": broker_pid,
            **{f"dashboard{n + 1}": d.pid for n, d in enumerate(dashboards)},
            "bench": os.getpid(),
        }
        # Every dashboard counts every reading (its own ingest's and, over the bus, the others'): the slowest one.
        count = lambda: min(d.readings_ingested() for d in dashboards)  # noqa: E731
        phase = Phase(fleet, connections, count, pids, StepRule(args.latency_seconds, 0.5, qos=1))
        print(
            f"latency: {args.latency_rate:.0f} msg/s from {len(connections)} devices, {args.latency_seconds:.0f} s, "
            f"publish -> broker -> ingest replica -> (readings bus) -> dashboard -> nginx -> Socket.IO client, "
            f"{len(dashboards)} dashboards"
        )
        for probe in probes:
            probe.arm(connections)
        step = await phase.run(args.latency_rate)
        for probe in probes:
            probe.disarm()
        per_tab = [summary_ms(p.latencies) for p in probes]
        every = summary_ms([x for p in probes for x in p.latencies])
        figures = {
            "rate": args.latency_rate,
            "devices": len(connections),
            "seconds": args.latency_seconds,
            "dashboards": len(dashboards),
            "published": step.published,
            "lost": step.lost,
            "cpu": step.cpu,
            "browser_ms": every,
            "per_dashboard_ms": per_tab,
            "errors": [e for d in dashboards for e in d.errors()],
        }
        print(
            f"  publish-to-browser (both tabs): p50 {every.get('p50_ms')} ms  p99 {every.get('p99_ms')} ms  "
            f"max {every.get('max_ms')} ms over {every.get('count')} readings; cpu {step.cpu}"
        )
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
        request = urllib.request.Request(  # noqa: S310 - our loopback nginx
            nginx.url + "/healthz",
            headers={"Cookie": f"iotlab_route=r{n}"},
        )
        with opener.open(request, timeout=5) as response:
            if json.load(response)["ingest"]["identity"] == wanted:
                return f"r{n}"
    raise RuntimeError(f"nginx never routed to {wanted}")

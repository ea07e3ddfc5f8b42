"""Enrolment storm: N new devices ask the CA for their first certificate over MQTT at the same moment.

Each device has its own key and CSR (made before the clock starts). The requests go out all at once through
`--requesters` MQTT v5 connections (gateways, each its own certificate), `ssl/sign` with a ResponseTopic and
CorrelationData, authorised by the CA passphrase or by a single-use enrolment token per device (`--auth
token`, tokens fetched over HTTP before the storm). Every reply is checked: status 201, a certificate for that
device's CSR key and name, signed by the root. All must succeed.

Figures: total time (first request sent to last certificate received), per-device latency (its request to its
certificate) and time-to-certificate from the start of the storm, p50/p99/max, CPU of the CA replicas
(`--ca-replicas`, default 2, splitting the requests through the shared subscription), the dashboard, the broker
and this process. Written to bench/results/enrol-storm.json, plotted to docs/bench/enrol-storm-*.png.

    python -m bench.enrol_storm --devices 10000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.ca_lab import (
    CALab,
    Csr,
    Outcome,
    Requester,
    bench_parser,
    check_certificate,
    connect_requesters,
    environment_note,
    make_csrs,
    output_dirs,
    wait_ca_answers,
    wait_for_quiet,
)
from bench.common import CpuMeter, Progress, plot_latency_histograms, plot_timeseries, summary_ms, write_results
from bench.rig import positive_float, positive_int

TARGETS = {"devices": 10000, "total_s": 20.0, "failures": 0}  # Step 12: 10,000 devices over MQTT in < 20 s
DAYS = 30


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("enrol_storm", __doc__)
    parser.add_argument("--devices", type=positive_int, default=10000, help="devices enrolling at once (default 10000)")
    parser.add_argument(
        "--requesters", type=positive_int, default=8, help="MQTT connections the requests go through (default 8)"
    )
    parser.add_argument(
        "--auth",
        choices=("pass", "token"),
        default="pass",
        help="what authorises each request: the CA passphrase, or a single-use enrolment token "
        "per device (default pass)",
    )
    parser.add_argument(
        "--ca-replicas",
        type=int,
        default=2,
        choices=(1, 2),
        help="CA service replicas (`python -m ca`) splitting the storm (default 2)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=120.0,
        help="give up waiting for replies after this many seconds (default 120)",
    )
    return parser.parse_args(argv)


def fetch_tokens(lab: CALab, names: Sequence[str]) -> dict[str, str]:
    """One enrolment token per device (`POST /v1/ssl/tokens`), as an operator would hand them out."""
    client = lab.http()
    progress = Progress(len(names), "enrolment tokens")
    tokens = {}
    try:
        for name in names:
            status, body = client.post_json("/v1/ssl/tokens", {"name": name, "pass": lab.passphrase, "ttl": 3600})
            if status != 201:
                raise RuntimeError(f"token for {name}: {status} {body}")
            tokens[name] = body["token"]
            progress.update()
    finally:
        client.close()
        progress.close()
    return tokens


def storm(requesters: list[Requester], bodies: list[bytes], timeout: float) -> tuple[float, list[Outcome | None]]:
    """Send every request at once (one sending thread per connection); wait for every reply or the timeout."""
    outcomes: list[Outcome | None] = [None] * len(bodies)
    replies = threading.Semaphore(0)
    progress = Progress(len(bodies), "enrolment storm")
    go = threading.Event()

    def on_reply(_outcome: Outcome) -> None:
        replies.release()
        progress.update()

    def send(k: int) -> None:
        requester = requesters[k]
        go.wait()
        for i in range(k, len(bodies), len(requesters)):
            outcomes[i] = requester.send("ssl/sign", bodies[i], on_reply)

    senders = [threading.Thread(target=send, args=(k,), daemon=True) for k in range(len(requesters))]
    for sender in senders:
        sender.start()
    started = time.perf_counter()
    go.set()
    deadline = started + timeout
    for _ in bodies:
        if not replies.acquire(timeout=max(0.0, deadline - time.perf_counter())):
            break
    for sender in senders:
        sender.join()
    progress.close()
    return started, outcomes


def verify(lab: CALab, csrs: list[Csr], outcomes: list[Outcome | None]) -> tuple[list[str], dict[str, int]]:
    """Every device must have a 201 with a certificate for its own key and name, signed by the root."""
    root = lab.root_certificate()
    failures: list[str] = []
    statuses: dict[str, int] = {}
    for csr, outcome in zip(csrs, outcomes, strict=True):
        if outcome is None or not outcome.received:
            statuses["no reply"] = statuses.get("no reply", 0) + 1
            failures.append(f"{csr.name}: no reply")
            continue
        statuses[str(outcome.status)] = statuses.get(str(outcome.status), 0) + 1
        try:
            reply = json.loads(outcome.payload)
        except ValueError:
            failures.append(f"{csr.name}: reply is not JSON")
            continue
        if outcome.status != 201:
            failures.append(f"{csr.name}: {outcome.status} {reply.get('error')}")
            continue
        problem = check_certificate(root, reply, csr)
        if problem:
            failures.append(f"{csr.name}: {problem}")
    return failures, dict(sorted(statuses.items()))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    busy = wait_for_quiet(args)
    results_dir, plots_dir = output_dirs(args.out)
    with CALab(args.key_type, keep=args.keep) as lab:
        lab.generate()
        lab.start_broker()
        lab.start_cas(args.ca_replicas)
        dashboard = lab.start_dashboard(args.server)
        names = [f"storm-{i:05d}" for i in range(args.devices)]
        csrs = make_csrs(names)
        auth: dict[str, dict[str, str]] = {name: {"pass": lab.passphrase} for name in names}
        if args.auth == "token":
            auth = {name: {"token": token} for name, token in fetch_tokens(lab, names).items()}
        bodies = [
            json.dumps({"name": csr.name, "days": DAYS, "csr": csr.pem, **auth[csr.name]}).encode() for csr in csrs
        ]
        gateways = lab.issue_devices([f"gateway-{k:02d}" for k in range(args.requesters)])
        requesters = connect_requesters(lab, gateways)
        try:
            wait_ca_answers(requesters[0])
            meter = CpuMeter(
                {
                    "dashboard": dashboard.pid,
                    "broker": lab.broker.process.pid,  # type: ignore[union-attr]
                    "bench": os.getpid(),
                    **{f"ca{ca.instance}": ca.pid for ca in lab.cas},
                }
            ).start()
            started, outcomes = storm(requesters, bodies, args.timeout)
            cpu = meter.stop()
        finally:
            for requester in requesters:
                requester.close()
        failures, statuses = verify(lab, csrs, outcomes)
    done = [o for o in outcomes if o is not None and o.received]
    finished = max((o.received for o in done), default=started)
    total = finished - started
    figures: dict[str, Any] = {
        "devices": args.devices,
        "requesters": args.requesters,
        "auth": args.auth,
        "key_type": args.key_type,
        "server": args.server,
        "ca_replicas": args.ca_replicas,
        "total_s": round(total, 3),
        "certificates_per_s": round(len(done) / total, 1) if total > 0 else None,
        "failures": len(failures),
        "failure_examples": failures[:10],
        "by_status": statuses,
        "latency": summary_ms([o.latency for o in done]),
        "time_to_certificate": summary_ms([o.received - started for o in done]),
        **cpu,
        "environment": environment_note(busy),
        "targets": TARGETS,
        "target_met": not failures and args.devices >= TARGETS["devices"] and total < TARGETS["total_s"],
    }
    report(figures)
    write_results("enrol-storm", figures, results_dir)
    plot(done, started, plots_dir, args.devices)
    return 1 if failures else 0


def report(figures: dict[str, Any]) -> None:
    latency, ttc = figures["latency"], figures["time_to_certificate"]
    print(
        f"\nenrolment storm: {figures['devices']} devices through {figures['requesters']} connections "
        f"({figures['auth']}, {figures['key_type'].upper()} CA, {figures['server']}, "
        f"{figures['ca_replicas']} CA replica(s))"
    )
    print(
        f"  total {figures['total_s']} s, {figures['certificates_per_s']} certificates/s, "
        f"{figures['failures']} failures, statuses {figures['by_status']}"
    )
    print(
        f"  per-device latency p50 {latency.get('p50_ms')} ms, p99 {latency.get('p99_ms')} ms; "
        f"time to certificate p50 {ttc.get('p50_ms')} ms, p99 {ttc.get('p99_ms')} ms, max {ttc.get('max_ms')} ms"
    )
    ca_cpu = "+".join(str(figures[k]) for k in ("ca1_cpu_pct", "ca2_cpu_pct") if k in figures)
    print(
        f"  CPU: CA {ca_cpu}%, dashboard {figures.get('dashboard_cpu_pct')}%, "
        f"broker {figures.get('broker_cpu_pct')}%, "
        f"bench {figures.get('bench_cpu_pct')}%  (target: zero failures in < {TARGETS['total_s']:g} s: "
        f"{'met' if figures['target_met'] else 'not met'})"
    )
    for failure in figures["failure_examples"]:
        print(f"  failure: {failure}")


def plot(done: list[Outcome], started: float, plots_dir: Path, devices: int) -> None:
    if not done:
        return
    ordered = sorted(o.received - started for o in done)
    plot_timeseries(
        {"certificates received": (ordered, list(range(1, len(ordered) + 1)))},
        f"Enrolment storm: {devices} devices at once",
        "certificates (cumulative)",
        plots_dir / "enrol-storm-progress.png",
    )
    plot_latency_histograms(
        {"time to certificate": [o.received - started for o in done], "request to reply": [o.latency for o in done]},
        f"Enrolment storm: {devices} devices",
        plots_dir / "enrol-storm-latency.png",
    )


if __name__ == "__main__":
    sys.exit(main())

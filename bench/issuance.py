"""Issuance benchmark: certificates per second from CSRs, from the raw `pki` limit to the CA's transports.

Levels (each a closed loop for `--duration` seconds or `--count` requests, whichever ends first):

  raw            in-process `pki`, one thread: parse + verify the CSR, sign, PEM (alone: "crypto only"), and
                 the inventory rows (`Inventory.record_issued`) committed durably RAW_BATCH to a transaction
  service        in-process `pki.service.CAService.sign` from `--threads` threads (validation, passphrase,
                 inventory, files: the whole CA without a transport)
  http-werkzeug  POST /v1/ssl/sign from `--http-clients` keep-alive connections to `python -m dashboard`, which
                 forwards each to a CA service replica (`python -m ca`)
  http-gunicorn  the same against gunicorn (one worker, threads), as dashboard/Dockerfile serves it
  mqtt           `ssl/sign` over MQTT v5 from `--requesters` connections (each its own certificate) with
                 `--window` requests in flight each, replies matched by CorrelationData
  renew          `ssl/renew/<CN>` from the same connections, each renewing its own certificate with a CSR
                 (only when the CA implements renewal over MQTT)

The transport levels run once per `--ca-replicas` count (default 1 and 2 replicas; with 2 the level is named
`mqtt-2ca`, `http-werkzeug-2ca`, `renew-2ca`); `renew` is also given as a ratio to `service`.

Every reply's status is checked and a sample of certificates is verified (signed by the root, the CSR's key
and name). Throughput, p50/p90/p99 latency, CPU of the dashboard, the broker and this process, and each
level's ratio to the raw rate are printed, written to bench/results/issuance-<key>.json, and plotted to
docs/bench/issuance-<key>-*.png.

    python -m bench.issuance --key-type ec --duration 10
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.ca_lab import CALab, LoadResult, bench_parser, environment_note, make_csrs, output_dirs, wait_for_quiet
from bench.common import plot_latency_histograms, plot_timeseries, print_table, write_results
from bench.issuance_levels import level_http, level_mqtt, level_raw, level_renew, level_service, renewal_supported
from bench.profiling import summarise_profile
from bench.rig import positive_float, positive_int

# The parts: bench.issuance_load (the load drivers), bench.issuance_levels (one function per level),
# bench.profiling (py-spy). This module: the options, the order of the levels, the report and the plots.

LEVELS = ("raw", "service", "http-werkzeug", "http-gunicorn", "mqtt", "renew")
TARGETS = {"mqtt_per_s": 1000, "http_per_s": 500, "p99_ms": 50}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("issuance", __doc__)
    parser.add_argument("--duration", type=positive_float, default=10.0, help="seconds per level (default 10)")
    parser.add_argument(
        "--count", type=positive_int, default=30000, help="at most this many requests per level (default 30000)"
    )
    parser.add_argument(
        "--csrs",
        type=positive_int,
        default=4000,
        help="distinct CSRs (names) made ahead of time and cycled through (default 4000)",
    )
    parser.add_argument("--levels", default=",".join(LEVELS), help=f"comma-separated subset of {', '.join(LEVELS)}")
    parser.add_argument(
        "--threads", type=positive_int, default=8, help="threads calling the service in-process (default 8)"
    )
    parser.add_argument(
        "--http-clients", type=positive_int, default=16, help="keep-alive HTTP connections (default 16)"
    )
    parser.add_argument("--requesters", type=positive_int, default=8, help="MQTT requester connections (default 8)")
    parser.add_argument(
        "--window", type=positive_int, default=4, help="requests in flight per MQTT connection (default 4)"
    )
    parser.add_argument(
        "--renewers",
        type=positive_int,
        default=32,
        help="devices renewing their own certificates in the renew level, one connection and one "
        "renewal in flight each (default 32)",
    )
    parser.add_argument(
        "--ca-replicas",
        default="1,2",
        help="run the transport levels with each of these numbers of CA service replicas "
        "(`python -m ca` processes; default 1,2; levels with 2 are named e.g. mqtt-2ca)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the dashboard with py-spy during each transport level (collapsed stacks and "
        "a summary of the heaviest frames next to the results)",
    )
    parser.add_argument(
        "--summarise-profile",
        type=Path,
        metavar="FILE",
        help="print the heaviest frames of a py-spy `--format raw` file (e.g. one recorded with "
        "`py-spy record --idle --format raw -- python -m bench.issuance ...`) and exit",
    )
    args = parser.parse_args(argv)
    args.levels = [level.strip() for level in args.levels.split(",") if level.strip()]
    try:
        args.ca_replicas = sorted({int(n) for n in args.ca_replicas.split(",") if n.strip()})
    except ValueError:
        parser.error("--ca-replicas: comma-separated numbers, e.g. 1,2")
    if not args.ca_replicas or not 1 <= min(args.ca_replicas) <= max(args.ca_replicas) <= 2:
        parser.error("--ca-replicas: 1 and/or 2 (the bench lab has certificates for ca-1 and ca-2)")
    unknown = set(args.levels) - set(LEVELS)
    if unknown:
        parser.error(f"unknown level(s) {', '.join(sorted(unknown))}; choose from {', '.join(LEVELS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarise_profile is not None:
        print(summarise_profile(args.summarise_profile), end="")
        return 0
    busy = wait_for_quiet(args)
    results_dir, plots_dir = output_dirs(args.out)
    name = f"issuance-{args.key_type}"
    levels: dict[str, dict[str, Any]] = {}
    loads: dict[str, LoadResult] = {}
    with CALab(args.key_type, keep=args.keep) as lab:
        lab.generate()
        csrs = make_csrs([f"bench-{i:05d}" for i in range(args.csrs)])
        if "raw" in args.levels:
            levels["raw"] = level_raw(lab, csrs, args)
        if "service" in args.levels:
            levels["service"], loads["service"] = level_service(lab, csrs, args)
        transport_levels = [lv for lv in args.levels if lv not in ("raw", "service")]
        if transport_levels:
            lab.start_broker()
            servers = [lv.split("-", 1)[1] for lv in ("http-werkzeug", "http-gunicorn") if lv in args.levels]
            mqtt_server = args.server
            # The MQTT levels run on `--server` (the HTTP server does not matter to them): start it last.
            order = [s for s in servers if s != mqtt_server]
            if mqtt_server in servers or {"mqtt", "renew"} & set(args.levels):
                order.append(mqtt_server)
            for replicas in args.ca_replicas:
                suffix = "" if replicas == 1 else f"-{replicas}ca"
                for server in order:
                    lab.start_cas(replicas)  # `python -m ca` x replicas, then the dashboard forwarding to them
                    dashboard = lab.start_dashboard(server)
                    pids = {
                        "dashboard": dashboard.pid,
                        "broker": lab.broker.process.pid,  # type: ignore[union-attr]
                        "bench": os.getpid(),
                        **{f"ca{ca.instance}": ca.pid for ca in lab.cas},
                    }
                    level = f"http-{server}"
                    if level in args.levels:
                        profile_to = results_dir / f"{name}-{level}{suffix}.pyspy.txt" if args.profile else None
                        levels[level + suffix], loads[level + suffix] = level_http(
                            lab, csrs, args, pids, profile_to, level + suffix
                        )
                    if server == mqtt_server and "mqtt" in args.levels:
                        profile_to = results_dir / f"{name}-mqtt{suffix}.pyspy.txt" if args.profile else None
                        levels["mqtt" + suffix], loads["mqtt" + suffix] = level_mqtt(lab, csrs, args, pids, profile_to)
                    if server == mqtt_server and "renew" in args.levels:
                        if renewal_supported():
                            profile_to = results_dir / f"{name}-renew{suffix}.pyspy.txt" if args.profile else None
                            levels["renew" + suffix], loads["renew" + suffix] = level_renew(
                                lab, args, pids, profile_to, prefix=f"bench-renewer{suffix}"
                            )
                        else:
                            levels["renew"] = {"skipped": "this CA has no renewal over MQTT (CAService.renew)"}
                    lab.stop_dashboard()

    raw_rate = levels.get("raw", {}).get("throughput_per_s")
    crypto_rate = levels.get("raw", {}).get("crypto_only_per_s")
    service_rate = levels.get("service", {}).get("throughput_per_s")
    for level, figures in levels.items():
        if raw_rate and "throughput_per_s" in figures:
            figures["ratio_to_raw"] = round(figures["throughput_per_s"] / raw_rate, 3)
            figures["ratio_to_crypto"] = round(figures["throughput_per_s"] / crypto_rate, 3)
        if service_rate and level.startswith("renew") and "throughput_per_s" in figures:
            figures["ratio_to_service"] = round(figures["throughput_per_s"] / service_rate, 3)
    report(levels, args)
    figures_out = {
        "key_type": args.key_type,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment_note(busy),
        "targets": TARGETS,
        "levels": levels,
    }
    write_results(name, figures_out, results_dir)
    plot(name, loads, plots_dir, args.key_type)
    failed = [
        lv for lv, f in levels.items() if f.get("verification_problems") or (f.get("count") == 0 and "skipped" not in f)
    ]
    if failed:
        print(f"problems in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def report(levels: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    rows = []
    for level, figures in levels.items():
        if "skipped" in figures:
            rows.append({"level": level, "per_s": "skipped: " + figures["skipped"]})
            continue
        rows.append(
            {
                "level": level,
                "per_s": figures.get("throughput_per_s"),
                "ratio": figures.get("ratio_to_raw", ""),
                "vs_crypto": figures.get("ratio_to_crypto", ""),
                "vs_service": figures.get("ratio_to_service", ""),
                "ok": figures.get("count"),
                "errors": figures.get("errors"),
                "p50_ms": figures.get("p50_ms", ""),
                "p99_ms": figures.get("p99_ms", ""),
                "dashboard_cpu": figures.get("dashboard_cpu_pct", ""),
                "ca_cpu": "+".join(str(figures[k]) for k in ("ca1_cpu_pct", "ca2_cpu_pct") if k in figures),
                "broker_cpu": figures.get("broker_cpu_pct", ""),
                "bench_cpu": figures.get("bench_cpu_pct", ""),
            }
        )
    print(
        f"\nissuance, {args.key_type.upper()} CA, {args.duration:g} s per level "
        f"(raw crypto only: {levels.get('raw', {}).get('crypto_only_per_s', '-')}/s)"
    )
    print_table(
        rows,
        [
            "level",
            "per_s",
            "ratio",
            "vs_crypto",
            "vs_service",
            "ok",
            "errors",
            "p50_ms",
            "p99_ms",
            "dashboard_cpu",
            "ca_cpu",
            "broker_cpu",
            "bench_cpu",
        ],
    )


def plot(name: str, loads: dict[str, LoadResult], plots_dir: Path, key_type: str) -> None:
    if not loads:
        return
    label = "EC P-256" if key_type == "ec" else "RSA-2048"
    plot_latency_histograms(
        {lv: [o.latency for o in r.ok] for lv, r in loads.items()},
        f"Issuance latency per request ({label} CA)",
        plots_dir / f"{name}-latency.png",
    )
    plot_timeseries(
        {lv: r.rate_series() for lv, r in loads.items()},
        f"Certificates issued per second ({label} CA)",
        "certificates/s",
        plots_dir / f"{name}-throughput.png",
    )


if __name__ == "__main__":
    sys.exit(main())

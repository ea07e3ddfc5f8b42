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
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.ca_lab import (
    CALab,
    Csr,
    HttpClient,
    LoadResult,
    Outcome,
    Requester,
    bench_parser,
    check_certificate,
    connect_requesters,
    enrol,
    environment_note,
    make_csrs,
    output_dirs,
    wait_ca_answers,
    wait_for_quiet,
)
from bench.common import (
    CpuMeter,
    Progress,
    plot_latency_histograms,
    plot_timeseries,
    print_table,
    summary_ms,
    write_results,
)
from pki.authority import CertificateAuthority, LeafNames, cert_pem
from pki.inventory import Inventory
from pki.profiles import ENTITY
from pki.requests import parse_csr
from pki.service import CAService

LEVELS = ("raw", "service", "http-werkzeug", "http-gunicorn", "mqtt", "renew")
RAW_BATCH = 64
VERIFY_SAMPLE = 25
DAYS = 30
TARGETS = {"mqtt_per_s": 1000, "http_per_s": 500, "p99_ms": 50}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("issuance", __doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level (default 10)")
    parser.add_argument("--count", type=int, default=30000, help="at most this many requests per level (default 30000)")
    parser.add_argument("--csrs", type=int, default=4000,
                        help="distinct CSRs (names) made ahead of time and cycled through (default 4000)")
    parser.add_argument("--levels", default=",".join(LEVELS), help=f"comma-separated subset of {', '.join(LEVELS)}")
    parser.add_argument("--threads", type=int, default=8, help="threads calling the service in-process (default 8)")
    parser.add_argument("--http-clients", type=int, default=16, help="keep-alive HTTP connections (default 16)")
    parser.add_argument("--requesters", type=int, default=8, help="MQTT requester connections (default 8)")
    parser.add_argument("--window", type=int, default=4, help="requests in flight per MQTT connection (default 4)")
    parser.add_argument("--renewers", type=int, default=32,
                        help="devices renewing their own certificates in the renew level, one connection and one "
                             "renewal in flight each (default 32)")
    parser.add_argument("--ca-replicas", default="1,2",
                        help="run the transport levels with each of these numbers of CA service replicas "
                             "(`python -m ca` processes; default 1,2; levels with 2 are named e.g. mqtt-2ca)")
    parser.add_argument("--profile", action="store_true",
                        help="sample the dashboard with py-spy during each transport level (collapsed stacks and "
                             "a summary of the heaviest frames next to the results)")
    parser.add_argument("--summarise-profile", type=Path, metavar="FILE",
                        help="print the heaviest frames of a py-spy `--format raw` file (e.g. one recorded with "
                             "`py-spy record --idle --format raw -- python -m bench.issuance ...`) and exit")
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
    if min(args.duration, args.count, args.csrs, args.threads, args.http_clients, args.requesters, args.window,
           args.renewers) <= 0:
        parser.error("--duration, --count, --csrs, --threads, --http-clients, --requesters, --window and "
                     "--renewers must be > 0")
    return args


# -- load drivers ---------------------------------------------------------------------------------------


class Ticker:
    """A progress bar that follows the clock (levels are bounded by time)."""

    def __init__(self, label: str, duration: float) -> None:
        self.progress = Progress(int(duration * 10), label)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            if self.progress.done < self.progress.total:
                self.progress.update()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.progress.close()


class LoadRun:
    """What the threads of one load share: the next request index (until `count` or `duration`), the outcomes, and
    a sample of the reply payloads by index (checked afterwards)."""

    def __init__(self, duration: float, count: int, label: str) -> None:
        self.counter = itertools.count()
        self.count, self.duration, self.label = count, duration, label
        self.result = LoadResult(started=time.perf_counter())
        self.deadline = self.result.started + duration
        self.sample_every = max(1, count // (VERIFY_SAMPLE * 4))
        self.samples: dict[int, bytes] = {}
        self.lock = threading.Lock()

    def next_index(self) -> int | None:
        i = next(self.counter)
        return None if i >= self.count or time.perf_counter() >= self.deadline else i

    def keep(self, i: int, payload: bytes) -> None:
        if i % self.sample_every == 0:
            self.samples[i] = payload

    def drive(self, loops: list[Callable[[], None]]) -> None:
        """Run every loop in a thread of its own, with the progress ticker, until all of them return."""
        ticker = Ticker(self.label, self.duration)
        threads = [threading.Thread(target=loop, daemon=True) for loop in loops]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ticker.close()


def run_threads(threads: int, duration: float, count: int, call: Callable[[int], tuple[int, bytes]],
                label: str) -> tuple[LoadResult, dict[int, bytes]]:
    """`threads` closed loops calling `call(i)`; returns the result and a sample of reply payloads by index."""
    load = LoadRun(duration, count, label)
    result = load.result

    def loop() -> None:
        mine = []
        while (i := load.next_index()) is not None:
            outcome = Outcome(sent=time.perf_counter())
            status, payload = call(i)
            outcome.received, outcome.status = time.perf_counter(), status
            mine.append(outcome)
            load.keep(i, payload)
        with load.lock:
            result.outcomes.extend(mine)

    load.drive([loop] * threads)
    result.outcomes.sort(key=lambda o: o.received)
    result.finished = max((o.received for o in result.outcomes), default=result.started)
    return result, load.samples


def run_mqtt(requesters: list[Requester], window: int, duration: float, count: int,
             request: Callable[[Requester, int], tuple[str, bytes] | None],
             label: str) -> tuple[LoadResult, dict[int, bytes]]:
    """Each requester keeps `window` requests in flight; `request(requester, i)` gives (topic, payload), or None
    when that requester has nothing more to send."""
    load = LoadRun(duration, count, label)
    result, lock = load.result, load.lock
    sent = [0]

    def feed(requester: Requester) -> None:
        slots = threading.Semaphore(window)
        while True:
            slots.acquire()
            i = load.next_index()
            if i is None:
                break

            def done(outcome: Outcome, i: int = i) -> None:
                with lock:
                    result.outcomes.append(outcome)
                load.keep(i, outcome.payload)
                slots.release()

            message = request(requester, i)
            if message is None:
                break
            requester.send(message[0], message[1], done)
            with lock:
                sent[0] += 1

    load.drive([functools.partial(feed, r) for r in requesters])
    # the last requests still in flight: wait for them (bounded), then count what never came back
    drain_until = time.perf_counter() + 30
    while time.perf_counter() < drain_until:
        with lock:
            if len(result.outcomes) >= sent[0]:
                break
        time.sleep(0.01)
    with lock:
        lost = sent[0] - len(result.outcomes)
        result.outcomes.sort(key=lambda o: o.received)
    result.finished = max((o.received for o in result.outcomes), default=result.started)
    result.outcomes.extend(Outcome(sent=result.started, received=result.finished, status=0) for _ in range(lost))
    return result, load.samples


# -- levels -----------------------------------------------------------------------------------------


def level_raw(lab: CALab, csrs: list[Csr], args: argparse.Namespace) -> dict[str, Any]:
    """One thread: CSR -> certificate -> PEM, rows committed durably RAW_BATCH at a time."""
    layout = lab.layout
    ca = CertificateAuthority.load(layout.ca_cert.read_bytes(), layout.ca_key.read_bytes(), lab.passphrase)
    inventory = Inventory(lab.settings.effective_database_url)
    count = min(args.count, len(csrs) * 4)
    ticker = Ticker("raw pki", args.duration)
    crypto = 0.0
    done = 0
    started = time.perf_counter()
    deadline = started + args.duration
    try:
        while done < count and time.perf_counter() < deadline:
            batch = []
            t0 = time.perf_counter()
            for i in range(done, min(done + RAW_BATCH, count)):
                csr = csrs[i % len(csrs)]
                info = parse_csr(csr.pem)
                names = LeafNames(info.common_name, info.dns_names, info.ip_addresses, info.emails)
                cert = ca.issue(info.public_key, ENTITY, names, days=DAYS)
                cert_pem(cert)
                batch.append((csr.name, cert))
            crypto += time.perf_counter() - t0
            with inventory.session() as session:
                for name, cert in batch:
                    inventory.record_issued(cert, name=name, role=ENTITY.role, via="bench", requester="bench",
                                            session=session)
            done += len(batch)
        elapsed = time.perf_counter() - started
    finally:
        ticker.close()
        inventory.close()
    return {"throughput_per_s": round(done / elapsed, 1), "count": done, "errors": 0,
            "crypto_only_per_s": round(done / crypto, 1) if crypto else None, "batch": RAW_BATCH}


def sign_body(lab: CALab, csr: Csr) -> dict[str, Any]:
    return {"name": csr.name, "days": DAYS, "pass": lab.passphrase, "csr": csr.pem}


def summarise(result: LoadResult, samples: dict[int, bytes], csrs: list[Csr], lab: CALab,
              csr_of: Callable[[int], Csr] | None = None) -> dict[str, Any]:
    """Throughput, latency percentiles, statuses, and a verified sample of the certificates."""
    root = lab.root_certificate()
    problems = []
    for i, payload in list(samples.items())[:VERIFY_SAMPLE]:
        try:
            reply = json.loads(payload)
        except ValueError:
            problems.append(f"request {i}: reply is not JSON")
            continue
        if "error" in reply:
            continue  # counted by status already
        problem = check_certificate(root, reply, csr_of(i) if csr_of else csrs[i % len(csrs)])
        if problem:
            problems.append(f"request {i}: {problem}")
    ok = result.ok
    figures = {
        "throughput_per_s": round(result.throughput(), 1),
        "count": len(ok),
        "errors": len(result.outcomes) - len(ok),
        "by_status": result.by_status(),
        "elapsed_s": round(result.elapsed, 3),
        "verified_sample": min(len(samples), VERIFY_SAMPLE),
        "verification_problems": problems,
        **{k: v for k, v in summary_ms([o.latency for o in ok]).items() if k != "count"},
    }
    return figures


def level_service(lab: CALab, csrs: list[Csr], args: argparse.Namespace) -> tuple[dict[str, Any], LoadResult]:
    service = CAService(lab.settings)
    bodies = [sign_body(lab, csr) for csr in csrs]

    def call(i: int) -> tuple[int, bytes]:
        reply = service.sign(bodies[i % len(bodies)], source="bench", via="http", requester="bench")
        return reply.status, json.dumps(reply.body).encode()

    try:
        call(0)  # unlock the CA key before the clock starts
        result, samples = run_threads(args.threads, args.duration, args.count, call, "service in-process")
    finally:
        service.close()
    return summarise(result, samples, csrs, lab), result


def level_http(lab: CALab, csrs: list[Csr], args: argparse.Namespace, pids: dict[str, int],
               profile_to: Path | None, label: str) -> tuple[dict[str, Any], LoadResult]:
    port = lab.dashboard_port
    bodies = [json.dumps(sign_body(lab, csr)).encode() for csr in csrs]
    local = threading.local()

    def call(i: int) -> tuple[int, bytes]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = HttpClient(port)
        return client.post("/v1/ssl/sign", bodies[i % len(bodies)])

    HttpClient(port).post("/v1/ssl/sign", bodies[0])  # unlock the CA key before the clock starts
    meter = CpuMeter(pids).start()
    with profiler(profile_to, pids["dashboard"], args.duration):
        result, samples = run_threads(args.http_clients, args.duration, args.count, call, label)
    figures = summarise(result, samples, csrs, lab)
    figures.update(meter.stop())
    return figures, result


def level_mqtt(lab: CALab, csrs: list[Csr], requesters: list[Requester], args: argparse.Namespace,
               pids: dict[str, int], profile_to: Path | None) -> tuple[dict[str, Any], LoadResult]:
    bodies = [json.dumps(sign_body(lab, csr)).encode() for csr in csrs]
    meter = CpuMeter(pids).start()
    with profiler(profile_to, pids["dashboard"], args.duration):
        result, samples = run_mqtt(requesters, args.window, args.duration, args.count,
                                   lambda _r, i: ("ssl/sign", bodies[i % len(bodies)]), "mqtt ssl/sign")
    figures = summarise(result, samples, csrs, lab)
    figures.update(meter.stop())
    figures["unmatched_replies"] = sum(r.unmatched for r in requesters)
    return figures, result


def level_renew(lab: CALab, args: argparse.Namespace, pids: dict[str, int],
                profile_to: Path | None, prefix: str = "bench-renewer") -> tuple[dict[str, Any], LoadResult]:
    """Enrolled devices renew their own certificates: `{"csr"}` on ssl/renew/<CN>, the certificate the credential.

    `--renewers` devices (each its own connection: one per certificate), one renewal in flight each.
    """
    names = [f"{prefix}-{i:03d}" for i in range(args.renewers)]
    requesters = connect_requesters(lab, enrol(lab, names, "enrolling renewers"))
    try:
        wait_ca_answers(requesters[0])
        return _renewals(lab, requesters, args, pids, profile_to)
    finally:
        for requester in requesters:
            requester.close()


def _renewals(lab: CALab, requesters: list[Requester], args: argparse.Namespace, pids: dict[str, int],
              profile_to: Path | None) -> tuple[dict[str, Any], LoadResult]:
    # Renewal must bring a new key, so each device gets its own CSRs and stops when it has used them all.
    per = max(1, min(args.count // len(requesters), max(args.csrs // len(requesters), 100), 400))
    csrs = make_csrs([r.name for r in requesters for _ in range(per)], "CSRs for renewals")
    own = {r.name: iter(csrs[i * per:(i + 1) * per]) for i, r in enumerate(requesters)}
    index_csr: dict[int, Csr] = {}

    def request(requester: Requester, i: int) -> tuple[str, bytes] | None:
        csr = next(own[requester.name], None)
        if csr is None:
            return None
        index_csr[i] = csr
        return f"ssl/renew/{requester.name}", json.dumps({"csr": csr.pem}).encode()

    meter = CpuMeter(pids).start()
    with profiler(profile_to, pids["dashboard"], args.duration):
        result, samples = run_mqtt(requesters, 1, args.duration, args.count, request, "mqtt ssl/renew")
    figures = summarise(result, samples, [], lab, csr_of=index_csr.__getitem__)
    figures.update(meter.stop())
    return figures, result


class profiler:  # noqa: N801 - used like a function: `with profiler(...)`
    """py-spy sampling `pid` for `duration` seconds, when asked for (`--profile`).

    `--gil`: only the thread holding the GIL is sampled, so the profile shows where the server's one Python
    core goes (waits for fsync, locks or the network do not count). The raw collapsed stacks are kept, with
    a summary of the heaviest frames next to them (`summarise_profile`).
    """

    def __init__(self, out: Path | None, pid: int, duration: float) -> None:
        self.out, self.pid, self.duration = out, pid, duration
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> profiler:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.process = subprocess.Popen(
                [py_spy(), "record", "--pid", str(self.pid), "--duration", str(max(1, int(self.duration))),
                 "--rate", "250", "--gil", "--nonblocking", "--format", "raw", "--output", str(self.out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            try:
                self.process.wait(timeout=self.duration + 30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.out is not None and self.out.exists():
                summary = self.out.with_suffix(".top.txt")
                summary.write_text(summarise_profile(self.out))
                print(f"profile written to {self.out}, summary in {summary}")
            else:
                print("py-spy wrote no profile")


def summarise_profile(path: Path, top: int = 40) -> str:
    """The heaviest frames, inclusive of what they call, from py-spy's collapsed stacks (with `--gil`: the
    frames that hold the GIL longest; with `--idle`: where the threads spend their time, waits included)."""
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for frame in {frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0] + ")"
                      for frame in stack.split(";")}:
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
    skip = ("threading.py", "concurrent/futures", "<frozen")
    rows = [(n, f) for f, n in inclusive.items() if not any(s in f for s in skip)]
    rows.sort(reverse=True)
    lines = [f"{total} samples; inclusive share per frame"]
    lines += [f"{100 * n / max(total, 1):5.1f}%  {frame}" for n, frame in rows[:top]]
    return "\n".join(lines) + "\n"


def py_spy() -> str:
    """The py-spy binary (requirements-dev.txt installs it next to this Python)."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise SystemExit("--profile needs py-spy: pip install -r requirements-dev.txt")
    return found


def renewal_supported() -> bool:
    return hasattr(CAService, "renew")


# -- main ---------------------------------------------------------------------------------------------


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
            requester_names = [f"bench-req-{i:02d}" for i in range(args.requesters)]
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
                    pids = {"dashboard": dashboard.pid, "broker": lab.broker.process.pid,  # type: ignore[union-attr]
                            "bench": os.getpid(), **{f"ca{ca.instance}": ca.pid for ca in lab.cas}}
                    level = f"http-{server}"
                    if level in args.levels:
                        profile_to = results_dir / f"{name}-{level}{suffix}.pyspy.txt" if args.profile else None
                        levels[level + suffix], loads[level + suffix] = level_http(lab, csrs, args, pids, profile_to,
                                                                                   level + suffix)
                    if server == mqtt_server and "mqtt" in args.levels:
                        requesters = connect_requesters(lab, lab.issue_devices(requester_names))
                        try:
                            wait_ca_answers(requesters[0])
                            profile_to = results_dir / f"{name}-mqtt{suffix}.pyspy.txt" if args.profile else None
                            levels["mqtt" + suffix], loads["mqtt" + suffix] = level_mqtt(lab, csrs, requesters, args,
                                                                                         pids, profile_to)
                        finally:
                            for requester in requesters:
                                requester.close()
                    if server == mqtt_server and "renew" in args.levels:
                        if renewal_supported():
                            profile_to = results_dir / f"{name}-renew{suffix}.pyspy.txt" if args.profile else None
                            levels["renew" + suffix], loads["renew" + suffix] = level_renew(
                                lab, args, pids, profile_to, prefix=f"bench-renewer{suffix}")
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
    failed = [lv for lv, f in levels.items() if f.get("verification_problems") or
              (f.get("count") == 0 and "skipped" not in f)]
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
        rows.append({
            "level": level, "per_s": figures.get("throughput_per_s"), "ratio": figures.get("ratio_to_raw", ""),
            "vs_crypto": figures.get("ratio_to_crypto", ""), "vs_service": figures.get("ratio_to_service", ""),
            "ok": figures.get("count"), "errors": figures.get("errors"), "p50_ms": figures.get("p50_ms", ""),
            "p99_ms": figures.get("p99_ms", ""), "dashboard_cpu": figures.get("dashboard_cpu_pct", ""),
            "ca_cpu": "+".join(str(figures[k]) for k in ("ca1_cpu_pct", "ca2_cpu_pct") if k in figures),
            "broker_cpu": figures.get("broker_cpu_pct", ""), "bench_cpu": figures.get("bench_cpu_pct", ""),
        })
    print(f"\nissuance, {args.key_type.upper()} CA, {args.duration:g} s per level "
          f"(raw crypto only: {levels.get('raw', {}).get('crypto_only_per_s', '-')}/s)")
    print_table(rows, ["level", "per_s", "ratio", "vs_crypto", "vs_service", "ok", "errors", "p50_ms", "p99_ms",
                       "dashboard_cpu", "ca_cpu", "broker_cpu", "bench_cpu"])


def plot(name: str, loads: dict[str, LoadResult], plots_dir: Path, key_type: str) -> None:
    if not loads:
        return
    label = "EC P-256" if key_type == "ec" else "RSA-2048"
    plot_latency_histograms({lv: [o.latency for o in r.ok] for lv, r in loads.items()},
                            f"Issuance latency per request ({label} CA)", plots_dir / f"{name}-latency.png")
    plot_timeseries({lv: r.rate_series() for lv, r in loads.items()}, f"Certificates issued per second ({label} CA)",
                    "certificates/s", plots_dir / f"{name}-throughput.png")


if __name__ == "__main__":
    sys.exit(main())

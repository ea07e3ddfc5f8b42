"""The issuance bench's levels: raw `pki`, the in-process service, HTTP through the dashboard, MQTT ssl/sign and
ssl/renew; each returns its figures (throughput, latency, a verified sample of certificates) (bench.issuance)."""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.ca_lab import (
    CALab,
    Csr,
    HttpClient,
    LoadResult,
    Requester,
    check_certificate,
    connect_requesters,
    enrol,
    make_csrs,
    wait_ca_answers,
)
from bench.common import CpuMeter, summary_ms
from bench.issuance_load import VERIFY_SAMPLE, Ticker, run_mqtt, run_threads
from bench.profiling import profiler
from pki.authority import CertificateAuthority, LeafNames, cert_pem
from pki.inventory import Inventory
from pki.profiles import ENTITY
from pki.requests import parse_csr
from pki.service import CAService

RAW_BATCH = 64
DAYS = 30


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
                    inventory.record_issued(
                        cert, name=name, role=ENTITY.role, via="bench", requester="bench", session=session
                    )
            done += len(batch)
        elapsed = time.perf_counter() - started
    finally:
        ticker.close()
        inventory.close()
    return {
        "throughput_per_s": round(done / elapsed, 1),
        "count": done,
        "errors": 0,
        "crypto_only_per_s": round(done / crypto, 1) if crypto else None,
        "batch": RAW_BATCH,
    }


def sign_body(lab: CALab, csr: Csr) -> dict[str, Any]:
    return {"name": csr.name, "days": DAYS, "pass": lab.passphrase, "csr": csr.pem}


def summarise(
    result: LoadResult,
    samples: dict[int, bytes],
    csrs: list[Csr],
    lab: CALab,
    csr_of: Callable[[int], Csr] | None = None,
) -> dict[str, Any]:
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


def level_http(
    lab: CALab, csrs: list[Csr], args: argparse.Namespace, pids: dict[str, int], profile_to: Path | None, label: str
) -> tuple[dict[str, Any], LoadResult]:
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


def level_mqtt(
    lab: CALab, csrs: list[Csr], args: argparse.Namespace, pids: dict[str, int], profile_to: Path | None
) -> tuple[dict[str, Any], LoadResult]:
    """ssl/sign over MQTT from `--requesters` connections (each its own certificate), `--window` in flight each."""
    names = [f"bench-req-{i:02d}" for i in range(args.requesters)]
    requesters = connect_requesters(lab, lab.issue_devices(names))
    try:
        wait_ca_answers(requesters[0])
        return _signatures(lab, csrs, requesters, args, pids, profile_to)
    finally:
        for requester in requesters:
            requester.close()


def _signatures(
    lab: CALab,
    csrs: list[Csr],
    requesters: list[Requester],
    args: argparse.Namespace,
    pids: dict[str, int],
    profile_to: Path | None,
) -> tuple[dict[str, Any], LoadResult]:
    bodies = [json.dumps(sign_body(lab, csr)).encode() for csr in csrs]
    meter = CpuMeter(pids).start()
    with profiler(profile_to, pids["dashboard"], args.duration):
        result, samples = run_mqtt(
            requesters,
            args.window,
            args.duration,
            args.count,
            lambda _r, i: ("ssl/sign", bodies[i % len(bodies)]),
            "mqtt ssl/sign",
        )
    figures = summarise(result, samples, csrs, lab)
    figures.update(meter.stop())
    figures["unmatched_replies"] = sum(r.unmatched for r in requesters)
    return figures, result


def level_renew(
    lab: CALab, args: argparse.Namespace, pids: dict[str, int], profile_to: Path | None, prefix: str = "bench-renewer"
) -> tuple[dict[str, Any], LoadResult]:
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


def _renewals(
    lab: CALab, requesters: list[Requester], args: argparse.Namespace, pids: dict[str, int], profile_to: Path | None
) -> tuple[dict[str, Any], LoadResult]:
    # Renewal must bring a new key, so each device gets its own CSRs and stops when it has used them all.
    per = max(1, min(args.count // len(requesters), max(args.csrs // len(requesters), 100), 400))
    csrs = make_csrs([r.name for r in requesters for _ in range(per)], "CSRs for renewals")
    own = {r.name: iter(csrs[i * per : (i + 1) * per]) for i, r in enumerate(requesters)}
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


def renewal_supported() -> bool:
    return hasattr(CAService, "renew")

"""The benchmarks run: each bench script in a tiny configuration, as a real subprocess (its own lab, Mosquitto
and dashboard). Exit code, the results file's keys and correctness (every request answered, every certificate
verified, the revoked device cut off and refused) are checked; timings never are."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.rig import BenchLab
from pki.authority import load_certificate, load_private_key, public_key_matches, verify_leaf

from .conftest import PROJECT_ROOT

pytestmark = pytest.mark.integration


def run_bench(script: str, results: str, out: Path, *args: str, timeout: float = 240) -> tuple[str, dict[str, Any]]:
    """Run `python -m bench.<script> --out <out> <args>`; (its stdout, the results file `<out>/<results>.json`)."""
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{script.removesuffix('.py')}", "--out", str(out), *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads((out / f"{results}.json").read_text())


@pytest.mark.parametrize("module", ["issuance", "enrol_storm", "revocation", "telemetry", "fleet"])
def test_bench_help(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--help"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"usage: python -m bench.{module}" in result.stdout
    assert "--out" in result.stdout


def test_the_benches_import_nothing_from_tests() -> None:
    """bench/ and tests/ share lab.testing; `python -m bench.…` needs no tests package."""
    modules = sorted(f"bench.{path.stem}" for path in (PROJECT_ROOT / "bench").glob("*.py") if path.stem != "__init__")
    code = (
        f"import sys; [__import__(m) for m in {modules!r}]; "
        "sys.exit(', '.join(m for m in sys.modules if m.split('.')[0] == 'tests') or None)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_bench_lab_writes_device_files_as_the_ca_does(tmp_path: Path) -> None:
    """The benches' devices (BenchLab.issue_devices) get their files from pki.entity_files: the key 0600 in a 0700
    folder even over a key file left readable, a complete pair from the lab's root, the root's copy, no temp file."""
    with BenchLab(root=tmp_path) as lab:
        lab.generate()
        (first,) = lab.issue_devices(["bench-device"]).values()
        first.key.chmod(0o644)
        old_key = first.key.read_bytes()
        (identity,) = lab.issue_devices(["bench-device"]).values()
        root_pem = lab.layout.ca_cert.read_bytes()
    assert stat.S_IMODE(identity.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(identity.key.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(identity.cert.stat().st_mode) == 0o644
    cert, key_pem = load_certificate(identity.cert.read_bytes()), identity.key.read_bytes()
    assert key_pem != old_key and public_key_matches(cert, load_private_key(key_pem))
    assert identity.ca_cert.read_bytes() == root_pem and verify_leaf(load_certificate(root_pem), cert)
    assert sorted(p.name for p in identity.key.parent.iterdir()) == [
        "bench-device.crt",
        "bench-device.key",
        "root_ca.crt",
    ]


def test_issuance_bench_runs_every_level(tmp_path: Path) -> None:
    tiny = [
        "--duration",
        "1",
        "--count",
        "20",
        "--csrs",
        "20",
        "--threads",
        "2",
        "--http-clients",
        "2",
        "--requesters",
        "2",
        "--window",
        "2",
        "--renewers",
        "2",
        "--quiet-timeout",
        "0",
        "--ca-replicas",
        "2",
    ]
    stdout, results = run_bench("issuance.py", "issuance-ec", tmp_path, *tiny)
    assert results["bench"] == "issuance-ec" and {"cpu", "cores", "date"} <= set(results["machine"])
    figures = results["figures"]
    assert {"key_type", "config", "environment", "targets", "levels"} <= set(figures)
    levels = figures["levels"]
    # the transport levels with two CA service replicas (`--ca-replicas 2`: named ...-2ca)
    transports = ("http-werkzeug-2ca", "http-gunicorn-2ca", "mqtt-2ca", "renew-2ca")
    assert set(levels) == {"raw", "service", *transports}
    assert levels["raw"]["count"] > 0 and levels["raw"]["crypto_only_per_s"] > 0
    for name in ("service", *transports):
        level = levels[name]
        assert {"throughput_per_s", "ratio_to_raw", "p50_ms", "p99_ms", "by_status"} <= set(level), name
        assert level["count"] > 0 and level["errors"] == 0, (name, level["by_status"])
        assert level["verified_sample"] > 0 and level["verification_problems"] == [], name
    for name in transports:
        cpu = {"dashboard_cpu_pct", "ca1_cpu_pct", "ca2_cpu_pct", "broker_cpu_pct", "bench_cpu_pct"}
        assert cpu <= set(levels[name]), name
    assert levels["renew-2ca"]["ratio_to_service"] > 0
    assert "ratio" in stdout and "mqtt" in stdout
    assert (tmp_path / "issuance-ec-latency.png").stat().st_size > 0
    assert (tmp_path / "issuance-ec-throughput.png").stat().st_size > 0


def test_enrol_storm_bench_with_tokens(tmp_path: Path) -> None:
    _, results = run_bench(
        "enrol_storm.py",
        "enrol-storm",
        tmp_path,
        "--devices",
        "20",
        "--requesters",
        "2",
        "--auth",
        "token",
        "--timeout",
        "60",
        "--quiet-timeout",
        "0",
    )
    figures = results["figures"]
    assert {"total_s", "certificates_per_s", "latency", "time_to_certificate", "by_status", "target_met"} <= set(
        figures
    )
    assert figures["failures"] == 0 and figures["by_status"] == {"201": 20}
    assert figures["latency"]["count"] == 20 and "p99_ms" in figures["latency"]
    assert (tmp_path / "enrol-storm-progress.png").exists() and (tmp_path / "enrol-storm-latency.png").exists()


def test_revocation_bench_cuts_the_device_off(tmp_path: Path) -> None:
    _, results = run_bench(
        "revocation.py", "revocation", tmp_path, "--rounds", "1", "--observe", "1.5", "--quiet-timeout", "0"
    )
    figures = results["figures"]
    assert {"closed", "shown", "cutoff", "refused", "revoke_reply", "per_round", "target_met"} <= set(figures)
    assert figures["failures"] == []
    (round_,) = figures["per_round"]
    assert round_["closed_ms"] is not None and round_["shown_ms"] is not None
    assert round_["dropped_after_revoke"] > 0 and round_["cutoff_ms"] is not None
    assert round_["refused_ms"] is not None and "REVOKED" in round_["refusal"].upper()
    assert round_["reconnect_refused"] is True
    assert (tmp_path / "revocation.png").exists()


# -- the telemetry half: pipeline and fleet --------------------------------------------------------------


def test_telemetry_bench_measures_the_c_pipeline_the_ingest_replicas_and_latency(tmp_path: Path) -> None:
    tiny = [
        "--publishers",
        "2",
        "--messages",
        "500",
        "--devices",
        "4",
        "--rates",
        "100",
        "--step-seconds",
        "1",
        "--latency-devices",
        "4",
        "--latency-rate",
        "40",
        "--latency-seconds",
        "1.5",
        "--quiet-timeout",
        "0",
    ]
    stdout, results = run_bench("telemetry.py", "telemetry", tmp_path, *tiny)
    figures = results["figures"]
    assert {"c_pipeline", "c_subscriber", "ingest_1", "ingest_2", "latency", "targets"} <= set(figures)
    flood = figures["c_pipeline"]  # every reading the mosquitto_pub processes sent reached mosquitto_sub
    assert flood["published"] == flood["received"] == 1000 and flood["lost"] == 0 and flood["rate"] > 0, flood
    for phase in ("c_subscriber", "ingest_1", "ingest_2"):
        (step,) = figures[phase]["steps"]
        # Every acknowledged message reached the consumer (mosquitto_sub; the replicas stored each one).
        assert step["published"] == step["ingested"] > 0 and step["lost"] == 0, (phase, step)
        assert "broker_cpu_pct" in step["cpu"] and figures[phase]["ratio_to_c"] > 0, phase
    assert {"ingest1_cpu_pct", "ingest2_cpu_pct"} <= set(figures["ingest_2"]["steps"][0]["cpu"])
    latency = figures["latency"]
    assert latency["dashboards"] == 2 and latency["lost"] == 0 and latency["published"] > 0
    assert latency["browser_ms"]["count"] > 0 and "p99_ms" in latency["browser_ms"]
    assert all(tab["count"] > 0 for tab in latency["per_dashboard_ms"])  # both tabs, one per dashboard
    assert latency["errors"] == []
    assert "ratio to the C pipeline" in stdout
    assert (tmp_path / "telemetry-latency.png").stat().st_size > 0


def test_fleet_bench_lists_every_device_online(tmp_path: Path) -> None:
    _, results = run_bench(
        "fleet.py", "fleet", tmp_path, "--devices", "20", "--rate", "40", "--seconds", "2", "--quiet-timeout", "0"
    )
    figures = results["figures"]
    assert {"connects_per_s", "connect_latency_ms", "broker_kib_per_connection", "cpu", "targets"} <= set(figures)
    assert figures["connected"] == 20 and figures["connect_failures"] == 0
    assert figures["dashboard_online"] == 20 and figures["all_online"] is True
    assert figures["published"] == figures["ingested"] > 0 and figures["lost"] == 0
    assert figures["dashboard_log_errors"] == []
    assert (tmp_path / "fleet-connections.png").stat().st_size > 0

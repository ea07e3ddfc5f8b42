"""The telemetry bench's flood and its consumers: `mosquitto_pub` processes (C, mutual TLS) publishing as fast as
they can, into the C reference (`mosquitto_sub`) or the ingest replicas (`python -m dashboard.ingest`), each
consumer counting what it got over time (bench.telemetry, part 1)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import CpuMeter
from bench.rig import BenchLab, MachineMeter
from lab.processes import stop_process
from lab.testing import mosquitto_tls_args

TELEMETRY = "iot/thermometer/+/temperature"


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
        argv = [
            "mosquitto_sub",
            *mosquitto_tls_args(lab.identity("ingest-1"), lab.broker_port),
            "-i",
            "ingest-1",
            "-q",
            "0",
            "-t",
            TELEMETRY,
            "-N",
            "-F",
            "x",
        ]
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
        probe = [
            "mosquitto_pub",
            *mosquitto_tls_args(lab.identity("flood-0"), lab.broker_port),
            "-i",
            "flood-0",
            "-q",
            "1",
            "-t",
            "iot/thermometer/flood-0/temperature",
            "-m",
            "{}",
        ]
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
            process = subprocess.Popen(
                argv,
                cwd=Path(__file__).resolve().parent.parent,
                env={**lab.env, **env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=False,
            )
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
        argv = [
            "mosquitto_pub",
            *mosquitto_tls_args(lab.identity(name), lab.broker_port),
            "-i",
            name,
            "-q",
            "0",
            "-t",
            f"iot/thermometer/{name}/temperature",
            "-m",
            payload,
            "--repeat",
            str(messages),
            "--repeat-delay",
            "0",
        ]
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
    result: dict[str, Any] = {
        "published": total,
        "received": got,
        "lost": max(total - got, 0),
        "publisher_exit_codes": sorted(set(codes)),
        "cpu": cpu,
        "publish_seconds": round(published_at - started, 3),
    }
    if span and got >= total:
        result["seconds"] = round(span[1] - span[0], 3)
        result["rate"] = round(total / max(span[1] - span[0], 1e-6), 1)
    else:
        result["rate"] = None
    return result

"""Shared bench plumbing: timing, percentiles, a progress bar, /proc CPU readings, result files, plots."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOCS_DIR = Path(__file__).resolve().parent.parent / "docs" / "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (what p99 means in most load tools)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000 for v in latencies_s]
    if not ms:
        return {"count": 0}
    return {
        "count": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal or BENCH_PROGRESS=1)."""

    def __init__(self, total: int, label: str) -> None:
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self.enabled = sys.stderr.isatty() or os.environ.get("BENCH_PROGRESS") == "1"
        self._last = 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            width = 30
            filled = int(width * min(self.done, self.total) / self.total)
            sys.stderr.write(f"\r{self.label:<28} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class CpuMeter:
    """CPU used by some processes between start() and stop(), as a share of one core."""

    pids: dict[str, int]
    _start: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0

    def start(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._start = {name: process_cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        return {
            f"{name}_cpu_pct": round(100 * (process_cpu_seconds(pid) - self._start[name]) / elapsed, 1)
            for name, pid in self.pids.items()
        }


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_results(name: str, figures: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"bench": name, "machine": machine(), "figures": figures}, indent=2) + "\n")
    print(f"results written to {path}")
    return path


def print_targets(targets: dict[str, bool | None]) -> None:
    """One line per target of a bench: met, NOT met, or n/a (not measured in this run)."""
    for target, met in targets.items():
        print(f"  target {target}: {'n/a' if met is None else 'met' if met else 'NOT met'}")


def print_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    rows = list(rows)
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None (with a hint) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -r requirements-dev.txt)")
        return None
    return plt


def _save(fig: Any, ax: Any, plt: Any, title: str, path: Path) -> Path:
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_histograms(series: dict[str, Sequence[float]], title: str, path: Path) -> Path | None:
    """Latency distributions (ms) as overlaid histograms; returns None when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, values in series.items():
        if values:
            ax.hist([v * 1000 for v in values], bins=60, alpha=0.55, label=label)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    return _save(fig, ax, plt, title, path)


def plot_timeseries(
    series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, ylabel: str, path: Path
) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(ylabel)
    return _save(fig, ax, plt, title, path)

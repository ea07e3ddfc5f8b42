"""py-spy sampling for the benches (`--profile`), and a summary of the heaviest frames of its collapsed stacks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


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
                [
                    py_spy(),
                    "record",
                    "--pid",
                    str(self.pid),
                    "--duration",
                    str(max(1, int(self.duration))),
                    "--rate",
                    "250",
                    "--gil",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(self.out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
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
        for frame in {
            frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0] + ")" for frame in stack.split(";")
        }:
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

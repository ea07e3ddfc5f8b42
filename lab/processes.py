"""Child processes the lab's runners, tests and benches start: one way to stop them."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop_process(process: subprocess.Popen[Any] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM, as `docker stop` or the native runner send it; SIGKILL after `timeout` s; reaped either way. The
    exit code (None for no process)."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()

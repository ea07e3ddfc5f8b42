"""Child processes the lab's runners, tests and benches start: one way to start them, one way to stop them."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from pki.config import PROJECT_ROOT


def spawn(
    argv: Sequence[str],
    env: Mapping[str, str],
    output: int | IO[Any] = subprocess.PIPE,
    *,
    text: bool = False,
    new_session: bool = False,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[Any]:
    """Start a child of the project in the project root, with no stdin (it never reads the terminal) and its
    stderr merged into `output`: a pipe to read its lines from, or an open log file. `new_session`: its own
    session and process group, so a Ctrl-C meant for the parent does not reach it."""
    return subprocess.Popen(
        list(argv),
        env=dict(env),
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        text=text,
        start_new_session=new_session,
        preexec_fn=preexec_fn,
    )


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

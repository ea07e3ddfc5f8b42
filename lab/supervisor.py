"""Process supervision for the native lab (lab/native.py): children that die with the runner, their output
prefixed with their names, restart backoff, and the `lab.pids` file `./setup.sh down` and `status` read."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

PIDS_FILE = "lab.pids"
# How long each kind of child gets between SIGTERM and SIGKILL. Thermometers wait up to 5 s for the
# broker to acknowledge their last readings and `offline`.
STOP_TIMEOUTS = {"device": 10.0, "dashboard": 5.0, "ca": 5.0, "broker": 10.0}
RESTART_MAX_DELAY = 30.0
STABLE_AFTER = 60.0  # a child that ran this long starts its backoff from scratch when it dies


# -- children never outlive the runner (Linux) --------------------------------------------------

PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # resolved before any fork: the child only calls it


def die_with_runner(runner_pid: int) -> Callable[[], None]:
    """preexec_fn: SIGTERM this child when the runner dies (best effort, Linux only).

    The "parent" is the thread that forked, so children are only ever started from the main thread.
    """

    def preexec() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != runner_pid:  # the runner died between fork and prctl
                os._exit(1)

    return preexec


# -- output ----------------------------------------------------------------------------------------


class PrefixedOutput:
    """Lines from many threads, one at a time, each prefixed with who said it."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        with self._lock:
            try:
                self.stream.write(f"[{name}] {text}\n")
                self.stream.flush()
            except (OSError, ValueError):  # closed terminal or pipe: keep running, keep stopping cleanly
                pass

    def pump(self, name: str, pipe: IO[bytes], watch: Callable[[str], None] | None = None) -> threading.Thread:
        """Copy a child's output, line by line, until it closes (the child exited); `watch` sees each line."""

        def copy() -> None:
            with pipe:
                for raw in iter(pipe.readline, b""):
                    text = raw.decode(errors="replace").rstrip("\r\n")
                    self.line(name, text)
                    if watch is not None:
                        watch(text)

        thread = threading.Thread(target=copy, name=f"output-{name}", daemon=True)
        thread.start()
        return thread


# -- services ----------------------------------------------------------------------------------------


@dataclass
class Service:
    """One child the runner keeps alive: how to start it, and its current process."""

    name: str
    kind: str  # broker | ca | dashboard | device
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    output: threading.Thread | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    restarts: int = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with {returncode}"


def restart_delay(failures: int) -> float:
    """1, 2, 4 ... 30 s: a child that keeps crashing does not spin."""
    return min(RESTART_MAX_DELAY, 2.0 ** max(failures - 1, 0))


def local_address(host: str) -> str:
    """Where to reach a server bound to `host` from this machine."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "*") else host  # noqa: S104 - a comparison


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((local_address(host), port), timeout=timeout):
            return True
    except OSError:
        return False


def child_env(base: dict[str, str], **values: str) -> dict[str, str]:
    env = {**base, **values, "PYTHONUNBUFFERED": "1"}
    return env


# -- pid file helpers (also for tests) -----------------------------------------------------------


def read_pids(path: Path) -> list[tuple[int, str]]:
    """`PID NAME` lines of a lab.pids file; a missing or garbled file gives what can be read."""
    try:
        text = path.read_text()
    except OSError:
        return []
    entries = []
    for line in text.splitlines():
        fields = line.split(maxsplit=1)
        if fields and fields[0].isdigit():
            entries.append((int(fields[0]), fields[1].strip() if len(fields) > 1 else ""))
    return entries


def pid_alive(pid: int) -> bool:
    """Is `pid` a running process? A zombie is not: it has exited and only waits to be reaped (where PID 1 is
    not an init, as in a container, an orphan's zombie stays forever, and signal 0 still reaches it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): signal 0 is all we can ask
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

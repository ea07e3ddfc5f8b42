"""The fresh-machine check: the README's two commands in a fresh Debian 12 container, run by `.ci/run`.

`python -m tests.fresh_machine` starts from Debian minbase plus python3 (what a user's machine has; nothing
else), copies this checkout in as a fresh clone has it, then runs, as the README says:

1. `./setup.sh test`: it installs what the tests need itself (Mosquitto, Chromium, the venv, ...) and the whole
   suite must pass there (the Docker lab test skips inside: a container can run no engine; it runs outside);
2. `./setup.sh`: no engine answers in there, so the native lab comes up; readings must flow into the dashboard.

The container runs in the engine the Docker lab test uses (tests/dockerhost.py), is removed at the end, and
every part's duration is printed. Exit status 0 when both pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .dockerhost import Engine, EngineUnavailable, ensure_base_images, ensure_fresh_image

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Reads /api/data inside the container until both devices' readings grew (the image has python3, no curl), with a
# viewer API token made by `python -m dashboard.users token` (argv[2]).
READINGS_PROBE = """
import json, sys, time, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
request = urllib.request.Request("http://127.0.0.1:5000/api/data", headers={"Authorization": "Bearer " + sys.argv[2]})
first, deadline = None, time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    try:
        data = json.load(opener.open(request, timeout=5))["device_data"]
        counts = {d: v.get("readings") or 0 for d, v in data.items()}
        first = first or (counts if {"device001", "device002"} <= set(counts) else None)
        if first and all(counts[d] > first[d] for d in ("device001", "device002")):
            print(json.dumps(counts)); sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
sys.exit(1)
"""


def tracked_files_tar() -> bytes:
    """The checkout's files as a fresh clone has them (tracked, plus untracked ones git does not ignore)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        check=True,
    ).stdout
    existing = b"\0".join(n for n in listed.split(b"\0") if n and (PROJECT_ROOT / n.decode()).is_file())
    return subprocess.run(
        ["tar", "-C", str(PROJECT_ROOT), "--null", "-T", "-", "-c", "--transform", "s,^,lab/,"],
        input=existing,
        capture_output=True,
        check=True,
    ).stdout


def run(engine: Engine, timings: dict[str, float]) -> int:
    def part(name: str, started: float) -> None:
        timings[name] = round(time.monotonic() - started, 1)
        print(f"fresh machine: {name}: {timings[name]:.1f} s", flush=True)

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        ensure_base_images(engine, Path(tmp))
        image = ensure_fresh_image(engine, Path(tmp))
    part("base images", started)
    name = f"iot-ca-lab-fresh-{int(time.time())}"
    # The host's CA bundle is the user's: HTTPS here goes through a proxy with its own CA, and a user behind one
    # has its CA in the system bundle and in PIP_CERT, as this machine does. /dev/shm sized as a desktop's.
    engine.docker(
        "run",
        "-d",
        "--name",
        name,
        "--shm-size",
        "1g",
        "-e",
        "PIP_CERT=/etc/lab-host-ca.crt",
        "-v",
        f"{HOST_CA_BUNDLE}:/etc/lab-host-ca.crt:ro",
        image,
        "sleep",
        "infinity",
    )
    try:
        subprocess.run(
            ["docker", "exec", "-i", name, "tar", "-C", "/root", "-x"],
            input=tracked_files_tar(),
            env=engine.env,
            check=True,
            timeout=120,
        )
        started = time.monotonic()
        test = subprocess.run(
            ["docker", "exec", "-w", "/root/lab", name, "./setup.sh", "test", "-q"],
            env=engine.env,
            timeout=3600,
            check=False,
        )
        part("./setup.sh test", started)
        if test.returncode != 0:
            print(f"fresh machine: ./setup.sh test exited {test.returncode}", flush=True)
            return 1
        started = time.monotonic()
        engine.docker("exec", "-d", "-w", "/root/lab", name, "sh", "-c", "./setup.sh > /root/lab-run.log 2>&1")
        token = ""
        deadline = time.monotonic() + 180
        while not token and time.monotonic() < deadline:  # the database exists once the lab has started
            made = engine.docker(
                "exec",
                "-w",
                "/root/lab",
                name,
                ".venv/bin/python",
                "-m",
                "dashboard.users",
                "token",
                "fresh-machine",
                "--role",
                "viewer",
                check=False,
            )
            token = made.stdout.strip().splitlines()[-1] if made.returncode == 0 and made.stdout.strip() else ""
            time.sleep(0 if token else 2)
        probe = subprocess.run(
            ["docker", "exec", name, "python3", "-c", READINGS_PROBE, "180", token],
            env=engine.env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        part("./setup.sh (native lab up, readings flowing)", started)
        if probe.returncode != 0:
            log = engine.docker("exec", name, "tail", "-n", "60", "/root/lab-run.log", check=False).stdout
            print(f"fresh machine: no readings from the native lab in the container; its output:\n{log}", flush=True)
            return 1
        print(f"fresh machine: readings per device: {probe.stdout.strip()}", flush=True)
        return 0
    finally:
        engine.docker("rm", "-f", name, check=False)


def main(argv: Sequence[str] | None = None) -> int:
    del argv
    timings: dict[str, float] = {}
    started = time.monotonic()
    try:
        engine = Engine.find_or_start()
    except EngineUnavailable as ex:
        print(f"fresh machine: no Docker Engine: {ex}", file=sys.stderr)
        return 1
    part_started = time.monotonic()
    timings["daemon"] = round(part_started - started, 1)
    try:
        code = run(engine, timings)
    finally:
        engine.stop()
    timings["total"] = round(time.monotonic() - started, 1)
    print(f"fresh machine: {'passed' if code == 0 else 'FAILED'}; timings {json.dumps(timings)}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

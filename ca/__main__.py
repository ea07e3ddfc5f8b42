"""`python -m ca`: one CA service replica, in the foreground until SIGTERM or Ctrl-C.

Identity: CA_INSTANCE=<n> makes it `ca-<n>` (the native runner numbers its replicas so); without it the replica
claims the first free slot among ca-1 ... ca-<CA_REPLICAS> in the shared database (ca/slots.py), as compose's
`--scale ca=N` replicas do, which all share one service definition.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

from pki.config import ConfigError, Settings, lab_environ

from .internal import internal_port, internal_secret
from .process import CAProcess, CAProcessOptions
from .slots import SlotError, claim_slot


def main() -> int:
    env = lab_environ()
    level = (env.get("LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    wait = ""
    try:
        settings = Settings.from_env()
        wait = (env.get("CA_SLOT_WAIT") or "").strip()
        slot = claim_slot(settings, env.get("CA_INSTANCE"), *([float(wait)] if wait else []))
    except (ConfigError, SlotError) as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    except ValueError:
        print(f"error: CA_SLOT_WAIT={wait!r} is not a number of seconds", file=sys.stderr)
        return 2
    try:
        options = CAProcessOptions(
            internal_host=(env.get("CA_INTERNAL_HOST") or "127.0.0.1").strip(), internal_port=internal_port(env)
        )
        process = CAProcess(settings, name=slot.name, secret=internal_secret(settings), options=options)
    except OSError as ex:  # a port is taken, or the dashboard certificate (EST/ACME's TLS) is missing
        slot.release()
        print(f"error: cannot start the CA service {slot.name}: {ex}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    process.start()
    print(
        f"CA service {slot.name}: internal API on {process.internal_url}"
        + (f", EST and ACME on https://{settings.ca_https_host}:{process.https.port}/" if process.https else ""),
        flush=True,
    )
    code = 0
    try:
        while not stop.wait(slot.heartbeat_interval):
            slot.heartbeat()
    except SlotError as ex:  # another replica holds our identity now: two processes must never share it
        print(f"error: {ex}", file=sys.stderr)
        code = 1
    finally:
        process.shutdown()
        slot.release()
    return code


if __name__ == "__main__":
    sys.exit(main())

"""`python -m lab.native`: the whole lab as local processes, in the foreground; Ctrl-C stops all of it.

Used by `./setup.sh native` (and by `./setup.sh` when no Docker engine answers). In order: the
certificates are brought up to date (the generator's logic), Mosquitto starts on the rendered config,
then the CA service replicas (`python -m ca`, CA_REPLICAS of them: `ca-1` ...), the dashboard (which
forwards /v1/ssl/* to them and never gets CA_PASSPHRASE) and one thermometer per device. Every child's
output is shown prefixed with its name (`[mosquitto] ...`, `[device001] ...`); the runner's own lines say `[runner]`.

Children run in their own sessions, so a Ctrl-C in the terminal reaches only the runner, which stops
them in order: thermometers first (SIGTERM: they publish retained `offline`), then the dashboard, the CA
replicas, then Mosquitto; whatever ignores SIGTERM is killed. On Linux each child also gets PR_SET_PDEATHSIG, so even
a SIGKILLed runner leaves nothing behind. A child that dies is reported and restarted with backoff.

Devices that were never pre-generated (`--enrol device003`, or ENROL_DEVICES in .env) enrol themselves: the
runner, which holds the CA passphrase, asks the CA (in this process, through `pki.service`) for a single-use
token per device that has no certificate yet and starts its thermometer with only that token (ENROL_TOKEN,
CA_URL = this lab's dashboard); the thermometer then gets its certificate over the CA's HTTP API.

`<DATA_DIR>/lab.pids` lists the runner and its children (`PID NAME` per line) for `./setup.sh down`
and `./setup.sh status`; it is removed on exit.

This module is the command line; which services, with what environment, is lab/native_services.py; the runner
(their certificates and tokens, the order, restarts, stopping) lab/native_runner.py; the supervision of each
child (output, backoff, PR_SET_PDEATHSIG, lab.pids) lab/supervisor.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pki.config import ConfigError, Settings, lab_environ, parse_devices

from .native_runner import EXIT_CONFIG, LabRunner

# -- command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lab.native",
        description="Run the lab as local processes in the foreground: Mosquitto, the dashboard and one "
        "thermometer per device. Ctrl-C stops everything.",
    )
    parser.add_argument("--devices", help="comma-separated device ids (default: DEVICES from .env)")
    parser.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard nor the CA service")
    parser.add_argument(
        "--enrol",
        help="comma-separated device ids that enrol themselves with a single-use token "
        "(no pre-generated certificate; default: ENROL_DEVICES from .env)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 stopped by Ctrl-C/SIGTERM, 1 could not start, 2 settings or CA passphrase wrong."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        devices = parse_devices(args.devices) if args.devices is not None else settings.devices
        enrol = parse_devices(args.enrol if args.enrol is not None else lab_environ().get("ENROL_DEVICES") or "")
    except ConfigError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return EXIT_CONFIG
    if enrol and args.no_dashboard:
        print("error: --enrol needs the dashboard: it is the CA the devices enrol with", file=sys.stderr)
        return EXIT_CONFIG
    return LabRunner(settings, devices, dashboard=not args.no_dashboard, enrol=enrol).run()


if __name__ == "__main__":
    sys.exit(main())

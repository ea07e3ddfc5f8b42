#!/usr/bin/env python3
"""Create or renew the lab's root CA and every certificate it needs; idempotent.

`--check` lists every lab certificate as valid / expiring / expired / revoked (the dashboard's states; revoked
per the inventory, which --check never creates, and the CRL) or missing / invalid, then the CRL itself.

Exit codes: 0 done / all valid, 1 `--check` found something expiring, expired, revoked, missing or invalid,
2 the CA could not be unlocked or a setting is wrong (nothing was written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pki.authority import CAError, WrongPassphrase
from pki.config import ConfigError, Settings, parse_devices, revoked_next_step
from pki.generator import LabCertificates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Create or renew the lab's root CA, broker, dashboard and device certificates. "
        "Only what is missing, unreadable, not from the current root or inside RENEW_BEFORE_DAYS is reissued."
    )
    parser.add_argument(
        "--devices",
        help="comma-separated device ids (default: DEVICES from .env); a device named "
        "here whose certificate is revoked gets a new one (from DEVICES it is only reported)",
    )
    parser.add_argument("--force", action="store_true", help="reissue every leaf certificate (the root is kept)")
    parser.add_argument(
        "--check", action="store_true", help="only report; exit 1 if anything is expiring, expired or invalid"
    )
    parser.add_argument("--out", type=Path, help="certificates folder (default: CERTS_DIR or ./certs)")
    return parser


def print_check_table(rows: Sequence) -> None:
    header = f"{'ENTITY':<14} {'STATUS':<9} {'DAYS LEFT':>9}  {'NOT AFTER (UTC)':<20} {'SERIAL':<18} SUBJECT / DETAIL"
    print(header)
    for row in rows:
        days = f"{row.days_left:9.1f}" if row.days_left is not None else f"{'-':>9}"
        not_after = row.not_after.strftime("%Y-%m-%d %H:%M") if row.not_after else "-"
        detail = row.subject + (f"  [{row.detail}]" if row.detail else "")
        print(f"{row.name:<14} {row.status:<9} {days}  {not_after:<20} {row.serial[:16] or '-':<18} {detail}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.out is not None:
            settings = _with(settings, certs_dir=args.out.resolve())
        devices = parse_devices(args.devices) if args.devices is not None else None
    except ConfigError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    lab = LabCertificates(settings, progress=print)
    if args.check:
        rows = lab.check(devices)
        crl = lab.check_crl()
        print_check_table([*rows, crl])
        bad = [row for row in rows if not row.ok]
        renewable = [row for row in bad if row.status != "revoked"]
        if bad:
            print()
        if renewable:
            print(
                f"{len(renewable)} certificate(s) need attention: run ./setup.sh certs (or this script) to renew them."
            )
        for row in bad:
            if row.status == "revoked":
                print(f"{row.name} is revoked: {revoked_next_step(row.name)}.")
        if not crl.ok:
            print(f"The CRL is {crl.status}: {crl.detail}.")
        return 1 if bad or not crl.ok else 0
    try:
        report = lab.generate(devices, force=args.force, reissue_revoked=devices is not None)
    except WrongPassphrase:
        print(
            f"error: CA_PASSPHRASE does not unlock {lab.layout.ca_key}. Nothing was written.\n"
            "Put the passphrase this CA was created with into .env (or the environment). If it is lost, delete "
            f"{lab.layout.ca_dir} to create a new root CA; every certificate is then reissued.",
            file=sys.stderr,
        )
        return 2
    except (ConfigError, CAError) as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    revoked = [r for r in report.results if r.action == "revoked"]
    changed = sum(1 for r in report.results if r.action not in ("kept", "revoked"))
    kept = len(report.results) - changed - len(revoked)
    print(
        f"Done: {changed} issued, {kept} kept, {len(revoked)} revoked (not reissued), in {settings.certs_dir}"
        if revoked
        else f"Done: {changed} issued, {kept} kept, in {settings.certs_dir}"
    )
    return 0


def _with(settings: Settings, **changes: object) -> Settings:
    from dataclasses import replace

    return replace(settings, **changes)


if __name__ == "__main__":
    sys.exit(main())

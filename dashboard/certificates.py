"""The certificate table the dashboard shows: the inventory merged with the lab's files, plus the CRL.

The inventory knows every certificate the CA issued (generator and API, including revoked and superseded
ones); `LabCertificates.check()` knows whether the files the lab's services actually use are present,
readable, from the current root and matched by their key. One row per certificate (serial), statuses
computed with RENEW_BEFORE_DAYS the same way as `generate_ca_and_device_certs.py --check`.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from cryptography import x509
from sqlalchemy import func, select

from pki.broker import BrokerFiles
from pki.config import Settings
from pki.inventory import REVOKED, SUPERSEDED, CertificateRecord, Inventory
from pki.lab import EXPIRED, EXPIRING, INVALID, MISSING, ROOT_NAME, VALID, LabCertificates, lab_entities
from pki.store import CertsLayout

log = logging.getLogger(__name__)

STATUS_ORDER = {VALID: 0, EXPIRING: 1, EXPIRED: 2, REVOKED: 3, INVALID: 4, MISSING: 5, SUPERSEDED: 6}


def expiry_status(days_left: float, renew_before_days: int) -> str:
    if days_left <= 0:
        return EXPIRED
    if days_left < renew_before_days:
        return EXPIRING
    return VALID


class CertificateView:
    """Reads certificate state for the page; cheap enough to call every few seconds."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layout = CertsLayout(settings.certs_dir)
        self._inventory: Inventory | None = None

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            self._inventory = Inventory(self.settings.effective_database_url)
        return self._inventory

    def close(self) -> None:
        if self._inventory is not None:
            self._inventory.close()
            self._inventory = None

    def _lab_order(self) -> dict[str, int]:
        names = [ROOT_NAME] + [entity.name for entity in lab_entities(self.settings)]
        return {name: index for index, name in enumerate(names)}

    def rows(self, now: dt.datetime | None = None) -> list[dict[str, Any]]:
        """Every certificate, lab entities first (root, broker, dashboard, provisioner, devices)."""
        now = now or dt.datetime.now(dt.UTC)
        renew = self.settings.renew_before_days
        try:
            checks = {row.name: row for row in LabCertificates(self.settings).check(now=now)}
        except Exception:  # unreadable certs folder: show the inventory alone rather than nothing
            log.exception("could not check the lab certificates")
            checks = {}
        rows: dict[str, dict[str, Any]] = {}
        for record in self.inventory.list():
            data = record.to_dict(now)
            status = data["status"]
            if status not in (REVOKED, SUPERSEDED):
                status = expiry_status(data["days_left"], renew)
            data.update(status=status, detail=data.get("revocation_reason") or "", source="inventory",
                        current=record.status != SUPERSEDED)
            rows[record.serial] = data
        for name, check in checks.items():
            if check.serial and check.serial in rows:
                row = rows[check.serial]
                row["in_use"] = True
                if check.status in (INVALID, MISSING):  # the file on disk is broken even if the record is fine
                    row.update(status=check.status, detail=check.detail)
                continue
            # A lab file the inventory does not know (e.g. a database reset), or a missing/broken one.
            rows[f"file:{name}"] = {
                "serial": check.serial,
                "name": name,
                "common_name": name,
                "role": check.role,
                "subject": check.subject,
                "issuer": "",
                "not_before": None,
                "not_after": check.not_after.isoformat() if check.not_after else None,
                "days_left": round(check.days_left, 2) if check.days_left is not None else None,
                "status": check.status,
                "detail": check.detail,
                "source": "files",
                "current": True,
                "in_use": True,
                "issued_via": "",
            }
        order = self._lab_order()
        result = list(rows.values())
        result.sort(key=lambda r: (not r["current"], order.get(r["name"], len(order)), r["name"],
                                   r.get("issued_at") or ""))
        return result

    def crl(self) -> dict[str, Any]:
        """What the broker enforces: certs/policy/crl.pem (its dates and number of entries)."""
        path: Path = BrokerFiles(self.settings.certs_dir, self.settings.data_dir).crl
        try:
            crl = x509.load_pem_x509_crl(path.read_bytes())
        except FileNotFoundError:
            return {"present": False, "path": str(path), "error": "no CRL yet"}
        except (OSError, ValueError) as ex:
            return {"present": False, "path": str(path), "error": f"unreadable CRL: {ex}"}
        next_update = crl.next_update_utc
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = None
        return {
            "present": True,
            "path": str(path),
            "last_update": crl.last_update_utc.isoformat(),
            "next_update": next_update.isoformat() if next_update else None,
            "revoked": len(list(crl)),
            "number": number,
        }

    def signature(self) -> tuple[Any, ...]:
        """Changes whenever the certificate table would: new, superseded or revoked records, or a new CRL."""
        with self.inventory.session() as session:
            counts = tuple(session.execute(
                select(CertificateRecord.status, func.count(CertificateRecord.id), func.max(CertificateRecord.id))
                .group_by(CertificateRecord.status).order_by(CertificateRecord.status)
            ))
        crl_path = BrokerFiles(self.settings.certs_dir, self.settings.data_dir).crl
        try:
            crl_mtime = crl_path.stat().st_mtime_ns
        except OSError:
            crl_mtime = 0
        files = []
        for name in self._lab_order():
            path = self.layout.ca_cert if name == ROOT_NAME else self.layout.cert(name)
            try:
                files.append(path.stat().st_mtime_ns)
            except OSError:
                files.append(0)
        return (tuple(tuple(c) for c in counts), crl_mtime, tuple(files))

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, int]:
        counts = {VALID: 0, EXPIRING: 0, EXPIRED: 0, REVOKED: 0, INVALID: 0}
        for row in rows:
            if row["current"] and row["status"] in counts:
                counts[row["status"]] += 1
        return counts

    def snapshot(self) -> dict[str, Any]:
        rows = self.rows()
        return {"certs": rows, "crl": self.crl(), "summary": self.summary(rows),
                "renew_before_days": self.settings.renew_before_days}

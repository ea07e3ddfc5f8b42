"""The certificate table the dashboard shows: the inventory merged with the lab's files, plus the CRL.

The inventory knows every certificate the CA issued (generator and API, including revoked and superseded
ones); `LabCertificates.check()` knows whether the files the lab's services actually use are present,
readable, from the current root and matched by their key. One row per certificate (serial), statuses
computed with RENEW_BEFORE_DAYS the same way as `generate_ca_and_device_certs.py --check`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from sqlalchemy import func, select

from pki.authority import CAError, load_certificate, load_private_key, public_key_matches
from pki.broker import BrokerFiles
from pki.config import Settings
from pki.generator import ROOT_NAME, LabCertificates, lab_entities
from pki.inventory import REVOKED, SUPERSEDED, CertificateRecord, Inventory
from pki.profiles import DEVICE
from pki.requests import is_protected
from pki.status import EXPIRED, EXPIRING, INVALID, MISSING, VALID, expiry_state
from pki.store import CertsLayout, read_optional

log = logging.getLogger(__name__)

STATUS_ORDER = {VALID: 0, EXPIRING: 1, EXPIRED: 2, REVOKED: 3, INVALID: 4, MISSING: 5, SUPERSEDED: 6}
# Entity states the banner counts, worst first (the order the banner lists them in).
ATTENTION = (EXPIRED, REVOKED, INVALID, MISSING, EXPIRING)
ATTENTION_ITEMS = 50  # entities listed by name in the banner data; the counts cover all of them
RENEWED_VIA = "renew"  # `issued_via` of a certificate a device got over MQTT with its previous one (ssl/renew/<CN>)
KEY_CACHE_LIMIT = 4096


def _when(row: dict[str, Any] | None) -> dt.datetime:
    """A row's issue time (file-only rows have none: they sort first)."""
    stamp = row.get("issued_at") if row else None
    return dt.datetime.fromisoformat(stamp) if stamp else dt.datetime.min.replace(tzinfo=dt.UTC)


def representative(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The certificate that stands for one entity (rows of one name): the one its files use unless that one is
    revoked, else the newest unrevoked one, else the newest. Superseded certificates never count."""
    current = [row for row in rows if row["current"]]
    for candidates in (
        [row for row in current if row.get("in_use") and row["status"] != REVOKED],
        [row for row in current if row["status"] != REVOKED],
        [row for row in current if row.get("in_use")],
        current,
    ):
        if candidates:
            return max(candidates, key=_when)
    return None


def last_renewal(rows: list[dict[str, Any]], current: dict[str, Any] | None) -> dict[str, Any] | None:
    """The entity's newest renewal over MQTT; if there is none, or the current certificate came later another
    way (the generator, the CA API), the current certificate's issue: when, how (`issued_via`) and its serial."""
    renewals = [row for row in rows if row.get("issued_via") == RENEWED_VIA and row.get("issued_at")]
    latest = max(renewals, key=_when) if renewals else None
    if latest is not None and (current is None or _when(latest) >= _when(current)):
        return {"at": latest["issued_at"], "via": RENEWED_VIA, "serial": latest["serial"], "renewed": True}
    if current is not None and current.get("issued_at"):
        return {
            "at": current["issued_at"],
            "via": current.get("issued_via") or "",
            "serial": current["serial"],
            "renewed": current.get("issued_via") == RENEWED_VIA,
        }
    return None


def entity_states(
    rows: list[dict[str, Any]], server_renewable: Callable[[dict[str, Any]], bool] = lambda _row: False
) -> dict[str, dict[str, Any]]:
    """name -> the entity's lifecycle state, for the device cards, the banner and the table's actions.

    `renewal.self`: a device (thermometer) renews itself over MQTT inside the renewal window (lab/renewal.py);
    `renewal.server`: `POST /v1/ssl/sign` without a CSR would renew it (`server_renewable`: the CA holds the
    key of its current certificate). Neither applies to a revoked certificate.
    """
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    states: dict[str, dict[str, Any]] = {}
    for name, named in by_name.items():
        current = representative(named)
        if current is None:  # only superseded certificates: the entity is gone
            continue
        revoked = current["status"] == REVOKED
        states[name] = {
            "name": name,
            "role": current.get("role") or "",
            "status": current["status"],
            "detail": current.get("detail") or "",
            "serial": current.get("serial") or "",
            "not_before": current.get("not_before"),
            "not_after": current.get("not_after"),
            "days_left": current.get("days_left"),
            "last_renewal": last_renewal(named, current),
            "renewal": {
                "self": current.get("role") == DEVICE.role and not revoked,
                "server": not revoked and bool(current.get("serial")) and server_renewable(current),
            },
        }
    return states


def attention(entities: dict[str, dict[str, Any]], crl: dict[str, Any]) -> dict[str, Any]:
    """What the banner says: entities whose certificate is expiring, expired, revoked, invalid or missing, and
    the CRL when it is not valid (an expired CRL locks every client out of the broker)."""
    counts = dict.fromkeys(ATTENTION, 0)
    flagged = [e for e in entities.values() if e["status"] in counts]
    for entity in flagged:
        counts[entity["status"]] += 1
    flagged.sort(
        key=lambda e: (
            ATTENTION.index(e["status"]),
            e["days_left"] if e["days_left"] is not None else float("-inf"),
            e["name"],
        )
    )
    items = [
        {key: entity[key] for key in ("name", "role", "status", "days_left", "not_after", "detail")}
        for entity in flagged[:ATTENTION_ITEMS]
    ]
    crl_problem = None
    if crl.get("status", VALID) != VALID:
        crl_problem = {key: crl.get(key) for key in ("status", "detail", "next_update", "days_left")}
    count = len(flagged) + (crl_problem is not None)
    bad = any(counts[s] for s in (EXPIRED, REVOKED, INVALID, MISSING)) or (
        crl_problem is not None and crl_problem["status"] != EXPIRING
    )
    return {
        "count": count,
        "counts": counts,
        "items": items,
        "crl": crl_problem,
        "level": None if not count else "bad" if bad else "warn",
    }


class CertificateView:
    """Reads certificate state for the page; cheap enough to call every few seconds."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layout = CertsLayout(settings.certs_dir)
        self._inventory: Inventory | None = None
        # (name, serial, key file mtime and size) -> whether the key file is the certificate's key
        self._key_matches: dict[tuple[str, str, int, int], bool] = {}

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
                status = expiry_state(data["days_left"], renew)
            data.update(
                status=status,
                detail=data.get("revocation_reason") or "",
                source="inventory",
                current=record.status != SUPERSEDED,
            )
            rows[record.serial] = data
        for name, check in checks.items():
            if check.serial and check.serial in rows:
                row = rows[check.serial]
                row["in_use"] = True
                # The file on disk is broken even if the record is fine. Not for a superseded certificate: a device
                # that is swapping in its renewed pair (new key written, old certificate not yet) is not broken.
                if check.status in (INVALID, MISSING) and row["current"]:
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
        result.sort(
            key=lambda r: (not r["current"], order.get(r["name"], len(order)), r["name"], r.get("issued_at") or "")
        )
        return result

    def crl(self, now: dt.datetime | None = None) -> dict[str, Any]:
        """What the broker enforces: certs/policy/crl.pem (its dates and number of entries), and its status as
        `--check` reports it (`expiring` inside the refresh window, `expired`, `invalid`, `missing`)."""
        path: Path = BrokerFiles(self.settings.certs_dir, self.settings.data_dir).crl
        try:
            check = LabCertificates(self.settings).check_crl(now=now)
            state = {
                "status": check.status,
                "detail": check.detail,
                "days_left": round(check.days_left, 2) if check.days_left is not None else None,
            }
        except Exception:  # an unreadable root or CRL must not take the table down with it
            log.exception("could not check the CRL")
            state = {"status": INVALID, "detail": "the CRL could not be checked", "days_left": None}
        try:
            crl = x509.load_pem_x509_crl(path.read_bytes())
        except FileNotFoundError:
            return {"present": False, "path": str(path), "error": "no CRL yet", **state}
        except (OSError, ValueError) as ex:
            return {"present": False, "path": str(path), "error": f"unreadable CRL: {ex}", **state}
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
            **state,
        }

    def server_renewable(self, row: dict[str, Any]) -> bool:
        """Whether `POST /v1/ssl/sign` without a CSR renews this certificate: a name the API may issue to, whose
        key the CA holds (an entity the generator or `create` made: certs/<name>/<name>.key, as the API looks
        it up) and that key is this certificate's. A device that renewed itself has a new key the CA never saw:
        re-signing an old key would give it a certificate it cannot use."""
        name, serial = row["name"], row.get("serial") or ""
        if not serial or is_protected(name):
            return False
        try:
            path = self.layout.key(name)
            stat = path.stat()
        except (OSError, ValueError):
            return False
        cache_key = (name, serial, stat.st_mtime_ns, stat.st_size)
        known = self._key_matches.get(cache_key)
        if known is None:
            known = self._key_is_certificates(path, serial, name)
            if len(self._key_matches) >= KEY_CACHE_LIMIT:
                self._key_matches.clear()
            self._key_matches[cache_key] = known
        return known

    def _key_is_certificates(self, key_path: Path, serial: str, name: str) -> bool:
        try:
            key_data = read_optional(key_path)
            record = self.inventory.by_serial(serial)
            cert_data = record.pem.encode() if record is not None else read_optional(self.layout.cert(name))
            if key_data is None or cert_data is None:
                return False
            return public_key_matches(load_certificate(cert_data), load_private_key(key_data))
        except (OSError, CAError):  # unreadable, encrypted or junk: the API could not use it either
            return False

    def signature(self) -> tuple[Any, ...]:
        """Changes whenever the certificate table would: new, superseded or revoked records, or a new CRL."""
        with self.inventory.session() as session:
            counts = tuple(
                session.execute(
                    select(CertificateRecord.status, func.count(CertificateRecord.id), func.max(CertificateRecord.id))
                    .group_by(CertificateRecord.status)
                    .order_by(CertificateRecord.status)
                )
            )
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
        """The `certs` event: the table, the CRL, the counts, one lifecycle state per entity and the banner."""
        now = dt.datetime.now(dt.UTC)
        rows = self.rows(now)
        crl = self.crl(now)
        entities = entity_states(rows, self.server_renewable)
        return {
            "certs": rows,
            "crl": crl,
            "summary": self.summary(rows),
            "entities": entities,
            "attention": attention(entities, crl),
            "renew_before_days": self.settings.renew_before_days,
        }

"""Revocation and the broker's policy: revoke by name, serial or certificate, keep the CRL and the ACL in step with
the inventory (written before the transaction commits), refresh the CRL when due, and reload the broker.

`BrokerPolicy` writes the broker's files from the inventory (for the revoker and for the issuing path, pki/issuance.py);
`Revoker` is the revocation half of `pki.service.CAService`. Whoever writes holds the writer lock
(pki/store.py `WriterLock`): the threads of this process and the other processes write one at a time.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from .authorisation import TRANSPORT, Authoriser
from .authority import CertificateAuthority, fingerprint_sha256, serial_hex
from .broker import BrokerConfigError, BrokerFiles, crl_needs_refresh, crl_serials, reload_broker, write_broker_policy
from .config import Settings
from .identity import mac_as_written
from .inventory import CertificateRecord, Inventory
from .keyholder import KeyHolder
from .metrics import CAMetrics
from .replies import Reply
from .requests import (
    CONFLICT,
    NOT_FOUND,
    UNAVAILABLE,
    RequestError,
    RevokeRequest,
    is_protected,
    parse,
    refuse_protected,
)
from .store import FileSnapshot, WriterLock, read_optional

log = logging.getLogger("pki.service")

CRLEntry = tuple[int, dt.datetime, str | None]


class BrokerPolicy:
    """The broker's CRL and ACL as the inventory says they should be; the methods that write expect the caller to
    hold the writer lock."""

    def __init__(self, settings: Settings, inventory: Inventory, files: BrokerFiles) -> None:
        self.settings = settings
        self.inventory = inventory
        self.files = files
        # Read on every request: re-read only when replaced (a stat instead of open + read).
        self._acl = FileSnapshot(files.acl)

    def crl_pem(self) -> bytes:
        data = read_optional(self.files.crl)
        if data is None:
            raise RequestError(UNAVAILABLE, "no CRL yet: run ./setup.sh certs (the generator writes it)")
        return data

    def supersedes_now(self, name: str) -> bool:
        """With no grace, the certificate a new one for `name` supersedes goes on the CRL as soon as that is
        recorded (ask before recording it)."""
        return self.settings.superseded_grace == 0 and self.inventory.current(name) is not None

    def acl_outdated(self, name: str, cn: str) -> bool:
        """A revoked identity got a new certificate (lift the ACL deny), or a new collector needs its reply topic."""
        return self._acl_denies(name, cn) or self._acl_lacks_collector(name)

    def write(self, ca: CertificateAuthority, session: Any, entries: list[CRLEntry] | None = None) -> bool:
        """CRL and ACL as the inventory stands in `session` (the CRL lists `entries` when given); True when a file
        changed. Called before the session commits, a file that cannot be written undoes the change."""
        return write_broker_policy(
            self.settings,
            ca,
            self.crl_entries(session) if entries is None else entries,
            self.inventory.denied_names(session),
            collectors=self.inventory.collectors(session),
        )

    def sync(self, ca: CertificateAuthority) -> None:
        """Rewrite ACL and CRL from the inventory and reload the broker."""
        with self.inventory.session() as session:
            changed = self.write(ca, session)
        if changed:
            self.reload()

    def rewrite_if_due(self, ca: CertificateAuthority) -> bool:
        """Rewrite CRL and ACL when the CRL is due or lists other serials than the inventory; True when a file
        changed (the caller reloads the broker)."""
        with self.inventory.session() as session:
            entries = self.crl_entries(session)
            if not crl_needs_refresh(self.files.crl, ca, enforced=self.files.broker_crl) and crl_serials(
                self.files.crl
            ) == {entry[0] for entry in entries}:
                return False
            return self.write(ca, session, entries)

    def reload(self) -> None:
        reload_broker(self.files)

    def crl_entries(self, session: Any) -> list[CRLEntry]:
        """What the CRL lists: revoked certificates, and superseded ones once their grace is over."""
        return self.inventory.revoked_serials(session, self.settings.superseded_grace)

    def _acl_denies(self, *names: str) -> bool:
        acl = self._acl.read()
        return acl is not None and any(f"\nuser {n}\ntopic deny #".encode() in acl for n in names)

    def _acl_lacks_collector(self, name: str) -> bool:
        """A collector named by its MAC whose reply topic with colons the ACL does not grant yet (once each)."""
        written = mac_as_written(name)
        if written is None:
            return False
        acl = self._acl.read()
        return acl is not None and f"\nuser {name}\ntopic read ssl/{written}\n".encode() not in acl


@dataclass(eq=False)
class Revoker:
    """revoke, revoke a certificate (ACME), the CRL refresh."""

    inventory: Inventory
    keys: KeyHolder
    gate: Authoriser
    metrics: CAMetrics
    policy: BrokerPolicy
    writer: WriterLock
    # Called with the entity name after a revocation took effect in the broker's files (CRL reloaded): the
    # process that holds the CA's MQTT connection closes that identity's open sessions (ca/revocation.py).
    on_revoked: list[Callable[[str], None]] = field(default_factory=list, init=False)

    def revoke_certificate(self, cert: x509.Certificate, reason: str) -> Reply:
        record = self.inventory.by_serial(serial_hex(cert))
        if record is None or record.fingerprint_sha256 != fingerprint_sha256(cert):
            raise RequestError(NOT_FOUND, "this certificate was not issued by this CA", "certificate")
        if is_protected(record.name):
            raise RequestError(CONFLICT, f"{record.name!r} is a protected name used by the lab itself", "certificate")
        ca = self.keys.unlocked()
        if ca is None:
            raise RequestError(UNAVAILABLE, "the CA key is locked: set CA_PASSPHRASE so certificates can be revoked")
        with self.writer.held():
            return self._revoke_records(ca, record.name, [record], reason)

    def revoke(self, body: object, source: str) -> Reply:
        request = parse(RevokeRequest, body)
        if request.name is not None:
            refuse_protected(request.name)
        ca = self.gate.passphrase(request.passphrase, source, request.name or request.serial)
        with self.writer.held():
            if request.serial is not None:
                record = self.inventory.by_serial(request.serial)
                if record is None:
                    raise RequestError(NOT_FOUND, "no certificate with that serial", "serial")
                if is_protected(record.name):
                    raise RequestError(
                        CONFLICT, f"{record.name!r} is a protected name used by the lab itself", "serial"
                    )
                name, targets = record.name, [record]
            else:
                assert request.name is not None
                name = request.name
                if self.inventory.latest(name) is None:
                    raise RequestError(NOT_FOUND, f"no certificate was issued to {name}", "name")
                targets = self.inventory.revocable(name)
            return self._revoke_records(ca, name, targets, request.reason)

    def refresh_crl(self) -> bool:
        """Rewrite the CRL (and reload the broker) when it is due or superseded certificates reached the end of
        their grace; False when nothing changed or the CA is locked."""
        try:
            ca = self.keys.unlocked()
        except RequestError:
            return False
        if ca is None:
            log.warning("cannot refresh the CRL: the CA key is locked (set CA_PASSPHRASE for the dashboard)")
            return False
        with self.writer.held():
            changed = self.policy.rewrite_if_due(ca)
        if changed:
            self.policy.reload()
            log.info("CRL refreshed under %s", self.policy.files.crl)
        return changed

    def _revoke_records(
        self, ca: CertificateAuthority, name: str, targets: list[CertificateRecord], reason: str
    ) -> Reply:
        """Mark `targets` revoked and rewrite CRL and ACL in one transaction (caller holds the writer lock), then
        tell the listeners (`on_revoked`: the live connection is closed)."""
        try:
            with self.inventory.session() as session:
                revoked = self.inventory.revoke([t.serial for t in targets], reason, session)
                # The CRL and ACL are written before the transaction commits: if they cannot be written,
                # nothing is marked revoked and the caller learns it (revocation never silently lost).
                changed = self.policy.write(ca, session)
        except BrokerConfigError as ex:
            log.error("revocation of %s not done: %s", name, ex)
            raise RequestError(UNAVAILABLE, "the CRL could not be written; nothing was revoked") from None
        if changed:
            self.policy.reload()
        if revoked:
            self.metrics.revoked(len(revoked), reason, TRANSPORT.get())
            log.warning("revoked %s: %s (%s)", name, ", ".join(revoked), reason)
            for callback in self.on_revoked:
                try:
                    callback(name)
                except Exception:  # the revocation is done and recorded; a listener must not turn it into an error
                    log.exception("a listener failed after revoking %s", name)
        return Reply(
            200,
            {
                "name": name,
                "revoked": revoked,
                "reason": reason,
                "already_revoked": [t.serial for t in targets if t.serial not in revoked],
            },
        )

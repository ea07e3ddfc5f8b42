"""Revocation and the broker's policy: revoke by name, serial or certificate, keep the CRL and the ACL in step with
the inventory (written before the transaction commits), refresh the CRL when due, and reload the broker.

A mixin of `pki.service.CAService`.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from cryptography import x509

from .authorisation import TRANSPORT
from .authority import CertificateAuthority, fingerprint_sha256, serial_hex
from .broker import BrokerConfigError, crl_needs_refresh, crl_serials, reload_broker, write_broker_policy
from .identity import mac_as_written
from .inventory import CertificateRecord
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
from .service_parts import ServiceParts
from .store import read_optional

log = logging.getLogger("pki.service")


class RevocationOperations(ServiceParts):
    """revoke, revoke a certificate (ACME), the CRL and ACL from the inventory, the CRL refresh."""

    # From CAService: `_writer`, the writer lock of this process and the file lock of the others.

    def _revoke_certificate(self, cert: x509.Certificate, reason: str) -> Reply:
        record = self.inventory.by_serial(serial_hex(cert))
        if record is None or record.fingerprint_sha256 != fingerprint_sha256(cert):
            raise RequestError(NOT_FOUND, "this certificate was not issued by this CA", "certificate")
        if is_protected(record.name):
            raise RequestError(CONFLICT, f"{record.name!r} is a protected name used by the lab itself", "certificate")
        ca = self.keys.unlocked()
        if ca is None:
            raise RequestError(UNAVAILABLE, "the CA key is locked: set CA_PASSPHRASE so certificates can be revoked")
        with self._writer():
            return self._revoke_records(ca, record.name, [record], reason)

    def _revoke(self, body: object, source: str) -> Reply:
        request = parse(RevokeRequest, body)
        if request.name is not None:
            refuse_protected(request.name)
        ca = self.gate.passphrase(request.passphrase, source, request.name or request.serial)
        with self._writer():
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
                changed = write_broker_policy(
                    self.settings,
                    ca,
                    self._crl_entries(session),
                    self.inventory.denied_names(session),
                    collectors=self.inventory.collectors(session),
                )
        except BrokerConfigError as ex:
            log.error("revocation of %s not done: %s", name, ex)
            raise RequestError(UNAVAILABLE, "the CRL could not be written; nothing was revoked") from None
        if changed:
            reload_broker(self.broker_files)
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

    def crl_pem(self) -> bytes:
        data = read_optional(self.broker_files.crl)
        if data is None:
            raise RequestError(UNAVAILABLE, "no CRL yet: run ./setup.sh certs (the generator writes it)")
        return data

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
        with self._writer(), self.inventory.session() as session:
            entries = self._crl_entries(session)
            if not crl_needs_refresh(self.broker_files.crl, ca, enforced=self.broker_files.broker_crl) and crl_serials(
                self.broker_files.crl
            ) == {entry[0] for entry in entries}:
                return False
            changed = write_broker_policy(
                self.settings,
                ca,
                entries,
                self.inventory.denied_names(session),
                collectors=self.inventory.collectors(session),
            )
        if changed:
            reload_broker(self.broker_files)
            log.info("CRL refreshed under %s", self.broker_files.crl)
        return changed

    # -- the broker's files -------------------------------------------------------------------------

    def _acl_denies(self, *names: str) -> bool:
        acl = self._acl_file.read()
        return acl is not None and any(f"\nuser {n}\ntopic deny #".encode() in acl for n in names)

    def _acl_lacks_collector(self, name: str) -> bool:
        """A collector named by its MAC whose reply topic with colons the ACL does not grant yet (once each)."""
        written = mac_as_written(name)
        if written is None:
            return False
        acl = self._acl_file.read()
        return acl is not None and f"\nuser {name}\ntopic read ssl/{written}\n".encode() not in acl

    def _sync_broker(self, ca: CertificateAuthority) -> None:
        """Rewrite ACL and CRL from the inventory (caller holds the writer lock) and reload the broker."""
        with self.inventory.session() as session:
            changed = write_broker_policy(
                self.settings,
                ca,
                self._crl_entries(session),
                self.inventory.denied_names(session),
                collectors=self.inventory.collectors(session),
            )
        if changed:
            reload_broker(self.broker_files)

    def _crl_entries(self, session: Any) -> list[tuple[int, dt.datetime, str | None]]:
        """What the CRL lists: revoked certificates, and superseded ones once their grace is over."""
        return self.inventory.revoked_serials(session, self.settings.superseded_grace)

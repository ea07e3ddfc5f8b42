"""One value per issuance, and the one path every certificate takes: sign, record in the inventory, then release.

The issuer (pki/issuing.py) builds an `Issuance` for each operation (a CSR signed, a stored key re-signed, a key
created, a device's renewal, an ACME order) and hands it to `IssuingPath.issue`, which signs, records the certificate
in the inventory (committed before the certificate leaves the CA or is written anywhere), then writes files where
the operation keeps them. The checks before it (validation, lockout, passphrase or token) are done by the time it
runs, so a refused request never writes anything.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509

from .authorisation import TRANSPORT
from .authority import (
    CAError,
    CertificateAuthority,
    LeafNames,
    PrivateKey,
    PublicKey,
    SubjectFields,
    cert_pem,
    key_pem,
    serial_hex,
    utcnow,
)
from .entity_files import EntityFiles
from .inventory import Inventory, IssuedAs, TokenAlreadyUsed
from .metrics import CAMetrics
from .profiles import Profile
from .replies import Reply
from .requests import FORBIDDEN, UNAVAILABLE, RequestError
from .revoking import BrokerPolicy
from .store import WriterLock

log = logging.getLogger("pki.service")

# csr: a caller's CSR (the key stays with the caller); resign: the stored key of an entity the CA made, signed again
# (renewal without a CSR); create: a key the CA makes; renew: a device's renewal with a new CSR over MQTT or EST;
# acme: a server certificate for an ACME order.
Kind = Literal["csr", "resign", "create", "renew", "acme"]
# The operations whose key the CA holds: the entity's folder gets the certificate (and the key it made).
WRITES_FILES: frozenset[str] = frozenset({"resign", "create"})


@dataclass(frozen=True)
class Issuance:
    kind: Kind
    name: str  # the entity (its inventory name and folder)
    profile: Profile
    public_key: PublicKey
    cn: str
    days: int
    via: str  # http, mqtt, renew, est, acme, ...
    requester: str
    subject: SubjectFields | None = None
    dns: tuple[str, ...] = ()
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    emails: tuple[str, ...] = ()
    key: PrivateKey | None = None  # create: the key the CA made; resign: the stored key (both in the reply)
    token: str | None = None  # an enrolment token consumed with the record (SHA-256)
    digest: str | None = None  # create: the normalised request's digest, for an identical retry

    @property
    def writes_files(self) -> bool:
        return self.kind in WRITES_FILES

    @property
    def from_csr(self) -> bool:
        return not self.writes_files


def issued_body(name: str, ca: CertificateAuthority, cert: x509.Certificate, key: PrivateKey | None) -> dict[str, Any]:
    """The reply to every issuance, over every transport (`pki.replies.Issued`)."""
    body: dict[str, Any] = {"name": name, "ca": ca.cert_pem.decode(), "crt": cert_pem(cert).decode()}
    if key is not None:
        body["key"] = key_pem(key).decode()
    body["serial"] = serial_hex(cert)
    body["not_after"] = cert.not_valid_after_utc.isoformat()
    return body


@dataclass(eq=False)
class IssuingPath:
    """Sign, record, then release (files, broker policy, reply); and the replay of an identical `create`."""

    inventory: Inventory
    files: EntityFiles
    policy: BrokerPolicy
    writer: WriterLock
    metrics: CAMetrics

    def replay(self, ca: CertificateAuthority, name: str, digest: str) -> Reply | None:
        """The certificate an identical earlier `create` produced, while it is valid and its files intact."""
        record = self.inventory.current(name)
        if record is None or record.not_after <= utcnow() or self.inventory.create_digest(record.serial) != digest:
            return None
        pair = self.files.pair(name)
        if pair is None:
            return None
        cert, key = pair
        if serial_hex(cert) != record.serial or not ca.issued(cert):
            return None
        return Reply(200, issued_body(name, ca, cert, key))

    def issue(self, ca: CertificateAuthority, job: Issuance) -> Reply:
        """Sign, record, then release: the one issuing path. The inventory row is committed before the certificate
        is written anywhere or leaves the CA, so whatever happens next (a kill -9 while the files are written) the
        inventory lists it and it can be revoked. A CSR's certificate is recorded by group commit and nothing else
        (the key stays with its owner); one whose key the CA holds also goes to the entity's folder."""
        name = job.name
        assert job.token is None or not job.writes_files, "an enrolment token comes with a CSR only"
        # With no grace, the certificate this one supersedes goes on the CRL as soon as this one is recorded.
        supersedes_now = self.policy.supersedes_now(name)
        try:
            names = LeafNames(job.cn, job.dns, job.ips, job.emails, job.subject)
            cert = ca.issue(job.public_key, job.profile, names, days=job.days)
        except CAError as ex:
            raise RequestError(400, str(ex), "csr" if job.from_csr else "name") from None
        serial = serial_hex(cert)

        # The CRL lists the superseded certificate, a revoked identity got a new certificate (lift the ACL deny),
        # or a new collector gets its reply topic: the broker's files change.
        def broker_changes() -> bool:
            return supersedes_now or self.policy.acl_outdated(name, job.cn)

        if not job.writes_files:
            try:
                issued = IssuedAs(name, job.profile.role, job.via, job.requester)
                self.inventory.record_issued_grouped(cert, issued, token_sha256=job.token)
            except TokenAlreadyUsed:
                raise RequestError(FORBIDDEN, "this enrolment token has already been used", "token") from None
            if broker_changes():
                with self.writer.held():
                    self.policy.sync(ca)
        else:
            with self.writer.held():
                if job.digest is not None and (replay := self.replay(ca, name, job.digest)) is not None:
                    return replay  # an identical create finished while this one was signing
                with self.inventory.session() as session:
                    self.inventory.record_issued(
                        cert, name=name, role=job.profile.role, via=job.via, requester=job.requester, session=session
                    )
                    if job.digest is not None:
                        self.inventory.record_create_digest(serial, name, job.digest, session)
                try:
                    self.files.write(name, cert, ca.cert_pem, job.key if job.kind == "create" else None)
                except OSError as ex:
                    log.error(
                        "certificate %s of %s is recorded but its files could not be written: %s", serial, name, ex
                    )
                    raise RequestError(
                        UNAVAILABLE,
                        f"the certificate files of {name} could not be written; "
                        f"certificate {serial} is recorded (revoke it by serial)",
                    ) from None
                if broker_changes():
                    self.policy.sync(ca)
        self.metrics.issued(job.kind, TRANSPORT.get())
        log.info("issued %s (%s) serial %s, %s days, via %s", name, job.profile.role, serial, job.days, job.via)
        return Reply(201, issued_body(name, ca, cert, job.key))

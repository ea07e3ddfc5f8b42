"""The CA service behind v1/ssl: validate -> authorise -> sign -> store -> reply.

HTTP (`ca/http.py`, behind the dashboard's forwarding) and MQTT (`ca/mqtt.py`) are thin adapters: they decode
a body, call one method here with the caller's source (client IP; `mqtt`, or `cn:<CN>` when the broker proved it),
and send back the `Reply` (status, JSON body, headers) unchanged, so both transports give the same answer to
the same request.

Order of checks, so that a refused request never writes anything: the body is validated (400), protected
names refused (409), the requester's lockout checked (429, pki/lockout.py), the passphrase or enrolment token
checked (403), then the entity looked up (404), and only then is a certificate signed and stored.

The root key is decrypted once (with CA_PASSPHRASE from the settings when it is set, otherwise with the first
correct `pass`) and kept in memory; later passphrases are compared in constant time against an HMAC of the
one that unlocked it. If the root certificate on disk changes (the generator made a new root), the cached
key is dropped and unlocked again.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from .authority import (
    CAError,
    CertificateAuthority,
    LeafNames,
    PrivateKey,
    PublicKey,
    SubjectFields,
    WrongPassphrase,
    cert_pem,
    common_name,
    days_left,
    fingerprint_sha256,
    generate_private_key,
    key_pem,
    load_certificate,
    load_private_key,
    public_key_matches,
    serial_hex,
    utcnow,
)
from .broker import (
    BrokerConfigError,
    BrokerFiles,
    crl_needs_refresh,
    crl_serials,
    reload_broker,
    write_broker_policy,
)
from .config import Settings
from .identity import is_reserved_san, mac_as_written
from .inventory import ACTIVE, REVOKED, SUPERSEDED, CertificateRecord, Inventory, IssuedAs, TokenAlreadyUsed
from .issuance import Issuance
from .lockout import Lockout
from .metrics import CAMetrics
from .profiles import BACKDATE, DEVICE, ENTITY, PROFILES, SERVER, Profile
from .requests import (
    BAD_REQUEST,
    CONFLICT,
    FORBIDDEN,
    NOT_FOUND,
    UNAVAILABLE,
    CertificatesQuery,
    CreateRequest,
    RenewRequest,
    RequestError,
    RevokeRequest,
    SignRequest,
    TokenRequest,
    create_identity,
    is_protected,
    normalise_name,
    parse,
    parse_csr,
    readable_name,
    refuse_protected,
    refuse_reserved_sans,
)
from .status import EXPIRED, EXPIRING, VALID, expiry_state
from .store import (
    CERT_MODE,
    KEY_MODE,
    CertsLayout,
    FileSnapshot,
    atomic_write,
    ensure_dir,
    exclusive_lock,
    read_optional,
    remove_temp_files,
)

log = logging.getLogger(__name__)
# The operator (logged in to the dashboard) on whose behalf the current call runs; None for `pass` requests.
_OPERATOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("ca_operator", default=None)
# The transport the current call came by (pki/metrics.py TRANSPORTS), for the counters of `_issue` and the lockout.
_TRANSPORT: contextvars.ContextVar[str] = contextvars.ContextVar("ca_transport", default="http")

# Statuses `GET /v1/ssl/certs?status=` accepts: the inventory's own, and the computed validity state.
STORED_STATUSES = (ACTIVE, SUPERSEDED, REVOKED)
STATES = (VALID, EXPIRING, EXPIRED, REVOKED, SUPERSEDED)


@dataclass(frozen=True)
class Reply:
    """What both transports send back: an HTTP status, the JSON body, extra headers (Retry-After)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status < 400


def _first_attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    attrs = name.get_attributes_for_oid(oid)
    return str(attrs[0].value) if attrs else None


def _subject_of(cert: x509.Certificate) -> SubjectFields:
    subject = cert.subject
    return SubjectFields(
        country=_first_attribute(subject, NameOID.COUNTRY_NAME),
        state=_first_attribute(subject, NameOID.STATE_OR_PROVINCE_NAME),
        locality=_first_attribute(subject, NameOID.LOCALITY_NAME),
        org=_first_attribute(subject, NameOID.ORGANIZATION_NAME),
        unit=_first_attribute(subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
        email=_first_attribute(subject, NameOID.EMAIL_ADDRESS),
    )


def _sans_of(cert: x509.Certificate) -> tuple[list[str], list[str], list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], [], []
    return (
        san.get_values_for_type(x509.DNSName),
        [str(ip) for ip in san.get_values_for_type(x509.IPAddress)],
        san.get_values_for_type(x509.RFC822Name),
    )


def _same_key(public_key: PublicKey, cert: x509.Certificate) -> bool:
    fmt, enc = serialization.PublicFormat.SubjectPublicKeyInfo, serialization.Encoding.DER
    return public_key.public_bytes(enc, fmt) == cert.public_key().public_bytes(enc, fmt)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def server_entity_name(dns_name: str) -> str:
    """The inventory name of an ACME server certificate: `acme-<host>` with dots as '_' (an entity name)."""
    return ("acme-" + dns_name.lower().replace(".", "_"))[:64].rstrip("_-")


class CAService:
    """One per process: holds the unlocked root, the inventory and the lockout counters."""

    def __init__(
        self, settings: Settings, *, inventory: Inventory | None = None, lockout: Lockout | None = None,
        metrics: CAMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or CAMetrics()  # the app's registry, or none (pki/metrics.py)
        self.layout = CertsLayout(settings.certs_dir)
        self.broker_files = BrokerFiles(settings.certs_dir, settings.data_dir)
        self.inventory = inventory or Inventory(settings.effective_database_url)
        self.lockout = lockout or Lockout(self.inventory)
        self._state_lock = threading.Lock()  # the cached root and key
        self._write_lock = threading.Lock()  # writers in this process; the file lock covers other processes
        self._mac_key = secrets.token_bytes(32)
        self._operator_placeholder = secrets.token_urlsafe(32)
        # Read on every request: re-read only when replaced (a stat instead of open + read).
        self._root_file = FileSnapshot(self.layout.ca_cert)
        self._acl_file = FileSnapshot(self.broker_files.acl)
        self._root_pem: bytes | None = None
        self._root: x509.Certificate | None = None
        self._ca: CertificateAuthority | None = None
        self._pass_mac: bytes | None = None
        self._settings_pass_tried = False
        if settings.certs_dir.is_dir():
            with exclusive_lock(self.layout.lock):  # no writer is half-way through a file while this runs
                for leftover in remove_temp_files(settings.certs_dir):
                    log.warning("removed %s, left by a writer that was killed while writing it", leftover)
        # Called with the operation after every issuance, renewal or revocation (the dashboard re-reads its table).
        self.on_change: list[Callable[[str], None]] = []
        # Called with the entity name after a revocation took effect in the broker's files (CRL reloaded): the
        # process that holds the CA's MQTT connection closes that identity's open sessions (ca/revocation.py).
        self.on_revoked: list[Callable[[str], None]] = []

    def close(self) -> None:
        self.inventory.close()

    # -- public operations (each returns a Reply, never raises) ----------------------------------------

    # `operator`: the dashboard proved a logged-in operator (session or API token) sent the request: no `pass`
    # is needed and the lockout does not apply. Only an authenticating front end may set it.
    # `transport`: how the request came, for the metrics (default: `via`; the HTTP adapter says `cli` for iotca).

    def sign(self, body: object, *, source: str, via: str = "http", requester: str | None = None,
             operator: str | None = None, transport: str | None = None) -> Reply:
        return self._run("sign", transport or via, body, source,
                         lambda: self._sign(self._as_operator(body, operator), source, via, requester or source))

    def create(self, body: object, *, source: str, via: str = "http", requester: str | None = None,
               operator: str | None = None, transport: str | None = None) -> Reply:
        return self._run("create", transport or via, body, source,
                         lambda: self._create(self._as_operator(body, operator), source, via, requester or source))

    def renew(self, cn: str, body: object, *, via: str = "mqtt", requester: str | None = None) -> Reply:
        """Renewal with the current certificate as the credential, no passphrase (`ssl/renew/<cn>`).

        Only call this where the transport proved that the caller holds `cn`'s certificate: over MQTT the
        broker's ACL lets only that CN publish to `ssl/renew/<cn>`.
        """
        requester = requester or f"{via}:{cn}"
        return self._run("renew", via, {"name": cn}, requester, lambda: self._renew(cn, body, requester))

    def revoke(self, body: object, *, source: str, operator: str | None = None, transport: str = "http") -> Reply:
        return self._run("revoke", transport, body, source,
                         lambda: self._revoke(self._as_operator(body, operator), source))

    def issue_token(self, body: object, *, source: str, operator: str | None = None, transport: str = "http") -> Reply:
        return self._run("token", transport, body, source,
                         lambda: self._issue_token(self._as_operator(body, operator), source))

    # -- the standard protocols (ca/est.py, ca/acme.py): the same checks, other credentials ------------

    def enrol_basic(self, name: str, csr_pem: str, secret: str, *, source: str, via: str = "est") -> Reply:
        """First enrolment with HTTP Basic `name:secret` (EST simpleenroll): `secret` is a single-use enrolment
        token for `name` or the CA passphrase; then exactly `sign` with a CSR (lockout, profile, inventory)."""
        kind = "token" if self.inventory.token(token_digest(secret)) is not None else "pass"
        days = self.settings.cert_days
        with contextlib.suppress(RequestError):  # no root: `sign` gives the 503
            days = min(days, self._max_days(self._root_certificate()))
        return self.sign({"name": name, "days": days, kind: secret, "csr": csr_pem}, source=source, via=via,
                         requester=source)

    def renew_presented(self, presented: x509.Certificate, csr_pem: str, *, via: str = "est") -> Reply:
        """Renewal where the transport verified the caller's TLS client certificate (EST simplereenroll).

        The chain was checked by TLS; here the certificate must also be the entity's CURRENT one in the
        inventory: a superseded, revoked or unknown certificate cannot renew. Then exactly `renew`.
        """
        cn = common_name(presented) or "-"
        requester = f"{via}:{cn}"

        def work() -> Reply:
            record = self.inventory.by_serial(serial_hex(presented))
            if record is None or record.fingerprint_sha256 != fingerprint_sha256(presented):
                raise RequestError(FORBIDDEN, "this certificate is not in the CA's inventory")
            if record.status != ACTIVE:
                raise RequestError(FORBIDDEN, f"this certificate is {record.status}: only the current certificate "
                                              f"of {record.name} can renew it")
            return self._renew(record.name, {"csr": csr_pem}, requester)

        return self._run("renew", via, {"name": cn}, requester, work)

    def issue_server(self, csr_pem: str, names: list[str], *, days: int, requester: str) -> Reply:
        """A `server` certificate for DNS `names` whose control was proven (ACME finalize; the adapter checked
        them against the operator's allow-list). The CSR must name exactly these hosts, nothing else."""
        entity = server_entity_name(names[0]) if names else "-"
        return self._run("acme", "acme", {"name": entity}, requester,
                         lambda: self._issue_server(csr_pem, names, entity, days, requester))

    def revoke_certificate(self, cert: x509.Certificate, reason: str, *, source: str) -> Reply:
        """Revoke one certificate whose holder the transport authenticated (ACME revokeCert: the account that
        ordered it, or the certificate's own key), without the passphrase."""
        return self._run("revoke", "acme", {}, source, lambda: self._revoke_certificate(cert, reason))

    def _issue_server(self, csr_pem: str, names: list[str], entity: str, days: int, requester: str) -> Reply:
        root = self._root_certificate()
        try:
            csr = parse_csr(csr_pem, require_cn=False)
        except ValueError as ex:
            raise RequestError(BAD_REQUEST, f"csr {ex}", "csr") from None
        asked = {n.lower() for n in csr.dns_names} | ({csr.common_name.lower()} if csr.common_name else set())
        if not names or csr.ip_addresses or csr.emails or asked != {n.lower() for n in names}:
            raise RequestError(BAD_REQUEST, "the CSR must name exactly the order's DNS identifiers", "csr")
        ca = self._unlocked_ca()
        if ca is None:
            raise RequestError(UNAVAILABLE, "the CA key is locked: set CA_PASSPHRASE so ACME can issue")
        return self._issue(ca, Issuance(
            "acme", entity, SERVER, csr.public_key, cn=names[0], dns=tuple(names), days=min(days, self._max_days(root)),
            via="acme", requester=requester,
        ))

    def _revoke_certificate(self, cert: x509.Certificate, reason: str) -> Reply:
        record = self.inventory.by_serial(serial_hex(cert))
        if record is None or record.fingerprint_sha256 != fingerprint_sha256(cert):
            raise RequestError(NOT_FOUND, "this certificate was not issued by this CA", "certificate")
        if is_protected(record.name):
            raise RequestError(CONFLICT, f"{record.name!r} is a protected name used by the lab itself", "certificate")
        ca = self._unlocked_ca()
        if ca is None:
            raise RequestError(UNAVAILABLE, "the CA key is locked: set CA_PASSPHRASE so certificates can be revoked")
        with self._writer():
            return self._revoke_records(ca, record.name, [record], reason)

    def certificates(self, name: str | None = None, status: str | None = None) -> Reply:
        try:
            return Reply(200, {"certificates": self._certificates(name, status)})
        except RequestError as ex:
            return Reply(ex.status, ex.body(), ex.headers())

    def max_days(self) -> int | None:
        """The longest validity a request may ask for now (the root's remaining life); None without a usable root."""
        try:
            return self._max_days(self._root_certificate())
        except RequestError:
            return None

    def ca_pem(self) -> bytes:
        """The root certificate (public); RequestError 503 when the lab has none yet."""
        self._root_certificate()
        assert self._root_pem is not None
        return self._root_pem

    def crl_pem(self) -> bytes:
        data = read_optional(self.broker_files.crl)
        if data is None:
            raise RequestError(UNAVAILABLE, "no CRL yet: run ./setup.sh certs (the generator writes it)")
        return data

    def refresh_crl(self) -> bool:
        """Rewrite the CRL (and reload the broker) when it is due or superseded certificates reached the end of
        their grace; False when nothing changed or the CA is locked."""
        try:
            ca = self._unlocked_ca()
        except RequestError:
            return False
        if ca is None:
            log.warning("cannot refresh the CRL: the CA key is locked (set CA_PASSPHRASE for the dashboard)")
            return False
        with self._writer(), self.inventory.session() as session:
            entries = self._crl_entries(session)
            if not crl_needs_refresh(self.broker_files.crl, ca, enforced=self.broker_files.broker_crl) and \
                    crl_serials(self.broker_files.crl) == {
                entry[0] for entry in entries
            }:
                return False
            changed = write_broker_policy(self.settings, ca, entries, self.inventory.denied_names(session),
                                          collectors=self.inventory.collectors(session))
        if changed:
            reload_broker(self.broker_files)
            log.info("CRL refreshed under %s", self.broker_files.crl)
        return changed

    # -- plumbing ----------------------------------------------------------------------------------

    def _run(self, operation: str, transport: str, body: object, source: str, work: Callable[[], Reply]) -> Reply:
        """Every operation's one way in and out: the answer as a Reply, timed and counted (refusals by reason)."""
        started = time.perf_counter()
        context = _TRANSPORT.set(transport)
        try:
            reply = work()
        except RequestError as ex:
            reply = Reply(ex.status, ex.body(), ex.headers())
        except Exception:  # a bug, not the caller's fault: log it, answer without details
            log.exception("%s request from %s failed unexpectedly", operation, source)
            reply = Reply(500, {"error": "internal error; the server log has the details"})
        finally:
            _TRANSPORT.reset(context)
        self.metrics.answered(operation, transport, reply.status, reply.body.get("field"),
                              time.perf_counter() - started)
        # Only validated names reach the log; never a body, a passphrase or a token.
        log.info("ssl/%s %s from %s -> %s", operation, readable_name(body) or "-", source, reply.status)
        if reply.ok and operation != "token":  # a token changes no certificate
            for callback in self.on_change:
                try:
                    callback(operation)
                except Exception:  # a listener must never turn a done issuance into an error
                    log.exception("a listener failed after ssl/%s", operation)
        return reply

    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        with self._write_lock, exclusive_lock(self.layout.lock):
            yield

    def _mac(self, passphrase: str) -> bytes:
        return hmac.new(self._mac_key, passphrase.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def _root_certificate(self) -> x509.Certificate:
        data = self._root_file.read()
        if data is None:
            raise RequestError(UNAVAILABLE, "the CA has no root certificate yet: run ./setup.sh certs")
        with self._state_lock:
            if data != self._root_pem:
                try:
                    root = load_certificate(data)
                except CAError:
                    raise RequestError(UNAVAILABLE, "unreadable root certificate: run ./setup.sh certs") from None
                if self._root_pem is not None:
                    log.info("the root certificate changed on disk; the CA key will be unlocked again")
                self._root_pem, self._root = data, root
                self._ca, self._pass_mac, self._settings_pass_tried = None, None, False
            assert self._root is not None
            return self._root

    def _max_days(self, root: x509.Certificate) -> int:
        remaining = int(days_left(root))
        if remaining < 1:
            raise RequestError(UNAVAILABLE, "the root CA expires within a day: create a new root with the generator")
        return remaining

    def _unlock(self, passphrase: str) -> CertificateAuthority | None:
        """Decrypt the root key (caller holds _state_lock); None for a wrong passphrase."""
        key_data = read_optional(self.layout.ca_key)
        if key_data is None or self._root is None:
            raise RequestError(UNAVAILABLE, "the CA key is missing: run ./setup.sh certs")
        try:
            ca = CertificateAuthority(self._root, load_private_key(key_data, passphrase))
        except WrongPassphrase:
            return None
        except CAError:
            raise RequestError(UNAVAILABLE, "the CA key does not belong to the root certificate") from None
        self._ca, self._pass_mac = ca, self._mac(passphrase)
        return ca

    def _unlock_with_settings(self) -> None:
        if self._ca is None and self.settings.ca_passphrase and not self._settings_pass_tried:
            self._settings_pass_tried = True
            if self._unlock(self.settings.ca_passphrase) is None:
                log.warning("CA_PASSPHRASE does not decrypt the CA key; the first correct request pass will")

    def _unlocked_ca(self) -> CertificateAuthority | None:
        self._root_certificate()
        with self._state_lock:
            self._unlock_with_settings()
            return self._ca

    def _as_operator(self, body: object, operator: str | None) -> object:
        """Mark this request (this thread, for the duration of the call) as a proven operator's; `pass` and
        `token` in its body are replaced by a placeholder that only this process knows, so validation passes."""
        _OPERATOR.set(operator)
        if operator is None or not isinstance(body, dict):
            return body
        return {**{k: v for k, v in body.items() if k != "token"}, "pass": self._operator_placeholder}

    def _authorise(self, passphrase: str | None, source: str, name: str | None = None) -> CertificateAuthority:
        """Check `pass` in constant time; count failures per requester (pki/lockout.py); 429 while locked out."""
        operator = _OPERATOR.get()
        if operator is not None and passphrase == self._operator_placeholder:
            ca = self._unlocked_ca()
            if ca is None:
                raise RequestError(UNAVAILABLE, "the CA key is locked: set CA_PASSPHRASE for the dashboard so "
                                                "operators can act without typing it")
            return ca
        recent_failures = self.lockout.check(source, name)
        self._root_certificate()
        with self._state_lock:
            self._unlock_with_settings()
            if self._ca is not None and self._pass_mac is not None:
                ca: CertificateAuthority | None = self._ca
                ok = hmac.compare_digest(self._mac(passphrase or ""), self._pass_mac)
            else:
                ca = self._unlock(passphrase or "")
                ok = ca is not None
        if not ok or ca is None:
            if self.lockout.failed(source, name):
                self.metrics.locked_out(_TRANSPORT.get())
            log.warning("wrong CA passphrase from %s", source)
            raise RequestError(FORBIDDEN, "wrong passphrase", "pass")
        if recent_failures:
            self.lockout.succeeded(source, name)
        return ca

    def _authorise_token(self, token: str, name: str, source: str) -> tuple[CertificateAuthority, str]:
        self.lockout.check(source, name)
        digest = token_digest(token)
        row = self.inventory.token(digest)
        problem = None
        if row is None:
            problem = "unknown enrolment token"
        elif row.name != name:
            problem = "this enrolment token was issued for another name"
        elif row.used_at is not None:
            problem = "this enrolment token has already been used"
        elif row.expires_at <= utcnow():
            problem = "this enrolment token has expired"
        if problem:
            if self.lockout.failed(source, name):
                self.metrics.locked_out(_TRANSPORT.get())
            log.warning("refused an enrolment token for %s from %s: %s", name, source, problem)
            raise RequestError(FORBIDDEN, problem, "token")
        ca = self._unlocked_ca()
        if ca is None:
            raise RequestError(UNAVAILABLE, "the CA key is locked: set CA_PASSPHRASE so enrolment tokens can be used")
        return ca, digest

    def _profile_for(self, name: str) -> Profile:
        """Lab devices keep the device profile; everything else the API issues is an `entity`."""
        if name in self.settings.devices or DEVICE.role in self.inventory.roles(name):
            return DEVICE
        return ENTITY

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
                self.settings, ca, self._crl_entries(session), self.inventory.denied_names(session),
                collectors=self.inventory.collectors(session),
            )
        if changed:
            reload_broker(self.broker_files)

    def _crl_entries(self, session: Any) -> list[tuple[int, dt.datetime, str | None]]:
        """What the CRL lists: revoked certificates, and superseded ones once their grace is over."""
        return self.inventory.revoked_serials(session, self.settings.superseded_grace)

    # -- issuing -----------------------------------------------------------------------------------

    def _sign(self, body: object, source: str, via: str, requester: str) -> Reply:
        root = self._root_certificate()
        request = parse(SignRequest, body, max_days=self._max_days(root))
        refuse_protected(request.name)
        csr = request.csr
        if csr is not None:  # a CSR's SANs are checked, not copied blindly
            refuse_reserved_sans([*csr.dns_names, *csr.ip_addresses], self.settings)
        token = None
        if request.token is not None:
            ca, token = self._authorise_token(request.token, request.name, source)
        else:
            ca = self._authorise(request.passphrase, source, request.name)
        # A token enrols a device (client certificate only), whatever the name was before.
        profile = DEVICE if token is not None else self._profile_for(request.name)
        if csr is not None:
            # The key stays with the caller: no file of the entity changes (a lab device keeps a matching key and
            # certificate pair; its old certificate is superseded, and goes on the CRL after the grace).
            return self._issue(ca, Issuance(
                "csr", request.name, profile, csr.public_key, cn=request.name, dns=tuple(csr.dns_names),
                ips=tuple(csr.ip_addresses), emails=tuple(csr.emails), days=request.days, via=via,
                requester=requester, token=token,
            ))
        # No CSR: renewal, i.e. the stored key of an entity the generator or `create` made, re-signed.
        key = self._stored_key(request.name)
        self._refuse_superseded_key(request.name, key)
        current = self._current_certificate(request.name, key)
        subject, dns, ips, emails = None, [], [], []
        if current is not None:
            subject = _subject_of(current)
            dns, ips, emails = self._allowed_sans(current)
        return self._issue(ca, Issuance(
            "resign", request.name, profile, key.public_key(), cn=request.name, subject=subject, dns=tuple(dns),
            ips=tuple(ips), emails=tuple(emails), days=request.days, via=via, requester=requester, key=key,
        ))

    def _renew(self, cn: str, body: object, requester: str) -> Reply:
        """Checks in order (a refusal writes nothing): the name (400/409), the body and its CSR (400), the current
        certificate (404 none, 403 revoked or expired), a new key (400); then sign with the current profile,
        subject, SANs and lifetime. No files are written: the device owns its key and certificate files."""
        root = self._root_certificate()
        try:
            name = normalise_name(cn)
        except ValueError as ex:
            raise RequestError(BAD_REQUEST, f"name {ex}", "name") from None
        refuse_protected(name)
        request = parse(RenewRequest, body, max_days=self._max_days(root))
        csr = request.csr
        if csr.common_name != name:
            raise RequestError(BAD_REQUEST, f"the CSR's CN must be {name!r}, the CN of the certificate that asks "
                                            "for renewal", "csr")
        record = self.inventory.current(name)
        if record is None:
            latest = self.inventory.latest(name)
            if latest is None:
                raise RequestError(NOT_FOUND, f"no certificate was issued to {name}: enrol it first", "name")
            if latest.status == REVOKED:
                raise RequestError(FORBIDDEN, f"the certificate of {name} is revoked: it cannot be renewed")
            raise RequestError(FORBIDDEN, f"{name} has no current certificate: enrol it again")
        now = utcnow()
        if record.not_after <= now:
            raise RequestError(FORBIDDEN, f"the certificate of {name} expired on {record.not_after.isoformat()}: "
                                          "an expired certificate cannot renew; enrol again with a token")
        current = load_certificate(record.pem.encode())
        if any(_same_key(csr.public_key, load_certificate(r.pem.encode())) for r in self.inventory.list(name=name)):
            raise RequestError(BAD_REQUEST, "the CSR must be for a new key: renewal replaces the key", "csr")
        ca = self._unlocked_ca()
        if ca is None:
            raise RequestError(UNAVAILABLE, "the CA key is locked: set CA_PASSPHRASE so certificates can be renewed")
        # The same lifetime as the current certificate (its notBefore is back-dated by BACKDATE), at most.
        lifetime = current.not_valid_after_utc - current.not_valid_before_utc - BACKDATE
        days = max(1, round(lifetime.total_seconds() / 86400))
        if request.days is not None:
            days = min(days, request.days)
        dns, ips, emails = self._allowed_sans(current)
        reply = self._issue(ca, Issuance(
            "renew", name, PROFILES.get(record.role, ENTITY), csr.public_key, cn=name, subject=_subject_of(current),
            dns=tuple(dns), ips=tuple(ips), emails=tuple(emails), days=min(days, self._max_days(root)), via="renew",
            requester=requester,
        ))
        log.info("renewed %s: serial %s -> %s", name, record.serial, reply.body["serial"])
        return reply

    def _refuse_superseded_key(self, name: str, key: PrivateKey) -> None:
        """Renewal takes only the entity's current certificate: a stored key whose certificate was superseded (the
        entity moved to another key) or revoked is never re-signed (403, nothing changes)."""
        record = self.inventory.current(name)
        if record is not None:
            if not public_key_matches(load_certificate(record.pem.encode()), key):
                raise RequestError(FORBIDDEN, f"the stored key of {name} belongs to a superseded certificate: its "
                                              "current certificate has another key; send a csr")
            return
        latest = self.inventory.latest(name)
        if latest is not None and latest.status == REVOKED:
            raise RequestError(FORBIDDEN, f"the certificate of {name} is revoked: its key is never re-signed; "
                                          "send a csr for a new key")

    def _allowed_sans(self, cert: x509.Certificate) -> tuple[list[str], list[str], list[str]]:
        """The SANs a renewal carries over: the current certificate's, without any reserved name (`pki.identity`),
        so a certificate issued before the rule existed does not pass a lab server's name on."""
        dns, ips, emails = _sans_of(cert)
        return ([d for d in dns if not is_reserved_san(d, self.settings)],
                [i for i in ips if not is_reserved_san(i, self.settings)], emails)

    def _stored_key(self, name: str) -> PrivateKey:
        data = read_optional(self.layout.key(name))
        if data is None:
            raise RequestError(
                NOT_FOUND, f"no stored key for {name}: send a csr, or create the entity first", "name"
            )
        try:
            return load_private_key(data)
        except CAError:  # includes WrongPassphrase: an encrypted key the CA cannot use
            raise RequestError(NOT_FOUND, f"the stored key of {name} cannot be used: send a csr", "name") from None

    def _current_certificate(self, name: str, key: PrivateKey) -> x509.Certificate | None:
        """The entity's latest certificate for this key (its subject and SANs carry over into the renewal)."""
        candidates = [read_optional(self.layout.cert(name))]
        record = self.inventory.current(name)
        if record is not None:
            candidates.append(record.pem.encode())
        for data in candidates:
            if data is None:
                continue
            try:
                cert = load_certificate(data)
            except CAError:
                continue
            if public_key_matches(cert, key):
                return cert
        return None

    def _create(self, body: object, source: str, via: str, requester: str) -> Reply:
        root = self._root_certificate()
        request = parse(CreateRequest, body, max_days=self._max_days(root))
        refuse_protected(request.name)
        cn, extra_dns = create_identity(request, self.settings)
        ca = self._authorise(request.passphrase, source, request.name)
        fields = {**request.replay_fields(), "key_type": self.settings.key_type}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        replay = self._replay(ca, request.name, digest)
        if replay is not None:
            return replay
        key = generate_private_key(self.settings.key_type)
        subject = SubjectFields(
            country=request.country, state=request.state, locality=request.locality, org=request.org,
            unit=request.unit, email=request.email,
        )
        return self._issue(ca, Issuance(
            "create", request.name, self._profile_for(request.name), key.public_key(), cn=cn, subject=subject,
            dns=tuple(extra_dns), emails=(request.email,) if request.email else (), days=request.days, via=via,
            requester=requester, key=key, digest=digest,
        ))

    def _replay(self, ca: CertificateAuthority, name: str, digest: str) -> Reply | None:
        """The certificate an identical earlier `create` produced, while it is valid and its files intact."""
        record = self.inventory.current(name)
        if record is None or record.not_after <= utcnow() or self.inventory.create_digest(record.serial) != digest:
            return None
        cert_data, key_data = read_optional(self.layout.cert(name)), read_optional(self.layout.key(name))
        if cert_data is None or key_data is None:
            return None
        try:
            cert, key = load_certificate(cert_data), load_private_key(key_data)
        except CAError:
            return None
        if serial_hex(cert) != record.serial or not public_key_matches(cert, key) or not ca.issued(cert):
            return None
        return Reply(200, self._body(name, ca, cert, key))

    def _issue(self, ca: CertificateAuthority, job: Issuance) -> Reply:
        """Sign, record, then release: the one issuing path. The inventory row is committed before the certificate
        is written anywhere or leaves the CA, so whatever happens next (a kill -9 while the files are written) the
        inventory lists it and it can be revoked. A CSR's certificate is recorded by group commit and nothing else
        (the key stays with its owner); one whose key the CA holds also goes to the entity's folder."""
        name = job.name
        assert job.token is None or not job.writes_files, "an enrolment token comes with a CSR only"
        # With no grace, the certificate this one supersedes goes on the CRL as soon as this one is recorded.
        supersedes_now = self.settings.superseded_grace == 0 and self.inventory.current(name) is not None
        try:
            names = LeafNames(job.cn, job.dns, job.ips, job.emails, job.subject)
            cert = ca.issue(job.public_key, job.profile, names, days=job.days)
        except CAError as ex:
            raise RequestError(400, str(ex), "csr" if job.from_csr else "name") from None
        serial = serial_hex(cert)
        # The CRL lists the superseded certificate, a revoked identity got a new certificate (lift the ACL deny),
        # or a new collector gets its reply topic: the broker's files change.
        def broker_changes() -> bool:
            return supersedes_now or self._acl_denies(name, job.cn) or self._acl_lacks_collector(name)

        if not job.writes_files:
            try:
                issued = IssuedAs(name, job.profile.role, job.via, job.requester)
                self.inventory.record_issued_grouped(cert, issued, token_sha256=job.token)
            except TokenAlreadyUsed:
                raise RequestError(FORBIDDEN, "this enrolment token has already been used", "token") from None
            if broker_changes():
                with self._writer():
                    self._sync_broker(ca)
        else:
            with self._writer():
                if job.digest is not None and (replay := self._replay(ca, name, job.digest)) is not None:
                    return replay  # an identical create finished while this one was signing
                with self.inventory.session() as session:
                    self.inventory.record_issued(cert, name=name, role=job.profile.role, via=job.via,
                                                 requester=job.requester, session=session)
                    if job.digest is not None:
                        self.inventory.record_create_digest(serial, name, job.digest, session)
                try:
                    self._store(name, cert, ca, job.key if job.kind == "create" else None)
                except OSError as ex:
                    log.error("certificate %s of %s is recorded but its files could not be written: %s", serial,
                              name, ex)
                    raise RequestError(UNAVAILABLE, f"the certificate files of {name} could not be written; "
                                                    f"certificate {serial} is recorded (revoke it by serial)") from None
                if broker_changes():
                    self._sync_broker(ca)
        self.metrics.issued(job.kind, _TRANSPORT.get())
        log.info("issued %s (%s) serial %s, %s days, via %s", name, job.profile.role, serial, job.days, job.via)
        return Reply(201, self._body(name, ca, cert, job.key))

    def _store(self, name: str, cert: x509.Certificate, ca: CertificateAuthority, new_key: PrivateKey | None) -> None:
        ensure_dir(self.layout.entity_dir(name))
        if new_key is not None:
            atomic_write(self.layout.key(name), key_pem(new_key), KEY_MODE)
        atomic_write(self.layout.cert(name), cert_pem(cert), CERT_MODE)
        atomic_write(self.layout.ca_copy(name), ca.cert_pem, CERT_MODE)

    @staticmethod
    def _body(name: str, ca: CertificateAuthority, cert: x509.Certificate, key: PrivateKey | None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "ca": ca.cert_pem.decode(), "crt": cert_pem(cert).decode()}
        if key is not None:
            body["key"] = key_pem(key).decode()
        body["serial"] = serial_hex(cert)
        body["not_after"] = cert.not_valid_after_utc.isoformat()
        return body

    # -- revocation and tokens ----------------------------------------------------------------------

    def _revoke(self, body: object, source: str) -> Reply:
        request = parse(RevokeRequest, body)
        if request.name is not None:
            refuse_protected(request.name)
        ca = self._authorise(request.passphrase, source, request.name or request.serial)
        with self._writer():
            if request.serial is not None:
                record = self.inventory.by_serial(request.serial)
                if record is None:
                    raise RequestError(NOT_FOUND, "no certificate with that serial", "serial")
                if is_protected(record.name):
                    raise RequestError(CONFLICT, f"{record.name!r} is a protected name used by the lab itself",
                                       "serial")
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
                    self.settings, ca, self._crl_entries(session), self.inventory.denied_names(session),
                    collectors=self.inventory.collectors(session),
                )
        except BrokerConfigError as ex:
            log.error("revocation of %s not done: %s", name, ex)
            raise RequestError(UNAVAILABLE, "the CRL could not be written; nothing was revoked") from None
        if changed:
            reload_broker(self.broker_files)
        if revoked:
            self.metrics.revoked(len(revoked), reason, _TRANSPORT.get())
            log.warning("revoked %s: %s (%s)", name, ", ".join(revoked), reason)
            for callback in self.on_revoked:
                try:
                    callback(name)
                except Exception:  # the revocation is done and recorded; a listener must not turn it into an error
                    log.exception("a listener failed after revoking %s", name)
        return Reply(200, {"name": name, "revoked": revoked, "reason": reason,
                           "already_revoked": [t.serial for t in targets if t.serial not in revoked]})

    def _issue_token(self, body: object, source: str) -> Reply:
        request = parse(TokenRequest, body)
        refuse_protected(request.name)
        self._authorise(request.passphrase, source, request.name)
        token = secrets.token_urlsafe(32)
        expires_at = utcnow() + dt.timedelta(seconds=request.ttl)
        self.inventory.add_token(token_digest(token), request.name, expires_at, source)
        log.info("enrolment token for %s issued to %s, expires %s", request.name, source, expires_at.isoformat())
        return Reply(201, {"name": request.name, "token": token, "expires_at": expires_at.isoformat()})

    # -- reading -----------------------------------------------------------------------------------

    def _certificates(self, name: str | None, status: str | None) -> list[dict[str, Any]]:
        query = parse(CertificatesQuery, {"name": name, "status": status})
        name, status = query.name, query.status
        now = utcnow()
        rows = []
        stored = status if status in STORED_STATUSES else None
        for record in self.inventory.list(name=name or None, status=stored):
            row = record.to_dict(now)
            row["state"] = self._state(record, now)
            if status in STATES and row["state"] != status:
                continue
            rows.append(row)
        return rows

    def _state(self, record: CertificateRecord, now: dt.datetime) -> str:
        if record.status in (REVOKED, SUPERSEDED):
            return record.status
        return expiry_state((record.not_after - now).total_seconds() / 86400, self.settings.renew_before_days)

"""The CA service behind v1/ssl: validate -> authorise -> sign -> store -> reply.

HTTP (`ca/http.py`, behind the dashboard's forwarding) and MQTT (`ca/mqtt.py`) are thin adapters: they decode
a body, call one method here with the caller's source (client IP; `mqtt`, or `cn:<CN>` when the broker proved it),
and send back the `Reply` (status, JSON body, headers) unchanged, so both transports give the same answer to
the same request.

Order of checks, so that a refused request never writes anything: the body is validated (400), protected
names refused (409), the requester's lockout checked (429, pki/lockout.py), the passphrase or enrolment token
checked (403), then the entity looked up (404), and only then is a certificate signed and stored.

The parts, each built here with exactly the collaborators it needs: the key holder (pki/keyholder.py: the root
and the unlocked CA key), the gate (pki/authorisation.py: operator, passphrase, enrolment token, lockout), the
issuer (pki/issuing.py: sign, renew, create, ACME) over the one issuing path (pki/issuance.py), and the revoker with
the broker's CRL and ACL (pki/revoking.py). `CAService` is the facade that owns them: the one entry point, with
the tokens and the certificate listing of its own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal, Required, TypedDict, Unpack

from cryptography import x509

from .authorisation import TRANSPORT, Authoriser, token_digest
from .authority import common_name, fingerprint_sha256, serial_hex, utcnow
from .broker import BrokerFiles
from .config import Settings
from .entity_files import EntityFiles
from .inventory import ACTIVE, REVOKED, SUPERSEDED, CertificateRecord, Inventory
from .issuance import IssuingPath
from .issuing import Issuer, server_entity_name
from .keyholder import KeyHolder, longest_validity
from .lockout import Lockout
from .metrics import CAMetrics
from .replies import Reply
from .requests import FORBIDDEN, CertificatesQuery, RequestError, TokenRequest, parse, readable_name, refuse_protected
from .revoking import BrokerPolicy, Revoker
from .status import EXPIRED, EXPIRING, VALID, expiry_state
from .store import CertsLayout, WriterLock, exclusive_lock, remove_temp_files

__all__ = ["STATES", "STORED_STATUSES", "CAService", "Reply", "server_entity_name", "token_digest"]


log = logging.getLogger(__name__)


# Statuses `GET /v1/ssl/certs?status=` accepts: the inventory's own, and the computed validity state.
STORED_STATUSES = (ACTIVE, SUPERSEDED, REVOKED)
STATES = (VALID, EXPIRING, EXPIRED, REVOKED, SUPERSEDED)


class Caller(TypedDict, total=False):
    """Who sent an issuing request and how: the keyword arguments of `CAService.sign` and `.create`.

    `source`: the client IP, `mqtt`, or `cn:<CN>` when the broker proved it (required). `via`: the transport that
    carried the request (default `http`). `requester`: the lockout's key (default `source`).
    `operator`: the dashboard proved a logged-in operator (session or API token) sent the request: no `pass` is
    needed and the lockout does not apply. Only an authenticating front end may set it.
    `transport`: how the request came, for the metrics (default: `via`; the HTTP adapter says `cli` for iotca).
    """

    source: Required[str]
    via: str
    requester: str | None
    operator: str | None
    transport: str | None


class CAService:
    """One per process: holds the unlocked root, the inventory and the lockout counters, and the parts over them."""

    def __init__(
        self,
        settings: Settings,
        *,
        inventory: Inventory | None = None,
        lockout: Lockout | None = None,
        metrics: CAMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or CAMetrics()  # the app's registry, or none (pki/metrics.py)
        self.layout = CertsLayout(settings.certs_dir)
        self.broker_files = BrokerFiles(settings.certs_dir, settings.data_dir)
        self.inventory = inventory or Inventory(settings.effective_database_url)
        self.lockout = lockout or Lockout(self.inventory)
        self.keys = KeyHolder(settings, self.layout)  # the root certificate and, once unlocked, the CA key
        self.gate = Authoriser(self.keys, self.lockout, self.inventory, self.metrics)
        writer = WriterLock(self.layout.lock)  # writers in this process; the file lock covers other processes
        self.broker_policy = BrokerPolicy(settings, self.inventory, self.broker_files)
        files = EntityFiles(self.layout)
        path = IssuingPath(self.inventory, files, self.broker_policy, writer, self.metrics)
        self.issuer = Issuer(settings, self.inventory, self.keys, self.gate, files, path)
        self.revoker = Revoker(self.inventory, self.keys, self.gate, self.metrics, self.broker_policy, writer)
        if settings.certs_dir.is_dir():
            with exclusive_lock(self.layout.lock):  # no writer is half-way through a file while this runs
                for leftover in remove_temp_files(settings.certs_dir):
                    log.warning("removed %s, left by a writer that was killed while writing it", leftover)
        # Called with the operation after every issuance, renewal or revocation (the dashboard re-reads its table).
        self.on_change: list[Callable[[str], None]] = []

    @property
    def on_revoked(self) -> list[Callable[[str], None]]:
        """Called with the entity name after a revocation took effect in the broker's files (pki/revoking.py)."""
        return self.revoker.on_revoked

    def close(self) -> None:
        self.inventory.close()

    # -- public operations (each returns a Reply, never raises) ----------------------------------------

    def sign(self, body: object, **caller: Unpack[Caller]) -> Reply:
        """A certificate for a CSR, or an entity's stored key signed again without one (`ssl/sign`)."""
        return self._issue("sign", Issuer.sign, body, caller)

    def create(self, body: object, **caller: Unpack[Caller]) -> Reply:
        """A new key and its certificate with the body's subject (`ssl/create`); an identical retry for a
        still-valid entity returns the same certificate."""
        return self._issue("create", Issuer.create, body, caller)

    def renew(self, cn: str, body: object, *, via: str = "mqtt", requester: str | None = None) -> Reply:
        """Renewal with the current certificate as the credential, no passphrase (`ssl/renew/<cn>`).

        Only call this where the transport proved that the caller holds `cn`'s certificate: over MQTT the
        broker's ACL lets only that CN publish to `ssl/renew/<cn>`.
        """
        requester = requester or f"{via}:{cn}"
        return self._run("renew", via, {"name": cn}, requester, lambda: self.issuer.renew(cn, body, requester))

    def revoke(self, body: object, *, source: str, operator: str | None = None, transport: str = "http") -> Reply:
        return self._run(
            "revoke",
            transport,
            body,
            source,
            lambda: self.revoker.revoke(self.gate.as_operator(body, operator), source),
        )

    def issue_token(self, body: object, *, source: str, operator: str | None = None, transport: str = "http") -> Reply:
        return self._run(
            "token", transport, body, source, lambda: self._issue_token(self.gate.as_operator(body, operator), source)
        )

    # -- the standard protocols (ca/est.py, ca/acme.py): the same checks, other credentials ------------

    def enrol_basic(self, name: str, csr_pem: str, secret: str, *, source: str, via: str = "est") -> Reply:
        """First enrolment with HTTP Basic `name:secret` (EST simpleenroll): `secret` is a single-use enrolment
        token for `name` or the CA passphrase; then exactly `sign` with a CSR (lockout, profile, inventory)."""
        kind = "token" if self.inventory.token(token_digest(secret)) is not None else "pass"
        days = self.settings.cert_days
        with contextlib.suppress(RequestError):  # no root: `sign` gives the 503
            days = min(days, longest_validity(self.keys.root()))
        return self.sign(
            {"name": name, "days": days, kind: secret, "csr": csr_pem}, source=source, via=via, requester=source
        )

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
                raise RequestError(
                    FORBIDDEN,
                    f"this certificate is {record.status}: only the current certificate of {record.name} can renew it",
                )
            return self.issuer.renew(record.name, {"csr": csr_pem}, requester)

        return self._run("renew", via, {"name": cn}, requester, work)

    def issue_server(self, csr_pem: str, names: list[str], *, days: int, requester: str) -> Reply:
        """A `server` certificate for DNS `names` whose control was proven (ACME finalize; the adapter checked
        them against the operator's allow-list). The CSR must name exactly these hosts, nothing else."""
        entity = server_entity_name(names[0]) if names else "-"
        return self._run(
            "acme",
            "acme",
            {"name": entity},
            requester,
            lambda: self.issuer.issue_server(csr_pem, names, entity, days, requester),
        )

    def revoke_certificate(self, cert: x509.Certificate, reason: str, *, source: str) -> Reply:
        """Revoke one certificate whose holder the transport authenticated (ACME revokeCert: the account that
        ordered it, or the certificate's own key), without the passphrase."""
        return self._run("revoke", "acme", {}, source, lambda: self.revoker.revoke_certificate(cert, reason))

    def certificates(self, name: str | None = None, status: str | None = None) -> Reply:
        try:
            return Reply(200, {"certificates": self._certificates(name, status)})
        except RequestError as ex:
            return Reply(ex.status, ex.body(), ex.headers())

    def max_days(self) -> int | None:
        """The longest validity a request may ask for now (the root's remaining life); None without a usable root."""
        try:
            return longest_validity(self.keys.root())
        except RequestError:
            return None

    def ca_pem(self) -> bytes:
        """The root certificate (public); RequestError 503 when the lab has none yet."""
        return self.keys.root_pem()

    def crl_pem(self) -> bytes:
        """The CRL as the broker enforces it (public); RequestError 503 before the generator wrote one."""
        return self.broker_policy.crl_pem()

    def refresh_crl(self) -> bool:
        """Rewrite the CRL (and reload the broker) when it is due or superseded certificates reached the end of
        their grace; False when nothing changed or the CA is locked."""
        return self.revoker.refresh_crl()

    # -- plumbing ----------------------------------------------------------------------------------

    def _issue(
        self,
        operation: Literal["sign", "create"],
        work: Callable[[Issuer, object, str, str, str], Reply],
        body: object,
        caller: Caller,
    ) -> Reply:
        unknown = caller.keys() - Caller.__annotations__.keys()
        if unknown or "source" not in caller:  # what a plain signature would refuse
            raise TypeError(f"{operation}() needs source= and takes only {', '.join(Caller.__annotations__)}")
        source, via = caller["source"], caller.get("via", "http")
        requester, operator = caller.get("requester") or source, caller.get("operator")
        return self._run(
            operation,
            caller.get("transport") or via,
            body,
            source,
            lambda: work(self.issuer, self.gate.as_operator(body, operator), source, via, requester),
        )

    def _run(self, operation: str, transport: str, body: object, source: str, work: Callable[[], Reply]) -> Reply:
        """Every operation's one way in and out: the answer as a Reply, timed and counted (refusals by reason)."""
        started = time.perf_counter()
        context = TRANSPORT.set(transport)
        try:
            reply = work()
        except RequestError as ex:
            reply = Reply(ex.status, ex.body(), ex.headers())
        except Exception:  # a bug, not the caller's fault: log it, answer without details
            log.exception("%s request from %s failed unexpectedly", operation, source)
            reply = Reply(500, {"error": "internal error; the server log has the details"})
        finally:
            TRANSPORT.reset(context)
        self.metrics.answered(
            operation, transport, reply.status, reply.body.get("field"), time.perf_counter() - started
        )
        # Only validated names reach the log; never a body, a passphrase or a token.
        log.info("ssl/%s %s from %s -> %s", operation, readable_name(body) or "-", source, reply.status)
        if reply.ok and operation != "token":  # a token changes no certificate
            for callback in self.on_change:
                try:
                    callback(operation)
                except Exception:  # a listener must never turn a done issuance into an error
                    log.exception("a listener failed after ssl/%s", operation)
        return reply

    def _issue_token(self, body: object, source: str) -> Reply:
        request = parse(TokenRequest, body)
        refuse_protected(request.name)
        self.gate.passphrase(request.passphrase, source, request.name)
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

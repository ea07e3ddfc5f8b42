"""The lockout glue: who may have the CA act, checked before anything changes state.

A proven operator (the dashboard's session or API token), the CA passphrase (`pass`, constant-time, see
pki/keyholder.py) or a single-use enrolment token; every failure counts against the requester (pki/lockout.py),
and a requester locked out gets 429 before its credential is even looked at.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import secrets

from .authority import CertificateAuthority, utcnow
from .inventory import Inventory
from .keyholder import KeyHolder
from .lockout import Lockout
from .metrics import CAMetrics
from .requests import FORBIDDEN, UNAVAILABLE, RequestError

log = logging.getLogger("pki.service")
# The operator (logged in to the dashboard) on whose behalf the current call runs; None for `pass` requests.
OPERATOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("ca_operator", default=None)
# The transport the current call came by (pki/metrics.py TRANSPORTS), for the counters of the issuing path
# (pki/issuance.py) and the lockout.
TRANSPORT: contextvars.ContextVar[str] = contextvars.ContextVar("ca_transport", default="http")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Authoriser:
    """The passphrase, the enrolment tokens and the operator's proof, with the lockout counters around them."""

    def __init__(self, keys: KeyHolder, lockout: Lockout, inventory: Inventory, metrics: CAMetrics) -> None:
        self.keys = keys
        self.lockout = lockout
        self.inventory = inventory
        self.metrics = metrics
        self._operator_placeholder = secrets.token_urlsafe(32)

    def as_operator(self, body: object, operator: str | None) -> object:
        """Mark this request (this thread, for the duration of the call) as a proven operator's; `pass` and
        `token` in its body are replaced by a placeholder that only this process knows, so validation passes."""
        OPERATOR.set(operator)
        if operator is None or not isinstance(body, dict):
            return body
        return {**{k: v for k, v in body.items() if k != "token"}, "pass": self._operator_placeholder}

    def passphrase(self, passphrase: str | None, source: str, name: str | None = None) -> CertificateAuthority:
        """Check `pass` in constant time; count failures per requester (pki/lockout.py); 429 while locked out."""
        operator = OPERATOR.get()
        if operator is not None and passphrase == self._operator_placeholder:
            ca = self.keys.unlocked()
            if ca is None:
                raise RequestError(
                    UNAVAILABLE,
                    "the CA key is locked: set CA_PASSPHRASE for the dashboard so operators can act without typing it",
                )
            return ca
        recent_failures = self.lockout.check(source, name)
        checked = self.keys.check(passphrase or "")
        if checked is None:
            self._failed(source, name)
            log.warning("wrong CA passphrase from %s", source)
            raise RequestError(FORBIDDEN, "wrong passphrase", "pass")
        if recent_failures:
            self.lockout.succeeded(source, name)
        return checked

    def token(self, token: str, name: str, source: str) -> tuple[CertificateAuthority, str]:
        """Check a single-use enrolment token for `name` (not consumed here: the issuing path marks it used); the CA
        and the token's digest."""
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
            self._failed(source, name)
            log.warning("refused an enrolment token for %s from %s: %s", name, source, problem)
            raise RequestError(FORBIDDEN, problem, "token")
        ca = self.keys.unlocked()
        if ca is None:
            raise RequestError(UNAVAILABLE, "the CA key is locked: set CA_PASSPHRASE so enrolment tokens can be used")
        return ca, digest

    def _failed(self, source: str, name: str | None) -> None:
        if self.lockout.failed(source, name):
            self.metrics.locked_out(TRANSPORT.get())

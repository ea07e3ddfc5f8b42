"""What the broker is told to refuse and allow, read from the inventory: the CRL's entries (revoked, and
superseded past their grace), the identities the ACL denies, and the collectors that get a reply topic."""

from __future__ import annotations

import datetime as dt
import re

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select
from sqlalchemy.orm import Session

from .authority import utcnow
from .records import ACTIVE, NEVER_SUPERSEDED_ROLES, RECORDED_VIAS, REVOKED, SUPERSEDED, CertificateRecord

# Names that may appear in a broker ACL `user` line (no spaces, newlines or wildcards).
_ACL_SAFE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAC_NAME_RE = re.compile(r"[0-9A-Fa-f]{12}")


def _public_key_der(pem: str) -> bytes:
    return (
        x509.load_pem_x509_certificate(pem.encode())
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )


def _as_utc(value: dt.datetime) -> dt.datetime:
    """Core selects bypass UTCDateTime's result processing on some paths: SQLite gives naive UTC back."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def crl_entries(
    session: Session, superseded_grace: float | None = None, now: dt.datetime | None = None
) -> list[tuple[int, dt.datetime, str | None]]:
    """(serial, revocation time, RFC 5280 reason) of every certificate the CRL lists: the CRL's content.

    Revoked certificates with the reason given to `revoke`; with `superseded_grace` (seconds), also every
    unexpired superseded certificate whose successor has a new key and was issued at least that long ago,
    reason `superseded` (so a stolen old key dies with key rotation), dated when its grace ended. The CA
    service's successors (`sign`, `create`, renewal) and the generator's reissues (`cli`: always a new key)
    count alike; running processes switch to renewed files well inside the grace (lab/rotation.py). A
    re-signed key (`sign` without a CSR, the same public key) supersedes nothing on the CRL: the key is
    still in use. Nor does a certificate the generator only recorded (RECORDED_VIAS), nor a root.
    """
    table = CertificateRecord.__table__
    query = select(table.c.serial, table.c.revoked_at, table.c.revocation_reason).where(table.c.status == REVOKED)
    entries = [(int(serial, 16), when or utcnow(), reason) for serial, when, reason in session.execute(query)]
    if superseded_grace is None:
        return entries
    now = now or utcnow()
    grace = dt.timedelta(seconds=superseded_grace)
    old = session.execute(
        select(table.c.name, table.c.id, table.c.serial, table.c.pem).where(
            table.c.status == SUPERSEDED, table.c.not_after > now, table.c.role.not_in(list(NEVER_SUPERSEDED_ROLES))
        )
    ).all()
    if not old:
        return entries
    issued: dict[str, list[tuple[int, dt.datetime, str, str]]] = {}
    names = sorted({row.name for row in old})
    for start in range(0, len(names), 500):
        for name, row_id, issued_at, via, pem in session.execute(
            select(table.c.name, table.c.id, table.c.issued_at, table.c.issued_via, table.c.pem)
            .where(table.c.name.in_(names[start : start + 500]))
            .order_by(table.c.id)
        ):
            issued.setdefault(name, []).append((row_id, _as_utc(issued_at), via, pem))
    keys: dict[int, bytes] = {}  # row id -> public key, parsed only for rows past the grace

    def key_of(row_id: int, pem: str) -> bytes:
        if row_id not in keys:
            keys[row_id] = _public_key_der(pem)
        return keys[row_id]

    for name, row_id, serial, pem in old:
        later = [s for s in issued.get(name, []) if s[0] > row_id]
        if not later or later[0][1] + grace > now:  # no successor, or the first one is still inside the grace
            continue
        # The key rotated with the first later certificate for another key (re-signs of this key in between
        # keep it in use); the grace runs from then.
        key = key_of(row_id, pem)
        rotated = next((s for s in later if key_of(s[0], s[3]) != key), None)
        if rotated is None or rotated[2] in RECORDED_VIAS or rotated[1] + grace > now:
            continue
        entries.append((int(serial, 16), rotated[1] + grace, "superseded"))
    return entries


def denied_names(session: Session) -> list[str]:
    """Identities whose latest certificate is revoked and that hold no active one: the ACL denies them.

    The broker's user name is the certificate CN, so a revoked certificate's CN is denied as well as its
    entity name (they differ only for `create` requests with their own `cn`); nothing an active
    certificate still uses is ever denied.
    """
    rows = session.execute(
        select(CertificateRecord.name, CertificateRecord.common_name, CertificateRecord.status).where(
            CertificateRecord.status.in_((REVOKED, ACTIVE))
        )
    ).all()
    active_names = {name for name, _cn, status in rows if status == ACTIVE}
    active_cns = {cn for _name, cn, status in rows if status == ACTIVE}
    denied: set[str] = set()
    for name, cn, status in rows:
        if status == REVOKED and name not in active_names:
            denied.update(v for v in (name, cn) if v not in active_cns and _ACL_SAFE_RE.fullmatch(v))
    return sorted(denied)


def collectors(session: Session) -> list[str]:
    """Entities named by a MAC address (12 hex digits) with an active certificate: the ACL grants each its
    reply topic with colons, `ssl/AA:BB:CC:DD:EE:01`."""
    names = session.execute(select(CertificateRecord.name).where(CertificateRecord.status == ACTIVE)).scalars()
    return sorted({name for name in names if _MAC_NAME_RE.fullmatch(name)})

"""ACME state (RFC 8555 7.1): nonces, accounts, orders and authorizations, as tables in the lab's inventory
database (the same SQLAlchemy engine as the certificates, so `DATABASE_URL` moves them all together), with their
own migration history (ca/migrations, run by pki.migrate)."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from typing import Any

from sqlalchemy import ForeignKey, String, Text, delete, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pki import migrate
from pki.authority import utcnow
from pki.inventory import Inventory, UTCDateTime

NONCE_LIFETIME = dt.timedelta(hours=1)
ORDER_LIFETIME = dt.timedelta(days=7)

PENDING, READY, PROCESSING, VALID, INVALID = "pending", "ready", "processing", "valid", "invalid"


class AcmeBase(DeclarativeBase):
    pass


ACME = migrate.Component.beside(
    __file__, "acme", {"acme_nonces", "acme_accounts", "acme_orders", "acme_authorizations"}
)


def new_id() -> str:
    return secrets.token_urlsafe(18)


class AcmeNonce(AcmeBase):
    __tablename__ = "acme_nonces"

    value: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)


class AcmeAccount(AcmeBase):
    __tablename__ = "acme_accounts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    thumbprint: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # RFC 7638, base64url
    jwk: Mapped[str] = mapped_column(Text)  # the public key as JSON
    status: Mapped[str] = mapped_column(String(16), default=VALID)
    contact: Mapped[str] = mapped_column(Text, default="[]")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class AcmeOrder(AcmeBase):
    __tablename__ = "acme_orders"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(32), ForeignKey("acme_accounts.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    names: Mapped[str] = mapped_column(Text)  # JSON list of DNS names
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    certificate_serial: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    @property
    def name_list(self) -> list[str]:
        return json.loads(self.names)


class AcmeAuthorization(AcmeBase):
    """One DNS name of one order and its single http-01 challenge."""

    __tablename__ = "acme_authorizations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(32), ForeignKey("acme_orders.id"), index=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str] = mapped_column(String(253))
    status: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    challenge_id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    token: Mapped[str] = mapped_column(String(64))
    challenge_status: Mapped[str] = mapped_column(String(16))
    validated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


TABLES = [AcmeNonce.__table__, AcmeAccount.__table__, AcmeOrder.__table__, AcmeAuthorization.__table__]


class AcmeStore:
    """The ACME tables through the inventory's engine; every method is one short transaction."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        migrate.upgrade(inventory.engine, ACME)

    # -- nonces (RFC 8555 7.2): single use, stored so several processes can share them -----------------

    def new_nonce(self) -> str:
        value = secrets.token_urlsafe(24)
        now = utcnow()
        with self.inventory.session() as session:
            session.execute(delete(AcmeNonce).where(AcmeNonce.expires_at <= now))
            session.add(AcmeNonce(value=value, expires_at=now + NONCE_LIFETIME))
        return value

    def use_nonce(self, value: str) -> bool:
        with self.inventory.session() as session:
            result = session.execute(delete(AcmeNonce).where(AcmeNonce.value == value, AcmeNonce.expires_at > utcnow()))
            return bool(result.rowcount)  # type: ignore[attr-defined]

    # -- accounts ---------------------------------------------------------------------------------

    def account_by_thumbprint(self, thumbprint: str) -> AcmeAccount | None:
        with self.inventory.reading() as session:
            return session.scalar(select(AcmeAccount).where(AcmeAccount.thumbprint == thumbprint))

    def account(self, account_id: str) -> AcmeAccount | None:
        with self.inventory.reading() as session:
            return session.get(AcmeAccount, account_id)

    def add_account(self, thumbprint: str, jwk: dict[str, Any], contact: list[str]) -> tuple[AcmeAccount, bool]:
        """(account, created): the existing account of this key, or a new one."""
        with self.inventory.session() as session:
            existing = session.scalar(select(AcmeAccount).where(AcmeAccount.thumbprint == thumbprint))
            if existing is not None:
                return existing, False
            account = AcmeAccount(
                id=new_id(),
                thumbprint=thumbprint,
                jwk=json.dumps(jwk),
                status=VALID,
                contact=json.dumps(contact),
                created_at=utcnow(),
            )
            session.add(account)
            return account, True

    def set_account_status(self, account_id: str, status: str) -> None:
        with self.inventory.session() as session:
            session.execute(update(AcmeAccount).where(AcmeAccount.id == account_id).values(status=status))

    # -- orders and authorizations -----------------------------------------------------------------

    def add_order(self, account_id: str, names: list[str]) -> AcmeOrder:
        expires = utcnow() + ORDER_LIFETIME
        with self.inventory.session() as session:
            order = AcmeOrder(
                id=new_id(), account_id=account_id, status=PENDING, names=json.dumps(names), expires_at=expires
            )
            session.add(order)
            session.flush()
            for name in names:
                session.add(
                    AcmeAuthorization(
                        id=new_id(),
                        order_id=order.id,
                        account_id=account_id,
                        name=name,
                        status=PENDING,
                        expires_at=expires,
                        challenge_id=new_id(),
                        token=secrets.token_urlsafe(32),
                        challenge_status=PENDING,
                    )
                )
            return order

    def order_ids(self, account_id: str) -> list[str]:
        """The account's orders that are not invalid or expired (RFC 8555 7.1.2.1)."""
        with self.inventory.reading() as session:
            return list(
                session.scalars(
                    select(AcmeOrder.id).where(
                        AcmeOrder.account_id == account_id, AcmeOrder.status != INVALID, AcmeOrder.expires_at > utcnow()
                    )
                )
            )

    def order(self, order_id: str) -> AcmeOrder | None:
        with self.inventory.reading() as session:
            return session.get(AcmeOrder, order_id)

    def authorizations(self, order_id: str) -> list[AcmeAuthorization]:
        with self.inventory.reading() as session:
            return list(
                session.scalars(
                    select(AcmeAuthorization)
                    .where(AcmeAuthorization.order_id == order_id)
                    .order_by(AcmeAuthorization.name)
                )
            )

    def authorization(self, authz_id: str) -> AcmeAuthorization | None:
        with self.inventory.reading() as session:
            return session.get(AcmeAuthorization, authz_id)

    def by_challenge(self, challenge_id: str) -> AcmeAuthorization | None:
        with self.inventory.reading() as session:
            return session.scalar(select(AcmeAuthorization).where(AcmeAuthorization.challenge_id == challenge_id))

    def claim_challenge(self, challenge_id: str) -> bool:
        """pending -> processing, once: only one request validates a challenge."""
        with self.inventory.session() as session:
            result = session.execute(
                update(AcmeAuthorization)
                .where(AcmeAuthorization.challenge_id == challenge_id, AcmeAuthorization.challenge_status == PENDING)
                .values(challenge_status=PROCESSING)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def finish_challenge(self, challenge_id: str, error: str | None) -> None:
        """The validation's outcome on the challenge, its authorization and (when all are valid) the order."""
        status = INVALID if error else VALID
        with self.inventory.session() as session:
            authz = session.scalar(select(AcmeAuthorization).where(AcmeAuthorization.challenge_id == challenge_id))
            assert authz is not None
            authz.challenge_status = status
            authz.status = status
            authz.error = error
            authz.validated_at = utcnow() if not error else None
            order = session.get(AcmeOrder, authz.order_id)
            assert order is not None
            if error:
                order.status = INVALID
                order.error = error
            elif order.status == PENDING:
                others = session.scalars(
                    select(AcmeAuthorization.status).where(
                        AcmeAuthorization.order_id == order.id, AcmeAuthorization.id != authz.id
                    )
                )
                if all(s == VALID for s in others):
                    order.status = READY

    def start_finalize(self, order_id: str) -> bool:
        """ready -> processing, once: two finalize requests never both issue."""
        with self.inventory.session() as session:
            result = session.execute(
                update(AcmeOrder).where(AcmeOrder.id == order_id, AcmeOrder.status == READY).values(status=PROCESSING)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def finish_finalize(self, order_id: str, serial: str | None) -> None:
        """processing -> valid with the certificate; or back to ready when the CSR was refused (the client may
        send a better one; RFC 8555 7.4 leaves the order usable)."""
        with self.inventory.session() as session:
            values: dict[str, Any] = {"status": VALID, "certificate_serial": serial} if serial else {"status": READY}
            session.execute(update(AcmeOrder).where(AcmeOrder.id == order_id).values(**values))

    def owns_certificate(self, account_id: str, serial: str) -> bool:
        with self.inventory.reading() as session:
            return (
                session.scalar(
                    select(AcmeOrder.id).where(
                        AcmeOrder.account_id == account_id, AcmeOrder.certificate_serial == serial
                    )
                )
                is not None
            )

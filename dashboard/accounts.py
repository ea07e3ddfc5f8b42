"""Dashboard accounts and API tokens, in the lab's database (the dashboard's tables, dashboard/schema.py).

Roles: `viewer` sees the dashboard (devices, chart, log, certificates), never a secret; `operator` may also
create, sign, renew and revoke certificates and manage API tokens. Passwords are stored as argon2id hashes
(argon2-cffi); API tokens as their SHA-256 (a token is 256 random bits, so a fast hash is enough), shown once.

`python -m dashboard.users` (dashboard/users.py) is the command over this store.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Integer, String, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from pki.authority import utcnow
from pki.config import ConfigError
from pki.inventory import Database, UTCDateTime

from .schema import DASHBOARD, DashboardBase

VIEWER = "viewer"
OPERATOR = "operator"
ROLES = (VIEWER, OPERATOR)
ADMIN = "admin"
MIN_PASSWORD = 12
TOKEN_PREFIX = "iotca_"  # noqa: S105 - a prefix that makes leaked tokens easy to find
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

_hasher = PasswordHasher()
# Verified against when the user does not exist, so an unknown name takes as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class UserError(ValueError):
    """A user or token operation that cannot be done; the message says why."""


class UserExists(UserError):
    """The user name is taken, perhaps by another process a moment ago."""


class _Grant:
    """The columns a user and an API token share: each is a row that grants a role, since its creation."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True, sort_order=-1)  # first, as before
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class DashboardUser(_Grant, DashboardBase):
    __tablename__ = "dashboard_users"

    username: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    password_changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class ApiToken(_Grant, DashboardBase):
    __tablename__ = "dashboard_api_tokens"

    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    label: Mapped[str] = mapped_column(String(64))
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


@dataclass(frozen=True)
class Principal:
    """Who is asking: a logged-in user (`via="session"`) or the holder of an API token (`via="token"`)."""

    name: str
    role: str
    via: str

    @property
    def is_operator(self) -> bool:
        return self.role == OPERATOR


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    return role


def _check_username(username: str) -> str:
    if not USERNAME_RE.match(username or ""):
        raise UserError("a user name is 1-64 letters, digits, '_', '.', '@' or '-', starting with a letter or digit")
    return username


def _check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"a password needs at least {MIN_PASSWORD} characters")
    return password


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def session_epoch(user: DashboardUser) -> str:
    """Changes whenever the password does: a reset (or a removed and re-added user) ends every old session."""
    return hashlib.sha256(f"{user.id}:{user.password_hash}".encode()).hexdigest()[:32]


def _existing_user(session: Session, username: str) -> DashboardUser:
    """The user named `username`, in a transaction of the caller's; UserError when there is none."""
    user = session.scalar(select(DashboardUser).where(DashboardUser.username == username))
    if user is None:
        raise UserError(f"no user {username!r}")
    return user


class UserStore(Database):
    """Users and API tokens in the lab database (DATABASE_URL). Every request reads a user or a token: in `reading`
    transactions, which never take SQLite's write lock."""

    def __init__(self, url: str) -> None:
        super().__init__(url, DASHBOARD)

    # -- users ---------------------------------------------------------------------------------

    def get(self, username: str) -> DashboardUser | None:
        with self.reading() as session:
            return session.scalar(select(DashboardUser).where(DashboardUser.username == username))

    def users(self) -> list[DashboardUser]:
        with self.reading() as session:
            return list(session.scalars(select(DashboardUser).order_by(DashboardUser.username)))

    def add(self, username: str, password: str, role: str) -> DashboardUser:
        _check_username(username)
        _check_role(role)
        _check_password(password)
        now = utcnow()
        try:
            with self.session() as session:
                if session.scalar(select(DashboardUser.id).where(DashboardUser.username == username)) is not None:
                    raise UserExists(f"user {username!r} exists already")
                user = DashboardUser(
                    username=username,
                    role=role,
                    password_hash=_hasher.hash(password),
                    created_at=now,
                    password_changed_at=now,
                )
                session.add(user)
        except IntegrityError as ex:
            # The unique index on the name decides between processes adding it at once: on PostgreSQL (READ
            # COMMITTED) each may pass the check above; SQLite's BEGIN IMMEDIATE already runs them one by one.
            # Any other constraint failing is not "exists": only a name taken now says so.
            if self.get(username) is not None:
                raise UserExists(f"user {username!r} exists already") from None
            # Not the database's message: PostgreSQL's names the failing row, and that row holds the password hash.
            raise UserError(f"the database refused to add user {username!r} ({type(ex.orig).__name__})") from None
        return user

    def ensure_admin(self, password: str | None) -> bool:
        """Create the operator `admin` with DASHBOARD_ADMIN_PASSWORD once; an existing admin is left alone.
        True only for the one process that created it, when several start at once on a new database."""
        if not password or self.get(ADMIN) is not None:
            return False
        try:
            self.add(ADMIN, password, OPERATOR)
        except UserExists:  # another process created it meanwhile, with its password: ours is not stored
            return False
        except UserError as ex:
            raise ConfigError(f"DASHBOARD_ADMIN_PASSWORD: {ex}") from None
        return True

    def remove(self, username: str) -> None:
        with self.session() as session:
            if session.execute(delete(DashboardUser).where(DashboardUser.username == username)).rowcount == 0:
                raise UserError(f"no user {username!r}")
            # The user's tokens die with the account.
            for token in session.scalars(
                select(ApiToken).where(ApiToken.owner == username, ApiToken.revoked_at.is_(None))
            ):
                token.revoked_at = utcnow()

    def set_role(self, username: str, role: str) -> None:
        _check_role(role)
        with self.session() as session:
            _existing_user(session, username).role = role

    def set_password(self, username: str, password: str) -> None:
        _check_password(password)
        with self.session() as session:
            user = _existing_user(session, username)
            user.password_hash = _hasher.hash(password)
            user.password_changed_at = utcnow()

    def authenticate(self, username: str, password: str) -> DashboardUser | None:
        """The user if the password is right; None otherwise (in the same time for unknown names)."""
        user = self.get(username) if USERNAME_RE.match(username or "") else None
        try:
            _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            return None
        if user is None:
            return None
        if _hasher.check_needs_rehash(user.password_hash):
            self.set_password(username, password)
            user = self.get(username)
        return user

    # -- API tokens ----------------------------------------------------------------------------

    def create_token(self, label: str, role: str, owner: str | None = None) -> tuple[ApiToken, str]:
        """A new token (returned once, never stored); an owner's token cannot outrank its owner."""
        _check_role(role)
        label = (label or "").strip()
        if not label or len(label) > 64:
            raise UserError("a token needs a label of 1-64 characters")
        with self.session() as session:
            if owner is not None:
                if role == OPERATOR and _existing_user(session, owner).role != OPERATOR:
                    raise UserError("a viewer cannot create an operator token")
            secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
            token = ApiToken(
                token_sha256=token_digest(secret), label=label, role=role, owner=owner, created_at=utcnow()
            )
            session.add(token)
        return token, secret

    def tokens(self) -> list[ApiToken]:
        with self.reading() as session:
            return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))

    def revoke_token(self, token_id: int) -> None:
        with self.session() as session:
            token = session.get(ApiToken, token_id)
            if token is None:
                raise UserError(f"no API token {token_id}")
            if token.revoked_at is None:
                token.revoked_at = utcnow()

    def principal_for_token(self, secret: str) -> Principal | None:
        """The principal of a valid, unrevoked token; None otherwise. An owner's lost rights limit the token."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
            return None
        digest = token_digest(secret)
        with self.reading() as session:
            token = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == digest))
            if token is None or token.revoked_at is not None or not hmac.compare_digest(token.token_sha256, digest):
                return None
            role = token.role
            if token.owner is not None:
                owner = session.scalar(select(DashboardUser).where(DashboardUser.username == token.owner))
                if owner is None:
                    return None
                if owner.role != OPERATOR:
                    role = VIEWER
            return Principal(f"token:{token.label}", role, "token")


def token_info(token: ApiToken) -> dict[str, object]:
    return {
        "id": token.id,
        "label": token.label,
        "role": token.role,
        "owner": token.owner,
        "created_at": token.created_at.isoformat(),
        "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None,
    }

"""The lockout: wrong CA passphrases and enrolment tokens, counted per requester, in the database.

Who a requester is depends on what the transport can prove:

- a *proven identity* (an MQTT request on `ssl/sign/<CN>` or `ssl/create/<CN>`, a topic the broker's ACL
  lets only that certificate write; source `cn:<CN>`): counted on the identity alone, so a client that
  rotates the requested name is locked out after LOCKOUT_ATTEMPTS all the same;
- anything else (an HTTP client, source = its address; an MQTT request on the shared `ssl/sign` or
  `ssl/create`, whose publisher the CA never learns, source `mqtt`): counted per source *and* requested
  name, LOCKOUT_ATTEMPTS each, so one client's failures do not block another client that asks for another
  name from the same address (every local process is 127.0.0.1); and per source alone with the higher
  SOURCE_ATTEMPTS, so rotating names buys a guesser at most SOURCE_ATTEMPTS tries per window. Past that,
  the whole source is refused until the window passes: a guessing attack in progress, not one client's typo.

While a key is locked every request counted on it gets 429, even with the right passphrase, so guessing
cannot go on; Retry-After says when the oldest counted failure leaves the window. Logged-in operators
(session or API token) never reach this: they send no passphrase.

The failures are rows of `lockout_failures` in the inventory's database (wall-clock seconds), so a CA
restart keeps them and several CA processes on one DATABASE_URL share them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from .inventory import Inventory, LockoutFailure
from .requests import TOO_MANY_REQUESTS, RequestError

LOCKOUT_ATTEMPTS = 5
LOCKOUT_WINDOW = 15 * 60  # seconds
SOURCE_ATTEMPTS = 50  # per unproven source, across every requested name
IDENTITY_PREFIX = "cn:"  # a source the transport proved (the broker's ACL bound the topic to the CN)


def requester_keys(source: str, name: str | None) -> list[tuple[str, int]]:
    """The counters a request from `source` for `name` is checked against, with their limits."""
    if source.startswith(IDENTITY_PREFIX):
        return [(source, LOCKOUT_ATTEMPTS)]
    return [(f"{source} {name or '-'}", LOCKOUT_ATTEMPTS), (source, SOURCE_ATTEMPTS)]


class Lockout:
    """LOCKOUT_ATTEMPTS failures within LOCKOUT_WINDOW lock a requester out (module docstring)."""

    def __init__(
        self,
        inventory: Inventory,
        *,
        window: float = LOCKOUT_WINDOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inventory = inventory
        self.window = window
        self.clock = clock

    def check(self, source: str, name: str | None) -> int:
        """RequestError 429 (with Retry-After) while any counter of this requester is at its limit; else the
        requester's own recent failures (0: a later success has nothing to clear)."""
        now = self.clock()
        own = 0
        with self.inventory.reading() as session:
            for index, (key, limit) in enumerate(requester_keys(source, name)):
                recent = self._recent_or_refuse(session, key, limit, now)
                if index == 0:
                    own = recent
        return own

    def _recent_or_refuse(self, session: Session, key: str, limit: int, now: float) -> int:
        """The key's failures inside the window; RequestError 429 (with Retry-After) when at `limit`."""
        times = session.scalars(
            select(LockoutFailure.failed_at)
            .where(LockoutFailure.key == key, LockoutFailure.failed_at > now - self.window)
            .order_by(LockoutFailure.failed_at.desc())
            .limit(limit)
        ).all()
        if len(times) >= limit:
            retry_after = max(1, math.ceil(times[-1] + self.window - now))
            raise RequestError(
                TOO_MANY_REQUESTS,
                f"too many wrong passphrases or tokens from this client; try again in {retry_after} seconds",
                retry_after=retry_after,
            )
        return len(times)

    def failed(self, source: str, name: str | None) -> bool:
        """Count one failure; True when it is the one that locks the requester out (a counter reached its limit);
        RequestError 429 instead when a counter is already at its limit.

        Check and count are one write transaction, serialised across processes (PostgreSQL's advisory lock,
        SQLite's write lock: pki/inventory.py), so CA replicas answering wrong passphrases at the same moment
        still refuse with 403 exactly LOCKOUT_ATTEMPTS times, and with 429 from then on.
        """
        now = self.clock()
        keys = requester_keys(source, name)
        with self.inventory.session() as session:
            for key, limit in keys:
                self._recent_or_refuse(session, key, limit, now)
            # Rows that left the window are of no use: the table stays small under a spray of sources.
            session.execute(delete(LockoutFailure).where(LockoutFailure.failed_at <= now - self.window))
            session.add_all(LockoutFailure(key=key, failed_at=now) for key, _ in keys)
            session.flush()
            return any(
                session.scalar(
                    select(func.count())
                    .select_from(LockoutFailure)
                    .where(LockoutFailure.key == key, LockoutFailure.failed_at > now - self.window)
                )
                == limit
                for key, limit in keys
            )

    def succeeded(self, source: str, name: str | None) -> None:
        """The right credentials clear this requester's own counter (not its source's, which ages out)."""
        key = requester_keys(source, name)[0][0]
        with self.inventory.reading() as session:  # the common case writes nothing (no write lock, no fsync)
            if session.scalar(select(LockoutFailure.id).where(LockoutFailure.key == key).limit(1)) is None:
                return
        with self.inventory.session() as session:
            session.execute(delete(LockoutFailure).where(LockoutFailure.key == key))

    def count(self, source: str, name: str | None) -> int:
        """Recent failures on this requester's own counter (for status pages and tests)."""
        key = requester_keys(source, name)[0][0]
        with self.inventory.reading() as session:
            return (
                session.scalar(
                    select(func.count())
                    .select_from(LockoutFailure)
                    .where(LockoutFailure.key == key, LockoutFailure.failed_at > self.clock() - self.window)
                )
                or 0
            )

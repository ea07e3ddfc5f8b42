"""Which `ca-<n>` identity a CA replica holds: a lease on a slot in the shared database.

Compose's `--scale ca=N` starts N containers from one service definition, with nothing to tell them apart, yet
each needs an identity of its own (a broker client id is unique: two replicas as `ca-1` would kick each other
off). So a replica started without CA_INSTANCE claims the lowest slot n in 1..CA_REPLICAS that nobody holds,
or whose holder stopped renewing its lease for LEASE seconds (it was killed), and becomes `ca-<n>`. The claim is
one write transaction of the inventory's database, serialised across processes and hosts (PostgreSQL's advisory
lock, SQLite's write lock: pki/inventory.py), so two replicas never take the same slot. A replica renews its
lease every HEARTBEAT seconds and gives it back when it stops. When every slot is held, a starting replica waits
up to CA_SLOT_WAIT seconds (default LEASE + HEARTBEAT: a replica restarted right after a crash gets its slot
back once the dead one's lease has run out). More replicas than CA_REPLICAS: the extra ones then exit with an
error that says so (each identity needs a certificate, which the generator issues per CA_REPLICAS).

The native runner sets CA_INSTANCE=<n> for each replica it starts: no claim, the slot is the runner's to give.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from dataclasses import dataclass, field

from sqlalchemy import Integer, String, delete, select, update
from sqlalchemy.orm import Mapped, mapped_column

from pki.authority import utcnow
from pki.config import Settings
from pki.inventory import Inventory, UTCDateTime

from .acme_store import ACME, AcmeBase

log = logging.getLogger(__name__)

LEASE = dt.timedelta(seconds=30)
HEARTBEAT = 10.0
# The migration component that owns the table (ca/migrations, with the ACME tables).
COMPONENT = ACME


class SlotError(RuntimeError):
    """No identity for this replica; the message says what to change."""


class CASlot(AcmeBase):
    __tablename__ = "ca_slots"

    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    holder: Mapped[str] = mapped_column(String(64))
    heartbeat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


@dataclass
class Slot:
    number: int
    inventory: Inventory | None = None
    holder: str = field(default_factory=lambda: secrets.token_hex(16))
    heartbeat_interval: float = HEARTBEAT

    @property
    def name(self) -> str:
        return f"ca-{self.number}"

    def heartbeat(self) -> None:
        if self.inventory is None:
            return
        with self.inventory.session() as session:
            renewed = session.execute(
                update(CASlot)
                .where(CASlot.slot == self.number, CASlot.holder == self.holder)
                .values(heartbeat_at=utcnow())
            ).rowcount
        if not renewed:  # we stalled past the lease and another replica took the slot: it is the identity now
            raise SlotError(f"{self.name}: the slot was taken over by another replica (this one stalled)")

    def release(self) -> None:
        if self.inventory is None:
            return
        try:
            with self.inventory.session() as session:
                session.execute(delete(CASlot).where(CASlot.slot == self.number, CASlot.holder == self.holder))
        finally:
            self.inventory.close()


def claim_slot(
    settings: Settings, instance: str | None = None, wait: float = LEASE.total_seconds() + HEARTBEAT
) -> Slot:
    """CA_INSTANCE=<n> as given (the native runner's), else the first free slot in the database, waiting up to
    `wait` seconds for one (a replica restarted right after a crash waits for its old lease to run out)."""
    if instance and instance.strip():
        raw = instance.strip()
        if not raw.isdigit() or not 1 <= int(raw) <= settings.ca_replicas:
            raise SlotError(f"CA_INSTANCE={raw!r} must be a number from 1 to CA_REPLICAS ({settings.ca_replicas})")
        return Slot(int(raw))
    inventory = Inventory(settings.effective_database_url)
    from pki import migrate

    migrate.upgrade(inventory.engine, COMPONENT)
    deadline = time.monotonic() + wait
    while True:
        slot = _try_claim(inventory, settings.ca_replicas)
        if slot is not None:
            log.info("claimed the CA identity %s", slot.name)
            return slot
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
    inventory.close()
    raise SlotError(
        f"all {settings.ca_replicas} CA identities (ca-1 ... ca-{settings.ca_replicas}) are held by "
        "running replicas: raise CA_REPLICAS in .env and run ./setup.sh certs (each replica needs "
        "its own certificate), or scale down"
    )


def _try_claim(inventory: Inventory, replicas: int) -> Slot | None:
    """One transaction: the lowest slot nobody holds (or whose lease ran out), taken; None when all are held."""
    slot = Slot(0, inventory)
    now = utcnow()
    with inventory.session() as session:
        held = {row.slot: row for row in session.scalars(select(CASlot))}
        free = [n for n in range(1, replicas + 1) if n not in held or held[n].heartbeat_at < now - LEASE]
        if not free:
            return None
        slot.number = free[0]
        session.execute(delete(CASlot).where(CASlot.slot == slot.number))
        session.add(CASlot(slot=slot.number, holder=slot.holder, heartbeat_at=now))
    return slot

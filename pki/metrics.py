"""The lab's Prometheus metrics: every family defined here, once, for every process that serves them.

- Counters and the latency histogram are per process (`CAMetrics`, held by the `CAService` of that process):
  Prometheus scrapes each instance and sums them (`sum by (transport) (rate(...))`), the standard model, so
  several CA replicas or a split-off `python -m ca` need nothing shared.
- Facts that live in the database or the CA's files (the earliest certificate expiry, certificates by state, the
  CRL's next update) are computed at scrape time by `InventoryCollector`, so they are right whichever replica
  answers; so are the MQTT connection state and the ingest counts of the process that owns them (collectors
  over plain callables: `MqttCollector`, `IngestCollector`).
- Each app registers on its own `CollectorRegistry` (`new_registry()`), never the global default one: many apps
  in one test process must not collide, and a library import must not add series to somebody else's /metrics.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from .inventory import ACTIVE, CertificateRecord, Inventory

# No `_created` series beside every counter: Prometheus does not need them, and they double the scrape.
disable_created_metrics()

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "iotca"
# The ways a request reaches the CA: the HTTP API, MQTT (ssl/sign, ssl/create, ssl/renew/<CN>), EST, ACME, and the
# `iotca` command line (HTTP with its own User-Agent). Every series of the CA counters carries one of these.
TRANSPORTS = ("http", "mqtt", "est", "acme", "cli")
# Issuance kinds (pki/issuance.py) that renew an entity's certificate rather than issue a first or another one.
RENEWALS = frozenset({"resign", "renew"})
ISSUED_KINDS = ("csr", "create", "acme")
# Seconds: a CSR signed with an EC key takes ~1 ms, an RSA key generated for `create` 50-150 ms, a request waiting
# for the database's write lock under a storm longer.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A refusal's `reason` label: the contract's status codes as words (a bounded set, never the message).
REFUSAL_REASONS = {
    400: "invalid_request",
    403: "forbidden",
    404: "unknown_entity",
    409: "protected_name",
    413: "too_large",
    415: "not_json",
    429: "locked_out",
    503: "unavailable",
    500: "internal_error",
}
FORBIDDEN_BY_FIELD = {"pass": "wrong_passphrase", "token": "bad_token"}


def new_registry() -> CollectorRegistry:
    """A private registry for one app (with no process or platform collectors: one family list per app)."""
    return CollectorRegistry(auto_describe=True)


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (CONTENT_TYPE)."""
    return generate_latest(registry)


def refusal_reason(status: int, field: str | None) -> str:
    if status == 403 and field in FORBIDDEN_BY_FIELD:
        return FORBIDDEN_BY_FIELD[field]
    return REFUSAL_REASONS.get(status, f"http_{status}")


class CAMetrics:
    """The CA's counters and its latency histogram; `registry=None` keeps them out of every registry (a CAService
    made outside an app, e.g. in tests of the service alone, still counts, and nobody scrapes it)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        def counter(name: str, documentation: str, labels: tuple[str, ...]) -> Counter:
            return Counter(f"{PREFIX}_{name}", documentation, labels, registry=registry)

        self.issued_total = counter(
            "certificates_issued",
            "Certificates issued (a first or another certificate "
            "of an entity; renewals are counted apart), by transport and kind: csr (the "
            "caller's CSR), create (a key the CA made), acme (a server certificate).",
            ("transport", "kind"),
        )
        self.renewed_total = counter(
            "certificates_renewed",
            "Certificates renewed: a device's renewal with its "
            "current certificate (ssl/renew/<CN>, EST simplereenroll), or a stored key "
            "re-signed (sign without a CSR), by transport.",
            ("transport",),
        )
        self.revoked_total = counter(
            "certificates_revoked",
            "Certificates revoked (each serial once), by transport and RFC 5280 reason.",
            ("transport", "reason"),
        )
        self.refused_total = counter(
            "ca_requests_refused",
            "CA requests refused, by transport, operation and "
            "reason (the status code as a word; wrong_passphrase, bad_token for 403s).",
            ("transport", "operation", "reason"),
        )
        self.lockouts_total = counter(
            "lockouts",
            "Requesters locked out: the wrong passphrase or token that "
            "reached the limit (5 in 15 minutes per requester, 50 per source), by "
            "transport.",
            ("transport",),
        )
        self.latency = Histogram(
            f"{PREFIX}_ca_request_duration_seconds",
            "Time the CA took to answer a request (validate, authorise, sign, record), by transport and operation.",
            ("transport", "operation"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Known series start at 0, so a rate() over them works from the first scrape on.
        for transport in TRANSPORTS:
            self.renewed_total.labels(transport)
            self.lockouts_total.labels(transport)
            for kind in ISSUED_KINDS:
                self.issued_total.labels(transport, kind)

    def issued(self, kind: str, transport: str) -> None:
        if kind in RENEWALS:
            self.renewed_total.labels(transport).inc()
        else:
            self.issued_total.labels(transport, kind).inc()

    def revoked(self, count: int, reason: str, transport: str) -> None:
        if count:
            self.revoked_total.labels(transport, reason).inc(count)

    def answered(self, operation: str, transport: str, status: int, field: str | None, seconds: float) -> None:
        self.latency.labels(transport, operation).observe(seconds)
        if status >= 400:
            self.refused_total.labels(transport, operation, refusal_reason(status, field)).inc()

    def locked_out(self, transport: str) -> None:
        self.lockouts_total.labels(transport).inc()


class _ScrapeTimeCollector(Collector):
    """A collector whose families are computed at each scrape: nothing to describe ahead of it."""

    def describe(self) -> list[Metric]:
        return []  # families depend on the data (no CRL: no CRL sample); nothing to check at registration


class InventoryCollector(_ScrapeTimeCollector):
    """Computed at scrape time from the inventory and the CRL file, so any replica gives the same answer."""

    def __init__(
        self,
        inventory: Inventory,
        crl_path: Path,
        renew_before_days: int,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.inventory = inventory
        self.crl_path = crl_path
        self.renew_before = dt.timedelta(days=renew_before_days)
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        earliest = GaugeMetricFamily(
            f"{PREFIX}_certificate_earliest_expiry_days",
            "Days until the earliest expiry among the current (active, unexpired) certificates, the root included.",
        )
        states = GaugeMetricFamily(
            f"{PREFIX}_certificates",
            "Certificates in the inventory by state: valid, "
            "expiring (inside RENEW_BEFORE_DAYS), expired (still current), revoked, "
            "superseded.",
            labels=["state"],
        )
        with self.inventory.reading() as session:
            by_status = dict(
                session.execute(select(CertificateRecord.status, func.count()).group_by(CertificateRecord.status)).all()
            )
            active = CertificateRecord.status == ACTIVE
            expired = session.scalar(select(func.count()).where(active, CertificateRecord.not_after <= now)) or 0
            expiring = (
                session.scalar(
                    select(func.count()).where(
                        active, CertificateRecord.not_after > now, CertificateRecord.not_after < now + self.renew_before
                    )
                )
                or 0
            )
            soonest = session.scalar(
                select(func.min(CertificateRecord.not_after)).where(active, CertificateRecord.not_after > now)
            )
        states.add_metric(["valid"], by_status.get(ACTIVE, 0) - expired - expiring)
        states.add_metric(["expiring"], expiring)
        states.add_metric(["expired"], expired)
        for status in ("revoked", "superseded"):
            states.add_metric([status], by_status.get(status, 0))
        yield states
        if soonest is not None:
            earliest.add_metric([], (soonest - now).total_seconds() / 86400)
            yield earliest
        next_update = crl_next_update(self.crl_path)
        if next_update is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_crl_next_update_timestamp_seconds",
                "When the CRL the broker enforces must be replaced (Unix time); past it, "
                "Mosquitto refuses every client.",
                value=next_update.timestamp(),
            )


def crl_next_update(path: Path) -> dt.datetime | None:
    try:
        return x509.load_pem_x509_crl(path.read_bytes()).next_update_utc
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, as the registry keys them
class MqttCollector(_ScrapeTimeCollector):
    """The MQTT connection of this process (`status()` as MqttBridge.status gives it) as a 0/1 gauge."""

    client: str
    status: Callable[[], Mapping[str, Any]]

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            f"{PREFIX}_mqtt_connected",
            "1 while this process's MQTT connection to the broker is up, 0 while it is down or reconnecting.",
            labels=["client"],
        )
        gauge.add_metric([self.client], 1.0 if self.status().get("connected") else 0.0)
        yield gauge


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, as the registry keys them
class IngestCollector(_ScrapeTimeCollector):
    """What the telemetry ingest of this process counted (read at scrape: no lock or call on the message path).

    `counts()` returns {"messages", "readings", "rejected"} totals since the process started, and `online()`
    the number of devices whose retained presence says online.
    """

    counts: Callable[[], Mapping[str, int]]
    online: Callable[[], int]

    def collect(self) -> Iterator[Metric]:
        counts = self.counts()
        yield CounterMetricFamily(
            f"{PREFIX}_mqtt_messages_received",
            "MQTT messages this process received (telemetry, presence, CA traffic).",
            value=counts["messages"],
        )
        yield CounterMetricFamily(
            f"{PREFIX}_readings_ingested",
            "Valid thermometer readings ingested (stored and shown).",
            value=counts["readings"],
        )
        yield CounterMetricFamily(
            f"{PREFIX}_messages_rejected",
            "Telemetry or presence messages refused as malformed.",
            value=counts["rejected"],
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_devices_online", "Devices whose retained presence is online.", value=self.online()
        )


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, as the registry keys them
class ReplicaCollector(_ScrapeTimeCollector):
    """The counters of other processes (the CA replicas: their `CAMetrics`), re-exposed here with a label naming
    the process, so one scrape of the dashboard shows every replica's (`sum without (ca)` adds them up).

    `fetch()` returns (replica label, its metrics in the text format, or None while it does not answer); a
    replica's families are merged with the same families of the others, and `iotca_ca_replica_up` says which
    answered.
    """

    fetch: Callable[[], list[tuple[str, bytes | None]]]
    label: str = "ca"

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{PREFIX}_ca_replica_up", "1 when the CA replica answered this scrape.", labels=[self.label]
        )
        families: dict[str, Metric] = {}
        for replica, text in self.fetch():
            up.add_metric([replica], 0.0 if text is None else 1.0)
            if text is None:
                continue
            for parsed in text_string_to_metric_families(text.decode()):
                family = families.setdefault(parsed.name, Metric(parsed.name, parsed.documentation, parsed.type))
                for sample in parsed.samples:
                    family.add_sample(sample.name, {**sample.labels, self.label: replica}, sample.value)
        yield up
        yield from families.values()

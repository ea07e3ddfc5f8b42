"""The lab's own certificates: root, broker, dashboard, provisioner and devices, kept current idempotently.

Used by the generator CLI, `./setup.sh`, the native runner and the tests.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509

from .authority import (
    CAError,
    CertificateAuthority,
    LeafNames,
    WrongPassphrase,
    days_left,
    generate_private_key,
    load_private_key,
    public_key_matches,
    serial_hex,
    subject_alt_names,
    utcnow,
    verify_leaf,
)
from .broker import (
    CRL_REFRESH_BEFORE,
    BrokerFiles,
    ca_identities,
    crl_revocations,
    reload_broker,
    write_broker_configs,
    write_broker_policy,
)
from .config import ConfigError, Settings, revoked_next_step
from .entity_files import EntityFiles
from .inventory import REVOKED as REVOKED_STATUS
from .inventory import SUPERSEDED as SUPERSEDED_STATUS
from .inventory import Inventory
from .lab_files import cert_sans, load_crl, read_cert, read_key, revoked_in_inventory, san_set
from .profiles import BROKER, CA_SERVICE, DASHBOARD, DEVICE, INGEST, PROVISIONER, ROOT_CA, ROOT_CA_DAYS, Profile
from .status import EXPIRED, EXPIRING, INVALID, MISSING, VALID, expiry_state
from .store import CERT_MODE, KEY_MODE, CertsLayout, atomic_write, ensure_dir, exclusive_lock, read_optional

ROOT_NAME = "root_ca"

REVOKED = "revoked"


@dataclass(frozen=True)
class Entity:
    name: str
    profile: Profile
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()


@dataclass
class EntityResult:
    name: str
    role: str
    action: str  # created | renewed | kept
    reason: str
    days_left: float
    serial: str
    not_after: dt.datetime

    def line(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.name:<14} {self.action:<8} {self.days_left:7.1f} days left  serial {self.serial[:16]}{why}"


@dataclass
class CheckRow:
    name: str
    role: str
    status: str
    subject: str = ""
    serial: str = ""
    not_after: dt.datetime | None = None
    days_left: float | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == VALID


@dataclass
class GenerateReport:
    results: list[EntityResult] = field(default_factory=list)
    new_root: bool = False


def lab_entities(settings: Settings, devices: Sequence[str] | None = None) -> list[Entity]:
    """Everything the generator keeps: the broker, the dashboard, the CA replicas (`ca-1` .. `ca-<CA_REPLICAS>`),
    the provisioner, the telemetry ingest identities (`ingest-1` .. `ingest-<INGEST_REPLICAS>`) and each device."""
    broker_names = [*settings.broker_sans]
    if settings.broker_address:
        broker_names.append(settings.broker_address)
    entities = [
        Entity("mosquitto", BROKER, dns_names=tuple(broker_names)),
        Entity("dashboard", DASHBOARD),
        *(Entity(name, CA_SERVICE) for name in ca_identities(settings.ca_replicas)),
        Entity("provisioner", PROVISIONER),
        *(Entity(name, INGEST) for name in settings.ingest_identities),
    ]
    entities += [Entity(device, DEVICE) for device in (devices if devices is not None else settings.devices)]
    return entities


class LabCertificates:
    """Load-or-create the root, then keep each lab entity's certificate current."""

    def __init__(self, settings: Settings, progress: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.layout = CertsLayout(settings.certs_dir)
        self.files = EntityFiles(self.layout)
        self.progress = progress or (lambda _msg: None)

    # -- the root -------------------------------------------------------------------------------

    def _root(self, now: dt.datetime) -> tuple[CertificateAuthority, EntityResult | None]:
        """Unlock (or create) the root; returns a result only when something must be written."""
        settings = self.settings
        key_data = read_optional(self.layout.ca_key)
        cert, cert_problem = read_cert(self.layout.ca_cert)
        if key_data is not None:
            if not settings.ca_passphrase:
                raise WrongPassphrase("CA_PASSPHRASE is not set")
            key = load_private_key(key_data, settings.ca_passphrase)
            reason = ""
            if cert is None:
                reason = f"{cert_problem} root certificate, re-signed with the existing key"
            elif not public_key_matches(cert, key):
                raise CAError(
                    f"{self.layout.ca_key} does not belong to {self.layout.ca_cert}; restore the pair from a backup, "
                    f"or delete {self.layout.ca_dir} to start a new CA (every certificate is then reissued)"
                )
            elif expiry_state(days_left(cert, now), settings.renew_before_days) != VALID:
                reason = f"expires in {days_left(cert, now):.0f} days, re-signed with the existing key"
            if not reason:
                assert cert is not None
                return CertificateAuthority(cert, key), None
            ca = CertificateAuthority.create(private_key=key, days=ROOT_CA_DAYS, now=now)
            return ca, self._result(ROOT_NAME, ROOT_CA, "renewed", reason, ca.certificate, now)
        if not settings.ca_passphrase:
            raise ConfigError("CA_PASSPHRASE is not set: run ./setup.sh (it writes one into .env) or export it")
        reason = "new root" if cert is None else "root key missing, new root"
        ca = CertificateAuthority.create(key_type=settings.key_type, days=ROOT_CA_DAYS, now=now)
        return ca, self._result(ROOT_NAME, ROOT_CA, "created", reason, ca.certificate, now)

    @staticmethod
    def _result(
        name: str, profile: Profile, action: str, reason: str, cert: x509.Certificate, now: dt.datetime
    ) -> EntityResult:
        return EntityResult(
            name, profile.role, action, reason, days_left(cert, now), serial_hex(cert), cert.not_valid_after_utc
        )

    # -- leaves ---------------------------------------------------------------------------------

    def _leaf_problem(self, ca: CertificateAuthority, entity: Entity, now: dt.datetime) -> tuple[str, str]:
        """(action, reason) for one entity: kept with no reason, or why it must be (re)issued."""
        cert, problem = read_cert(self.layout.cert(entity.name))
        key_exists = self.layout.key(entity.name).exists()
        if cert is None and problem == "missing" and not key_exists:
            return "created", ""
        if cert is None:
            return "renewed", problem
        key, key_problem = read_key(self.layout.key(entity.name))
        if key is None:
            return "renewed", key_problem
        if not public_key_matches(cert, key):  # type: ignore[arg-type]
            return "renewed", "key does not match certificate"
        if not ca.issued(cert):
            return "renewed", "not from the current root"
        left = days_left(cert, now)
        state = expiry_state(left, self.settings.renew_before_days)
        if state != VALID:
            return "renewed", EXPIRED if state == EXPIRED else f"expires in {left:.0f} days"
        wanted = subject_alt_names(entity.profile, entity.name, entity.dns_names, entity.ip_addresses)
        if san_set(wanted) != cert_sans(cert):
            return "renewed", "names changed"
        return "kept", ""

    def _issue_leaf(self, ca: CertificateAuthority, entity: Entity, now: dt.datetime) -> x509.Certificate:
        key = generate_private_key(self.settings.key_type)
        cert = ca.issue(
            key.public_key(),
            entity.profile,
            LeafNames(entity.name, entity.dns_names, entity.ip_addresses),
            days=self.settings.cert_days,
            now=now,
        )
        self.files.write(entity.name, cert, ca.cert_pem, key)
        return cert

    # -- the whole run --------------------------------------------------------------------------

    def generate(
        self, devices: Sequence[str] | None = None, force: bool = False, reissue_revoked: bool = False
    ) -> GenerateReport:
        """Bring every lab certificate up to date. Wrong passphrase: raises before writing anything.

        A revoked certificate is reported as `revoked` and left alone (the revocation was meant), unless
        `reissue_revoked` (the CLI names the device in --devices) or `force`.
        """
        settings = self.settings
        if settings.renew_before_days >= settings.cert_days:
            raise ConfigError(
                f"RENEW_BEFORE_DAYS ({settings.renew_before_days}) must be smaller than CERT_DAYS "
                f"({settings.cert_days}), or every run would renew every certificate"
            )
        entities = lab_entities(settings, devices)
        report = GenerateReport()
        settings.certs_dir.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.layout.lock):
            now = utcnow()
            self.progress("Unlocking the root CA" if self.layout.ca_key.exists() else "Creating the root CA")
            ca, root_result = self._root(now)
            inventory = Inventory(settings.effective_database_url)
            try:
                if root_result is not None:
                    ensure_dir(self.layout.ca_dir)
                    assert settings.ca_passphrase
                    atomic_write(self.layout.ca_key, ca.encrypted_key_pem(settings.ca_passphrase), KEY_MODE)
                    atomic_write(self.layout.ca_cert, ca.cert_pem, CERT_MODE)
                    report.new_root = root_result.action == "created"
                    report.results.append(root_result)
                else:
                    report.results.append(self._result(ROOT_NAME, ROOT_CA, "kept", "", ca.certificate, now))
                self.progress(report.results[-1].line())
                inventory.record_issued(ca.certificate, name=ROOT_NAME, role=ROOT_CA.role, via="cli")
                broker_files = BrokerFiles(settings.certs_dir, settings.data_dir)
                in_crl = {
                    serial_hex(s)
                    for path in (broker_files.crl, broker_files.broker_crl)
                    for s in crl_revocations(path, ca)
                }
                for entity in entities:
                    action, reason = self._leaf_problem(ca, entity, now)
                    if action == "kept":
                        cert, _ = read_cert(self.layout.cert(entity.name))
                        assert cert is not None
                        record = inventory.by_serial(serial_hex(cert))
                        if serial_hex(cert) in in_crl or (record is not None and record.status == REVOKED_STATUS):
                            if force or reissue_revoked:
                                action, reason = "renewed", "revoked"
                            else:  # recorded (an import is a no-op when known), then marked revoked below
                                inventory.record_issued(cert, name=entity.name, role=entity.profile.role, via="import")
                                result = self._result(
                                    entity.name, entity.profile, "revoked", revoked_next_step(entity.name), cert, now
                                )
                                report.results.append(result)
                                self.progress(result.line())
                                continue
                    if action == "kept" and force:
                        action, reason = "renewed", "forced"
                    if action == "kept":
                        cert, _ = read_cert(self.layout.cert(entity.name))
                        assert cert is not None
                        inventory.record_issued(cert, name=entity.name, role=entity.profile.role, via="import")
                        self.files.write_root_copy(entity.name, ca.cert_pem)  # the root may have been re-signed
                    else:
                        replaced, _ = read_cert(self.layout.cert(entity.name))
                        if replaced is not None and ca.issued(replaced):
                            # Known to the inventory (a no-op) or recorded now: the new key supersedes it, and after
                            # the grace it goes on the CRL like any superseded certificate.
                            inventory.record_issued(replaced, name=entity.name, role=entity.profile.role, via="import")
                        cert = self._issue_leaf(ca, entity, now)
                        inventory.record_issued(cert, name=entity.name, role=entity.profile.role, via="cli")
                    result = self._result(entity.name, entity.profile, action, reason, cert, now)
                    report.results.append(result)
                    self.progress(result.line())
                revoked = self._merge_crl_revocations(inventory, broker_files, ca)
                configs = write_broker_configs(settings)
                written = (
                    write_broker_policy(
                        settings,
                        ca,
                        revoked,
                        inventory.denied_names(),
                        force_crl=report.new_root,
                        collectors=inventory.collectors(),
                    )
                    or configs
                )
                if written:
                    self.progress(f"Broker config, ACL and CRL written under {settings.certs_dir}")
                # Mosquitto 2.0.11 loads its own certificate again on SIGHUP too (tests/test_rotation.py); in Docker
                # the broker container sends itself one when the files change (mosquitto/entrypoint.sh).
                if written or any(r.name == "mosquitto" and r.action != "kept" for r in report.results):
                    reload_broker(broker_files)
            finally:
                inventory.close()
        return report

    def _merge_crl_revocations(
        self, inventory: Inventory, broker_files: BrokerFiles, ca: CertificateAuthority
    ) -> list[tuple[int, dt.datetime, str | None]]:
        """Revocations = the inventory's (with superseded certificates past their grace) plus those in the
        current CRL: a revocation is never undone by regenerating with another inventory (say, the host's after
        a Docker run). A certificate this inventory knows as superseded stays superseded."""
        listed = {**crl_revocations(broker_files.broker_crl, ca), **crl_revocations(broker_files.crl, ca)}
        if listed:
            superseded = {int(r.serial, 16) for r in inventory.list(status=SUPERSEDED_STATUS)}
            with inventory.session() as session:
                imported = inventory.revoke(
                    [serial_hex(s) for s in listed if s not in superseded], "recorded in the CRL", session
                )
            if imported:
                self.progress(f"{len(imported)} revocation(s) found in the current CRL recorded in the inventory")
        merged = {
            serial: (when, reason)
            for serial, when, reason in inventory.revoked_serials(superseded_grace=self.settings.superseded_grace)
        }
        for serial, when in listed.items():
            merged.setdefault(serial, (when, None))
        return sorted((serial, when, reason) for serial, (when, reason) in merged.items())

    # -- checking (no passphrase needed) --------------------------------------------------------

    def check(self, devices: Sequence[str] | None = None, now: dt.datetime | None = None) -> list[CheckRow]:
        now = now or utcnow()
        rows: list[CheckRow] = []
        root, problem = read_cert(self.layout.ca_cert)
        if root is None:
            rows.append(CheckRow(ROOT_NAME, ROOT_CA.role, MISSING if problem == "missing" else INVALID, detail=problem))
        else:
            rows.append(self._check_row(ROOT_NAME, ROOT_CA.role, root, None, now))
        for entity in lab_entities(self.settings, devices):
            cert, problem = read_cert(self.layout.cert(entity.name))
            if cert is None:
                status = MISSING if problem == "missing" else INVALID
                rows.append(CheckRow(entity.name, entity.profile.role, status, detail=problem))
                continue
            row = self._check_row(entity.name, entity.profile.role, cert, root, now)
            if row.status in (VALID, EXPIRING):
                key, key_problem = read_key(self.layout.key(entity.name))
                if key is None or not public_key_matches(cert, key):  # type: ignore[arg-type]
                    row.status, row.detail = INVALID, key_problem or "key does not match certificate"
            rows.append(row)
        self._mark_revoked(rows, root)
        return rows

    def _mark_revoked(self, rows: list[CheckRow], root: x509.Certificate | None) -> None:
        """The dashboard's rule: a revoked certificate is `revoked`, whatever its dates. Revoked means marked so in
        the inventory, or listed in the CRL the broker enforces (which also covers a Docker run's inventory)."""
        revoked = revoked_in_inventory(self.settings.effective_database_url, [r.serial for r in rows if r.serial])
        files = BrokerFiles(self.settings.certs_dir, self.settings.data_dir)
        crls = [load_crl(path, root)[0] for path in (files.crl, files.broker_crl)]
        for entry in [entry for crl in crls for entry in crl or ()]:
            revoked.setdefault(serial_hex(entry.serial_number), (entry.revocation_date_utc, "listed in the CRL"))
        for row in rows:
            if row.serial in revoked and row.status in (VALID, EXPIRING, EXPIRED):
                when, reason = revoked[row.serial]
                row.status = REVOKED
                row.detail = f"revoked on {when.strftime('%Y-%m-%d') if when else '?'} ({reason})"

    def check_crl(self, now: dt.datetime | None = None) -> CheckRow:
        """The broker's CRL: `expiring` once inside its refresh window (the running dashboard, or the generator,
        rewrites it then), `expired` past its next update, when Mosquitto refuses every client."""
        now = now or utcnow()
        path = BrokerFiles(self.settings.certs_dir, self.settings.data_dir).crl
        root, _ = read_cert(self.layout.ca_cert)
        crl, problem = load_crl(path, root)
        if crl is None:
            what = "is missing" if problem == MISSING else "is not a CRL of the current root"
            return CheckRow("CRL", "crl", problem, detail=f"{path} {what}: run ./setup.sh certs")
        next_update = crl.next_update_utc
        try:
            number = str(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
        except x509.ExtensionNotFound:
            number = ""
        left = (next_update - now).total_seconds() / 86400 if next_update else None
        row = CheckRow(
            "CRL", "crl", VALID, f"CRL number {number or '?'}, {len(list(crl))} revoked", number, next_update, left
        )
        state = EXPIRED if left is None else expiry_state(left, CRL_REFRESH_BEFORE.total_seconds() / 86400)
        if state == EXPIRED:
            row.status, row.detail = EXPIRED, "the broker refuses every client until it is rewritten: ./setup.sh certs"
        elif state == EXPIRING:
            row.status, row.detail = (
                EXPIRING,
                ("due for refresh: the running dashboard rewrites it within the hour, or run ./setup.sh certs"),
            )
        return row

    def _check_row(
        self, name: str, role: str, cert: x509.Certificate, root: x509.Certificate | None, now: dt.datetime
    ) -> CheckRow:
        left = days_left(cert, now)
        row = CheckRow(
            name, role, VALID, cert.subject.rfc4514_string(), serial_hex(cert), cert.not_valid_after_utc, left
        )
        issuer = root if root is not None else cert
        state = expiry_state(left, self.settings.renew_before_days)
        if not verify_leaf(issuer, cert):
            row.status, row.detail = INVALID, "not signed by the current root" if root is not None else "bad signature"
        elif state == EXPIRED:
            row.status, row.detail = EXPIRED, f"expired {-left:.0f} days ago"
        elif cert.not_valid_before_utc > now:
            row.status, row.detail = INVALID, "not valid yet"
        elif state == EXPIRING:
            row.status, row.detail = EXPIRING, f"inside the {self.settings.renew_before_days}-day renewal window"
        return row

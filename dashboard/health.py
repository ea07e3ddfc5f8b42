"""`/healthz` (public: 200 healthy, 503 degraded, the reasons in the body) and `/metrics` (Prometheus text format,
for a logged-in viewer or an API token: Prometheus sends `Authorization: Bearer <viewer token>`).

Degraded means the lab cannot do its job right now: the MQTT connection this process runs is down, the database
does not answer, or the CRL the broker enforces is expired, missing or not the current root's (Mosquitto then
refuses every client, or checks no revocation). The compose healthcheck and `./setup.sh` wait on a 200.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from flask import Blueprint, Flask, Response, current_app, jsonify
from pydantic import BaseModel, Field

from pki.broker import BrokerFiles
from pki.metrics import CONTENT_TYPE, IngestCollector, InventoryCollector, MqttCollector, ReplicaCollector, exposition
from pki.status import EXPIRED, INVALID, MISSING

from .live import LiveHub
from .mqtt_bridge import MqttBridge

bp = Blueprint("health", __name__)

CRL_DEGRADED = (EXPIRED, INVALID, MISSING)


class MqttState(BaseModel):
    connected: bool
    broker: str = Field(description="host:port")
    since: float | None = Field(description="Unix time of the current connection.")
    last_error: str | None
    enabled: bool = Field(description="Whether this process runs an MQTT connection at all.")


class IngestState(BaseModel):
    connected: bool
    identity: str = Field(description="The ingest's broker identity, ingest-<n>.")
    filter: str = Field(description="The telemetry subscription ($share/ingest/... with replicas).")
    received: int
    last_error: str | None


class DatabaseState(BaseModel):
    ok: bool
    error: str | None
    readings_stored_since_start: int


class CrlState(BaseModel):
    status: str | None = Field(description="valid, expiring (due for refresh), expired, invalid or missing.")
    detail: str | None
    next_update: dt.datetime | None
    days_left: float | None


class Health(BaseModel):
    """The body of /healthz, 200 (ok) or 503 (degraded)."""

    status: Literal["ok", "degraded"]
    reasons: list[str] = Field(description="Why it is degraded, one line each; empty when ok.")
    mqtt: MqttState
    ingest: IngestState | None = Field(description="The telemetry ingest this process runs (none: not started).")
    db: DatabaseState
    crl: CrlState


def health_report(app: Flask) -> dict[str, Any]:
    """The /healthz body: `status` ok or degraded, `reasons` (one line each), and each part's own state."""
    bridge: MqttBridge = app.extensions["mqtt_bridge"]
    hub: LiveHub = app.extensions["live_hub"]
    mqtt = {**bridge.status(), "enabled": bridge.started}
    ingest = app.extensions.get("ingest")
    ingest_running = ingest is not None and ingest.client is not None
    ingest_state = ingest.status() if ingest_running else None
    db = hub.health()
    crl = hub.certificates.crl()
    reasons = []
    if bridge.started and not mqtt["connected"]:
        reasons.append(
            f"mqtt: not connected to {mqtt['broker']}" + (f" ({mqtt['last_error']})" if mqtt["last_error"] else "")
        )
    if ingest_state is not None and not ingest_state["connected"]:
        reasons.append(
            f"ingest: {ingest_state['identity']} not connected"
            + (f" ({ingest_state['last_error']})" if ingest_state["last_error"] else "")
        )
    if not db["ok"]:
        reasons.append(f"database: {db['error']}")
    if crl.get("status") in CRL_DEGRADED:
        reasons.append(f"crl: {crl['status']}: {crl.get('detail') or crl.get('error')}")
    return Health(
        status="degraded" if reasons else "ok",
        reasons=reasons,
        mqtt=mqtt,
        ingest=ingest_state,
        db=db,
        crl={key: crl.get(key) for key in ("status", "detail", "next_update", "days_left")},
    ).model_dump(mode="json")


@bp.get("/healthz")
def healthz() -> Response:
    report = health_report(current_app)
    response = jsonify(report)
    response.status_code = 200 if report["status"] == "ok" else 503
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/metrics")
def metrics() -> Response:
    body = exposition(current_app.extensions["metrics_registry"])
    return Response(body, headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"})


def init_app(app: Flask) -> None:
    """Register the scrape-time collectors of this process on the app's registry, the CA replicas' counters
    among them (`ReplicaCollector`)."""
    registry = app.extensions["metrics_registry"]
    bridge: MqttBridge = app.extensions["mqtt_bridge"]
    hub: LiveHub = app.extensions["live_hub"]
    settings = app.extensions["lab_settings"]
    registry.register(MqttCollector(bridge.name, bridge.status))
    registry.register(IngestCollector(hub.counts, hub.devices_online))
    crl = BrokerFiles(settings.certs_dir, settings.data_dir).crl
    registry.register(InventoryCollector(hub.certificates.inventory, crl, settings.renew_before_days))
    # The CA's counters live in the CA replicas (python -m ca): fetched from each at scrape time.
    client = app.extensions["ca_client"]
    registry.register(ReplicaCollector(lambda: client.each("/v1/metrics")))
    app.register_blueprint(bp)

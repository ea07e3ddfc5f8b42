"""Which services the native lab starts (lab/native_runner.py starts, supervises and stops them): Mosquitto, the CA
replicas, the dashboard, one thermometer per device; each with its command line and its environment."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ca.internal import internal_port
from pki.broker import BrokerFiles, broker_command
from pki.config import PROJECT_ROOT, Settings, lab_environ

from .enrolment import default_ca_url
from .mqtt import Identity
from .supervisor import Service, child_env


def build_services(
    settings: Settings,
    devices: Sequence[str],
    *,
    dashboard: bool,
    base_env: dict[str, str] | None = None,
    enrol: dict[str, str | None] | None = None,
) -> list[Service]:
    """Mosquitto, the CA replicas and the dashboard (when asked and present), one thermometer per device, in
    start order.

    The CA replicas (`python -m ca`, CA_REPLICAS of them) come before the dashboard, each as `ca-<n>`
    (CA_INSTANCE) with its own internal port (CA_INTERNAL_PORT + n - 1); the first also serves EST and ACME on
    CA_HTTPS_PORT. The dashboard gets their URLs (CA_URLS) and no CA_PASSPHRASE.
    `enrol`: devices that enrol themselves, each with its token (None: it already has a certificate).
    """
    base = dict(os.environ if base_env is None else base_env)
    files = BrokerFiles(settings.certs_dir, settings.data_dir)
    services = [Service("mosquitto", "broker", broker_command(files), child_env(base))]
    if dashboard and (PROJECT_ROOT / "dashboard" / "__main__.py").exists():
        first_port = internal_port(lab_environ() if base_env is None else base)
        urls = []
        for n in range(1, settings.ca_replicas + 1):
            port = first_port + n - 1
            urls.append(f"http://127.0.0.1:{port}")
            env = child_env(
                base,
                CA_INSTANCE=str(n),
                CA_INTERNAL_PORT=str(port),
                CA_INTERNAL_HOST="127.0.0.1",
                **({} if n == 1 else {"CA_HTTPS_PORT": "0"}),
            )
            services.append(Service(f"ca-{n}", "ca", [sys.executable, "-m", "ca"], env))
        dashboard_env = {k: v for k, v in base.items() if k != "CA_PASSPHRASE"}
        services.append(
            Service(
                "dashboard",
                "dashboard",
                [sys.executable, "-m", "dashboard"],
                child_env(dashboard_env, CA_URLS=",".join(urls)),
            )
        )
    device_base = {k: v for k, v in base.items() if k not in ("CA_PASSPHRASE", "ENROL_TOKEN")}  # never needed
    enrol = enrol or {}
    for device in [*devices, *(d for d in enrol if d not in devices)]:
        identity = Identity.of(settings.certs_dir, device)
        extra = {}
        if enrol.get(device):
            extra = {"ENROL_TOKEN": enrol[device] or "", "CA_URL": default_ca_url(settings)}
        env = child_env(
            device_base,
            DEVICE_ID=device,
            CERTS_DIR=str(settings.certs_dir),
            CA_CERT_PATH=str(identity.ca_cert),
            CLIENT_CERT_PATH=str(identity.cert),
            CLIENT_KEY_PATH=str(identity.key),
            BROKER_ADDRESS=settings.broker_address,
            BROKER_PORT=str(settings.broker_port),
            PUBLISH_INTERVAL=f"{settings.publish_interval:g}",
            **extra,
        )
        services.append(Service(device, "device", [sys.executable, str(PROJECT_ROOT / "thermometer.py")], env))
    return services

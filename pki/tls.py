"""The lab's one TLS server policy: Mozilla's "intermediate" profile without DHE, for every server it runs.

TLS 1.3 with its three standard suites, and TLS 1.2 only with ECDHE key exchange and AEAD ciphers: no CBC, no
SHA-1 MAC, no RSA key exchange (https://wiki.mozilla.org/Security/Server_Side_TLS). Mosquitto's listener
(mosquitto/mosquitto.conf.template, rendered by pki/broker.py), the dashboard's HTTPS (`python -m dashboard`
and gunicorn in the image) and the CA's EST/ACME port all take their suites from here.
"""

from __future__ import annotations

import ssl
from pathlib import Path

TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
TLS13_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def apply_server_policy(context: ssl.SSLContext) -> ssl.SSLContext:
    """TLS 1.2 at least, and on TLS 1.2 only the suites above (Python's TLS 1.3 suites are already those three)."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    return context


def server_context(cert: Path | str, key: Path | str) -> ssl.SSLContext:
    """A TLS server context with the lab's policy and the given certificate."""
    context = apply_server_policy(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(str(cert), str(key))
    return context

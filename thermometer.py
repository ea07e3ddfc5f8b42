#!/usr/bin/env python3
"""One simulated thermometer: publishes its temperature to the lab's broker over mutual TLS.

Environment (or .env): DEVICE_ID, CA_CERT_PATH, CLIENT_CERT_PATH, CLIENT_KEY_PATH, BROKER_ADDRESS,
BROKER_PORT (8883), PUBLISH_INTERVAL (5); flags override them (see --help). With only DEVICE_ID the
certificate files default to certs/<DEVICE_ID>/. The device renews its own certificate over MQTT
(RENEW_CHECK_INTERVAL, RENEW_BEFORE_DAYS) and, with no certificate but ENROL_TOKEN (and CA_URL), enrols first.
Exit codes: 0 stopped by SIGTERM/Ctrl-C, 1 the CA could not be reached to enrol, 2 configuration or
certificate problem (one line on stderr naming the file), or an enrolment token the CA refused, 3 the
broker refuses the certificate as revoked (one log line says the next step; ON_REVOKED=wait waits for a
new certificate instead of exiting).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lab import device


def main(argv: Sequence[str] | None = None) -> int:
    return device.main(argv)


if __name__ == "__main__":
    sys.exit(main())

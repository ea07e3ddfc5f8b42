"""The CA service's standard enrolment protocols: EST (RFC 7030) for devices, ACME (RFC 8555) for servers.

Thin adapters over `pki.service.CAService` (decode, call, encode), served over HTTPS on a port of their own
(`ca.server`, CA_HTTPS_PORT). Today the dashboard's serving process starts them (`dashboard/__main__.py`);
when the CA becomes its own process (`python -m ca`), only that entry point changes.
"""

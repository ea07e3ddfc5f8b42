"""`iotca`: the lab's CA from the command line, through its HTTP API (the same routes curl and the page use).

    iotca certs [--name N] [--status S]        the inventory
    iotca create NAME [--cn ... --org ...]     a new key and certificate (written to --out, key 0600)
    iotca sign NAME --csr FILE                 a certificate for your CSR (the key never leaves you)
    iotca renew NAME                           re-sign the stored key of NAME (renewal)
    iotca revoke NAME | --serial S [--reason R]
    iotca token NAME [--ttl SECONDS]           a single-use enrolment token (shown once)
    iotca crl [--out FILE] [--der]             the CRL
    iotca status                               the CA's health and a count of certificates by status
    iotca users list|add|remove|role|passwd|token|revoke-token ...   dashboard users and API tokens (local)

Where it connects and with what: `--url` (default: the dashboard of `.env`, DASHBOARD_HOST/DASHBOARD_PORT),
the CA passphrase from CA_PASSPHRASE (`.env` or the environment) for the operations that need one, and an API
token (`--token`, or IOTCA_TOKEN) sent as `Authorization: Bearer` where the API asks for one. `--json` prints
the API's answer as JSON, for scripts. An error is one line that says what to do next; the exit code is 1 (2
for a usage error).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki.config import ConfigError, Settings
from pki.store import CERT_MODE, KEY_MODE, atomic_write

USER_AGENT = "iotca/1"  # the CA counts the CLI's requests as transport `cli` (pki/metrics.py)
LOOPBACK_HOSTS = {"", "0.0.0.0", "::", "127.0.0.1", "localhost", "::1"}  # noqa: S104 - bind-all means "this host"


class CLIError(Exception):
    """One line for the user: what went wrong and what to do next."""


@dataclass
class Client:
    """The CA's HTTP API at `url`."""

    url: str
    token: str | None = None
    cafile: Path | None = None

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, accept: str = "application/json"
    ) -> tuple[int, bytes]:
        headers = {"Accept": accept, "User-Agent": USER_AGENT}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(  # noqa: S310
            self.url.rstrip("/") + path,
            data=data,
            method=method,
            headers=headers,
        )
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]  # the lab is local
        if self.url.startswith("https:"):
            context = ssl.create_default_context(cafile=str(self.cafile) if self.cafile else None)
            handlers.append(urllib.request.HTTPSHandler(context=context))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as ex:
            return ex.code, ex.read()
        except (urllib.error.URLError, OSError) as ex:
            reason = getattr(ex, "reason", ex)
            raise CLIError(
                f"cannot reach the CA at {self.url} ({reason}); start the lab with ./setup.sh, "
                "or point --url (or IOTCA_URL) at it"
            ) from None

    def json(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        status, raw = self.request(method, path, body)
        try:
            return status, json.loads(raw) if raw else {}
        except ValueError:
            raise CLIError(
                f"the CA at {self.url} answered {status} with something that is not JSON; is --url the lab's dashboard?"
            ) from None


def api_error(status: int, body: Any, what: str) -> CLIError:
    message = body.get("error") if isinstance(body, dict) else None
    hint = {
        401: "log in: pass an API token with --token (or IOTCA_TOKEN); the dashboard's Tokens panel creates one",
        403: "check CA_PASSPHRASE (in .env or the environment) or the token's role",
        404: "iotca certs lists the names the CA knows",
        409: "choose another name: that identity belongs to the lab itself",
        429: "too many failed attempts: wait for the time the CA says, then retry",
    }.get(status, "see README.md, The CA API")
    return CLIError(f"{what} failed ({status}: {message or 'no reason given'}); {hint}")


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    widths = {c: max([len(c), *(len(str(r.get(c, ""))) for r in rows)]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns).rstrip())


def write_files(out: Path, name: str, reply: dict[str, Any]) -> list[Path]:
    """The certificate (and the key, when the CA made one) of a reply, atomically; the key mode 0600."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{name}.crt"]
    atomic_write(written[0], reply["crt"].encode(), CERT_MODE)
    if reply.get("key"):
        written.append(out / f"{name}.key")
        atomic_write(written[1], reply["key"].encode(), KEY_MODE)
    return written


def credential(passphrase: str) -> dict[str, str]:
    """The body's `pass`, unless an operator's API token stands in for it."""
    return {"pass": passphrase} if passphrase else {}


# -- commands -------------------------------------------------------------------------------------------


def cmd_certs(client: Client, args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({k: v for k, v in (("name", args.name), ("status", args.status)) if v})
    status, body = client.json("GET", "/v1/ssl/certs" + (f"?{query}" if query else ""))
    if status != 200:
        raise api_error(status, body, "listing the certificates")
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    rows = body["certificates"]
    print_table(rows, ("name", "common_name", "role", "status", "serial", "not_after", "days_left"))
    print(f"{len(rows)} certificate(s)")
    return 0


def _issue(client: Client, args: argparse.Namespace, route: str, body: dict[str, Any], what: str) -> int:
    status, reply = client.json("POST", route, body)
    if status not in (200, 201):
        raise api_error(status, reply, what)
    written = write_files(Path(args.out), reply["name"], reply)
    if args.json:
        print(
            json.dumps({**{k: v for k, v in reply.items() if k != "key"}, "files": [str(p) for p in written]}, indent=2)
        )
    else:
        print(f"{what}: {reply['name']}, serial {reply['serial']}, valid until {reply['not_after']}")
        for path in written:
            print(f"  wrote {path}")
    return 0


def cmd_create(client: Client, args: argparse.Namespace, passphrase: str) -> int:
    body: dict[str, Any] = {"name": args.name, "days": args.days, **credential(passphrase)}
    for field in ("cn", "org", "unit", "country", "state", "locality", "email"):
        if getattr(args, field):
            body[field] = getattr(args, field)
    return _issue(client, args, "/v1/ssl/create", body, "created")


def cmd_sign(client: Client, args: argparse.Namespace, passphrase: str) -> int:
    try:
        csr = Path(args.csr).read_text()
    except OSError as ex:
        raise CLIError(f"cannot read the CSR {args.csr} ({ex.strerror}); make one with openssl req -new") from None
    body = {"name": args.name, "days": args.days, **credential(passphrase), "csr": csr}
    return _issue(client, args, "/v1/ssl/sign", body, "signed")


def cmd_renew(client: Client, args: argparse.Namespace, passphrase: str) -> int:
    body = {"name": args.name, "days": args.days, **credential(passphrase)}
    return _issue(client, args, "/v1/ssl/sign", body, "renewed")


def cmd_revoke(client: Client, args: argparse.Namespace, passphrase: str) -> int:
    if bool(args.name) == bool(args.serial):
        raise CLIError("name either NAME or --serial S (not both); iotca certs lists them")
    body: dict[str, Any] = {**credential(passphrase), **({"name": args.name} if args.name else {"serial": args.serial})}
    if args.reason:
        body["reason"] = args.reason
    status, reply = client.json("POST", "/v1/ssl/revoke", body)
    if status != 200:
        raise api_error(status, reply, "revoking")
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        revoked = reply.get("revoked") or []
        print(f"revoked {len(revoked)} certificate(s) of {reply.get('name') or args.serial}: {', '.join(revoked)}")
        if reply.get("already_revoked"):
            print(f"  already revoked: {', '.join(reply['already_revoked'])}")
    return 0


def cmd_token(client: Client, args: argparse.Namespace, passphrase: str) -> int:
    body: dict[str, Any] = {"name": args.name, **credential(passphrase)}
    if args.ttl:
        body["ttl"] = args.ttl
    status, reply = client.json("POST", "/v1/ssl/tokens", body)
    if status not in (200, 201):
        raise api_error(status, reply, "issuing a token")
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(f"enrolment token for {reply['name']} (single use, until {reply.get('expires_at', '?')}):")
        print(reply["token"])
    return 0


def cmd_crl(client: Client, args: argparse.Namespace) -> int:
    status, data = client.request("GET", "/v1/ssl/crl", accept="application/x-pem-file")
    if status != 200:
        raise CLIError(f"fetching the CRL failed ({status}); the CA writes one once its root exists (./setup.sh)")
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        raise CLIError("the CA's answer is not a PEM CRL; is --url the lab's dashboard?") from None
    if args.der:
        data = crl.public_bytes(serialization.Encoding.DER)
    if args.out:
        atomic_write(Path(args.out), data, CERT_MODE)
        print(f"wrote {args.out} ({len(data)} bytes)")
    else:
        sys.stdout.buffer.write(data)
    return 0


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    status, health = client.json("GET", "/healthz")
    certs_status, certs = client.json("GET", "/v1/ssl/certs")
    counts: dict[str, int] = {}
    if certs_status == 200:
        for row in certs["certificates"]:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
    summary = {
        "url": client.url,
        "healthy": status == 200,
        "health": health,
        "certificates": counts if certs_status == 200 else None,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"CA at {client.url}: {'healthy' if status == 200 else f'DEGRADED ({status})'}")
        mqtt = health.get("mqtt", {}) if isinstance(health, dict) else {}
        if mqtt:
            print(f"  broker connection: {'up' if mqtt.get('connected') else 'down'}")
        for reason in health.get("reasons", []) if isinstance(health, dict) else []:
            print(f"  degraded: {reason}")
        if counts:
            print("  certificates: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        elif certs_status != 200:
            print(f"  certificates: not shown ({certs_status}; pass --token to see them)")
    return 0 if status == 200 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iotca",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--url", help="the CA's API (default: IOTCA_URL, else the dashboard of .env)")
    parser.add_argument("--token", help="API token, sent as Authorization: Bearer (default: IOTCA_TOKEN)")
    parser.add_argument(
        "--cacert",
        help="root certificate that an https --url must chain to (default: the lab's certs/root_ca/root_ca.crt)",
    )
    parser.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    certs = sub.add_parser("certs", help="list certificates")
    certs.add_argument("--name")
    certs.add_argument("--status", choices=("active", "superseded", "revoked", "valid", "expiring", "expired"))

    def issuing(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("name", metavar="NAME")
        p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
        p.add_argument("--out", default=".", help="folder for NAME.crt (and NAME.key) (default: here)")
        return p

    create = issuing("create", "a new key and certificate")
    for field in ("cn", "org", "unit", "country", "state", "locality", "email"):
        create.add_argument(f"--{field}", help=f"subject {field}")
    issuing("sign", "a certificate for a CSR").add_argument("--csr", required=True, help="PEM CSR file")
    issuing("renew", "re-sign the stored key of NAME")

    revoke = sub.add_parser("revoke", help="revoke a name's certificates, or one serial")
    revoke.add_argument("name", nargs="?", metavar="NAME")
    revoke.add_argument("--serial")
    revoke.add_argument("--reason", help="RFC 5280 reason (keyCompromise, superseded, cessationOfOperation, ...)")

    token = sub.add_parser("token", help="a single-use enrolment token for NAME")
    token.add_argument("name", metavar="NAME")
    token.add_argument("--ttl", type=int, help="seconds the token stays valid")

    crl = sub.add_parser("crl", help="the certificate revocation list")
    crl.add_argument("--out", help="write it to this file instead of standard output")
    crl.add_argument("--der", action="store_true", help="DER instead of PEM")

    sub.add_parser("status", help="the CA's health and certificate counts")
    sub.add_parser("users", help="dashboard users and API tokens: iotca users --help", add_help=False)
    return parser


def default_url(settings: Settings) -> str:
    host = settings.dashboard_host
    host = "127.0.0.1" if host in LOOPBACK_HOSTS else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.dashboard_port}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["users"]:
        # Accounts live in the lab's database, not behind the API: this runs where the lab's .env is.
        from dashboard.users import main as users_main

        return users_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as ex:
        print(f"iotca: error: {ex}; fix it in .env", file=sys.stderr)
        return 1
    root = settings.certs_dir / "root_ca" / "root_ca.crt"
    client = Client(
        url=args.url or os.environ.get("IOTCA_URL") or default_url(settings),
        token=args.token or os.environ.get("IOTCA_TOKEN") or None,
        cafile=Path(args.cacert) if args.cacert else (root if root.exists() else None),
    )
    try:
        if args.command in ("create", "sign", "renew", "revoke", "token"):
            if not settings.ca_passphrase and not client.token:
                raise CLIError(
                    "CA_PASSPHRASE is not set and no API token was given; run iotca where the lab's "
                    ".env is, export CA_PASSPHRASE, or pass an operator's --token"
                )
            handler = {
                "create": cmd_create,
                "sign": cmd_sign,
                "renew": cmd_renew,
                "revoke": cmd_revoke,
                "token": cmd_token,
            }[args.command]
            # With an operator's token the API needs no passphrase (README, Operator access).
            return handler(client, args, settings.ca_passphrase or "")
        return {"certs": cmd_certs, "crl": cmd_crl, "status": cmd_status}[args.command](client, args)
    except CLIError as ex:
        print(f"iotca: error: {ex}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`python -m dashboard.users`: add, remove and re-role dashboard users, reset passwords, and create, list and
revoke API tokens (dashboard/accounts.py holds them). A later `iotca users` calls `main(argv)`."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Sequence

from pki.config import ConfigError, Settings

from .accounts import ROLES, VIEWER, UserError, UserStore


def _password(args: argparse.Namespace) -> tuple[str, bool]:
    """From stdin with --password-stdin, else a new random one (printed once)."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n"), False
    return secrets.token_urlsafe(18), True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dashboard.users", description="Dashboard users (viewer, operator) and API tokens."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="users and API tokens")
    add = sub.add_parser("add", help="add a user (a random password is printed unless --password-stdin)")
    add.add_argument("username")
    add.add_argument("--role", choices=ROLES, default=VIEWER)
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    remove = sub.add_parser("remove", help="remove a user (and revoke the tokens it owns)")
    remove.add_argument("username")
    role = sub.add_parser("role", help="change a user's role")
    role.add_argument("username")
    role.add_argument("role", choices=ROLES)
    passwd = sub.add_parser("passwd", help="reset a password (ends the user's sessions)")
    passwd.add_argument("username")
    passwd.add_argument("--password-stdin", action="store_true")
    token = sub.add_parser("token", help="create an API token (printed once)")
    token.add_argument("label")
    token.add_argument("--role", choices=ROLES, default=VIEWER)
    token.add_argument("--owner", help="the user the token acts for (it never outranks them)")
    revoke = sub.add_parser("revoke-token", help="revoke an API token by id")
    revoke.add_argument("id", type=int)
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
    except ConfigError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    store = UserStore(settings.effective_database_url)
    try:
        if args.command == "list":
            for user in store.users():
                print(f"user  {user.username:<24} {user.role:<8} password set {user.password_changed_at:%Y-%m-%d}")
            for item in store.tokens():
                state = f"revoked {item.revoked_at:%Y-%m-%d}" if item.revoked_at else "active"
                print(f"token {item.id:<4} {item.label:<19} {item.role:<8} owner {item.owner or '-'} {state}")
        elif args.command == "add":
            password, generated = _password(args)
            store.add(args.username, password, args.role)
            print(f"added {args.role} {args.username}")
            if generated:
                print(f"password: {password}")
        elif args.command == "remove":
            store.remove(args.username)
            print(f"removed {args.username}")
        elif args.command == "role":
            store.set_role(args.username, args.role)
            print(f"{args.username} is now {args.role}")
        elif args.command == "passwd":
            password, generated = _password(args)
            store.set_password(args.username, password)
            print(f"password of {args.username} reset")
            if generated:
                print(f"password: {password}")
        elif args.command == "token":
            item, secret = store.create_token(args.label, args.role, args.owner)
            print(f"token {item.id} ({item.role}); shown once, send it as 'Authorization: Bearer <token>':")
            print(secret)
        elif args.command == "revoke-token":
            store.revoke_token(args.id)
            print(f"token {args.id} revoked")
    except UserError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

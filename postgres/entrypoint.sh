#!/bin/sh
# First start: a cluster with the role and database `lab` (password POSTGRES_PASSWORD), then the server in the
# foreground (exec: it is PID 1 and gets SIGTERM). Later starts: the server only.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "error: POSTGRES_PASSWORD is not set (put one in .env, and the same in DATABASE_URL)" >&2
        exit 2
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    # UTF8 explicitly: the image has no locale, and initdb would pick SQL_ASCII (psycopg then returns bytes).
    initdb --encoding=UTF8 --locale=C --username=postgres --auth-local=peer --auth-host=scram-sha-256 --pwfile="$pwfile" >/dev/null
    pg_ctl -o "-c listen_addresses='' -c unix_socket_directories=/tmp" -w start >/dev/null
    psql -v ON_ERROR_STOP=1 --username=postgres -q -v pw="$POSTGRES_PASSWORD" <<'SQL'
CREATE ROLE lab LOGIN PASSWORD :'pw';
CREATE DATABASE lab OWNER lab;
SQL
    pg_ctl -m fast -w stop >/dev/null
    rm -f "$pwfile"
    # Clients on the compose network, with a password; nothing else from outside.
    printf 'local all all peer\nhost all all samenet scram-sha-256\n' > "$PGDATA/pg_hba.conf"
fi
# The socket in /tmp (PGHOST, postgres/Dockerfile): the container's tmpfs there is writable by any user, a tmpfs
# on /var/run/postgresql is root's.
exec postgres -c listen_addresses='*' -c unix_socket_directories=/tmp

#!/bin/sh
# lab-mosquitto: the entrypoint of the broker container (mosquitto/Dockerfile), POSIX sh.
#
#   lab-mosquitto [CONFIG]         run Mosquitto on CONFIG (default: the Docker config the generator renders)
#   lab-mosquitto health [CONFIG]  the healthcheck: exit 0 when the config's TLS listener is open
#
# Why a script and not just `mosquitto -c`: the CA (the dashboard container) rewrites the ACL in certs/policy
# and the CRL the broker enforces in certs/mosquitto/crl.pem (only ever with a CRL that verified against the
# root) when it revokes a certificate, and the generator renews the broker's own certificate in
# certs/mosquitto. Mosquitto re-reads all of them on SIGHUP (2.0.11 reloads the ACL, the CRL and the listener
# certificates), but nothing would send it one: there is no Docker socket in any container, on purpose. So
# this script polls the files every POLL_SECONDS and sends SIGHUP when one was replaced (the CA writes by
# atomic rename, which changes the inode; the folders are bind-mounted, so the container sees the new file).
#
# Signals: SIGTERM/SIGINT (docker stop) are passed to Mosquitto, which saves its persistence file and exits;
# the script then exits with Mosquitto's status. SIGHUP (docker kill -s HUP) is passed on as a reload.
#
# The healthcheck never opens an MQTT session: Mosquitto forces client id = certificate CN, so a check
# connecting with some client certificate would take over that identity's session. It reads the listening
# sockets from /proc instead: the TLS listener only opens after Mosquitto loaded the certificate and key.
set -eu

DEFAULT_CONFIG=/mosquitto/certs/mosquitto.docker.conf
POLL_SECONDS=${POLL_SECONDS:-1}

say() { printf 'lab-mosquitto: %s\n' "$*" >&2; }

# listener_port CONFIG: the port of the first `listener` line.
listener_port() {
    awk '$1 == "listener" { print $2; exit }' "$1"
}

# watched_files CONFIG: the files whose replacement needs a reload (cafile, certfile, keyfile, acl_file,
# crlfile), plus the config itself.
watched_files() {
    printf '%s\n' "$1"
    awk '$1 == "cafile" || $1 == "certfile" || $1 == "keyfile" || $1 == "acl_file" || $1 == "crlfile" { print $2 }' "$1"
}

# stamp FILE...: inode, size and modification time of each file; changes whenever one is replaced.
stamp() {
    for file in "$@"; do
        stat -L -c '%i %s %y %n' "$file" 2>/dev/null || printf 'missing %s\n' "$file"
    done
}

# ensure_dynsec_state CONFIG: the dynamic-security plugin's state file (in the data volume) must exist, or the
# plugin does nothing; it defines no clients (acl_file decides every permission) and the plugin owns it after.
# The same content as pki/broker.py DYNSEC_INITIAL.
ensure_dynsec_state() {
    state=$(awk '$1 == "plugin_opt_config_file" { print $2; exit }' "$1")
    if [ -n "$state" ] && [ ! -e "$state" ]; then
        printf '%s\n' '{"defaultACLAccess": {"publishClientSend": false, "publishClientReceive": false, "subscribe": false, "unsubscribe": true}, "clients": [], "groups": [], "roles": []}' >"$state.tmp"
        mv -f "$state.tmp" "$state"
    fi
}

health() {
    config=${1:-$DEFAULT_CONFIG}
    port=$(listener_port "$config") || exit 1
    [ -n "$port" ] || exit 1
    hex=$(printf '%04X' "$port")
    # /proc/net/tcp{,6}: "sl local_address rem_address st ..."; state 0A is LISTEN.
    if cat /proc/net/tcp /proc/net/tcp6 2>/dev/null |
        awk -v port=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == port { found = 1 } END { exit !found }'; then
        exit 0
    fi
    echo "no listener on port $port" >&2
    exit 1
}

# refresh_config: when running as root, the config Mosquitto reads is a copy with `user root` on top.
refresh_config() {
    if [ "$config" != "$source_config" ]; then
        { echo "user root"; cat "$source_config"; } >"$config.tmp"
        mv -f "$config.tmp" "$config"
    fi
}

run() {
    config=${1:-$DEFAULT_CONFIG}
    if [ ! -r "$config" ]; then
        say "cannot read $config."
        say "Generate the certificates first (./setup.sh does), and check that LAB_UID/LAB_GID in .env are the"
        say "owner of the certificates folder (id -u, id -g): the container runs as that user to read the keys."
        exit 1
    fi
    mosquitto=${MOSQUITTO_BIN:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
    source_config=$config
    if [ "$(id -u)" = 0 ] && ! grep -q '^[[:space:]]*user[[:space:]]' "$config"; then
        # Started as root (LAB_UID=0 because the lab runs as root), Mosquitto would switch to the `mosquitto`
        # user, which cannot read root's 0600 keys (and, without capabilities, may not switch at all).
        config=${TMPDIR:-/tmp}/lab-mosquitto.conf
    fi
    refresh_config
    ensure_dynsec_state "$source_config"
    set -f # the paths below are data, never patterns
    set -- $(watched_files "$source_config")
    previous=$(stamp "$@")

    # Traps first: as PID 1 of the container, a signal without a handler would simply be ignored.
    pid=""
    stopping=0
    trap 'stopping=1; [ -z "$pid" ] || kill -TERM "$pid" 2>/dev/null || true' TERM INT
    trap '[ -z "$pid" ] || kill -HUP "$pid" 2>/dev/null || true' HUP

    # Line-buffered: Mosquitto's log goes to stdout, which is a pipe here, not a terminal.
    if command -v stdbuf >/dev/null 2>&1; then
        stdbuf -oL "$mosquitto" -c "$config" &
    else
        "$mosquitto" -c "$config" &
    fi
    pid=$!
    # A signal that came before Mosquitto started is passed on now.
    [ "$stopping" = 0 ] || kill -TERM "$pid" 2>/dev/null || true

    while kill -0 "$pid" 2>/dev/null; do
        sleep "$POLL_SECONDS" &
        sleeper=$!
        # `wait` returns early when a signal arrives, so SIGTERM is passed on at once.
        if ! wait "$sleeper" 2>/dev/null; then
            kill "$sleeper" 2>/dev/null || true
            wait "$sleeper" 2>/dev/null || true
        fi
        [ "$stopping" = 1 ] && continue
        current=$(stamp "$@")
        if [ "$current" != "$previous" ]; then
            previous=$current
            say "the ACL, CRL, certificate or config changed: reloading Mosquitto (SIGHUP)"
            refresh_config
            kill -HUP "$pid" 2>/dev/null || true
        fi
    done
    status=0
    wait "$pid" || status=$?
    exit "$status"
}

case ${1-} in
    health)
        shift
        health "$@"
        ;;
    *) run "$@" ;;
esac

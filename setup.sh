#!/usr/bin/env bash
# setup.sh: the one entry point of the IoT CA lab.
#
# Prepares everything the lab needs (a Python >= 3.11 virtual environment with the pinned
# dependencies, a .env with a random CA passphrase, the system packages), generates the
# certificates and starts the lab with Docker or as local processes. Every step is idempotent:
# re-running it only does what is missing. Run `./setup.sh help` for the commands.
#
# Written for bash 3.2 too (macOS): no associative arrays, no mapfile, no ${var,,}.
set -euo pipefail

cd -- "$(dirname -- "${BASH_SOURCE[0]}")"

readonly VENV_DIR=.venv
readonly VENV_PY=$VENV_DIR/bin/python
readonly ENV_FILE=.env
readonly ENV_EXAMPLE=.env.example
readonly REQ_RUNTIME=requirements.txt
readonly REQ_DEV=requirements-dev.txt
readonly GENERATOR=generate_ca_and_device_certs.py
readonly COMPOSE_FILE=docker-compose.yml
readonly NATIVE_RUNNER=lab/native.py
readonly DOCKER_INFO_TIMEOUT=10
# How long `./setup.sh docker` waits for the dashboard's /healthz before giving up (seconds).
readonly HEALTH_WAIT_SECONDS=${SETUP_HEALTH_WAIT:-120}

# ---------------------------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------------------------

log() { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }

# fail LINE...: print an error (first line) with its explanation (further lines), exit 1.
fail() {
    printf 'error: %s\n' "$1" >&2
    shift
    local line
    for line in "$@"; do
        printf '       %s\n' "$line" >&2
    done
    exit 1
}

have() { command -v "$1" >/dev/null 2>&1; }

# run_with_timeout SECONDS CMD...: `timeout` where it exists (GNU, or gtimeout from Homebrew).
run_with_timeout() {
    local seconds=$1
    shift
    if have timeout; then
        timeout "$seconds" "$@"
    elif have gtimeout; then
        gtimeout "$seconds" "$@"
    else
        "$@"
    fi
}

usage() {
    cat <<'EOF'
Usage: ./setup.sh [COMMAND] [ARGS...]

  (no command)  venv + dependencies, .env, certificates, then the whole lab: with Docker when
                an engine answers (docker compose up --build -d), otherwise as local processes
  test [ARGS]   venv + dev dependencies, Mosquitto, Chromium and docker-compose, then
                pytest ARGS (e.g. ./setup.sh test -k generator -x)
  certs [ARGS]  venv + dependencies, .env, then generate_ca_and_device_certs.py ARGS
                (e.g. --check, --force, --devices a,b)
  native [ARGS] certificates, then the lab as local processes in the foreground (Ctrl-C stops)
  docker [ARGS] certificates, then docker compose up --build -d ARGS; prints the dashboard URL
  down          stop the lab (docker compose down, and the processes of a native run)
  status        certificate status (generator --check) and what listens on the lab's ports
  help, -h      this text

Exit codes: 0 success, 1 failure, 2 usage error (or a wrong CA passphrase from the generator),
3 the requested mode is not built yet.
EOF
}

# ---------------------------------------------------------------------------------------------
# .env values (read without sourcing the file: it is data, not code)
# ---------------------------------------------------------------------------------------------

# env_value KEY [DEFAULT]: the value python-dotenv would see. The process environment wins (as
# with load_dotenv(override=False)), then the last KEY=VALUE line of .env, then DEFAULT. An empty
# value counts as unset.
env_value() {
    local key=$1 default=${2-} line value re_double re_single
    value=${!key-}
    if [[ -z $value && -f $ENV_FILE ]]; then
        line=$(grep -E "^[[:space:]]*(export[[:space:]]+)?${key}[[:space:]]*=" "$ENV_FILE" | tail -n 1 || true)
        if [[ -n $line ]]; then
            value=${line#*=}
            value=${value#"${value%%[![:space:]]*}"}
            re_double='^"([^"]*)"'
            re_single="^'([^']*)'"
            if [[ $value =~ $re_double ]]; then
                value=${BASH_REMATCH[1]}
            elif [[ $value =~ $re_single ]]; then
                value=${BASH_REMATCH[1]}
            else
                value=${value%%[[:space:]]#*}
                value=${value%"${value##*[![:space:]]}"}
            fi
        fi
    fi
    printf '%s' "${value:-$default}"
}

# A host to connect to for a service bound to HOST ("0.0.0.0" and friends mean every interface).
local_host_for() {
    case ${1-} in
        "" | 0.0.0.0 | "::" | "[::]" | "*") printf '127.0.0.1' ;;
        *) printf '%s' "$1" ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# Privileges and system packages
# ---------------------------------------------------------------------------------------------

SUDO_CMD=()
# can_act_as_root: true when we are root or `sudo -n` works (never prompts); sets SUDO_CMD.
can_act_as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        SUDO_CMD=()
        return 0
    fi
    if have sudo && sudo -n true 2>/dev/null; then
        SUDO_CMD=(sudo -n)
        return 0
    fi
    return 1
}

as_root() { ${SUDO_CMD[@]+"${SUDO_CMD[@]}"} "$@"; }

APT_UPDATED=0
apt_install() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "Refreshing the apt package lists (apt-get update)"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
            warn "apt-get update failed; trying the install with the package lists we have"
        APT_UPDATED=1
    fi
    log "Installing system packages: $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# find_system_command NAME: print the path of NAME (also where it hides off PATH), or fail.
find_system_command() {
    local candidate
    local candidates=("$1")
    case $1 in
        # Debian puts the broker in /usr/sbin, which is not on a normal user's PATH; Homebrew
        # keeps it in its own sbin.
        mosquitto) candidates+=(/usr/sbin/mosquitto /usr/local/sbin/mosquitto /opt/homebrew/sbin/mosquitto
            /usr/local/opt/mosquitto/sbin/mosquitto /opt/homebrew/opt/mosquitto/sbin/mosquitto) ;;
        chromium) candidates+=(chromium-browser) ;;
    esac
    for candidate in "${candidates[@]}"; do
        if command -v "$candidate" 2>/dev/null; then
            return 0
        fi
    done
    return 1
}

debian_package_for() {
    case $1 in
        mosquitto_pub | mosquitto_sub) printf 'mosquitto-clients' ;;
        *) printf '%s' "$1" ;; # mosquitto, chromium, docker-compose: same name
    esac
}

# The Homebrew formula for a command; empty when Homebrew has no formula to install it with.
brew_formula_for() {
    case $1 in
        mosquitto | mosquitto_pub | mosquitto_sub) printf 'mosquitto' ;;
        docker-compose) printf 'docker-compose' ;;
        *) printf '' ;;
    esac
}

# contains WORD LIST...: is WORD one of LIST?
contains() {
    local word=$1 item
    shift
    for item in "$@"; do
        [[ $item == "$word" ]] && return 0
    done
    return 1
}

# ensure_system_packages COMMAND...: install the packages of the commands that are missing.
# apt-get as root (or with passwordless sudo), Homebrew on macOS; otherwise say what to install.
# The Debian mosquitto package brings a system service of its own; the lab never starts or
# enables it: it runs its own broker with its own configuration.
ensure_system_packages() {
    local cmd pkg missing=() packages=() manual=() still_missing=()
    for cmd in "$@"; do
        find_system_command "$cmd" >/dev/null || missing+=("$cmd")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0

    if have apt-get && can_act_as_root; then
        for cmd in "${missing[@]}"; do
            pkg=$(debian_package_for "$cmd")
            contains "$pkg" ${packages[@]+"${packages[@]}"} || packages+=("$pkg")
        done
        apt_install "${packages[@]}" || warn "apt-get install ${packages[*]} failed"
    elif [[ $(uname -s) == Darwin ]] && have brew; then
        for cmd in "${missing[@]}"; do
            pkg=$(brew_formula_for "$cmd")
            if [[ -z $pkg ]]; then
                manual+=("$cmd")
            elif ! contains "$pkg" ${packages[@]+"${packages[@]}"}; then
                packages+=("$pkg")
            fi
        done
        if [[ ${#packages[@]} -gt 0 ]]; then
            log "Installing with Homebrew: ${packages[*]}"
            brew install "${packages[@]}" || warn "brew install ${packages[*]} failed"
        fi
    fi

    for cmd in "${missing[@]}"; do
        find_system_command "$cmd" >/dev/null || still_missing+=("$cmd")
    done
    [[ ${#still_missing[@]} -eq 0 ]] && return 0

    local hints=() formulas=()
    if [[ $(uname -s) == Darwin ]]; then
        for cmd in "${still_missing[@]}"; do
            pkg=$(brew_formula_for "$cmd")
            if [[ -z $pkg ]]; then
                hints+=("$cmd: install it yourself (Chromium: brew install --cask chromium)")
            elif ! contains "$pkg" ${formulas[@]+"${formulas[@]}"}; then
                formulas+=("$pkg")
            fi
        done
        [[ ${#formulas[@]} -eq 0 ]] || hints=("brew install ${formulas[*]}" ${hints[@]+"${hints[@]}"})
    else
        packages=()
        for cmd in "${still_missing[@]}"; do
            pkg=$(debian_package_for "$cmd")
            contains "$pkg" ${packages[@]+"${packages[@]}"} || packages+=("$pkg")
        done
        hints+=("Debian/Ubuntu/WSL: sudo apt-get install --no-install-recommends ${packages[*]}")
        if ! have apt-get; then
            hints+=("Other systems: install the packages that provide: ${still_missing[*]}")
        elif ! can_act_as_root; then
            hints+=("(setup.sh installs them itself when run as root or with passwordless sudo)")
        fi
    fi
    fail "missing system commands: ${still_missing[*]}" "${hints[@]}"
}

# ---------------------------------------------------------------------------------------------
# Python, the virtual environment and its dependencies
# ---------------------------------------------------------------------------------------------

PYTHON_BIN=""
PYTHON_VERSION=""
# find_python: the first Python >= 3.11 among $PYTHON (if set) or python3.13 .. python3, python.
find_python() {
    [[ -n $PYTHON_BIN ]] && return 0
    local candidate path version candidates=() seen=()
    if [[ -n ${PYTHON-} ]]; then
        candidates=("$PYTHON")
    else
        candidates=(python3.13 python3.12 python3.11 python3 python)
    fi
    for candidate in "${candidates[@]}"; do
        path=$(command -v "$candidate" 2>/dev/null) || continue
        # A pyenv shim for a version that is not selected exists but fails: skip it.
        version=$("$path" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) || continue
        if "$path" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            PYTHON_BIN=$path
            PYTHON_VERSION=$version
            return 0
        fi
        seen+=("$candidate is Python $version ($path)")
    done
    local found="no python3 on PATH"
    [[ -n ${PYTHON-} ]] && found="PYTHON=$PYTHON does not run"
    [[ ${#seen[@]} -gt 0 ]] && found="found: ${seen[*]}"
    fail "Python 3.11 or newer is required ($found)." \
        "Debian 12 / Ubuntu 24.04: sudo apt-get install python3 python3-venv" \
        "Older Ubuntu: sudo apt-get install python3.11 python3.11-venv (deadsnakes PPA), or pyenv install 3.12" \
        "macOS: brew install python@3.12" \
        "Then re-run ./setup.sh, or point it at one: PYTHON=/path/to/python3.12 ./setup.sh"
}

# venv_works / check_venv_support: the chosen Python can create a venv with pip in it (Debian splits venv and
# ensurepip into python3-venv). Installs that package when we may, else says how.
venv_works() {
    "$PYTHON_BIN" -c 'import venv' >/dev/null 2>&1 && "$PYTHON_BIN" -m ensurepip --version >/dev/null 2>&1
}

check_venv_support() {
    venv_works && return 0
    local minor=${PYTHON_VERSION%.*}
    if have apt-get && can_act_as_root; then
        log "Python $PYTHON_VERSION lacks the venv/ensurepip modules: installing python${minor}-venv"
        apt_install "python${minor}-venv" || apt_install python3-venv || true
        venv_works && return 0
    fi
    fail "$PYTHON_BIN (Python $PYTHON_VERSION) cannot create virtual environments: the venv or ensurepip module is missing." \
        "Debian/Ubuntu: sudo apt-get install python3-venv   (or python${minor}-venv for this exact version)" \
        "Then re-run ./setup.sh"
}

venv_is_healthy() {
    [[ -x $VENV_PY ]] || return 1
    "$VENV_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 || return 1
    "$VENV_PY" -m pip --version >/dev/null 2>&1
}

# requirements_digest FILE...: sha256 over the names and contents of the requirements files.
requirements_digest() {
    "$VENV_PY" - "$@" <<'PY'
import hashlib
import sys

digest = hashlib.sha256()
for name in sys.argv[1:]:
    with open(name, "rb") as handle:
        digest.update(name.encode() + b"\0" + handle.read() + b"\0")
print(digest.hexdigest())
PY
}

# install_requirements runtime|dev: pip install, skipped when the stamp in .venv says that
# exactly these requirements files were installed already.
install_requirements() {
    local profile=$1 req digest stamp files=()
    if [[ $profile == dev ]]; then
        req=$REQ_DEV
        files=("$REQ_RUNTIME" "$REQ_DEV")
    else
        req=$REQ_RUNTIME
        files=("$REQ_RUNTIME")
    fi
    [[ -f $req ]] || fail "$req is missing: is this a complete checkout?"
    stamp=$VENV_DIR/.setup-$req.sha256
    digest=$(requirements_digest "${files[@]}")
    if [[ -f $stamp && $(<"$stamp") == "$digest" ]]; then
        info "Python dependencies from $req are up to date"
        return 0
    fi
    log "Installing Python dependencies into $VENV_DIR ($req)"
    "$VENV_PY" -m pip install -q --disable-pip-version-check --no-input -r "$req" ||
        fail "pip install -r $req failed (see above)." \
            "Check the network/proxy settings for PyPI, then re-run; a broken $VENV_DIR can be removed with rm -rf $VENV_DIR"
    printf '%s\n' "$digest" >"$stamp"
    # The dev file includes the runtime one, so the runtime set is now installed as well.
    if [[ $profile == dev ]] && grep -qE "^-r[[:space:]]*$REQ_RUNTIME" "$REQ_DEV"; then
        requirements_digest "$REQ_RUNTIME" >"$VENV_DIR/.setup-$REQ_RUNTIME.sha256"
    fi
}

# ensure_venv runtime|dev: a working .venv (re-created when broken) with the requirements.
ensure_venv() {
    if ! venv_is_healthy; then
        find_python
        check_venv_support
        if [[ -e $VENV_DIR ]]; then
            log "Re-creating $VENV_DIR (it is broken or older than Python 3.11) with Python $PYTHON_VERSION"
            rm -rf -- "$VENV_DIR"
        else
            log "Creating $VENV_DIR with Python $PYTHON_VERSION ($PYTHON_BIN)"
        fi
        if ! "$PYTHON_BIN" -m venv "$VENV_DIR"; then
            rm -rf -- "$VENV_DIR"
            fail "$PYTHON_BIN -m venv $VENV_DIR failed (see above)."
        fi
        venv_is_healthy || fail "$VENV_DIR was created but its python or pip does not work."
    fi
    install_requirements "$1"
}

# ---------------------------------------------------------------------------------------------
# .env
# ---------------------------------------------------------------------------------------------

# ensure_env_file: create .env from .env.example with a fresh random CA_PASSPHRASE (mode 0600,
# never printed). An existing .env is never touched: it holds the passphrase of the CA key.
ensure_env_file() {
    if [[ -e $ENV_FILE || -L $ENV_FILE ]]; then
        if [[ -z $(env_value CA_PASSPHRASE) ]]; then
            warn "CA_PASSPHRASE is empty in $ENV_FILE (and not set in the environment): set it there"
        fi
        if ! "$VENV_PY" -c 'import os, sys; sys.exit(os.path.exists(sys.argv[1]) and bool(os.stat(sys.argv[1]).st_mode & 0o077))' "$ENV_FILE"; then
            warn "$ENV_FILE is readable by other users; it holds the CA passphrase: chmod 600 $ENV_FILE"
        fi
        return 0
    fi
    [[ -f $ENV_EXAMPLE ]] || warn "$ENV_EXAMPLE is missing: $ENV_FILE gets only CA_PASSPHRASE (defaults for the rest)"
    log "Creating $ENV_FILE with a new random CA passphrase (mode 0600; keep it: it unlocks the CA key)"
    (
        umask 077
        "$VENV_PY" - "$ENV_EXAMPLE" "$ENV_FILE" <<'PY'
import os
import re
import secrets
import sys
import time

example, target = sys.argv[1], sys.argv[2]
try:
    with open(example, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
except FileNotFoundError:
    lines = []
passphrase = secrets.token_urlsafe(32)
header = [
    f"# Created by setup.sh from {example} on {time.strftime('%Y-%m-%d %H:%M:%S %z')}.",
    "# CA_PASSPHRASE below encrypts the root CA key: losing or changing it means a new CA.",
]
out, replaced = header, False
for line in lines:
    if not replaced and re.match(r"\s*(export\s+)?CA_PASSPHRASE\s*=", line):
        out.append(f"CA_PASSPHRASE={passphrase}")
        replaced = True
    else:
        out.append(line)
if not replaced:
    out.append(f"CA_PASSPHRASE={passphrase}")
# O_EXCL: never overwrite a .env that appeared meanwhile.
fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "w", encoding="utf-8") as handle:
    handle.write("\n".join(out) + "\n")
PY
    ) || fail "could not create $ENV_FILE (see above)"
}

# ---------------------------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------------------------

# run_generator ARGS...: the certificate generator; returns its exit code (explained if not 0).
run_generator() {
    if [[ ! -f $GENERATOR ]]; then
        printf 'error: %s is not there yet: the certificate generator is still being built.\n' "$GENERATOR" >&2
        return 1
    fi
    log "Certificates: $GENERATOR${*:+ $*}"
    local rc=0
    "$VENV_PY" "$GENERATOR" "$@" || rc=$?
    if [[ $rc -eq 2 ]]; then
        printf '%s\n' "error: the generator exited 2: wrong CA passphrase, bad setting or bad option (see above;" \
            "       README.md, Troubleshooting, says what to do)." >&2
    elif [[ $rc -ne 0 ]]; then
        printf 'error: the generator exited %s (see above).\n' "$rc" >&2
    fi
    return "$rc"
}

# ---------------------------------------------------------------------------------------------
# Docker
# ---------------------------------------------------------------------------------------------

DOCKER_STATE=""  # "", yes or no: docker info is asked once per run
DOCKER_ERROR=""
docker_reachable() {
    if [[ -z $DOCKER_STATE ]]; then
        if ! have docker; then
            DOCKER_STATE=no
            DOCKER_ERROR="the docker command is not installed"
        elif DOCKER_ERROR=$(run_with_timeout "$DOCKER_INFO_TIMEOUT" docker info 2>&1 >/dev/null); then
            DOCKER_STATE=yes
        else
            DOCKER_STATE=no
            DOCKER_ERROR=$(printf '%s\n' "$DOCKER_ERROR" | grep -v '^[[:space:]]*$' | tail -n 1 || true)
            [[ -n $DOCKER_ERROR ]] || DOCKER_ERROR="no answer within ${DOCKER_INFO_TIMEOUT}s"
        fi
    fi
    [[ $DOCKER_STATE == yes ]]
}

COMPOSE=()
# pick_compose [install]: `docker compose` when the plugin works, else docker-compose (installed
# when missing if asked to). Returns 1 when there is none.
pick_compose() {
    if docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
    elif have docker-compose; then
        COMPOSE=(docker-compose)
    elif [[ ${1-} == install ]]; then
        ensure_system_packages docker-compose
        COMPOSE=(docker-compose)
    else
        return 1
    fi
}

# wait_for_health URL SECONDS: poll URL until it answers 2xx (no proxy: it is local).
wait_for_health() {
    "$VENV_PY" - "$1" "$2" <<'PY'
import sys
import time
import urllib.request

url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
while True:
    try:
        with opener.open(url, timeout=3) as response:
            if 200 <= response.status < 300:
                sys.exit(0)
    except Exception:  # noqa: BLE001 - not up yet, whatever the reason
        pass
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(1)
PY
}

dashboard_url() {
    local host port
    host=$(local_host_for "$(env_value DASHBOARD_HOST 127.0.0.1)")
    port=$(env_value DASHBOARD_PORT 5000)
    printf 'http://%s:%s/' "$host" "$port"
}

# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

cmd_test() {
    ensure_venv dev
    ensure_system_packages mosquitto mosquitto_pub chromium docker-compose
    local mosquitto chromium out mosquitto_version="unknown version" chromium_version="unknown version"
    local re_version='([0-9]+(\.[0-9]+)+)'
    mosquitto=$(find_system_command mosquitto)
    chromium=$(find_system_command chromium)
    out=$("$mosquitto" -h 2>&1 || true) # prints its version with the help, exits 3
    [[ $out =~ $re_version ]] && mosquitto_version=${BASH_REMATCH[1]}
    out=$(run_with_timeout 30 "$chromium" --version 2>/dev/null || true)
    [[ $out =~ $re_version ]] && chromium_version=${BASH_REMATCH[1]}
    log "Using mosquitto $mosquitto_version ($mosquitto), Chromium $chromium_version ($chromium)"
    # Where the tests find them, also off PATH (Debian keeps mosquitto in /usr/sbin).
    export MOSQUITTO_BIN=${MOSQUITTO_BIN:-$mosquitto}
    export CHROMIUM_PATH=${CHROMIUM_PATH:-$chromium}
    log "Running the test suite: pytest${*:+ $*}"
    exec "$VENV_PY" -m pytest "$@"
}

cmd_certs() {
    ensure_venv runtime
    ensure_env_file
    local rc=0
    run_generator "$@" || rc=$?
    exit "$rc"
}

cmd_native() {
    ensure_venv runtime
    ensure_env_file
    ensure_system_packages mosquitto
    run_generator || exit $?
    if [[ ! -f $NATIVE_RUNNER ]]; then
        echo "native lab runner is not built yet (Step 2); certificates were generated with ./setup.sh certs" >&2
        exit 3
    fi
    local mosquitto
    mosquitto=$(find_system_command mosquitto)
    export MOSQUITTO_BIN=${MOSQUITTO_BIN:-$mosquitto}
    log "Starting the lab natively (Ctrl-C stops everything); dashboard at $(dashboard_url)"
    exec "$VENV_PY" -m lab.native "$@"
}

explain_docker_unreachable() {
    printf '%s\n' \
        "error: the Docker engine is not reachable (docker info: $DOCKER_ERROR)." \
        "       Start it: sudo systemctl start docker (Linux), or open Docker Desktop (macOS, Windows/WSL)." \
        "       If it runs but you may not use it: sudo usermod -aG docker \"\$USER\", then log in again." \
        "       Or run the same lab without Docker: ./setup.sh native" >&2
}

cmd_docker() {
    if [[ ! -f $COMPOSE_FILE ]]; then
        echo "Docker mode is not built yet (Step 5); use ./setup.sh native" >&2
        exit 3
    fi
    if ! docker_reachable; then
        explain_docker_unreachable
        exit 1
    fi
    pick_compose install
    ensure_venv runtime
    ensure_env_file
    run_generator || exit $?
    log "Starting the lab: ${COMPOSE[*]} up --build -d${*:+ $*}"
    "${COMPOSE[@]}" up --build -d "$@"
    local url
    url=$(dashboard_url)
    log "Waiting up to ${HEALTH_WAIT_SECONDS}s for the dashboard (${url}healthz)"
    if ! wait_for_health "${url}healthz" "$HEALTH_WAIT_SECONDS"; then
        "${COMPOSE[@]}" ps || true
        fail "the dashboard did not become healthy within ${HEALTH_WAIT_SECONDS}s." \
            "Look at: ${COMPOSE[*]} logs --tail 50; stop with ./setup.sh down"
    fi
    log "The lab is up. Dashboard: $url"
    info "Stop it with ./setup.sh down; status with ./setup.sh status"
}

cmd_auto() {
    if docker_reachable; then
        if [[ -f $COMPOSE_FILE ]]; then
            cmd_docker
            return
        fi
        echo "Docker answers, but Docker mode is not built yet (Step 5): running the lab natively."
    else
        echo "No Docker engine answers (docker info failed): running the lab natively. Use ./setup.sh docker once Docker is running."
    fi
    cmd_native
}

# stop_pids FILE: TERM the processes listed in FILE (one per line; the first number on a line is
# the PID, the rest, e.g. a name, is ignored), KILL what is left after 10 s, remove FILE.
stop_pids() {
    local file=$1 line token pid pids=() alive=() tokens i
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%%#*}
        read -r -a tokens <<<"$line" || true
        for token in ${tokens[@]+"${tokens[@]}"}; do
            if [[ $token =~ ^[0-9]+$ && $token -gt 1 ]]; then
                pids+=("$token")
                break
            fi
        done
    done <"$file"
    for pid in ${pids[@]+"${pids[@]}"}; do
        if kill -0 "$pid" 2>/dev/null; then
            alive+=("$pid")
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    if [[ ${#alive[@]} -eq 0 ]]; then
        info "no process of $file is still running"
    else
        log "Stopping the native lab (PIDs ${alive[*]})"
        for ((i = 0; i < 20; i++)); do
            pids=()
            for pid in "${alive[@]}"; do
                kill -0 "$pid" 2>/dev/null && pids+=("$pid")
            done
            [[ ${#pids[@]} -eq 0 ]] && break
            sleep 0.5
        done
        for pid in ${pids[@]+"${pids[@]}"}; do
            warn "PID $pid ignored SIGTERM for 10 s: sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        done
    fi
    rm -f -- "$file"
}

cmd_down() {
    local stopped=0 pid_file
    if [[ -f $COMPOSE_FILE ]] && docker_reachable; then
        if pick_compose; then
            log "Stopping the Docker lab: ${COMPOSE[*]} down"
            "${COMPOSE[@]}" down
            stopped=1
        else
            warn "Docker answers but neither 'docker compose' nor docker-compose is installed"
        fi
    fi
    pid_file=$(env_value DATA_DIR data)/lab.pids
    if [[ -f $pid_file ]]; then
        stop_pids "$pid_file"
        stopped=1
    fi
    [[ $stopped -eq 1 ]] || echo "Nothing is running: no Docker lab and no $pid_file from a native run."
}

# port_listens HOST PORT: does something accept TCP connections there?
port_listens() {
    "$VENV_PY" - "$1" "$2" <<'PY'
import socket
import sys

try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1):
        pass
except (OSError, ValueError):
    sys.exit(1)
PY
}

cmd_status() {
    ensure_venv runtime
    local rc=0 broker_port dashboard_host dashboard_port pid_file line pid
    if [[ -f $GENERATOR ]]; then
        log "Certificates: $GENERATOR --check"
        "$VENV_PY" "$GENERATOR" --check || rc=$?
        if [[ $rc -eq 0 ]]; then
            info "certificates: all present and valid"
        else
            info "certificates: --check exited $rc (missing, expiring, expired or invalid: ./setup.sh certs reissues)"
        fi
    else
        rc=1
        info "certificates: $GENERATOR is not built yet"
    fi

    log "Services"
    broker_port=$(env_value BROKER_PORT 8883)
    if port_listens 127.0.0.1 "$broker_port"; then
        info "broker:    listening on 127.0.0.1:$broker_port"
    else
        info "broker:    nothing listens on 127.0.0.1:$broker_port"
    fi
    dashboard_host=$(local_host_for "$(env_value DASHBOARD_HOST 127.0.0.1)")
    dashboard_port=$(env_value DASHBOARD_PORT 5000)
    if port_listens "$dashboard_host" "$dashboard_port"; then
        info "dashboard: listening, $(dashboard_url)"
    else
        info "dashboard: nothing listens on $dashboard_host:$dashboard_port"
    fi
    if [[ -f $COMPOSE_FILE ]] && docker_reachable && pick_compose; then
        info "docker:    ${COMPOSE[*]} ps"
        "${COMPOSE[@]}" ps || true
    fi
    pid_file=$(env_value DATA_DIR data)/lab.pids
    if [[ -f $pid_file ]]; then
        info "native:    processes from $pid_file:"
        while IFS= read -r line || [[ -n $line ]]; do
            pid=$(printf '%s\n' "$line" | grep -oE '[0-9]+' | head -n 1 || true)
            [[ -n $pid ]] || continue
            if kill -0 "$pid" 2>/dev/null; then
                info "           $line (running)"
            else
                info "           $line (not running)"
            fi
        done <"$pid_file"
    fi
    exit "$rc"
}

main() {
    local command=${1-}
    [[ $# -gt 0 ]] && shift
    case $command in
        "") cmd_auto ;;
        test) cmd_test "$@" ;;
        certs) cmd_certs "$@" ;;
        native) cmd_native "$@" ;;
        docker) cmd_docker "$@" ;;
        down | status)
            if [[ $# -gt 0 ]]; then
                printf 'error: %s takes no arguments\n' "$command" >&2
                exit 2
            fi
            "cmd_$command"
            ;;
        help | -h | --help) usage ;;
        *)
            printf 'error: unknown command: %s\n\n' "$command" >&2
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"

#!/usr/bin/env bash
# setup.sh: the one entry point of the IoT CA lab, and only its bootstrap.
#
# It finds a Python >= 3.11, makes the virtual environment .venv and installs the locked dependencies
# (pip --require-hashes), then hands over (exec) to `python -m lab.control COMMAND`, which does the rest:
# .env, system packages, certificates, the lab natively or with Docker, down, status, the tests, the locks.
# Every step is idempotent: re-running it only does what is missing. `./setup.sh --help` lists the commands.
#
# Written for bash 3.2 too (macOS): no associative arrays, no mapfile, no ${var,,}.
set -euo pipefail

cd -- "$(dirname -- "${BASH_SOURCE[0]}")"

readonly VENV_DIR=.venv
readonly VENV_PY=$VENV_DIR/bin/python
# What is installed: the locks of requirements*.txt (every transitive dependency pinned, with hashes), made by
# `./setup.sh lock`. pip installs them with --require-hashes. The dev lock holds the other two.
readonly LOCK_RUNTIME=requirements.lock
readonly LOCK_POSTGRES=requirements-postgres.lock
readonly LOCK_DEV=requirements-dev.lock

log() { printf '==> %s\n' "$*"; }

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

usage() {
    cat <<'USAGE'
Usage: ./setup.sh [COMMAND] [ARGS...]

  (no command)  venv + dependencies, .env, certificates, then the whole lab: with Docker when
                an engine answers (docker compose up --build -d), otherwise as local processes
  test [ARGS]   venv + dev dependencies, Mosquitto, Chromium and docker-compose, then
                pytest ARGS (e.g. ./setup.sh test -k generator -x)
  lock          requirements*.lock from requirements*.txt (every dependency pinned, with hashes)
  certs [ARGS]  venv + dependencies, .env, then generate_ca_and_device_certs.py ARGS
                (e.g. --check, --force, --devices a,b)
  native [ARGS] certificates, then the lab as local processes in the foreground (Ctrl-C stops);
                ARGS go to python -m lab.native (--devices a,b, --enrol c, --no-dashboard)
  docker [ARGS] images, certificates (generated inside the dashboard image), then
                docker compose up --build -d ARGS; waits for health, prints the dashboard URL
  down          stop the lab (docker compose down, and the processes of a native run)
  status        certificate status (generator --check: days left), what listens on the lab's
                ports, and the containers with their health
  help, -h, --help  this text

Settings come from .env (created on the first run with a random CA_PASSPHRASE and
DASHBOARD_ADMIN_PASSWORD; .env.example documents every key). Also read from the environment:
  PYTHON=/path/to/python3.12   the Python for the venv (default: python3.13 .. python3)
  LAB_ENV_FILE=FILE            another settings file instead of .env
  SETUP_HEALTH_WAIT=SECONDS    how long docker waits for the dashboard's /healthz (default 120)
  MOSQUITTO_BIN, CHROMIUM_PATH the binaries the tests use (default: found by test)

Exit codes: 0 success, 1 failure, 2 usage error (or a wrong CA passphrase from the generator).
USAGE
}

# ---------------------------------------------------------------------------------------------
# Python and the virtual environment
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
# ensurepip into python3-venv). lab/packages.py (standard library only) installs that package when we may.
venv_works() {
    "$PYTHON_BIN" -c 'import venv' >/dev/null 2>&1 && "$PYTHON_BIN" -m ensurepip --version >/dev/null 2>&1
}

check_venv_support() {
    venv_works && return 0
    local minor=${PYTHON_VERSION%.*}
    log "Python $PYTHON_VERSION lacks the venv/ensurepip modules: installing python${minor}-venv where apt-get may"
    "$PYTHON_BIN" -m lab.packages debian "python${minor}-venv" ||
        "$PYTHON_BIN" -m lab.packages debian python3-venv || true
    venv_works && return 0
    fail "$PYTHON_BIN (Python $PYTHON_VERSION) cannot create virtual environments: the venv or ensurepip module is missing." \
        "Debian/Ubuntu: sudo apt-get install python3-venv   (or python${minor}-venv for this exact version)" \
        "Then re-run ./setup.sh"
}

venv_is_healthy() {
    [[ -x $VENV_PY ]] || return 1
    "$VENV_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 || return 1
    "$VENV_PY" -m pip --version >/dev/null 2>&1
}

# requirements_digest FILE...: sha256 over the names and contents of the files.
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

# install_lock LOCK: pip install that lock (with hashes), skipped when the stamp in .venv says that exactly this
# lock was installed already.
install_lock() {
    local lock=$1 digest stamp
    [[ -f $lock ]] || fail "$lock is missing: is this a complete checkout? (./setup.sh lock makes it)"
    stamp=$VENV_DIR/.setup-$lock.sha256
    digest=$(requirements_digest "$lock")
    [[ -f $stamp && $(<"$stamp") == "$digest" ]] && return 0 # up to date: nothing to say
    log "Installing Python dependencies into $VENV_DIR ($lock, hashes checked)"
    "$VENV_PY" -m pip install -q --disable-pip-version-check --no-input --require-hashes -r "$lock" ||
        fail "pip install --require-hashes -r $lock failed (see above)." \
            "Check the network/proxy settings for PyPI, then re-run; a broken $VENV_DIR can be removed with rm -rf $VENV_DIR"
    printf '%s\n' "$digest" >"$stamp"
}

# install_requirements runtime|dev: the locks of that profile. The dev lock holds the others. Runtime with a
# PostgreSQL DATABASE_URL (README, Configuration: the database) adds the driver's lock: lab.control, which reads
# .env with python-dotenv (installed by the runtime lock), says which lock the settings need.
install_requirements() {
    local lock
    if [[ $1 == dev ]]; then
        install_lock "$LOCK_DEV"
        requirements_digest "$LOCK_RUNTIME" >"$VENV_DIR/.setup-$LOCK_RUNTIME.sha256"
        requirements_digest "$LOCK_POSTGRES" >"$VENV_DIR/.setup-$LOCK_POSTGRES.sha256"
    else
        install_lock "$LOCK_RUNTIME"
        lock=$("$VENV_PY" -m lab.control lock-file) || fail "could not read the settings (see above)"
        [[ $lock == "$LOCK_RUNTIME" ]] || install_lock "$lock"
    fi
    install_project
}

# install_project: the lab itself into the venv (editable, no dependencies: they come from the locks), for its
# console script `iotca` (.venv/bin/iotca). Done once; a changed pyproject.toml does it again.
install_project() {
    local stamp=$VENV_DIR/.setup-project.sha256 digest
    [[ -f pyproject.toml ]] || return 0 # a partial copy of the lab (tests): nothing to install
    digest=$(requirements_digest pyproject.toml)
    [[ -f $stamp && $(<"$stamp") == "$digest" && -x $VENV_DIR/bin/iotca ]] && return 0
    log "Installing the lab's command iotca into $VENV_DIR (pip install --no-deps -e .)"
    "$VENV_PY" -m pip install -q --disable-pip-version-check --no-input --no-deps -e . ||
        fail "pip install --no-deps -e . failed (see above)." "Check the network/proxy settings for PyPI, then re-run."
    printf '%s\n' "$digest" >"$stamp"
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
# The hand-over
# ---------------------------------------------------------------------------------------------

main() {
    local command=${1-}
    case $command in
        help | -h | --help)
            usage
            return 0
            ;;
        test | lock) ensure_venv dev ;;
        "" | certs | native | docker | down | status) ensure_venv runtime ;;
        *)
            printf 'error: unknown command: %s\n\n' "$command" >&2
            usage >&2
            exit 2
            ;;
    esac
    exec "$VENV_PY" -m lab.control "$@"
}

main "$@"

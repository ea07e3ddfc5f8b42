"""System packages the lab needs (Mosquitto, Chromium, docker-compose, ...): found, or installed where we may.

apt-get as root or with passwordless `sudo -n` (never a password prompt), Homebrew on macOS; anywhere else the
error names the exact packages to install. The Debian `mosquitto` package brings a system service of its own:
the lab never starts or enables it, it runs its own broker with its own configuration.

Standard library only, on purpose: `./setup.sh` runs `python3 -m lab.packages debian python3-venv` with the
system's Python before the virtual environment exists (Debian splits venv and ensurepip into that package).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence

# Debian puts the broker in /usr/sbin, which is not on a normal user's PATH; Homebrew keeps it in its own sbin.
EXTRA_PLACES = {
    "mosquitto": (
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/opt/homebrew/sbin/mosquitto",
        "/usr/local/opt/mosquitto/sbin/mosquitto",
        "/opt/homebrew/opt/mosquitto/sbin/mosquitto",
    ),
    "chromium": ("chromium-browser",),
    "dockerd": ("/usr/sbin/dockerd",),
    "debootstrap": ("/usr/sbin/debootstrap",),
    "nginx": ("/usr/sbin/nginx",),
}
DEBIAN_PACKAGE = {"mosquitto_pub": "mosquitto-clients", "mosquitto_sub": "mosquitto-clients", "dockerd": "docker.io"}
# The Homebrew formula of a command; a command without one is installed by hand (Chromium: a cask).
BREW_FORMULA = {
    "mosquitto": "mosquitto",
    "mosquitto_pub": "mosquitto",
    "mosquitto_sub": "mosquitto",
    "docker-compose": "docker-compose",
    "redis-server": "redis",
    "nginx": "nginx",
}
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


class MissingPackages(Exception):
    """Commands that are still missing; the message has one line of fix per platform."""


def log(text: str) -> None:
    print(f"==> {text}", flush=True)


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def find_command(name: str) -> str | None:
    """The path of command `name`, also where it hides off PATH (Debian's /usr/sbin/mosquitto)."""
    for candidate in (name, *EXTRA_PLACES.get(name, ())):
        found = shutil.which(candidate)
        if found:
            return found
    return None


def root_prefix() -> list[str] | None:
    """[] when we are root, ["sudo", "-n"] when sudo works without a prompt, None when we may not act as root."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


_apt_updated = False


def apt_install(packages: Sequence[str]) -> bool:
    """apt-get install PACKAGES (after one `apt-get update` per run); False when it failed or may not run."""
    global _apt_updated
    prefix = root_prefix()
    if prefix is None or not shutil.which("apt-get"):
        return False
    apt = [*prefix, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-o", "Acquire::Retries=3"]
    if not _apt_updated:
        log("Refreshing the apt package lists (apt-get update)")
        if subprocess.run([*apt, "update", "-qq"], env=APT_ENV).returncode != 0:
            warn("apt-get update failed; trying the install with the package lists we have")
        _apt_updated = True
    log(f"Installing system packages: {' '.join(packages)}")
    return (
        subprocess.run([*apt, "install", "-y", "-qq", "--no-install-recommends", *packages], env=APT_ENV).returncode
        == 0
    )


def unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def ensure_commands(commands: Sequence[str]) -> None:
    """Install the packages of the commands that are missing; MissingPackages says what to do when we could not."""
    missing = [c for c in commands if find_command(c) is None]
    if not missing:
        return
    macos = platform.system() == "Darwin"
    if shutil.which("apt-get") and root_prefix() is not None:
        packages = unique([DEBIAN_PACKAGE.get(c, c) for c in missing])
        if not apt_install(packages):
            warn(f"apt-get install {' '.join(packages)} failed")
    elif macos and shutil.which("brew"):
        formulas = unique([BREW_FORMULA[c] for c in missing if c in BREW_FORMULA])
        if formulas:
            log(f"Installing with Homebrew: {' '.join(formulas)}")
            if subprocess.run(["brew", "install", *formulas]).returncode != 0:
                warn(f"brew install {' '.join(formulas)} failed")
    still = [c for c in missing if find_command(c) is None]
    if not still:
        return
    if macos:
        formulas = unique([BREW_FORMULA[c] for c in still if c in BREW_FORMULA])
        hints = [f"brew install {' '.join(formulas)}"] if formulas else []
        hints += [
            f"{c}: install it yourself (Chromium: brew install --cask chromium)" for c in still if c not in BREW_FORMULA
        ]
    else:
        packages = unique([DEBIAN_PACKAGE.get(c, c) for c in still])
        hints = [f"Debian/Ubuntu/WSL: sudo apt-get install --no-install-recommends {' '.join(packages)}"]
        if not shutil.which("apt-get"):
            hints.append(f"Other systems: install the packages that provide: {' '.join(still)}")
        elif root_prefix() is None:
            hints.append("(setup.sh installs them itself when run as root or with passwordless sudo)")
    raise MissingPackages("\n".join([f"missing system commands: {' '.join(still)}", *hints]))


def debian_installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return result.stdout.strip() == "install ok installed"


def ensure_debian_packages(packages: Sequence[str]) -> bool:
    """Install the Debian packages that are not installed, where apt-get may be used; elsewhere do nothing (for
    what only Debian needs, or what the tests that need it skip without). False when an install failed."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-query") and root_prefix() is not None):
        return True
    missing = [p for p in packages if not debian_installed(p)]
    if missing and not apt_install(missing):
        warn(f"apt-get install {' '.join(missing)} failed")
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lab.packages debian PKG...`: exit 0 when every package is installed (or apt is not ours)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "debian":
        print("usage: python -m lab.packages debian PACKAGE...", file=sys.stderr)
        return 2
    return 0 if ensure_debian_packages(args[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())

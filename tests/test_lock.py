"""The locks (`./setup.sh lock`): every transitive dependency pinned with hashes, and in step with the requirements
files they are made from, so what setup.sh and the images install is exactly what was reviewed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import PROJECT_ROOT

LOCKS = {
    "requirements.lock": ["requirements.txt"],
    "requirements-postgres.lock": ["requirements.txt", "requirements-postgres.txt"],
    "requirements-dev.lock": ["requirements-dev.txt"],
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", re.MULTILINE)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path, seen: set[Path] | None = None) -> dict[str, str]:
    """`name==version` lines of a requirements file, following its `-r` includes."""
    seen = seen or set()
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r"):
            include = path.parent / line[2:].strip()
            if include not in seen:
                seen.add(include)
                found.update(pins(include, seen))
        elif match := PIN.match(line):
            found[canonical(match.group(1))] = match.group(2)
    return found


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_the_lock_pins_every_requirement_with_hashes(lock: str) -> None:
    text = (PROJECT_ROOT / lock).read_text()
    assert "./setup.sh lock" in text.splitlines()[1], "made by ./setup.sh lock"
    locked = {canonical(name): version for name, version in PIN.findall(text)}
    wanted: dict[str, str] = {}
    for source in LOCKS[lock]:
        wanted.update(pins(PROJECT_ROOT / source))
    stale = {name: (version, locked.get(name)) for name, version in wanted.items() if locked.get(name) != version}
    assert stale == {}, f"{lock} is out of step with {LOCKS[lock]}: run ./setup.sh lock ({stale})"
    # Every entry carries its hashes (pip then refuses anything else).
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2].strip())
    assert len(entries) == len(PIN.findall(text)) and len(locked) > len(wanted)
    for entry in entries:
        assert "--hash=sha256:" in entry, entry.splitlines()[0]


def test_setup_and_the_images_install_the_locks_with_hashes() -> None:
    setup = (PROJECT_ROOT / "setup.sh").read_text()
    assert "--require-hashes" in setup
    for dockerfile, lock in (
        ("Dockerfile_thermometer", "requirements.lock"),
        ("dashboard/Dockerfile", "requirements-postgres.lock"),
    ):
        text = (PROJECT_ROOT / dockerfile).read_text()
        assert f"--require-hashes -r {lock}" in text, dockerfile

"""The code base stays ruff-clean and ruff-formatted (the project's rules live in pyproject.toml, among them at
most 6 parameters a function), and no module of the project grows past MAX_MODULE_LINES."""

import subprocess
import sys
from pathlib import Path

from .conftest import PROJECT_ROOT


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", str(PROJECT_ROOT)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", str(PROJECT_ROOT)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# A module longer than this wants splitting along a seam; the tests are held to it too (a module whose set-up is
# expensive, such as the Docker lab's, keeps its tests together and moves its harness to a support module).
MAX_MODULE_LINES = 450
# Everything git does not track, and third-party code served as it was released.
NOT_OURS = {".venv", "build", "test-output", "__pycache__", "vendor", "node_modules", ".docker-build"}


def project_sources(root: Path) -> list[Path]:
    return [
        path
        for pattern in ("*.py", "*.js", "*.sh")
        for path in root.rglob(pattern)
        if not NOT_OURS.intersection(path.relative_to(root).parts) and not path.name.startswith(".")
    ]


def test_no_module_is_over_the_line_limit() -> None:
    sources = project_sources(PROJECT_ROOT)
    assert len(sources) > 150  # the walk found the project and its tests
    long = {
        str(path.relative_to(PROJECT_ROOT)): lines
        for path in sources
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"split these modules along a seam (at most {MAX_MODULE_LINES} lines): {long}"

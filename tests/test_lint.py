"""The code base stays ruff-clean (the project's lint rules live in pyproject.toml)."""

import shutil
import subprocess
import sys

from .conftest import PROJECT_ROOT


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff") or str(PROJECT_ROOT / ".venv" / "bin" / "ruff")
    result = subprocess.run([ruff, "check", "--no-cache", str(PROJECT_ROOT)], capture_output=True, text=True,
                            env={"PATH": f"{sys.prefix}/bin"})
    assert result.returncode == 0, result.stdout + result.stderr

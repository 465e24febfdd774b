"""The tree stays ruff-clean, ruff-formatted and mypy-clean (the checks a commit runs by hand)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CODE = ["riffloop", "services", "tests", "bench", "scripts", "deploy"]


def _run(*argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s
    )


@pytest.mark.unit
def test_ruff_lint_and_format_are_clean() -> None:
    lint = _run(str(BIN / "ruff"), "check", *CODE)
    assert lint.returncode == 0, f"ruff check:\n{lint.stdout}{lint.stderr}"
    fmt = _run(str(BIN / "ruff"), "format", "--check", *CODE)
    assert fmt.returncode == 0, f"ruff format --check:\n{fmt.stdout}{fmt.stderr}"


@pytest.mark.slow
def test_mypy_finds_no_type_errors(tmp_path: Path) -> None:
    """mypy over the package, the services and the benchmarks (settings in pyproject.toml).
    A fresh cache: a stale one from another checkout must not hide an error."""
    result = _run(
        sys.executable,
        "-m",
        "mypy",
        "--cache-dir",
        str(tmp_path / "mypy"),
        "riffloop",
        "services",
        "bench",
        timeout_s=600,
    )
    assert result.returncode == 0, f"mypy:\n{result.stdout}{result.stderr}"

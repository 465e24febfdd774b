"""``python -m riffloop.stack``: usage errors and ``status`` of a stack that is not running (the
full ``up``/``down`` cycle is what tests/e2e runs through ``ServiceProcesses``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _stack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "riffloop.stack", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_an_unknown_command_is_a_usage_error() -> None:
    result = _stack("sideways")
    assert result.returncode == 2
    assert "invalid choice: 'sideways'" in result.stderr and "Traceback" not in result.stderr


def test_status_of_a_stack_that_never_ran_names_every_service(tmp_path: Path) -> None:
    result = _stack("status", "--state-dir", str(tmp_path / "stack"))
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())
    for service in ("trainer", "encoder", "generator", "feedback", "selector", "gateway"):
        assert lines[service] == "not started"
    assert {"kafka", "redis"} <= set(lines)  # the infrastructure's servers, whatever their state

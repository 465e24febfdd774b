"""``python -m riffloop.core``: settings print masked; misuse exits 2 with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[3]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "riffloop.core", *args],
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_settings_are_printed_with_secrets_masked() -> None:
    result = run("settings", env={"RIFFLOOP_S3_SECRET_KEY": "s3cr3t", "RIFFLOOP_GRPC_PORT": "7000"})
    assert result.returncode == 0, result.stderr
    assert "grpc_port=7000" in result.stdout.splitlines()
    assert "s3_secret_key=****" in result.stdout.splitlines()
    assert "s3cr3t" not in result.stdout


def test_bad_settings_exit_2_with_one_line() -> None:
    result = run("settings", env={"RIFFLOOP_GRPC_PORT": "many"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "RIFFLOOP_GRPC_PORT must be an integer" in result.stderr


def test_replay_needs_the_real_backend() -> None:
    result = run("replay-dlq", "tracks.scored.v1")
    assert result.returncode == 2
    assert "RIFFLOOP_BACKEND=real" in result.stderr


def test_replay_rejects_unknown_topics() -> None:
    result = run("replay-dlq", "tracks.scored.v2")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr

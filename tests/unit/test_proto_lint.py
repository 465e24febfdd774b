"""The proto tree is buf STANDARD clean, generates, and its generated code is never committed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUF = Path(sys.executable).parent / "buf"

pytestmark = pytest.mark.unit


def _buf() -> str:
    found = str(BUF) if BUF.is_file() else shutil.which("buf")
    if found is None:
        pytest.fail("buf is not installed; it comes from PyPI buf-bin (requirements.txt)")
    return found


def test_buf_lint_is_clean() -> None:
    result = subprocess.run(
        [_buf(), "lint"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"buf lint found problems:\n{result.stdout}{result.stderr}"


def test_buf_lint_catches_a_bad_enum(tmp_path: Path) -> None:
    """The lint really runs STANDARD: an enum without an *_UNSPECIFIED zero value fails."""
    (tmp_path / "buf.yaml").write_text((REPO_ROOT / "buf.yaml").read_text())
    bad = tmp_path / "proto" / "riffloop" / "v1"
    bad.mkdir(parents=True)
    (bad / "bad.proto").write_text(
        'syntax = "proto3";\npackage riffloop.v1;\nenum Colour {\n  RED = 0;\n}\n'
    )
    result = subprocess.run(
        [_buf(), "lint"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "UNSPECIFIED" in result.stdout + result.stderr


def test_no_generated_code_is_committed() -> None:
    result = subprocess.run(
        ["git", "ls-files", "--", "*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "riffloop/v1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == "", f"generated code is committed:\n{result.stdout}"


def test_generation_is_idempotent_and_importable() -> None:
    script = REPO_ROOT / "scripts" / "gen_proto.py"
    first = subprocess.run(
        [sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    second = subprocess.run(
        [sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    from riffloop.v1 import events_pb2

    names = {f.name for f in events_pb2.Envelope.DESCRIPTOR.oneofs_by_name["payload"].fields}
    assert {"song_uploaded", "track_ready", "model_published", "dead_letter"} <= names

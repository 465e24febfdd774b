"""riffloop.core has one public surface: __all__ lists exactly its public names, all importable,
and importing it loads none of the Kafka, S3 or Redis client libraries."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import riffloop.core

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_all_matches_the_public_names() -> None:
    public = {name for name in vars(riffloop.core) if not name.startswith("_")}
    assert set(riffloop.core.__all__) == public
    assert len(riffloop.core.__all__) == len(set(riffloop.core.__all__))
    for name in riffloop.core.__all__:
        assert getattr(riffloop.core, name) is not None


def test_classes_and_functions_come_from_private_modules() -> None:
    for name in riffloop.core.__all__:
        value = getattr(riffloop.core, name)
        if isinstance(value, type) or inspect.isfunction(value):
            assert value.__module__.startswith("riffloop.core._"), f"{name}: {value.__module__}"


def test_import_is_light() -> None:
    code = (
        "import sys, riffloop.core\n"
        "heavy = [m for m in ('kafka', 'minio', 'redis', 'urllib3', 'torch', 'grpc')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == ""

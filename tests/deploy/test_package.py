"""`pip install .` gives a front-end team the typed gateway client: the wheel carries the
generated protobuf modules (built, not committed) and the client imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_the_generated_code_and_the_client(tmp_path: Path) -> None:
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",  # this environment has setuptools and grpcio-tools
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("riffloop-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "riffloop/v1/gateway_service_pb2.py",
        "riffloop/v1/gateway_service_pb2_grpc.py",
        "riffloop/v1/gateway_service_pb2.pyi",
        "riffloop/client/_client.py",
        "riffloop/py.typed",
    ):
        assert needed in names, needed
    assert not any(n.startswith(("services/", "tests/", "bench/")) for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert sorted(r.split()[1].split(">")[0] for r in requires) == ["grpcio", "protobuf"]
    # the client alone: no torch, Kafka, Redis or numpy behind it
    probe = (
        "import sys; from riffloop.client import GatewayClient; "
        "print(sorted(m for m in ('torch', 'kafka', 'redis', 'numpy') if m in sys.modules))"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(wheel)},
        cwd=tmp_path,
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert imported.stdout.strip() == "[]"

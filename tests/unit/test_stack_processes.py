"""Service processes started for tests and benchmarks die with the process that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by init) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_service_ends_when_its_parent_is_killed(tmp_path: Path, tied: bool) -> None:
    """kill -9 the parent (no teardown runs): a tied service gets SIGTERM and drains; an untied
    one (``stack up``'s) keeps running until it is stopped."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from pathlib import Path
                from riffloop.stack import ServiceProcesses
                stack = ServiceProcesses(Path({str(tmp_path)!r}), {{}}, tied_to_parent={tied})
                print(stack.start("selector").pid, flush=True)
                time.sleep(600)
                """
            ),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    try:
        time.sleep(2.0)  # the service is importing: signals must work at any point
        assert _alive(pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + (60 if tied else 3)
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if tied:
            assert not _alive(pid), "the tied service outlived its parent"
        else:
            assert _alive(pid), "stack up's services must outlive the command"
    finally:
        parent.stdout.close()
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)

"""Server processes: spawn with the log in a file, recognise them again by pid, stop them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from riffloop.infra._layout import InfraError

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ProcessRecord:
    """A started server: pid plus its start time, so a recycled pid is never mistaken for it."""

    pid: int
    create_time: float

    def to_json(self) -> dict[str, float | int]:
        return {"pid": self.pid, "create_time": self.create_time}

    @classmethod
    def from_json(cls, data: dict[str, float | int]) -> ProcessRecord:
        return cls(pid=int(data["pid"]), create_time=float(data["create_time"]))


def spawn(
    argv: list[str],
    *,
    log_path: Path,
    cwd: Path,
    env: dict[str, str],
    tie_to_parent: bool,
) -> tuple[subprocess.Popen[bytes] | None, ProcessRecord]:
    """Start `argv` in its own session with stdout+stderr appended to `log_path`.

    `tie_to_parent=True` (tests): the server is our child, and the kernel SIGKILLs it when we die
    (Linux PR_SET_PDEATHSIG), so a test run killed hard leaves no server behind; the handle is
    returned so `stop` can reap it. `False` (`up`): the server is started through a shell that exits
    at once, so init adopts it, it outlives this process, and no handle is returned.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(argv)}\n".encode())
        log.flush()
        if tie_to_parent:
            process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            return process, ProcessRecord(process.pid, _create_time(process.pid))
        launcher = subprocess.run(
            ["/bin/sh", "-c", _DETACH, "riffloop-infra", str(log_path), *argv],
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=cwd,
            env=env,
            start_new_session=True,
            check=False,
        )
    pid = launcher.stdout.decode().strip()
    if launcher.returncode != 0 or not pid.isdigit():
        raise InfraError(f"Could not start {argv[0]}; see {log_path}.")
    return None, ProcessRecord(int(pid), _create_time(int(pid)))


# $1 is the log, the rest the server's argv; prints the server's pid and exits at once.
_DETACH = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def is_alive(record: ProcessRecord) -> bool:
    """True while the recorded process runs (not a zombie, and the pid was not recycled)."""
    try:
        process = psutil.Process(record.pid)
        if abs(process.create_time() - record.create_time) > 1.0:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(
    record: ProcessRecord,
    *,
    handle: subprocess.Popen[bytes] | None = None,
    grace_s: float = 20.0,
    hard: bool = False,
) -> None:
    """SIGTERM (or SIGKILL when `hard`), wait up to `grace_s`, then SIGKILL; reaps our children."""
    # Our own child cannot have its pid recycled before we wait for it, so its handle decides.
    alive = handle.poll() is None if handle is not None else is_alive(record)
    if alive:
        _signal(record.pid, signal.SIGKILL if hard else signal.SIGTERM)
        if not _wait_gone(record, handle, grace_s):
            _signal(record.pid, signal.SIGKILL)
            _wait_gone(record, handle, 10.0)
    if handle is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            handle.wait(timeout=10.0)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait_gone(
    record: ProcessRecord, handle: subprocess.Popen[bytes] | None, timeout_s: float
) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if handle is not None:
            if handle.poll() is not None:
                return True
        elif not is_alive(record):
            return True
        time.sleep(0.05)
    return False


def free_port(taken: set[int]) -> int:
    """A loopback TCP port nobody listens on now (and not in `taken`)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(
    probe: Callable[[], bool], *, timeout_s: float, alive: Callable[[], bool], interval_s: float
) -> str:
    """Poll `probe` until true: "ready", or "exited" when the process died, or "timeout"."""
    deadline = time.monotonic() + timeout_s
    while True:
        if probe():
            return "ready"
        if not alive():
            return "exited"
        if time.monotonic() >= deadline:
            return "timeout"
        time.sleep(interval_s)


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 8192))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])

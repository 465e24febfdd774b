"""The whole system on one machine: local infrastructure plus the six services as processes.

``ServiceProcesses`` starts ``python -m services.<name>`` for each service with the infra's
``RIFFLOOP_*`` settings, free loopback ports, one log file each, and waits until every gRPC health
check says SERVING. ``state.json`` records pids and ports so ``status`` and ``down`` work from
another shell. ``down`` sends SIGTERM (the services drain) and SIGKILLs what is left after the
grace period. ``kill``/``restart`` serve fault-injection tests (kill -9 and start again).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from riffloop.core import TransientError

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES: tuple[str, ...] = ("trainer", "encoder", "generator", "feedback", "selector", "gateway")

# Settings for a quick stack on a laptop or in a test: an untrained tiny model (its tracks are
# noise; without --tiny the trainer serves the trained assets/base-model), few steps, gate
# skipped, and a new version promoted at once (then watched) instead of a canary that needs 20+
# ratings a side.
TINY: dict[str, dict[str, str]] = {
    "trainer": {
        "RIFFLOOP_UNTRAINED_BASE": "1",
        "RIFFLOOP_BASE_PRESET": "tiny",
        "RIFFLOOP_FINETUNE_STEPS": "4",
        "RIFFLOOP_BATCH_SIZE": "2",
        "RIFFLOOP_GATE_MODE": "skip",
        "RIFFLOOP_CANARY_SHARE": "0",
    },
    "encoder": {"RIFFLOOP_INVERSION_STEPS": "5"},
    "generator": {"RIFFLOOP_DEFAULT_QUALITY": "5"},
    "feedback": {"RIFFLOOP_SCORE_INTERVAL_S": "0.5"},
    "selector": {"RIFFLOOP_SELECT_INTERVAL_S": "1.0", "RIFFLOOP_MIN_NEW_SCORES": "2"},
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    name: str
    pid: int
    grpc_port: int
    metrics_port: int
    log: str
    # The gateway's browser API and web page (RIFFLOOP_CONNECT_PORT); 0 for the other services.
    web_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def web_url(self) -> str:
        """The page's address ("" for a service without one)."""
        return f"http://127.0.0.1:{self.web_port}/" if self.web_port else ""

    def alive(self) -> bool:
        """Whether the pid runs (a zombie counts as dead)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # field 3 of /proc/<pid>/stat is the state; Z = exited, not yet reaped
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state != "Z"

    def health(self, timeout_s: float = 1.0) -> str:
        """SERVING / NOT_SERVING / UNREACHABLE."""
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            except grpc.RpcError:
                return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


@dataclass
class StackState:
    auth_secret: str
    # RIFFLOOP_DISPATCH_KEY of the gateway and the generator (blind dispatch; never shown).
    dispatch_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    # RIFFLOOP_OPERATOR_SECRET of the internal services: their RPCs take operator tokens
    # signed with it (riffloop.runtime.operator_token).
    operator_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "auth_secret": self.auth_secret,
            "dispatch_key": self.dispatch_key,
            "operator_secret": self.operator_secret,
            "processes": {k: asdict(v) for k, v in self.processes.items()},
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> StackState | None:
        if not path.is_file():
            return None
        body = json.loads(path.read_text())
        processes = {k: ServiceProcess(**v) for k, v in body["processes"].items()}
        state = cls(body["auth_secret"], processes=processes)
        if body.get("dispatch_key"):  # (a state file written before the key existed has none)
            state.dispatch_key = body["dispatch_key"]
        if body.get("operator_secret"):
            state.operator_secret = body["operator_secret"]
        return state


def _parent_death_signal() -> Callable[[], None] | None:
    """A function for the child between fork and exec that asks Linux for SIGTERM when the
    parent dies (prctl PR_SET_PDEATHSIG); resolved here, in the parent, so the forked child
    imports and looks up nothing. None where there is no prctl (not Linux)."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


class ServiceProcesses:
    """The six service processes of one stack (the infra is started separately).

    ``stack up`` leaves its services running after the command returns. Tests and benchmarks
    pass ``tied_to_parent=True`` instead: each service then gets SIGTERM (Linux's parent-death
    signal) when the process that started it dies, so a test run killed before its teardown
    leaves no services behind."""

    def __init__(
        self,
        state_dir: Path,
        infra_env: Mapping[str, str],
        *,
        overrides: Mapping[str, Mapping[str, str]] | None = None,
        tied_to_parent: bool = False,
    ) -> None:
        self.tied_to_parent = tied_to_parent
        self.state_dir = state_dir
        self.infra_env = dict(infra_env)
        self.overrides = {k: dict(v) for k, v in (overrides or {}).items()}
        self.state_path = state_dir / "state.json"
        self.state = StackState.load(self.state_path) or StackState(secrets.token_urlsafe(24))
        # Children started by this object, kept so they can be reaped (others: by pid only).
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def _env(self, name: str, process: ServiceProcess) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RIFFLOOP_")}
        env.update(self.infra_env)
        env.update(
            RIFFLOOP_SERVICE_NAME=name,
            RIFFLOOP_GRPC_PORT=str(process.grpc_port),
            RIFFLOOP_METRICS_PORT=str(process.metrics_port),
            PYTHONPATH=os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            OMP_NUM_THREADS="1",
        )
        if name == "gateway":
            env["RIFFLOOP_AUTH_SECRET"] = self.state.auth_secret
            # The page on loopback; a local stack is a development stack, so its sign-in page
            # issues tokens for any name (RIFFLOOP_DEV_SIGN_IN; never in production).
            env["RIFFLOOP_CONNECT_PORT"] = str(process.web_port)
            env["RIFFLOOP_DEV_SIGN_IN"] = "true"
        else:  # the internal services answer operators only
            env["RIFFLOOP_OPERATOR_SECRET"] = self.state.operator_secret
        if name in ("gateway", "generator"):
            env["RIFFLOOP_DISPATCH_KEY"] = self.state.dispatch_key
        env.update(self.overrides.get(name, {}))
        return env

    def operator_channel(self, name: str) -> grpc.Channel:
        """A channel to one internal service whose calls carry an operator token of this
        stack (its RPCs refuse calls without one)."""
        from riffloop.client import operator_channel
        from riffloop.runtime import operator_token

        token = operator_token(self.state.operator_secret, "stack-operator")
        return operator_channel(self.state.processes[name].target, token)

    def start(self, name: str) -> ServiceProcess:
        """Start (or restart on the same ports) one service; does not wait for health."""
        old = self.state.processes.get(name)
        grpc_port = old.grpc_port if old else free_port()
        metrics_port = old.metrics_port if old else free_port()
        web_port = 0
        if name == "gateway":
            web_port = old.web_port if old and old.web_port else free_port()
        log = self.state_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        placeholder = ServiceProcess(name, 0, grpc_port, metrics_port, str(log), web_port)
        with log.open("ab") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                cwd=REPO_ROOT,
                env=self._env(name, placeholder),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_parent_death_signal() if self.tied_to_parent else None,
            )
        process = ServiceProcess(name, child.pid, grpc_port, metrics_port, str(log), web_port)
        self._children[child.pid] = child
        self.state.processes[name] = process
        self.state.save(self.state_path)
        return process

    def wait_serving(self, names: tuple[str, ...] = SERVICES, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(names)
        while pending:
            name = pending[0]
            process = self.state.processes[name]
            if not process.alive():
                tail = Path(process.log).read_text(errors="replace")[-2000:]
                raise TransientError(f"{name} exited during start-up; log tail:\n{tail}")
            if process.health() == "SERVING":
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TransientError(
                    f"{name} not SERVING after {timeout_s:.0f} s (log: {process.log})"
                )
            time.sleep(0.25)

    def up(self, names: tuple[str, ...] = SERVICES, timeout_s: float = 180.0) -> None:
        for name in names:
            process = self.state.processes.get(name)
            if process is None or not process.alive():
                self.start(name)
        self.wait_serving(names, timeout_s)

    def kill(self, name: str) -> None:
        """kill -9, no drain (fault injection)."""
        process = self.state.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        self._reap(process, 10.0)

    def stop(self, name: str, grace_s: float = 20.0) -> int | None:
        """SIGTERM (drain), then SIGKILL after ``grace_s``; returns the exit status if known."""
        process = self.state.processes.get(name)
        if process is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        status = self._reap(process, grace_s)
        if process.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            status = self._reap(process, 5.0)
        return status

    def _reap(self, process: ServiceProcess, timeout_s: float) -> int | None:
        child = self._children.get(process.pid)
        if child is not None:
            try:
                code = child.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return None
            self._children.pop(process.pid, None)
            return code
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                done, status = os.waitpid(process.pid, os.WNOHANG)
            except ChildProcessError:  # not our child (another shell started it)
                if not process.alive():
                    return None
            else:
                if done == process.pid:
                    return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        return None

    def down(self, grace_s: float = 20.0) -> dict[str, int | None]:
        codes = {}
        for name in reversed(SERVICES):
            if name in self.state.processes:
                codes[name] = self.stop(name, grace_s)
        self.state.processes.clear()
        self.state.save(self.state_path)
        return codes

    def status(self) -> dict[str, str]:
        out = {}
        for name in SERVICES:
            process = self.state.processes.get(name)
            if process is None:
                out[name] = "not started"
            elif not process.alive():
                out[name] = f"dead (pid {process.pid})"
            else:
                out[name] = (
                    f"{process.health()} pid {process.pid} grpc {process.target} "
                    f"metrics :{process.metrics_port}"
                )
        return out

"""`LocalInfra`: one Kafka + S3 + Redis stack on loopback, recorded in a state folder.

    <state>/infra.json   ports, pids, credentials, addresses (what `down` and `status` read)
    <state>/infra.env    RIFFLOOP_* variables for `set -a; . infra.env` or `Settings.from_env()`
    <state>/<server>/    config, data and `<server>.log` of kafka, s3, redis

Start-up steps: 1. check installs, 2. adopt servers still running from an earlier `up`, 3. spawn
the others on free ports (the recorded ones when still free, so addresses stay stable), 4. wait
until each is really ready, 5. create the topics and buckets of docs/ARCHITECTURE.md, 6. write the
address files.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from riffloop.core import Settings, durability_config, topic_config
from riffloop.infra._catalog import BUCKETS, TOPIC_PARTITIONS, all_topics
from riffloop.infra._install import Progress
from riffloop.infra._layout import CacheLayout, InfraError, default_state_dir
from riffloop.infra._process import (
    ProcessRecord,
    free_port,
    is_alive,
    log_tail,
    port_is_free,
    spawn,
    stop,
    wait_until,
)
from riffloop.infra._servers import (
    KafkaServer,
    RedisServer,
    S3Server,
    Server,
    kafka_admin_or_none,
)

SERVER_NAMES: tuple[str, ...] = ("kafka", "s3", "redis")
_STATE_VERSION = 1
_TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code


@dataclass(frozen=True)
class InfraAddresses:
    """How clients reach a running stack; `.env()` gives the RIFFLOOP_* settings for it."""

    kafka_bootstrap: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    redis_url: str

    def env(self) -> dict[str, str]:
        return {
            "RIFFLOOP_BACKEND": "real",
            "RIFFLOOP_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "RIFFLOOP_S3_ENDPOINT": self.s3_endpoint,
            "RIFFLOOP_S3_ACCESS_KEY": self.s3_access_key,
            "RIFFLOOP_S3_SECRET_KEY": self.s3_secret_key,
            "RIFFLOOP_REDIS_URL": self.redis_url,
        }

    @classmethod
    def from_env_file(cls, path: Path) -> InfraAddresses:
        """Read an `infra.env` written by `up` (KEY=value lines, # comments)."""
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise InfraError(
                f"Cannot read {path} ({error.strerror}); run `python -m riffloop.infra up` "
                "or fix the path."
            ) from None
        values: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
        names = {
            "kafka_bootstrap": "RIFFLOOP_KAFKA_BOOTSTRAP",
            "s3_endpoint": "RIFFLOOP_S3_ENDPOINT",
            "s3_access_key": "RIFFLOOP_S3_ACCESS_KEY",
            "s3_secret_key": "RIFFLOOP_S3_SECRET_KEY",
            "redis_url": "RIFFLOOP_REDIS_URL",
        }
        missing = [variable for variable in names.values() if not values.get(variable)]
        if missing:
            raise InfraError(f"{path} lacks {', '.join(missing)}; rewrite it with `up`.")
        return cls(**{attribute: values[variable] for attribute, variable in names.items()})


@dataclass(frozen=True)
class ServerStatus:
    name: str
    description: str
    address: str
    pid: int | None
    alive: bool
    ready: bool
    log_path: Path


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes in unpadded URL-safe base64, never starting with "-"
    (one in 64 would, and StorageTool's argument parser then reads ``-t -abc…`` as a missing
    value and an unknown option; Kafka's own Uuid.randomUuid redraws those too)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class _State:
    """The contents of infra.json."""

    cluster_id: str
    access_key: str
    secret_key: str
    ports: dict[str, dict[str, int]] = field(default_factory=dict)
    processes: dict[str, ProcessRecord] = field(default_factory=dict)

    @classmethod
    def new(cls) -> _State:
        return cls(
            cluster_id=new_cluster_id(),
            access_key="riffloop",
            secret_key=secrets.token_urlsafe(24),
        )

    @classmethod
    def load(cls, path: Path) -> _State | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise InfraError(
                f"{path} is unreadable ({error}); stop stray servers by hand and delete it."
            ) from None
        if data.get("version") != _STATE_VERSION:
            raise InfraError(f"{path} was written by another version; delete its folder.")
        return cls(
            cluster_id=data["kafka_cluster_id"],
            access_key=data["s3_access_key"],
            secret_key=data["s3_secret_key"],
            ports={name: dict(ports) for name, ports in data["ports"].items()},
            processes={
                name: ProcessRecord.from_json(record) for name, record in data["processes"].items()
            },
        )

    def to_json(self, addresses: dict[str, str]) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "kafka_cluster_id": self.cluster_id,
            "s3_access_key": self.access_key,
            "s3_secret_key": self.secret_key,
            "ports": self.ports,
            "processes": {name: record.to_json() for name, record in self.processes.items()},
            "addresses": addresses,
        }


class LocalInfra:
    """Start, stop, kill and restart a local Kafka + S3 + Redis stack kept under `state_dir`."""

    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        layout: CacheLayout | None = None,
        progress: Progress | None = None,
        tie_to_parent: bool = False,
    ) -> None:
        self.state_dir = (state_dir or default_state_dir()).resolve()
        self.layout = layout or CacheLayout.default()
        self._progress = progress or (lambda message: None)
        self._tie_to_parent = tie_to_parent
        self._handles: dict[str, subprocess.Popen[bytes]] = {}
        self._lock_depth = 0
        self._state = _State.load(self.json_path) or _State.new()

    # Paths and addresses.

    @property
    def json_path(self) -> Path:
        return self.state_dir / "infra.json"

    @property
    def env_path(self) -> Path:
        return self.state_dir / "infra.env"

    def server(self, name: str) -> Server:
        if name not in SERVER_NAMES:
            raise InfraError(f"Unknown server {name!r}; choose from {', '.join(SERVER_NAMES)}.")
        home = self.state_dir / name
        ports = self._state.ports.get(name, {})
        if name == "kafka":
            return KafkaServer(home, ports, self.layout, self._state.cluster_id)
        if name == "s3":
            return S3Server(
                home, ports, self.layout, self._state.access_key, self._state.secret_key
            )
        return RedisServer(home, ports, self.layout)

    @property
    def addresses(self) -> InfraAddresses:
        """The stack's addresses as last recorded in infra.json (by this or another process)."""
        self._reload()
        return self._addresses()

    def _addresses(self) -> InfraAddresses:
        missing = [name for name in SERVER_NAMES if name not in self._state.ports]
        if missing:
            raise InfraError(f"No ports recorded for {', '.join(missing)}; run `up` first.")
        return InfraAddresses(
            kafka_bootstrap=self.server("kafka").address,
            s3_endpoint=self.server("s3").address,
            s3_access_key=self._state.access_key,
            s3_secret_key=self._state.secret_key,
            redis_url=self.server("redis").address,
        )

    # Lifecycle.

    def start(self) -> InfraAddresses:
        """Bring every server up and ready, create topics and buckets; idempotent."""
        with self._exclusive():
            return self._start()

    def _start(self) -> InfraAddresses:
        servers = [self.server(name) for name in SERVER_NAMES]
        for server in servers:  # 1.
            server.check_installed()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        started: list[str] = []
        try:
            for server in servers:  # 2. and 3.
                record = self._state.processes.get(server.name)
                if record is not None and is_alive(record):
                    self._progress(f"{server.name}: already running (pid {record.pid})")
                    continue
                self._launch(server.name)
                started.append(server.name)
            self._save()
            for name in SERVER_NAMES:  # 4.
                self._wait_ready(name)
            self.create_topics(all_topics())  # 5.
            self.create_buckets(BUCKETS)
        except BaseException:
            for name in started:
                self._stop_one(name, hard=True)
            self._save()
            raise
        self._save(write_env=True)  # 6.
        return self._addresses()

    def stop(self) -> None:
        """Stop every recorded server (SIGTERM, then SIGKILL after a grace period)."""
        with self._exclusive():
            for name in SERVER_NAMES:
                self._stop_one(name, hard=False)
            self._save()
            self.env_path.unlink(missing_ok=True)

    def kill(self, name: str) -> None:
        """SIGKILL one server, as a crash would (fault injection)."""
        self.server(name)
        with self._exclusive():
            self._stop_one(name, hard=True)
            self._save(write_env=True)

    def restart(self, name: str) -> None:
        """Stop one server if it runs, start it on the same ports and wait until it is ready."""
        self.server(name)
        with self._exclusive():
            self._stop_one(name, hard=False)
            self._launch(name, same_ports=True)
            self._save()
            self._wait_ready(name)
            self._save(write_env=True)

    def purge(self) -> None:
        """Stop everything and delete the state folder (data, logs, addresses)."""
        with self._exclusive():
            self.stop()
            if self.state_dir.exists():
                shutil.rmtree(self.state_dir)
            self._state = _State.new()

    def status(self) -> list[ServerStatus]:
        self._reload()
        statuses = []
        for name in SERVER_NAMES:
            server = self.server(name)
            record = self._state.processes.get(name)
            alive = record is not None and is_alive(record)
            statuses.append(
                ServerStatus(
                    name=name,
                    description=server.description,
                    address=server.address if name in self._state.ports else "-",
                    pid=record.pid if record else None,
                    alive=alive,
                    ready=alive and server.probe(),
                    log_path=server.log_path,
                )
            )
        return statuses

    def __enter__(self) -> InfraAddresses:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Extra topics and buckets (tests use fresh names).

    def create_topics(self, names: Iterable[str], partitions: int = TOPIC_PARTITIONS) -> None:
        create_topics(self._addresses().kafka_bootstrap, names, partitions)

    def create_buckets(self, names: Iterable[str]) -> None:
        create_buckets(self._addresses(), names)

    # Internals.

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One process at a time changes a stack (two `up`s in two shells must not race)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                self._reload()
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _reload(self) -> None:
        """Pick up what another process (the CLI, another `LocalInfra`) recorded meanwhile."""
        self._state = _State.load(self.json_path) or self._state

    def _launch(self, name: str, *, same_ports: bool = False) -> None:
        """Spawn one server: on its recorded ports when they are free (always, if `same_ports`:
        clients of a restarted server keep their addresses), else on new free ones."""
        taken = {port for ports in self._state.ports.values() for port in ports.values()}
        recorded = self._state.ports.get(name, {})
        server = self.server(name)
        if same_ports and set(recorded) == set(server.port_names):
            for port in recorded.values():
                self._wait_port_free(name, port)
        elif set(recorded) != set(server.port_names) or not all(
            port_is_free(port) for port in recorded.values()
        ):
            self._state.ports[name] = {key: free_port(taken) for key in server.port_names}
            server = self.server(name)
        server.prepare()
        if isinstance(server, KafkaServer) and server.needs_format():
            self._format_kafka(server)
        self._progress(f"{name}: starting {server.description} on {server.address}")
        handle, record = spawn(
            server.argv(),
            log_path=server.log_path,
            cwd=server.home,
            env=server.env(),
            tie_to_parent=self._tie_to_parent,
        )
        if handle is not None:
            self._handles[name] = handle
        self._state.processes[name] = record

    def _wait_port_free(self, name: str, port: int, timeout_s: float = 30.0) -> None:
        """Sockets of a just-killed server can hold its port for a moment after it exits."""
        deadline = time.monotonic() + timeout_s
        while not port_is_free(port):
            if time.monotonic() >= deadline:
                raise InfraError(
                    f"Port {port} of {name} is still taken {timeout_s:.0f} s after it stopped; "
                    f"find the holder with `ss -tlnp | grep {port}` and stop it."
                )
            time.sleep(0.2)

    def _format_kafka(self, server: KafkaServer) -> None:
        server.format_storage()

    def _wait_ready(self, name: str) -> None:
        server = self.server(name)
        record = self._state.processes[name]
        started = time.monotonic()
        outcome = wait_until(
            server.probe,
            timeout_s=server.ready_timeout_s,
            alive=lambda: is_alive(record),
            interval_s=server.probe_interval_s,
        )
        if outcome == "ready":
            self._progress(
                f"{name}: ready on {server.address} ({time.monotonic() - started:.1f} s)"
            )
            return
        what = (
            "exited" if outcome == "exited" else f"not ready after {server.ready_timeout_s:.0f} s"
        )
        raise InfraError(
            f"{server.description} {what}; see {server.log_path} (last lines below) and retry.\n"
            f"{log_tail(server.log_path)}"
        )

    def _stop_one(self, name: str, *, hard: bool) -> None:
        record = self._state.processes.pop(name, None)
        handle = self._handles.pop(name, None)
        if record is None and handle is not None:  # forgotten elsewhere (e.g. CLI `down`)
            record = ProcessRecord(handle.pid, 0.0)
        if record is None:
            return
        was_alive = is_alive(record) or (handle is not None and handle.poll() is None)
        stop(record, handle=handle, hard=hard)
        if was_alive:
            self._progress(f"{name}: {'killed' if hard else 'stopped'} (pid {record.pid})")

    def _save(self, *, write_env: bool = False) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            addresses = self._addresses().env()
        except InfraError:
            addresses = {}
        _write_private(self.json_path, json.dumps(self._state.to_json(addresses), indent=2))
        if write_env and addresses:
            lines = [
                "# Local Riffloop infrastructure, written by `python -m riffloop.infra up`.",
                f"# Load with: set -a; . {self.env_path}; set +a",
                *(f"{key}={value}" for key, value in addresses.items()),
            ]
            _write_private(self.env_path, "\n".join(lines) + "\n")


def _write_private(path: Path, text: str) -> None:
    """Atomic write, readable by the owner only (the files hold the S3 secret)."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    temporary.replace(path)


def drop_topics(bootstrap: str, prefix: str) -> list[str]:
    """Delete every topic whose name starts with ``prefix`` (a test's or a benchmark's own
    namespace); return their names. Left behind on a reused broker, each run's topics grow the
    metadata every client decodes in Python (17 % of the gateway's CPU at 536 topics, py-spy)
    and the broker's heap (its old generation 92 % full at ≈ 330 topics, collected by full GCs
    that stall every producer)."""
    if not prefix:
        raise InfraError("drop_topics needs a non-empty prefix")
    with _kafka_admin(bootstrap, f"Deleting the topics under {prefix!r}") as admin:
        mine = [t for t in admin.list_topics() if t.startswith(prefix)]
        if mine:
            admin.delete_topics(mine)
        return mine


@contextlib.contextmanager
def _kafka_admin(bootstrap: str, doing: str) -> Iterator[Any]:
    """An admin client for ``bootstrap``; Kafka errors become InfraError naming ``doing``."""
    from kafka.errors import KafkaError  # clients load on first use: `install` needs none

    admin = kafka_admin_or_none(bootstrap_servers=bootstrap, client_id="riffloop-infra")
    if admin is None:
        raise InfraError(f"Cannot reach Kafka at {bootstrap}; is the stack up?")
    try:
        yield admin
    except KafkaError as error:
        raise InfraError(f"{doing} on Kafka at {bootstrap} failed ({error}).") from None
    finally:
        admin.close()


def create_topics(bootstrap: str, names: Iterable[str], partitions: int = TOPIC_PARTITIONS) -> None:
    """Create the missing topics (replication 1, so min.insync.replicas 1; a DLQ keeps its
    records for the services' default RIFFLOOP_KAFKA_DLQ_RETENTION_S) and wait until each has
    a leader."""
    retention_s = Settings().kafka_dlq_retention_s
    wanted = list(dict.fromkeys(names))
    with _kafka_admin(bootstrap, "Creating topics") as admin:
        existing = set(admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if not missing:
            return
        spec = {
            name: {
                "num_partitions": partitions,
                "replication_factor": 1,
                "configs": {
                    **topic_config(name),  # what a rebuild of Redis reads is kept
                    **durability_config(name, min_insync_replicas=1, dlq_retention_s=retention_s),
                },
            }
            for name in missing
        }
        result = admin.create_topics(spec, raise_errors=False, wait_for_metadata=False)
        failed = [
            f"{topic['name']} ({topic.get('error_message') or topic['error_code']})"
            for topic in result["topics"]
            if topic["error_code"] not in (0, _TOPIC_ALREADY_EXISTS)
        ]
        if failed:
            raise InfraError(f"Kafka refused to create {', '.join(failed)}.")
        admin.wait_for_topics(missing, timeout_ms=60_000)


def create_buckets(addresses: InfraAddresses, names: Iterable[str]) -> None:
    """Create the missing buckets."""
    from minio import Minio
    from minio.error import S3Error
    from urllib3.exceptions import HTTPError as Urllib3Error

    endpoint = addresses.s3_endpoint.removeprefix("http://")
    client = Minio(
        endpoint, access_key=addresses.s3_access_key, secret_key=addresses.s3_secret_key,
        secure=False,
    )  # fmt: skip
    try:
        for name in dict.fromkeys(names):
            if not client.bucket_exists(name):
                client.make_bucket(name)
    except (S3Error, Urllib3Error, OSError) as error:
        raise InfraError(
            f"Creating buckets on {addresses.s3_endpoint} failed ({error}); see the s3 log."
        ) from None

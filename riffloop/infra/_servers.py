"""The three servers of a local stack: how each is configured, started and probed for readiness.

Each server keeps its files in `<state>/<name>/` (config, data, `<name>.log`) and listens only on
127.0.0.1 ports chosen by `LocalInfra`.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import socket
import subprocess
import urllib.error
import urllib.request
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from riffloop.infra._install import java_binary, redis_server_binary, s3_server_binary
from riffloop.infra._layout import KAFKA_VERSION, CacheLayout, InfraError
from riffloop.infra._process import log_tail

# kafka-python logs every refused connection at ERROR; without a handler Python's last-resort
# handler would print them to stderr while a broker is still starting.
logging.getLogger("kafka").addHandler(logging.NullHandler())

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Server(ABC):
    """One server process of the local stack."""

    name: str
    port_names: tuple[str, ...]
    ready_timeout_s: float = 60.0
    probe_interval_s: float = 0.2

    def __init__(self, home: Path, ports: dict[str, int], layout: CacheLayout) -> None:
        self.home = home
        self.ports = ports
        self.layout = layout

    @property
    def log_path(self) -> Path:
        return self.home / f"{self.name}.log"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    @abstractmethod
    def address(self) -> str:
        """What clients connect to (a bootstrap list, URL or host:port)."""

    @property
    @abstractmethod
    def description(self) -> str:
        """Which program serves this role, with its version."""

    @abstractmethod
    def check_installed(self) -> None:
        """Raise `InfraError` (pointing at `install`) when the program is missing."""

    def prepare(self) -> None:
        """Write config and initialise data before the first start; idempotent."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    @abstractmethod
    def argv(self) -> list[str]: ...

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    @abstractmethod
    def probe(self) -> bool:
        """One quick readiness check (no retries)."""


def _not_installed(what: str) -> InfraError:
    return InfraError(
        f"{what} is not installed; run `python -m riffloop.infra install` first "
        "(the first MinIO build takes ≈10 min)."
    )


_SCRAM_TEXT = re.compile(r"[A-Za-z0-9_-]{1,128}")


@dataclass(frozen=True, repr=False)
class ScramUser:
    """A SCRAM-SHA-512 user of a broker with a SASL listener, created in the cluster's metadata
    when its storage is formatted (``kafka-storage format --add-scram``, KIP-900). Names and
    passwords are letters, digits, '_' and '-' only, so they need no quoting in the format
    argument or the JAAS line."""

    username: str
    password: str
    mechanism = "SCRAM-SHA-512"

    def __post_init__(self) -> None:
        for what, text in (("user name", self.username), ("password", self.password)):
            if not _SCRAM_TEXT.fullmatch(text):
                raise InfraError(f"a SCRAM {what} must be 1–128 letters, digits, '_' or '-'")

    def client_config(self) -> dict[str, Any]:
        """kafka-python options for a client of the SASL listener."""
        return {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": self.mechanism,
            "sasl_plain_username": self.username,
            "sasl_plain_password": self.password,
        }

    def settings_env(self) -> dict[str, str]:
        """The RIFFLOOP_* settings of a service that talks to the SASL listener as this user."""
        return {
            "RIFFLOOP_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "RIFFLOOP_KAFKA_SASL_MECHANISM": self.mechanism,
            "RIFFLOOP_KAFKA_SASL_USERNAME": self.username,
            "RIFFLOOP_KAFKA_SASL_PASSWORD": self.password,
        }

    def __repr__(self) -> str:
        return f"ScramUser({self.username!r})"


class KafkaServer(Server):
    """Kafka 4 in KRaft mode, one node acting as broker and controller (design.md §4).

    ``scram`` given: the client listener is SASL_PLAINTEXT with SCRAM-SHA-512 only, and that
    user, created at format time, is the only one (the broker's own inter-broker identity too);
    the controller listener stays PLAINTEXT on loopback. Default: PLAINTEXT, no users."""

    name = "kafka"
    port_names = ("broker", "controller")
    ready_timeout_s = 120.0
    probe_interval_s = 0.5

    def __init__(
        self,
        home: Path,
        ports: dict[str, int],
        layout: CacheLayout,
        cluster_id: str,
        *,
        scram: ScramUser | None = None,
    ) -> None:
        super().__init__(home, ports, layout)
        self.cluster_id = cluster_id
        self.scram = scram

    def client_config(self) -> dict[str, Any]:
        """kafka-python options every client of this broker needs (none for PLAINTEXT)."""
        return self.scram.client_config() if self.scram else {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['broker']}"

    @property
    def description(self) -> str:
        return f"Kafka {KAFKA_VERSION} (KRaft)"

    @property
    def properties_path(self) -> Path:
        return self.home / "server.properties"

    def check_installed(self) -> None:
        if not self.layout.kafka_installed():
            raise _not_installed(f"Kafka {KAFKA_VERSION}")
        java_binary()

    def prepare(self) -> None:
        super().prepare()
        broker, controller = self.ports["broker"], self.ports["controller"]
        listener = "SASL_PLAINTEXT" if self.scram else "PLAINTEXT"
        properties = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller}",
            "listeners": f"{listener}://127.0.0.1:{broker},CONTROLLER://127.0.0.1:{controller}",
            "advertised.listeners": f"{listener}://127.0.0.1:{broker}",
            "listener.security.protocol.map": f"{listener}:{listener},CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": listener,
            "log.dirs": str(self.data_dir),
            "auto.create.topics.enable": "false",
            "num.partitions": "3",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            # One node: every internal topic has a single replica (and few partitions, so the
            # first consumer group and transaction start in well under a second).
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "3",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "share.coordinator.state.topic.num.partitions": "3",
            "group.initial.rebalance.delay.ms": "0",
            # After kill -9 the restarted broker is refused (DUPLICATE_BROKER_REGISTRATION) until
            # its old session expires: 4 s instead of the default 9 s, still far above a GC pause.
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "1000",
            # A shared 2-core machine: few threads.
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "log.cleaner.threads": "1",
            "num.recovery.threads.per.data.dir": "1",
        }
        if self.scram:
            mechanism = self.scram.mechanism
            properties.update(
                {
                    "sasl.enabled.mechanisms": mechanism,
                    "sasl.mechanism.inter.broker.protocol": mechanism,
                    f"listener.name.sasl_plaintext.{mechanism.lower()}.sasl.jaas.config": (
                        "org.apache.kafka.common.security.scram.ScramLoginModule required "
                        f'username="{self.scram.username}" password="{self.scram.password}";'
                    ),
                }
            )
        # Owner-only: with a SASL listener the file holds the user's password.
        descriptor = os.open(self.properties_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(
                "# Written by riffloop.infra; rewritten on every start.\n"
                + "".join(f"{key}={value}\n" for key, value in properties.items())
            )
        (self.home / "log4j2.xml").write_text(_LOG4J2_XML, encoding="utf-8")

    def needs_format(self) -> bool:
        return not (self.data_dir / "meta.properties").is_file()

    def format_argv(self) -> list[str]:
        """StorageTool, run once per data dir before the first start (with ``scram``, it also
        writes the SCRAM user into the cluster's first metadata)."""
        users = (
            [
                "--add-scram",
                f"{self.scram.mechanism}=[name={self.scram.username},"
                f"password={self.scram.password}]",
            ]
            if self.scram
            else []
        )
        return [
            *self._java(),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            self.cluster_id,
            "-c",
            str(self.properties_path),
            "--ignore-formatted",
            *users,
        ]

    def format_storage(self) -> None:
        """Run :meth:`format_argv` (its output goes to the log); InfraError if it fails."""
        with open(self.log_path, "ab") as log:
            result = subprocess.run(
                self.format_argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.home,
                check=False,
                timeout=300,
            )
        if result.returncode != 0:
            raise InfraError(
                f"Formatting Kafka's storage failed (exit {result.returncode}); see "
                f"{self.log_path}:\n{log_tail(self.log_path)}"
            )

    def argv(self) -> list[str]:
        return [*self._java(), "kafka.Kafka", str(self.properties_path)]

    def _java(self) -> list[str]:
        return [
            str(java_binary()),
            "-Xms128m",
            "-Xmx512m",
            "-XX:+UseSerialGC",  # fewer GC threads on a shared machine
            # Every pause of the broker stalls each producer waiting for an ack: the log shows
            # them (bench/README.md, session 6: young pauses of 10-20 ms stretch to 50-90 ms
            # when the services and the load generator keep both cores busy).
            f"-Xlog:gc:file={self.home / 'gc.log'}:uptime,time:filecount=2,filesize=10m",
            # C1 only: a dev/test broker never needs C2's peak speed, and C2 compiling at start-up
            # doubled the time to ready on a loaded 2-core machine (12-14 s vs 25-29 s measured).
            "-XX:TieredStopAtLevel=1",
            "-XX:MaxInlineLevel=15",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.xml'}",
            f"-Dkafka.logs.dir={self.home}",
            "-cp",
            f"{self.layout.kafka_libs}/*",
        ]

    def probe(self) -> bool:
        if not _accepts_connections(self.ports["broker"]):
            return False
        from kafka.errors import KafkaError  # clients load on first use: `install` needs none

        admin = kafka_admin_or_none(
            bootstrap_servers=self.address,
            client_id="riffloop-infra-probe",
            request_timeout_ms=3000,
            **self.client_config(),
        )
        if admin is None:
            return False
        try:
            admin.list_topics()
            return True
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()


def kafka_admin_or_none(**config: Any) -> Any:
    """A KafkaAdminClient of ``config``, or None while the broker cannot be bootstrapped (it is
    starting). kafka-python leaves a failed attempt's sockets to the garbage collector, which
    would report each as a ResourceWarning in whatever runs next (an error under the tests'
    warning filter): the failed attempt's client is stopped (``construct_kafka_client``) and
    its sockets are collected here, quietly."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    from riffloop.core import construct_kafka_client

    try:
        return construct_kafka_client(KafkaAdminClient, **config)
    except (KafkaError, OSError):
        pass  # the exception (and the client its frames hold) is released past this block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    return None


_LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="stdout" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="org.apache.kafka.storage.internals.log.LogLoader" level="WARN"/>
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="WARN"/>
    <Root level="INFO"><AppenderRef ref="stdout"/></Root>
  </Loggers>
</Configuration>
"""


class S3Server(Server):
    """MinIO (or the versitygw fallback) serving one data folder over the S3 API."""

    name = "s3"
    port_names = ("api", "console")
    ready_timeout_s = 60.0

    def __init__(
        self,
        home: Path,
        ports: dict[str, int],
        layout: CacheLayout,
        access_key: str,
        secret_key: str,
    ) -> None:
        super().__init__(home, ports, layout)
        self.access_key = access_key
        self.secret_key = secret_key

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def description(self) -> str:
        installed = s3_server_binary(self.layout)
        return installed[0] if installed else "S3 server (not installed)"

    def _binary(self) -> tuple[str, Path]:
        installed = s3_server_binary(self.layout)
        if installed is None:
            raise _not_installed("The MinIO S3 server")
        return installed

    def check_installed(self) -> None:
        self._binary()

    def argv(self) -> list[str]:
        kind, binary = self._binary()
        api, console = self.ports["api"], self.ports["console"]
        if kind == "minio":
            return [
                str(binary),
                "server",
                str(self.data_dir),
                "--address",
                f"127.0.0.1:{api}",
                "--console-address",
                f"127.0.0.1:{console}",
                "--quiet",
            ]
        return [
            str(binary),
            "--access",
            self.access_key,
            "--secret",
            self.secret_key,
            "--port",
            f"127.0.0.1:{api}",
            "posix",
            str(self.data_dir),
        ]

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(
            MINIO_ROOT_USER=self.access_key,
            MINIO_ROOT_PASSWORD=self.secret_key,
            MINIO_UPDATE="off",
            GOMAXPROCS="2",
        )
        return env

    def probe(self) -> bool:
        kind, _ = self._binary()
        if not _accepts_connections(self.ports["api"]):
            return False
        path = "/minio/health/ready" if kind == "minio" else "/"
        try:
            with _NO_PROXY.open(f"{self.address}{path}", timeout=2.0) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError as error:
            return kind != "minio" and error.code < 500  # versitygw answers 403 to anonymous GET
        except OSError:
            return False


# What Riffloop needs of a Redis (deploy/k8s/base/redis/redis.conf says the same to a
# cluster). It is a cache that Kafka can rebuild (design.md §2, riffloop.runtime.rebuild), but
# a rebuild replays every rating: the append-only file, fsynced each second, keeps a restart to
# at most the last second of writes (after a crash of the host), and noeviction refuses writes
# when memory is full instead of silently dropping a ledger row or a once-key.
REDIS_REQUIREMENTS = {
    "appendonly": "yes",
    "appendfsync": "everysec",
    "maxmemory-policy": "noeviction",
}


class RedisServer(Server):
    """Debian's redis-server on a loopback port, working files in its own folder."""

    name = "redis"
    port_names = ("port",)
    ready_timeout_s = 30.0
    probe_interval_s = 0.05

    @property
    def address(self) -> str:
        return f"redis://127.0.0.1:{self.ports['port']}/0"

    @property
    def description(self) -> str:
        return "Redis"

    def check_installed(self) -> None:
        if redis_server_binary() is None:
            raise _not_installed("redis-server")

    def argv(self) -> list[str]:
        binary = redis_server_binary()
        if binary is None:
            raise _not_installed("redis-server")
        return [
            str(binary),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.ports["port"]),
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            *(arg for name, value in REDIS_REQUIREMENTS.items() for arg in (f"--{name}", value)),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            "",
        ]

    def probe(self) -> bool:
        import redis

        client = redis.Redis(
            host="127.0.0.1",
            port=self.ports["port"],
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
        )
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

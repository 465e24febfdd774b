"""Deployments a simulation drives: the six services' own code, reached through their gRPC APIs.

``EmbeddedDeployment`` builds the gateway, encoder, generator, feedback, selector and trainer in
this process, each with its own ``build()`` (the code ``python -m services.<name>`` runs), on the
embedded backends: one in-process event bus, object store and key-value store per deployment, so
two deployments (a selected arm and its control) share nothing but the machine.

``StackDeployment`` is the same interface over six service processes on the local Kafka, MinIO
and Redis (``bin/riffloop infra up``), each deployment in its own namespace on those servers.

The simulated listeners use only ``gateway()``, a ``GatewayClient`` as an app would. The
experimenter (an operator) also uses the internal RPCs: ``RunSelection`` to close a listening
session, ``TrainStatus`` to wait for the release step, ``TrackScore`` / ``RaterReport`` to read
the results, each call with an operator token signed with the deployment's operator secret
(``riffloop.client.operator_channel``), and the object store for a track's provenance embedding.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc

from riffloop.client import GatewayClient, operator_channel
from riffloop.core import NotFoundError
from riffloop.runtime import Ports, TokenSigner, operator_token
from riffloop.v1 import feedback_service_pb2 as feedback_pb
from riffloop.v1 import feedback_service_pb2_grpc as feedback_grpc
from riffloop.v1 import selector_service_pb2 as selector_pb
from riffloop.v1 import selector_service_pb2_grpc as selector_grpc
from riffloop.v1 import trainer_service_pb2 as trainer_pb
from riffloop.v1 import trainer_service_pb2_grpc as trainer_grpc

SERVICES = ("trainer", "encoder", "generator", "feedback", "selector", "gateway")


class SimClock:
    """The servers' clock in a simulation: wall time plus the listening time skipped so far.

    A listener who hears a 6 s track and rates it does not make the simulation wait 6 s: the
    experimenter calls ``skip(6)`` and the gateway's clock (served-at, receipt, the client-time
    checks) moves on by as much, so every time a server records stays consistent with the
    listener's own. Wall time keeps running underneath, so time never goes backwards."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return time.time() + self._offset

    def skip(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"cannot skip {seconds!r} s")
        with self._lock:
            self._offset += seconds


@dataclass
class _Running:
    runtime: Any
    state: Any


class _ServiceApis:
    """The calls a deployment offers the experiment: the public API as a listener's app, the
    internal RPCs and the object store as an operator. Needs ``target(service)``,
    ``auth_secret``, ``operator_secret``, ``objects`` and a ``_channels`` cache."""

    auth_secret: str
    operator_secret: str
    objects: Any
    _channels: dict[str, grpc.Channel]

    def target(self, service: str) -> str:
        raise NotImplementedError

    def gateway(self, user: str, timeout_s: float = 60.0) -> GatewayClient:
        """A signed-in client of the public API, as an app would hold one."""
        return GatewayClient(
            self.target("gateway"), TokenSigner(self.auth_secret).issue(user), timeout_s=timeout_s
        )

    def _channel(self, service: str) -> grpc.Channel:
        if service not in self._channels:
            token = operator_token(self.operator_secret, "experimenter", ttl_s=7 * 24 * 3600)
            self._channels[service] = operator_channel(self.target(service), token)
        return self._channels[service]

    def run_selection(self, pair_budget: int = 0) -> selector_pb.RunSelectionResponse:
        stub = selector_grpc.SelectorServiceStub(self._channel("selector"))
        return stub.RunSelection(selector_pb.RunSelectionRequest(pair_budget=pair_budget))

    def train_status(self) -> trainer_pb.TrainStatusResponse:
        stub = trainer_grpc.TrainerServiceStub(self._channel("trainer"))
        return stub.TrainStatus(trainer_pb.TrainStatusRequest(), timeout=30)

    def track_score(self, track_id: str) -> Any:
        stub = feedback_grpc.FeedbackServiceStub(self._channel("feedback"))
        return stub.TrackScore(feedback_pb.TrackScoreRequest(track_id=track_id), timeout=30).score

    def rater_report(self, user_id: str) -> feedback_pb.RaterReportResponse | None:
        """The feedback service's view of a rater; None for one with no accepted rating."""
        stub = feedback_grpc.FeedbackServiceStub(self._channel("feedback"))
        try:
            return stub.RaterReport(feedback_pb.RaterReportRequest(user_id=user_id), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def track_embedding(self, track_id: str) -> list[float]:
        """The quality embedding the generator stored with the track (its provenance object)."""
        try:
            raw = json.loads(self.objects.get("tracks", f"{track_id}.json"))
        except NotFoundError:
            return []
        return [float(v) for v in raw.get("embedding") or []]


@dataclass
class EmbeddedDeployment(_ServiceApis):
    """Six services in this process on embedded backends.

    ``settings``: per service, overrides of its settings dataclass (field names, as in
    ``services/<name>``). ``dispatch_key``: the secret the gateway and generator draw with; two
    deployments given the same key make the same blind draws for the same request keys (a
    paired experiment). ``clock`` and ``queue_seed``: the gateway's time and queue draws."""

    name: str
    settings: Mapping[str, Mapping[str, Any]]
    dispatch_key: str
    clock: Callable[[], float] = time.time
    queue_seed: int | None = None
    auth_secret: str = "riffloop-simulation-secret"
    operator_secret: str = "riffloop-simulation-operator"
    _running: dict[str, _Running] = field(default_factory=dict)
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def start(self) -> EmbeddedDeployment:
        from riffloop.core import MemoryEventBus, MemoryKeyValueStore, MemoryObjectStore

        bus, objects, kv = MemoryEventBus(), MemoryObjectStore(), MemoryKeyValueStore()
        self.objects = objects
        common: dict[str, Any] = {
            "grpc_port": 0,
            "metrics_port": 0,
            "bind_host": "127.0.0.1",
            "consumer_poll_timeout_s": 0.05,
        }
        try:
            for service in SERVICES:
                ports = Ports(f"{self.name}-{service}", bus, objects, kv)
                self._running[service] = self._build(service, ports, common)
                self._running[service].runtime.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _build(self, service: str, ports: Ports, common: dict[str, Any]) -> _Running:
        own = dict(self.settings.get(service, {}))
        if service != "gateway":  # the internal services answer the experimenter's token only
            common = {**common, "operator_secret": self.operator_secret}
        if service == "gateway":
            from services.gateway import GatewaySettings
            from services.gateway import build as build_gateway

            settings = GatewaySettings(
                **common, auth_secret=self.auth_secret, dispatch_key=self.dispatch_key, **own
            )
            draw = random.Random(self.queue_seed) if self.queue_seed is not None else None
            return _Running(build_gateway(settings, ports, clock=self.clock, draw=draw), ports)
        if service == "generator":
            from services.generator import GeneratorSettings
            from services.generator import build as build_generator

            return _Running(
                *build_generator(
                    GeneratorSettings(**common, dispatch_key=self.dispatch_key, **own), ports
                )
            )
        if service == "encoder":
            from services.encoder import EncoderSettings
            from services.encoder import build as build_encoder

            return _Running(*build_encoder(EncoderSettings(**common, **own), ports))
        if service == "feedback":
            from services.feedback import FeedbackSettings
            from services.feedback import build as build_feedback

            return _Running(*build_feedback(FeedbackSettings(**common, **own), ports))
        if service == "selector":
            from services.selector import SelectorSettings
            from services.selector import build as build_selector

            return _Running(*build_selector(SelectorSettings(**common, **own), ports))
        from services.trainer import TrainerSettings
        from services.trainer import build as build_trainer

        return _Running(*build_trainer(TrainerSettings(**common, **own), ports))

    def target(self, service: str) -> str:
        return f"127.0.0.1:{self._running[service].runtime.port}"

    def stop(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        for running in reversed(list(self._running.values())):
            running.runtime.stop()
        self._running.clear()


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _redis_db(url: str, db: int) -> str:
    """``url`` naming database ``db`` (redis://host:port/<db>)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


@dataclass
class StackDeployment(_ServiceApis):
    """The six services as processes (``python -m services.<name>``, riffloop.stack) on the
    local Kafka, MinIO and Redis, namespaced so that several deployments share the servers:
    topics under ``sim-<run>-<name>.``, buckets under ``sim-<run>-<name>-``, Redis database
    ``db``. The gateway keeps wall time: listeners here listen in real time.

    Each run takes a fresh namespace (``run``), so a later run never reads an earlier one's
    models or ratings; ``bin/riffloop infra down`` removes them all."""

    name: str
    settings: Mapping[str, Mapping[str, Any]]
    dispatch_key: str
    infra_env: Mapping[str, str]
    db: int
    state_root: Path
    run: str
    clock: Callable[[], float] = time.time
    auth_secret: str = "riffloop-simulation-secret"
    operator_secret: str = "riffloop-simulation-operator"
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def start(self) -> StackDeployment:
        import redis

        from riffloop.core import S3ObjectStore
        from riffloop.stack import ServiceProcesses

        prefix = f"sim-{self.run}-{self.name}"
        redis_url = _redis_db(self.infra_env["RIFFLOOP_REDIS_URL"], self.db)
        with redis.Redis.from_url(redis_url) as client:
            client.flushdb()  # this deployment's database, left over from an earlier run
        shutil.rmtree(self.state_root / self.name, ignore_errors=True)
        namespace = {
            "RIFFLOOP_KAFKA_TOPIC_PREFIX": f"{prefix}.",
            "RIFFLOOP_S3_BUCKET_PREFIX": f"{prefix}-",
            "RIFFLOOP_REDIS_URL": redis_url,
        }
        overrides = {
            service: {
                **namespace,
                **{
                    f"RIFFLOOP_{key.upper()}": _env_value(value)
                    for key, value in self.settings.get(service, {}).items()
                    if key != "scorer"  # a process stack scores in its child process
                },
            }
            for service in SERVICES
        }
        self.processes = ServiceProcesses(
            self.state_root / self.name, self.infra_env, overrides=overrides, tied_to_parent=True
        )
        self.processes.state.auth_secret = self.auth_secret
        self.processes.state.dispatch_key = self.dispatch_key
        self.processes.state.operator_secret = self.operator_secret
        try:
            self.processes.up(timeout_s=900.0)
        except BaseException:
            self.processes.down()
            raise
        self.objects = S3ObjectStore.connect(
            self.infra_env["RIFFLOOP_S3_ENDPOINT"],
            self.infra_env["RIFFLOOP_S3_ACCESS_KEY"],
            self.infra_env["RIFFLOOP_S3_SECRET_KEY"],
            bucket_prefix=f"{prefix}-",
        )
        return self

    def target(self, service: str) -> str:
        return str(self.processes.state.processes[service].target)

    def stop(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        if hasattr(self, "processes"):
            self.processes.down()


Deployment = EmbeddedDeployment | StackDeployment

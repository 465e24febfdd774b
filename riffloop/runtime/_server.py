"""Start-up and shutdown of one service process (grpc ``examples/python/health_checking``).

1. ``ServiceRuntime(...)`` builds a ``grpc.server`` with the interceptors and message-size limits,
   the health service (``grpc.health.v1``) and reflection (``grpc.reflection.v1``, and
   ``v1alpha`` for older clients; ``reflection=False`` leaves it out, as the public gateway does
   unless ``RIFFLOOP_REFLECTION`` is set). Health is always on.
2. ``readiness.add_check(name, fn)`` registers a dependency (kafka, s3, redis, model); a thread
   re-runs the checks and the health status is SERVING only while all of them pass and the
   process is not draining. ``riffloop_dependency_ready`` mirrors each check.
3. ``start()`` binds the port, starts ``/metrics`` and the background workers (consumer loops).
4. ``run_until_signal()`` waits for SIGTERM/SIGINT, then drains: NOT_SERVING, refuse new calls,
   finish in-flight calls within the grace period, stop the workers (they commit their offsets),
   stop ``/metrics``; the process then exits 0.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any, Protocol

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import REGISTRY, start_http_server

from riffloop.runtime import metrics
from riffloop.runtime._interceptors import ObservabilityInterceptor
from riffloop.runtime._tracing import start_tracing, stop_tracing

_log = logging.getLogger("riffloop.runtime")

MiB = 1024 * 1024
MAX_CONNECTION_AGE_MS = 5 * 60 * 1000
MAX_CONNECTION_AGE_GRACE_MS = 180 * 1000  # above the longest call a client allows (uploads: 60 s)
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_reflection_v1_descriptor() -> None:
    """Put ``grpc/reflection/v1/reflection.proto`` in the default descriptor pool (once), made
    from the v1alpha file with the package renamed, so ``describe`` on the v1 service works."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_REFLECTION_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = _REFLECTION_V1_FILE, "grpc.reflection.v1"
    proto.options.ClearField("deprecated")
    renamed = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(*renamed)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(*renamed)
        method.output_type = method.output_type.replace(*renamed)
    pool.Add(proto)


def _add_reflection(service_names: Sequence[str], server: grpc.Server) -> None:
    """Server reflection under both names clients ask for. grpcio-reflection ships only
    ``v1alpha``; ``grpc.reflection.v1`` (what grpcurl and grpcui try first, and all that some
    newer clients speak) has the same messages field for field, so the same servicer answers it
    through a handler registered under the v1 name."""
    _register_reflection_v1_descriptor()
    names = [*service_names, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for name in (reflection.SERVICE_NAME, REFLECTION_V1):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler}),)
        )


class Worker(Protocol):
    """A background loop owned by the process (a Kafka consumer, a readiness poller)."""

    name: str

    def start(self) -> None: ...

    def stop(self, timeout_s: float) -> None:
        """Ask the loop to finish its current item, commit, and return within ``timeout_s``."""
        ...


def failure_of(worker: Any) -> BaseException | None:
    """What killed ``worker``'s loop, if it died (a worker may have no ``failed`` attribute)."""
    return getattr(worker, "failed", None)


class LoopWorker:
    """Runs ``body(stop_event)`` in a daemon thread; ``stop`` sets the event and joins."""

    def __init__(self, name: str, body: Callable[[threading.Event], None]) -> None:
        self.name = name
        self._body = body
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.failed: BaseException | None = None

    def _run(self) -> None:
        try:
            self._body(self._stop)
        except BaseException as exc:  # a dead loop must show in the log and in readiness
            self.failed = exc
            _log.exception("worker %s died", self.name)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)


class DeferredWorker:
    """Starts ``inner`` only once ``ready()`` holds (e.g. a consumer that needs a loaded model:
    records are left in Kafka, not dead-lettered, while the process cannot handle them)."""

    def __init__(self, inner: Worker, ready: Callable[[], bool], poll_s: float = 0.5) -> None:
        self.name = f"{inner.name}-deferred"
        self.inner = inner
        self._ready = ready
        self._poll_s = poll_s
        self._started = False
        self._gate = LoopWorker(self.name, self._wait)

    def _wait(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self._ready():
                self.inner.start()
                self._started = True
                return
            stop.wait(self._poll_s)

    def start(self) -> None:
        self._gate.start()

    def stop(self, timeout_s: float) -> None:
        self._gate.stop(timeout_s)
        if self._started:
            self.inner.stop(timeout_s)

    @property
    def failed(self) -> BaseException | None:
        return self._gate.failed or failure_of(self.inner)


LIVENESS = "liveness"
"""Health entry for startup and liveness probes: SERVING while the process serves, whatever its
dependencies say, so a Kafka outage marks pods unready instead of restarting all of them at once;
NOT_SERVING only once a worker of the process died (a restart is its only way back)."""


class Readiness:
    """Per-dependency readiness driving the gRPC health status and a gauge.

    The overall entry ``""`` (and each service name) is SERVING only when every dependency check
    passes and the process is not draining; the ``liveness`` entry stays SERVING through
    dependency outages and drains, and turns NOT_SERVING only when a worker of the process died
    (``fail_liveness``).
    """

    def __init__(
        self,
        service: str,
        health_servicer: health.HealthServicer,
        service_names: Sequence[str] = (),
    ) -> None:
        self.service = service
        self._health = health_servicer
        self._names = ["", *service_names]
        self._checks: dict[str, Callable[[], bool]] = {}
        self._state: dict[str, bool] = {}
        self._draining = False
        self._lock = threading.Lock()
        health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        self._publish()

    def add_check(self, dependency: str, check: Callable[[], bool]) -> None:
        with self._lock:
            self._checks[dependency] = check
            self._state[dependency] = False
        metrics.DEPENDENCY_READY.labels(self.service, dependency).set(0)
        self._publish()

    def add_service_name(self, name: str) -> None:
        self._names.append(name)
        self._publish()

    def refresh(self) -> dict[str, bool]:
        """Run every check once (a check that raises counts as not ready)."""
        with self._lock:
            checks = dict(self._checks)
        results: dict[str, bool] = {}
        for dependency, check in checks.items():
            try:
                ok = bool(check())
            except Exception as exc:
                _log.debug("readiness check %s failed: %s", dependency, exc)
                ok = False
            results[dependency] = ok
            metrics.DEPENDENCY_READY.labels(self.service, dependency).set(1 if ok else 0)
        with self._lock:
            changed = results != self._state
            self._state = results
        if changed:
            _log.info("readiness", extra={"dependencies": results, "ready": self.ready})
        self._publish()
        return results

    @property
    def ready(self) -> bool:
        with self._lock:
            return not self._draining and all(self._state.values())

    def state(self) -> dict[str, bool]:
        with self._lock:
            return dict(self._state)

    def drain(self) -> None:
        with self._lock:
            self._draining = True
        self._publish()

    def fail_liveness(self) -> None:
        """A loop of the process died: NOT_SERVING everywhere, ``liveness`` included, so the
        orchestrator restarts this process (restarting it is the only way it recovers)."""
        with self._lock:
            self._draining = True
        self._health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._publish()

    def _publish(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            self._health.set(name, status)


class ServiceRuntime:
    """One service process: gRPC server + health + reflection (unless ``reflection=False``) +
    /metrics + workers + drain."""

    def __init__(
        self,
        service: str,
        *,
        grpc_port: int,
        metrics_port: int | None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        max_message_bytes: int = 4 * MiB,
        max_workers: int = 16,
        grace_s: float = 10.0,
        drain_delay_s: float = 0.0,
        readiness_interval_s: float = 1.0,
        host: str = "127.0.0.1",
        reflection: bool = True,
    ) -> None:
        self.service = service
        self.reflection = reflection
        self.grace_s = grace_s
        self.drain_delay_s = drain_delay_s
        self._host = host
        self._requested_port = grpc_port
        self._metrics_port = metrics_port
        self._readiness_interval_s = readiness_interval_s
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=service),
            interceptors=[ObservabilityInterceptor(service), *interceptors],
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
                # Clients reconnect every few minutes, so a scaled-out Deployment behind a
                # ClusterIP Service (L4: one connection sticks to one pod) gets its share of
                # long-lived channels; calls in flight get the grace period to finish.
                ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
                ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
            ],
            maximum_concurrent_rpcs=max_workers * 8,
        )
        self._health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        self.readiness = Readiness(service, self._health)
        self._service_names: list[str] = [
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        ]
        self._workers: list[Worker] = []
        self._metrics_http: Any = None
        self._stopped = threading.Event()
        self._done = threading.Event()
        self._dead: set[str] = set()  # workers seen dead: liveness is NOT_SERVING for good
        self.port = 0
        self.metrics_port = 0
        self._exports_traces = False

    @classmethod
    def from_settings(cls, settings: Any, **options: Any) -> ServiceRuntime:
        """The usual wiring from a ``ServiceSettings``: name, ports, bind host, grace period,
        and trace export when ``otlp_endpoint`` is set (flushed when the runtime stops)."""
        runtime = cls(
            settings.service_name,
            grpc_port=settings.grpc_port,
            metrics_port=settings.metrics_port,
            host=settings.bind_host,
            grace_s=settings.drain_grace_s,
            drain_delay_s=settings.drain_delay_s,
            **options,
        )
        runtime._exports_traces = start_tracing(settings)
        return runtime

    # -- assembly -----------------------------------------------------------------------------

    def add_service(
        self, register: Callable[[Any, grpc.Server], None], servicer: Any, full_name: str
    ) -> None:
        """``register`` is the generated ``add_XxxServicer_to_server``."""
        register(servicer, self.server)
        self._service_names.append(full_name)
        self.readiness.add_service_name(full_name)

    def add_worker(self, worker: Worker) -> None:
        self._workers.append(worker)

    def worker(self, name: str) -> Worker:
        """The worker added under ``name`` (a server beside gRPC exposes its port there)."""
        for worker in self._workers:
            if worker.name == name:
                return worker
        raise KeyError(name)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> int:
        if self.reflection:
            _add_reflection(self._service_names, self.server)
        self.port = self.server.add_insecure_port(f"{self._host}:{self._requested_port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {self._requested_port} on {self._host}")
        if self._metrics_port is not None:
            self._metrics_http, _ = start_http_server(
                self._metrics_port, addr=self._host, registry=REGISTRY
            )
            self.metrics_port = self._metrics_http.server_port
        self.readiness.refresh()
        metrics.WORKER_FAILURES.labels(self.service)  # the zero series, for rate() and alerts
        self.server.start()
        for worker in self._workers:
            worker.start()
        poller = LoopWorker(f"{self.service}-readiness", self._poll_readiness)
        poller.start()
        self._poller = poller
        _log.info(
            "serving",
            extra={
                "grpc_port": self.port,
                "metrics_port": self.metrics_port,
                "services": self._service_names,
            },
        )
        return self.port

    def _poll_readiness(self, stop: threading.Event) -> None:
        while not stop.wait(self._readiness_interval_s):
            self.readiness.refresh()
            dead = {
                w.name: failure_of(w)
                for w in self._workers
                if failure_of(w) is not None and w.name not in self._dead
            }
            if dead:
                self._dead.update(dead)
                _log.error(
                    "worker died; liveness NOT_SERVING so the process is restarted",
                    extra={"workers": {name: repr(exc) for name, exc in dead.items()}},
                )
                metrics.WORKER_FAILURES.labels(self.service).inc(len(dead))
                self.readiness.fail_liveness()

    def stop(self) -> None:
        """Drain and stop; safe to call twice and from any thread."""
        if self._stopped.is_set():
            self._done.wait()
            return
        self._stopped.set()
        _log.info("draining", extra={"grace_s": self.grace_s, "delay_s": self.drain_delay_s})
        self.readiness.drain()
        self._poller.stop(1.0)
        # 0. NOT_SERVING but still serving, while load balancers take this process out
        time.sleep(self.drain_delay_s)
        # 1. refuse new calls, let in-flight ones finish within the grace period
        self.server.stop(self.grace_s).wait(self.grace_s + 1)
        # 2. stop the workers (consumers finish their message and commit its offsets), all
        # within one more grace period however many there are
        deadline = time.monotonic() + self.grace_s
        for worker in reversed(self._workers):
            worker.stop(max(0.1, deadline - time.monotonic()))
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self._exports_traces:
            stop_tracing()
        _log.info("stopped")
        self._done.set()

    def run_until_signal(self) -> int:
        """Block until SIGTERM or SIGINT, drain, return the exit status (0).

        The process's own entry point: it first freezes the start-up heap out of the garbage
        collector (see :func:`settle_garbage_collector`)."""
        settle_garbage_collector(self.service)
        received = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            _log.info("signal", extra={"signal": signal.Signals(signum).name})
            received.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not received.wait(0.5):
            pass
        self.stop()
        return 0


def settle_garbage_collector(service: str) -> None:
    """Move everything allocated at start-up (torch, the model, generated protobuf modules:
    ≈ 200,000 objects in the gateway) into the collector's permanent generation, and time every
    collection into ``riffloop_gc_pause_seconds``.

    A full collection otherwise walks that whole heap while every thread waits: 540–590 ms in the
    gateway on this machine, two of them in a 40,000-rating benchmark; frozen, 5–14 ms
    (bench/README.md). Start-up objects live as long as the process, so nothing collectable is
    lost. Only for a service process's main thread: a test process keeps its collector as is.
    """
    gc.collect()
    gc.freeze()
    # Children resolved now: labels() takes the metric's lock and allocates, which a callback
    # run by a collection inside labels() would deadlock on; observe() allocates nothing
    # the collector tracks while it holds a lock.
    pauses = {g: metrics.GC_PAUSE_SECONDS.labels(service, str(g)) for g in range(3)}
    started: list[float] = []

    def time_pause(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses[info["generation"]].observe(time.perf_counter() - started.pop())

    gc.callbacks.append(time_pause)

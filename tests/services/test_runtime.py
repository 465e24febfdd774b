"""The shared runtime: error mapping, request ids, deadlines, drain, limiter, tokens, settings."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from riffloop.core import (
    ConfigurationError,
    MemoryKeyValueStore,
    NotFoundError,
    TransientError,
    UnauthenticatedError,
    ValidationError,
)
from riffloop.runtime import ServiceRuntime, ServiceSettings, SlidingWindowLimiter, TokenSigner

pytestmark = pytest.mark.unit

release = threading.Event()


def _boom(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise RuntimeError("secret internals /etc/passwd")


def _missing(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise NotFoundError("track t1 does not exist")


def _broker_down(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise TransientError("publish to feedback.received.v1: Kafka error", retry_after_s=1.0)


def _correlate(request: bytes, context: grpc.ServicerContext) -> bytes:
    """What an event published by this call would carry as its correlation id."""
    from riffloop.core import new_envelope
    from riffloop.v1 import events_pb2

    envelope = new_envelope("testsvc", events_pb2.TrackScored(track_id="t"))
    return envelope.correlation_id.encode()


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    release.wait(10)
    return b"done"


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"echo"


@pytest.fixture
def runtime() -> Iterator[ServiceRuntime]:
    rt = ServiceRuntime("testsvc", grpc_port=0, metrics_port=None, grace_s=5.0)
    handlers = {
        "Boom": grpc.unary_unary_rpc_method_handler(_boom),
        "Missing": grpc.unary_unary_rpc_method_handler(_missing),
        "BrokerDown": grpc.unary_unary_rpc_method_handler(_broker_down),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Correlate": grpc.unary_unary_rpc_method_handler(_correlate),
    }
    rt.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Svc", handlers),))
    rt.readiness.add_check("kafka", lambda: True)
    rt.start()
    yield rt
    release.set()
    rt.stop()


def _call(rt: ServiceRuntime, method: str, **kwargs: object) -> object:
    with grpc.insecure_channel(f"127.0.0.1:{rt.port}") as channel:
        return channel.unary_unary(f"/t.Svc/{method}")(b"", **kwargs)


def test_unexpected_exception_is_internal_with_request_id_and_no_traceback(runtime) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _call(runtime, "Boom", timeout=5, metadata=(("x-request-id", "req-42"),))
    assert info.value.code() is grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error (request id req-42)"
    assert ("x-request-id", "req-42") in tuple(info.value.trailing_metadata() or ())


def test_events_published_by_a_call_carry_its_request_id(runtime) -> None:
    given = _call(runtime, "Correlate", timeout=5, metadata=(("x-request-id", "req-7"),))
    assert given == b"req-7"
    made_up = _call(runtime, "Correlate", timeout=5)  # none given: the one the server made
    assert len(made_up) == 32 and made_up != given


def test_riffloop_error_maps_to_its_code_with_the_reason(runtime) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _call(runtime, "Missing", timeout=5)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "track t1 does not exist"


def test_a_backend_outage_is_unavailable_with_a_retry_hint(runtime) -> None:
    """A publish the broker did not take: UNAVAILABLE, the reason, and when to retry as the
    ``retry-after-ms`` trailer; riffloop.client turns it into TransientError.retry_after_s."""
    from riffloop.client._client import _translate

    with pytest.raises(grpc.RpcError) as info:
        _call(runtime, "BrokerDown", timeout=5, metadata=(("x-request-id", "req-9"),))
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "Kafka error" in (info.value.details() or "")
    trailers = dict(info.value.trailing_metadata() or ())
    assert trailers["retry-after-ms"] == "1000" and trailers["x-request-id"] == "req-9"
    translated = _translate(info.value)
    assert isinstance(translated, TransientError) and translated.retry_after_s == 1.0


def test_drain_finishes_in_flight_calls_and_refuses_new_ones(runtime) -> None:
    release.clear()
    assert _call(runtime, "Echo", timeout=5) == b"echo"  # served before the drain
    result: dict[str, object] = {}

    def slow_call() -> None:
        result["value"] = _call(runtime, "Slow", timeout=10)

    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.3)  # the call is in flight
    stopper = threading.Thread(target=runtime.stop)
    stopper.start()
    time.sleep(0.3)
    assert runtime.readiness.ready is False  # NOT_SERVING while draining
    # A call that succeeds on a serving process is refused once the drain has begun.
    with pytest.raises(grpc.RpcError) as refused:
        _call(runtime, "Echo", timeout=2)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    release.set()
    caller.join(10)
    stopper.join(10)
    assert result["value"] == b"done"


def test_health_follows_the_dependency_checks() -> None:
    up = {"redis": False}
    rt = ServiceRuntime("healthsvc", grpc_port=0, metrics_port=None, readiness_interval_s=0.05)
    rt.readiness.add_check("redis", lambda: up["redis"])
    rt.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{rt.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def status() -> int:
                return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)

            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
            up["redis"] = True
            deadline = time.monotonic() + 5
            while status() != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        rt.stop()


def test_a_dead_worker_fails_liveness_so_the_process_is_restarted() -> None:
    """A background loop that dies (a bug, an error its loop does not retry) leaves a process
    that looks healthy but does nothing: liveness and readiness go NOT_SERVING."""
    from riffloop.core import MemoryEventBus, Settings
    from riffloop.runtime import ConsumerWorker, DeferredWorker, EventRouter, LoopWorker, metrics

    def healthy(stop: threading.Event) -> None:
        stop.wait()

    def crashes(stop: threading.Event) -> None:
        raise KeyError("a bug in the scoring loop")

    rt = ServiceRuntime("deadsvc", grpc_port=0, metrics_port=None, readiness_interval_s=0.05)
    rt.add_worker(LoopWorker("deadsvc-fine", healthy))
    rt.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{rt.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def status(service: str = "") -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return int(stub.Check(request, timeout=5).status)

            time.sleep(0.3)  # several polls with every worker alive: still serving
            assert status() == status("liveness") == health_pb2.HealthCheckResponse.SERVING
            dying = LoopWorker("deadsvc-scorer", crashes)
            rt.add_worker(dying)
            dying.start()
            deadline = time.monotonic() + 5
            while status("liveness") != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert metrics.WORKER_FAILURES.labels("deadsvc")._value.get() == 1
    finally:
        rt.stop()

    # a consumer thread that dies records why (behind a DeferredWorker too)
    class Ports:
        bus, kv = MemoryEventBus(), MemoryKeyValueStore()

    worker = ConsumerWorker(
        Settings(service_name="deadsvc"), Ports(), EventRouter({"songs.uploaded.v1": print})
    )

    def broken_run() -> None:
        raise KeyError("not a TransientError")

    worker.consumer.run = broken_run  # type: ignore[method-assign]
    deferred = DeferredWorker(worker, lambda: True, poll_s=0.01)
    deferred.start()
    deadline = time.monotonic() + 5
    # ``failed`` is recorded before the dying thread logs and exits: wait for both.
    while deferred.failed is None or worker.alive:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert isinstance(worker.failed, KeyError)
    deferred.stop(1.0)


def test_after_sigterm_it_reports_not_serving_but_serves_for_the_drain_delay() -> None:
    """Kubernetes drops a pod from its endpoints only after it sees NOT_SERVING (or the pod
    terminating); calls still routed to it meanwhile are served, not refused."""
    rt = ServiceRuntime("delaysvc", grpc_port=0, metrics_port=None, grace_s=2.0, drain_delay_s=3.0)
    handlers = {"Correlate": grpc.unary_unary_rpc_method_handler(_correlate)}
    rt.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Svc", handlers),))
    rt.start()
    with grpc.insecure_channel(f"127.0.0.1:{rt.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        call = channel.unary_unary("/t.Svc/Correlate")
        stopping = threading.Thread(target=rt.stop)
        started = time.monotonic()
        stopping.start()
        time.sleep(0.3)
        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert call(b"", timeout=5, metadata=(("x-request-id", "late-1"),)) == b"late-1"
        stopping.join(10)
        assert time.monotonic() - started >= 3.0
        with pytest.raises(grpc.RpcError):
            call(b"", timeout=2)


def test_sliding_window_limiter_allows_the_burst_then_refills_at_the_rate() -> None:
    now = [1000.0]
    limiter = SlidingWindowLimiter(
        MemoryKeyValueStore(clock=lambda: now[0]), rate_per_s=10, burst=5, clock=lambda: now[0]
    )
    assert [limiter.try_acquire("u") for _ in range(5)] == [0.0] * 5
    wait = limiter.try_acquire("u")
    assert wait > 0
    assert limiter.try_acquire("other") == 0.0  # per key
    now[0] += 1.0  # two windows later everything has refilled
    assert limiter.try_acquire("u") == 0.0


def test_sliding_window_limiter_charges_a_batch_per_item_and_refunds_a_refusal() -> None:
    now = [1000.0]
    kv = MemoryKeyValueStore(clock=lambda: now[0])
    limiter = SlidingWindowLimiter(kv, rate_per_s=10, burst=20, clock=lambda: now[0])
    assert limiter.try_acquire("u", 15) == 0.0
    assert limiter.try_acquire("u", 10) > 0  # 25 > burst: refused, and not charged
    assert limiter.try_acquire("u", 5) == 0.0  # the refused 10 were given back
    assert limiter.try_acquire("u") > 0
    with pytest.raises(ValidationError):
        limiter.try_acquire("u", 0)


def test_tokens_verify_and_refuse_tampering_and_expiry() -> None:
    signer = TokenSigner("s" * 20, clock=lambda: 100.0)
    token = signer.issue("alice", ttl_s=10)
    assert signer.verify(token) == "alice"
    header, _, mac = token.split(".")
    forged = signer.issue("mallory", ttl_s=10).split(".")[1]
    with pytest.raises(UnauthenticatedError, match="signature"):
        signer.verify(f"{header}.{forged}.{mac}")
    with pytest.raises(UnauthenticatedError, match="expired"):
        TokenSigner("s" * 20, clock=lambda: 200.0).verify(token)
    with pytest.raises(UnauthenticatedError, match="unknown key"):  # its kid names another key
        TokenSigner("t" * 20).verify(token)
    with pytest.raises(ValidationError):
        signer.issue("bad user")
    with pytest.raises(ValidationError):
        TokenSigner("short")


def test_service_settings_fail_fast() -> None:
    from services.gateway import GatewaySettings

    with pytest.raises(ConfigurationError, match="RIFFLOOP_AUTH_SECRET"):
        GatewaySettings.from_env({})
    with pytest.raises(ConfigurationError, match="RIFFLOOP_BIND_HOST"):
        ServiceSettings.from_env({"RIFFLOOP_BIND_HOST": "not a host"})
    with pytest.raises(ConfigurationError, match="unknown setting"):
        GatewaySettings.from_env({"RIFFLOOP_AUTH_SECRET": "x" * 20, "RIFFLOOP_RATE_LIMT": "1"})
    settings = GatewaySettings.from_env({"RIFFLOOP_AUTH_SECRET": "x" * 20})
    assert "x" * 20 not in repr(settings)


@pytest.mark.parametrize("service", ["gateway", "generator"])
def test_the_blind_services_refuse_real_backends_without_a_dispatch_key(service: str) -> None:
    """On real backends the dispatch key is a required secret: with a guessable one, a client
    could compute from its request id whether its track is the baseline."""
    import importlib

    module = importlib.import_module(f"services.{service}")
    settings_class = getattr(module, f"{service.capitalize()}Settings")
    real = {
        "RIFFLOOP_BACKEND": "real",
        "RIFFLOOP_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
        "RIFFLOOP_S3_ENDPOINT": "http://127.0.0.1:9000",
        "RIFFLOOP_S3_ACCESS_KEY": "riffloop",
        "RIFFLOOP_S3_SECRET_KEY": "very-secret-key",
        "RIFFLOOP_REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    if service == "gateway":
        real["RIFFLOOP_AUTH_SECRET"] = "x" * 20
    with pytest.raises(ConfigurationError, match="RIFFLOOP_DISPATCH_KEY must be set"):
        settings_class.from_env(real)
    with pytest.raises(ConfigurationError, match="shorter than 16"):
        settings_class.from_env({**real, "RIFFLOOP_DISPATCH_KEY": "0"})
    key = "k" * 32
    settings = settings_class.from_env({**real, "RIFFLOOP_DISPATCH_KEY": key})
    assert settings.effective_dispatch_key() == key
    assert key not in repr(settings) and settings.describe()["dispatch_key"] == "****"
    # embedded: one random key per process, shared by every service in it
    secret = {"RIFFLOOP_AUTH_SECRET": "x" * 20} if service == "gateway" else {}
    embedded = settings_class.from_env(secret)
    other = settings_class.from_env(secret)
    assert embedded.effective_dispatch_key() == other.effective_dispatch_key()
    assert len(embedded.effective_dispatch_key()) >= 16


@pytest.mark.parametrize(
    ("service", "env", "reason"),
    [
        ("gateway", {"RIFFLOOP_MIN_AUDIO_SECONDS": "-1"}, "RIFFLOOP_MIN_AUDIO_SECONDS"),
        ("gateway", {"RIFFLOOP_MIN_AUDIO_SECONDS": "700"}, "RIFFLOOP_MAX_AUDIO_SECONDS"),
        ("gateway", {"RIFFLOOP_MAX_AUDIO_SECONDS": "900"}, "the encoder's limit"),
        ("gateway", {"RIFFLOOP_MAX_UPLOAD_BYTES": str(60 * 2**20)}, "never be encoded"),
        ("selector", {"RIFFLOOP_MAX_AGE": "0"}, "RIFFLOOP_MAX_AGE"),
        ("selector", {"RIFFLOOP_CAP_PER_INPUT": "0"}, "RIFFLOOP_CAP_PER_INPUT"),
        ("trainer", {"RIFFLOOP_BASE_PRESET": "cpu_smal"}, "RIFFLOOP_BASE_PRESET must be one of"),
    ],
)
def test_service_settings_that_would_wedge_the_service_later_are_refused_at_start(
    service: str, env: dict[str, str], reason: str
) -> None:
    import importlib

    module = importlib.import_module(f"services.{service}")
    settings_class = getattr(module, f"{service.capitalize()}Settings")
    secret = {"RIFFLOOP_AUTH_SECRET": "x" * 20} if service == "gateway" else {}
    with pytest.raises(ConfigurationError, match=reason):
        settings_class.from_env({**secret, **env})


def test_the_gateway_audio_bounds_are_the_encoders() -> None:
    from riffloop.music import AudioLimits
    from services.gateway._settings import ENCODER_MAX_BYTES, ENCODER_MAX_SECONDS

    encoder = AudioLimits()  # what services/encoder decodes uploads with (min_seconds aside)
    assert (encoder.max_bytes, encoder.max_seconds) == (ENCODER_MAX_BYTES, ENCODER_MAX_SECONDS)


def test_settle_garbage_collector_freezes_the_heap_and_times_every_collection() -> None:
    import gc

    from prometheus_client import REGISTRY

    from riffloop.runtime._server import settle_garbage_collector

    def count() -> float:
        labels = {"service": "gc-test", "generation": "2"}
        return REGISTRY.get_sample_value("riffloop_gc_pause_seconds_count", labels) or 0.0

    callbacks = list(gc.callbacks)
    try:
        settle_garbage_collector("gc-test")
        assert gc.get_freeze_count() > 0
        before = count()
        gc.collect()
        assert count() == before + 1
    finally:
        gc.callbacks[:] = callbacks
        gc.unfreeze()


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_as_v1_and_v1alpha_as_grpcurl_asks(version: str) -> None:
    """grpcurl and grpcui try ``grpc.reflection.v1`` first (some newer clients speak only that);
    both names list the services and resolve a symbol to its file."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from riffloop.v1 import gateway_service_pb2_grpc

    rt = ServiceRuntime("reflectsvc", grpc_port=0, metrics_port=None)
    rt.add_service(
        gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server,
        gateway_service_pb2_grpc.GatewayServiceServicer(),
        "riffloop.v1.GatewayService",
    )
    rt.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{rt.port}") as channel:
            info = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="riffloop.v1.GatewayService"
                ),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="grpc.reflection.v1.ServerReflection"
                ),
            ]
            listed, gateway, reflection_v1 = list(info(iter(requests), timeout=5))
    finally:
        rt.stop()
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "riffloop.v1.GatewayService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names

    def file_names(response: reflection_pb2.ServerReflectionResponse) -> set[str]:
        protos = response.file_descriptor_response.file_descriptor_proto
        return {descriptor_pb2.FileDescriptorProto.FromString(p).name for p in protos}

    assert any(n.endswith("gateway_service.proto") for n in file_names(gateway))
    assert "grpc/reflection/v1/reflection.proto" in file_names(reflection_v1)

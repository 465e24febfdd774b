"""Every service passes the same checks: health, reflection (internal services; the public gateway
only when enabled), operator credentials on every internal RPC, /metrics (style rule 13)."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from riffloop.runtime import TokenSigner, metrics, operator_token
from tests.services.conftest import SECRET, Running, shared_ports, start_service, wait_for

pytestmark = [pytest.mark.contract, pytest.mark.slow]

SERVICES = {
    "gateway": "riffloop.v1.GatewayService",
    "encoder": "riffloop.v1.EncoderService",
    "generator": "riffloop.v1.GeneratorService",
    "feedback": "riffloop.v1.FeedbackService",
    "selector": "riffloop.v1.SelectorService",
    "trainer": "riffloop.v1.TrainerService",
}
# Series every process exports from its first scrape (label-free or pre-initialised).
ALWAYS = {
    "riffloop_grpc_requests_total",
    "riffloop_grpc_request_seconds",
    "riffloop_dependency_ready",
    "riffloop_kafka_consumer_lag",
    "riffloop_kafka_messages_total",
    "riffloop_dlq_messages_total",
    "riffloop_ratings_total",
    "riffloop_spam_caught_total",
    "riffloop_tracks_generated_total",
    "riffloop_generation_seconds",
    "riffloop_training_steps_total",
    "riffloop_training_failures_total",
    "riffloop_model_rollbacks_total",
}


def _health(running: Running, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(running.channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_health_turns_serving_once_dependencies_and_model_are_ready(
    all_services: dict[str, Running], name: str
) -> None:
    running = all_services[name]
    serving = health_pb2.HealthCheckResponse.SERVING
    wait_for(lambda: _health(running) == serving, 60, f"{name} SERVING")
    assert _health(running, SERVICES[name]) == serving
    assert running.runtime.readiness.state()["kafka"] is True
    if name in ("encoder", "generator", "trainer"):
        assert running.runtime.readiness.state()["model"] is True


def _reflected(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    return {s.name for s in response.list_services_response.service}


@pytest.mark.parametrize("name", sorted(set(SERVICES) - {"gateway"}))
def test_reflection_lists_the_service_and_health(
    all_services: dict[str, Running], name: str
) -> None:
    """Internal services keep reflection on, open without a credential (as health is)."""
    with grpc.insecure_channel(f"127.0.0.1:{all_services[name].port}") as channel:
        assert {SERVICES[name], "grpc.health.v1.Health"} <= _reflected(channel)


def test_the_public_gateway_has_no_reflection_unless_enabled(
    all_services: dict[str, Running],
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _reflected(all_services["gateway"].channel)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert _health(all_services["gateway"]) == health_pb2.HealthCheckResponse.SERVING
    enabled = start_service("gateway", shared_ports(), reflection=True)
    try:
        assert {SERVICES["gateway"], "grpc.health.v1.Health"} <= _reflected(enabled.channel)
    finally:
        enabled.channel.close()
        enabled.runtime.stop()


@pytest.mark.parametrize("name", sorted(set(SERVICES) - {"gateway"}))
def test_every_internal_rpc_needs_an_operator_credential(
    all_services: dict[str, Running], name: str
) -> None:
    """Each method of an internal service: no credential UNAUTHENTICATED; a token of another
    secret, or a listener's gateway token, PERMISSION_DENIED. The handler never runs."""
    service = descriptor_pool.Default().FindServiceByName(SERVICES[name])
    assert service.methods
    wrong = {
        "other secret": operator_token("someone-elses-operator-secret", "mallory"),
        "listener token": TokenSigner(SECRET).issue("listener"),
    }
    with grpc.insecure_channel(f"127.0.0.1:{all_services[name].port}") as channel:
        for method in service.methods:
            assert not method.client_streaming and not method.server_streaming, method.name
            call = channel.unary_unary(f"/{service.full_name}/{method.name}")
            with pytest.raises(grpc.RpcError) as info:
                call(b"", timeout=10)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED, method.name
            for what, token in wrong.items():
                with pytest.raises(grpc.RpcError) as info:
                    call(b"", metadata=(("authorization", f"Bearer {token}"),), timeout=10)
                assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED, (method.name, what)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_metrics_endpoint_parses_and_carries_the_shared_metrics(
    all_services: dict[str, Running], name: str
) -> None:
    running = all_services[name]
    stub = health_pb2_grpc.HealthStub(running.channel)
    stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # one RPC through the interceptors
    with urllib.request.urlopen(running.metrics_url, timeout=5) as response:
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    exposed = set()
    for family in families.values():
        for sample in family.samples:
            exposed.add(
                sample.name.removesuffix("_bucket")
                .removesuffix("_count")
                .removesuffix("_sum")
                .removesuffix("_created")
            )
    missing = ALWAYS - exposed
    assert not missing, f"{name} /metrics lacks {sorted(missing)}"
    assert set(metrics.METRIC_NAMES) >= ALWAYS
    requests = [
        s
        for s in families["riffloop_grpc_requests"].samples
        if s.name == "riffloop_grpc_requests_total" and s.labels["service"] == name
    ]
    assert any(s.labels["method"] == "Check" and s.value >= 1 for s in requests)


def test_metric_names_match_the_architecture_table() -> None:
    from pathlib import Path

    table = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"
    documented = {
        line.split("`")[1]
        for line in table.read_text().splitlines()
        if line.startswith("| `riffloop_")
    }
    assert documented == set(metrics.METRIC_NAMES)


def test_unknown_method_is_unimplemented_and_the_server_keeps_serving(
    all_services: dict[str, Running],
) -> None:
    running = all_services["feedback"]
    call = running.channel.unary_unary("/riffloop.v1.FeedbackService/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as info:
        call(b"", timeout=5)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert _health(running) == health_pb2.HealthCheckResponse.SERVING

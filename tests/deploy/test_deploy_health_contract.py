"""The health contract the kubelet probes rely on (deploy/k8s/base/*/deployment.yaml, DEPLOY.md).

- startup and liveness probes ask ``grpc.health.v1.Health/Check`` for the entry ``liveness``: it
  must be SERVING while the process serves, even when Kafka, S3 or Redis are down (or a broker
  outage would restart every pod at once);
- the readiness probe asks for the overall entry ``""``: NOT_SERVING until every dependency is
  ready.

Runs one in-process ``ServiceRuntime`` on a free loopback port with a dependency that is down.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_liveness_serves_while_a_dependency_is_down() -> None:
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from riffloop.runtime import ServiceRuntime

    runtime = ServiceRuntime("probe-contract", grpc_port=0, metrics_port=None)
    runtime.readiness.add_check("kafka", lambda: False)
    port = runtime.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def status(service: str) -> int:
                try:
                    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                except grpc.RpcError as error:
                    pytest.fail(
                        f"Health/Check(service={service!r}) failed with {error.code().name}: the "
                        "runtime must register this entry (the kubelet probes ask for it)"
                    )
                return response.status

            assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING, (
                "readiness ignores Kafka"
            )
            assert status("liveness") == health_pb2.HealthCheckResponse.SERVING, (
                "liveness must not depend on Kafka/S3/Redis"
            )
    finally:
        runtime.stop()

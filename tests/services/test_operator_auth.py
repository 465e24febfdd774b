"""Operator credentials on the internal RPCs, and reflection on the public gateway.

The internal services (encoder, generator, feedback, selector, trainer) answer their RPCs only to
calls carrying an operator token signed with RIFFLOOP_OPERATOR_SECRET: none is UNAUTHENTICATED,
a wrong one PERMISSION_DENIED; health and reflection stay open. A service refuses to start
without the secret unless RIFFLOOP_DEV_OPEN_INTERNAL_RPCS says so.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from riffloop.client import operator_channel
from riffloop.core import ConfigurationError, PermissionDeniedError, UnauthenticatedError
from riffloop.runtime import (
    OperatorAuthInterceptor,
    OperatorVerifier,
    ServiceRuntime,
    TokenExpiredError,
    TokenSigner,
    current_user,
    operator_token,
)
from tests.services.conftest import shared_ports

pytestmark = pytest.mark.unit

SECRET = "operator-secret-for-tests-01"
INTERNAL = ("encoder", "generator", "feedback", "selector", "trainer")


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    return current_user().encode()


@pytest.fixture
def guarded() -> Iterator[str]:
    """A runtime with one internal method behind the operator interceptor; yields its target."""
    rt = ServiceRuntime(
        "opsvc",
        grpc_port=0,
        metrics_port=None,
        interceptors=[OperatorAuthInterceptor(OperatorVerifier(SECRET))],
    )
    handlers = {"WhoAmI": grpc.unary_unary_rpc_method_handler(_whoami)}
    rt.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Ops", handlers),))
    rt.start()
    yield f"127.0.0.1:{rt.port}"
    rt.stop()


def _code(target: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary("/t.Ops/WhoAmI")(b"", metadata=metadata, timeout=5)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_an_operator_token_opens_the_rpc_and_names_the_operator(guarded: str) -> None:
    with operator_channel(guarded, operator_token(SECRET, "alice")) as channel:
        assert channel.unary_unary("/t.Ops/WhoAmI")(b"", timeout=5) == b"alice"


def test_no_credential_is_unauthenticated(guarded: str) -> None:
    with grpc.insecure_channel(guarded) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/t.Ops/WhoAmI")(b"", timeout=5)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "RIFFLOOP_OPERATOR_SECRET" in (info.value.details() or "")
    assert _code(guarded, (("authorization", "Basic abc"),)) is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(operator_token("another-operator-secret", "mallory"), id="other-secret"),
        # a listener's gateway token signed with the very same secret: wrong audience
        pytest.param(TokenSigner(SECRET).issue("listener"), id="gateway-token"),
        pytest.param(SECRET, id="the-raw-secret"),
        pytest.param("not.a.jwt", id="garbage"),
    ],
)
def test_a_wrong_credential_is_permission_denied(guarded: str, token: str) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    assert _code(guarded, metadata) is grpc.StatusCode.PERMISSION_DENIED


def test_an_expired_operator_token_is_unauthenticated() -> None:
    old = TokenSigner(SECRET, audience="riffloop-operator", clock=lambda: 1000.0).issue("bob")
    with pytest.raises(TokenExpiredError):
        OperatorVerifier(SECRET).verify(old)
    assert issubclass(TokenExpiredError, UnauthenticatedError)
    with pytest.raises(PermissionDeniedError):
        OperatorVerifier(SECRET).verify(operator_token("x" * 20, "eve"))


def test_health_answers_without_a_credential(guarded: str) -> None:
    with grpc.insecure_channel(guarded) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status in (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )


def _settings_class(service: str) -> Any:
    module = importlib.import_module(f"services.{service}")
    return getattr(module, f"{service.capitalize()}Settings")


@pytest.mark.parametrize("service", INTERNAL)
def test_an_internal_service_refuses_to_start_without_an_operator_secret(service: str) -> None:
    settings_class = _settings_class(service)
    build = importlib.import_module(f"services.{service}").build
    with pytest.raises(ConfigurationError, match="RIFFLOOP_OPERATOR_SECRET must be set"):
        build(settings_class(grpc_port=0, metrics_port=0), shared_ports())
    # the development flag opens them, on purpose and loudly
    assert (
        OperatorAuthInterceptor.from_settings(
            settings_class.from_env({"RIFFLOOP_DEV_OPEN_INTERNAL_RPCS": "true"})
        ).verifier
        is None
    )
    with pytest.raises(ConfigurationError, match="both"):
        settings_class.from_env(
            {"RIFFLOOP_DEV_OPEN_INTERNAL_RPCS": "true", "RIFFLOOP_OPERATOR_SECRET": SECRET}
        )
    with pytest.raises(ConfigurationError, match="shorter than 16"):
        settings_class.from_env({"RIFFLOOP_OPERATOR_SECRET": "short"})
    settings = settings_class.from_env({"RIFFLOOP_OPERATOR_SECRET": SECRET})
    assert SECRET not in repr(settings) and settings.describe()["operator_secret"] == "****"
    assert OperatorAuthInterceptor.from_settings(settings).verifier is not None

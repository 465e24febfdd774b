"""Operator access to the internal services (encoder, generator, feedback, selector, trainer).

Their RPCs (Promote, Rollback, RunSelection, TrainStatus, TrackScore, RaterReport…) answer only
calls that carry an operator token: an HS256 JWT signed with the deployment's
``RIFFLOOP_OPERATOR_SECRET`` (``riffloop.runtime.operator_token(secret, "alice")``). A call
without one gets UNAUTHENTICATED, with a token of another secret or a listener's token
PERMISSION_DENIED. ``operator_channel`` adds the token to every call of the generated stubs::

    channel = operator_channel("127.0.0.1:50056", operator_token(secret, "alice"))
    TrainerServiceStub(channel).Promote(PromoteRequest(version="v0002"), timeout=30)
"""

from __future__ import annotations

import collections
from typing import Any

import grpc


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _OperatorToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call's metadata."""

    def __init__(self, token: str) -> None:
        if not token or any(c.isspace() for c in token):
            raise ValueError("an operator token is a non-empty string without spaces")
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> _CallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        return _CallDetails(
            details.method,
            details.timeout,
            [*metadata, self._header],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


def operator_channel(
    target: str, token: str, *, channel: grpc.Channel | None = None
) -> grpc.Channel:
    """A channel to an internal service (``target``, or the given ``channel``) whose every call
    carries the operator ``token``. Closing it closes the underlying channel."""
    return grpc.intercept_channel(channel or grpc.insecure_channel(target), _OperatorToken(token))

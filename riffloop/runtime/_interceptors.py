"""gRPC server interceptors: the cross-cutting concerns of every call, kept out of handlers.

Order on a server (outermost first): :class:`ObservabilityInterceptor` (request id, deadline,
metrics, JSON access log, error → status code), then for the gateway :class:`BearerAuthInterceptor`
and :class:`RateLimitInterceptor`, for the internal services :class:`OperatorAuthInterceptor`.
Inner interceptors and handlers signal failures by raising a ``riffloop.core.RiffloopError``;
the outermost one is the only place that picks a status code: ``grpc.StatusCode[err.grpc_code]``
with ``err.reason`` as details. Any other exception becomes
INTERNAL with a request id and no traceback (the traceback goes to the log).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from riffloop.core import (
    ConfigurationError,
    PermissionDeniedError,
    RateLimitedError,
    RiffloopError,
    UnauthenticatedError,
)
from riffloop.core._context import correlation_id_var
from riffloop.core._tracing import end_rpc, request_id_of, rpc_span
from riffloop.runtime import metrics
from riffloop.runtime._logging import request_id_var, user_id_var

if TYPE_CHECKING:
    from riffloop.runtime._ratelimit import InFlightLimiter

_log = logging.getLogger("riffloop.rpc")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# grpc reports "no deadline" as a remaining time of many years.
_NO_DEADLINE_S = 1e8
# Health and reflection answer anyone: probes carry no token.
_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _split_method(full: str) -> tuple[str, str]:
    """ "/riffloop.v1.GatewayService/Rate" → ("riffloop.v1.GatewayService", "Rate")."""
    _, service, method = full.split("/", 2) if full.count("/") >= 2 else ("", "?", full)
    return service, method


def _rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior, bool], Behavior]) -> Any:
    """Return ``handler`` with its behaviour wrapped; ``wrap(behavior, streams_responses)``."""
    if handler.unary_unary is not None:
        factory, behavior, streams = grpc.unary_unary_rpc_method_handler, handler.unary_unary, False
    elif handler.unary_stream is not None:
        factory, behavior, streams = (
            grpc.unary_stream_rpc_method_handler,
            handler.unary_stream,
            True,
        )
    elif handler.stream_unary is not None:
        factory, behavior, streams = (
            grpc.stream_unary_rpc_method_handler,
            handler.stream_unary,
            False,
        )
    else:
        factory, behavior, streams = (
            grpc.stream_stream_rpc_method_handler,
            handler.stream_stream,
            True,
        )
    return factory(
        wrap(behavior, streams),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def remaining_seconds(context: grpc.ServicerContext, default_s: float) -> float:
    """Seconds this call may still take: the client's deadline, capped at ``default_s``."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_S:
        return default_s
    return min(float(remaining), default_s)


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """Trace span, request id, deadline check, metrics, access log and the error → status-code
    mapping. The call's span (riffloop.core._tracing) continues a W3C ``traceparent`` in the
    metadata; a call without a valid ``x-request-id`` takes the trace id as its request id."""

    def __init__(self, service: str, *, min_deadline_s: float = 0.001) -> None:
        self.service = service
        self.min_deadline_s = min_deadline_s

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full_method: str = handler_call_details.method
        _, method = _split_method(full_method)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("x-request-id", ""))
        given_id = given if _REQUEST_ID.match(given) else ""

        def wrap(behavior: Behavior, streams: bool) -> Behavior:
            if streams:

                def stream_behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    with rpc_span(full_method, metadata) as span:
                        request_id = given_id or request_id_of(span)
                        token = request_id_var.set(request_id)
                        correlation = correlation_id_var.set(request_id)  # events carry it
                        started = time.perf_counter()
                        code = "OK"
                        try:
                            self._check_deadline(context)
                            yield from behavior(request, context)
                        except BaseException as exc:
                            code = self._fail(exc, context, full_method, request_id)
                        finally:
                            code = self._observe(method, code, context, started, full_method)
                            end_rpc(span, code, request_id)
                            correlation_id_var.reset(correlation)
                            request_id_var.reset(token)

                return stream_behavior

            def unary_behavior(request: Any, context: grpc.ServicerContext) -> Any:
                with rpc_span(full_method, metadata) as span:
                    request_id = given_id or request_id_of(span)
                    token = request_id_var.set(request_id)
                    correlation = correlation_id_var.set(request_id)  # events it makes carry it
                    started = time.perf_counter()
                    code = "OK"
                    try:
                        self._check_deadline(context)
                        return behavior(request, context)
                    except BaseException as exc:
                        code = self._fail(exc, context, full_method, request_id)
                    finally:
                        code = self._observe(method, code, context, started, full_method)
                        end_rpc(span, code, request_id)
                        correlation_id_var.reset(correlation)
                        request_id_var.reset(token)

            return unary_behavior

        return _rewrap(handler, wrap)

    def _check_deadline(self, context: grpc.ServicerContext) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining < self.min_deadline_s:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before the call ran")
        context.set_trailing_metadata((("x-request-id", request_id_var.get()),))

    def _fail(
        self,
        exc: BaseException,
        context: grpc.ServicerContext,
        full_method: str,
        request_id: str,
    ) -> str:
        """Translate ``exc`` into the call's status (raises, as ``context.abort`` does)."""
        if isinstance(exc, GeneratorExit):
            # The client went away in the middle of a stream.
            raise exc
        if isinstance(exc, RiffloopError):
            code = grpc.StatusCode[exc.grpc_code]
            level = logging.ERROR if code is grpc.StatusCode.INTERNAL else logging.INFO
            _log.log(
                level,
                "rpc failed",
                extra={"method": full_method, "code": code.name, "reason": exc.reason},
            )
            retry_after = getattr(exc, "retry_after_s", None)
            if retry_after is not None:  # machine-readable, beside the request id
                context.set_trailing_metadata(
                    (
                        ("x-request-id", request_id),
                        ("retry-after-ms", str(max(1, math.ceil(retry_after * 1000)))),
                    )
                )
            context.abort(code, exc.reason)
        existing = _status_of(context)
        if existing is not None and existing is not grpc.StatusCode.OK:
            # The handler (or grpc itself) already set a status through context.abort.
            raise exc
        _log.error("unexpected error", exc_info=exc, extra={"method": full_method})
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")
        raise AssertionError("unreachable: context.abort raises")

    def _observe(
        self,
        method: str,
        code: str,
        context: grpc.ServicerContext,
        started: float,
        full_method: str,
    ) -> str:
        """Count and time the call; return its final status code's name."""
        status = _status_of(context)
        if status is not None:
            code = status.name
        elapsed = time.perf_counter() - started
        metrics.GRPC_REQUESTS.labels(self.service, method, code).inc()
        metrics.GRPC_REQUEST_SECONDS.labels(self.service, method).observe(elapsed)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "rpc done",
                extra={"method": full_method, "code": code, "ms": round(elapsed * 1000, 3)},
            )
        return code


def _status_of(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    code_of = getattr(context, "code", None)
    if code_of is None:
        return None
    code = code_of()
    return code if isinstance(code, grpc.StatusCode) else None


class TokenVerifier(Protocol):
    def verify(self, token: str) -> str:
        """Return the user id a bearer token stands for; raise UnauthenticatedError if bad."""
        ...


def bearer_user(header: str, verifier: TokenVerifier) -> str:
    """The user an ``authorization`` header value stands for (``Bearer <token>``); raises
    UnauthenticatedError with the reason. The gRPC interceptor and the Connect (browser) API
    both call it, so a call is refused the same way on either."""
    scheme, _, token = header.partition(" ")
    if not header:
        raise UnauthenticatedError("missing authorization metadata (expected 'Bearer <token>')")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthenticatedError("authorization metadata must be 'Bearer <token>'")
    return verifier.verify(token.strip())


def _as_identity(handler: Any, identity: str, problem: RiffloopError | None) -> Any:
    """``handler`` run as ``identity`` (:func:`current_user`), or refused with ``problem``."""

    def wrap(behavior: Behavior, streams: bool) -> Behavior:
        if streams:

            def stream_behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                if problem is not None:
                    raise problem
                token_ = user_id_var.set(identity)
                try:
                    yield from behavior(request, context)
                finally:
                    user_id_var.reset(token_)

            return stream_behavior

        def unary_behavior(request: Any, context: grpc.ServicerContext) -> Any:
            if problem is not None:
                raise problem
            token_ = user_id_var.set(identity)
            try:
                return behavior(request, context)
            finally:
                user_id_var.reset(token_)

        return unary_behavior

    return _rewrap(handler, wrap)


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """``authorization: Bearer <token>`` on every call but health and reflection.

    The verified user id is available to handlers as :func:`current_user`.
    """

    def __init__(self, verifier: TokenVerifier) -> None:
        self.verifier = verifier

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_PUBLIC_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        user_id = ""
        problem: RiffloopError | None = None
        try:
            user_id = bearer_user(str(metadata.get("authorization", "")), self.verifier)
        except UnauthenticatedError as err:
            problem = err
        return _as_identity(handler, user_id, problem)


def operator_of(header: str, verifier: TokenVerifier) -> str:
    """The operator an ``authorization`` header value names (``Bearer <operator token>``).

    No credential: UnauthenticatedError. A credential this deployment did not issue to an
    operator: PermissionDeniedError (raised by ``verifier``)."""
    if not header:
        raise UnauthenticatedError(
            "internal RPC without an operator credential (expected authorization metadata "
            "'Bearer <operator token>', signed with RIFFLOOP_OPERATOR_SECRET)"
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthenticatedError("authorization metadata must be 'Bearer <operator token>'")
    return verifier.verify(token.strip())


class OperatorAuthInterceptor(grpc.ServerInterceptor):
    """Internal services: every call but health and reflection carries an operator token
    (``riffloop.runtime.operator_token``); the operator's name is :func:`current_user`.

    ``verifier`` None leaves the RPCs open: only for ``RIFFLOOP_DEV_OPEN_INTERNAL_RPCS``
    (:meth:`from_settings`)."""

    def __init__(self, verifier: TokenVerifier | None) -> None:
        self.verifier = verifier

    @classmethod
    def from_settings(cls, settings: Any) -> OperatorAuthInterceptor:
        """From an ``OperatorGuarded`` settings object; raises ConfigurationError when the
        service would expose its internal RPCs without an operator secret."""
        from riffloop.runtime._auth import OperatorVerifier

        if settings.dev_open_internal_rpcs:
            _log.warning(
                "internal RPCs are open to any caller (RIFFLOOP_DEV_OPEN_INTERNAL_RPCS): "
                "development only"
            )
            return cls(None)
        if not settings.operator_secret:
            raise ConfigurationError(
                "RIFFLOOP_OPERATOR_SECRET must be set (at least 16 characters): this "
                f"service's RPCs ({settings.service_name}) are internal and answer only calls "
                "with an operator token signed with it (RIFFLOOP_DEV_OPEN_INTERNAL_RPCS=true "
                "opens them, for development only)"
            )
        return cls(OperatorVerifier(settings.operator_secret))

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if (
            handler is None
            or self.verifier is None
            or handler_call_details.method.startswith(_PUBLIC_PREFIXES)
        ):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        operator = ""
        problem: RiffloopError | None = None
        try:
            operator = operator_of(str(metadata.get("authorization", "")), self.verifier)
        except (UnauthenticatedError, PermissionDeniedError) as err:
            problem = err
        return _as_identity(handler, operator, problem)


def current_user() -> str:
    """The user id the auth interceptor verified for this call ("" outside authenticated calls)."""
    return user_id_var.get()


class RateLimiter(Protocol):
    def try_acquire(self, key: str, cost: int = 1) -> float:
        """Take ``cost`` tokens for ``key``; return 0 when allowed, else seconds until free."""
        ...


class RateLimitInterceptor(grpc.ServerInterceptor):
    """Per-user token bucket and in-flight caps; runs after auth (it keys on the verified
    user). A call costs one token, or its method's cost in ``costs``: a fixed number (what the
    call makes the system do: a Generate is a GPU job, an upload a decode) or, for a unary
    method, a function of the request (a batch pays per item). With ``in_flight``, a user's
    calls of a capped kind (uploads, Generate) in progress at once are bounded too."""

    def __init__(
        self,
        limiter: RateLimiter,
        costs: dict[str, int | Callable[[Any], int]] | None = None,
        in_flight: InFlightLimiter | None = None,
    ) -> None:
        self.limiter = limiter
        self.costs = dict(costs or {})
        self.in_flight = in_flight

    def charge(self, method: str, request: Any = None) -> None:
        """Take the call's tokens from the verified user's bucket, or raise RateLimitedError.
        ``request`` None (a streamed request) costs the method's fixed cost, else one token.
        The Connect (browser) API calls this too, so both transports draw on one bucket per
        user."""
        user = user_id_var.get()
        if not user:
            return  # unauthenticated calls were refused by the auth interceptor already
        cost_of = self.costs.get(method)
        if isinstance(cost_of, int):
            cost = cost_of
        else:
            cost = 1 if cost_of is None or request is None else max(1, int(cost_of(request)))
        wait_s = self.limiter.try_acquire(user, cost)
        if wait_s > 0:
            raise RateLimitedError(
                f"rate limit exceeded for user {user} on {method}; retry in {wait_s:.2f} s",
                retry_after_s=wait_s,
            )

    def admit(self, method: str) -> contextlib.AbstractContextManager[None]:
        """Hold one of the verified user's in-flight places for ``method`` while the block
        runs (RateLimitedError when none is free); the Connect API runs its handlers in it."""
        user = user_id_var.get()
        if self.in_flight is None or not user:
            return contextlib.nullcontext()
        return self.in_flight.hold(method, user)

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_PUBLIC_PREFIXES):
            return handler
        _, method = _split_method(handler_call_details.method)
        # a client-streamed request arrives as an iterator: it pays the method's fixed cost
        streamed_request = handler.request_streaming

        def wrap(behavior: Behavior, streams: bool) -> Behavior:
            if streams:

                def stream_behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    self.charge(method, None if streamed_request else request)
                    with self.admit(method):
                        yield from behavior(request, context)

                return stream_behavior

            def unary_behavior(request: Any, context: grpc.ServicerContext) -> Any:
                self.charge(method, None if streamed_request else request)
                with self.admit(method):
                    return behavior(request, context)

            return unary_behavior

        return _rewrap(handler, wrap)

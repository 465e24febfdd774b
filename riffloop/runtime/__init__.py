"""What every Riffloop service process shares (docs/ARCHITECTURE.md, "Shared runtime").

gRPC server start-up with health, reflection and message-size limits (:class:`ServiceRuntime`),
per-dependency readiness (:class:`Readiness`), the interceptors (observability, bearer auth,
per-user rate limit), the token bucket, bearer tokens, JSON logging, and the Prometheus metric
objects (:mod:`riffloop.runtime.metrics`).
"""

from riffloop.runtime import metrics
from riffloop.runtime._auth import TokenSigner
from riffloop.runtime._interceptors import (
    BearerAuthInterceptor,
    ObservabilityInterceptor,
    RateLimiter,
    RateLimitInterceptor,
    TokenVerifier,
    current_user,
    remaining_seconds,
)
from riffloop.runtime._logging import configure_logging, request_id_var
from riffloop.runtime._server import LoopWorker, MiB, Readiness, ServiceRuntime, Worker

__all__ = [
    "BearerAuthInterceptor",
    "LoopWorker",
    "MiB",
    "ObservabilityInterceptor",
    "RateLimitInterceptor",
    "RateLimiter",
    "Readiness",
    "ServiceRuntime",
    "TokenSigner",
    "TokenVerifier",
    "Worker",
    "configure_logging",
    "current_user",
    "metrics",
    "remaining_seconds",
    "request_id_var",
]

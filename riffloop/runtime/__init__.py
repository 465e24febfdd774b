"""What every Riffloop service process shares (docs/ARCHITECTURE.md, "Shared runtime").

gRPC server start-up with health, reflection and message-size limits (:class:`ServiceRuntime`),
per-dependency readiness (:class:`Readiness`), the interceptors (observability, bearer auth,
per-user rate limit), the shared rate limiter, bearer tokens, JSON logging, the ports wiring
(:class:`Ports`), the consumer worker, and the Prometheus metric objects
(:mod:`riffloop.runtime.metrics`).
"""

from riffloop.runtime import metrics
from riffloop.runtime._auth import JwtVerifier, TokenSigner, hmac_kid
from riffloop.runtime._consumers import ConsumerWorker, EventRouter
from riffloop.runtime._convert import (
    checked_track_ready,
    provenance_from_proto,
    provenance_to_proto,
    scored_items,
    track_scored_to_proto,
)
from riffloop.runtime._interceptors import (
    BearerAuthInterceptor,
    ObservabilityInterceptor,
    RateLimiter,
    RateLimitInterceptor,
    TokenVerifier,
    bearer_user,
    current_user,
    remaining_seconds,
)
from riffloop.runtime._keys import MODEL_RATINGS_KEY, TRACK_SCORES_KEY
from riffloop.runtime._latents import LATENTS_BUCKET, LatentRecord
from riffloop.runtime._logging import configure_logging, request_id_var
from riffloop.runtime._models import (
    MODEL_CONSTRUCTION_LOCK,
    ModelStore,
    ServedModel,
    keep_current,
)
from riffloop.runtime._ports import Ports, connect_ports
from riffloop.runtime._ratelimit import SlidingWindowLimiter
from riffloop.runtime._server import (
    DeferredWorker,
    LoopWorker,
    MiB,
    Readiness,
    ServiceRuntime,
    Worker,
)
from riffloop.runtime._settings import DispatchKeyed, ServiceSettings

__all__ = [
    "LATENTS_BUCKET",
    "MODEL_CONSTRUCTION_LOCK",
    "MODEL_RATINGS_KEY",
    "TRACK_SCORES_KEY",
    "BearerAuthInterceptor",
    "ConsumerWorker",
    "DeferredWorker",
    "DispatchKeyed",
    "EventRouter",
    "JwtVerifier",
    "LatentRecord",
    "LoopWorker",
    "MiB",
    "ModelStore",
    "ObservabilityInterceptor",
    "Ports",
    "RateLimitInterceptor",
    "RateLimiter",
    "Readiness",
    "ServedModel",
    "ServiceRuntime",
    "ServiceSettings",
    "SlidingWindowLimiter",
    "TokenSigner",
    "TokenVerifier",
    "Worker",
    "bearer_user",
    "checked_track_ready",
    "configure_logging",
    "connect_ports",
    "current_user",
    "hmac_kid",
    "keep_current",
    "metrics",
    "provenance_from_proto",
    "provenance_to_proto",
    "remaining_seconds",
    "request_id_var",
    "scored_items",
    "track_scored_to_proto",
]

"""What every Riffloop service process shares (docs/ARCHITECTURE.md, "Shared runtime").

gRPC server start-up with health, reflection and message-size limits (:class:`ServiceRuntime`),
per-dependency readiness (:class:`Readiness`), the interceptors (observability, bearer auth,
per-user rate limit, operator auth of the internal RPCs), the shared rate limiter, bearer
tokens, JSON logging, the ports wiring (:class:`Ports`), the consumer worker, the rebuild of a
service's Redis state from Kafka (:class:`RebuildPlan`, :class:`RebuildWatch`), and the
Prometheus metric objects (:mod:`riffloop.runtime.metrics`).
"""

from riffloop.runtime import metrics
from riffloop.runtime._auth import (
    OPERATOR_AUDIENCE,
    JwtVerifier,
    OperatorVerifier,
    TokenExpiredError,
    TokenSigner,
    hmac_kid,
    operator_token,
)
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
    OperatorAuthInterceptor,
    RateLimiter,
    RateLimitInterceptor,
    TokenVerifier,
    bearer_user,
    current_user,
    operator_of,
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
from riffloop.runtime._ratelimit import InFlightCap, InFlightLimiter, SlidingWindowLimiter
from riffloop.runtime._rebuild import (
    RebuildPlan,
    RebuildReport,
    RebuildWatch,
    Replay,
    ensure_rebuilt,
    is_rebuilt,
    rebuild,
    rebuild_command,
)
from riffloop.runtime._rebuild_plans import (
    FEEDBACK_REBUILT_MARKER,
    SELECTOR_REBUILT_MARKER,
    TRAINER_REBUILT_MARKER,
    CanaryEvidence,
    TrainsetHistory,
    feedback_rebuild_plan,
    feedback_track_record,
    gateway_rebuild_plan,
    selector_rebuild_plan,
    trainer_rebuild_plan,
)
from riffloop.runtime._server import (
    DeferredWorker,
    LoopWorker,
    MiB,
    Readiness,
    ServiceRuntime,
    Worker,
)
from riffloop.runtime._settings import DispatchKeyed, OperatorGuarded, ServiceSettings
from riffloop.runtime._tracing import start_tracing, stop_tracing, tracer_provider, traces_url
from riffloop.runtime._track_records import TrackRecords

__all__ = [
    "FEEDBACK_REBUILT_MARKER",
    "LATENTS_BUCKET",
    "MODEL_CONSTRUCTION_LOCK",
    "MODEL_RATINGS_KEY",
    "OPERATOR_AUDIENCE",
    "SELECTOR_REBUILT_MARKER",
    "TRACK_SCORES_KEY",
    "TRAINER_REBUILT_MARKER",
    "BearerAuthInterceptor",
    "CanaryEvidence",
    "ConsumerWorker",
    "DeferredWorker",
    "DispatchKeyed",
    "EventRouter",
    "InFlightCap",
    "InFlightLimiter",
    "JwtVerifier",
    "LatentRecord",
    "LoopWorker",
    "MiB",
    "ModelStore",
    "ObservabilityInterceptor",
    "OperatorAuthInterceptor",
    "OperatorGuarded",
    "OperatorVerifier",
    "Ports",
    "RateLimitInterceptor",
    "RateLimiter",
    "Readiness",
    "RebuildPlan",
    "RebuildReport",
    "RebuildWatch",
    "Replay",
    "ServedModel",
    "ServiceRuntime",
    "ServiceSettings",
    "SlidingWindowLimiter",
    "TokenExpiredError",
    "TokenSigner",
    "TokenVerifier",
    "TrackRecords",
    "TrainsetHistory",
    "Worker",
    "bearer_user",
    "checked_track_ready",
    "configure_logging",
    "connect_ports",
    "current_user",
    "ensure_rebuilt",
    "feedback_rebuild_plan",
    "feedback_track_record",
    "gateway_rebuild_plan",
    "hmac_kid",
    "is_rebuilt",
    "keep_current",
    "metrics",
    "operator_of",
    "operator_token",
    "provenance_from_proto",
    "provenance_to_proto",
    "rebuild",
    "rebuild_command",
    "remaining_seconds",
    "request_id_var",
    "scored_items",
    "selector_rebuild_plan",
    "start_tracing",
    "stop_tracing",
    "tracer_provider",
    "traces_url",
    "track_scored_to_proto",
    "trainer_rebuild_plan",
]

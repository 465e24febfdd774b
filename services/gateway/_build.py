"""Assemble the gateway process: ports, interceptors, servicer, consumer, readiness."""

from __future__ import annotations

import io
from typing import Any

from riffloop.core import ValidationError
from riffloop.loop import Dispatcher
from riffloop.runtime import (
    BearerAuthInterceptor,
    ConsumerWorker,
    EventRouter,
    MiB,
    Ports,
    RateLimitInterceptor,
    ServiceRuntime,
    SlidingWindowLimiter,
    TokenSigner,
)
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc
from services.gateway._service import GatewayEvents, GatewayServicer, GatewaySettings


def probe_audio(data: bytes) -> float:
    """Decode the upload's header and frames; return its duration or refuse it with a reason."""
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))
        frames, _ = soundfile.read(io.BytesIO(data), dtype="float32", frames=1024)
    except (RuntimeError, soundfile.LibsndfileError, ValueError, TypeError) as exc:
        detail = str(exc).rsplit(": ", 1)[-1].strip().rstrip(".").lower()[:120]
        raise ValidationError(f"audio does not decode ({detail})") from None
    if info.frames <= 0 or info.samplerate <= 0 or len(frames) == 0:
        raise ValidationError("audio decodes to no samples")
    return float(info.frames) / float(info.samplerate)


def build(settings: GatewaySettings, ports: Ports, *, audio: Any = probe_audio) -> ServiceRuntime:
    ports.prepare(settings.kafka_partitions)
    limiter = SlidingWindowLimiter(
        ports.kv, rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst
    )
    runtime = ServiceRuntime.from_settings(
        settings,
        interceptors=[
            BearerAuthInterceptor(TokenSigner(settings.auth_secret)),
            RateLimitInterceptor(limiter),
        ],
        # One upload chunk per message: a little above the chunk size clients use (1 MiB).
        max_message_bytes=2 * MiB,
        max_workers=64,
    )
    servicer = GatewayServicer(settings, ports, audio, Dispatcher(seed=settings.dispatch_seed))
    runtime.add_service(
        pb_grpc.add_GatewayServiceServicer_to_server, servicer, "riffloop.v1.GatewayService"
    )
    for dependency, check in ports.readiness_checks().items():
        runtime.readiness.add_check(dependency, check)
    events = GatewayEvents(ports)
    router = EventRouter(
        {
            "tracks.ready.v1": events.on_track_ready,
            "model.published.v1": events.on_model_published,
            "tracks.scored.v1": events.on_track_scored,
        }
    )
    runtime.add_worker(ConsumerWorker(settings, ports, router))
    return runtime

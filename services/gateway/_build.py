"""Assemble the gateway process: ports, interceptors, servicer, consumer, readiness."""

from __future__ import annotations

from collections.abc import Callable

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
from services.gateway._service import (
    GatewayEvents,
    GatewayServicer,
    GatewaySettings,
    feedback_batch_size,
)


def audio_probe(settings: GatewaySettings) -> Callable[[bytes], float]:
    """``riffloop.music.decode_audio`` with this gateway's limits; returns the duration."""
    from riffloop.music import AudioLimits, decode_audio

    limits = AudioLimits(
        max_bytes=settings.max_upload_bytes,
        max_seconds=settings.max_audio_seconds,
        min_seconds=settings.min_audio_seconds,
    )

    def probe(data: bytes) -> float:
        return float(decode_audio(data, limits).duration_s)

    return probe


def build(
    settings: GatewaySettings, ports: Ports, *, audio: Callable[[bytes], float] | None = None
) -> ServiceRuntime:
    ports.prepare(settings.kafka_partitions)
    limiter = SlidingWindowLimiter(
        ports.kv, rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst
    )
    runtime = ServiceRuntime.from_settings(
        settings,
        interceptors=[
            BearerAuthInterceptor(TokenSigner(settings.auth_secret)),
            # SubmitFeedback pays one token per item: the limit counts ratings, not calls. A
            # batch of the wrong size is refused (INVALID_ARGUMENT) before it pays anything.
            RateLimitInterceptor(
                limiter,
                {
                    "SubmitFeedback": lambda request: feedback_batch_size(
                        request, settings.max_feedback_batch
                    )
                },
            ),
        ],
        # One upload chunk per message: a little above the chunk size clients use (1 MiB).
        max_message_bytes=2 * MiB,
        max_workers=64,
    )
    probe = audio or audio_probe(settings)
    dispatcher = Dispatcher(key=settings.effective_dispatch_key())
    servicer = GatewayServicer(settings, ports, probe, dispatcher)
    runtime.add_service(
        pb_grpc.add_GatewayServiceServicer_to_server, servicer, "riffloop.v1.GatewayService"
    )
    for dependency, check in ports.readiness_checks().items():
        runtime.readiness.add_check(dependency, check)
    events = GatewayEvents(ports, dispatcher)
    router = EventRouter(
        {
            "tracks.ready.v1": events.on_track_ready,
            "model.published.v1": events.on_model_published,
            # requests the generator gave up on: their tracks turn failed, with the reason
            "generation.requested.v1.dlq": events.on_generation_dead_lettered,
        }
    )
    runtime.add_worker(ConsumerWorker(settings, ports, router))
    return runtime

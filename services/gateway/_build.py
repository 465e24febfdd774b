"""Assemble the gateway process: ports, interceptors, servicer, consumer, readiness."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.serialization import load_pem_public_key

from riffloop.core import ConfigurationError
from riffloop.loop import Dispatcher
from riffloop.runtime import (
    BearerAuthInterceptor,
    ConsumerWorker,
    EventRouter,
    InFlightCap,
    InFlightLimiter,
    JwtVerifier,
    MiB,
    Ports,
    RateLimitInterceptor,
    RebuildWatch,
    ServiceRuntime,
    SlidingWindowLimiter,
    TokenSigner,
    ensure_rebuilt,
    gateway_rebuild_plan,
    hmac_kid,
)
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc
from services.gateway._requests import feedback_batch_size, generate_cost
from services.gateway._service import GatewayEvents, GatewayServicer
from services.gateway._settings import GatewaySettings


def audio_probe(settings: GatewaySettings) -> Callable[[BinaryIO], float]:
    """``riffloop.music.decode_audio`` with this gateway's limits, on a spooled upload's open
    file; returns the duration."""
    from riffloop.music import AudioLimits, decode_audio

    limits = AudioLimits(
        max_bytes=settings.max_upload_bytes,
        max_seconds=settings.max_audio_seconds,
        min_seconds=settings.min_audio_seconds,
    )

    def probe(upload: BinaryIO) -> float:
        return float(decode_audio(upload, limits).duration_s)

    return probe


def in_flight_limits(settings: GatewaySettings) -> InFlightLimiter:
    """Uploads (either method), Generate calls and mel images in progress at once, per user
    and in all."""
    return InFlightLimiter(
        {
            "UploadSong": "uploads",
            "UploadWholeSong": "uploads",
            "Generate": "generate",
            "GetTrackMelImage": "mel images",
        },
        {
            "uploads": InFlightCap(
                "uploads", settings.max_user_uploads_in_flight, settings.max_uploads_in_flight
            ),
            "generate": InFlightCap(
                "Generate calls",
                settings.max_user_generate_in_flight,
                settings.max_generate_in_flight,
            ),
            "mel images": InFlightCap(
                "mel images",
                settings.max_user_mel_images_in_flight,
                settings.max_mel_images_in_flight,
            ),
        },
    )


def mel_renderer() -> Callable[[bytes], tuple[bytes, int, int]]:
    """``riffloop.music.mel_png``: a track's mel spectrogram as a PNG (GetTrackMelImage)."""
    from riffloop.music import mel_png

    return mel_png


def token_verifier(settings: GatewaySettings) -> JwtVerifier:
    """Tokens signed with RIFFLOOP_AUTH_SECRET (TokenSigner, its kid) and, when configured,
    the identity provider's public keys by kid: a JWKS URL and/or a JSON file {kid: PEM}."""
    public_keys: dict[str, Any] = {}
    if settings.auth_public_keys_file:
        path = Path(settings.auth_public_keys_file)
        try:
            pems = json.loads(path.read_text())
            if not isinstance(pems, dict):
                raise ValueError("not a JSON object")
            for kid, pem in pems.items():
                public_keys[str(kid)] = load_pem_public_key(str(pem).encode())
        except (OSError, ValueError) as err:
            raise ConfigurationError(
                f"RIFFLOOP_AUTH_PUBLIC_KEYS_FILE {path}: expected JSON {{kid: PEM public key}} "
                f"({err})"
            ) from None
    return JwtVerifier(
        hmac_secrets={hmac_kid(settings.auth_secret): settings.auth_secret},
        public_keys=public_keys,
        jwks_url=settings.auth_jwks_url,
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
    )


def build(
    settings: GatewaySettings,
    ports: Ports,
    *,
    audio: Callable[[bytes], float] | None = None,
    web_root: Path | None = None,
    clock: Callable[[], float] = time.time,
    draw: random.Random | None = None,
) -> ServiceRuntime:
    """``clock`` and ``draw``: the server's time and the queue's randomness (wall time and OS
    entropy unless a simulation passes its own, riffloop.sim)."""
    # the buckets it reads or writes: its S3 policy in production allows no others
    ports.prepare(settings.kafka_partitions, buckets=("songs", "latents", "tracks"))
    limiter = SlidingWindowLimiter(
        ports.kv, rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst, clock=clock
    )
    verifier = token_verifier(settings)
    # SubmitFeedback pays one token per item: the limit counts ratings, not calls. A batch of
    # the wrong size is refused (INVALID_ARGUMENT) before it pays anything. The costly calls
    # pay what they make the system do (a Generate in proportion to its q × seconds); uploads,
    # Generate and mel images are also capped in flight.
    rate_limit = RateLimitInterceptor(
        limiter,
        {
            "SubmitFeedback": lambda request: feedback_batch_size(
                request, settings.max_feedback_batch
            ),
            "Generate": lambda request: generate_cost(request, settings),
            "UploadSong": settings.upload_cost,
            "UploadWholeSong": settings.upload_cost,
            "GetTrackMelImage": settings.mel_image_cost,
        },
        in_flight_limits(settings),
    )
    runtime = ServiceRuntime.from_settings(
        settings,
        interceptors=[BearerAuthInterceptor(verifier), rate_limit],
        # One upload chunk per message: a little above the chunk size clients use (1 MiB).
        max_message_bytes=2 * MiB,
        max_workers=64,
        reflection=settings.reflection,
    )
    probe = audio or audio_probe(settings)
    dispatcher = Dispatcher(key=settings.effective_dispatch_key())
    servicer = GatewayServicer(
        settings, ports, probe, dispatcher, mel_image=mel_renderer(), clock=clock, draw=draw
    )
    runtime.add_service(
        pb_grpc.add_GatewayServiceServicer_to_server, servicer, "riffloop.v1.GatewayService"
    )
    if settings.connect_port >= 0:  # the browser API and the page (services/gateway/_connect.py)
        from services.gateway._connect import (
            WEB_ROOT,
            ConnectGateway,
            ConnectServer,
            GatewayWebApp,
        )

        gateway = ConnectGateway(
            servicer,
            verifier,
            rate_limit,
            service_name=settings.service_name,
            max_upload_bytes=settings.max_upload_bytes,
            max_feedback_batch=settings.max_feedback_batch,
        )
        signer = (
            TokenSigner(
                settings.auth_secret, issuer=settings.auth_issuer, audience=settings.auth_audience
            )
            if settings.dev_sign_in
            else None
        )
        app = GatewayWebApp(gateway, dev_signer=signer, web_root=web_root or WEB_ROOT)
        runtime.add_worker(ConnectServer(app, settings.bind_host, settings.connect_port))
    for dependency, check in ports.readiness_checks().items():
        runtime.readiness.add_check(dependency, check)
    events = GatewayEvents(ports, dispatcher, clock, backlog=servicer.backlog)
    # Redis emptied (or a new deployment): the track records and the queue again from the log,
    # before the first call; while serving, the watch does the same
    plan = gateway_rebuild_plan(ports.kv, dispatcher, producer=ports.producer)
    ensure_rebuilt(ports.bus, ports.kv, plan)
    runtime.add_worker(
        RebuildWatch(
            settings.service_name, ports.bus, ports.kv, plan, interval_s=settings.rebuild_check_s
        )
    )
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

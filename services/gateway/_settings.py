"""The gateway's settings (``RIFFLOOP_*``, riffloop.runtime.DispatchKeyed): its limits, the
listening queue's policy, admission control, sign-in and the browser API, each checked at start."""

from __future__ import annotations

import dataclasses
import os

from riffloop.core import ConfigurationError, ValidationError
from riffloop.loop import AdmissionPolicy, QueuePolicy
from riffloop.runtime import DispatchKeyed

# The encoder decodes uploads with riffloop.music.AudioLimits' defaults (tested equal): the
# gateway must not accept a song the encoder would refuse.
ENCODER_MAX_BYTES = 50 * 1024 * 1024
ENCODER_MAX_SECONDS = 600.0


@dataclasses.dataclass(frozen=True, repr=False)
class GatewaySettings(DispatchKeyed):
    service_name: str = "gateway"
    grpc_port: int = 50051
    metrics_port: int = 9101
    # Uploads: whole-file cap (sum of chunks) and the longest audio accepted.
    max_upload_bytes: int = 20 * 1024 * 1024
    max_audio_seconds: float = 600.0
    # Uploads decoding at once in this process. Decoding is what costs memory (a 10-minute
    # stereo 48 kHz file raised a process's peak RSS by 0.34 GB in session 10; decoded and
    # resampled block by block since session 19, a 10-minute 96 kHz FLAC peaks at 101 MiB of
    # Python allocations, was 439; the pod has 2 GiB); a spooled upload waits up to
    # upload_decode_wait_s for a slot, then gets RESOURCE_EXHAUSTED.
    max_concurrent_uploads: int = 2
    upload_decode_wait_s: float = 30.0
    # Uploads are spooled to disk as they arrive (services/gateway/_uploads.py), here ("" =
    # the system's temporary directory); an upload still arriving after upload_deadline_s
    # (20 MiB at 0.6 Mbit/s) is ended with DEADLINE_EXCEEDED.
    upload_spool_dir: str = ""
    upload_deadline_s: float = 300.0
    # Calls in progress at once in this process (RESOURCE_EXHAUSTED beyond): uploads per user
    # and in all (each holds a thread and up to max_upload_bytes of spool), Generate per user
    # and in all (64 gRPC threads serve every method), mel images per user and in all (a
    # render of a 60 s track is ≈ 0.5 s of CPU and 74 MB; its 2 tokens alone let one user
    # keep ≈ 12 cores busy).
    max_user_uploads_in_flight: int = 2
    max_uploads_in_flight: int = 16
    max_user_generate_in_flight: int = 2
    max_generate_in_flight: int = 32
    max_user_mel_images_in_flight: int = 2
    max_mel_images_in_flight: int = 4
    # Rate-limit tokens a call costs (others cost 1): what it makes the system do. A Generate
    # is a GPU job (generate_cost for the default quality and 5.9 s; more in proportion to
    # q × seconds, at most the burst), an upload a decode, an encode and a stored song; a mel
    # image a render.
    generate_cost: int = 5
    upload_cost: int = 10
    mel_image_cost: int = 2
    # Generation requests waiting for their track (riffloop.loop.GenerationBacklog), counted
    # in default requests' worth of work (q × seconds, as generate_cost): per user, and in all
    # before new ones are refused (admission control: the generators are behind);
    # an entry stops counting after generation_pending_ttl_s; the total is re-read at most
    # every generation_backlog_refresh_s.
    max_pending_generations_per_user: int = 16
    max_generation_backlog: int = 1000
    generation_pending_ttl_s: float = 3600.0
    generation_backlog_refresh_s: float = 1.0
    # Shorter uploads hold no full mel window of the larger models.
    min_audio_seconds: float = 1.5
    # Bearer tokens are HMAC-signed with this secret (riffloop.runtime.TokenSigner).
    auth_secret: str = dataclasses.field(default="", metadata={"secret": True})
    # Per-user rate limit: sustained calls per second and the burst allowed on top.
    rate_limit_per_s: float = 50.0
    rate_limit_burst: int = 100
    # Generation requests: quality q when the client sends 0, and the largest q accepted.
    default_quality: int = 50
    max_quality: int = 1000
    # Track lengths a request may ask for (0 = the generator's default, 5.9 s): one mel window
    # of the served 64-frame model (32,767 samples at 22,050 Hz) to the generator's maximum.
    min_track_seconds: float = 1.486
    max_track_seconds: float = 60.0
    stream_chunk_bytes: int = 64 * 1024
    # Most items in one SubmitFeedback call (each costs one token of the per-user rate limit).
    max_feedback_batch: int = 100
    # The listening queue (riffloop.loop.QueuePolicy): listeners a track is served to before it
    # leaves the queue, how long it may wait, the baseline share of what each listener hears
    # (the generator's dispatch share) and the share of consistency probes.
    queue_target_listeners: int = 10
    queue_max_age_s: float = 7 * 24 * 3600.0
    baseline_share: float = 0.25
    probe_share: float = 0.04
    # A rating's client_time may differ this much from the server's clock (a device set to the
    # wrong day is refused; a few minutes' drift is clamped into the serving-to-receipt span).
    client_time_max_skew_s: float = 24 * 3600.0
    # Bearer JWTs (riffloop.runtime.JwtVerifier): the issuer and audience every token must
    # name. Tokens signed with RIFFLOOP_AUTH_SECRET (HS256, riffloop.runtime.TokenSigner) are
    # always accepted; an identity provider's keys come from its JWKS URL and/or a JSON file
    # {kid: PEM public key} (docs/DEPLOY.md, "Sign-in").
    auth_issuer: str = "riffloop"
    auth_audience: str = "riffloop-gateway"
    auth_jwks_url: str = ""
    auth_public_keys_file: str = ""
    # The browser API (Connect protocol over HTTP, and the listen-and-rate page) on its own
    # port (8080 in deploy/k8s); 0 picks a free port, -1 (the default) turns it off.
    connect_port: int = -1
    # Development only: the page's sign-in form issues a token for any name. Never in production.
    dev_sign_in: bool = False
    # gRPC server reflection lists and describes every method to anyone who asks: off on the
    # public API by default (the internal services keep it, behind their network policies).
    reflection: bool = False

    def queue_policy(self) -> QueuePolicy:
        return QueuePolicy(
            target_listeners=self.queue_target_listeners,
            max_age_s=self.queue_max_age_s,
            baseline_share=self.baseline_share,
            probe_share=self.probe_share,
        )

    def admission_policy(self) -> AdmissionPolicy:
        return AdmissionPolicy(
            per_user=self.max_pending_generations_per_user,
            max_backlog=self.max_generation_backlog,
            stale_after_s=self.generation_pending_ttl_s,
            refresh_s=self.generation_backlog_refresh_s,
        )

    def _validate_limits(self) -> None:
        """The resource bounds: uploads, in-flight caps, call costs, admission."""
        if not 0.1 <= self.upload_decode_wait_s <= 600:
            raise ConfigurationError("RIFFLOOP_UPLOAD_DECODE_WAIT_S must lie in 0.1–600 s")
        if not 1.0 <= self.upload_deadline_s <= 3600:
            raise ConfigurationError("RIFFLOOP_UPLOAD_DEADLINE_S must lie in 1–3600 s")
        if self.upload_spool_dir and not os.path.isdir(self.upload_spool_dir):
            raise ConfigurationError(
                f"RIFFLOOP_UPLOAD_SPOOL_DIR {self.upload_spool_dir!r} is not a directory"
            )
        for per_user, total, name in (
            (self.max_user_uploads_in_flight, self.max_uploads_in_flight, "UPLOADS"),
            (self.max_user_generate_in_flight, self.max_generate_in_flight, "GENERATE"),
            (self.max_user_mel_images_in_flight, self.max_mel_images_in_flight, "MEL_IMAGES"),
        ):
            if not 1 <= per_user <= total <= 64:  # 64: the gRPC server's threads
                raise ConfigurationError(
                    f"need 1 ≤ RIFFLOOP_MAX_USER_{name}_IN_FLIGHT ≤ "
                    f"RIFFLOOP_MAX_{name}_IN_FLIGHT ≤ 64"
                )
        for cost, name in (
            (self.generate_cost, "GENERATE"),
            (self.upload_cost, "UPLOAD"),
            (self.mel_image_cost, "MEL_IMAGE"),
        ):
            if not 1 <= cost <= self.rate_limit_burst:
                raise ConfigurationError(
                    f"RIFFLOOP_{name}_COST must lie in 1–RIFFLOOP_RATE_LIMIT_BURST (a costlier "
                    "call could never pass the rate limit)"
                )
        try:
            self.admission_policy()
        except ValidationError as exc:
            raise ConfigurationError(
                f"RIFFLOOP_MAX_PENDING_GENERATIONS_PER_USER, RIFFLOOP_MAX_GENERATION_BACKLOG, "
                f"RIFFLOOP_GENERATION_PENDING_TTL_S, _BACKLOG_REFRESH_S: {exc.reason}"
            ) from None

    def _validate(self) -> None:
        super()._validate()
        if len(self.auth_secret) < 16:
            raise ConfigurationError("RIFFLOOP_AUTH_SECRET must be set (at least 16 characters)")
        if not 1024 <= self.max_upload_bytes <= ENCODER_MAX_BYTES:
            raise ConfigurationError(
                f"RIFFLOOP_MAX_UPLOAD_BYTES must lie in 1024–{ENCODER_MAX_BYTES} (the encoder "
                "refuses larger files, so a song accepted here would never be encoded)"
            )
        if not 0 <= self.min_audio_seconds < self.max_audio_seconds <= ENCODER_MAX_SECONDS:
            raise ConfigurationError(
                "need 0 ≤ RIFFLOOP_MIN_AUDIO_SECONDS < RIFFLOOP_MAX_AUDIO_SECONDS ≤ "
                f"{ENCODER_MAX_SECONDS:g} (the encoder's limit)"
            )
        if self.rate_limit_per_s <= 0 or self.rate_limit_burst < 1:
            raise ConfigurationError("RIFFLOOP_RATE_LIMIT_PER_S and _BURST must be positive")
        if not 1 <= self.default_quality <= self.max_quality <= 1000:
            raise ConfigurationError(
                "need 1 ≤ RIFFLOOP_DEFAULT_QUALITY ≤ RIFFLOOP_MAX_QUALITY ≤ 1000"
            )
        if not 0 < self.min_track_seconds <= self.max_track_seconds:
            raise ConfigurationError(
                "need 0 < RIFFLOOP_MIN_TRACK_SECONDS ≤ RIFFLOOP_MAX_TRACK_SECONDS"
            )
        if not 1 <= self.max_feedback_batch <= self.rate_limit_burst:
            raise ConfigurationError(
                "RIFFLOOP_MAX_FEEDBACK_BATCH must lie in 1–RIFFLOOP_RATE_LIMIT_BURST (a larger "
                "batch could never pass the rate limit)"
            )
        if not 1 <= self.max_concurrent_uploads <= 64:
            raise ConfigurationError("RIFFLOOP_MAX_CONCURRENT_UPLOADS must lie in 1–64")
        self._validate_limits()
        if not 1024 <= self.stream_chunk_bytes <= 1024 * 1024:
            raise ConfigurationError("RIFFLOOP_STREAM_CHUNK_BYTES must lie in 1 KiB–1 MiB")
        try:
            self.queue_policy()
        except ValidationError as exc:
            raise ConfigurationError(f"listening queue settings: {exc.reason}") from None
        if not 60.0 <= self.client_time_max_skew_s <= 7 * 24 * 3600.0:
            raise ConfigurationError("RIFFLOOP_CLIENT_TIME_MAX_SKEW_S must lie in 60 s – 7 days")
        if not -1 <= self.connect_port <= 65535:
            raise ConfigurationError("RIFFLOOP_CONNECT_PORT must be a port, 0 (any) or -1 (off)")
        if not self.auth_issuer or not self.auth_audience:
            raise ConfigurationError("RIFFLOOP_AUTH_ISSUER and RIFFLOOP_AUTH_AUDIENCE must be set")
        if (
            self.dev_sign_in
            and self.backend == "real"
            and self.bind_host
            not in (
                "127.0.0.1",
                "localhost",
            )
        ):
            raise ConfigurationError(
                "RIFFLOOP_DEV_SIGN_IN lets anyone sign in as anyone: it is refused on a gateway "
                "that listens beyond loopback on real backends"
            )

"""The gateway: Riffloop's public API, a thin shell over the ports and the loop's rules.

It validates every client input, stores uploads content-addressed, and turns calls into events:
UploadSong → songs.uploaded.v1, Generate → generation.requested.v1, Rate / ReportListen →
feedback.received.v1 (FeedbackReceived), SubmitFeedback → feedback.received.v1 (one FeedbackBatch
per call). It consumes tracks.ready.v1 (a pending track becomes ready) and model.published.v1.
ListModels reads the per-version mean ratings from the feedback service's read model
(``fb:model-ratings``, written by its scoring pass) rather than replaying every TrackScored: at
5,000 ratings/s that consumer was an eighth of the gateway's CPU. Auth and the per-user rate
limit are interceptors (riffloop.runtime), not handler code; so are the per-user caps on uploads
and Generate calls in progress. Uploads are spooled to disk (services/gateway/_uploads.py).

NextTrack serves the listening queue (riffloop.loop.choose_next_track): every ready track,
baseline or generation, for anyone's inputs, until enough listeners have heard it. A user may
fetch, rate and report on a track once it was served to them: their own request, or the queue.

Key-value layout (prefix ``gw:``):
  gw:track:<track_id>          JSON track record (owner, status, audio ref, duration; once ready
                               also its kind and provenance, which no client ever sees)
  gw:served:<track_id>:<user>  when the queue served the track to a listener (not its owner)
  gw:heard:<user>              hash track → served at: every track served to the user
  gw:queue                     hash track → JSON QueuedTrack fields: the tracks still waiting
  gw:queue:served              hash track → listeners the queue served it to
  gw:rated:<track_id>:<user>   set once: a second rating of the same track is ALREADY_EXISTS
  gw:models                    hash version → JSON (parent, published_at)
  gw:models:current            the version generators serve
  gw:pending                   hash track → "<requested at> <user>": Generate requests waiting for
                               their track (riffloop.loop.GenerationBacklog; admission control)
  gw:pending:<user>            hash track → requested at: the user's
Read, owned by the feedback service:
  fb:model-ratings             hash version → JSON stars (mean, 95 % interval, counts) and the
                               normalised score, generated and baseline apart
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from riffloop.core import (
    ConfigurationError,
    ConflictError,
    NotFoundError,
    PermanentError,
    PermissionDeniedError,
    RateLimitedError,
    RiffloopError,
    ValidationError,
    decode_envelope,
)
from riffloop.loop import (
    AdmissionPolicy,
    GenerationBacklog,
    QueuedTrack,
    QueuePolicy,
    TrackKind,
    choose_next_track,
)
from riffloop.runtime import (
    LATENTS_BUCKET,
    MODEL_RATINGS_KEY,
    DispatchKeyed,
    LatentRecord,
    TrackRecords,
    current_user,
    metrics,
    remaining_seconds,
)
from riffloop.v1 import (
    common_pb2,
    events_pb2,
)
from riffloop.v1 import (
    gateway_service_pb2 as pb,
)
from riffloop.v1 import (
    gateway_service_pb2_grpc as pb_grpc,
)
from services.gateway._uploads import SpooledUpload, UploadSpool

_log = logging.getLogger("riffloop.gateway")

SONG_ID = re.compile(r"^[0-9a-f]{64}$")
TRACK_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
SONGS_BUCKET = "songs"
_TITLE_MAX = 200
_CONTENT_TYPES = {
    "": ".bin",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/flac": ".flac",
    "audio/ogg": ".ogg",
    "audio/mpeg": ".mp3",
}


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
    # stereo 48 kHz file raised a process's peak RSS by 0.34 GB, session 10; the pod has
    # 2 GiB); a spooled upload waits up to upload_decode_wait_s for a slot, then gets
    # RESOURCE_EXHAUSTED.
    max_concurrent_uploads: int = 2
    upload_decode_wait_s: float = 30.0
    # Uploads are spooled to disk as they arrive (services/gateway/_uploads.py), here ("" =
    # the system's temporary directory); an upload still arriving after upload_deadline_s
    # (20 MiB at 0.6 Mbit/s) is ended with DEADLINE_EXCEEDED.
    upload_spool_dir: str = ""
    upload_deadline_s: float = 300.0
    # Calls in progress at once in this process (RESOURCE_EXHAUSTED beyond): uploads per user
    # and in all (each holds a thread and up to max_upload_bytes of spool), Generate per user
    # and in all (64 gRPC threads serve every method).
    max_user_uploads_in_flight: int = 2
    max_uploads_in_flight: int = 16
    max_user_generate_in_flight: int = 2
    max_generate_in_flight: int = 32
    # Rate-limit tokens a call costs (others cost 1): what it makes the system do. A Generate
    # is a GPU job, an upload a decode, an encode and a stored song; a mel image a render.
    generate_cost: int = 5
    upload_cost: int = 10
    mel_image_cost: int = 2
    # Generation requests waiting for their track (riffloop.loop.GenerationBacklog): per user,
    # and in all before new ones are refused (admission control: the generators are behind);
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


def feedback_batch_size(request: pb.SubmitFeedbackRequest, limit: int) -> int:
    """The number of items of a SubmitFeedback call (its rate-limit cost), checked."""
    n = len(request.items)
    if not 1 <= n <= limit:
        raise ValidationError(f"a feedback batch holds 1–{limit} items, got {n}")
    return n


def _check_upload_metadata(metadata: pb.UploadSongMetadata) -> None:
    """An upload's title and declared type, checked as its first message arrives."""
    if len(metadata.title) > _TITLE_MAX:
        raise ValidationError(f"title is longer than {_TITLE_MAX} characters")
    content_type = metadata.content_type.strip().lower()
    if content_type not in _CONTENT_TYPES:
        raise ValidationError(
            f"content_type {content_type!r} is not supported; use one of "
            + ", ".join(sorted(c for c in _CONTENT_TYPES if c))
        )


def _check_track_id(track_id: str) -> str:
    if not track_id:
        raise ValidationError("track_id is required")
    if not TRACK_ID.match(track_id):
        raise ValidationError("track_id must be 1–64 characters of letters, digits, '_' or '-'")
    return track_id


def _check_stars(stars: int) -> None:
    if not 1 <= stars <= 5:
        raise ValidationError(f"stars must be 1–5, got {stars}")


def _check_seconds(seconds: float) -> None:
    if not math.isfinite(seconds) or seconds < 0:
        raise ValidationError("seconds_listened must be a finite number ≥ 0")


def _check_ready(track_id: str, record: dict[str, Any]) -> None:
    if record["status"] != "ready":
        raise PermanentError(f"track {track_id} is not ready; rate it after listening")


def _once_key(track_id: str, user: str) -> str:
    return f"gw:rated:{track_id}:{user}"


def _served_key(track_id: str, user: str) -> str:
    return f"gw:served:{track_id}:{user}"


def _client_time(given: Timestamp, served_at: float, now_s: float, max_skew_s: float) -> float:
    """The item's time by the client's clock, checked: more than ``max_skew_s`` off the
    server's clock is a client bug (INVALID_ARGUMENT); otherwise it is kept within
    [served_at, now], the span in which the listener can have heard and rated the track. Unset:
    the receipt time. The spam filter's burst check reads these times, so a batch of ratings a
    client queued and sends at once keeps the spacing the listener actually rated with."""
    if not given.seconds and not given.nanos:
        return now_s
    try:
        at = given.ToNanoseconds() / 1e9
    except ValueError:  # nanos outside 0–999,999,999 or seconds beyond year 9999
        raise ValidationError(
            "client_time is not a valid timestamp (seconds within years 1–9999, nanos 0–999999999)"
        ) from None
    if abs(at - now_s) > max_skew_s:
        raise ValidationError(
            f"client_time is {abs(at - now_s) / 3600:.1f} h off the server's clock (more than "
            f"{max_skew_s / 3600:g} h): check the device's clock"
        )
    return min(max(at, served_at), now_s)


def _listen_event(
    user: str, listen: pb.ReportListenRequest, record: dict[str, Any], times: tuple[float, float]
) -> events_pb2.FeedbackReceived:
    """The FeedbackReceived of a listen report; the clip length comes from the track record.

    A player's timer overshoots the clip a little (buffering, a replayed ending): up to
    1.5 × clip + 1 s is accepted and counted as the whole clip, since the feedback ledger
    refuses more than the clip plus 0.5 s. More than that is a client bug: INVALID_ARGUMENT."""
    seconds = listen.seconds_listened
    clip = float(record.get("duration", 0.0)) or 0.0
    if clip > 0 and seconds > clip * 1.5 + 1.0:
        raise ValidationError(
            f"seconds_listened {seconds:.1f} exceeds the clip length {clip:.1f} s"
        )
    if clip > 0:
        seconds = min(seconds, clip)
    event = events_pb2.FeedbackReceived(
        user_id=user,
        track_id=listen.track_id,
        listen=events_pb2.ListenReport(
            seconds_listened=seconds, clip_seconds=clip, completed=listen.completed
        ),
    )
    _stamp(event, times)
    return event


def _stamp(event: events_pb2.FeedbackReceived, times: tuple[float, float]) -> None:
    """Set the item's (client time, served at) on its FeedbackReceived."""
    client_time, served_at = times
    event.client_time.FromNanoseconds(int(client_time * 1e9))
    event.served_at.FromNanoseconds(int(served_at * 1e9))


def _now_ts(at: float | None = None) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() if at is None else at) * 1e9))
    return ts


class GatewayServicer(pb_grpc.GatewayServiceServicer):
    """Handlers: validate, call a port or the loop, publish an event. Nothing else."""

    def __init__(
        self,
        settings: GatewaySettings,
        ports: Any,
        audio: Any,
        dispatcher: Any,
        mel_image: Any = None,
        *,
        clock: Callable[[], float] = time.time,
        draw: random.Random | None = None,
    ) -> None:
        self.settings = settings
        # The server's clock (serving, receipt and the client-time checks read it) and the
        # queue's draws. Production: wall time and the OS's entropy, which no client can
        # predict. A simulation that replays a day of listening in minutes passes its own.
        self.clock = clock
        # renders a track's WAV as a mel PNG → (png, width, height) (riffloop.music.mel_png)
        self.mel_image = mel_image
        self.ports = ports  # riffloop.runtime.Ports: bus, objects, kv
        self.audio = audio  # decodes and checks an upload (riffloop.music.decode_audio)
        self.dispatcher = dispatcher  # riffloop.loop.Dispatcher: opaque track ids
        self.upload_slots = threading.BoundedSemaphore(settings.max_concurrent_uploads)
        self.spool = UploadSpool(settings.upload_spool_dir, settings.max_upload_bytes)
        # pending generation requests, per user and in all (admission control)
        self.backlog = GenerationBacklog(ports.kv, settings.admission_policy(), clock=clock)
        self.queue = settings.queue_policy()
        self._draw = draw or random.SystemRandom()

    # -- uploads ------------------------------------------------------------------------------

    def _decode_in_a_slot(self, upload: SpooledUpload, wait_s: float) -> float:
        """Decoding is what costs memory (≈ 0.3 GB for a 10-minute stereo upload), so at most
        ``max_concurrent_uploads`` run at once; the stream itself is spooled without a slot,
        so slow or stalled clients cannot hold the slots for everyone. A spooled upload waits
        for a slot up to ``wait_s`` (its spool is on disk, not in memory)."""
        if not self.upload_slots.acquire(timeout=max(0.0, wait_s)):
            raise RateLimitedError(
                "too many uploads in progress on this gateway (limit "
                f"{self.settings.max_concurrent_uploads}); retry in a few seconds",
                retry_after_s=2.0,
            )
        try:
            # raises ValidationError (InvalidAudio) with a reason
            return float(self.audio(upload.file))
        finally:
            self.upload_slots.release()

    def UploadSong(self, request_iterator: Iterator[pb.UploadSongRequest], context: Any) -> Any:
        """Spooled to disk as it arrives (services/gateway/_uploads.py), within the upload
        deadline; then decoded, stored and announced like UploadWholeSong."""
        deadline = time.monotonic() + remaining_seconds(context, self.settings.upload_deadline_s)
        with self.spool.receive(
            request_iterator, deadline - time.monotonic(), _check_upload_metadata
        ) as upload:
            return self._store_upload(upload, deadline)

    def UploadWholeSong(
        self, request: pb.UploadWholeSongRequest, context: Any
    ) -> pb.UploadWholeSongResponse:
        """UploadSong in one message (browsers cannot stream a request): the same checks."""
        deadline = time.monotonic() + remaining_seconds(context, self.settings.upload_deadline_s)
        _check_upload_metadata(request.metadata)
        with self.spool.hold(request.metadata, request.audio) as upload:
            stored = self._store_upload(upload, deadline)
        return pb.UploadWholeSongResponse(
            song_id=stored.song_id,
            audio=stored.audio,
            duration_seconds=stored.duration_seconds,
            already_existed=stored.already_existed,
        )

    def _store_upload(self, upload: SpooledUpload, deadline: float) -> Any:
        """Decode and store one spooled upload; announce it on songs.uploaded.v1.
        ``deadline``: time.monotonic() by which the call must be answered."""
        user = current_user()
        metadata = upload.metadata
        content_type = metadata.content_type.strip().lower()
        if not upload.size:
            raise ValidationError("the upload carries no audio bytes")
        wait_s = min(self.settings.upload_decode_wait_s, deadline - time.monotonic())
        duration = self._decode_in_a_slot(upload, wait_s)
        objects = self.ports.objects
        existed = False
        try:
            ref = objects.stat(SONGS_BUCKET, upload.sha256)
            existed = True
        except NotFoundError:
            # content-addressed (the key is the sha256), streamed from the spool
            ref = objects.put_file(
                SONGS_BUCKET,
                upload.sha256,
                upload.file,
                sha256=upload.sha256,
                content_type=content_type or "application/octet-stream",
            )
        song_id = ref.sha256
        proto_ref = ref.to_proto()
        # Stored but not encoded yet: announce it again. The first upload's SongUploaded may be
        # lost (the publish failed after the bytes were stored, the client got UNAVAILABLE and
        # retried), and the song would then never be encoded; a repeat while the encoder is at
        # work only makes it write the same content-addressed latents twice.
        if not existed or not self._encoded(song_id):
            payload = events_pb2.SongUploaded(
                song_id=song_id,
                audio=proto_ref,
                user_id=user,
                title=metadata.title,
                content_type=content_type,
                duration_seconds=duration,
            )
            self.ports.publish("songs.uploaded.v1", song_id, payload)
        return pb.UploadSongResponse(
            song_id=song_id, audio=proto_ref, duration_seconds=duration, already_existed=existed
        )

    def _encoded(self, song_id: str) -> bool:
        return bool(self.ports.objects.exists(LATENTS_BUCKET, LatentRecord.key(song_id)))

    # -- generation ---------------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        ids = list(request.song_ids)
        if not 1 <= len(ids) <= 3:
            raise ValidationError(f"song_ids must name 1 to 3 songs, got {len(ids)}")
        for song_id in ids:
            if not SONG_ID.match(song_id):
                raise ValidationError(f"song id {song_id[:80]!r} is not a 64-hex sha256")
        if len(set(ids)) != len(ids):
            raise ValidationError("song_ids must not repeat a song")
        s = request.similarity
        if not math.isfinite(s) or not 0.0 <= s < 1.0:
            raise ValidationError(f"similarity must lie in [0, 1), got {s!r}")
        q = request.quality or self.settings.default_quality
        if not 1 <= q <= self.settings.max_quality:
            raise ValidationError(f"quality must lie in 1–{self.settings.max_quality}, got {q}")
        if request.seed < 0:
            raise ValidationError("seed must not be negative")
        d = request.duration_seconds
        lo, hi = self.settings.min_track_seconds, self.settings.max_track_seconds
        if not math.isfinite(d) or not (d == 0 or lo <= d <= hi):
            raise ValidationError(
                f"duration_seconds must lie in [{lo:g}, {hi:g}] (one window to the maximum), "
                f"or be 0 for the default; got {d!r}"
            )
        for song_id in ids:
            if not self.ports.objects.exists(SONGS_BUCKET, song_id):
                raise NotFoundError(f"song {song_id} was never uploaded")
        user = current_user()
        payload = events_pb2.GenerationRequested(
            user_id=user,
            song_ids=ids,
            similarity=s,
            quality=q,
            seed=request.seed,
            duration_seconds=d,
        )
        # Idempotency: a client key names one request of its user. The request id is keyed by
        # the dispatch secret, so the same key always meets the same draw and track id, and a
        # retry after a lost response finds its request instead of making a second one.
        idempotency = request.client_request_id
        if idempotency and not CLIENT_REQUEST_ID.match(idempotency):
            raise ValidationError(
                "client_request_id must be 1–128 characters of A–Z, a–z, 0–9, '.', '_', ':', '-'"
            )
        # the request's fields, kept so a reused key can be told from a retry (keyed requests)
        fingerprint = (
            hashlib.sha256(payload.SerializeToString(deterministic=True)).hexdigest()
            if idempotency
            else ""
        )
        request_id = (
            self.dispatcher.request_id_for(user, idempotency) if idempotency else uuid.uuid4().hex
        )
        payload.request_id = request_id
        track_id = self.dispatcher.track_id_for(request_id)
        key = f"gw:track:{track_id}"
        if idempotency and (raw := self.ports.kv.get(key)) is not None:
            earlier: dict[str, Any] = json.loads(raw)
            if earlier.get("fingerprint") != fingerprint:
                raise ValidationError(
                    f"client_request_id {idempotency!r} already named a different request"
                )
            if earlier.get("status") == "pending":  # its event may not have gone out
                self.ports.publish("generation.requested.v1", request_id, payload)
            return pb.GenerateResponse(request_id=request_id, track_id=track_id)
        # a new request: refused while the user has too many waiting, or the generators are
        # behind (RESOURCE_EXHAUSTED with a retry hint); a retry above is never refused
        self.backlog.admit(user)
        now = self.clock()
        record = {
            "owner": user,
            "status": "pending",
            "requested_at": now,
            "request_id": request_id,
        }
        if fingerprint:
            record["fingerprint"] = fingerprint
        self.ports.kv.set(key, json.dumps(record))
        # heard by its requester: the queue never serves them their own track again
        self.ports.kv.hset(f"gw:heard:{user}", {track_id: repr(now)})
        self.backlog.add(user, track_id)
        try:
            self.ports.publish("generation.requested.v1", request_id, payload)
        except BaseException:
            self.backlog.done(track_id)  # not sent: it holds no place in the queue
            raise
        return pb.GenerateResponse(request_id=request_id, track_id=track_id)

    def _track(self, track_id: str) -> tuple[dict[str, Any], float | None]:
        """The record of a track served to the caller, and when the queue served it to them
        (None for the track's owner); PERMISSION_DENIED for a track never served to them."""
        raw = self.ports.kv.get(f"gw:track:{_check_track_id(track_id)}")
        if raw is None:
            raise NotFoundError(f"track {track_id} does not exist")
        record: dict[str, Any] = json.loads(raw)
        user = current_user()
        if record.get("owner") == user:
            return record, None
        served = self.ports.kv.get(_served_key(track_id, user))
        if served is None:
            raise PermissionDeniedError(f"track {track_id} was not served to you")
        return record, float(served)

    def GetTrack(self, request: pb.GetTrackRequest, context: Any) -> pb.GetTrackResponse:
        record, _ = self._track(request.track_id)
        return pb.GetTrackResponse(track=_track_message(request.track_id, record))

    def StreamAudio(self, request: pb.StreamAudioRequest, context: Any) -> Iterator[Any]:
        chunk = request.chunk_size or self.settings.stream_chunk_bytes
        if not 1024 <= chunk <= 1024 * 1024:
            raise ValidationError("chunk_size must lie in 1024–1048576 bytes (or 0)")
        record, _ = self._track(request.track_id)
        if record["status"] != "ready":
            raise PermanentError(f"track {request.track_id} is not ready yet")
        audio = record["audio"]
        data = self.ports.objects.get(audio["bucket"], audio["key"])
        total = len(data)
        for offset in range(0, total, chunk):
            if not context.is_active():
                return
            yield pb.StreamAudioResponse(
                offset=offset, chunk=data[offset : offset + chunk], total_size_bytes=total
            )

    def GetTrackMelImage(
        self, request: pb.GetTrackMelImageRequest, context: Any
    ) -> pb.GetTrackMelImageResponse:
        record, _ = self._track(request.track_id)
        if record["status"] != "ready":
            raise PermanentError(f"track {request.track_id} is not ready yet")
        if self.mel_image is None:
            raise PermanentError("this gateway renders no mel images")
        audio = record["audio"]
        png, width, height = self.mel_image(self.ports.objects.get(audio["bucket"], audio["key"]))
        return pb.GetTrackMelImageResponse(png=png, width=width, height=height)

    # -- the listening queue ------------------------------------------------------------------

    def NextTrack(self, request: pb.NextTrackRequest, context: Any) -> pb.NextTrackResponse:
        """The caller's next track: a consistency probe now and then, else the queue's pick
        (riffloop.loop.choose_next_track). Serving it records who heard it, so the caller may
        then fetch, rate and report on it."""
        user = current_user()
        kv = self.ports.kv
        now = self.clock()
        heard = kv.hgetall(f"gw:heard:{user}")
        track_id: str | None = None
        if self._draw.random() < self.queue.probe_share:
            track_id = self._consistency_probe(user, heard, now)
        if track_id is None:
            track_id = self._from_queue(user, heard, now)
        if track_id is None:
            return pb.NextTrackResponse(retry_after_ms=5000)
        record = json.loads(kv.get(f"gw:track:{track_id}") or "{}")
        metrics.QUEUE_SERVED.inc()
        return pb.NextTrackResponse(track=_track_message(track_id, record))

    def _from_queue(self, user: str, heard: dict[str, str], now: float) -> str | None:
        kv = self.ports.kv
        served = kv.hgetall("gw:queue:served")
        waiting: list[QueuedTrack] = []
        closed: list[QueuedTrack] = []
        for track_id, raw in kv.hgetall("gw:queue").items():
            fields = json.loads(raw)
            track = QueuedTrack(
                track_id=track_id,
                kind=TrackKind(fields["kind"]),
                owner=fields["owner"],
                ready_at=float(fields["ready_at"]),
                served=int(float(served.get(track_id, 0))),
            )
            (waiting if self.queue.is_open(track, now) else closed).append(track)
        if closed:  # enough listeners, or stale: out of the queue
            kv.hdel("gw:queue", [t.track_id for t in closed])
            kv.hdel("gw:queue:served", [t.track_id for t in closed])
        pick = choose_next_track(self.queue, waiting, user, heard, self._draw.random(), now)
        if pick is None:
            return None
        self._mark_served(pick.track_id, user, now)
        if kv.hincrbyfloat("gw:queue:served", pick.track_id, 1.0) >= self.queue.target_listeners:
            kv.hdel("gw:queue", [pick.track_id])
            kv.hdel("gw:queue:served", [pick.track_id])
        return pick.track_id

    def _mark_served(self, track_id: str, user: str, now: float) -> None:
        self.ports.kv.set(_served_key(track_id, user), repr(now))
        self.ports.kv.hset(f"gw:heard:{user}", {track_id: repr(now)})

    def _consistency_probe(self, user: str, heard: dict[str, str], now: float) -> str | None:
        """Re-serve a baseline the caller rated, under a new opaque id (rule 4 of
        riffloop.loop._queue). The new id is announced on tracks.ready.v1 with the original's
        provenance (same z0, same ``baseline_sample_id``), so the feedback service registers it
        and the spam filter compares the caller's two ratings of the same sample."""
        kv = self.ports.kv
        ids = list(heard)
        if not ids:
            return None
        records = kv.get_many([f"gw:track:{t}" for t in ids])
        rated = kv.get_many([_once_key(t, user) for t in ids])
        candidates = [
            (track_id, json.loads(raw))
            for track_id, raw, was_rated in zip(ids, records, rated, strict=True)
            if raw and was_rated
        ]
        candidates = [
            (t, r)
            for t, r in candidates
            if r.get("kind") == TrackKind.BASELINE.value and r.get("provenance")
        ]
        if not candidates:
            return None
        original_id, original = self._draw.choice(candidates)
        probe_id = self.dispatcher.opaque_id("probe", original_id, user, uuid.uuid4().hex)
        provenance = common_pb2.TrackProvenance.FromString(base64.b64decode(original["provenance"]))
        provenance.request_id = uuid.uuid4().hex
        record = {
            "owner": "",
            "status": "ready",
            "requested_at": now,
            "ready_at": now,
            "audio": original["audio"],
            "duration": original["duration"],
            "kind": original["kind"],
            "probe_of": original_id,
        }
        kv.set(f"gw:track:{probe_id}", json.dumps(record))
        self._mark_served(probe_id, user, now)
        audio = original["audio"]
        ready = events_pb2.TrackReady(
            track_id=probe_id,
            audio=common_pb2.ObjectRef(
                bucket=audio["bucket"],
                key=audio["key"],
                sha256=audio["sha256"],
                size_bytes=int(audio["size"]),
            ),
            provenance=provenance,
            user_id=user,
            duration_seconds=float(original["duration"]),
        )
        self.ports.publish("tracks.ready.v1", probe_id, ready)
        metrics.QUEUE_PROBES.inc()
        return probe_id

    # -- feedback -----------------------------------------------------------------------------

    def _feedback_times(
        self, record: dict[str, Any], queue_served: float | None, given: Timestamp
    ) -> tuple[float, float]:
        """(the item's client time, when the track was served to the caller), checked."""
        served_at = (
            queue_served  # through the queue; the owner heard it from the moment it was ready
            if queue_served is not None
            else float(record.get("ready_at", record.get("requested_at", 0.0)))
        )
        now = self.clock()
        client = _client_time(given, served_at, now, self.settings.client_time_max_skew_s)
        return client, served_at

    def Rate(self, request: pb.RateRequest, context: Any) -> pb.RateResponse:
        try:
            _check_stars(request.stars)
            record, queue_served = self._track(request.track_id)
            _check_ready(request.track_id, record)
            user = current_user()
            times = self._feedback_times(record, queue_served, request.client_time)
            once_key = _once_key(request.track_id, user)
            if not self.ports.kv.set_if_absent(once_key, "1"):
                raise ConflictError(f"you already rated track {request.track_id}")
            payload = events_pb2.FeedbackReceived(
                user_id=user,
                track_id=request.track_id,
                rating=events_pb2.TrackRating(stars=request.stars),
            )
            _stamp(payload, times)
            try:
                event_id = self.ports.publish("feedback.received.v1", request.track_id, payload)
            except BaseException:
                self.ports.kv.delete(once_key)  # the rating did not leave: let the user retry
                raise
        except BaseException:
            metrics.RATINGS.labels("rejected").inc()
            raise
        metrics.RATINGS.labels("accepted").inc()
        return pb.RateResponse(event_id=event_id)

    def ReportListen(self, request: pb.ReportListenRequest, context: Any) -> Any:
        _check_seconds(request.seconds_listened)
        record, queue_served = self._track(request.track_id)
        _check_ready(request.track_id, record)
        user = current_user()
        times = self._feedback_times(record, queue_served, request.client_time)
        payload = _listen_event(user, request, record, times)
        event_id = self.ports.publish("feedback.received.v1", request.track_id, payload)
        return pb.ReportListenResponse(event_id=event_id)

    def SubmitFeedback(self, request: pb.SubmitFeedbackRequest, context: Any) -> Any:
        """Many Rate / ReportListen items of the caller in one call: the same checks per item,
        one MGET of the track records, one pipelined once-only claim for the ratings and one
        event (FeedbackBatch, keyed by user) for everything accepted — O(1) round trips per
        batch instead of O(items). A refused item does not stop the others."""
        feedback_batch_size(request, self.settings.max_feedback_batch)  # (checked before, too)
        user = current_user()
        # Each item's kind, body and track id, read once: at 100 items a call the protobuf
        # accessors were a good share of the handler's own time.
        parsed: list[tuple[str | None, Any, str]] = []
        refused: dict[int, RiffloopError] = {}
        for i, item in enumerate(request.items):
            which = item.WhichOneof("item")
            body = item.rating if which == "rating" else item.listen
            parsed.append((which, body, body.track_id))
            try:
                if which == "rating":
                    _check_track_id(body.track_id)
                    _check_stars(body.stars)
                elif which == "listen":
                    _check_track_id(body.track_id)
                    _check_seconds(body.seconds_listened)
                else:
                    raise ValidationError(f"item {i} carries neither a rating nor a listen")
            except RiffloopError as exc:
                refused[i] = exc
        wanted = sorted({track for i, (_, _, track) in enumerate(parsed) if i not in refused})
        raws = self.ports.kv.get_many([f"gw:track:{t}" for t in wanted])
        records = {t: json.loads(raw) for t, raw in zip(wanted, raws, strict=True) if raw}
        # Tracks of others need the queue's word that they were served to the caller.
        foreign = [t for t, r in records.items() if r.get("owner") != user]
        queue_served = {
            t: float(at)
            for t, at in zip(
                foreign,
                self.ports.kv.get_many([_served_key(t, user) for t in foreign]),
                strict=True,
            )
            if at is not None
        }
        times: dict[int, tuple[float, float]] = {}
        listens: dict[int, events_pb2.FeedbackReceived] = {}
        rated: list[int] = []  # ratings that passed every check so far: they need their claim
        for i, (which, body, track_id) in enumerate(parsed):
            if i in refused:
                continue
            try:
                record = records.get(track_id)
                if record is None:
                    raise NotFoundError(f"track {track_id} does not exist")
                if record.get("owner") != user and track_id not in queue_served:
                    raise PermissionDeniedError(f"track {track_id} was not served to you")
                _check_ready(track_id, record)
                times[i] = self._feedback_times(
                    record, queue_served.get(track_id), body.client_time
                )
                if which == "listen":
                    listens[i] = _listen_event(user, body, record, times[i])
                else:
                    rated.append(i)
            except RiffloopError as exc:
                refused[i] = exc
        once_keys = [_once_key(parsed[i][2], user) for i in rated]
        claimed = self.ports.kv.set_many_if_absent(once_keys, "1")
        for i, fresh in zip(rated, claimed, strict=True):
            if not fresh:
                refused[i] = ConflictError(f"you already rated track {parsed[i][2]}")
        n_ratings = sum(1 for which, _, _ in parsed if which == "rating")
        batch = events_pb2.FeedbackBatch()
        for i, (which, body, track_id) in enumerate(parsed):
            if i in refused:
                continue
            if which == "rating":
                item = batch.items.add(user_id=user, track_id=track_id)
                item.rating.stars = body.stars
                _stamp(item, times[i])
            else:
                batch.items.append(listens[i])
        event_id = ""
        if batch.items:
            try:
                event_id = self.ports.publish("feedback.received.v1", user, batch)
            except BaseException:
                # nothing left: release this call's claims so the client can send the batch again
                for key, fresh in zip(once_keys, claimed, strict=True):
                    if fresh:
                        self.ports.kv.delete(key)
                metrics.RATINGS.labels("rejected").inc(n_ratings)  # none of them left
                raise
        results = []
        for i, (_, _, track_id) in enumerate(parsed):
            error = refused.get(i)
            if error is None:
                results.append(pb.FeedbackItemResult(track_id=track_id))
            else:
                code = grpc.StatusCode[error.grpc_code].value[0]
                results.append(
                    pb.FeedbackItemResult(track_id=track_id, code=code, reason=error.reason)
                )
        accepted = n_ratings - sum(1 for i in refused if parsed[i][0] == "rating")
        metrics.RATINGS.labels("accepted").inc(accepted)
        metrics.RATINGS.labels("rejected").inc(n_ratings - accepted)
        return pb.SubmitFeedbackResponse(
            event_id=event_id, results=results, accepted=len(parsed) - len(refused)
        )

    # -- models -------------------------------------------------------------------------------

    def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        kv = self.ports.kv
        current = kv.get("gw:models:current") or ""
        ratings = kv.hgetall(MODEL_RATINGS_KEY)
        published = kv.hgetall("gw:models")
        out = []

        # A version that served rated tracks is listed even if it was never announced on
        # model.published.v1 (the base model a trainer starts from is not).
        def summary(kind: dict[str, Any]) -> pb.ModelRatingSummary:
            """One kind's ratings (feedback's KindRatings JSON): stars with their 95 %
            t-interval (absent below 2 ratings), and the normalised score apart."""
            message = pb.ModelRatingSummary(
                mean_stars=float(kind.get("mean_stars", 0.0)),
                rating_count=int(kind.get("rating_count", 0)),
                track_count=int(kind.get("track_count", 0)),
                mean_normalised_score=float(kind.get("mean_normalised_score", 0.0)),
                normalised_rating_count=int(kind.get("normalised_rating_count", 0)),
            )
            if kind.get("stars_low") is not None and kind.get("stars_high") is not None:
                message.mean_stars_interval.low = float(kind["stars_low"])
                message.mean_stars_interval.high = float(kind["stars_high"])
            return message

        for version in sorted(published.keys() | ratings.keys()):
            info = json.loads(published[version]) if version in published else {}
            rated = json.loads(ratings[version]) if version in ratings else {}
            generated = summary(rated.get("generated", {}))
            baseline = summary(rated.get("baseline", {}))
            out.append(
                pb.ModelSummary(
                    version=version,
                    parent_version=info.get("parent", ""),
                    current=version == current,
                    generated=generated,
                    baseline=baseline,
                    # the deprecated fields, for older clients: the normalised score, as before
                    mean_rating=generated.mean_normalised_score,
                    rating_count=generated.normalised_rating_count,
                    baseline_mean_rating=baseline.mean_normalised_score,
                    baseline_rating_count=baseline.normalised_rating_count,
                    published_at=_now_ts(float(info.get("published_at", 0.0))),
                )
            )
        out.sort(key=lambda m: m.published_at.ToNanoseconds())
        return pb.ListModelsResponse(models=out)


def _track_message(track_id: str, record: dict[str, Any]) -> pb.Track:
    status = {
        "pending": pb.TRACK_STATUS_PENDING,
        "ready": pb.TRACK_STATUS_READY,
        "failed": pb.TRACK_STATUS_FAILED,
    }[record["status"]]
    audio = record.get("audio") or {}
    return pb.Track(
        track_id=track_id,
        status=status,
        duration_seconds=float(record.get("duration", 0.0)),
        size_bytes=int(audio.get("size", 0)),
        content_type="audio/wav" if audio else "",
        requested_at=_now_ts(float(record["requested_at"])),
        failure_reason=str(record.get("failure_reason", "")),
    )


# -- event handlers (consumer side) -------------------------------------------------------------


class GatewayEvents(TrackRecords):
    """What the gateway does with the events it consumes: ``riffloop.runtime.TrackRecords``,
    the rules its rebuild replays too; each handler is idempotent."""

    def __init__(
        self,
        ports: Any,
        dispatcher: Any,
        clock: Callable[[], float] = time.time,
        backlog: GenerationBacklog | None = None,
    ) -> None:
        super().__init__(ports.kv, dispatcher, producer=ports.producer, clock=clock)
        self.backlog = backlog  # the servicer's pending requests: an answered one waits no more

    def on_track_ready(self, envelope: events_pb2.Envelope) -> None:
        super().on_track_ready(envelope)
        if self.backlog is not None:
            self.backlog.done(envelope.track_ready.track_id)

    def on_generation_dead_lettered(self, envelope: events_pb2.Envelope) -> None:
        super().on_generation_dead_lettered(envelope)
        dead = envelope.dead_letter
        if self.backlog is None or dead.original_topic != "generation.requested.v1":
            return
        try:
            original = decode_envelope(bytes(dead.original_value), dead.original_topic)
        except ValidationError:
            return  # never a request
        request_id = original.generation_requested.request_id
        self.backlog.done(self.dispatcher.track_id_for(request_id))


__all__ = ["GatewayEvents", "GatewayServicer", "GatewaySettings"]

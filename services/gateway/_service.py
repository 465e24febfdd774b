"""The gateway: Riffloop's public API, a thin shell over the ports and the loop's rules.

It validates every client input, stores uploads content-addressed, and turns calls into events:
UploadSong → songs.uploaded.v1, Generate → generation.requested.v1, Rate / ReportListen →
feedback.received.v1 (FeedbackReceived), SubmitFeedback → feedback.received.v1 (one FeedbackBatch
per call). It consumes tracks.ready.v1 (a pending track becomes ready) and model.published.v1.
ListModels reads the per-version mean ratings from the feedback service's read model
(``fb:model-ratings``, written by its scoring pass) rather than replaying every TrackScored: at
5,000 ratings/s that consumer was an eighth of the gateway's CPU. Auth and the per-user rate
limit are interceptors (riffloop.runtime), not handler code.

Key-value layout (prefix ``gw:``):
  gw:track:<track_id>          JSON track record (owner, status, audio ref, duration)
  gw:rated:<track_id>:<user>   set once: a second rating of the same track is ALREADY_EXISTS
  gw:models                    hash version → JSON (parent, published_at)
  gw:models:current            the version generators serve
Read, owned by the feedback service:
  fb:model-ratings             hash version → JSON mean and count, generated and baseline apart
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Iterator
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
from riffloop.runtime import (
    LATENTS_BUCKET,
    MODEL_RATINGS_KEY,
    LatentRecord,
    ServiceSettings,
    checked_track_ready,
    current_user,
    metrics,
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

_log = logging.getLogger("riffloop.gateway")

SONG_ID = re.compile(r"^[0-9a-f]{64}$")
TRACK_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
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
class GatewaySettings(ServiceSettings):
    service_name: str = "gateway"
    grpc_port: int = 50051
    metrics_port: int = 9101
    # Uploads: whole-file cap (sum of chunks) and the longest audio accepted.
    max_upload_bytes: int = 20 * 1024 * 1024
    max_audio_seconds: float = 600.0
    # Uploads in progress at once in this process; more get RESOURCE_EXHAUSTED. Each holds its
    # bytes and decodes them here: a 10-minute stereo 48 kHz file raised a process's peak RSS
    # by 0.34 GB (session 10), so unbounded uploads on 64 gRPC threads could OOM the pod (2 GiB).
    max_concurrent_uploads: int = 2
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
    stream_chunk_bytes: int = 64 * 1024
    # Seed of the blind dispatch; the generator must use the same one (track ids agree).
    dispatch_seed: int = 0
    # Most items in one SubmitFeedback call (each costs one token of the per-user rate limit).
    max_feedback_batch: int = 100

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
        if not 1 <= self.max_feedback_batch <= self.rate_limit_burst:
            raise ConfigurationError(
                "RIFFLOOP_MAX_FEEDBACK_BATCH must lie in 1–RIFFLOOP_RATE_LIMIT_BURST (a larger "
                "batch could never pass the rate limit)"
            )
        if not 1 <= self.max_concurrent_uploads <= 64:
            raise ConfigurationError("RIFFLOOP_MAX_CONCURRENT_UPLOADS must lie in 1–64")
        if not 1024 <= self.stream_chunk_bytes <= 1024 * 1024:
            raise ConfigurationError("RIFFLOOP_STREAM_CHUNK_BYTES must lie in 1 KiB–1 MiB")


def feedback_batch_size(request: pb.SubmitFeedbackRequest, limit: int) -> int:
    """The number of items of a SubmitFeedback call (its rate-limit cost), checked."""
    n = len(request.items)
    if not 1 <= n <= limit:
        raise ValidationError(f"a feedback batch holds 1–{limit} items, got {n}")
    return n


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


def _listen_event(
    user: str, listen: pb.ReportListenRequest, record: dict[str, Any]
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
    return events_pb2.FeedbackReceived(
        user_id=user,
        track_id=listen.track_id,
        listen=events_pb2.ListenReport(
            seconds_listened=seconds, clip_seconds=clip, completed=listen.completed
        ),
    )


def _now_ts(at: float | None = None) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() if at is None else at) * 1e9))
    return ts


def _ref_to_dict(ref: common_pb2.ObjectRef) -> dict[str, Any]:
    return {"bucket": ref.bucket, "key": ref.key, "sha256": ref.sha256, "size": ref.size_bytes}


class GatewayServicer(pb_grpc.GatewayServiceServicer):
    """Handlers: validate, call a port or the loop, publish an event. Nothing else."""

    def __init__(self, settings: GatewaySettings, ports: Any, audio: Any, dispatcher: Any) -> None:
        self.settings = settings
        self.ports = ports  # riffloop.runtime.Ports: bus, objects, kv
        self.audio = audio  # decodes and checks an upload (riffloop.music.decode_audio)
        self.dispatcher = dispatcher  # riffloop.loop.Dispatcher: opaque track ids
        self.upload_slots = threading.BoundedSemaphore(settings.max_concurrent_uploads)

    # -- uploads ------------------------------------------------------------------------------

    def _decode_in_a_slot(self, data: bytes) -> float:
        """Decoding is what costs memory (≈ 0.3 GB for a 10-minute stereo upload), so at most
        ``max_concurrent_uploads`` run at once; the stream itself is read without a slot, so
        slow or stalled clients cannot hold the slots for everyone."""
        if not self.upload_slots.acquire(timeout=1.0):
            raise RateLimitedError(
                "too many uploads in progress on this gateway (limit "
                f"{self.settings.max_concurrent_uploads}); retry in a few seconds",
                retry_after_s=2.0,
            )
        try:
            return float(self.audio(data))  # raises ValidationError (InvalidAudio) with a reason
        finally:
            self.upload_slots.release()

    def UploadSong(self, request_iterator: Iterator[pb.UploadSongRequest], context: Any) -> Any:
        user = current_user()
        metadata: pb.UploadSongMetadata | None = None
        chunks: list[bytes] = []
        size = 0
        limit = self.settings.max_upload_bytes
        for index, part in enumerate(request_iterator):
            which = part.WhichOneof("part")
            if which == "metadata":
                if index != 0:
                    raise ValidationError("metadata must be the first message of an upload")
                metadata = part.metadata
            elif which == "chunk":
                size += len(part.chunk)
                if size > limit:
                    raise ValidationError(f"upload exceeds the limit of {limit} bytes")
                chunks.append(part.chunk)
            else:
                raise ValidationError(f"upload message {index} carries neither metadata nor chunk")
        if metadata is None:
            raise ValidationError("an upload must start with a metadata message")
        if len(metadata.title) > _TITLE_MAX:
            raise ValidationError(f"title is longer than {_TITLE_MAX} characters")
        content_type = metadata.content_type.strip().lower()
        if content_type not in _CONTENT_TYPES:
            raise ValidationError(
                f"content_type {content_type!r} is not supported; use one of "
                + ", ".join(sorted(c for c in _CONTENT_TYPES if c))
            )
        data = b"".join(chunks)
        if not data:
            raise ValidationError("the upload carries no audio bytes")
        duration = self._decode_in_a_slot(data)
        objects = self.ports.objects
        existed = False
        try:
            ref = objects.stat(SONGS_BUCKET, _song_key(data))
            existed = True
        except NotFoundError:
            ref = objects.put_content_addressed(
                SONGS_BUCKET, data, content_type=content_type or "application/octet-stream"
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
        for song_id in ids:
            if not self.ports.objects.exists(SONGS_BUCKET, song_id):
                raise NotFoundError(f"song {song_id} was never uploaded")
        request_id = uuid.uuid4().hex
        track_id = self.dispatcher.track_id_for(request_id)
        record = {
            "owner": current_user(),
            "status": "pending",
            "requested_at": time.time(),
            "request_id": request_id,
        }
        self.ports.kv.set(f"gw:track:{track_id}", json.dumps(record))
        payload = events_pb2.GenerationRequested(
            request_id=request_id,
            user_id=current_user(),
            song_ids=ids,
            similarity=s,
            quality=q,
            seed=request.seed,
        )
        self.ports.publish("generation.requested.v1", request_id, payload)
        return pb.GenerateResponse(request_id=request_id, track_id=track_id)

    def _track(self, track_id: str, *, owned: bool = True) -> dict[str, Any]:
        raw = self.ports.kv.get(f"gw:track:{_check_track_id(track_id)}")
        if raw is None:
            raise NotFoundError(f"track {track_id} does not exist")
        record: dict[str, Any] = json.loads(raw)
        if owned and record.get("owner") != current_user():
            raise PermissionDeniedError(f"track {track_id} was not served to you")
        return record

    def GetTrack(self, request: pb.GetTrackRequest, context: Any) -> pb.GetTrackResponse:
        record = self._track(request.track_id)
        return pb.GetTrackResponse(track=_track_message(request.track_id, record))

    def StreamAudio(self, request: pb.StreamAudioRequest, context: Any) -> Iterator[Any]:
        chunk = request.chunk_size or self.settings.stream_chunk_bytes
        if not 1024 <= chunk <= 1024 * 1024:
            raise ValidationError("chunk_size must lie in 1024–1048576 bytes (or 0)")
        record = self._track(request.track_id)
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

    # -- feedback -----------------------------------------------------------------------------

    def _ready_track_for_feedback(self, track_id: str) -> dict[str, Any]:
        record = self._track(track_id)
        _check_ready(track_id, record)
        return record

    def Rate(self, request: pb.RateRequest, context: Any) -> pb.RateResponse:
        try:
            _check_stars(request.stars)
            self._ready_track_for_feedback(request.track_id)
            user = current_user()
            once_key = _once_key(request.track_id, user)
            if not self.ports.kv.set_if_absent(once_key, "1"):
                raise ConflictError(f"you already rated track {request.track_id}")
            payload = events_pb2.FeedbackReceived(
                user_id=user,
                track_id=request.track_id,
                rating=events_pb2.TrackRating(stars=request.stars),
            )
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
        record = self._ready_track_for_feedback(request.track_id)
        payload = _listen_event(current_user(), request, record)
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
        listens: dict[int, events_pb2.FeedbackReceived] = {}
        rated: list[int] = []  # ratings that passed every check so far: they need their claim
        for i, (which, body, track_id) in enumerate(parsed):
            if i in refused:
                continue
            try:
                record = records.get(track_id)
                if record is None:
                    raise NotFoundError(f"track {track_id} does not exist")
                if record.get("owner") != user:
                    raise PermissionDeniedError(f"track {track_id} was not served to you")
                _check_ready(track_id, record)
                if which == "listen":
                    listens[i] = _listen_event(user, body, record)
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
                batch.items.add(user_id=user, track_id=track_id).rating.stars = body.stars
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
        for version in sorted(published.keys() | ratings.keys()):
            info = json.loads(published[version]) if version in published else {}
            rated = json.loads(ratings[version]) if version in ratings else {}
            out.append(
                pb.ModelSummary(
                    version=version,
                    parent_version=info.get("parent", ""),
                    current=version == current,
                    mean_rating=float(rated.get("generated_mean", 0.0)),
                    rating_count=int(rated.get("generated_count", 0)),
                    baseline_mean_rating=float(rated.get("baseline_mean", 0.0)),
                    baseline_rating_count=int(rated.get("baseline_count", 0)),
                    published_at=_now_ts(float(info.get("published_at", 0.0))),
                )
            )
        out.sort(key=lambda m: m.published_at.ToNanoseconds())
        return pb.ListModelsResponse(models=out)


def _song_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


# Error types whose text (RiffloopError.reason) is safe to show a client.
_CLIENT_SAFE_ERRORS = frozenset(
    {
        "ValidationError",
        "NotFoundError",
        "ConflictError",
        "PermanentError",
        "InvalidAudio",
        "ChecksumMismatchError",
    }
)


class GatewayEvents:
    """What the gateway does with the events it consumes; each handler is idempotent."""

    def __init__(self, ports: Any, dispatcher: Any) -> None:
        self.ports = ports
        self.dispatcher = dispatcher  # the servicer's: request id → the track id it returned

    def on_generation_dead_lettered(self, envelope: events_pb2.Envelope) -> None:
        """generation.requested.v1.dlq: the generator gave up on a request (its songs were
        never encoded, an input it refuses, a bug). The client's track turns ``failed`` with
        the reason, instead of ``pending`` for ever. A replay of the DLQ that then succeeds
        makes it ``ready`` (on_track_ready overwrites the status)."""
        dead = envelope.dead_letter
        if dead.original_topic != "generation.requested.v1":
            return
        try:
            original = decode_envelope(bytes(dead.original_value), dead.original_topic)
        except ValidationError:
            return  # poison that never was a request: no client waits for it
        request_id = original.generation_requested.request_id
        key = f"gw:track:{self.dispatcher.track_id_for(request_id)}"
        raw = self.ports.kv.get(key)
        if raw is None:
            return  # requested elsewhere (the generator's own Generate RPC)
        record = json.loads(raw)
        if record["status"] == "ready":
            return  # a replay made it meanwhile
        # A RiffloopError's reason is written for clients; anything else may carry internals.
        known = dead.error_type in _CLIENT_SAFE_ERRORS
        record.update(
            status="failed",
            failure_reason=dead.error if known else "the generator failed on this request",
        )
        self.ports.kv.set(key, json.dumps(record))
        _log.warning(
            "generation failed",
            extra={"track_id": key.removeprefix("gw:track:"), "request_id": request_id},
        )

    def on_track_ready(self, envelope: events_pb2.Envelope) -> None:
        ready = envelope.track_ready
        checked_track_ready(ready)  # what the feedback service refuses is never "ready" here
        key = f"gw:track:{ready.track_id}"
        raw = self.ports.kv.get(key)
        record: dict[str, Any] = (
            json.loads(raw)
            if raw
            else {
                "owner": ready.user_id,
                "requested_at": time.time(),
                "request_id": ready.provenance.request_id,
            }
        )
        record.update(
            status="ready", audio=_ref_to_dict(ready.audio), duration=ready.duration_seconds
        )
        record.pop("failure_reason", None)
        self.ports.kv.set(key, json.dumps(record))

    def on_model_published(self, envelope: events_pb2.Envelope) -> None:
        event = envelope.model_published
        if event.action == common_pb2.MODEL_ACTION_UNSPECIFIED:
            raise ValidationError(f"model.published for {event.version} names no action")
        known = self.ports.kv.hget("gw:models", event.version)
        if known is None:
            info = {
                "parent": event.parent_version,
                "published_at": envelope.occurred_at.ToNanoseconds() / 1e9,
            }
            self.ports.kv.hset("gw:models", {event.version: json.dumps(info)})
        if event.action != common_pb2.MODEL_ACTION_CANARY:  # a canary serves only a share
            self.ports.kv.set("gw:models:current", event.version)


__all__ = ["GatewayEvents", "GatewayServicer", "GatewaySettings"]

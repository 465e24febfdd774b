"""A typed Python client of the gateway (what listeners, the simulator and tools use).

Every call carries the bearer token and a deadline; gRPC errors come back as the matching
``riffloop.core`` error (``grpc_code`` → class), so callers handle one hierarchy on both sides.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from riffloop.core import (
    ConflictError,
    NotFoundError,
    PermanentError,
    PermissionDeniedError,
    RateLimitedError,
    RiffloopError,
    TransientError,
    UnauthenticatedError,
    ValidationError,
)
from riffloop.v1 import gateway_service_pb2 as pb
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc

_ERRORS: dict[grpc.StatusCode, type[RiffloopError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: ValidationError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitedError,
    grpc.StatusCode.UNAVAILABLE: TransientError,
    grpc.StatusCode.DEADLINE_EXCEEDED: TransientError,
    grpc.StatusCode.FAILED_PRECONDITION: PermanentError,
}
UPLOAD_CHUNK = 256 * 1024


@dataclasses.dataclass(frozen=True)
class UploadedSong:
    song_id: str
    duration_seconds: float
    already_existed: bool


@dataclasses.dataclass(frozen=True)
class TrackInfo:
    track_id: str
    status: str  # "pending", "ready" or "failed"
    duration_seconds: float
    size_bytes: int
    failure_reason: str = ""  # why, when "failed"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    version: str
    parent_version: str
    current: bool
    mean_rating: float
    rating_count: int
    baseline_mean_rating: float
    baseline_rating_count: int


@dataclasses.dataclass(frozen=True)
class Rating:
    """A feedback item for ``submit_feedback``: stars 1–5 for a track served to the caller.
    ``at``: when the listener rated it (Unix seconds, this device's clock); None: now."""

    track_id: str
    stars: int
    at: float | None = None


@dataclasses.dataclass(frozen=True)
class Listen:
    """A feedback item for ``submit_feedback``: seconds listened to a track, and when playback
    stopped (``at``, as for Rating)."""

    track_id: str
    seconds: float
    completed: bool = False
    at: float | None = None


def _timestamp(at: float | None) -> Timestamp:
    """The client time of a feedback item: ``at``, else now (this device's clock)."""
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() if at is None else at) * 1e9))
    return ts


@dataclasses.dataclass(frozen=True)
class FeedbackOutcome:
    """One item's answer: ``error`` is None when accepted, else the matching riffloop error."""

    track_id: str
    error: RiffloopError | None

    @property
    def accepted(self) -> bool:
        return self.error is None


def _translate(error: grpc.RpcError) -> RiffloopError:
    code = error.code()
    cls = _ERRORS.get(code, RiffloopError)
    reason = f"{code.name}: {error.details() or ''}"
    if cls is not RateLimitedError and cls is not TransientError:
        return cls(reason)
    # the gateway's retry hint: on RESOURCE_EXHAUSTED, and on UNAVAILABLE when a backend is down
    trailers = dict(getattr(error, "trailing_metadata", lambda: None)() or ())
    try:
        retry_after_s: float | None = int(trailers["retry-after-ms"]) / 1000
    except (KeyError, ValueError):
        retry_after_s = None
    if cls is RateLimitedError:
        return RateLimitedError(reason, retry_after_s=retry_after_s)
    return TransientError(reason, retry_after_s=retry_after_s)


class GatewayClient:
    """``GatewayClient("127.0.0.1:50051", token)``; use as a context manager or call close()."""

    def __init__(
        self,
        target: str,
        token: str,
        *,
        timeout_s: float = 10.0,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._channel = channel or grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", 2 * 1024 * 1024)]
        )
        self._stub = pb_grpc.GatewayServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.timeout_s = timeout_s

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as error:
            raise _translate(error) from None

    # -- songs and tracks -----------------------------------------------------------------------

    def upload_song(
        self,
        audio: bytes | Path | BinaryIO,
        *,
        title: str = "",
        content_type: str = "audio/wav",
    ) -> UploadedSong:
        """Upload audio given as bytes, a path, or an open binary file (read and sent in
        chunks, never whole)."""

        def chunks() -> Iterator[bytes]:
            if isinstance(audio, bytes | bytearray):
                for offset in range(0, len(audio), UPLOAD_CHUNK):
                    yield bytes(audio[offset : offset + UPLOAD_CHUNK])
            elif isinstance(audio, Path):
                with audio.open("rb") as file:
                    yield from iter(lambda: file.read(UPLOAD_CHUNK), b"")
            else:
                yield from iter(lambda: audio.read(UPLOAD_CHUNK), b"")

        def parts() -> Iterator[pb.UploadSongRequest]:
            yield pb.UploadSongRequest(
                metadata=pb.UploadSongMetadata(title=title, content_type=content_type)
            )
            for chunk in chunks():
                yield pb.UploadSongRequest(chunk=chunk)

        response = self._call(self._stub.UploadSong, parts(), timeout_s=max(self.timeout_s, 60))
        return UploadedSong(response.song_id, response.duration_seconds, response.already_existed)

    def generate(
        self,
        song_ids: list[str],
        *,
        similarity: float = 0.5,
        quality: int = 0,
        seed: int = 0,
        duration_seconds: float = 0.0,
        client_request_id: str = "",
    ) -> str:
        """Ask for a track; returns its id (pending until the generator publishes it).
        ``client_request_id``: an idempotency key; calling again with it returns the same
        track instead of asking for a second one."""
        request = pb.GenerateRequest(
            song_ids=song_ids,
            similarity=similarity,
            quality=quality,
            seed=seed,
            duration_seconds=duration_seconds,
            client_request_id=client_request_id,
        )
        return str(self._call(self._stub.Generate, request).track_id)

    def get_track(self, track_id: str) -> TrackInfo:
        track = self._call(self._stub.GetTrack, pb.GetTrackRequest(track_id=track_id)).track
        status = pb.TrackStatus.Name(track.status).removeprefix("TRACK_STATUS_").lower()
        return TrackInfo(
            track.track_id, status, track.duration_seconds, track.size_bytes, track.failure_reason
        )

    def wait_ready(
        self, track_id: str, *, timeout_s: float = 120.0, poll_s: float = 0.25
    ) -> TrackInfo:
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.get_track(track_id)
            if info.status == "ready":
                return info
            if info.status == "failed":
                raise PermanentError(f"track {track_id} failed: {info.failure_reason}")
            if time.monotonic() >= deadline:
                raise TransientError(f"track {track_id} not ready after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def audio(self, track_id: str, *, chunk_size: int = 0) -> bytes:
        """The whole WAV file of a ready track."""
        return b"".join(self.iter_audio(track_id, chunk_size=chunk_size))

    def iter_audio(self, track_id: str, *, chunk_size: int = 0) -> Iterator[bytes]:
        """The WAV file of a ready track as it streams in (for playback that starts at once, or
        to write it out without holding it in memory)."""
        request = pb.StreamAudioRequest(track_id=track_id, chunk_size=chunk_size)
        try:
            stream = self._stub.StreamAudio(
                request, metadata=self._metadata, timeout=self.timeout_s
            )
            for message in stream:
                yield message.chunk
        except grpc.RpcError as error:
            raise _translate(error) from None

    # -- feedback and models --------------------------------------------------------------------

    def next_track(self) -> TrackInfo | None:
        """The next track the listening queue serves the caller (ready, blind), or None when
        nothing is waiting for them now."""
        response = self._call(self._stub.NextTrack, pb.NextTrackRequest())
        if not response.HasField("track"):
            return None
        track = response.track
        status = pb.TrackStatus.Name(track.status).removeprefix("TRACK_STATUS_").lower()
        return TrackInfo(
            track.track_id, status, track.duration_seconds, track.size_bytes, track.failure_reason
        )

    def rate(self, track_id: str, stars: int, *, at: float | None = None) -> str:
        request = pb.RateRequest(track_id=track_id, stars=stars, client_time=_timestamp(at))
        return str(self._call(self._stub.Rate, request).event_id)

    def report_listen(
        self, track_id: str, seconds: float, *, completed: bool = False, at: float | None = None
    ) -> str:
        request = pb.ReportListenRequest(
            track_id=track_id,
            seconds_listened=seconds,
            completed=completed,
            client_time=_timestamp(at),
        )
        return str(self._call(self._stub.ReportListen, request).event_id)

    def submit_feedback(self, items: list[Rating | Listen]) -> tuple[str, list[FeedbackOutcome]]:
        """Ratings and listens in one call (at most the gateway's max_feedback_batch, 100 by
        default). Returns the event id (empty if nothing was accepted) and one outcome per item,
        in order; a refused item does not refuse the others."""
        request = pb.SubmitFeedbackRequest()
        for item in items:
            if isinstance(item, Rating):
                request.items.add(
                    rating=pb.RateRequest(
                        track_id=item.track_id, stars=item.stars, client_time=_timestamp(item.at)
                    )
                )
            elif isinstance(item, Listen):
                request.items.add(
                    listen=pb.ReportListenRequest(
                        track_id=item.track_id,
                        seconds_listened=item.seconds,
                        completed=item.completed,
                        client_time=_timestamp(item.at),
                    )
                )
            else:
                raise ValidationError(f"feedback items are Rating or Listen, not {type(item)}")
        response = self._call(self._stub.SubmitFeedback, request)
        outcomes = []
        for result in response.results:
            error = None
            if result.code != grpc.StatusCode.OK.value[0]:
                code = next(
                    (c for c in grpc.StatusCode if c.value[0] == result.code),
                    grpc.StatusCode.UNKNOWN,
                )
                error = _ERRORS.get(code, RiffloopError)(f"{code.name}: {result.reason}")
            outcomes.append(FeedbackOutcome(result.track_id, error))
        return str(response.event_id), outcomes

    def list_models(self) -> list[ModelInfo]:
        models = self._call(self._stub.ListModels, pb.ListModelsRequest()).models
        return [
            ModelInfo(
                m.version,
                m.parent_version,
                m.current,
                m.mean_rating,
                m.rating_count,
                m.baseline_mean_rating,
                m.baseline_rating_count,
            )
            for m in models
        ]

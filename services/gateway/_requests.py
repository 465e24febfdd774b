"""A client's requests, checked, and the feedback events they become.

Every field a client sends is checked here before a handler acts on it (INVALID_ARGUMENT with the
reason); the key-value keys that make a rating once-only and a track servable to a listener, and
the Track message a client sees, are here too. The handlers are in services/gateway/_service.py.
"""

from __future__ import annotations

import math
import re
import time
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp

from riffloop.core import PermanentError, ValidationError
from riffloop.v1 import events_pb2
from riffloop.v1 import gateway_service_pb2 as pb

if TYPE_CHECKING:
    from services.gateway._settings import GatewaySettings

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


# The generator's track length when a request names none (riffloop.music.DEFAULT_TRACK_SECONDS;
# restated so that this module stays free of torch).
DEFAULT_TRACK_SECONDS = 5.9


def generate_work(request: pb.GenerateRequest, settings: GatewaySettings) -> int:
    """A Generate's denoising work in units of the default request's (at least 1). The
    generator runs ≈ q steps per window (``InjectionPlan``) over about seconds / 1.49 windows,
    so the work is ∝ q × seconds; a request of q = 1,000 for 60 s is ≈ 200 default ones. A field
    out of its range counts as the default (the handler then refuses it with its reason)."""
    q = request.quality
    if not 0 < q <= settings.max_quality:
        q = settings.default_quality
    seconds = request.duration_seconds
    if not (math.isfinite(seconds) and 0 < seconds <= settings.max_track_seconds):
        seconds = DEFAULT_TRACK_SECONDS
    work = q * seconds / (settings.default_quality * DEFAULT_TRACK_SECONDS)
    return max(1, math.ceil(work - 1e-9))


def generate_cost(request: pb.GenerateRequest, settings: GatewaySettings) -> int:
    """Rate-limit tokens of a Generate call: ``generate_cost`` per unit of its work
    (``generate_work``), at most the burst, so that every valid request can pass."""
    return min(settings.rate_limit_burst, settings.generate_cost * generate_work(request, settings))


def feedback_batch_size(request: pb.SubmitFeedbackRequest, limit: int) -> int:
    """The number of items of a SubmitFeedback call (its rate-limit cost), checked."""
    n = len(request.items)
    if not 1 <= n <= limit:
        raise ValidationError(f"a feedback batch holds 1–{limit} items, got {n}")
    return n


def check_upload_metadata(metadata: pb.UploadSongMetadata) -> None:
    """An upload's title and declared type, checked as its first message arrives."""
    if len(metadata.title) > _TITLE_MAX:
        raise ValidationError(f"title is longer than {_TITLE_MAX} characters")
    content_type = metadata.content_type.strip().lower()
    if content_type not in _CONTENT_TYPES:
        raise ValidationError(
            f"content_type {content_type!r} is not supported; use one of "
            + ", ".join(sorted(c for c in _CONTENT_TYPES if c))
        )


def check_track_id(track_id: str) -> str:
    if not track_id:
        raise ValidationError("track_id is required")
    if not TRACK_ID.match(track_id):
        raise ValidationError("track_id must be 1–64 characters of letters, digits, '_' or '-'")
    return track_id


def check_stars(stars: int) -> None:
    if not 1 <= stars <= 5:
        raise ValidationError(f"stars must be 1–5, got {stars}")


def check_seconds(seconds: float) -> None:
    if not math.isfinite(seconds) or seconds < 0:
        raise ValidationError("seconds_listened must be a finite number ≥ 0")


def check_ready(track_id: str, record: dict[str, Any]) -> None:
    if record["status"] != "ready":
        raise PermanentError(f"track {track_id} is not ready; rate it after listening")


def rated_key(track_id: str, user: str) -> str:
    return f"gw:rated:{track_id}:{user}"


def served_key(track_id: str, user: str) -> str:
    return f"gw:served:{track_id}:{user}"


def checked_client_time(
    given: Timestamp, served_at: float, now_s: float, max_skew_s: float
) -> float:
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


def listen_event(
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
    stamp_times(event, times)
    return event


def stamp_times(event: events_pb2.FeedbackReceived, times: tuple[float, float]) -> None:
    """Set the item's (client time, served at) on its FeedbackReceived."""
    client_time, served_at = times
    event.client_time.FromNanoseconds(int(client_time * 1e9))
    event.served_at.FromNanoseconds(int(served_at * 1e9))


def timestamp_at(at: float | None = None) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() if at is None else at) * 1e9))
    return ts


def track_message(track_id: str, record: dict[str, Any]) -> pb.Track:
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
        requested_at=timestamp_at(float(record["requested_at"])),
        failure_reason=str(record.get("failure_reason", "")),
    )

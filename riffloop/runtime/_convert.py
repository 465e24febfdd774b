"""Domain ↔ wire conversions shared by several services (proto messages ↔ riffloop.loop types)."""

from __future__ import annotations

import math
from typing import Any

from riffloop.core import ValidationError
from riffloop.v1 import common_pb2, events_pb2

_KIND_TO_PROTO = {
    "generated": common_pb2.TRACK_KIND_GENERATED,
    "baseline": common_pb2.TRACK_KIND_BASELINE,
}


def provenance_to_proto(prov: Any, *, request_id: str = "", total_steps: int = 0) -> Any:
    """``riffloop.loop.TrackProvenance`` → ``riffloop.v1.TrackProvenance``."""
    return common_pb2.TrackProvenance(
        kind=_KIND_TO_PROTO[str(prov.kind)],
        model_version=prov.model_version,
        input_song_ids=list(prov.input_song_ids),
        seed=prov.seed,
        similarity=prov.similarity,
        quality=prov.quality,
        start_step=prov.start_step or 0,
        total_steps=total_steps,
        request_id=request_id,
        baseline_song_id=prov.baseline_sample_id or "",
    )


def provenance_from_proto(track_id: str, message: Any) -> Any:
    """``riffloop.v1.TrackProvenance`` (from an event) → ``riffloop.loop.TrackProvenance``."""
    from riffloop.loop import TrackKind, TrackProvenance

    if message.kind == common_pb2.TRACK_KIND_GENERATED:
        kind = TrackKind.GENERATED
    elif message.kind == common_pb2.TRACK_KIND_BASELINE:
        kind = TrackKind.BASELINE
    else:
        raise ValidationError(f"track {track_id} has no kind in its provenance")
    return TrackProvenance(
        track_id=track_id,
        kind=kind,
        model_version=message.model_version,
        input_song_ids=tuple(message.input_song_ids),
        seed=int(message.seed),
        similarity=float(message.similarity),
        quality=int(message.quality),
        start_step=int(message.start_step) if kind is TrackKind.GENERATED else None,
        baseline_sample_id=message.baseline_song_id or None,
    )


def checked_track_ready(ready: Any) -> Any:
    """A TrackReady's provenance as ``riffloop.loop.TrackProvenance``, after the checks every
    consumer of tracks.ready.v1 applies (so none marks ready a track another refuses — the
    gateway would take ratings the feedback service can never apply)."""
    if not ready.track_id:
        raise ValidationError("a TrackReady carries no track_id")
    if not (math.isfinite(ready.duration_seconds) and ready.duration_seconds > 0):
        raise ValidationError(
            f"track {ready.track_id}: duration {ready.duration_seconds!r} s is not positive"
        )
    return provenance_from_proto(ready.track_id, ready.provenance)


def track_scored_to_proto(score: Any, provenance: Any | None, mean_listen: float = 0.0) -> Any:
    """``riffloop.loop.TrackScored`` → the ``tracks.scored.v1`` payload."""
    message = events_pb2.TrackScored(
        track_id=score.track_id,
        mean_rating=float(score.score),
        confidence=float(score.omega),
        rating_count=int(score.n_ratings),
        mean_listen_fraction=mean_listen,
    )
    if provenance is not None:
        message.provenance.CopyFrom(provenance_to_proto(provenance))
    return message


def scored_items(envelope: Any) -> list[Any]:
    """The TrackScored payloads of a ``tracks.scored.v1`` record: one, or a chunk of a pass."""
    if envelope.WhichOneof("payload") == "track_scored_batch":
        return list(envelope.track_scored_batch.items)
    return [envelope.track_scored]

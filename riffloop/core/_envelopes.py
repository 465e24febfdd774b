"""Topics and the ``riffloop.v1.Envelope`` every message is wrapped in.

``Topic`` lists the topics of docs/ARCHITECTURE.md with the payload field each one carries;
``new_envelope(producer, payload)`` wraps a payload (event_id = UUID4, occurred_at = now) and
``decode_envelope(data, topic)`` parses and checks one, raising ``ValidationError`` on anything a
producer should never have sent. The generated protobuf modules are imported lazily so that
``import riffloop.core`` works before ``scripts/gen_proto.py`` has run.
"""

from __future__ import annotations

import enum
import importlib
import uuid
from datetime import UTC, datetime
from types import ModuleType
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError

from riffloop.core._context import correlation_id_var
from riffloop.core._errors import ConfigurationError, ValidationError
from riffloop.core._tracing import inject_trace_context

if TYPE_CHECKING:
    from google.protobuf.message import Message as ProtoMessage

    from riffloop.v1 import events_pb2

DLQ_SUFFIX = ".dlq"


def load_generated(module: str) -> ModuleType:
    """Import ``riffloop.v1.<module>``, or explain how to generate it."""
    try:
        return importlib.import_module(f"riffloop.v1.{module}")
    except ImportError as exc:
        raise ConfigurationError(
            f"generated protobuf module riffloop.v1.{module} is missing ({exc}); "
            "run `python scripts/gen_proto.py`"
        ) from None


class Topic(enum.StrEnum):
    """Every topic (3 partitions, created at start-up) and the payload field it carries."""

    SONGS_UPLOADED = "songs.uploaded.v1"
    SONGS_ENCODED = "songs.encoded.v1"
    GENERATION_REQUESTED = "generation.requested.v1"
    TRACKS_READY = "tracks.ready.v1"
    FEEDBACK_RECEIVED = "feedback.received.v1"
    TRACKS_SCORED = "tracks.scored.v1"
    TRAINSET_PUBLISHED = "trainset.published.v1"
    MODEL_PUBLISHED = "model.published.v1"

    @property
    def payload_field(self) -> str:
        return _PAYLOAD_FIELD[self]

    @property
    def dlq(self) -> str:
        return dlq_topic(self.value)


_PAYLOAD_FIELD: dict[Topic, str] = {
    Topic.SONGS_UPLOADED: "song_uploaded",
    Topic.SONGS_ENCODED: "song_encoded",
    Topic.GENERATION_REQUESTED: "generation_requested",
    Topic.TRACKS_READY: "track_ready",
    Topic.FEEDBACK_RECEIVED: "feedback_received",
    Topic.TRACKS_SCORED: "track_scored",
    Topic.TRAINSET_PUBLISHED: "trainset_published",
    Topic.MODEL_PUBLISHED: "model_published",
}


# Payloads a topic accepts besides its own: feedback.received.v1 also carries a FeedbackBatch
# (one user's items from one SubmitFeedback call, so a batch costs one record, not one each), and
# tracks.scored.v1 a TrackScoredBatch (a chunk of one scoring pass).
_ALSO_ACCEPTED: dict[Topic, tuple[str, ...]] = {
    Topic.FEEDBACK_RECEIVED: ("feedback_batch",),
    Topic.TRACKS_SCORED: ("track_scored_batch",),
}


def dlq_topic(topic: str) -> str:
    """The dead-letter twin of a topic: ``<topic>.dlq``."""
    if topic.endswith(DLQ_SUFFIX):
        raise ValidationError(f"{topic!r} is already a dead-letter topic")
    return topic + DLQ_SUFFIX


# Kafka is the record of the loop and Redis a cache rebuilt from it (riffloop.runtime.rebuild),
# so the topics a rebuild reads keep what it needs instead of the broker's default 7 days. A topic
# keyed by one entity whose newest record says all (one TrackReady per track, one request per
# request id) is compacted: the newest record per key is kept for ever. The others keep every
# record (retention.ms = -1): ratings are keyed by track or by user, scores and model actions
# share one key each, and a rebuild needs every one of them.
_RECORD_CONFIG: dict[Topic, dict[str, str]] = {
    Topic.GENERATION_REQUESTED: {"cleanup.policy": "compact"},
    Topic.TRACKS_READY: {"cleanup.policy": "compact"},
    Topic.FEEDBACK_RECEIVED: {"cleanup.policy": "delete", "retention.ms": "-1"},
    Topic.TRACKS_SCORED: {"cleanup.policy": "delete", "retention.ms": "-1"},
    Topic.TRAINSET_PUBLISHED: {"cleanup.policy": "delete", "retention.ms": "-1"},
    Topic.MODEL_PUBLISHED: {"cleanup.policy": "delete", "retention.ms": "-1"},
}


def topic_config(topic: str) -> dict[str, str]:
    """The broker settings a topic is created with ({} = the broker's defaults)."""
    try:
        return dict(_RECORD_CONFIG.get(Topic(topic), {}))
    except ValueError:
        return {}  # a DLQ or a topic outside the catalogue (tests)


def all_topics(*, with_dlq: bool = True) -> list[str]:
    names = [t.value for t in Topic]
    return names + [dlq_topic(n) for n in names] if with_dlq else names


def _payload_field_for(envelope_cls: Any, payload: ProtoMessage) -> str:
    oneof = envelope_cls.DESCRIPTOR.oneofs_by_name["payload"]
    for field in oneof.fields:
        if field.message_type.full_name == payload.DESCRIPTOR.full_name:
            return str(field.name)
    raise ValidationError(f"{payload.DESCRIPTOR.full_name} is not an Envelope payload")


def new_envelope(
    producer: str,
    payload: ProtoMessage,
    *,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
) -> events_pb2.Envelope:
    """Wrap a payload: event_id (UUID4 unless given), occurred_at (now, UTC), producer, and
    the current correlation id and trace context (the gRPC call or the event being handled)."""
    events = load_generated("events_pb2")
    if not producer:
        raise ValidationError("an envelope needs a producer name")
    envelope = events.Envelope(
        event_id=event_id or str(uuid.uuid4()),
        producer=producer,
        correlation_id=correlation_id_var.get(),  # riffloop.core._context
    )
    inject_trace_context(envelope.trace_context)  # riffloop.core._tracing
    envelope.occurred_at.FromDatetime(occurred_at or datetime.now(UTC))
    getattr(envelope, _payload_field_for(events.Envelope, payload)).CopyFrom(payload)
    return envelope


def payload_of(envelope: events_pb2.Envelope) -> ProtoMessage:
    """The payload message of an envelope; ValidationError if it has none."""
    field = envelope.WhichOneof("payload")
    if field is None:
        raise ValidationError(f"event {envelope.event_id!r} carries no payload")
    message: ProtoMessage = getattr(envelope, field)
    return message


def decode_envelope(data: bytes, topic: str | None = None) -> events_pb2.Envelope:
    """Parse a message value; check event_id, producer, payload and (given a topic) its type."""
    events = load_generated("events_pb2")
    envelope = events.Envelope()
    try:
        envelope.ParseFromString(data)
    except (DecodeError, RuntimeError) as exc:
        raise ValidationError(f"message is not a riffloop.v1.Envelope ({exc})") from None
    if not envelope.event_id:
        raise ValidationError("envelope has no event_id")
    if not envelope.producer:
        raise ValidationError(f"event {envelope.event_id!r} has no producer")
    field = envelope.WhichOneof("payload")
    if field is None:
        raise ValidationError(f"event {envelope.event_id!r} carries no payload")
    if topic is not None:
        base = topic.removesuffix(DLQ_SUFFIX)
        accepted: tuple[str, ...]
        if topic.endswith(DLQ_SUFFIX):
            expected = "dead_letter"
            accepted = (expected,)
        else:
            try:
                expected = Topic(base).payload_field
                accepted = (expected, *_ALSO_ACCEPTED.get(Topic(base), ()))
            except ValueError:
                expected = field  # a topic outside the catalogue (tests): any payload goes
                accepted = (field,)
        if field not in accepted:
            raise ValidationError(
                f"event {envelope.event_id!r} on {topic} carries {field}, expected {expected}"
            )
    return envelope

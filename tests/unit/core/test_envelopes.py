"""Envelopes and the topic catalogue: wrapping, strict decoding, and agreement with the docs."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from riffloop.core import (
    Topic,
    ValidationError,
    all_topics,
    decode_envelope,
    dlq_topic,
    new_envelope,
    payload_of,
)
from riffloop.v1 import common_pb2, events_pb2

pytestmark = pytest.mark.unit

ARCHITECTURE = Path(__file__).resolve().parents[3] / "docs" / "ARCHITECTURE.md"


def test_new_envelope_fills_the_header_and_the_right_payload() -> None:
    ready = events_pb2.TrackReady(
        track_id="t1",
        provenance=common_pb2.TrackProvenance(
            kind=common_pb2.TRACK_KIND_BASELINE, input_song_ids=["a", "b"], similarity=0.6
        ),
    )
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    envelope = new_envelope("generator", ready, occurred_at=at)
    assert envelope.WhichOneof("payload") == "track_ready"
    assert payload_of(envelope) == ready
    assert envelope.producer == "generator"
    assert re.fullmatch(r"[0-9a-f-]{36}", envelope.event_id)
    assert envelope.occurred_at.ToDatetime(tzinfo=UTC) == at
    assert new_envelope("generator", ready).event_id != envelope.event_id


def test_new_envelope_rejects_non_payloads() -> None:
    with pytest.raises(ValidationError):
        new_envelope("x", common_pb2.ObjectRef(bucket="b"))
    with pytest.raises(ValidationError):
        new_envelope("", events_pb2.TrackScored())


def test_decode_checks_what_producers_must_send() -> None:
    envelope = new_envelope("feedback", events_pb2.TrackScored(track_id="t1", confidence=0.7))
    data = envelope.SerializeToString()
    assert decode_envelope(data, Topic.TRACKS_SCORED) == envelope
    with pytest.raises(ValidationError, match="expected model_published"):
        decode_envelope(data, Topic.MODEL_PUBLISHED)
    with pytest.raises(ValidationError, match=r"not a riffloop\.v1\.Envelope"):
        decode_envelope(b"\xff\xff\xff", Topic.TRACKS_SCORED)
    with pytest.raises(ValidationError, match="no event_id"):
        decode_envelope(events_pb2.Envelope(producer="x").SerializeToString())
    empty = events_pb2.Envelope(event_id="e", producer="x").SerializeToString()
    with pytest.raises(ValidationError, match="no payload"):
        decode_envelope(empty)


def test_dlq_topics_carry_dead_letters() -> None:
    dead = new_envelope("feedback", events_pb2.DeadLetter(original_topic="tracks.scored.v1"))
    data = dead.SerializeToString()
    assert decode_envelope(data, dlq_topic(Topic.TRACKS_SCORED)) == dead
    with pytest.raises(ValidationError):
        decode_envelope(data, Topic.TRACKS_SCORED)
    with pytest.raises(ValidationError):
        dlq_topic("tracks.scored.v1.dlq")


def test_topic_catalogue_matches_the_architecture_doc() -> None:
    table = re.findall(r"^\| `([a-z.]+\.v1)` \| [^|]+ \| (\w+) ", ARCHITECTURE.read_text(), re.M)
    assert table, "the Topics table of docs/ARCHITECTURE.md was not found"
    documented = {topic: payload for topic, payload in table}
    assert documented.keys() == {t.value for t in Topic}
    oneof = {
        f.name: f.message_type.name
        for f in events_pb2.Envelope.DESCRIPTOR.oneofs_by_name["payload"].fields
    }
    for topic in Topic:
        assert oneof[topic.payload_field] == documented[topic.value]
    assert set(all_topics()) == {t.value for t in Topic} | {t.dlq for t in Topic}
    assert all_topics(with_dlq=False) == [t.value for t in Topic]


def test_enums_have_unspecified_zero_values() -> None:
    assert common_pb2.TrackKind.Name(0) == "TRACK_KIND_UNSPECIFIED"
    assert common_pb2.ModelAction.Name(0) == "MODEL_ACTION_UNSPECIFIED"

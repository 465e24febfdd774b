"""The selector's tracks.scored.v1 handler: a chunk's bad scores are refused alone."""

from __future__ import annotations

import json
import math

import pytest

from riffloop.core import ItemsRefused, ValidationError, new_envelope
from riffloop.v1 import common_pb2, events_pb2
from services.selector import SelectorSettings
from services.selector._service import SelectorState
from tests.services.conftest import shared_ports

pytestmark = pytest.mark.contract


def _score(
    track: str, mean: float, confidence: float = 0.5, kind: int = common_pb2.TRACK_KIND_GENERATED
) -> events_pb2.TrackScored:
    prov = common_pb2.TrackProvenance(
        kind=kind, model_version="v0001", input_song_ids=["a" * 64], similarity=0.5, quality=20
    )
    return events_pb2.TrackScored(
        track_id=track, mean_rating=mean, rating_count=3, confidence=confidence, provenance=prov
    )


def test_a_chunk_keeps_its_good_scores_and_refuses_the_bad_ones_alone() -> None:
    ports = shared_ports()
    state = SelectorState(ports, SelectorSettings())
    chunk = new_envelope(
        "feedback",
        events_pb2.TrackScoredBatch(
            items=[
                _score("good", 3.7),
                _score("nan", math.nan),
                _score("no-kind", 3.0, kind=common_pb2.TRACK_KIND_UNSPECIFIED),
                _score("omega", 3.0, confidence=1.5),
            ]
        ),
    )
    with pytest.raises(ItemsRefused) as refused:
        state.on_track_scored(chunk)
    assert set(state.scores) == {"good"} and state.new_scores == 1
    assert json.loads(ports.kv.hgetall("sel:scores")["good"])["score"]["score"] == 3.7
    rest = refused.value.rest
    assert [s.track_id for s in rest.track_scored_batch.items] == ["nan", "no-kind", "omega"]
    assert rest.event_id == f"{chunk.event_id}.refused"
    assert "3 of 4 items refused" in refused.value.reason

    # a chunk with nothing to keep, or a single bad score, is dead-lettered whole
    with pytest.raises(ValidationError) as whole:
        state.on_track_scored(rest)
    assert not isinstance(whole.value, ItemsRefused)
    with pytest.raises(ValidationError):
        state.on_track_scored(new_envelope("feedback", _score("nan", math.nan)))
    assert set(state.scores) == {"good"}

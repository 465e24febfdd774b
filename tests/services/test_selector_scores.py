"""The selector: a chunk's bad scores are refused alone; training sets survive crashes and
failed publishes; purged pairs stay purged."""

from __future__ import annotations

import json
import math

import pytest

from riffloop.core import ItemsRefused, ValidationError, new_envelope
from riffloop.runtime import Ports
from riffloop.v1 import common_pb2, events_pb2
from services.selector import SelectorSettings
from services.selector._service import SelectorState
from tests.services.conftest import shared_ports

pytestmark = pytest.mark.contract


def _score(
    track: str,
    mean: float,
    confidence: float = 0.5,
    kind: int = common_pb2.TRACK_KIND_GENERATED,
    count: int = 3,
) -> events_pb2.TrackScored:
    prov = common_pb2.TrackProvenance(
        kind=kind,
        model_version="v0001",
        input_song_ids=["a" * 64],
        similarity=0.5,
        quality=20,
        baseline_song_id="sample-1" if kind == common_pb2.TRACK_KIND_BASELINE else "",
    )
    return events_pb2.TrackScored(
        track_id=track, mean_rating=mean, rating_count=count, confidence=confidence, provenance=prov
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
                _score("unrated", 3.0, count=0),
            ]
        ),
    )
    with pytest.raises(ItemsRefused) as refused:
        state.on_track_scored(chunk)
    assert set(state.scores) == {"good"} and state.new_scores == 1
    assert json.loads(ports.kv.hgetall("sel:scores")["good"])["score"]["score"] == 3.7
    rest = refused.value.rest
    assert [s.track_id for s in rest.track_scored_batch.items] == [
        "nan",
        "no-kind",
        "omega",
        "unrated",
    ]
    assert rest.event_id == f"{chunk.event_id}.refused"
    assert "4 of 5 items refused" in refused.value.reason

    # a chunk with nothing to keep, or a single bad score, is dead-lettered whole
    with pytest.raises(ValidationError) as whole:
        state.on_track_scored(rest)
    assert not isinstance(whole.value, ItemsRefused)
    with pytest.raises(ValidationError):
        state.on_track_scored(new_envelope("feedback", _score("nan", math.nan)))
    assert set(state.scores) == {"good"}


def _prepared() -> Ports:
    ports = shared_ports()
    ports.prepare()
    return ports


def _population(state: SelectorState, *scores: events_pb2.TrackScored) -> None:
    state.on_track_scored(new_envelope("feedback", events_pb2.TrackScoredBatch(items=scores)))


def _beaten_baseline() -> list[events_pb2.TrackScored]:
    """One input merge: a baseline at 2 stars and two generations that beat it."""
    return [
        _score("base", 2.0, kind=common_pb2.TRACK_KIND_BASELINE),
        _score("g1", 4.2),
        _score("g2", 3.6),
    ]


def test_a_set_whose_event_failed_is_republished_with_its_id_and_its_scores_still_count() -> None:
    ports = _prepared()
    state = SelectorState(ports, SelectorSettings(min_new_scores=1))
    _population(state, *_beaten_baseline())
    sent: list[str] = []
    real_publish = ports.publish

    def broken(topic: str, key: str, payload: object) -> str:
        raise ConnectionError("broker down")

    ports.publish = broken  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        state.select_once()
    saved = json.loads(ports.kv.get("sel:trainset"))
    assert saved["published"] is False and state.new_scores == 3  # nothing counted as done

    def recording(topic: str, key: str, payload: object) -> str:
        sent.append(key)
        return real_publish(topic, key, payload)

    ports.publish = recording  # type: ignore[method-assign]
    state.select_once()  # the saved set goes out first, under its own id; nothing new to add
    assert sent == [saved["trainset_id"]] and state.new_scores == 0
    assert json.loads(ports.kv.get("sel:trainset"))["published"] is True

    # killed between save and publish: a restarted selector publishes the saved set at once
    ports.kv.set("sel:trainset", json.dumps(saved))
    restarted = SelectorState(ports, SelectorSettings(min_new_scores=1))
    restarted.rebuild()
    assert sent == [saved["trainset_id"]] * 2
    assert restarted.new_scores == 1  # and a pass is due: the crash lost the count


def test_the_same_pairs_give_the_same_set_id() -> None:
    ids = []
    for _ in range(2):
        state = SelectorState(_prepared(), SelectorSettings(min_new_scores=1))
        _population(state, *_beaten_baseline())
        event = state.select_once()
        assert event is not None
        ids.append(event.trainset_id)
    assert ids[0] == ids[1] and ids[0].startswith("ts-0001-")


def test_a_purged_pair_never_comes_back_and_a_canary_is_not_the_served_model() -> None:
    ports = _prepared()
    state = SelectorState(ports, SelectorSettings(min_new_scores=1, max_age=1))
    _population(state, *_beaten_baseline())
    first = state.select_once()
    assert first is not None and first.pair_count == 2
    # the next pass: both pairs are stale (max_age 1) and purged; a newcomer survives alone
    _population(state, _score("g3", 3.9))
    second = state.select_once()
    assert second is not None
    pairs = json.loads(ports.kv.get("sel:trainset"))["pairs"]
    assert [p["target_track_id"] for p in pairs] == ["g3"]
    assert set(ports.kv.hgetall("sel:purged")) == {"g1", "g2"}
    # a third pass must not re-admit g1 and g2 as fresh survivors of their old scores
    _population(state, _score("g4", 3.8))
    assert state.select_once() is not None
    pairs = json.loads(ports.kv.get("sel:trainset"))["pairs"]
    assert {"g1", "g2"}.isdisjoint(p["target_track_id"] for p in pairs)

    canary = events_pb2.ModelPublished(version="v0002", action=common_pb2.MODEL_ACTION_CANARY)
    state.on_model_published(new_envelope("trainer", canary))
    assert ports.kv.get("sel:model") is None
    promoted = events_pb2.ModelPublished(version="v0002", action=common_pb2.MODEL_ACTION_PROMOTE)
    state.on_model_published(new_envelope("trainer", promoted))
    assert ports.kv.get("sel:model") == "v0002"


def _random_state(ports: Ports, **settings: object) -> SelectorState:
    state = SelectorState(ports, SelectorSettings(selection="random", **settings))  # type: ignore[arg-type]
    tracks = [_score(f"gen-{i}", 1.0 + i % 5) for i in range(12)]
    tracks.append(_score("base-0", 3.0, kind=common_pb2.TRACK_KIND_BASELINE))
    state.on_track_scored(new_envelope("feedback", events_pb2.TrackScoredBatch(items=tracks)))
    return state


def test_random_selection_draws_the_budget_from_new_generations_with_unit_weight() -> None:
    ports = _prepared()
    state = _random_state(ports)
    first = state.run_pass(force=True, pair_budget=5)
    assert first.outcome == "published" and first.trainset is not None
    pairs = json.loads(ports.kv.get("sel:trainset"))["pairs"]
    assert len(pairs) == 5 and {p["weight"] for p in pairs} == {1.0}
    assert all(p["target_track_id"].startswith("gen-") for p in pairs)
    # the same seed and iteration draw the same pairs (the control arm is reproducible)
    again = _random_state(_prepared())
    assert again.run_pass(force=True, pair_budget=5).trainset.trainset_id == (
        first.trainset.trainset_id
    )
    # the next pass draws only from generations scored since: none yet → no set
    assert state.run_pass(force=True, pair_budget=5).outcome == "too few pairs"
    state.on_track_scored(new_envelope("feedback", _score("gen-new", 2.0)))
    second = state.run_pass(force=True, pair_budget=5)
    assert second.outcome == "published"
    assert [p["target_track_id"] for p in json.loads(ports.kv.get("sel:trainset"))["pairs"]] == [
        "gen-new"
    ]


def test_a_pair_budget_is_refused_by_a_genetic_selector_and_when_negative() -> None:
    state = SelectorState(shared_ports(), SelectorSettings())
    with pytest.raises(ValidationError, match="random selection"):
        state.run_pass(force=True, pair_budget=3)
    with pytest.raises(ValidationError, match="negative"):
        _random_state(_prepared()).run_pass(force=True, pair_budget=-1)
    from riffloop.core import ConfigurationError

    with pytest.raises(ConfigurationError, match="RIFFLOOP_SELECTION"):
        SelectorSettings(selection="best")


def test_preference_pairs_name_a_loser_of_the_same_input_in_both_kinds_of_selection() -> None:
    """RIFFLOOP_PREFERENCE_PAIRS: the genetic set pairs each survivor with its input's
    lowest-rated generation below the baseline; the random set pairs two generations of one
    input. A set that carries over pairs carries their losers too."""
    ports = _prepared()
    state = SelectorState(ports, SelectorSettings(min_new_scores=1, preference_pairs=True))
    _population(state, *_beaten_baseline(), _score("g-low", 1.2), _score("g-mid", 1.8))
    assert state.select_once() is not None
    pairs = json.loads(ports.kv.get("sel:trainset"))["pairs"]
    assert {(p["target_track_id"], p["loser_track_id"]) for p in pairs} == {
        ("g1", "g-low"),
        ("g2", "g-low"),
    }
    _population(state, _score("g3", 3.9))
    assert state.select_once() is not None
    carried = json.loads(ports.kv.get("sel:trainset"))["pairs"]
    assert {p["loser_track_id"] for p in carried} == {"g-low"} and len(carried) == 3

    random_ports = _prepared()
    drawn = _random_state(random_ports, preference_pairs=True)
    assert drawn.run_pass(force=True, pair_budget=5).outcome == "published"
    pairs = json.loads(random_ports.kv.get("sel:trainset"))["pairs"]
    assert len(pairs) == 5 and {p["weight"] for p in pairs} == {1.0}
    for p in pairs:
        assert p["target_track_id"].startswith("gen-") and p["loser_track_id"].startswith("gen-")
        assert p["target_track_id"] != p["loser_track_id"]


def _weighted_state(ports: Ports, selection: str) -> SelectorState:
    state = SelectorState(ports, SelectorSettings(selection=selection))
    tracks = [_score(f"gen-{i}", 1.0 + (i * 7 % 12) / 3, confidence=0.6) for i in range(12)]
    tracks.append(_score("base-0", 2.0, kind=common_pb2.TRACK_KIND_BASELINE))
    _population(state, *tracks)
    return state


def test_a_weighted_set_trains_every_new_generation_and_its_control_shuffles_the_weights() -> None:
    ports, control_ports = _prepared(), _prepared()
    state = _weighted_state(ports, "weighted")
    control = _weighted_state(control_ports, "permuted")
    assert state.run_pass(force=True).outcome == "published"
    assert control.run_pass(force=True).outcome == "published"
    pairs = json.loads(ports.kv.get("sel:trainset"))["pairs"]
    shuffled = json.loads(control_ports.kv.get("sel:trainset"))["pairs"]
    assert {p["target_track_id"] for p in pairs} == {f"gen-{i}" for i in range(12)}
    assert {p["target_track_id"] for p in shuffled} == {p["target_track_id"] for p in pairs}
    # the selected arm's weights rise with the rating; the control has the same weights,
    # dealt to other tracks
    ranked = sorted(pairs, key=lambda p: p["score"])
    weights = sorted(p["weight"] for p in pairs)
    assert [p["weight"] for p in ranked] == weights
    assert sorted(p["weight"] for p in shuffled) == pytest.approx(weights)
    mine = {p["target_track_id"]: p["weight"] for p in pairs}
    assert {p["target_track_id"]: p["weight"] for p in shuffled} != pytest.approx(mine)
    # the generations above the input's baseline (2 stars) may become champions; the
    # control's never do
    assert [p["beat_baseline"] for p in pairs] == [p["score"] > 2.0 for p in pairs]
    assert not any(p["beat_baseline"] for p in shuffled)
    # the next set learns from what was scored since the last one only
    assert state.run_pass(force=True).outcome == "too few pairs"
    _population(state, _score("gen-new-1", 2.0), _score("gen-new-2", 4.0))
    assert state.run_pass(force=True).outcome == "published"
    pairs = json.loads(ports.kv.get("sel:trainset"))["pairs"]
    assert sorted(p["target_track_id"] for p in pairs) == ["gen-new-1", "gen-new-2"]
    with pytest.raises(ValidationError, match="random selection"):
        state.run_pass(force=True, pair_budget=3)
    from riffloop.core import ConfigurationError

    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ConfigurationError, match="RIFFLOOP_WEIGHT_TEMPERATURE"):
            SelectorSettings(selection="weighted", weight_temperature=bad)
    with pytest.raises(ConfigurationError, match="RIFFLOOP_PREFERENCE_PAIRS"):
        SelectorSettings(selection="permuted", preference_pairs=True)

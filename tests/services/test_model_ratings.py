"""fb:model-ratings in stars: per version and kind, the mean of the raw stars of accepted,
trusted ratings with a 95 % t-interval and the counts, beside the shrunk normalised score."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from riffloop.core import new_envelope
from riffloop.loop import (
    ConfidenceWeight,
    KindRatings,
    ModelRatings,
    Observation,
    SpamReason,
    SpamReport,
    TrackKind,
    TrackProvenance,
    model_ratings,
    star_summary,
)
from riffloop.v1 import events_pb2
from services.feedback._service import FeedbackState
from tests.services.conftest import generated_track_ready, shared_ports

pytestmark = pytest.mark.unit


def _provenance(track_id: str) -> TrackProvenance:
    """Tracks named <version>-<g|b>-<n>: generated or baseline tracks of that version."""
    version, kind, _ = track_id.split("-")
    return TrackProvenance(
        track_id=track_id,
        kind=TrackKind.GENERATED if kind == "g" else TrackKind.BASELINE,
        model_version=version,
        input_song_ids=("a" * 64,),
        seed=0,
        similarity=0.5,
        quality=5,
        baseline_sample_id="corpus:0" if kind == "b" else None,
    )


def _observation(track_id: str, rater: str, stars: int, at: float) -> Observation:
    prov = _provenance(track_id)
    return Observation(
        track_id=track_id,
        rater_id=rater,
        stars=stars,
        submitted_at=at,
        seconds_listened=6.0,
        clip_seconds=6.0,
        kind=prov.kind,
        input_key="a" * 64,
        baseline_sample_id=None,
    )


def _report(raters: set[str], caught: frozenset[str] = frozenset()) -> SpamReport:
    return SpamReport(
        caught={r: (SpamReason.CONSTANT,) for r in caught},
        reliability={r: 0.0 if r in caught else 1.0 for r in raters},
        agreement={},
        median_agreement=math.nan,
        alpha=0.01,
    )


def _ratings(
    observations: list[Observation], caught: frozenset[str] = frozenset()
) -> dict[str, ModelRatings]:
    report = _report({o.rater_id for o in observations}, caught)
    scores = ConfidenceWeight().score_arrays(observations, report)
    return model_ratings(scores, _provenance)


def test_eight_four_star_ratings_are_four_stars_with_a_degenerate_interval() -> None:
    observations = [_observation(f"v1-g-{i % 2}", f"rater{i}", 4, float(i)) for i in range(8)]
    generated = _ratings(observations)["v1"].generated
    assert (generated.mean_stars, generated.stars_low, generated.stars_high) == (4.0, 4.0, 4.0)
    assert (generated.rating_count, generated.track_count) == (8, 2)
    assert generated.normalised_rating_count == 8
    assert _ratings(observations)["v1"].baseline == KindRatings()  # no baseline rated


def test_mixed_ratings_give_the_t_interval_over_ratings() -> None:
    stars = [1, 2, 3, 4, 5, 5, 4, 3, 4, 2]
    observations = [
        _observation(f"v2-g-{i % 3}", f"rater{i}", s, float(i)) for i, s in enumerate(stars)
    ]
    # baseline tracks of the same version stay apart
    observations += [
        _observation("v2-b-0", "rater0", 5, 20.0),
        _observation("v2-b-0", "x", 3, 21.0),
    ]
    ratings = _ratings(observations)["v2"]
    n, mean = len(stars), sum(stars) / len(stars)
    low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=stats.sem(stars))
    generated = ratings.generated
    assert generated.mean_stars == pytest.approx(mean)
    assert (generated.stars_low, generated.stars_high) == (pytest.approx(low), pytest.approx(high))
    assert (generated.rating_count, generated.track_count) == (n, 3)
    baseline = ratings.baseline
    assert baseline.mean_stars == 4.0 and baseline.rating_count == 2
    # two ratings, 5 and 3: 4 ± 12.7 → clipped to the star range
    assert (baseline.stars_low, baseline.stars_high) == (1.0, 5.0)


def test_a_caught_spammers_stars_are_left_out_and_one_rating_has_no_interval() -> None:
    observations = [
        _observation("v3-g-0", "honest", 2, 0.0),
        _observation("v3-g-0", "bot", 5, 1.0),
        _observation("v3-g-1", "bot", 5, 2.0),
    ]
    generated = _ratings(observations, caught=frozenset({"bot"}))["v3"].generated
    assert (generated.mean_stars, generated.rating_count, generated.track_count) == (2.0, 1, 1)
    assert generated.stars_low is None and generated.stars_high is None
    assert generated.normalised_rating_count == 3  # accepted, trusted or not
    assert star_summary(0, 0.0, 0.0) == (0.0, None, None)


def test_the_scoring_pass_writes_stars_to_fb_model_ratings() -> None:
    """Through the feedback service: eight listeners give a generated track 4 stars each;
    fb:model-ratings carries 4.0 stars, interval [4, 4], beside the normalised score, and
    the JSON has no NaN."""
    from riffloop.runtime import MODEL_RATINGS_KEY

    ports = shared_ports()
    ports.bus.ensure_topics(["tracks.scored.v1"])
    state = FeedbackState(ports)
    raters = [f"listener{i}" for i in range(8)]
    for rater in raters:
        ready = generated_track_ready("t1", rater, model_version="v7")
        state.on_track_ready(new_envelope("generator", ready))
        batch = events_pb2.FeedbackBatch()
        batch.items.add(user_id=rater, track_id="t1", rating=events_pb2.TrackRating(stars=4))
        batch.items.add(
            user_id=rater,
            track_id="t1",
            listen=events_pb2.ListenReport(seconds_listened=6.0, clip_seconds=6.0, completed=True),
        )
        state.on_feedback(new_envelope("gateway", batch))
    assert state.publish_scores() == 1
    raw = ports.kv.hget(MODEL_RATINGS_KEY, "v7") or "{}"
    assert "NaN" not in raw
    generated = json.loads(raw)["generated"]
    assert generated["mean_stars"] == 4.0 and generated["rating_count"] == 8
    assert (generated["stars_low"], generated["stars_high"]) == (4.0, 4.0)
    assert generated["track_count"] == 1 and generated["normalised_rating_count"] == 8
    print(f"\neight 4-star ratings: normalised score {generated['mean_normalised_score']:.3f}")

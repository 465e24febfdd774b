"""The feedback service applies a FeedbackBatch (one SubmitFeedback call) item by item, once.

FeedbackState on in-memory ports, fed envelopes as its consumer would hand them over.
"""

from __future__ import annotations

import json

import pytest

from riffloop.core import ItemsRefused, NotFoundError, ValidationError, new_envelope
from riffloop.v1 import events_pb2
from services.feedback._service import FeedbackState
from tests.services.conftest import generated_track_ready, shared_ports

pytestmark = pytest.mark.contract


def _ready(state: FeedbackState, track_id: str, user: str) -> None:
    state.on_track_ready(new_envelope("generator", generated_track_ready(track_id, user)))


def _batch(user: str, *items: tuple[str, int | float]) -> events_pb2.Envelope:
    """(track, stars) for a rating, (track, seconds) with a float for a listen."""
    batch = events_pb2.FeedbackBatch()
    for track_id, value in items:
        if isinstance(value, int):
            batch.items.add(
                user_id=user, track_id=track_id, rating=events_pb2.TrackRating(stars=value)
            )
        else:
            batch.items.add(
                user_id=user,
                track_id=track_id,
                listen=events_pb2.ListenReport(
                    seconds_listened=value, clip_seconds=6.0, completed=value >= 6.0
                ),
            )
    return new_envelope("gateway", batch)


def _ratings(state: FeedbackState) -> list[tuple[str, str, int]]:
    with state.lock:
        return sorted((o.track_id, o.rater_id, o.stars) for o in state.ledger.observations())


def test_a_batch_is_recorded_once_and_survives_a_rebuild() -> None:
    ports = shared_ports()
    state = FeedbackState(ports)
    for t in ("t1", "t2"):
        _ready(state, t, "uma")
    envelope = _batch("uma", ("t1", 4), ("t1", 6.0), ("t2", 2), ("t2", 3.0))
    state.on_feedback(envelope)
    state.on_feedback(envelope)  # redelivered after a crash: nothing counts twice
    assert _ratings(state) == [("t1", "uma", 4), ("t2", "uma", 2)]
    assert json.loads(ports.kv.hget("fb:ratings:t1", "uma"))["stars"] == 4
    assert json.loads(ports.kv.hget("fb:listens:t2", "uma"))["seconds_listened"] == 3.0
    assert state.dirty == {"t1", "t2"}
    # a restarted process rebuilds the same ledger from the key-value mirror
    fresh = FeedbackState(ports)
    assert fresh.rebuild() == 2
    assert _ratings(fresh) == _ratings(state)


def test_feedback_that_overtakes_its_tracks_ready_is_parked_until_it_arrives() -> None:
    """A rating can overtake its tracks.ready (another topic, read in no set order; always so
    through a backlog). The items of unknown tracks are kept in the mirror and applied when
    their tracks arrive — also by a restarted process; the others are applied at once."""
    from riffloop.runtime import metrics
    from services.feedback._service import PARKED_KEY

    ports = shared_ports()
    state = FeedbackState(ports)
    _ready(state, "t1", "vic")
    first = _batch("vic", ("t1", 5), ("t9", 1), ("t8", 2))
    second = _batch("vic", ("t7", 3))
    state.on_feedback(first)  # handled (the consumer commits it): t1 now, the rest parked
    state.on_feedback(second)
    assert _ratings(state) == [("t1", "vic", 5)]
    parked = {f"{first.event_id}.parked", second.event_id}
    assert set(ports.kv.hgetall(PARKED_KEY)) == parked
    assert metrics.FEEDBACK_PARKED._value.get() == 2
    _ready(state, "t9", "vic")  # t8 still missing
    assert _ratings(state) == [("t1", "vic", 5)]

    restarted = FeedbackState(ports)  # the process dies here; its successor rebuilds
    restarted.rebuild()
    assert restarted.release_parked() == 0
    _ready(restarted, "t8", "vic")
    assert _ratings(restarted) == [("t1", "vic", 5), ("t8", "vic", 2), ("t9", "vic", 1)]
    assert set(ports.kv.hgetall(PARKED_KEY)) == {second.event_id}
    restarted.on_feedback(first)  # a redelivery later: duplicates, nothing counts twice
    assert len(_ratings(restarted)) == 3

    # died after t7's TrackReady was stored but before it released the batch: the next start
    # releases it
    ports.kv.hset("fb:tracks", {"t7": ports.kv.hget("fb:tracks", "t1").replace("t1", "t7")})
    third = FeedbackState(ports)
    third.rebuild()
    assert third.release_parked() == 1
    assert ("t7", "vic", 3) in _ratings(third) and ports.kv.hgetall(PARKED_KEY) == {}
    assert metrics.FEEDBACK_PARKED._value.get() == 0


def test_a_failed_release_stays_parked_and_a_refused_parked_item_is_dead_lettered() -> None:
    from riffloop.core import TransientError, decode_envelope, dlq_topic
    from services.feedback._service import PARKED_KEY

    ports = shared_ports()
    ports.bus.ensure_topics([dlq_topic("feedback.received.v1")])
    state = FeedbackState(ports)
    _ready(state, "t1", "wes")
    with pytest.raises(ItemsRefused, match="no track_id"):  # refused, not parked for ever
        state.on_feedback(_batch("wes", ("t1", 4), ("t2", 3), ("", 2)))
    state.on_feedback(_batch("wes", ("t3", 9)))  # 9 stars, parked: refused when t3 arrives
    real = ports.kv.hset_many
    ports.kv.hset_many = lambda writes: (_ for _ in ()).throw(TransientError("redis away"))  # type: ignore[method-assign]
    with pytest.raises(TransientError):  # the TrackReady's handler fails: it is retried
        _ready(state, "t2", "wes")
    ports.kv.hset_many = real  # type: ignore[method-assign]
    _ready(state, "t2", "wes")  # the retry releases what the failure left parked
    _ready(state, "t3", "wes")
    assert _ratings(state) == [("t1", "wes", 4), ("t2", "wes", 3)]
    assert ports.kv.hgetall(PARKED_KEY) == {}
    reader = ports.bus.subscribe("dlq-reader", [dlq_topic("feedback.received.v1")])
    dead = [decode_envelope(m.value, m.topic).dead_letter for m in reader.poll(1.0, 10)]
    assert len(dead) == 1 and "stars must lie in 1–5" in dead[0].error
    assert decode_envelope(dead[0].original_value).feedback_batch.items[0].track_id == "t3"


def test_feedback_whose_track_never_becomes_ready_expires_to_the_dlq() -> None:
    """Parked feedback waits for its tracks.ready, but not for ever: past the age limit it goes
    to the DLQ naming the missing tracks, and leaves memory and the mirror (restarts too)."""
    import time

    from riffloop.core import decode_envelope, dlq_topic
    from riffloop.runtime import metrics
    from services.feedback._service import PARKED_KEY

    ports = shared_ports()
    ports.bus.ensure_topics([dlq_topic("feedback.received.v1")])
    state = FeedbackState(ports)
    old, fresh = _batch("xan", ("t5", 4)), _batch("xan", ("t6", 2))
    old.occurred_at.FromSeconds(int(time.time()) - 7200)  # two hours ago
    state.on_feedback(old)
    state.on_feedback(fresh)
    assert state.expire_parked(max_age_s=3 * 3600) == 0  # neither is that old
    assert state.expire_parked(max_age_s=3600) == 1
    assert set(ports.kv.hgetall(PARKED_KEY)) == {fresh.event_id}
    assert metrics.FEEDBACK_PARKED._value.get() == 1
    reader = ports.bus.subscribe("dlq-expiry", [dlq_topic("feedback.received.v1")])
    dead = [decode_envelope(m.value, m.topic).dead_letter for m in reader.poll(1.0, 10)]
    assert [d.original_event_id for d in dead] == [f"{old.event_id}.expired"]
    assert "t5 never became ready within 3600 s" in dead[0].error
    assert dead[0].error_type == "NotFoundError"
    restarted = FeedbackState(ports)
    restarted.rebuild()
    assert restarted.expire_parked(max_age_s=3600) == 0  # gone for good, not re-expired
    _ready(restarted, "t6", "xan")
    assert _ratings(restarted) == [("t6", "xan", 2)]
    # t5 turns up after all; the operator replays the DLQ: its record is new, not a duplicate
    _ready(restarted, "t5", "xan")
    restarted.on_feedback(decode_envelope(dead[0].original_value))
    assert _ratings(restarted) == [("t5", "xan", 4), ("t6", "xan", 2)]
    # feedback whose tracks all arrived is never expired, however old (release applies it)
    late = _batch("xan", ("t7", 3))
    late.occurred_at.FromSeconds(int(time.time()) - 7200)
    restarted.on_feedback(late)
    ports.kv.hset("fb:tracks", {"t7": ports.kv.hget("fb:tracks", "t5").replace("t5", "t7")})
    restarted.rebuild()  # t7's TrackReady stored, not yet released: the start-up case
    assert restarted.expire_parked(max_age_s=3600) == 0 and restarted.release_parked() == 1


def test_a_bad_item_does_not_sink_the_rest_of_its_batch() -> None:
    ports = shared_ports()
    state = FeedbackState(ports)
    _ready(state, "t1", "wes")
    _ready(state, "t2", "wes")
    batch = _batch("wes", ("t1", 9), ("t2", 3))
    with pytest.raises(ItemsRefused) as refused:  # 9 stars: refused, t2 kept
        state.on_feedback(batch)
    assert _ratings(state) == [("t2", "wes", 3)]
    # the consumer dead-letters the refused item alone, under its own event id
    assert refused.value.rest.event_id == f"{batch.event_id}.refused"
    assert [(i.track_id, i.rating.stars) for i in refused.value.rest.feedback_batch.items] == [
        ("t1", 9)
    ]
    _ready(state, "t3", "ann")  # served to someone else: refused alone too
    with pytest.raises(ItemsRefused, match="never served"):
        state.on_feedback(_batch("wes", ("t3", 4), ("t1", 2)))
    assert _ratings(state) == [("t1", "wes", 2), ("t2", "wes", 3)]
    with pytest.raises(ValidationError) as whole:  # nothing applied: the record is poison
        state.on_feedback(_batch("wes", ("t1", 0)))
    assert not isinstance(whole.value, ItemsRefused)
    # a single (unbatched) bad event is still poison for the consumer's dead-letter path
    single = events_pb2.FeedbackReceived(
        user_id="wes", track_id="t1", rating=events_pb2.TrackRating(stars=9)
    )
    with pytest.raises(ValidationError):
        state.on_feedback(new_envelope("gateway", single))


def test_the_scoring_pass_writes_each_versions_mean_rating_for_list_models() -> None:
    """fb:model-ratings: per version, generated and baseline apart, the mean stars with their
    interval and Σ R_j n_j / Σ n_j, written by the pass that scores the tracks, and the
    riffloop_mean_rating gauge (the normalised score) beside it."""
    from riffloop.runtime import MODEL_RATINGS_KEY, metrics

    ports = shared_ports()
    ports.bus.ensure_topics(["tracks.scored.v1"])
    state = FeedbackState(ports)
    for track in ("g1", "g2"):
        _ready(state, track, "ann")
        _ready(state, track, "bob")
    state.on_feedback(_batch("ann", ("g1", 5), ("g1", 6.0), ("g2", 3), ("g2", 6.0)))
    state.on_feedback(_batch("bob", ("g1", 4), ("g1", 6.0)))
    assert state.publish_scores() == 2
    rated = json.loads(ports.kv.hget(MODEL_RATINGS_KEY, "v1") or "{}")
    scores = state.scores  # the published TrackScored of each track
    expected = (scores["g1"].mean_rating * 2 + scores["g2"].mean_rating * 1) / 3
    generated, baseline = rated["generated"], rated["baseline"]
    assert generated["normalised_rating_count"] == 3 and baseline["normalised_rating_count"] == 0
    assert generated["mean_normalised_score"] == pytest.approx(expected)
    # stars 5, 3, 4: mean 4, t-interval 4 ± 4.30·1/√3, clipped to [1, 5]
    assert (generated["mean_stars"], generated["rating_count"], generated["track_count"]) == (
        4.0,
        3,
        2,
    )
    assert generated["stars_low"] == pytest.approx(4 - 4.302653 / 3**0.5)
    assert generated["stars_high"] == 5.0
    assert baseline["rating_count"] == 0 and baseline["stars_low"] is None
    assert metrics.MEAN_RATING.labels("v1")._value.get() == pytest.approx(expected)
    # nothing new: nothing rewritten (the pass is cheap when idle)
    ports.kv.hset(MODEL_RATINGS_KEY, {"v1": "sentinel"})
    assert state.publish_scores() == 0
    assert ports.kv.hget(MODEL_RATINGS_KEY, "v1") == "sentinel"


def test_a_scoring_pass_publishes_its_scores_in_ordered_chunks() -> None:
    """⌈n / SCORES_PER_RECORD⌉ TrackScoredBatch records, all under one key (one partition, so
    a later pass is never read before an earlier one), carrying every changed track once."""
    from riffloop.core import decode_envelope
    from riffloop.runtime import TRACK_SCORES_KEY, scored_items
    from services.feedback._scorer import SCORES_PER_RECORD

    ports = shared_ports()
    ports.bus.ensure_topics(["tracks.scored.v1"])
    reader = ports.bus.subscribe("chunk-reader", ["tracks.scored.v1"])
    state = FeedbackState(ports)
    tracks = [f"c{i:04d}" for i in range(SCORES_PER_RECORD + 7)]
    for track in tracks:
        _ready(state, track, "ann")
    for start in range(0, len(tracks), 100):
        state.on_feedback(
            _batch("ann", *((t, 1 + i % 5) for i, t in enumerate(tracks[start : start + 100])))
        )
    assert state.publish_scores() == len(tracks)
    records = reader.poll(1.0, max_records=10)
    assert [r.key for r in records] == [TRACK_SCORES_KEY] * 2
    assert len({r.partition for r in records}) == 1
    items = [i for r in records for i in scored_items(decode_envelope(r.value, r.topic))]
    assert sorted(i.track_id for i in items) == tracks
    assert all(i.rating_count == 1 and i.provenance.model_version == "v1" for i in items)


def test_the_scorer_keeps_to_its_duty_cycle() -> None:
    """A pass of T seconds is followed by at least T·(1 − d)/d of rest, never less than the
    interval; a duty outside (0, 1] is a configuration error."""
    from riffloop.core import ConfigurationError
    from services.feedback._service import FeedbackSettings

    settings = FeedbackSettings.from_env(
        {"RIFFLOOP_SCORE_INTERVAL_S": "2", "RIFFLOOP_SCORE_MAX_DUTY": "0.25"}
    )
    assert settings.score_wait_s(0.1) == 2.0
    assert settings.score_wait_s(4.0) == pytest.approx(12.0)
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigurationError, match="RIFFLOOP_SCORE_MAX_DUTY"):
            FeedbackSettings.from_env({"RIFFLOOP_SCORE_MAX_DUTY": bad})
    for bad in ("0", "1"):
        with pytest.raises(ConfigurationError, match="RIFFLOOP_GIL_SWITCH_INTERVAL_S"):
            FeedbackSettings.from_env({"RIFFLOOP_GIL_SWITCH_INTERVAL_S": bad})


def test_track_score_counts_ratings_accepted_since_the_last_pass() -> None:
    """TrackScore returns the published score with the rating count of now (2 after a pass
    that saw 1), and an unscored track's count alone."""
    from riffloop.v1 import feedback_service_pb2 as fb
    from services.feedback._service import FeedbackServicer

    ports = shared_ports()
    ports.bus.ensure_topics(["tracks.scored.v1"])
    state = FeedbackState(ports)
    servicer = FeedbackServicer(state)
    for user in ("ann", "bob", "cy"):
        _ready(state, "s1", user)
        _ready(state, "s2", user)
    state.on_feedback(_batch("ann", ("s1", 4), ("s1", 6.0)))
    assert state.publish_scores() == 1
    published = state.scores["s1"]
    state.on_feedback(_batch("bob", ("s1", 2), ("s1", 6.0)))
    state.on_feedback(_batch("cy", ("s2", 5)))
    answer = servicer.TrackScore(fb.TrackScoreRequest(track_id="s1"), None).score
    assert answer.rating_count == 2 and answer.mean_rating == published.mean_rating
    unscored = servicer.TrackScore(fb.TrackScoreRequest(track_id="s2"), None).score
    assert (unscored.track_id, unscored.rating_count, unscored.confidence) == ("s2", 1, 0.0)


def test_rater_report_counts_one_raters_ratings() -> None:
    """RaterReport reads the rater's own ratings (not a scan of the ledger under the lock)."""
    from riffloop.v1 import feedback_service_pb2 as fb
    from services.feedback._service import FeedbackServicer

    ports = shared_ports()
    state = FeedbackState(ports)
    for track in ("t1", "t2", "t3"):
        _ready(state, track, "ann")
    _ready(state, "t4", "bob")
    state.on_feedback(_batch("ann", ("t1", 5), ("t2", 3), ("t3", 1)))
    state.on_feedback(_batch("bob", ("t4", 4)))
    servicer = FeedbackServicer(state)
    # ann rates bob's track: refused here, counted once however often it is redelivered
    stray = _batch("ann", ("t1", 4), ("t4", 2))
    for _ in range(2):
        with pytest.raises(ItemsRefused):
            state.on_feedback(stray)
    single = new_envelope(
        "gateway",
        events_pb2.FeedbackReceived(
            user_id="ann", track_id="t4", rating=events_pb2.TrackRating(stars=5)
        ),
    )
    with pytest.raises(ValidationError):
        state.on_feedback(single)
    ann = servicer.RaterReport(fb.RaterReportRequest(user_id="ann"), None)
    assert ann.accepted_ratings == 3 and ann.mean_stars == pytest.approx(3.0)
    assert ann.rejected_ratings == 2
    assert ann.stddev_stars == pytest.approx((8 / 3) ** 0.5)
    rebuilt = FeedbackState(ports)  # restored from the key-value store
    rebuilt.rebuild()
    bob = FeedbackServicer(rebuilt).RaterReport(fb.RaterReportRequest(user_id="bob"), None)
    assert bob.accepted_ratings == 1 and bob.mean_stars == 4.0 and bob.rejected_ratings == 0
    with pytest.raises(NotFoundError):
        servicer.RaterReport(fb.RaterReportRequest(user_id="cat"), None)


def test_a_failed_write_to_the_mirror_leaves_nothing_half_recorded() -> None:
    """The key-value write fails once: the ledger is unchanged, the consumer's retry records
    the batch, and a restarted process (rebuilt from the mirror) has every rating."""
    from riffloop.core import TransientError

    ports = shared_ports()
    state = FeedbackState(ports)
    _ready(state, "t1", "wes")
    _ready(state, "t2", "wes")
    real = ports.kv.hset_many
    failures = [TransientError("redis went away")]

    def flaky(writes: dict[str, dict[str, str]]) -> None:
        if failures:
            raise failures.pop()
        real(writes)

    ports.kv.hset_many = flaky  # type: ignore[method-assign]
    batch = _batch("wes", ("t1", 4), ("t2", 2), ("t1", 3.0))
    with pytest.raises(TransientError):
        state.on_feedback(batch)
    assert _ratings(state) == [] and not state.dirty
    state.on_feedback(batch)  # the consumer's retry
    assert _ratings(state) == [("t1", "wes", 4), ("t2", "wes", 2)]
    rebuilt = FeedbackState(ports)
    assert rebuilt.rebuild() == 2
    assert _ratings(rebuilt) == _ratings(state)

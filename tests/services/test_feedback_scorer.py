"""The feedback service's scoring pass in a child process: the same scores as the inline pass,
and a child that dies, hangs or raises is replaced without losing an accepted input.

Two FeedbackStates on in-memory ports are fed the same envelopes; one scores inline (the
reference), the other through a ProcessScorer. Every published TrackScoredBatch must match.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from riffloop.core import ConfigurationError, decode_envelope, new_envelope
from riffloop.loop import ConfidenceWeight, SpamFilter
from riffloop.runtime import scored_items
from riffloop.v1 import common_pb2, events_pb2
from services.feedback._scorer import InlineScorer, ProcessScorer, ScorerError
from services.feedback._service import FeedbackSettings, FeedbackState
from tests.services.conftest import shared_ports

pytestmark = pytest.mark.contract

USERS = [f"u{i}" for i in range(12)]


def _state(scorer: InlineScorer | ProcessScorer) -> FeedbackState:
    ports = shared_ports()
    ports.bus.ensure_topics(["tracks.scored.v1"])
    return FeedbackState(ports, scorer=scorer)


def _process_scorer(**kwargs: float) -> ProcessScorer:
    return ProcessScorer(SpamFilter(), ConfidenceWeight(), niceness=0, **kwargs)


def _serve(states: list[FeedbackState], tracks: range) -> None:
    for t in tracks:
        for user in USERS:
            ready = events_pb2.TrackReady(
                track_id=f"t{t:03d}",
                user_id=user,
                duration_seconds=6.0,
                provenance=common_pb2.TrackProvenance(
                    kind=common_pb2.TRACK_KIND_BASELINE
                    if t % 4 == 0
                    else common_pb2.TRACK_KIND_GENERATED,
                    model_version=f"v{1 + t % 2}",
                    input_song_ids=[f"{t % 3:064d}"],
                    similarity=0.5,
                    quality=5,
                    baseline_song_id=f"sample-{t}" if t % 4 == 0 else "",
                ),
            )
            envelope = new_envelope("generator", ready)
            for state in states:
                state.on_track_ready(envelope)


def _rate(states: list[FeedbackState], tracks: range, salt: int) -> None:
    """Each user rates and listens to every track (stars from a fixed pattern)."""
    for n, user in enumerate(USERS):
        batch = events_pb2.FeedbackBatch()
        for t in tracks:
            stars = 1 + (t * 7 + n * 3 + salt) % 5
            batch.items.add(
                user_id=user, track_id=f"t{t:03d}", rating=events_pb2.TrackRating(stars=stars)
            )
            batch.items.add(
                user_id=user,
                track_id=f"t{t:03d}",
                listen=events_pb2.ListenReport(
                    seconds_listened=1.0 + stars, clip_seconds=6.0, completed=stars == 5
                ),
            )
        envelope = new_envelope("gateway", batch)
        for state in states:
            state.on_feedback(envelope)


def _published(state: FeedbackState) -> dict[str, bytes]:
    """Score, publish, and read back every TrackScored of that pass (by track)."""
    reader = state.ports.bus.subscribe(f"reader-{time.monotonic_ns()}", ["tracks.scored.v1"])
    state.publish_scores()
    records = reader.poll(1.0, max_records=100)
    out = {}
    for record in records:
        for item in scored_items(decode_envelope(record.value, record.topic)):
            out[item.track_id] = item.SerializeToString()
    return out


def test_the_child_process_publishes_what_the_inline_pass_publishes() -> None:
    """Pass after pass (a snapshot first, then only the inputs accepted since), the child's
    scores, per-version ratings and spam report equal the inline reference's."""
    inline = _state(InlineScorer(SpamFilter(), ConfidenceWeight()))
    child = _state(_process_scorer())
    try:
        both = [inline, child]
        _serve(both, range(0, 30))
        _rate(both, range(0, 20), salt=0)
        first = _published(child)
        assert len(first) == 20 and first == _published(inline)
        _rate(both, range(20, 30), salt=1)  # deltas only: the replica must keep up
        second = _published(child)
        assert set(second) == {f"t{t:03d}" for t in range(30)}  # ω pools raters: all change
        assert second == _published(inline)
        assert child.model_ratings == inline.model_ratings
        assert child.report is not None and inline.report is not None
        assert child.report.reliability == inline.report.reliability
        assert child.scores.keys() == inline.scores.keys()
    finally:
        child.close()


def test_a_killed_child_is_replaced_and_nothing_accepted_is_lost() -> None:
    """kill -9 of the scorer between passes: that pass fails, its tracks stay dirty, and the
    next pass (a new child, restored from the parent's snapshot) publishes the reference's
    scores, including for inputs accepted while no child was running."""
    scorer = _process_scorer()
    inline = _state(InlineScorer(SpamFilter(), ConfidenceWeight()))
    child = _state(scorer)
    try:
        both = [inline, child]
        _serve(both, range(0, 16))
        _rate(both, range(0, 8), salt=0)
        assert _published(child) == _published(inline)
        first_pid = scorer.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        _rate(both, range(8, 16), salt=2)
        with pytest.raises(ScorerError, match="died"):
            child.publish_scores()
        assert scorer.needs_reset and scorer.restarts == 1
        assert child.dirty >= {f"t{t:03d}" for t in range(8, 16)}
        again = _published(child)
        assert scorer.pid not in (None, first_pid)
        assert again == _published(inline)
    finally:
        child.close()


def test_a_hung_child_is_killed_after_the_timeout() -> None:
    """A child that stops answering (SIGSTOP here) is killed when the pass outlives
    ``score_timeout_s``; the next pass starts a fresh one."""
    scorer = _process_scorer(timeout_s=1.0)
    state = _state(scorer)
    try:
        _serve([state], range(0, 8))
        _rate([state], range(0, 4), salt=0)
        assert state.publish_scores() == 4
        pid = scorer.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        _rate([state], range(4, 8), salt=0)
        with pytest.raises(ScorerError, match="longer than 1 s"):
            state.publish_scores()
        assert state.publish_scores() == 4  # the four new ones, from a new child
        assert scorer.pid != pid and scorer.restarts == 1
    finally:
        state.close()


def test_a_pass_that_raises_reports_the_childs_traceback() -> None:
    scorer = _process_scorer()
    try:
        with pytest.raises(ScorerError, match="JSONDecodeError"):
            scorer.run([("reset", b"not a snapshot")], set())
        assert scorer.needs_reset
    finally:
        scorer.close()


def test_the_scorer_settings_are_validated() -> None:
    assert FeedbackSettings.from_env({}).scorer == "process"
    for env, name in (
        ({"RIFFLOOP_SCORER": "threads"}, "RIFFLOOP_SCORER"),
        ({"RIFFLOOP_SCORER_NICENESS": "20"}, "RIFFLOOP_SCORER_NICENESS"),
        ({"RIFFLOOP_SCORE_TIMEOUT_S": "0"}, "RIFFLOOP_SCORE_TIMEOUT_S"),
    ):
        with pytest.raises(ConfigurationError, match=name):
            FeedbackSettings.from_env(env)


def test_the_replica_is_synced_before_the_first_rating_and_never_snapshotted_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tick with nothing rated hands the inputs over (the first one as a snapshot of the
    still small ledger) and publishes nothing; the passes with ratings then send only what was
    accepted since, so no pass snapshots the whole ledger under the consumer's lock."""
    from riffloop.loop import FeedbackLedger

    snapshots = []
    real = FeedbackLedger.snapshot

    def counted(ledger: FeedbackLedger) -> bytes:
        snapshots.append(len(ledger.provenances()))
        return real(ledger)

    monkeypatch.setattr(FeedbackLedger, "snapshot", counted)
    inline = _state(InlineScorer(SpamFilter(), ConfidenceWeight()))
    child = _state(_process_scorer())
    try:
        both = [inline, child]
        _serve(both, range(0, 2))
        assert child.publish_scores() == 0 and inline.publish_scores() == 0
        assert snapshots == [2, 2]  # one per scorer, at its first tick
        _serve(both, range(2, 30))  # tracks only: handed over on the next tick, not scored
        assert child.publish_scores() == 0 and not child.scorer.needs_reset
        assert inline.publish_scores() == 0
        _rate(both, range(0, 30), salt=3)
        scored = _published(child)
        assert len(scored) == 30 and scored == _published(inline)
        assert snapshots == [2, 2]
    finally:
        child.close()

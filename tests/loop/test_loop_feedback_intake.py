"""FeedbackIntake and its parts on the in-memory ports: the rules between the feedback consumer
and the ledger (record once, park until the track is ready, expire, rebuild, hand over to the
scorer's replica), and the per-version ModelRatingsView."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import pytest

from riffloop.core import (
    ConflictError,
    ItemsRefused,
    MemoryEventBus,
    MemoryKeyValueStore,
    NotFoundError,
    TransientError,
    ValidationError,
    decode_envelope,
    dlq_topic,
    new_envelope,
)
from riffloop.loop import (
    FeedbackHooks,
    FeedbackIntake,
    FeedbackLedger,
    KindRatings,
    ModelRatings,
    ModelRatingsView,
    ParkedFeedback,
    TrackKind,
    TrackProvenance,
    TrackRecord,
    replay_ops,
)
from riffloop.v1 import events_pb2

pytestmark = pytest.mark.unit

DLQ = dlq_topic("feedback.received.v1")


def _record(track_id: str, user: str = "ann", at: float = 100.0) -> TrackRecord:
    prov = TrackProvenance(track_id, TrackKind.GENERATED, "v1", ("a" * 64,), 3, 0.5, 5, 2)
    return TrackRecord(prov, 6.0, {user: at})


def _batch(user: str, *items: tuple[str, int | float], age_s: float = 0.0) -> events_pb2.Envelope:
    """(track, stars) for a rating, (track, seconds) with a float for a listen."""
    batch = events_pb2.FeedbackBatch()
    for track_id, value in items:
        if isinstance(value, int):
            batch.items.add(
                user_id=user, track_id=track_id, rating=events_pb2.TrackRating(stars=value)
            )
        else:
            report = events_pb2.ListenReport(
                seconds_listened=value, clip_seconds=6.0, completed=value >= 6.0
            )
            batch.items.add(user_id=user, track_id=track_id, listen=report)
    envelope = new_envelope("gateway", batch)
    if age_s:
        envelope.occurred_at.FromSeconds(int(time.time() - age_s))
    return envelope


class _FlakyKv(MemoryKeyValueStore):
    """The in-memory store, whose next ``hset_many`` calls fail while ``failures`` lasts."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    def hset_many(self, writes: Mapping[str, Mapping[str, str]]) -> None:
        if self.failures:
            self.failures -= 1
            raise TransientError("the store went away")
        super().hset_many(writes)


class _Counts:
    """FeedbackHooks that remember what they were told."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, str, int]] = []
        self.parked: list[int] = []
        self.dead: list[str] = []

    def hooks(self) -> FeedbackHooks:
        return FeedbackHooks(
            on_recorded=lambda *a: self.recorded.append(a),
            on_parked=self.parked.append,
            on_dead_letter=self.dead.append,
        )


def _intake(
    kv: _FlakyKv | None = None, counts: _Counts | None = None, *, dlq: bool = True
) -> tuple[FeedbackIntake, _FlakyKv, MemoryEventBus]:
    kv = kv or _FlakyKv()
    bus = MemoryEventBus()
    if dlq:
        bus.ensure_topics([DLQ])
    hooks = counts.hooks() if counts else None
    return FeedbackIntake(kv, bus, producer="feedback", hooks=hooks), kv, bus


def _dead_letters(bus: MemoryEventBus) -> list[events_pb2.DeadLetter]:
    records = bus.subscribe(f"dlq-{time.monotonic_ns()}", [DLQ]).poll(1.0)
    return [decode_envelope(m.value, m.topic).dead_letter for m in records]


def _ratings(intake: FeedbackIntake) -> list[tuple[str, str, int]]:
    with intake.lock:
        return sorted((o.track_id, o.rater_id, o.stars) for o in intake.ledger.observations())


def test_a_track_record_is_the_fb_tracks_row_and_registers_its_track() -> None:
    record = _record("t1", "ann", 12.5)
    raw = json.loads(record.to_json())
    assert list(raw) == ["provenance", "clip_seconds", "served_to"]
    assert raw["served_to"] == {"ann": 12.5} and raw["clip_seconds"] == 6.0
    assert TrackRecord.from_json(record.to_json()) == record
    ledger = FeedbackLedger()
    record.register(ledger)
    record.register(ledger)  # the same TrackReady twice: idempotent
    assert ledger.provenance("t1") == record.provenance and ledger.rating_count("t1") == 0
    other = TrackRecord(
        TrackProvenance("t1", TrackKind.GENERATED, "v2", ("a" * 64,), 3, 0.5, 5, 2), 6.0
    )
    with pytest.raises(ConflictError):
        other.register(ledger)


def test_accepted_feedback_is_mirrored_first_and_a_rebuild_replays_it() -> None:
    counts = _Counts()
    intake, kv, _ = _intake(counts=counts)
    for track in ("t1", "t2"):
        intake.on_track_ready(_record(track))
    envelope = _batch("ann", ("t1", 4), ("t1", 5.0), ("t2", 2))
    intake.on_feedback(envelope)
    intake.on_feedback(envelope)  # redelivered: nothing counts twice
    assert _ratings(intake) == [("t1", "ann", 4), ("t2", "ann", 2)]
    assert counts.recorded == [("rating", "recorded", 2), ("listen", "recorded", 1)]
    assert json.loads(kv.hget("fb:listens:t1", "ann") or "{}")["seconds_listened"] == 5.0
    assert intake.dirty == {"t1", "t2"}

    rebuilt, _, _ = _intake(kv)
    assert rebuilt.rebuild() == 2
    assert _ratings(rebuilt) == _ratings(intake)
    assert rebuilt.dirty == {"t1", "t2"}  # every track is scored again after a restart
    with rebuilt.lock:
        assert rebuilt.ledger.observations() == intake.ledger.observations()


def test_a_rating_retried_under_a_new_event_id_counts_once() -> None:
    """A publish that timed out in flight may still have been written; the gateway released
    its claim, so the client's retry puts a second copy on the topic under a new event id,
    unary (Rate) or in a batch (SubmitFeedback). A rating's key is (track, listener): the
    copy is a duplicate, also after a rebuild."""
    counts = _Counts()
    intake, kv, _ = _intake(counts=counts)
    for track in ("t1", "t2"):
        intake.on_track_ready(_record(track))
    rating = events_pb2.FeedbackReceived(
        user_id="ann", track_id="t1", rating=events_pb2.TrackRating(stars=4)
    )
    intake.on_feedback(new_envelope("gateway", rating))  # the first try, written after all
    intake.on_feedback(new_envelope("gateway", rating))  # its unary retry
    intake.on_feedback(_batch("ann", ("t1", 4), ("t2", 3)))  # a batched retry, with a new one
    assert _ratings(intake) == [("t1", "ann", 4), ("t2", "ann", 3)]
    assert counts.recorded == [("rating", "recorded", 1), ("rating", "recorded", 1)]
    rebuilt, _, _ = _intake(kv)
    assert rebuilt.rebuild() == 2


def test_a_failed_mirror_write_leaves_the_ledger_unchanged() -> None:
    intake, kv, _ = _intake()
    intake.on_track_ready(_record("t1"))
    kv.failures = 1
    with pytest.raises(TransientError):
        intake.on_feedback(_batch("ann", ("t1", 4)))
    assert _ratings(intake) == [] and not intake.dirty and kv.hgetall("fb:ratings:t1") == {}
    intake.on_feedback(_batch("ann", ("t1", 4)))
    assert _ratings(intake) == [("t1", "ann", 4)]


def test_refused_items_are_counted_once_per_envelope_and_the_rest_kept() -> None:
    counts = _Counts()
    intake, _, _ = _intake(counts=counts)
    intake.on_track_ready(_record("t1", "ann"))
    intake.on_track_ready(_record("t2", "bob"))  # never served to ann
    stray = _batch("ann", ("t1", 4), ("t2", 3), ("t1", 9.0))
    for _ in range(2):
        with pytest.raises(ItemsRefused) as refused:
            intake.on_feedback(stray)
    assert [i.track_id for i in refused.value.rest.feedback_batch.items] == ["t2", "t1"]
    assert _ratings(intake) == [("t1", "ann", 4)]
    assert intake.mirror.refused_ratings("ann") == 1  # the rating only, not the listen
    assert ("rating", "refused", 1) in counts.recorded
    with pytest.raises(ValidationError) as poison:  # a single event: the whole record
        intake.on_feedback(
            new_envelope(
                "gateway",
                events_pb2.FeedbackReceived(
                    user_id="ann", track_id="t1", rating=events_pb2.TrackRating(stars=0)
                ),
            )
        )
    assert not isinstance(poison.value, ItemsRefused)
    assert intake.mirror.refused_ratings("ann") == 2 and intake.mirror.refused_ratings("cy") == 0


def test_feedback_for_an_unknown_track_is_parked_until_its_track_is_ready() -> None:
    counts = _Counts()
    intake, kv, _ = _intake(counts=counts)
    intake.on_track_ready(_record("t1", "ann"))
    first = _batch("ann", ("t1", 5), ("t9", 1), ("t8", 2))
    intake.on_feedback(first)
    assert _ratings(intake) == [("t1", "ann", 5)]
    assert set(kv.hgetall(ParkedFeedback.KEY)) == {f"{first.event_id}.parked"}
    assert counts.parked == [1]
    intake.on_track_ready(_record("t9", "ann"))  # t8 still missing: nothing released
    assert _ratings(intake) == [("t1", "ann", 5)] and len(intake.parked) == 1

    restarted, _, _ = _intake(kv)  # a restart restores what is parked from the store
    restarted.rebuild()
    assert len(restarted.parked) == 1 and restarted.parked.waits_for("t8")
    restarted.on_track_ready(_record("t8", "ann"))
    assert _ratings(restarted) == [("t1", "ann", 5), ("t8", "ann", 2), ("t9", "ann", 1)]
    assert kv.hgetall(ParkedFeedback.KEY) == {} and len(restarted.parked) == 0


def test_a_parked_item_refused_on_release_goes_to_the_dlq() -> None:
    counts = _Counts()
    intake, kv, bus = _intake(counts=counts)
    intake.on_feedback(_batch("ann", ("t3", 9)))  # 9 stars: refused once t3 is known
    intake.on_track_ready(_record("t3", "ann"))
    assert _ratings(intake) == [] and kv.hgetall(ParkedFeedback.KEY) == {}
    dead = [
        decode_envelope(m.value, m.topic).dead_letter for m in bus.subscribe("r", [DLQ]).poll(1.0)
    ]
    assert len(dead) == 1 and "stars must lie in 1–5" in dead[0].error
    assert counts.dead == ["feedback.received.v1"]


def test_parked_feedback_expires_only_while_a_track_is_missing() -> None:
    intake, kv, bus = _intake()
    old, fresh = _batch("ann", ("t5", 4), age_s=7200), _batch("ann", ("t6", 2))
    late = _batch("ann", ("t7", 3), age_s=7200)
    for envelope in (old, fresh, late):
        intake.on_feedback(envelope)
    # t7's TrackReady is stored but not released yet (a crash between the two): the restart
    # finds late's tracks all known, so it is released, never expired
    kv.hset("fb:tracks", {"t7": _record("t7").to_json()})
    intake.rebuild()
    assert intake.expire_parked(max_age_s=3 * 3600) == 0
    assert intake.expire_parked(max_age_s=3600) == 1
    assert set(kv.hgetall(ParkedFeedback.KEY)) == {fresh.event_id, late.event_id}
    dead = [
        decode_envelope(m.value, m.topic).dead_letter for m in bus.subscribe("r", [DLQ]).poll(1.0)
    ]
    assert [d.original_event_id for d in dead] == [f"{old.event_id}.expired"]
    assert "t5 never became ready within 3600 s" in dead[0].error
    assert intake.release_parked() == 1 and _ratings(intake) == [("t7", "ann", 3)]


def test_a_failed_expiry_parks_everything_again() -> None:
    intake, kv, bus = _intake(dlq=False)  # no DLQ topic yet: the dead letter cannot be written
    intake.on_feedback(_batch("ann", ("t5", 4), age_s=7200))
    intake.on_feedback(_batch("ann", ("t6", 4), age_s=7200))
    with pytest.raises(NotFoundError):
        intake.expire_parked(max_age_s=3600)
    assert len(intake.parked) == 2 and len(kv.hgetall(ParkedFeedback.KEY)) == 2
    bus.ensure_topics([DLQ])
    assert intake.expire_parked(max_age_s=3600) == 2 and len(intake.parked) == 0


def test_parked_feedback_ready_and_expired_follow_the_known_tracks() -> None:
    kv = MemoryKeyValueStore()
    parked = ParkedFeedback(kv)
    known = {"t1"}
    a, b = _batch("ann", ("t1", 4), ("t2", 3), age_s=7200), _batch("bob", ("t2", 1))
    for envelope in (a, b):
        parked.store(envelope)
        parked.index(envelope.event_id, envelope, known.__contains__)
    assert parked.missing(a.event_id) == ["t2"] and parked.waits_for("t2")
    assert parked.ready(known.__contains__) == []
    known.add("t2")
    assert {e for e, _ in parked.ready(known.__contains__, "t2")} == {a.event_id, b.event_id}
    assert parked.claim_expired(known.__contains__, 3600, time.time()) == []  # all known
    known.discard("t2")
    expired = parked.claim_expired(known.__contains__, 3600, time.time())
    assert [(e, m) for e, _, m in expired] == [(a.event_id, ["t2"])]
    assert a.event_id not in parked and b.event_id in parked
    parked.forget(a.event_id)  # already claimed: a no-op
    restored = ParkedFeedback(kv)
    restored.restore(known.__contains__)
    assert len(restored) == 2 and restored.missing(b.event_id) == ["t2"]


def test_the_replica_gets_a_snapshot_first_then_only_the_new_inputs() -> None:
    intake, _, _ = _intake()
    intake.on_track_ready(_record("t1"))
    handed = intake.hand_over(replica_needs_reset=False)
    assert handed is not None
    ops, changed = handed
    assert [kind for kind, _ in ops] == ["reset"] and changed == set()
    replica = replay_ops(FeedbackLedger(), ops)
    assert intake.hand_over(replica_needs_reset=False) is None  # nothing new
    intake.on_track_ready(_record("t2"))
    intake.on_feedback(_batch("ann", ("t1", 4), ("t2", 2), ("t2", 3.0)))
    ops, changed = intake.hand_over(replica_needs_reset=False) or ([], set())
    assert [kind for kind, _ in ops] == ["track", "rating", "rating", "listen"]
    assert changed == {"t1", "t2"} and not intake.dirty
    replica = replay_ops(replica, ops + ops)  # a replayed op changes nothing
    with intake.lock:
        assert replica.observations() == intake.ledger.observations()

    intake.pass_failed(changed)  # the pass failed: the same tracks, from a fresh snapshot
    ops, again = intake.hand_over(replica_needs_reset=False) or ([], set())
    assert [kind for kind, _ in ops] == ["reset"] and again == changed
    assert intake.hand_over(replica_needs_reset=True) is not None  # a new scorer process
    intake.unpublished(["t2"])
    assert intake.dirty == {"t2"}


def test_the_model_ratings_view_rewrites_only_what_changed() -> None:
    kv = _FlakyKv()
    view = ModelRatingsView(kv, "fb:model-ratings")
    v1 = ModelRatings(generated=KindRatings(mean_stars=4.0, rating_count=2))
    v2 = ModelRatings(baseline=KindRatings(mean_stars=3.0, rating_count=1))
    assert set(view.write({"v1": v1, "v2": v2})) == {"v1", "v2"}
    assert json.loads(kv.hget("fb:model-ratings", "v1") or "{}")["generated"]["mean_stars"] == 4.0
    kv.hset("fb:model-ratings", {"v2": "sentinel"})
    newer = ModelRatings(generated=KindRatings(mean_stars=4.5, rating_count=3))
    assert view.write({"v1": newer, "v2": v2}) == {"v1": newer.to_json()}
    assert kv.hget("fb:model-ratings", "v2") == "sentinel"  # unchanged: not rewritten
    kv.failures = 1
    with pytest.raises(TransientError):
        view.write({"v1": v1})
    assert view.write({"v1": v1}) == {"v1": v1.to_json()}  # the failed write is retried

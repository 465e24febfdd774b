"""The Consumer loop on the in-process bus: dedupe, retries, DLQ, crash recovery, graceful stop."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import pytest

from riffloop.core import (
    BatchResult,
    Consumer,
    ConsumerHooks,
    Delivery,
    Interrupted,
    ItemsRefused,
    KeyValueStore,
    MemoryEventBus,
    MemoryKeyValueStore,
    Outcome,
    PermanentError,
    Topic,
    TransientError,
    ValidationError,
    decode_envelope,
    dlq_topic,
    new_envelope,
    refused_items_envelope,
    replay_dead_letters,
)
from riffloop.v1 import events_pb2

pytestmark = pytest.mark.unit

TOPIC = Topic.FEEDBACK_RECEIVED.value


class ProcessDied(BaseException):
    """Stands in for kill -9: not an Exception, so nothing in the loop catches it."""


def rating(track_id: str, stars: int, user: str = "u1") -> events_pb2.Envelope:
    return new_envelope(
        "gateway",
        events_pb2.FeedbackReceived(
            user_id=user, track_id=track_id, rating=events_pb2.TrackRating(stars=stars)
        ),
    )


def count_rating(kv: KeyValueStore) -> Callable[[Delivery], None]:
    """An idempotent effect: Σ stars and n per track, applied once per event_id."""

    def handle(delivery: Delivery) -> None:
        feedback = delivery.envelope.feedback_received
        kv.apply_once(
            f"applied:{delivery.event_id}",
            3600,
            {f"track:{feedback.track_id}": {"sum": feedback.rating.stars, "n": 1}},
        )

    return handle


class Recorder:
    def __init__(self) -> None:
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.lags: list[tuple[str, int]] = []
        self.hooks = ConsumerHooks(
            on_outcome=lambda topic, outcome: self.outcomes.update([(topic, outcome.value)]),
            on_lag=lambda topic, lag: self.lags.append((topic, lag)),
        )


@pytest.fixture
def bus() -> MemoryEventBus:
    bus = MemoryEventBus()
    bus.ensure_topics([TOPIC, dlq_topic(TOPIC)])
    return bus


@pytest.fixture
def kv() -> MemoryKeyValueStore:
    return MemoryKeyValueStore()


def make(
    bus: MemoryEventBus,
    kv: KeyValueStore,
    handler: Callable[[Delivery], None],
    recorder: Recorder | None = None,
    **options: float,
) -> Consumer:
    return Consumer(
        bus,
        kv,
        group="feedback",
        topics=[TOPIC],
        handler=handler,
        max_attempts=int(options.pop("max_attempts", 3)),
        retry_backoff_s=options.pop("retry_backoff_s", 0.0),
        poll_timeout_s=0.01,
        lag_interval_s=0.0,
        hooks=recorder.hooks if recorder else None,
        **options,  # type: ignore[arg-type]
    )


def dead_letters(bus: MemoryEventBus) -> list[events_pb2.DeadLetter]:
    subscription = bus.subscribe("dlq-reader", [dlq_topic(TOPIC)])
    try:
        return [
            decode_envelope(m.value, dlq_topic(TOPIC)).dead_letter
            for m in subscription.poll(0.01, 100)
        ]
    finally:
        subscription.close()


def test_handles_commits_and_reports(bus: MemoryEventBus, kv: MemoryKeyValueStore) -> None:
    seen: list[Delivery] = []
    recorder = Recorder()
    consumer = make(bus, kv, seen.append, recorder)
    envelope = rating("t1", 5)
    bus.publish(TOPIC, "t1", envelope)
    assert consumer.run_once() == 1
    assert [d.envelope for d in seen] == [envelope]
    assert seen[0].attempt == 1
    assert seen[0].payload == envelope.feedback_received
    assert recorder.outcomes == {(TOPIC, "handled"): 1}
    assert (TOPIC, 1) in recorder.lags  # lag reported after the poll, before the commit
    consumer.close()
    again = make(bus, kv, seen.append)
    assert again.run_once() == 0  # committed: a new member gets nothing
    assert len(seen) == 1


def test_a_redelivered_event_is_a_duplicate(bus: MemoryEventBus, kv: MemoryKeyValueStore) -> None:
    seen: list[Delivery] = []
    recorder = Recorder()
    consumer = make(bus, kv, seen.append, recorder)
    envelope = rating("t1", 4)
    bus.publish(TOPIC, "t1", envelope)
    bus.publish(TOPIC, "t1", envelope)  # the producer retried: same event_id, new offset
    assert consumer.run_once() == 2
    assert len(seen) == 1
    assert recorder.outcomes == {(TOPIC, "handled"): 1, (TOPIC, "duplicate"): 1}


def test_transient_failure_is_retried(bus: MemoryEventBus, kv: MemoryKeyValueStore) -> None:
    attempts: list[int] = []

    def flaky(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt == 1:
            raise TransientError("redis blinked")

    recorder = Recorder()
    consumer = make(bus, kv, flaky, recorder)
    bus.publish(TOPIC, "t1", rating("t1", 3))
    consumer.run_once()
    assert attempts == [1, 2]
    assert recorder.outcomes == {(TOPIC, "failed"): 1, (TOPIC, "handled"): 1}
    assert dead_letters(bus) == []


def test_a_failing_event_goes_to_the_dlq_and_the_loop_goes_on(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    handled: list[str] = []

    def handler(delivery: Delivery) -> None:
        if delivery.envelope.feedback_received.track_id == "poison":
            raise RuntimeError("division by zero in ω")
        handled.append(delivery.envelope.feedback_received.track_id)

    recorder = Recorder()
    consumer = make(bus, kv, handler, recorder, max_attempts=3)
    poison = rating("poison", 1)
    published = bus.publish(TOPIC, "poison", poison)
    bus.publish(TOPIC, "poison", rating("poison-neighbour", 2))  # same key, same partition
    bus.publish(TOPIC, "t2", rating("t2", 5))
    consumer.run_once()
    assert sorted(handled) == ["poison-neighbour", "t2"]
    (dead,) = dead_letters(bus)
    assert dead.original_topic == TOPIC
    assert (dead.original_partition, dead.original_offset) == (
        published.partition,
        published.offset,
    )
    assert dead.original_key == "poison"
    assert dead.original_event_id == poison.event_id
    assert decode_envelope(dead.original_value) == poison
    assert dead.error == "division by zero in ω"
    assert dead.error_type == "RuntimeError"
    assert dead.attempts == 3
    assert dead.consumer_group == "feedback"
    assert recorder.outcomes[(TOPIC, "failed")] == 3
    assert recorder.outcomes[(TOPIC, "dead_lettered")] == 1
    # the DLQ record also carries the story in headers, for tools that do not parse protobuf
    reader = bus.subscribe("dlq-headers", [dlq_topic(TOPIC)])
    (record,) = reader.poll(0.01)
    assert record.headers["riffloop-attempts"] == "3"
    assert record.headers["riffloop-original-offset"] == str(published.offset)
    assert "division by zero" in record.headers["riffloop-error"]


@pytest.mark.parametrize("error", [ValidationError("stars out of range"), PermanentError("gone")])
def test_non_retryable_errors_are_dead_lettered_at_once(
    bus: MemoryEventBus, kv: MemoryKeyValueStore, error: Exception
) -> None:
    calls: list[int] = []

    def handler(delivery: Delivery) -> None:
        calls.append(delivery.attempt)
        raise error

    consumer = make(bus, kv, handler, max_attempts=5)
    bus.publish(TOPIC, "t1", rating("t1", 9))
    consumer.run_once()
    assert calls == [1]
    (dead,) = dead_letters(bus)
    assert dead.attempts == 1
    assert dead.error == error.args[0]


def test_bytes_that_are_not_an_envelope_are_dead_lettered(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    calls: list[Delivery] = []
    recorder = Recorder()
    consumer = make(bus, kv, calls.append, recorder)
    bus.publish_raw(TOPIC, "t1", b"\xff\xfe definitely not protobuf")
    bus.publish(TOPIC, "t9", new_envelope("gateway", events_pb2.TrackScored(track_id="t9")))
    bus.publish(TOPIC, "t2", rating("t2", 4))
    assert consumer.run_once() == 3
    assert [d.envelope.feedback_received.track_id for d in calls] == ["t2"]
    first, second = dead_letters(bus)
    assert first.original_value == b"\xff\xfe definitely not protobuf"
    assert "not a riffloop.v1.Envelope" in first.error
    assert "expected feedback_received" in second.error  # a payload on the wrong topic
    assert recorder.outcomes[(TOPIC, "dead_lettered")] == 2


def test_crash_after_the_effect_redelivers_and_counts_once(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    """Process 1 applies the rating, then dies before marking or committing; process 2 re-runs
    the handler (at-least-once) and apply_once keeps the aggregate exact."""
    effect = count_rating(kv)
    calls: list[int] = []

    def dies_after_effect(delivery: Delivery) -> None:
        calls.append(1)
        effect(delivery)
        raise ProcessDied

    bus.publish(TOPIC, "t1", rating("t1", 4))
    first = make(bus, kv, dies_after_effect)
    with pytest.raises(ProcessDied):
        first.run_once()
    first.close()  # the dead process's session ends; nothing was committed

    def counting(delivery: Delivery) -> None:
        calls.append(2)
        effect(delivery)

    second = make(bus, kv, counting)
    assert second.run_once() == 1
    assert calls == [1, 2]  # delivered again
    assert kv.hgetall("track:t1") == {"sum": "4.0", "n": "1.0"}  # counted once
    assert make(bus, kv, counting).run_once() == 0  # and now committed


def test_an_event_that_kills_every_process_is_dead_lettered(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    def crash(delivery: Delivery) -> None:
        raise ProcessDied

    bus.publish(TOPIC, "t1", rating("t1", 4))
    for _ in range(3):
        process = make(bus, kv, crash, max_attempts=3)
        with pytest.raises(ProcessDied):
            process.run_once()
        process.close()
    calls: list[Delivery] = []
    survivor = make(bus, kv, calls.append, max_attempts=3)
    assert survivor.run_once() == 1
    assert calls == []  # not tried a fourth time
    (dead,) = dead_letters(bus)
    assert dead.attempts == 3
    assert "died while handling" in dead.error


def test_stop_finishes_the_in_flight_event_and_commits_it(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    started, release = threading.Event(), threading.Event()
    handled: list[str] = []

    def slow(delivery: Delivery) -> None:
        started.set()
        release.wait(10)
        handled.append(delivery.envelope.feedback_received.track_id)

    for track in ("t1", "t2", "t3"):
        bus.publish(TOPIC, "same-key", rating(track, 3))
    consumer = make(bus, kv, slow)
    runner = threading.Thread(target=consumer.run)
    runner.start()
    assert started.wait(10)
    consumer.stop()
    release.set()
    runner.join(10)
    assert not runner.is_alive()
    assert handled == ["t1"]  # the in-flight one finished; the rest were not started
    rest: list[str] = []
    successor = make(bus, kv, lambda d: rest.append(d.envelope.feedback_received.track_id))
    successor.run_once()
    assert rest == ["t2", "t3"]  # t1 was committed; t2, t3 were handed on


def test_stop_during_back_off_leaves_the_event_for_the_next_owner(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    failing = threading.Event()

    def fails(delivery: Delivery) -> None:
        failing.set()
        raise TransientError("s3 down")

    consumer = make(bus, kv, fails, retry_backoff_s=30.0)
    bus.publish(TOPIC, "t1", rating("t1", 2))
    runner = threading.Thread(target=consumer.run)
    runner.start()
    assert failing.wait(10)
    consumer.stop()
    runner.join(10)
    assert not runner.is_alive()
    assert dead_letters(bus) == []
    later: list[Delivery] = []
    make(bus, kv, later.append).run_once()
    assert [d.attempt for d in later] == [2]  # the earlier try still counts


def test_bookkeeping_outage_rewinds_instead_of_skipping(bus: MemoryEventBus) -> None:
    """If Redis fails mid-record, the consumer rejoins and gets the same record again."""

    class FlakyKV(MemoryKeyValueStore):
        failures = 1

        def set(self, key: str, value: str, *, ttl_s: float | None = None) -> None:
            if self.failures:
                self.failures -= 1
                raise TransientError("redis: connection reset")
            super().set(key, value, ttl_s=ttl_s)

    handled: list[str] = []
    consumer = make(bus, FlakyKV(), lambda d: handled.append(d.event_id))
    envelope = rating("t1", 5)
    bus.publish(TOPIC, "t1", envelope)
    assert consumer.run_once() == 0  # the outage: nothing finished
    assert consumer.run_once() == 1
    assert handled == [envelope.event_id]


def test_constructor_validates() -> None:
    bus, kv = MemoryEventBus(), MemoryKeyValueStore()
    with pytest.raises(ValidationError):
        Consumer(bus, kv, group="g", topics=[], handler=lambda d: None)
    with pytest.raises(ValidationError):
        Consumer(bus, kv, group="g", topics=[TOPIC], handler=lambda d: None, max_attempts=0)
    with pytest.raises(ValidationError):
        Consumer(bus, kv, group="bad group", topics=[TOPIC], handler=lambda d: None)


def test_outcome_values_match_the_metric_labels() -> None:
    assert {o.value for o in Outcome} == {
        "handled",
        "duplicate",
        "failed",
        "dead_lettered",
        "partly_dead_lettered",
    }


def test_dead_letters_replay_after_the_fix(bus: MemoryEventBus, kv: MemoryKeyValueStore) -> None:
    """The runbook's replay: fix the cause, republish the DLQ, each event is handled once."""
    fixed = threading.Event()
    effect = count_rating(kv)

    def handler(delivery: Delivery) -> None:
        if delivery.envelope.feedback_received.track_id == "t1" and not fixed.is_set():
            raise RuntimeError("bug in release 1.2")
        effect(delivery)

    recorder = Recorder()
    consumer = make(bus, kv, handler, recorder, max_attempts=2)
    lost = rating("t1", 5)
    bus.publish(TOPIC, "t1", lost)
    bus.publish(TOPIC, "t2", rating("t2", 3))
    consumer.run_once()
    assert kv.hgetall("track:t1") == {}
    assert recorder.outcomes[(TOPIC, "dead_lettered")] == 1

    fixed.set()  # the fix is deployed
    assert replay_dead_letters(bus, TOPIC, idle_timeout_s=0.01) == 1
    assert replay_dead_letters(bus, TOPIC, idle_timeout_s=0.01) == 0  # the replay committed
    consumer.run_once()
    assert kv.hgetall("track:t1") == {"sum": "5.0", "n": "1.0"}
    assert kv.hgetall("track:t2") == {"sum": "3.0", "n": "1.0"}
    assert recorder.outcomes[(TOPIC, "handled")] == 2


def test_replaying_an_already_handled_event_is_a_duplicate(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    seen: list[Delivery] = []
    recorder = Recorder()
    consumer = make(bus, kv, seen.append, recorder)
    handled = rating("t1", 4)
    bus.publish(TOPIC, "t1", handled)
    consumer.run_once()
    # a dead letter of the same event (e.g. written by a second, crashed consumer group member)
    dead = events_pb2.DeadLetter(
        original_topic=TOPIC, original_key="t1", original_value=handled.SerializeToString()
    )
    bus.publish(dlq_topic(TOPIC), "t1", new_envelope("feedback", dead))
    assert replay_dead_letters(bus, TOPIC, idle_timeout_s=0.01) == 1
    consumer.run_once()
    assert len(seen) == 1
    assert recorder.outcomes[(TOPIC, "duplicate")] == 1


def test_a_batch_handler_dead_letters_only_the_items_it_refused(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    """ItemsRefused: the good items are kept and the record counts as handled; the DLQ gets an
    envelope of the refused items alone (id ``<original>.refused``), which a replay after the
    fix re-runs without re-running the good ones."""
    fixed = threading.Event()
    applied: list[tuple[str, str]] = []  # (event id, track)

    def handler(delivery: Delivery) -> None:
        items = delivery.envelope.feedback_batch.items
        bad = [i for i in items if i.rating.stars > 5 and not fixed.is_set()]
        applied.extend((delivery.event_id, i.track_id) for i in items if i not in bad)
        if bad:
            raise ItemsRefused(
                f"{len(bad)} items over 5 stars",
                refused_items_envelope(delivery.envelope, "feedback_batch", bad),
            )

    def item(track: str, stars: int) -> events_pb2.FeedbackReceived:
        return events_pb2.FeedbackReceived(
            user_id="u1", track_id=track, rating=events_pb2.TrackRating(stars=stars)
        )

    batch = new_envelope(
        "gateway", events_pb2.FeedbackBatch(items=[item("t1", 4), item("t2", 9), item("t3", 2)])
    )
    recorder = Recorder()
    consumer = make(bus, kv, handler, recorder)
    bus.publish(TOPIC, "u1", batch)
    assert consumer.run_once() == 1
    assert applied == [(batch.event_id, "t1"), (batch.event_id, "t3")]
    assert recorder.outcomes == {(TOPIC, "partly_dead_lettered"): 1}  # one record, once
    [dead] = dead_letters(bus)
    assert dead.original_event_id == f"{batch.event_id}.refused"
    assert dead.error_type == "ItemsRefused" and "over 5 stars" in dead.error
    rest = decode_envelope(dead.original_value, TOPIC)
    assert [i.track_id for i in rest.feedback_batch.items] == ["t2"]
    assert rest.occurred_at == batch.occurred_at and rest.producer == batch.producer

    bus.publish(TOPIC, "u1", batch)  # a redelivery of the original: handled already
    consumer.run_once()
    assert len(applied) == 2
    fixed.set()
    assert replay_dead_letters(bus, TOPIC, idle_timeout_s=0.01) == 1
    consumer.run_once()
    assert applied[2:] == [(f"{batch.event_id}.refused", "t2")]  # only the refused item ran


def test_a_handler_interrupted_by_a_drain_leaves_its_record_for_the_next_owner(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    """Interrupted (SIGTERM mid-training): not dead-lettered, not committed, the try not
    counted — even after earlier crashes — and the next owner handles the record from scratch."""
    seen: list[int] = []

    def draining(delivery: Delivery) -> None:
        seen.append(delivery.attempt)
        raise Interrupted("stopping")

    recorder = Recorder()
    consumer = make(bus, kv, draining, recorder)
    bus.publish(TOPIC, "t1", rating("t1", 5))
    assert consumer.run_once() == 0 and consumer.stopping
    assert seen == [1] and dead_letters(bus) == []
    assert recorder.outcomes == {}
    consumer.close()
    for _ in range(5):  # more drains than max_attempts: still never dead-lettered
        again = make(bus, kv, draining)
        again.run_once()
        again.close()
    assert seen == [1] * 6 and dead_letters(bus) == []
    effect: list[Delivery] = []
    last = make(bus, kv, effect.append)
    assert last.run_once() == 1 and effect[0].attempt == 1


def test_a_record_of_a_dead_letter_topic_has_no_further_dead_letter_topic(caplog) -> None:
    """The gateway reads generation.requested.v1.dlq; a record it cannot handle is logged and
    skipped (it stays in that DLQ), not sent to a ``.dlq.dlq`` that does not exist."""
    from riffloop.core import MemoryEventBus, ValidationError, all_topics, publish_dead_letter

    bus = MemoryEventBus()
    bus.ensure_topics(all_topics(), partitions=1)
    seen = bus.subscribe("watcher", ["generation.requested.v1.dlq"])
    publish_dead_letter(
        bus,
        group="gateway",
        topic="generation.requested.v1.dlq",
        key="k",
        value=b"\x00not an envelope",
        event_id="",
        error=ValidationError("message is not a riffloop.v1.Envelope"),
        attempts=1,
    )
    assert seen.poll(0.1, 10) == []
    assert "skipped generation.requested.v1.dlq" in caplog.text


def test_events_made_while_handling_carry_the_correlation_id_and_logs_the_ids(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    """A chain of events keeps the id of what started it: an event made inside a call carries
    the call's id, one made while handling an event carries that event's correlation id (or
    its event id, when it has none); the JSON log lines of the handler name both ids."""
    import json
    import logging

    from riffloop.core._context import correlated
    from riffloop.runtime._logging import JsonFormatter

    with correlated("req-42"):
        started = rating("t1", 4)
    assert started.correlation_id == "req-42" and rating("t2", 3).correlation_id == ""
    made: list[events_pb2.Envelope] = []
    lines: list[str] = []
    formatter = JsonFormatter("test")

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(formatter.format(record))

    def handle(delivery: Delivery) -> None:
        logging.getLogger("riffloop.test").warning("handling")
        made.append(new_envelope("feedback", events_pb2.TrackScored(track_id="t")))

    capture = Capture()
    logging.getLogger("riffloop.test").addHandler(capture)
    try:
        consumer = make(bus, kv, handle)
        uncorrelated = rating("t2", 3)
        bus.publish(TOPIC, "t1", started)
        bus.publish(TOPIC, "t2", uncorrelated)
        assert consumer.run_once() == 2
    finally:
        logging.getLogger("riffloop.test").removeHandler(capture)
    assert [m.correlation_id for m in made] == ["req-42", uncorrelated.event_id]
    logged = [json.loads(line) for line in lines]
    assert [(e["event_id"], e["correlation_id"]) for e in logged] == [
        (started.event_id, "req-42"),
        (uncorrelated.event_id, uncorrelated.event_id),
    ]
    assert new_envelope("x", events_pb2.TrackScored(track_id="t")).correlation_id == ""  # after


# -- batch handlers -------------------------------------------------------------------------------

OTHER = Topic.TRACKS_READY.value


def make_batched(
    bus: MemoryEventBus,
    kv: KeyValueStore,
    batch: Callable[[list[Delivery]], BatchResult | None],
    recorder: Recorder | None = None,
    *,
    other: Callable[[Delivery], None] | None = None,
    max_batch: int = 16,
    retry_backoff_s: float = 0.0,
) -> Consumer:
    """TOPIC through ``batch``; OTHER (when ``other`` is given) record by record."""
    bus.ensure_topics([OTHER, dlq_topic(OTHER)])

    def per_record(delivery: Delivery) -> None:
        assert other is not None and delivery.message.topic == OTHER
        other(delivery)

    return Consumer(
        bus,
        kv,
        group="feedback",
        topics=[TOPIC, OTHER] if other else [TOPIC],
        handler=per_record,
        batch_handlers={TOPIC: lambda ds: batch(list(ds))},
        max_batch=max_batch,
        retry_backoff_s=retry_backoff_s,
        poll_timeout_s=0.01,
        lag_interval_s=0.0,
        hooks=recorder.hooks if recorder else None,
    )


def tracks(deliveries: list[Delivery]) -> list[str]:
    return [d.envelope.feedback_received.track_id for d in deliveries]


def tries(deliveries: list[Delivery]) -> list[tuple[str, int]]:
    return [(d.envelope.feedback_received.track_id, d.attempt) for d in deliveries]


def test_a_batch_handler_gets_its_topics_records_of_one_poll_in_order_up_to_max_batch(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    calls: list[list[str]] = []
    others: list[str] = []
    recorder = Recorder()
    consumer = make_batched(
        bus,
        kv,
        lambda ds: calls.append(tracks(ds)),
        recorder,
        other=lambda d: others.append(d.event_id),
        max_batch=2,
    )
    ready = new_envelope("generator", events_pb2.TrackReady(track_id="x"))
    for i in range(5):
        bus.publish(TOPIC, "one-partition", rating(f"t{i}", 3))
        if i == 1:
            bus.publish(OTHER, "x", ready)
    assert consumer.run_once() == 6
    assert calls == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert others == [ready.event_id]  # the other topic's record, on its own
    assert recorder.outcomes == {(TOPIC, "handled"): 5, (OTHER, "handled"): 1}
    consumer.close()
    again = make_batched(bus, kv, lambda ds: calls.append(tracks(ds)), other=others.append)
    assert again.run_once() == 0  # all committed
    assert len(calls) == 3


def test_a_batch_skips_handled_events_and_an_event_twice_in_one_poll(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    calls: list[list[str]] = []
    old, new = rating("t-old", 3), rating("t-new", 4)
    bus.publish(TOPIC, "k", old)
    first = make_batched(bus, kv, lambda ds: calls.append(tracks(ds)))
    first.run_once()
    recorder = Recorder()
    for envelope in (old, new, new):  # a redelivery, then one event published twice
        bus.publish(TOPIC, "k", envelope)
    make_batched(bus, kv, lambda ds: calls.append(tracks(ds)), recorder).run_once()
    assert calls == [["t-old"], ["t-new"]]
    assert recorder.outcomes == {(TOPIC, "duplicate"): 2, (TOPIC, "handled"): 1}


def test_a_failed_item_is_retried_or_dead_lettered_alone(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    """t1 is invalid (dead-lettered at once, with its reason), t2 fails once (retried alone),
    t0 and t3 are handled by the first call."""
    calls: list[list[tuple[str, int]]] = []

    def batch(deliveries: list[Delivery]) -> BatchResult:
        calls.append([(t, d.attempt) for t, d in zip(tracks(deliveries), deliveries, strict=True)])
        failed: dict[str, BaseException] = {}
        for track, delivery in zip(tracks(deliveries), deliveries, strict=True):
            if track == "t1":
                failed[delivery.event_id] = ValidationError("t1: stars out of range")
            elif track == "t2" and delivery.attempt == 1:
                failed[delivery.event_id] = TransientError("s3 down")
        return BatchResult(failed)

    recorder = Recorder()
    consumer = make_batched(bus, kv, batch, recorder)
    sent = [rating(f"t{i}", 3) for i in range(4)]
    for envelope in sent:
        bus.publish(TOPIC, "k", envelope)
    assert consumer.run_once() == 4
    assert calls == [[("t0", 1), ("t1", 1), ("t2", 1), ("t3", 1)], [("t2", 2)]]
    [dead] = dead_letters(bus)
    assert dead.original_event_id == sent[1].event_id
    assert dead.error == "t1: stars out of range" and dead.error_type == "ValidationError"
    assert decode_envelope(dead.original_value, TOPIC) == sent[1]
    assert recorder.outcomes == {
        (TOPIC, "handled"): 3,
        (TOPIC, "failed"): 2,
        (TOPIC, "dead_lettered"): 1,
    }
    consumer.close()
    assert make_batched(bus, kv, batch).run_once() == 0


def test_an_exception_out_of_the_batch_handler_fails_every_item(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    def batch(deliveries: list[Delivery]) -> None:
        raise RuntimeError("model not loaded")

    recorder = Recorder()
    for i in range(2):
        bus.publish(TOPIC, "k", rating(f"t{i}", 3))
    make_batched(bus, kv, batch, recorder).run_once()
    assert sorted(d.attempts for d in dead_letters(bus)) == [3, 3]
    assert recorder.outcomes == {(TOPIC, "failed"): 6, (TOPIC, "dead_lettered"): 2}


def test_a_stop_during_a_batch_retry_commits_only_the_finished_prefix(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    """t1 fails and waits for its retry; t0 and t2 were handled. Stopping leaves t1 for the next
    owner: the commit stops before t1, so t2 comes back too and is skipped as handled."""
    failing = threading.Event()
    handled: list[str] = []

    def batch(deliveries: list[Delivery]) -> BatchResult:
        failed: dict[str, BaseException] = {}
        for track, delivery in zip(tracks(deliveries), deliveries, strict=True):
            if track == "t1":
                failed[delivery.event_id] = TransientError("s3 down")
            else:
                handled.append(track)
        failing.set()
        return BatchResult(failed)

    for i in range(3):
        bus.publish(TOPIC, "one-partition", rating(f"t{i}", 3))
    consumer = make_batched(bus, kv, batch, retry_backoff_s=30.0)
    runner = threading.Thread(target=consumer.run)
    runner.start()
    assert failing.wait(10)
    consumer.stop()
    runner.join(10)
    assert not runner.is_alive()
    assert handled == ["t0", "t2"] and dead_letters(bus) == []
    later: list[tuple[str, int]] = []
    recorder = Recorder()
    successor = make_batched(
        bus,
        kv,
        lambda ds: later.extend((d.envelope.feedback_received.track_id, d.attempt) for d in ds),
        recorder,
    )
    assert successor.run_once() == 2
    assert later == [("t1", 2)]  # the earlier try still counts
    assert recorder.outcomes == {(TOPIC, "duplicate"): 1, (TOPIC, "handled"): 1}


def test_an_interrupted_batch_is_left_for_the_next_owner(
    bus: MemoryEventBus, kv: MemoryKeyValueStore
) -> None:
    def batch(deliveries: list[Delivery]) -> None:
        raise Interrupted("draining")

    for i in range(2):
        bus.publish(TOPIC, "k", rating(f"t{i}", 3))
    consumer = make_batched(bus, kv, batch)
    assert consumer.run_once() == 0
    assert consumer.stopping and dead_letters(bus) == []
    later: list[tuple[str, int]] = []
    make_batched(bus, kv, lambda ds: later.extend(tries(ds))).run_once()
    assert later == [("t0", 1), ("t1", 1)]  # the interrupted try did not count


def test_batch_options_are_validated(bus: MemoryEventBus, kv: MemoryKeyValueStore) -> None:
    with pytest.raises(ValidationError, match="max_batch"):
        make_batched(bus, kv, lambda ds: None, max_batch=0)
    with pytest.raises(ValidationError, match="not consumed"):
        Consumer(bus, kv, group="g", topics=[OTHER], handler=print, batch_handlers={TOPIC: print})
    with pytest.raises(ValidationError, match="event ids to exceptions"):
        BatchResult({"e1": "not an exception"})  # type: ignore[dict-item]

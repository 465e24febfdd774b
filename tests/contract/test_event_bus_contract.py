"""The EventBus contract, run against every adapter (in-process, Kafka)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from riffloop.core import (
    Message,
    NotFoundError,
    Subscription,
    ValidationError,
    decode_envelope,
    new_envelope,
    partition_for,
)
from riffloop.v1 import events_pb2
from tests.contract.adapters import BusUnderTest, fresh_name

pytestmark = pytest.mark.contract


def drain(subscription: Subscription, count: int, timeout_s: float = 30.0) -> list[Message]:
    """Poll until ``count`` records arrived (or fail after timeout_s)."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got.extend(subscription.poll(0.5, max_records=count - len(got)))
    assert len(got) == count, f"expected {count} records, got {len(got)}"
    return got


def nothing_more(subscription: Subscription, wait_s: float) -> bool:
    return subscription.poll(wait_s) == []


def scored(track_id: str, mean: float) -> events_pb2.Envelope:
    payload = events_pb2.TrackScored(track_id=track_id, mean_rating=mean, rating_count=3)
    return new_envelope("contract-test", payload)


class TestEventBusContract:
    def test_publish_to_missing_topic_is_not_found(self, event_bus: BusUnderTest) -> None:
        with pytest.raises(NotFoundError):
            event_bus.bus.publish_raw(fresh_name("missing"), "k", b"v")
        with pytest.raises(NotFoundError):
            event_bus.bus.subscribe(fresh_name("g"), [fresh_name("missing")])

    def test_ensure_topics_is_idempotent(self, event_bus: BusUnderTest) -> None:
        topic = event_bus.topic()
        event_bus.bus.ensure_topics([topic], partitions=3)
        assert event_bus.bus.topic_exists(topic)
        assert not event_bus.bus.topic_exists(fresh_name("never"))

    def test_bad_names_are_validation_errors(self, event_bus: BusUnderTest) -> None:
        with pytest.raises(ValidationError):
            event_bus.bus.ensure_topics(["bad topic!"])
        topic = event_bus.topic()
        with pytest.raises(ValidationError):
            event_bus.bus.publish_raw(topic, "", b"no key")
        with pytest.raises(ValidationError):
            event_bus.bus.subscribe("bad group!", [topic])

    def test_envelopes_roundtrip_with_key_and_headers(self, event_bus: BusUnderTest) -> None:
        topic = event_bus.topic()
        envelope = scored("track-1", 4.5)
        published = event_bus.bus.publish(topic, "track-1", envelope, {"trace": "abc"})
        assert published.topic == topic
        subscription = event_bus.make_bus().subscribe(fresh_name("g"), [topic])
        try:
            (message,) = drain(subscription, 1)
        finally:
            subscription.close()
        assert (message.topic, message.partition, message.offset) == (
            topic,
            published.partition,
            published.offset,
        )
        assert message.key == "track-1"
        assert message.headers["trace"] == "abc"
        decoded = decode_envelope(message.value, topic)
        assert decoded == envelope
        assert decoded.track_scored.mean_rating == 4.5

    def test_order_holds_per_key(self, event_bus: BusUnderTest) -> None:
        topic = event_bus.topic()
        keys = [f"track-{i}" for i in range(4)]
        for n in range(5):
            for key in keys:
                event_bus.bus.publish_raw(topic, key, f"{key}:{n}".encode())
        subscription = event_bus.bus.subscribe(fresh_name("g"), [topic])
        try:
            records = drain(subscription, 20)
        finally:
            subscription.close()
        for key in keys:
            mine = [r for r in records if r.key == key]
            assert [r.value for r in mine] == [f"{key}:{n}".encode() for n in range(5)]
            assert len({r.partition for r in mine}) == 1  # one key, one partition
        if not event_bus.real:  # our memory partitioner is documented; Kafka uses murmur2
            assert all(r.partition == partition_for(r.key, 3) for r in records)

    def test_uncommitted_records_are_delivered_again(self, event_bus: BusUnderTest) -> None:
        """At-least-once: a member that leaves without committing hands its records on."""
        topic = event_bus.topic(partitions=1)
        group = fresh_name("g")
        for i in range(3):
            event_bus.bus.publish_raw(topic, "song-1", str(i).encode())
        first = event_bus.make_bus().subscribe(group, [topic])
        records = drain(first, 3)
        first.commit(records[0])  # only the first is done
        first.close()
        second = event_bus.make_bus().subscribe(group, [topic])
        try:
            again = drain(second, 2)
            assert [r.value for r in again] == [b"1", b"2"]
            second.commit(again[-1])
            assert nothing_more(second, 1.0)
        finally:
            second.close()
        third = event_bus.make_bus().subscribe(group, [topic])
        try:
            assert nothing_more(third, 3.0 if event_bus.real else 0.1)
        finally:
            third.close()

    def test_every_group_gets_every_record(self, event_bus: BusUnderTest) -> None:
        topic = event_bus.topic()
        for i in range(6):
            event_bus.bus.publish_raw(topic, f"k{i}", b"x")
        for group in (fresh_name("encoder"), fresh_name("selector")):
            subscription = event_bus.bus.subscribe(group, [topic])
            try:
                assert len(drain(subscription, 6)) == 6
            finally:
                subscription.close()

    def test_lag_counts_uncommitted_records(self, event_bus: BusUnderTest) -> None:
        topic = event_bus.topic(partitions=1)
        for i in range(5):
            event_bus.bus.publish_raw(topic, "model-v1", str(i).encode())
        subscription = event_bus.bus.subscribe(fresh_name("g"), [topic])
        try:
            records = drain(subscription, 5)
            subscription.commit(records[1])
            assert subscription.lag() == {topic: 3}
            subscription.commit(records[4])
            assert subscription.lag() == {topic: 0}
        finally:
            subscription.close()

    def test_replay_reads_every_record_to_the_end_outside_any_group(
        self, event_bus: BusUnderTest
    ) -> None:
        """A rebuild's read: every record from the first, in order per key, up to the end as of
        the call; twice gives the same; a group's committed offsets do not move it (nor it them)."""
        topic = event_bus.topic(partitions=3)
        sent = [(f"track-{i % 4}", f"{i}".encode()) for i in range(12)]
        for key, value in sent:
            event_bus.bus.publish_raw(topic, key, value)
        group = fresh_name("g")
        subscription = event_bus.make_bus().subscribe(group, [topic])
        try:
            records = drain(subscription, 12)
            for record in records:
                subscription.commit(record)
            replayed = list(event_bus.make_bus().replay(topic))
            again = list(event_bus.bus.replay(topic))
            assert subscription.lag() == {topic: 0}
        finally:
            subscription.close()
        assert sorted((m.key, m.value) for m in replayed) == sorted(sent)
        assert [(m.key, m.value) for m in again] == [(m.key, m.value) for m in replayed]
        for key in {k for k, _ in sent}:  # per key, in the order published
            assert [m.value for m in replayed if m.key == key] == [v for k, v in sent if k == key]
        later = event_bus.bus.replay(topic)
        event_bus.bus.publish_raw(topic, "track-9", b"after the call")
        assert len(list(later)) == 12
        assert list(event_bus.bus.replay(event_bus.topic())) == []
        with pytest.raises(NotFoundError):
            event_bus.bus.replay(fresh_name("missing"))

    def test_members_of_a_group_share_the_partitions(self, event_bus: BusUnderTest) -> None:
        topic = event_bus.topic(partitions=3)
        group = fresh_name("g")
        members = [event_bus.make_bus().subscribe(group, [topic]) for _ in range(2)]
        received: list[list[Message]] = [[], []]
        stop = threading.Event()
        errors: list[BaseException] = []

        def run(index: int) -> None:
            try:
                while not stop.is_set():
                    for record in members[index].poll(0.2):
                        received[index].append(record)
                        members[index].commit(record)
            except BaseException as exc:  # surfaced by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        try:
            # 1. wait for a settled split: disjoint, non-empty, covering all three partitions
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and not errors:
                owned = [m.assignment() for m in members]
                if all(owned) and not owned[0] & owned[1] and len(owned[0] | owned[1]) == 3:
                    break
                time.sleep(0.2)
            else:
                pytest.fail(f"the group never split its partitions: {owned} {errors}")
            # 2. publish; every record reaches exactly the member owning its partition
            keys = [f"track-{uuid.uuid4().hex[:6]}" for _ in range(30)]
            for key in keys:
                event_bus.bus.publish_raw(topic, key, key.encode())
            deadline = time.monotonic() + 30
            while (
                len({r.key for r in received[0] + received[1]}) < 30 and time.monotonic() < deadline
            ):
                time.sleep(0.1)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            for m in members:
                m.close()
        assert not errors
        everything = received[0] + received[1]
        assert {r.key for r in everything} == set(keys)  # at least once
        assert received[0] and received[1]
        if len(everything) == len(keys):
            # No rebalance happened meanwhile (a starved heartbeat can cause one, and then
            # redeliveries are allowed): each partition was read by exactly one member.
            assert not {r.partition for r in received[0]} & {r.partition for r in received[1]}


@pytest.mark.integration
def test_two_topic_prefixes_share_a_broker_and_a_group_name(real_infra: object) -> None:
    """Two deployments on one Kafka, each with its own prefix: the same consumer group name in
    each gets all of its own deployment's events and none of the other's."""
    from riffloop.core import KafkaEventBus

    bootstrap = real_infra.kafka_bootstrap  # type: ignore[attr-defined]
    run = uuid.uuid4().hex[:6]
    buses = {
        name: KafkaEventBus(
            bootstrap, client_id=name, session_timeout_ms=10_000, topic_prefix=f"{run}-{name}."
        )
        for name in ("a", "b")
    }
    try:
        subscriptions = {}
        for name, bus in buses.items():
            bus.ensure_topics(["songs.uploaded.v1"], partitions=3)
            subscriptions[name] = bus.subscribe("encoder", ["songs.uploaded.v1"])
        for name, bus in buses.items():
            for i in range(6):
                bus.publish("songs.uploaded.v1", f"{name}-{i}", scored(f"{name}-{i}", 3.0))
        for name, subscription in subscriptions.items():
            keys: set[str] = set()
            deadline = time.monotonic() + 60
            while len(keys) < 6 and time.monotonic() < deadline:
                keys |= {m.key for m in subscription.poll(1.0, max_records=100)}
            assert keys == {f"{name}-{i}" for i in range(6)}
            subscription.close()
    finally:
        for bus in buses.values():
            bus.close()

"""``RIFFLOOP_KAFKA_TOPIC_PREFIX``: deployments sharing one Kafka cluster never see each other's
events, and callers only ever see the logical topic names."""

from __future__ import annotations

import pytest

from riffloop.core import (
    ConfigurationError,
    KafkaEventBus,
    NotFoundError,
    Settings,
    new_envelope,
)
from riffloop.v1 import events_pb2

pytestmark = [pytest.mark.integration]


def _rating(track: str) -> events_pb2.Envelope:
    return new_envelope(
        "test",
        events_pb2.FeedbackReceived(
            user_id="u", track_id=track, rating=events_pb2.TrackRating(stars=3)
        ),
    )


def test_prefixed_buses_are_isolated_and_speak_logical_names(real_infra, unique_name) -> None:
    topic = "feedback.received.v1"
    a = KafkaEventBus(real_infra.kafka_bootstrap, topic_prefix=unique_name("a") + ".")
    b = KafkaEventBus(real_infra.kafka_bootstrap, topic_prefix=unique_name("b") + ".")
    try:
        with pytest.raises(NotFoundError):  # a prefix's topics exist only once created
            a.publish(topic, "k", _rating("t-none"))
        for bus in (a, b):
            bus.ensure_topics([topic], partitions=1)
        a.publish(topic, "k", _rating("t-a"))
        b.publish(topic, "k", _rating("t-b"))
        seen = {}
        for name, bus in (("a", a), ("b", b)):
            sub = bus.subscribe(unique_name("g"), [topic])
            messages = sub.poll(15.0, 10)
            assert [m.topic for m in messages] == [topic]  # the logical name, prefix stripped
            assert sub.assignment() == {(topic, 0)}
            sub.commit(messages[-1])
            assert sub.lag() == {topic: 0}
            seen[name] = [m.value for m in messages]
            sub.close()
        assert seen["a"] != seen["b"]
    finally:
        a.close()
        b.close()


def test_prefix_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="KAFKA_TOPIC_PREFIX"):
        Settings.from_env({"RIFFLOOP_KAFKA_TOPIC_PREFIX": "bad prefix!"})

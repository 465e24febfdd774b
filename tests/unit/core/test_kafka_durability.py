"""Publish outcomes and topic durability, without a broker: the producer settles a record's fate
inside one publish timeout (shorter than a client's deadline), created topics carry
min.insync.replicas, and dead-letter topics an explicit retention."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from riffloop.client import GatewayClient
from riffloop.core import (
    ConfigurationError,
    KafkaEventBus,
    Settings,
    ValidationError,
    all_topics,
    dlq_topic,
    durability_config,
)
from riffloop.core._kafka_event_bus import producer_timeouts

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[3]
DAY_S = 24 * 3600


@pytest.mark.parametrize(
    ("publish_timeout_s", "linger_ms"), [(1.0, 0), (5.0, 0), (5.0, 50), (15.0, 1000), (60.0, 0)]
)
def test_the_producer_gives_a_record_up_before_publish_stops_waiting(
    publish_timeout_s: float, linger_ms: int
) -> None:
    from kafka.producer.record_accumulator import RecordAccumulator

    timeouts = producer_timeouts(publish_timeout_s, linger_ms)
    total_ms = publish_timeout_s * 1000
    # the metadata wait, then the delivery timeout, then a tenth of P for the IO thread to
    # report the failure: all before publish (future.get(P)) stops waiting
    assert timeouts["max_block_ms"] + timeouts["delivery_timeout_ms"] <= 0.9 * total_ms
    assert timeouts["request_timeout_ms"] >= 500
    # kafka-python's own rule (delivery ≥ linger + request timeout), checked by its accumulator
    RecordAccumulator(linger_ms=linger_ms, **timeouts)


def test_a_linger_that_leaves_no_time_for_a_request_is_refused() -> None:
    with pytest.raises(ValidationError, match="per produce request"):
        producer_timeouts(1.0, 300)
    with pytest.raises(ConfigurationError, match="RIFFLOOP_KAFKA_PUBLISH_TIMEOUT_S"):
        Settings(kafka_publish_timeout_s=1.0, kafka_linger_ms=300)


def test_the_default_publish_timeout_fits_inside_the_clients_default_deadline() -> None:
    """A client that gets its answer before its deadline never has to guess the outcome; one
    that retries after UNAVAILABLE cannot race a late copy of its first try."""
    client_deadline_s = inspect.signature(GatewayClient).parameters["timeout_s"].default
    settings = Settings()
    assert settings.kafka_publish_timeout_s < client_deadline_s
    assert settings.kafka_publish_timeout_s == 5.0  # the producer's own default is 120 s


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"kafka_min_insync_replicas": 2}, "RIFFLOOP_KAFKA_MIN_INSYNC_REPLICAS"),
        ({"kafka_min_insync_replicas": 0}, "RIFFLOOP_KAFKA_MIN_INSYNC_REPLICAS"),
        ({"kafka_dlq_retention_s": 60}, "RIFFLOOP_KAFKA_DLQ_RETENTION_S"),
        ({"kafka_publish_timeout_s": 0.5}, "RIFFLOOP_KAFKA_PUBLISH_TIMEOUT_S"),
        ({"kafka_publish_timeout_s": 121.0}, "RIFFLOOP_KAFKA_PUBLISH_TIMEOUT_S"),
    ],
)
def test_durability_settings_out_of_range_are_refused(
    values: dict[str, float], variable: str
) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        Settings(**values)  # type: ignore[arg-type]


def test_created_topics_get_min_insync_replicas_and_dead_letters_a_retention() -> None:
    for topic in all_topics(with_dlq=False):
        assert durability_config(topic, min_insync_replicas=2, dlq_retention_s=DAY_S) == {
            "min.insync.replicas": "2"
        }
        assert durability_config(
            dlq_topic(topic), min_insync_replicas=2, dlq_retention_s=14 * DAY_S
        ) == {"min.insync.replicas": "2", "retention.ms": str(14 * DAY_S * 1000)}


def test_the_bus_refuses_more_in_sync_copies_than_a_topic_has() -> None:
    with pytest.raises(ValidationError, match="min_insync_replicas"):
        KafkaEventBus("127.0.0.1:9092", replication_factor=1, min_insync_replicas=2)


def test_production_writes_to_two_of_three_copies_and_keeps_dead_letters_14_days() -> None:
    """The overlay's topic settings, read as a service reads them (tests/deploy parses each
    pod's whole environment)."""
    wanted = {
        "RIFFLOOP_KAFKA_REPLICATION_FACTOR",
        "RIFFLOOP_KAFKA_MIN_INSYNC_REPLICAS",
        "RIFFLOOP_KAFKA_DLQ_RETENTION_S",
    }
    env = {}
    path = REPO_ROOT / "deploy/k8s/overlays/production/backends.env"
    for line in path.read_text(encoding="utf-8").splitlines():
        name, _, value = line.partition("=")
        if name.strip() in wanted:
            env[name.strip()] = value.strip()
    assert set(env) == wanted
    settings = Settings.from_env(env)
    assert settings.kafka_replication_factor == 3
    assert settings.kafka_min_insync_replicas == 2
    assert settings.kafka_dlq_retention_s == 14 * DAY_S
    assert Settings().kafka_min_insync_replicas == 1  # the one-broker local stack

"""Topics created on a real broker carry min.insync.replicas, and dead-letter topics an explicit
retention: those the services create (KafkaEventBus.ensure_topics) and those `infra up` creates."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from riffloop.core import KafkaEventBus, Settings, dlq_topic
from riffloop.infra import create_topics, drop_topics

pytestmark = pytest.mark.integration

DAY_MS = 24 * 3600 * 1000


def _overrides(bootstrap: str, topic: str) -> dict[str, str]:
    """The topic's own configs (those not inherited from the broker)."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="durability-test")
    try:
        described = admin.describe_configs([ConfigResource("TOPIC", topic)])
    finally:
        admin.close()
    return {name: str(config["value"]) for name, config in described["topic"][topic].items()}


@pytest.fixture
def prefix(real_infra: Any, unique_name: Callable[[str], str]) -> Iterator[str]:
    name = unique_name("durable") + "."
    yield name
    drop_topics(real_infra.kafka_bootstrap, name)


def test_topics_the_services_create_keep_their_settings(real_infra: Any, prefix: str) -> None:
    bootstrap = real_infra.kafka_bootstrap
    bus = KafkaEventBus(
        bootstrap, topic_prefix=prefix, min_insync_replicas=1, dlq_retention_s=3 * 24 * 3600
    )
    try:
        bus.ensure_topics(["songs.uploaded.v1", dlq_topic("songs.uploaded.v1")], partitions=1)
    finally:
        bus.close()
    topic = _overrides(bootstrap, f"{prefix}songs.uploaded.v1")
    dead = _overrides(bootstrap, f"{prefix}songs.uploaded.v1.dlq")
    assert topic["min.insync.replicas"] == dead["min.insync.replicas"] == "1"
    assert dead["retention.ms"] == str(3 * DAY_MS)
    assert topic.get("retention.ms") != dead["retention.ms"]


def test_topics_infra_up_creates_keep_dead_letters_for_the_default_retention(
    real_infra: Any, prefix: str
) -> None:
    bootstrap = real_infra.kafka_bootstrap
    create_topics(bootstrap, [f"{prefix}t", f"{prefix}t.dlq"], partitions=1)
    dead = _overrides(bootstrap, f"{prefix}t.dlq")
    assert _overrides(bootstrap, f"{prefix}t")["min.insync.replicas"] == "1"
    assert dead["retention.ms"] == str(Settings().kafka_dlq_retention_s * 1000) == str(14 * DAY_MS)

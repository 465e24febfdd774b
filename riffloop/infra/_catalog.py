"""What `up` creates: the topics (defined once, in riffloop.core) and the buckets of
docs/ARCHITECTURE.md."""

from __future__ import annotations

from riffloop.core import Topic
from riffloop.core import all_topics as _core_all_topics

EVENT_TOPICS: tuple[str, ...] = tuple(topic.value for topic in Topic)
TOPIC_PARTITIONS = 3

# docs/ARCHITECTURE.md "Buckets". riffloop.core has no bucket list yet; it belongs there.
BUCKETS: tuple[str, ...] = ("songs", "latents", "tracks", "trainsets", "models")


def all_topics() -> tuple[str, ...]:
    """Every event topic followed by its `<topic>.dlq` twin."""
    return tuple(_core_all_topics(with_dlq=True))

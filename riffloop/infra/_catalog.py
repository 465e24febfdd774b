"""What `up` creates: the topics and buckets of docs/ARCHITECTURE.md.

The topic list belongs in riffloop.core once it defines one; until then it lives here, once.
"""

from __future__ import annotations

# docs/ARCHITECTURE.md "Topics": `<domain>.<event>.v1`, each with a `<topic>.dlq`.
EVENT_TOPICS: tuple[str, ...] = (
    "songs.uploaded.v1",
    "songs.encoded.v1",
    "generation.requested.v1",
    "tracks.ready.v1",
    "feedback.received.v1",
    "tracks.scored.v1",
    "trainset.published.v1",
    "model.published.v1",
)
DEAD_LETTER_SUFFIX = ".dlq"
TOPIC_PARTITIONS = 3

# docs/ARCHITECTURE.md "Buckets".
BUCKETS: tuple[str, ...] = ("songs", "latents", "tracks", "trainsets", "models")


def all_topics() -> tuple[str, ...]:
    """Every event topic followed by its dead-letter topic."""
    return EVENT_TOPICS + tuple(topic + DEAD_LETTER_SUFFIX for topic in EVENT_TOPICS)

"""Local Kafka, S3 (MinIO) and Redis for development and tests.

    python -m riffloop.infra install | up | down | status

`install` fetches or builds each server once per version into the cache folder
(`RIFFLOOP_CACHE`); `up` starts all three on free loopback ports under a state folder and writes
the `RIFFLOOP_*` settings to `<state>/infra.env`. From Python: `LocalInfra(state_dir).start()`.
`standalone_kafka(folder, scram=ScramUser(...))` runs one more broker of its own, e.g. with a
SASL/SCRAM listener, leaving the stack's PLAINTEXT broker as it is.
"""

from riffloop.infra._catalog import BUCKETS, EVENT_TOPICS, all_topics
from riffloop.infra._install import COMPONENTS, install
from riffloop.infra._layout import CacheLayout, InfraError, cache_dir, default_state_dir
from riffloop.infra._local import (
    SERVER_NAMES,
    InfraAddresses,
    LocalInfra,
    ServerStatus,
    create_buckets,
    create_topics,
    drop_topics,
)
from riffloop.infra._servers import REDIS_REQUIREMENTS, ScramUser
from riffloop.infra._standalone import standalone_kafka

__all__ = [
    "BUCKETS",
    "COMPONENTS",
    "EVENT_TOPICS",
    "REDIS_REQUIREMENTS",
    "SERVER_NAMES",
    "CacheLayout",
    "InfraAddresses",
    "InfraError",
    "LocalInfra",
    "ScramUser",
    "ServerStatus",
    "all_topics",
    "cache_dir",
    "create_buckets",
    "create_topics",
    "default_state_dir",
    "drop_topics",
    "install",
    "standalone_kafka",
]

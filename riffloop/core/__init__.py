"""Riffloop core: settings, the error hierarchy, ports and their adapters, envelopes, the consumer.

Ports (constructor-injected everywhere, style rule 4) and adapters:

- ``ObjectStore``: ``MemoryObjectStore``, ``LocalDirObjectStore``, ``S3ObjectStore`` (MinIO / S3)
- ``KeyValueStore``: ``MemoryKeyValueStore``, ``RedisKeyValueStore``
- ``EventBus``: ``MemoryEventBus``, ``KafkaEventBus``

The Kafka, S3 and Redis client libraries are imported only when an adapter is used, so importing
this package stays light (checked by tests/unit/core/test_public_surface.py).
"""

from riffloop.core._consumer import (
    BatchHandler,
    BatchResult,
    Consumer,
    ConsumerHooks,
    Delivery,
    Handler,
    Interrupted,
    ItemsRefused,
    Outcome,
    publish_dead_letter,
    refuse_items,
    refused_items_envelope,
    replay_dead_letters,
)
from riffloop.core._context import handling
from riffloop.core._envelopes import (
    Topic,
    all_topics,
    decode_envelope,
    dlq_topic,
    new_envelope,
    payload_of,
    topic_config,
)
from riffloop.core._errors import (
    ChecksumMismatchError,
    ConfigurationError,
    ConflictError,
    DeadlineExceededError,
    NotFoundError,
    PermanentError,
    PermissionDeniedError,
    RateLimitedError,
    RiffloopError,
    TransientError,
    UnauthenticatedError,
    ValidationError,
)
from riffloop.core._event_bus import (
    EventBus,
    MemoryEventBus,
    Message,
    Published,
    Subscription,
    partition_for,
)
from riffloop.core._kafka_event_bus import (
    KafkaEventBus,
    KafkaSecurity,
    construct_kafka_client,
    durability_config,
)
from riffloop.core._kv_store import KeyValueStore, MemoryKeyValueStore
from riffloop.core._local_object_store import LocalDirObjectStore
from riffloop.core._memory_object_store import MemoryObjectStore
from riffloop.core._object_store import ArtifactPointer, ObjectRef, ObjectStore, sha256_hex
from riffloop.core._redis_kv_store import RedisKeyValueStore
from riffloop.core._s3_object_store import S3ObjectStore
from riffloop.core._settings import Settings, run_main
from riffloop.core._tracing import install_tracing, tracing_enabled, uninstall_tracing

__all__ = [
    "ArtifactPointer",
    "BatchHandler",
    "BatchResult",
    "ChecksumMismatchError",
    "ConfigurationError",
    "ConflictError",
    "Consumer",
    "ConsumerHooks",
    "DeadlineExceededError",
    "Delivery",
    "EventBus",
    "Handler",
    "Interrupted",
    "ItemsRefused",
    "KafkaEventBus",
    "KafkaSecurity",
    "KeyValueStore",
    "LocalDirObjectStore",
    "MemoryEventBus",
    "MemoryKeyValueStore",
    "MemoryObjectStore",
    "Message",
    "NotFoundError",
    "ObjectRef",
    "ObjectStore",
    "Outcome",
    "PermanentError",
    "PermissionDeniedError",
    "Published",
    "RateLimitedError",
    "RedisKeyValueStore",
    "RiffloopError",
    "S3ObjectStore",
    "Settings",
    "Subscription",
    "Topic",
    "TransientError",
    "UnauthenticatedError",
    "ValidationError",
    "all_topics",
    "construct_kafka_client",
    "decode_envelope",
    "dlq_topic",
    "durability_config",
    "handling",
    "install_tracing",
    "new_envelope",
    "partition_for",
    "payload_of",
    "publish_dead_letter",
    "refuse_items",
    "refused_items_envelope",
    "replay_dead_letters",
    "run_main",
    "sha256_hex",
    "topic_config",
    "tracing_enabled",
    "uninstall_tracing",
]

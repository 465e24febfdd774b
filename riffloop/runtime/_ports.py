"""The three ports a service process talks through, wired once from its settings.

``RIFFLOOP_BACKEND=embedded`` gives the in-process bus, a local-directory object store and the
in-memory key-value store (one process only); ``real`` gives Kafka, S3 and Redis. Tests build
``Ports`` directly from in-memory adapters (no monkeypatching).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from riffloop.core import Settings

BUCKETS = ("songs", "latents", "tracks", "trainsets", "models")


@dataclasses.dataclass
class Ports:
    producer: str
    bus: Any  # riffloop.core.EventBus
    objects: Any  # riffloop.core.ObjectStore
    kv: Any  # riffloop.core.KeyValueStore

    def publish(self, topic: str, key: str, payload: Any) -> str:
        """Wrap ``payload`` in an Envelope from this service, publish it, return its event id."""
        from riffloop.core import new_envelope

        envelope = new_envelope(self.producer, payload)
        self.bus.publish(topic, key, envelope)
        return str(envelope.event_id)

    def readiness_checks(self) -> dict[str, Callable[[], bool]]:
        """One check per dependency, named as in ``riffloop_dependency_ready``."""

        def check(port: Any) -> Callable[[], bool]:
            def run() -> bool:
                port.ping()
                return True

            return run

        return {"kafka": check(self.bus), "s3": check(self.objects), "redis": check(self.kv)}

    def prepare(self, partitions: int = 3, buckets: Iterable[str] = BUCKETS) -> None:
        """Create every topic (with its DLQ twin) and the buckets ``buckets`` (default: all);
        idempotent, run at start-up. A service names the buckets it reads or writes, so its S3
        policy needs no access to the others (deploy/k8s/overlays/production/access/s3)."""
        from riffloop.core import all_topics

        unknown = sorted(set(buckets) - set(BUCKETS))
        if unknown:
            raise ValueError(f"unknown buckets {unknown}; Riffloop's are {', '.join(BUCKETS)}")
        self.bus.ensure_topics(all_topics(), partitions=partitions)
        for bucket in buckets:
            self.objects.ensure_bucket(bucket)

    def close(self) -> None:
        for port in (self.bus, self.objects, self.kv):
            port.close()


def connect_ports(settings: Settings) -> Ports:
    """Build the adapters named by ``settings.backend`` (real clients connect lazily)."""
    import riffloop.core as core

    if settings.backend == "embedded":
        return Ports(
            producer=settings.service_name,
            bus=core.MemoryEventBus(),
            objects=core.LocalDirObjectStore(settings.data_dir),
            kv=core.MemoryKeyValueStore(),
        )
    return Ports(
        producer=settings.service_name,
        bus=core.KafkaEventBus.from_settings(settings),
        objects=core.S3ObjectStore.from_settings(settings),
        kv=core.RedisKeyValueStore.from_settings(settings),
    )

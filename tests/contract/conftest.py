"""Adapters under contract: every port's test class runs against each of its adapters.

In-memory and local-directory adapters always run; the real ones (Kafka, MinIO, Redis) need the
session's ``real_infra`` servers and carry the ``integration`` marker, so ``-m "not integration"``
keeps a run server-free. Every test gets fresh bucket / topic / key names.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from riffloop.core import (
    EventBus,
    KafkaEventBus,
    KeyValueStore,
    LocalDirObjectStore,
    MemoryEventBus,
    MemoryKeyValueStore,
    MemoryObjectStore,
    ObjectStore,
    RedisKeyValueStore,
    S3ObjectStore,
)
from tests.contract.adapters import BusUnderTest, StoreUnderTest, fresh_name

REAL = pytest.mark.integration


@pytest.fixture(
    params=[
        "memory",
        "localdir",
        pytest.param("s3", marks=REAL),
        # a deployment's bucket prefix: the same contract on logical names
        pytest.param("s3-prefixed", marks=REAL),
    ]
)
def object_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
    bucket = fresh_name("ct")
    kind = request.param
    store: ObjectStore
    if kind == "memory":
        memory = MemoryObjectStore()

        def tamper_memory(key: str, data: bytes) -> None:
            memory._buckets[bucket][key].data = data  # the adapter's own storage

        store, tamper = memory, tamper_memory
    elif kind == "localdir":
        local = LocalDirObjectStore(tmp_path / "objects")

        def tamper_file(key: str, data: bytes) -> None:
            (local.root / bucket / key).write_bytes(data)

        store, tamper = local, tamper_file
    else:
        infra = request.getfixturevalue("real_infra")
        prefix = "dep-a-" if kind == "s3-prefixed" else ""
        s3 = S3ObjectStore.connect(
            infra.s3_endpoint, infra.s3_access_key, infra.s3_secret_key, bucket_prefix=prefix
        )
        raw = s3._client

        def tamper_s3(key: str, data: bytes) -> None:
            stat = raw.stat_object(prefix + bucket, key)
            raw.put_object(
                prefix + bucket,
                key,
                io.BytesIO(data),
                len(data),
                metadata={"sha256": str((stat.metadata or {})["x-amz-meta-sha256"])},
            )

        store, tamper = s3, tamper_s3
    store.ensure_bucket(bucket)
    yield StoreUnderTest(store, bucket, tamper)
    store.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=REAL)])
def kv_store(request: pytest.FixtureRequest) -> Iterator[tuple[KeyValueStore, Callable[[], str]]]:
    """The store and a maker of fresh key names (a per-test namespace)."""
    namespace = fresh_name("ct")
    store: KeyValueStore
    if request.param == "memory":
        store = MemoryKeyValueStore()
    else:
        store = RedisKeyValueStore.from_url(request.getfixturevalue("real_infra").redis_url)

    def key() -> str:
        return f"{namespace}:{uuid.uuid4().hex[:8]}"

    yield store, key
    store.close()


@pytest.fixture(params=["memory", pytest.param("kafka", marks=REAL)])
def event_bus(request: pytest.FixtureRequest) -> Iterator[BusUnderTest]:
    made: list[Any] = []
    if request.param == "memory":
        shared = MemoryEventBus()
        case = BusUnderTest(shared, lambda: shared, real=False)
    else:
        bootstrap = request.getfixturevalue("real_infra").kafka_bootstrap

        def make() -> EventBus:
            bus = KafkaEventBus(bootstrap, client_id="contract", session_timeout_ms=10_000)
            made.append(bus)
            return bus

        case = BusUnderTest(make(), make, real=True)
    yield case
    for bus in made:
        bus.close()

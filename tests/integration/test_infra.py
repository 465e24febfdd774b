"""The local stack of riffloop.infra against the real servers.

One stack of its own (it kills, restarts and stops servers): up → ready → topics and buckets
exist → kill -9 Redis and restart it → ready again → down leaves no process behind. Then the
shared `real_infra` fixture carries a message, an object and a key end to end.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from minio import Minio

from riffloop.infra import (
    BUCKETS,
    SERVER_NAMES,
    InfraAddresses,
    InfraError,
    LocalInfra,
    all_topics,
    create_buckets,
    create_topics,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "riffloop.infra", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _redis(addresses: InfraAddresses) -> redis.Redis:
    return redis.Redis.from_url(addresses.redis_url, socket_timeout=2, socket_connect_timeout=2)


def _s3(addresses: InfraAddresses) -> Minio:
    return Minio(
        addresses.s3_endpoint.removeprefix("http://"),
        access_key=addresses.s3_access_key,
        secret_key=addresses.s3_secret_key,
        secure=False,
    )


def _recorded_pids(infra: LocalInfra) -> dict[str, int]:
    return {status.name: status.pid for status in infra.status() if status.pid is not None}


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[LocalInfra]:
    infra = LocalInfra(tmp_path / "state")
    try:
        yield infra
    finally:
        infra.stop()  # whatever the test left running


@pytest.mark.integration
@pytest.mark.slow
def test_up_kill_restart_down(own_stack: LocalInfra) -> None:
    state = own_stack.state_dir

    # 1. up: every server ready, addresses written.
    up = _cli("up", "--state-dir", str(state))
    assert up.returncode == 0, up.stderr
    assert "up: ready in" in up.stderr
    addresses = InfraAddresses.from_env_file(state / "infra.env")
    assert addresses == own_stack.addresses
    assert addresses.env()["RIFFLOOP_BACKEND"] == "real"
    pids = _recorded_pids(own_stack)
    assert set(pids) == set(SERVER_NAMES)
    assert all(_running(pid) for pid in pids.values())

    # A second `up` adopts the running servers: same processes, same addresses.
    again = _cli("up", "--state-dir", str(state))
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already running") == 3
    assert _recorded_pids(own_stack) == pids
    assert InfraAddresses.from_env_file(state / "infra.env") == addresses

    # 2. The topics of docs/ARCHITECTURE.md (and their .dlq twins), 3 partitions; the buckets.
    admin = KafkaAdminClient(bootstrap_servers=addresses.kafka_bootstrap)
    try:
        partitions = {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}
    finally:
        admin.close()
    assert {name: partitions.get(name) for name in all_topics()} == dict.fromkeys(all_topics(), 3)
    assert "songs.uploaded.v1.dlq" in partitions
    assert sorted(bucket.name for bucket in _s3(addresses).list_buckets()) == sorted(BUCKETS)

    # 3. kill -9 Redis: gone, and its port refuses connections.
    client = _redis(addresses)
    assert client.set("before-crash", "1")
    own_stack.kill("redis")
    assert not _running(pids["redis"])
    with pytest.raises(redis.ConnectionError):
        client.ping()
    statuses = {status.name: status for status in own_stack.status()}
    assert not statuses["redis"].alive and statuses["kafka"].ready

    # 4. restart: same address, ready again, its keys read back from the append-only file (a
    # kill -9 of the process loses nothing the kernel was given; only a crash of the host can
    # cost the last second, riffloop.infra REDIS_REQUIREMENTS).
    own_stack.restart("redis")
    assert own_stack.addresses.redis_url == addresses.redis_url
    assert client.ping()
    assert client.get("before-crash") == b"1"
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    client.close()
    status = _cli("status", "--state-dir", str(state))
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("ready") == 3

    # 5. down: every process the stack ever ran is gone, and status says so.
    everything = [*_recorded_pids(own_stack).values(), *pids.values()]
    down = _cli("down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 5  # the parent (init) reaps the orphans
    while any(_running(pid) for pid in everything) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in everything)
    assert not (state / "infra.env").exists()
    stopped = _cli("status", "--state-dir", str(state))
    assert stopped.returncode == 1
    assert stopped.stdout.count("stopped") == 3


@pytest.mark.integration
def test_real_infra_carries_a_message_an_object_and_a_key(
    real_infra: InfraAddresses, unique_name: Callable[[str], str]
) -> None:
    topic, bucket, key = unique_name("topic"), unique_name("bucket"), unique_name("key")
    create_topics(real_infra.kafka_bootstrap, [topic], partitions=1)
    create_buckets(real_infra, [bucket])

    _produce(real_infra, topic, b"song-1", b"hello")
    assert _first_message(real_infra, topic, unique_name("group")) == (b"song-1", b"hello")

    s3 = _s3(real_infra)
    payload = os.urandom(1024)
    s3.put_object(bucket, "a/b.bin", io.BytesIO(payload), length=len(payload))
    response = s3.get_object(bucket, "a/b.bin")
    try:
        assert response.read() == payload
    finally:
        response.close()
        response.release_conn()

    client = _redis(real_infra)
    try:
        assert client.set(key, "v", ex=60)
        assert client.get(key) == b"v"
    finally:
        client.close()


@pytest.mark.integration
@pytest.mark.slow
def test_kafka_keeps_its_data_across_kill_9(
    local_infra: LocalInfra, real_infra: InfraAddresses, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("topic")
    create_topics(real_infra.kafka_bootstrap, [topic], partitions=1)
    _produce(real_infra, topic, b"track-7", b"before the crash")

    local_infra.kill("kafka")
    try:
        assert not {status.name: status for status in local_infra.status()}["kafka"].alive
    finally:
        local_infra.restart("kafka")  # the stack is shared by the whole session

    assert local_infra.addresses == real_infra
    assert _first_message(real_infra, topic, unique_name("group")) == (
        b"track-7",
        b"before the crash",
    )


def _produce(addresses: InfraAddresses, topic: str, key: bytes, value: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=addresses.kafka_bootstrap, acks="all")
    try:
        producer.send(topic, key=key, value=value).get(timeout=30)
    finally:
        producer.close()


def _first_message(addresses: InfraAddresses, topic: str, group: str) -> tuple[bytes, bytes]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=addresses.kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        consumer_timeout_ms=30_000,
    )
    try:
        first = next(iter(consumer))
    finally:
        consumer.close()
    return first.key, first.value


@pytest.mark.unit
def test_unknown_component_is_one_sentence() -> None:
    result = _cli("install", "zookeeper", timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "riffloop.infra: Unknown component zookeeper; choose from kafka, s3, redis."
    )


@pytest.mark.unit
def test_missing_env_file_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(InfraError, match=r"^Cannot read .*infra\.env .*; run `python -m"):
        InfraAddresses.from_env_file(tmp_path / "infra.env")


@pytest.mark.unit
def test_env_file_round_trip(tmp_path: Path) -> None:
    addresses = InfraAddresses("127.0.0.1:1", "http://127.0.0.1:2", "ak", "sk", "redis://x:3/0")
    lines = ["# comment", *(f"{key}={value}" for key, value in addresses.env().items())]
    (tmp_path / "infra.env").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert InfraAddresses.from_env_file(tmp_path / "infra.env") == addresses


@pytest.mark.unit
def test_status_of_a_stack_never_started(tmp_path: Path) -> None:
    result = _cli("status", "--state-dir", str(tmp_path), timeout=60)
    assert result.returncode == 1
    assert result.stdout.count("stopped") == 3
    assert "Traceback" not in result.stderr

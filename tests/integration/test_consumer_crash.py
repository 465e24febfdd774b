"""Crash safety of the consumer loop with real processes, real Kafka and real Redis.

A worker process (consumer_crash_worker.py) is kill -9'd inside the two windows where a crash can
hurt — after the handler's effect but before the dedupe mark, and after the mark but before the
offset commit — and restarted: the event comes back (at-least-once) and its effect still happens
exactly once. A poison event goes to the DLQ with its error while the worker keeps consuming.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from riffloop.core import (
    KafkaEventBus,
    Message,
    RedisKeyValueStore,
    decode_envelope,
    dlq_topic,
    new_envelope,
    replay_dead_letters,
)
from riffloop.v1 import events_pb2

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("consumer_crash_worker.py")


def rating(track_id: str, stars: int) -> events_pb2.Envelope:
    return new_envelope(
        "gateway",
        events_pb2.FeedbackReceived(
            user_id="listener-1", track_id=track_id, rating=events_pb2.TrackRating(stars=stars)
        ),
    )


class Harness:
    def __init__(self, infra: Any, unique_name: Callable[[str], str], tmp_path: Path) -> None:
        self.infra = infra
        self.topic = unique_name("feedback")
        self.group = unique_name("g")[:60]
        self.ns = unique_name("ns")
        self.logs = tmp_path
        self.bus = KafkaEventBus(infra.kafka_bootstrap, client_id="crash-test")
        self.bus.ensure_topics([self.topic, dlq_topic(self.topic)], partitions=3)
        self.kv = RedisKeyValueStore.from_url(infra.redis_url)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, mode: str, max_attempts: int = 3) -> subprocess.Popen[bytes]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "PYTHONPATH": str(REPO_ROOT),
            **self.infra.env(),
            "RIFFLOOP_SERVICE_NAME": self.group,
            "RIFFLOOP_CONSUMER_MAX_ATTEMPTS": str(max_attempts),
            "RIFFLOOP_CONSUMER_RETRY_BACKOFF_S": "0.05",
            "RIFFLOOP_CONSUMER_POLL_TIMEOUT_S": "0.2",
        }
        with (self.logs / f"worker-{len(self.procs)}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), self.topic, self.ns, mode],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def value(self, name: str) -> str | None:
        return self.kv.get(f"{self.ns}:{name}")

    def count(self, name: str) -> int:
        return int(self.value(name) or 0)

    def wait_for(self, what: str, condition: Callable[[], bool], timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            for proc in self.procs:
                if proc.poll() not in (None, -signal.SIGKILL, 0):
                    pytest.fail(f"worker exited with {proc.returncode}: {self.worker_logs()}")
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; worker logs:\n{self.worker_logs()}")

    def worker_logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.logs.glob("worker-*.log")))

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL

    def terminate(self, proc: subprocess.Popen[bytes]) -> int:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(30)

    def aggregate(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.kv.hgetall(f"{self.ns}:aggregate").items()}

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.bus.close()
        self.kv.close()


@pytest.fixture
def harness(
    real_infra: Any, unique_name: Callable[[str], str], tmp_path: Path
) -> Iterator[Harness]:
    h = Harness(real_infra, unique_name, tmp_path)
    yield h
    h.close()


def test_kill_after_the_effect_redelivers_and_applies_once(harness: Harness) -> None:
    harness.bus.publish(harness.topic, "track-1", rating("track-1", 4))
    first = harness.start("hang-in-handler")
    harness.wait_for("the handler's effect", lambda: harness.value("hanging") == "handler")
    harness.kill9(first)  # effect applied; no dedupe mark, no commit
    assert harness.count("calls") == 1
    assert harness.aggregate() == {"sum": 4.0, "n": 1.0}

    second = harness.start("run")
    harness.wait_for("the commit after redelivery", lambda: harness.count("outcome:handled") == 1)
    assert harness.count("calls") == 2  # delivered again (at-least-once) …
    assert harness.aggregate() == {"sum": 4.0, "n": 1.0}  # … applied once
    assert harness.terminate(second) == 0  # SIGTERM: graceful stop


def test_kill_before_the_commit_is_caught_by_the_dedupe_mark(harness: Harness) -> None:
    harness.bus.publish(harness.topic, "track-2", rating("track-2", 5))
    first = harness.start("hang-in-commit")
    harness.wait_for("the commit", lambda: harness.value("hanging") == "commit")
    harness.kill9(first)  # handled and marked, offset not committed
    second = harness.start("run")
    harness.wait_for("the redelivery", lambda: harness.count("outcome:duplicate") == 1)
    assert harness.count("calls") == 1  # the handler did not run again
    assert harness.aggregate() == {"sum": 5.0, "n": 1.0}
    assert harness.terminate(second) == 0


def test_poison_goes_to_the_dlq_and_the_worker_keeps_going(harness: Harness) -> None:
    poison = rating("poison", 1)
    published = harness.bus.publish(harness.topic, "poison", poison)
    harness.bus.publish(harness.topic, "poison", rating("after-poison", 3))  # same partition
    harness.bus.publish(harness.topic, "track-3", rating("track-3", 2))
    worker = harness.start("run", max_attempts=2)
    harness.wait_for("two handled events", lambda: harness.count("outcome:handled") == 2)
    assert harness.count("outcome:dead_lettered") == 1
    assert harness.count("outcome:failed") == 2
    assert harness.aggregate() == {"sum": 5.0, "n": 2.0}
    assert harness.terminate(worker) == 0

    reader = harness.bus.subscribe(harness.group + "-dlq", [dlq_topic(harness.topic)])
    try:
        deadline = time.monotonic() + 30
        records: list[Message] = []
        while not records and time.monotonic() < deadline:
            records = reader.poll(0.5)
    finally:
        reader.close()
    (record,) = records
    dead = decode_envelope(record.value, record.topic).dead_letter
    assert dead.original_event_id == poison.event_id
    assert (dead.original_partition, dead.original_offset) == (
        published.partition,
        published.offset,
    )
    assert dead.error == "poison track: cannot score"
    assert dead.attempts == 2
    assert decode_envelope(dead.original_value) == poison
    assert record.headers["riffloop-error-type"] == "RuntimeError"


def test_dead_letters_replay_to_their_topic(harness: Harness) -> None:
    poison = rating("poison", 2)
    harness.bus.publish(harness.topic, "poison", poison)
    worker = harness.start("run", max_attempts=1)
    harness.wait_for("the dead letter", lambda: harness.count("outcome:dead_lettered") == 1)
    assert harness.terminate(worker) == 0

    group = harness.group + "-replay"
    assert replay_dead_letters(harness.bus, harness.topic, group=group, idle_timeout_s=5) == 1
    assert replay_dead_letters(harness.bus, harness.topic, group=group, idle_timeout_s=3) == 0
    reader = harness.bus.subscribe(harness.group + "-check", [harness.topic])
    try:
        seen: list[Message] = []
        deadline = time.monotonic() + 30
        while len(seen) < 2 and time.monotonic() < deadline:
            seen.extend(reader.poll(0.5))
    finally:
        reader.close()
    original, replayed = sorted(seen, key=lambda m: m.offset)
    assert replayed.value == original.value == poison.SerializeToString()
    assert replayed.key == "poison"
    assert replayed.headers["riffloop-replayed-from"].startswith(dlq_topic(harness.topic))

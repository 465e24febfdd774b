"""End-to-end fixtures: real Kafka/MinIO/Redis (``real_infra``) and separate service processes.

Each test gets its own stack namespace so tests sharing one infra never see each other's state:
service names (hence Kafka consumer groups and metric labels) carry a random suffix and every
test uses its own Redis database and its own Kafka topics (``RIFFLOOP_KAFKA_TOPIC_PREFIX``): a new
consumer group starts at the earliest offset, so on shared topics a stack would first consume the
events of every test before it. Buckets are shared; object keys are content-addressed or random.
A test that talks to Kafka itself builds its settings from ``stack.infra_env``.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from riffloop.infra import drop_topics
from riffloop.stack import TINY, ServiceProcesses

_REDIS_DBS = itertools.count(1)

StackFactory = Callable[..., ServiceProcesses]


@pytest.fixture
def service_stack(real_infra, tmp_path: Path) -> Iterator[StackFactory]:  # type: ignore[no-untyped-def]
    """``service_stack(names, extra)``: start those services (tiny settings) and wait for them."""
    started: list[ServiceProcesses] = []
    suffix = uuid.uuid4().hex[:6]

    def make(
        names: tuple[str, ...],
        extra: dict[str, dict[str, str]] | None = None,
        timeout_s: float = 240.0,
    ) -> ServiceProcesses:
        env = real_infra.env()
        env["RIFFLOOP_REDIS_URL"] = f"{env['RIFFLOOP_REDIS_URL'].rstrip('/')}/{next(_REDIS_DBS)}"
        env["RIFFLOOP_KAFKA_TOPIC_PREFIX"] = f"e2e-{suffix}."
        overrides: dict[str, dict[str, str]] = {}
        for name in names:
            overrides[name] = {
                **TINY.get(name, {}),
                "RIFFLOOP_SERVICE_NAME": f"{name}-{suffix}",
                **(extra or {}).get(name, {}),
            }
        processes = ServiceProcesses(
            tmp_path / f"stack-{len(started)}", env, overrides=overrides, tied_to_parent=True
        )
        started.append(processes)
        processes.up(names, timeout_s)
        return processes

    yield make
    for processes in started:
        processes.down(grace_s=15.0)
    # A reused broker would otherwise keep every run's topics (riffloop.infra.drop_topics).
    drop_topics(real_infra.env()["RIFFLOOP_KAFKA_BOOTSTRAP"], f"e2e-{suffix}.")

"""Fixtures shared by every test folder: real servers on demand, fresh names.

- `real_infra` (session): the addresses (`InfraAddresses`, `.env()` → RIFFLOOP_* settings) of
  Kafka + MinIO + Redis started once per session on free loopback ports in a temporary folder,
  only when a test asks for them (unit runs stay server-free), stopped at the end even when tests
  fail. With `RIFFLOOP_TEST_INFRA_ENV=<state>/infra.env` (written by `python -m riffloop.infra up`)
  the tests use that running stack instead and leave it running.
- `local_infra` (session): the `LocalInfra` behind `real_infra`, for fault injection
  (`local_infra.kill("kafka")`, `.restart("kafka")`). The stack is shared: a test that kills a
  server restarts it before it ends.
- `unique_name` (per test): `unique_name("songs")` → a fresh name valid as a Kafka topic, a
  consumer group and an S3 bucket, so tests sharing one stack never see each other's data.
- `service_stack` (per test): service processes on `real_infra` (tests/e2e, tests/fault).
"""

from __future__ import annotations

import itertools
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from riffloop.infra import InfraAddresses, LocalInfra

INFRA_ENV_VARIABLE = "RIFFLOOP_TEST_INFRA_ENV"


@pytest.fixture(scope="session")
def local_infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInfra]:
    # Imported here so that runs which never ask for servers never import Kafka/MinIO clients.
    from riffloop.infra import InfraError, LocalInfra

    env_file = os.environ.get(INFRA_ENV_VARIABLE)
    if env_file:
        state_dir = Path(env_file).parent
        if not (state_dir / "infra.json").is_file():
            pytest.fail(
                f"{INFRA_ENV_VARIABLE}={env_file} has no infra.json beside it, so its servers "
                "cannot be killed or restarted; point it at a stack started with "
                "`python -m riffloop.infra up`.",
                pytrace=False,
            )
        yield LocalInfra(state_dir)  # not ours: left running
        return
    # tie_to_parent: the servers die with this process even if it is killed hard.
    infra = LocalInfra(tmp_path_factory.mktemp("infra"), tie_to_parent=True)
    try:
        infra.start()
    except InfraError as error:
        pytest.fail(error.reason, pytrace=False)
    try:
        yield infra
    finally:
        infra.stop()


@pytest.fixture(scope="session")
def real_infra(request: pytest.FixtureRequest) -> InfraAddresses:
    from riffloop.infra import InfraAddresses, InfraError

    env_file = os.environ.get(INFRA_ENV_VARIABLE)
    if not env_file:
        infra: LocalInfra = request.getfixturevalue("local_infra")
        return infra.addresses
    try:
        return InfraAddresses.from_env_file(Path(env_file))
    except InfraError as error:
        pytest.fail(f"{INFRA_ENV_VARIABLE}: {error.reason}", pytrace=False)


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """`unique_name(prefix)`: lowercase letters, digits and hyphens, at most 60 characters."""
    test = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:24].strip("-")

    def make(prefix: str = "t") -> str:
        stem = re.sub(r"[^a-z0-9]+", "-", prefix.lower()).strip("-")[:24].strip("-") or "t"
        return "-".join(part for part in (stem, test, uuid.uuid4().hex[:10]) if part)

    return make


# -- service stacks (e2e and fault tests) -----------------------------------------------------

# One Redis database per stack of the session (database 0 is the infra's own), shared by every
# folder that starts stacks so that no two stacks of one run share a database.
_REDIS_DBS = itertools.count(1)


@pytest.fixture
def service_stack(real_infra: InfraAddresses, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``service_stack(names, extra)``: start those services (tiny settings) as separate
    processes on ``real_infra`` and wait until they serve; stopped and their topics dropped at
    the end.

    Each stack gets its own namespace, so tests sharing one infra never see each other's state:
    service names (hence Kafka consumer groups and metric labels) carry a random suffix, and each
    stack has its own Redis database and its own Kafka topics (``RIFFLOOP_KAFKA_TOPIC_PREFIX``:
    a new consumer group starts at the earliest offset, so on shared topics a stack would first
    consume every other test's events). Buckets are shared; object keys are content-addressed or
    random. A test that talks to Kafka itself builds its settings from ``stack.infra_env``."""
    from riffloop.infra import drop_topics
    from riffloop.stack import TINY, ServiceProcesses

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

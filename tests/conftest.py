"""Fixtures shared by every test folder: real servers on demand, fresh names.

- `real_infra` (session): Kafka + MinIO + Redis started once per session on free loopback ports in
  a temporary folder, only when a test asks for it (unit runs stay server-free), stopped at the
  end even when tests fail. With `RIFFLOOP_TEST_INFRA_ENV=<state>/infra.env` (written by
  `python -m riffloop.infra up`) the tests use that running stack instead.
- `unique_name` (per test): `unique_name("songs")` → a fresh name valid as a Kafka topic and as
  an S3 bucket, so tests sharing one stack never see each other's data.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from riffloop.infra import InfraAddresses

INFRA_ENV_VARIABLE = "RIFFLOOP_TEST_INFRA_ENV"


@pytest.fixture(scope="session")
def real_infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfraAddresses]:
    # Imported here so that runs which never ask for servers never import Kafka/MinIO clients.
    from riffloop.infra import InfraAddresses, InfraError, LocalInfra

    env_file = os.environ.get(INFRA_ENV_VARIABLE)
    if env_file:
        try:
            addresses = InfraAddresses.from_env_file(Path(env_file))
        except InfraError as error:
            pytest.fail(f"{INFRA_ENV_VARIABLE}: {error.reason}", pytrace=False)
        yield addresses
        return
    # Servers die with this process even if it is killed hard (PR_SET_PDEATHSIG).
    infra = LocalInfra(tmp_path_factory.mktemp("infra"), tie_to_parent=True)
    try:
        addresses = infra.start()
    except InfraError as error:
        pytest.fail(error.reason, pytrace=False)
    try:
        yield addresses
    finally:
        infra.stop()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """`unique_name(prefix)`: lowercase letters, digits and hyphens, ≤ 63 characters."""
    test = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:24]

    def make(prefix: str = "t") -> str:
        stem = re.sub(r"[^a-z0-9]+", "-", prefix.lower()).strip("-") or "t"
        suffix = uuid.uuid4().hex[:10]
        return "-".join(part for part in (stem[:24].strip("-"), test, suffix) if part)

    return make

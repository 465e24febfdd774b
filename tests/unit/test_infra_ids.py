"""Identifiers the local infrastructure makes for its servers."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_kafka_cluster_ids_never_start_with_a_dash() -> None:
    """StorageTool reads ``-t -abc…`` as a missing value: one id in 64 used to start so and the
    whole integration suite failed at the first Kafka start."""
    from riffloop.infra._local import new_cluster_id

    ids = [new_cluster_id() for _ in range(3000)]  # ≈ 47 would start with "-" unfixed
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids)

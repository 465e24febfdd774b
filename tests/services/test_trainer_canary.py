"""The trainer watches a promoted version against its parent and rolls back a worse one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from riffloop.core import new_envelope
from riffloop.loop import GateReport, VersionStatus
from riffloop.runtime import metrics
from riffloop.v1 import common_pb2, events_pb2
from tests.services.conftest import Running, shared_ports, start_service, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def trainer() -> Iterator[Running]:
    running = start_service("trainer", shared_ports(), canary_min_ratings=8)
    yield running
    running.channel.close()
    running.runtime.stop()


def _scored(track: str, version: str, mean: float) -> events_pb2.Envelope:
    prov = common_pb2.TrackProvenance(kind=common_pb2.TRACK_KIND_GENERATED, model_version=version)
    payload = events_pb2.TrackScored(
        track_id=track, mean_rating=mean, rating_count=3, confidence=0.5, provenance=prov
    )
    return new_envelope("feedback", payload)


def test_a_significantly_worse_new_version_is_rolled_back(trainer: Running) -> None:
    core = trainer.state
    wait_for(lambda: core.store.current() is not None, 60, "the base model")
    child = core.store.load("v0001")
    child.version, child.parent = "v0002", "v0001"
    core.publish_version(
        child,
        trainset_id="ts-canary",
        gate=None,
        action=common_pb2.MODEL_ACTION_PROMOTE,
        report=GateReport(True, 0.0, 0.0, 0.0, 0.0, 0.25, 0.15),
    )
    assert core.store.current()["version"] == "v0002" and core.watch == ("v0001", "v0002")
    rollbacks = metrics.MODEL_ROLLBACKS._value.get()
    for i in range(7):  # fewer than min_ratings per side: no decision yet
        core.on_track_scored(_scored(f"p{i}", "v0001", 4.0 + (i % 3) * 0.3))
        core.on_track_scored(_scored(f"c{i}", "v0002", 1.5 + (i % 3) * 0.3))
    assert core.store.current()["version"] == "v0002"
    for i in range(7, 12):
        core.on_track_scored(_scored(f"p{i}", "v0001", 4.0 + (i % 3) * 0.3))
        core.on_track_scored(_scored(f"c{i}", "v0002", 1.5 + (i % 3) * 0.3))
    assert core.store.current()["version"] == "v0001"
    assert core.registry.get("v0002").status is VersionStatus.ROLLED_BACK
    assert core.watch is None
    assert metrics.MODEL_ROLLBACKS._value.get() == rollbacks + 1


def test_an_equal_new_version_stays(trainer: Running) -> None:
    core = trainer.state
    wait_for(lambda: core.store.current() is not None, 60, "the base model")
    child = core.store.load("v0001")
    child.version, child.parent = "v0002", "v0001"
    core.publish_version(
        child,
        trainset_id="ts-equal",
        gate=None,
        action=common_pb2.MODEL_ACTION_PROMOTE,
        report=GateReport(True, 0.0, 0.0, 0.0, 0.0, 0.25, 0.15),
    )
    for i in range(12):
        core.on_track_scored(_scored(f"p{i}", "v0001", 3.0 + (i % 4) * 0.2))
        core.on_track_scored(_scored(f"c{i}", "v0002", 3.0 + ((i + 1) % 4) * 0.2))
    assert core.store.current()["version"] == "v0002"

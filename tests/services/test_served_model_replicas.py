"""Replicas of a model-serving service follow the markers, not only the event: model.published
reaches one replica of a consumer group, the others reconcile with models/CURRENT and
models/CANARY (``ServedModel.load_current``, run on a timer by ``keep_current``)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.services.conftest import shared_ports, wait_for

pytestmark = pytest.mark.unit


def _store_with(versions: list[str]) -> Any:
    from riffloop.music import MelConfig, ModelConfig, MusicDiffusion
    from riffloop.runtime import ModelStore

    ports = shared_ports()
    ports.prepare()
    store = ModelStore(ports.objects)
    tiny_mel = MelConfig(n_mels=16, x_res=16, n_fft=256, hop_length=64)
    model = MusicDiffusion.create(ModelConfig.preset("tiny"), tiny_mel, seed=0)
    for version in versions:
        model.version = version
        store.publish(model)
    store.set_current(versions[0])
    return store


def _counting_loads(served: Any) -> list[str]:
    loads: list[str] = []
    real = served.store.load

    def load(version: str) -> Any:
        loads.append(version)
        return real(version)

    served.store = type(served.store)(served.store.objects)  # its own wrapper, same objects
    served.store.load = load
    return loads


def test_a_replica_that_missed_the_events_follows_canary_promotion_and_rollback() -> None:
    from riffloop.runtime import ServedModel

    store = _store_with(["v0001", "v0002", "v0003"])
    told = ServedModel(store, "generator-a")  # its consumer gets model.published
    missed = ServedModel(store, "generator-b")  # another replica of the group: never does
    assert told.load_current() and missed.load_current()
    loads = _counting_loads(missed)

    # CANARY v0002: the trainer writes the marker, then announces; only `told` hears it
    store.set_canary("v0002", "v0001", 0.25)
    told.start_canary("v0002", 0.25)
    assert missed.canary_version is None
    missed.load_current()
    assert (missed.get().version, missed.canary_version) == ("v0001", "v0002")
    routed = [missed.for_request(f"r{i}").version for i in range(200)]
    assert routed == [told.for_request(f"r{i}").version for i in range(200)]  # same split

    # PROMOTE: marker gone, CURRENT names the candidate; the held candidate is installed
    store.clear_canary("v0002")
    store.set_current("v0002", "v0001")
    told.serve_only("v0002")
    missed.load_current()
    assert (missed.get().version, missed.canary_version) == ("v0002", None)
    assert loads == ["v0002"]  # loaded once, as the canary; not again at promotion

    # CANARY v0003 then ROLLBACK: the replica ends the canary when the marker goes
    store.set_canary("v0003", "v0002", 0.25)
    missed.load_current()
    assert missed.canary_version == "v0003"
    store.clear_canary("v0003")
    missed.load_current()
    assert (missed.get().version, missed.canary_version) == ("v0002", None)

    # promoted while this replica was still loading the candidate: installed, not dropped
    store.set_canary("v0003", "v0002", 0.25)
    store.clear_canary("v0003")
    store.set_current("v0003", "v0002")  # decided before the load below finished
    missed.start_canary("v0003", 0.25)  # the CANARY event, late
    missed.drop_ended_canary()
    assert (missed.get().version, missed.canary_version) == ("v0003", None)
    assert loads[-1] == "v0003" and loads.count("v0003") == 2  # the canary above, then this
    missed.load_current()
    assert loads.count("v0003") == 2  # not read again
    store.set_current("v0002")

    # a rollback of CURRENT itself (an operator's Rollback to the parent)
    store.set_current("v0001")
    missed.load_current()
    assert missed.get().version == "v0001"
    missed.load_current()  # nothing changed: nothing is loaded again
    assert loads[-1] == "v0001" and loads.count("v0001") == 1


def test_keep_current_reconciles_on_its_timer() -> None:
    from riffloop.runtime import LoopWorker, ServedModel, keep_current

    store = _store_with(["v0001", "v0002"])
    replica = ServedModel(store, "generator-c")
    worker = LoopWorker("generator-c-model", keep_current(replica, poll_s=0.05))
    worker.start()
    try:
        wait_for(lambda: replica.ready, 60, "the first model")
        assert replica.get().version == "v0001"
        store.set_current("v0002", "v0001")  # no event at all
        wait_for(lambda: replica.get().version == "v0002", 60, "the promoted version")
    finally:
        worker.stop(5.0)
    assert not worker.alive and worker.failed is None


def test_model_poll_interval_is_validated() -> None:
    from riffloop.core import ConfigurationError
    from services.generator import GeneratorSettings

    with pytest.raises(ConfigurationError, match="RIFFLOOP_MODEL_POLL_S"):
        GeneratorSettings(model_poll_s=0.0)

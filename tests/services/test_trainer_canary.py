"""The canary: a gated candidate serves a share of requests and is promoted or rolled back from
its ratings against its parent; a version promoted at once (canary_share 0) is watched the same
way and rolled back when worse. The generator routes the canary share by request id."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from riffloop.core import new_envelope
from riffloop.loop import GateReport, GateVerdict, TrainingSet, VersionStatus
from riffloop.runtime import metrics
from riffloop.v1 import common_pb2, events_pb2
from tests.services.conftest import Running, shared_ports, start_service, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSED = GateVerdict(GateReport(True, 1.0, 1.0, 1.0, 1.0, 0.25, 0.15), samples=16)


@pytest.fixture
def trainer() -> Iterator[Running]:
    running = start_service(
        "trainer", shared_ports(), canary_min_ratings=8, canary_max_ratings=12, canary_share=0.25
    )
    yield running
    running.channel.close()
    running.runtime.stop()


def _scored(track: str, version: str, mean: float) -> events_pb2.Envelope:
    prov = common_pb2.TrackProvenance(kind=common_pb2.TRACK_KIND_GENERATED, model_version=version)
    payload = events_pb2.TrackScored(
        track_id=track, mean_rating=mean, rating_count=3, confidence=0.5, provenance=prov
    )
    return new_envelope("feedback", payload)


def _child(core, version: str = "v0002"):  # type: ignore[no-untyped-def]
    wait_for(lambda: core.store.current() is not None, 60, "the base model")
    child = core.store.load("v0001")
    child.version, child.parent = version, "v0001"
    return child


def _child_canary_marker(core: Any) -> dict[str, Any]:
    """``models/CANARY`` for v0002 as a canary of v0001 on a quarter of the requests."""
    return {
        "version": "v0002",
        "parent": "v0001",
        "share": 0.25,
        "checkpoint_sha256": core.store.checkpoint_ref("v0002").sha256,  # checked on load
    }


def test_a_significantly_worse_new_version_is_rolled_back(trainer: Running) -> None:
    core = trainer.state
    core.cycle.publish_version(_child(core), trainset_id="ts-canary", gate=PASSED)
    assert core.store.current()["version"] == "v0002" and core.cycle.watch == ("v0001", "v0002")
    rollbacks = metrics.MODEL_ROLLBACKS._value.get()
    core.on_track_scored(_scored("nan", "v0002", float("nan")))  # ignored, never poisons the watch
    for i in range(7):  # fewer than min_ratings per side: no decision yet
        core.on_track_scored(_scored(f"p{i}", "v0001", 4.0 + (i % 3) * 0.3))
        core.on_track_scored(_scored(f"c{i}", "v0002", 1.5 + (i % 3) * 0.3))
    assert core.store.current()["version"] == "v0002"
    for i in range(7, 12):
        core.on_track_scored(_scored(f"p{i}", "v0001", 4.0 + (i % 3) * 0.3))
        core.on_track_scored(_scored(f"c{i}", "v0002", 1.5 + (i % 3) * 0.3))
    assert core.store.current()["version"] == "v0001"
    assert core.cycle.registry.get("v0002").status is VersionStatus.ROLLED_BACK
    assert core.cycle.watch is None
    assert metrics.MODEL_ROLLBACKS._value.get() == rollbacks + 1


def test_an_equal_new_version_stays(trainer: Running) -> None:
    core = trainer.state
    core.cycle.publish_version(_child(core), trainset_id="ts-equal", gate=PASSED)
    for i in range(12):
        core.on_track_scored(_scored(f"p{i}", "v0001", 3.0 + (i % 4) * 0.2))
        core.on_track_scored(_scored(f"c{i}", "v0002", 3.0 + ((i + 1) % 4) * 0.2))
    assert core.store.current()["version"] == "v0002"


def _published(core) -> list[events_pb2.ModelPublished]:  # type: ignore[no-untyped-def]
    sub = core.ports.bus.subscribe(
        f"probe-{len(core.cycle.registry.versions())}", ["model.published.v1"]
    )
    return [decode(m).model_published for m in sub.poll(0.5, 100)]


def decode(message):  # type: ignore[no-untyped-def]
    from riffloop.core import decode_envelope

    return decode_envelope(message.value, message.topic)


def test_a_canary_serves_a_share_and_is_promoted_when_not_worse(trainer: Running) -> None:
    core = trainer.state
    core.cycle.start_canary(_child(core), trainset_id="ts-c", gate=PASSED)
    assert core.cycle.registry.get("v0002").status is VersionStatus.CANARY
    assert core.store.current()["version"] == "v0001"  # CURRENT moves only on promotion
    canary = _published(core)[-1]
    assert canary.action == common_pb2.MODEL_ACTION_CANARY and canary.canary_share == 0.25
    for i in range(12):  # equal ratings up to canary_max_ratings: do no harm → PROMOTE
        core.on_track_scored(_scored(f"p{i}", "v0001", 3.0 + (i % 4) * 0.2))
        core.on_track_scored(_scored(f"c{i}", "v0002", 3.0 + ((i + 1) % 4) * 0.2))
    assert core.store.current()["version"] == "v0002"
    record = core.cycle.registry.get("v0002")
    assert record.status is VersionStatus.SERVING and record.canary["decision"] == "promote"
    assert _published(core)[-1].action == common_pb2.MODEL_ACTION_PROMOTE


def test_a_worse_canary_is_rolled_back_without_ever_becoming_current(trainer: Running) -> None:
    core = trainer.state
    core.cycle.start_canary(_child(core), trainset_id="ts-w", gate=PASSED)
    rollbacks = metrics.MODEL_ROLLBACKS._value.get()
    for i in range(8):
        core.on_track_scored(_scored(f"p{i}", "v0001", 4.0 + (i % 3) * 0.3))
        core.on_track_scored(_scored(f"c{i}", "v0002", 1.5 + (i % 3) * 0.3))
    assert core.store.current()["version"] == "v0001"
    assert core.cycle.registry.get("v0002").status is VersionStatus.ROLLED_BACK
    assert core.cycle.registry.serving() == "v0001" and core.cycle.watch is None
    last = _published(core)[-1]
    assert last.action == common_pb2.MODEL_ACTION_ROLLBACK and last.version == "v0001"
    assert metrics.MODEL_ROLLBACKS._value.get() == rollbacks + 1


def test_the_rollback_rpc_aborts_a_running_canary(trainer: Running) -> None:
    core = trainer.state
    core.cycle.start_canary(_child(core), trainset_id="ts-r", gate=PASSED)
    assert core.cycle.running_canary() == "v0002"
    # A training set arriving meanwhile waits for the decision (no manifest is even read).
    later = events_pb2.TrainsetPublished(trainset_id="ts-later")
    core.on_trainset_published(new_envelope("selector", later))
    assert core.cycle.registry.versions() == ["v0001", "v0002"]
    target, dropped, _ = core.cycle.rollback("")
    assert (target, dropped) == ("v0001", "v0002")
    assert core.cycle.registry.get("v0002").status is VersionStatus.ROLLED_BACK
    assert core.store.current()["version"] == "v0001"


def test_the_generator_routes_the_canary_share_by_request_id() -> None:
    from riffloop.core import ValidationError
    from riffloop.music import MelConfig, ModelConfig, MusicDiffusion
    from riffloop.runtime import ModelStore, ServedModel

    ports = shared_ports()
    ports.prepare()
    store = ModelStore(ports.objects)
    tiny_mel = MelConfig(n_mels=16, x_res=16, n_fft=256, hop_length=64)
    base = MusicDiffusion.create(ModelConfig.preset("tiny"), tiny_mel, seed=0)
    base.version = "v0001"
    store.publish(base)
    base.version = "v0002"
    store.publish(base)
    served = ServedModel(store, "generator-test")
    served.swap_to("v0001")
    served.start_canary("v0002", 0.25)
    picks = [served.for_request(f"req-{i}").version for i in range(2000)]
    share = picks.count("v0002") / len(picks)
    assert 0.21 < share < 0.29
    assert [served.for_request(f"req-{i}").version for i in range(50)] == picks[:50]  # stable
    with pytest.raises(ValidationError):
        served.start_canary("v0003", 1.5)
    served.serve_only("v0002")  # PROMOTE: the loaded candidate becomes current
    assert served.canary_version is None and served.get().version == "v0002"
    assert {served.for_request(f"req-{i}").version for i in range(20)} == {"v0002"}


def test_generator_serves_a_published_canary_and_reports_it() -> None:
    """model.published CANARY → the generator holds both versions; PROMOTE ends the canary."""
    from riffloop.core import ValidationError
    from riffloop.v1 import generator_service_pb2 as gen_pb

    ports = shared_ports()
    trainer = start_service("trainer", ports)
    generator = start_service("generator", ports)
    try:
        core, gen = trainer.state, generator.state
        wait_for(lambda: gen.model.ready, 120, "the generator's first model")
        child = _child(core)
        core.store.publish(child)
        event = events_pb2.ModelPublished(
            version="v0002",
            parent_version="v0001",
            action=common_pb2.MODEL_ACTION_CANARY,
            canary_share=0.3,
        )
        from riffloop.v1 import generator_service_pb2_grpc as gen_grpc

        stub = gen_grpc.GeneratorServiceStub(generator.channel)
        # a canary event whose canary has ended (no marker: a replay after a restart) is stale
        gen.on_model_published(new_envelope("trainer", event))
        assert stub.CurrentModel(gen_pb.CurrentModelRequest(), timeout=10).canary_version == ""
        core.store.set_canary("v0002", "v0001", 0.3)  # as the trainer writes before the event
        gen.on_model_published(new_envelope("trainer", event))
        current = stub.CurrentModel(gen_pb.CurrentModelRequest(), timeout=10)
        assert (current.version, current.canary_version) == ("v0001", "v0002")
        assert current.canary_share == pytest.approx(0.3)
        bad = events_pb2.ModelPublished(version="v0003", action=common_pb2.MODEL_ACTION_CANARY)
        with pytest.raises(ValidationError):  # no share: poison, dead-lettered by the consumer
            gen.on_model_published(new_envelope("trainer", bad))
        # PROMOTE: the trainer ends the marker and moves CURRENT, then announces
        core.store.clear_canary("v0002")
        core.store.set_current("v0002", "v0001")
        promote = events_pb2.ModelPublished(version="v0002", action=common_pb2.MODEL_ACTION_PROMOTE)
        gen.on_model_published(new_envelope("trainer", promote))
        current = stub.CurrentModel(gen_pb.CurrentModelRequest(), timeout=10)
        assert (current.version, current.canary_version) == ("v0002", "")
        # a late ROLLBACK event naming v0001, after CURRENT has stayed at v0002: v0002 serves
        late = events_pb2.ModelPublished(version="v0001", action=common_pb2.MODEL_ACTION_ROLLBACK)
        gen.on_model_published(new_envelope("trainer", late))
        assert stub.CurrentModel(gen_pb.CurrentModelRequest(), timeout=10).version == "v0002"
    finally:
        for running in (generator, trainer):
            running.channel.close()
            running.runtime.stop()


def test_a_canary_survives_restarts_of_the_trainer_and_the_generator(trainer: Running) -> None:
    """``models/CANARY`` carries a running canary across restarts: a new trainer process
    resumes watching it, a new generator serves its share; the decision removes the marker."""
    from riffloop.runtime import ServedModel
    from services.trainer import TrainerHandlers, TrainerSettings

    core = trainer.state
    core.cycle.start_canary(_child(core), trainset_id="ts-restart", gate=PASSED)
    assert core.store.canary() == _child_canary_marker(core)
    restarted = TrainerHandlers(
        TrainerSettings(canary_min_ratings=8, canary_max_ratings=12), core.ports
    )
    assert restarted.cycle.running_canary() is None  # before its bootstrap
    restarted.ensure_base()
    assert restarted.cycle.running_canary() == "v0002" and restarted.cycle.watch == (
        "v0001",
        "v0002",
    )
    generator = ServedModel(core.store, "generator-restarted")
    loading = generator.start_canary
    ready_while_loading = []

    def start_canary(version: str, share: float) -> None:  # the candidate loads: not ready yet
        ready_while_loading.append(generator.ready)
        loading(version, share)

    generator.start_canary = start_canary  # type: ignore[method-assign]
    assert generator.load_current() and generator.ready
    assert ready_while_loading == [False]  # no traffic before the canary's share can be served
    broken = ServedModel(core.store, "generator-broken-candidate")

    def unreadable(version: str, share: float) -> None:
        raise OSError("truncated checkpoint")

    broken.start_canary = unreadable  # type: ignore[method-assign]
    assert broken.load_current() and broken.ready  # serves the current model, not stuck
    assert (broken.get().version, broken.canary_version) == ("v0001", None)
    encoder_side = ServedModel(core.store, "encoder", canaries=False)
    assert encoder_side.load_current() and encoder_side.canary_version is None
    assert (generator.get().version, generator.canary_version) == ("v0001", "v0002")
    for i in range(8):  # the restarted trainer decides: worse → rollback, marker gone
        restarted.on_track_scored(_scored(f"p{i}", "v0001", 4.0 + (i % 3) * 0.3))
        restarted.on_track_scored(_scored(f"c{i}", "v0002", 1.5 + (i % 3) * 0.3))
    assert restarted.cycle.registry.get("v0002").status is VersionStatus.ROLLED_BACK
    assert core.store.canary() is None
    late = ServedModel(core.store, "generator-late")
    assert late.load_current() and late.canary_version is None


def test_a_stale_canary_marker_is_cleared_at_start_up(trainer: Running) -> None:
    core = trainer.state
    wait_for(lambda: core.store.current() is not None, 60, "the base model")
    core.store.set_canary("v0001", "v0000", 0.2)  # v0001 serves: it is no canary
    assert core.cycle.resume_canary() is None and core.store.canary() is None


def _record_publishes(core) -> list[tuple[str, str, Any]]:  # type: ignore[no-untyped-def]
    """From now on, every (topic, key, payload) the trainer publishes, still published."""
    sent: list[tuple[str, str, Any]] = []
    real = core.ports.publish

    def recording(topic: str, key: str, payload: Any) -> str:
        sent.append((topic, key, payload))
        return real(topic, key, payload)

    core.ports.publish = recording
    return sent


def _worse_canary(core) -> None:  # type: ignore[no-untyped-def]
    """Ratings that make the running canary v0002 significantly worse than v0001."""
    for i in range(12):
        core.on_track_scored(_scored(f"p{i}", "v0001", 4.0 + (i % 3) * 0.3))
        core.on_track_scored(_scored(f"c{i}", "v0002", 1.5 + (i % 3) * 0.3))


def test_a_decision_whose_event_failed_is_announced_on_the_retry(trainer: Running) -> None:
    """The broker refuses the ROLLBACK event: the decision stands (registry, marker) and the next
    event handled — the consumer's retry — sends it; every event has the one key "models"."""
    core = trainer.state
    core.cycle.start_canary(_child(core), trainset_id="ts-announce", gate=PASSED)
    real = core.ports.publish

    def broken(topic: str, key: str, payload: object) -> str:
        raise ConnectionError("broker down")

    core.ports.publish = broken
    with pytest.raises(ConnectionError):
        _worse_canary(core)
    assert core.cycle.registry.get("v0002").status is VersionStatus.ROLLED_BACK
    assert core.cycle.announced() == {"current": "v0001", "canary": "v0002"}  # what went out last
    core.ports.publish = real
    sent = _record_publishes(core)
    core.on_track_scored(_scored("late", "v0001", 3.0))  # the retry, or any next event
    assert [(t, k, p.version, p.action) for t, k, p in sent] == [
        ("model.published.v1", "models", "v0001", common_pb2.MODEL_ACTION_ROLLBACK)
    ]
    assert core.cycle.announced() == {"current": "v0001", "canary": ""}
    assert core.cycle.watch is None and core.store.canary() is None


def test_a_set_that_arrives_during_a_canary_is_trained_after_it(trainer: Running) -> None:
    core = trainer.state
    core.cycle.start_canary(_child(core), trainset_id="ts-first", gate=PASSED)
    sent = _record_publishes(core)
    waiting = events_pb2.TrainsetPublished(trainset_id="ts-waiting", pair_count=2, iteration=2)
    core.on_trainset_published(new_envelope("selector", waiting))
    assert not sent and core.cycle.registry.versions() == ["v0001", "v0002"]  # nothing trained yet
    # a restart in between keeps it, and the canary's evidence gathered so far
    for i in range(5):
        core.on_track_scored(_scored(f"p{i}", "v0001", 4.0))
    from services.trainer import TrainerHandlers, TrainerSettings

    restarted = TrainerHandlers(
        TrainerSettings(canary_min_ratings=8, canary_max_ratings=12), core.ports
    )
    assert restarted.cycle.resume_canary() == "v0002" and len(restarted.cycle.evidence) == 5
    _worse_canary(core)  # decided: rolled back, then the kept set goes out again
    released = [p for t, _, p in sent if t == "trainset.published.v1"]
    assert [p.trainset_id for p in released] == ["ts-waiting"]
    assert core.ports.kv.get("trainer:deferred") is None


def test_a_canary_decided_while_its_candidate_loaded_is_not_installed(trainer: Running) -> None:
    """Start-up race: the generator reads the marker, loads the candidate (slow), and the
    trainer's decision lands meanwhile; the installed canary is dropped at once."""
    from riffloop.runtime import ServedModel

    core = trainer.state
    core.cycle.start_canary(_child(core), trainset_id="ts-race", gate=PASSED)
    served = ServedModel(core.store, "generator-race")
    real_load = core.store.load

    def slow_load(version: str):  # type: ignore[no-untyped-def]
        model = real_load(version)
        if version == "v0002":
            core.cycle.abort_canary("v0002")  # decided while the candidate was loading
        return model

    served.store.load = slow_load  # type: ignore[method-assign]
    assert served.load_current()
    assert (served.get().version, served.canary_version) == ("v0001", None)


def test_a_rollback_past_a_running_canarys_parent_ends_the_canary(trainer: Running) -> None:
    core = trainer.state
    core.cycle.publish_version(_child(core), trainset_id="ts-2", gate=PASSED)
    grandchild = _child(core, "v0003")
    grandchild.parent = "v0002"
    core.cycle.start_canary(grandchild, trainset_id="ts-3", gate=PASSED)
    target, serving, _ = core.cycle.rollback("v0001")
    assert (target, serving) == ("v0001", "v0002")
    assert core.cycle.registry.get("v0003").status is VersionStatus.ROLLED_BACK
    assert core.store.canary() is None and core.cycle.running_canary() is None
    assert core.store.current()["version"] == "v0001"


def test_a_version_promoted_at_once_is_still_watched_after_a_restart(trainer: Running) -> None:
    """canary_share 0: the watch of the promoted version and its evidence survive a restart,
    and the restarted trainer rolls a worse one back."""
    from services.trainer import TrainerHandlers, TrainerSettings

    core = trainer.state
    core.cycle.publish_version(_child(core), trainset_id="ts-now", gate=PASSED)
    for i in range(6):
        core.on_track_scored(_scored(f"p{i}", "v0001", 4.0 + (i % 3) * 0.3))
        core.on_track_scored(_scored(f"c{i}", "v0002", 1.5 + (i % 3) * 0.3))
    restarted = TrainerHandlers(
        TrainerSettings(canary_min_ratings=8, canary_max_ratings=12), core.ports
    )
    restarted.ensure_base()
    assert restarted.cycle.watch == ("v0001", "v0002") and len(restarted.cycle.evidence) == 12
    for i in range(6, 12):
        restarted.on_track_scored(_scored(f"p{i}", "v0001", 4.0 + (i % 3) * 0.3))
        restarted.on_track_scored(_scored(f"c{i}", "v0002", 1.5 + (i % 3) * 0.3))
    assert core.store.current()["version"] == "v0001"
    assert core.cycle.registry.get("v0002").status is VersionStatus.ROLLED_BACK
    assert core.ports.kv.get("trainer:watch") is None


def test_a_refused_rollback_leaves_the_canary_running(trainer: Running) -> None:
    from riffloop.core import NotFoundError, ValidationError

    core = trainer.state
    core.cycle.start_canary(_child(core), trainset_id="ts-keep", gate=PASSED)
    with pytest.raises((ValidationError, NotFoundError)):
        core.cycle.rollback("v9999")
    assert core.cycle.running_canary() == "v0002" and core.store.canary() is not None


def test_a_deployment_without_an_announcement_record_takes_its_pointers_as_announced(
    trainer: Running,
) -> None:
    """Upgrading a running deployment: no ``trainer:announced`` yet. The pointers are taken as
    what generators already serve; nothing is re-announced (a PROMOTE would drop a canary)."""
    core = trainer.state
    core.cycle.start_canary(_child(core), trainset_id="ts-upgrade", gate=PASSED)
    core.ports.kv.delete("trainer:announced")
    sent = _record_publishes(core)
    assert core.cycle.reconcile() == [] and not sent
    assert core.cycle.announced() == {"current": "v0001", "canary": "v0002"}


def test_a_canary_a_crash_left_without_its_marker_is_started_on_the_redelivery(
    trainer: Running,
) -> None:
    """Killed between the registry write (CANARY) and the marker: the redelivered training set
    finishes the start — marker, watch, CANARY event — instead of counting as judged."""
    core = trainer.state
    child = _child(core)
    core.cycle._store_version(child, "ts-crash")
    core.cycle.registry.gate("v0002", PASSED.report)  # CANDIDATE → CANARY; then the process died
    sent = _record_publishes(core)
    again = events_pb2.TrainsetPublished(trainset_id="ts-crash", pair_count=1, iteration=1)
    core.on_trainset_published(new_envelope("selector", again))
    assert core.store.canary() == _child_canary_marker(core)
    assert core.cycle.running_canary() == "v0002"
    assert [(p.version, p.action) for _, _, p in sent] == [
        ("v0002", common_pb2.MODEL_ACTION_CANARY)
    ]


def test_a_deferred_set_overtaken_by_a_newer_trained_one_is_not_trained_after_it(
    trainer: Running,
) -> None:
    core = trainer.state
    core.cycle.start_canary(_child(core), trainset_id="ts-c", gate=PASSED)
    older = events_pb2.TrainsetPublished(trainset_id="ts-0002-old", pair_count=1, iteration=2)
    newer = events_pb2.TrainsetPublished(trainset_id="ts-0004-new", pair_count=1, iteration=4)
    core.on_trainset_published(new_envelope("selector", newer))
    core.on_trainset_published(new_envelope("selector", older))  # the newest kept stays
    kept = TrainingSet.from_json(core.ports.kv.get("trainer:deferred"))
    assert (kept.trainset_id, kept.iteration) == ("ts-0004-new", 4)
    core.ports.kv.set("trainer:deferred", TrainingSet("ts-0002-old", "", "", 1, 2).to_json())
    core.ports.kv.set("trainer:last-iteration", "3")  # set 3 was trained meanwhile
    sent = _record_publishes(core)
    core.cycle.abort_canary("v0002")
    assert core.cycle.release_deferred() is None and not sent[1:]  # only the ROLLBACK went out
    assert core.ports.kv.get("trainer:deferred") is None


def test_a_promotion_that_failed_half_way_is_finished_by_the_next_event(trainer: Running) -> None:
    """The registry says the canary won (SERVING), then writing ``models/CURRENT`` fails: the
    next event handled finishes it — CURRENT, the marker, the PROMOTE event."""
    core = trainer.state
    core.cycle.start_canary(_child(core), trainset_id="ts-half", gate=PASSED)
    real_set_current = core.store.set_current

    def failing(version: str, parent: str = "", checkpoint_sha256: str = "") -> None:
        raise ConnectionError("object store down")

    core.store.set_current = failing
    with pytest.raises(ConnectionError):
        for i in range(12):  # the candidate is clearly better: PROMOTE
            core.on_track_scored(_scored(f"p{i}", "v0001", 1.5 + (i % 3) * 0.3))
            core.on_track_scored(_scored(f"c{i}", "v0002", 4.0 + (i % 3) * 0.3))
    assert core.cycle.registry.get("v0002").status is VersionStatus.SERVING
    assert core.store.current()["version"] == "v0001"  # half way
    core.store.set_current = real_set_current
    sent = _record_publishes(core)
    core.on_track_scored(_scored("late", "v0002", 3.0))
    assert core.store.current()["version"] == "v0002" and core.store.canary() is None
    assert [(p.version, p.action) for _, _, p in sent] == [
        ("v0002", common_pb2.MODEL_ACTION_PROMOTE)
    ]
    assert core.cycle.announced() == {"current": "v0002", "canary": ""}


def test_the_training_device_is_checked_at_start_up() -> None:
    import torch

    from riffloop.core import ConfigurationError
    from services.trainer import TrainerSettings

    with pytest.raises(ConfigurationError, match="RIFFLOOP_DEVICE: unknown device 'gpu0'"):
        TrainerSettings(device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match=r"RIFFLOOP_DEVICE: .*no CUDA device"):
            TrainerSettings(device="cuda")
    assert TrainerSettings(device="cpu").device == "cpu"

"""Redis is a cache of the log: the feedback service's and the gateway's key-value state,
emptied, comes back from the topics (riffloop.runtime.rebuild), the same however often it is
replayed.

In-memory ports (the bus keeps every record, like the retention the catalogue gives the record
topics); the gateway and feedback services run in process for the watch that notices a flush.
The same on real servers, separate processes: tests/fault/test_redis_flush.py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from riffloop.core import (
    ConfigurationError,
    MemoryKeyValueStore,
    Settings,
    TransientError,
    ValidationError,
    new_envelope,
)
from riffloop.loop import Dispatcher
from riffloop.runtime import (
    FEEDBACK_REBUILT_MARKER,
    Ports,
    RebuildPlan,
    RebuildWatch,
    Replay,
    TrackRecords,
    ensure_rebuilt,
    feedback_rebuild_plan,
    gateway_rebuild_plan,
    is_rebuilt,
    rebuild,
    rebuild_command,
    selector_rebuild_plan,
)
from riffloop.v1 import common_pb2, events_pb2
from riffloop.v1 import gateway_service_pb2 as pb
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc
from services.feedback._service import FeedbackState
from tests.services.conftest import (
    generated_track_ready,
    shared_ports,
    start_service,
    wait_for,
    wav_bytes,
)

pytestmark = pytest.mark.contract

Auth = Callable[[str], tuple[tuple[str, str], ...]]


def _ports() -> Ports:
    ports = shared_ports()
    ports.prepare()
    return ports


def _kv(ports: Ports) -> MemoryKeyValueStore:
    assert isinstance(ports.kv, MemoryKeyValueStore)
    return ports.kv


def _state_of(ports: Ports, prefix: str, *leave_out: str) -> dict[str, Any]:
    return {
        k: v for k, v in _kv(ports).dump().items() if k.startswith(prefix) and k not in leave_out
    }


def _rating(user: str, track_id: str, stars: int, served_at: float | None = None) -> Any:
    item = events_pb2.FeedbackReceived(
        user_id=user, track_id=track_id, rating=events_pb2.TrackRating(stars=stars)
    )
    if served_at is not None:
        item.served_at.FromNanoseconds(int(served_at * 1e9))
    return item


def _feed(ports: Ports, state: FeedbackState, topic: str, key: str, envelope: Any) -> None:
    """Publish ``envelope`` and hand it to the feedback state as its consumer would (a record
    it refuses is dead-lettered by the consumer: here, only counted as refused)."""
    ports.bus.publish(topic, key, envelope)
    handler = state.on_track_ready if topic == "tracks.ready.v1" else state.on_feedback
    with contextlib.suppress(ValidationError):
        handler(envelope)


def _feedback_history(ports: Ports, state: FeedbackState) -> str:
    """Tracks of ann and bob; single and batched ratings, a listen, a redelivery, a rating that
    overtook its track, one for a track never ready (parked: its event id is returned), refused
    items."""
    for track_id, owner in (("t1", "ann"), ("t2", "ann"), ("t3", "bob")):
        ready = new_envelope("generator", generated_track_ready(track_id, owner))
        _feed(ports, state, "tracks.ready.v1", track_id, ready)
    single = new_envelope("gateway", _rating("ann", "t1", 4))
    _feed(ports, state, "feedback.received.v1", "t1", single)
    _feed(ports, state, "feedback.received.v1", "t1", single)  # redelivered
    batch = events_pb2.FeedbackBatch()
    batch.items.append(_rating("cy", "t1", 2, served_at=1.0))
    batch.items.append(_rating("cy", "t3", 5, served_at=1.0))
    batch.items.add(
        user_id="cy",
        track_id="t3",
        listen=events_pb2.ListenReport(seconds_listened=6.0, clip_seconds=6.0, completed=True),
    )
    batch.items.append(_rating("dan", "t2", 3))  # never served to dan: refused on its own
    _feed(ports, state, "feedback.received.v1", "cy", new_envelope("gateway", batch))
    early = new_envelope("gateway", _rating("bob", "t4", 1))  # before t4's TrackReady
    _feed(ports, state, "feedback.received.v1", "t4", early)
    late = new_envelope("generator", generated_track_ready("t4", "bob"))
    _feed(ports, state, "tracks.ready.v1", "t4", late)
    lost = new_envelope("gateway", _rating("bob", "t9", 2))  # t9 never becomes ready
    _feed(ports, state, "feedback.received.v1", "t9", lost)
    poison = new_envelope("gateway", _rating("eve", "t1", 5))  # not served to eve
    _feed(ports, state, "feedback.received.v1", "t1", poison)
    return str(lost.event_id)


def _ratings(state: FeedbackState) -> list[tuple[str, str, int]]:
    with state.lock:
        return sorted((o.track_id, o.rater_id, o.stars) for o in state.ledger.observations())


def test_the_feedback_mirror_is_rebuilt_from_the_log_the_same_every_time() -> None:
    ports = _ports()
    state = FeedbackState(ports)
    parked = _feedback_history(ports, state)
    expected = [("t1", "ann", 4), ("t1", "cy", 2), ("t3", "cy", 5), ("t4", "bob", 1)]
    assert _ratings(state) == expected
    before = _state_of(ports, "fb:", FEEDBACK_REBUILT_MARKER)
    assert "fb:parked" in before and "fb:refused" in before  # the history covers both

    plan = feedback_rebuild_plan(ports.kv, ports.bus, producer="feedback")
    _kv(ports).flush()
    assert not is_rebuilt(ports.kv, plan)
    report = rebuild(ports.bus, ports.kv, plan)
    assert report.records["tracks.ready.v1"] == 4
    assert report.skipped["feedback.received.v1"] == 2  # the poison and the refused batch item
    assert _state_of(ports, "fb:", FEEDBACK_REBUILT_MARKER) == before
    assert is_rebuilt(ports.kv, plan)

    rebuild(ports.bus, ports.kv, plan)  # twice: the same state
    assert _state_of(ports, "fb:", FEEDBACK_REBUILT_MARKER) == before
    assert ensure_rebuilt(ports.bus, ports.kv, plan) is None  # the marker says done

    restarted = FeedbackState(ports)  # a process started on the rebuilt store
    restarted.rebuild()
    assert _ratings(restarted) == expected
    assert restarted.intake.parked.missing(parked) == ["t9"]
    assert restarted.intake.mirror.refused_ratings("dan") == 1


def test_a_new_deployment_is_marked_rebuilt_at_once_and_a_flush_mid_rebuild_starts_over() -> None:
    ports = _ports()
    plan = feedback_rebuild_plan(ports.kv, ports.bus, producer="feedback")
    report = ensure_rebuilt(ports.bus, ports.kv, plan)
    assert report is not None and report.total == 0  # empty topics: a new deployment
    assert ensure_rebuilt(ports.bus, ports.kv, plan) is None

    ports.bus.publish("tracks.ready.v1", "t1", new_envelope("g", generated_track_ready("t1", "a")))
    flushes = []

    def flush_once(envelope: Any) -> None:
        if not flushes:
            flushes.append(envelope.event_id)
            _kv(ports).flush()  # Redis lost its data while the rebuild ran

    flaky = RebuildPlan(
        "test:rebuilt", ["tracks.ready.v1"], lambda: Replay({"tracks.ready.v1": flush_once})
    )
    assert rebuild(ports.bus, ports.kv, flaky).total == 1
    assert flushes and is_rebuilt(ports.kv, flaky)  # the second round completed

    always = RebuildPlan(
        "test:rebuilt",
        ["tracks.ready.v1"],
        lambda: Replay({"tracks.ready.v1": lambda _: _kv(ports).flush()}),
    )
    with pytest.raises(TransientError):
        rebuild(ports.bus, ports.kv, always, max_rounds=2)


def _dispatcher() -> Dispatcher:
    return Dispatcher(key="test-dispatch-key-0123")


def test_gateway_records_come_back_from_the_log() -> None:
    """Requests, a failure, ready tracks, a probe, serves and ratings, models: replayed into an
    empty store, twice, the same records, queue, serves and once-keys."""
    ports = _ports()
    dispatcher = _dispatcher()
    request = events_pb2.GenerationRequested(
        request_id="r" * 32, user_id="ann", song_ids=["a" * 64], similarity=0.5, quality=5
    )
    failed = events_pb2.GenerationRequested(
        request_id="f" * 32, user_id="ann", song_ids=["b" * 64], similarity=0.5, quality=5
    )
    track = dispatcher.track_id_for(request.request_id)
    for payload in (request, failed):
        ports.bus.publish(
            "generation.requested.v1", payload.request_id, new_envelope("gateway", payload)
        )
    dead = events_pb2.DeadLetter(
        original_topic="generation.requested.v1",
        original_value=new_envelope("gateway", failed).SerializeToString(),
        error="songs never encoded",
        error_type="NotFoundError",
    )
    ports.bus.publish("generation.requested.v1.dlq", "f", new_envelope("generator", dead))
    ready = generated_track_ready(track, "ann")
    ports.bus.publish("tracks.ready.v1", track, new_envelope("generator", ready))
    probe = generated_track_ready("probe1", "cy")  # a probe: published by the gateway itself
    ports.bus.publish("tracks.ready.v1", "probe1", new_envelope("gateway", probe))
    served = events_pb2.FeedbackBatch(
        items=[_rating("bob", track, 4, served_at=50.0), _rating("ann", track, 5, served_at=40.0)]
    )
    ports.bus.publish("feedback.received.v1", "bob", new_envelope("gateway", served))
    promote, canary = common_pb2.MODEL_ACTION_PROMOTE, common_pb2.MODEL_ACTION_CANARY
    for version, action in (("v1", promote), ("v2", canary)):
        published = events_pb2.ModelPublished(version=version, parent_version="v0", action=action)
        ports.bus.publish("model.published.v1", "models", new_envelope("trainer", published))

    plan = gateway_rebuild_plan(ports.kv, dispatcher, producer="gateway")
    rebuild(ports.bus, ports.kv, plan)
    first = _state_of(ports, "gw:", "gw:rebuilt")
    record = json.loads(first[f"gw:track:{track}"])
    assert (record["owner"], record["status"], record["kind"]) == ("ann", "ready", "generated")
    assert record["ready_at"] == pytest.approx(json.loads(first["gw:queue"][track])["ready_at"])
    failed_record = json.loads(first[f"gw:track:{dispatcher.track_id_for(failed.request_id)}"])
    assert (failed_record["status"], failed_record["failure_reason"]) == (
        "failed",
        "songs never encoded",
    )
    probe_record = json.loads(first["gw:track:probe1"])
    assert probe_record["owner"] == "" and "probe1" not in first["gw:queue"]
    assert first["gw:served:probe1:cy"] and first[f"gw:served:{track}:bob"] == repr(50.0)
    assert f"gw:served:{track}:ann" not in first  # her own track: no serve to record
    assert first[f"gw:rated:{track}:bob"] == first[f"gw:rated:{track}:ann"] == "1"
    assert first["gw:queue:served"] == {track: repr(1.0)}
    assert first["gw:models:current"] == "v1"  # a canary serves only a share
    assert set(first["gw:models"]) == {"v1", "v2"}

    _kv(ports).flush()
    rebuild(ports.bus, ports.kv, plan)
    rebuild(ports.bus, ports.kv, plan)
    assert _state_of(ports, "gw:", "gw:rebuilt") == first


def test_a_live_ready_record_is_never_turned_back_by_a_replayed_request() -> None:
    ports = _ports()
    dispatcher = _dispatcher()
    request = events_pb2.GenerationRequested(request_id="r" * 32, user_id="ann")
    track = dispatcher.track_id_for(request.request_id)
    live = TrackRecords(ports.kv, dispatcher, clock=lambda: 123.0)
    live.on_track_ready(new_envelope("generator", generated_track_ready(track, "ann")))
    ports.bus.publish("generation.requested.v1", "r", new_envelope("gateway", request))
    rebuild(ports.bus, ports.kv, gateway_rebuild_plan(ports.kv, dispatcher, producer="gateway"))
    record = json.loads(ports.kv.get(f"gw:track:{track}"))
    assert (record["status"], record["ready_at"]) == ("ready", 123.0)


def test_the_watch_rebuilds_when_the_marker_is_gone() -> None:
    ports = _ports()
    ports.bus.publish("tracks.ready.v1", "t1", new_envelope("g", generated_track_ready("t1", "a")))
    plan = feedback_rebuild_plan(ports.kv, ports.bus, producer="feedback")
    seen: list[int] = []
    watch = RebuildWatch(
        "feedback", ports.bus, ports.kv, plan, on_rebuilt=lambda r: seen.append(r.total)
    )
    assert watch.check() is not None and seen == [1]
    assert watch.check() is None  # the marker is there
    _kv(ports).flush()
    assert watch.check() is not None and seen == [1, 1] and watch.rebuilds == 2
    assert ports.kv.hget("fb:tracks", "t1")
    with pytest.raises(ValidationError):
        RebuildWatch("feedback", ports.bus, ports.kv, plan, interval_s=0)


def test_a_restarted_store_is_rebuilt_even_with_its_marker_kept() -> None:
    """Redis restarted from an append-only file that missed the last writes: the marker came
    back, but under another server process, so the watch replays the log over what survived."""
    ports = _ports()
    plan = feedback_rebuild_plan(ports.kv, ports.bus, producer="feedback")
    watch = RebuildWatch("feedback", ports.bus, ports.kv, plan)
    assert watch.check() is not None and watch.check() is None  # a new deployment
    state = FeedbackState(ports)
    _feedback_history(ports, state)
    complete = _state_of(ports, "fb:", FEEDBACK_REBUILT_MARKER)
    _kv(ports).restart(keep=0.5)
    assert ports.kv.get(FEEDBACK_REBUILT_MARKER) is not None  # kept: written first
    assert _state_of(ports, "fb:", FEEDBACK_REBUILT_MARKER) != complete
    assert not is_rebuilt(ports.kv, plan)
    assert watch.check() is not None
    assert _state_of(ports, "fb:", FEEDBACK_REBUILT_MARKER) == complete
    assert watch.check() is None


def test_the_rebuild_command_refuses_bad_arguments_and_the_embedded_backend(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan_of = lambda ports: feedback_rebuild_plan(ports.kv, ports.bus, producer="x")  # noqa: E731
    settings = Settings()  # embedded
    assert rebuild_command("prog", ["rebuild", "--everything"], settings, plan_of) == 2
    assert "unrecognized arguments: --everything" in capsys.readouterr().err
    assert rebuild_command("prog", ["rebiuld"], settings, plan_of) == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match="RIFFLOOP_BACKEND=real"):
        rebuild_command("prog", ["rebuild"], settings, plan_of)


def _publish_ready(ports: Ports, track_id: str, owner: str) -> None:
    audio = ports.objects.put("tracks", f"{track_id}.wav", wav_bytes(1.0), content_type="audio/wav")
    ready = generated_track_ready(track_id, owner, audio=audio.to_proto())
    ports.bus.publish("tracks.ready.v1", track_id, new_envelope("generator", ready))


def test_services_notice_a_flush_and_rebuild_while_serving(auth: Auth) -> None:
    """FLUSHDB under a running gateway and feedback service: within a check or two the
    records, the once-keys and the ledger's mirror are back; a restarted feedback service
    counts every rating once."""
    ports = shared_ports()
    gateway = start_service("gateway", ports, audio=lambda _: 1.0, rebuild_check_s=0.1)
    feedback = start_service("feedback", ports, scorer="inline", rebuild_check_s=0.1)
    try:
        stub = pb_grpc.GatewayServiceStub(gateway.channel)
        tracks = [f"t{i}" for i in range(6)]
        for track_id in tracks:
            _publish_ready(ports, track_id, "ann")
        wait_for(lambda: len(ports.kv.hgetall("gw:queue")) == 6, what="six queued tracks")
        for i, track_id in enumerate(tracks[:3]):
            stub.Rate(pb.RateRequest(track_id=track_id, stars=1 + i), metadata=auth("ann"))
        wait_for(lambda: len(ports.kv.hgetall("fb:tracks")) == 6, what="feedback's tracks")
        wait_for(lambda: _ratings(feedback.state) and len(_ratings(feedback.state)) == 3)

        _kv(ports).flush()
        markers = ("gw:rebuilt", FEEDBACK_REBUILT_MARKER)
        wait_for(
            lambda: all(ports.kv.get(m) not in (None, "rebuilding") for m in markers),
            what="both services rebuilt",
        )
        wait_for(lambda: all(ports.kv.hget(f"fb:ratings:{t}", "ann") for t in tracks[:3]))
        with pytest.raises(grpc.RpcError) as again:  # its once-key came back from the log
            stub.Rate(pb.RateRequest(track_id=tracks[0], stars=5), metadata=auth("ann"))
        assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
        for i, track_id in enumerate(tracks[3:]):  # the records are back: rating goes on
            stub.Rate(pb.RateRequest(track_id=track_id, stars=1 + i), metadata=auth("ann"))
        wait_for(lambda: len(_ratings(feedback.state)) == 6, what="six ratings")
    finally:
        for running in (gateway, feedback):
            running.channel.close()
            running.runtime.stop()
    restarted = FeedbackState(ports)
    restarted.rebuild()
    assert _ratings(restarted) == _ratings(feedback.state)


def _pair(target: str, iteration: int) -> Any:
    from riffloop.loop import TrainingPair

    return TrainingPair(
        input_key="a" * 64,
        input_song_ids=("a" * 64,),
        target_track_id=target,
        weight=0.8,
        score=4.0,
        margin=0.5,
        iteration=iteration,
        model_version="v1",
        embedding=(0.1, 0.2),
    )


def test_the_selectors_scores_last_set_and_purged_pairs_come_back_from_the_log() -> None:
    """Three sets on the log (in no order across partitions): the pairs each next set left out
    are purged at its iteration, the newest set is the selector's last, and the scores and
    served model are what its consumer wrote."""
    from riffloop.loop import manifest_json
    from services.selector._service import SelectorSettings, SelectorState

    ports = _ports()
    settings = SelectorSettings()
    live = SelectorState(ports, settings)
    batch = events_pb2.TrackScoredBatch()
    for track_id in ("a", "b", "c", "d", "e"):
        item = batch.items.add(track_id=track_id, mean_rating=4.0, confidence=0.8, rating_count=3)
        item.provenance.CopyFrom(generated_track_ready(track_id, "ann").provenance)
    scored = new_envelope("feedback", batch)
    ports.bus.publish("tracks.scored.v1", "track-scores", scored)
    live.on_track_scored(scored)
    promoted = events_pb2.ModelPublished(
        version="v2", parent_version="v1", action=common_pb2.MODEL_ACTION_PROMOTE
    )
    ports.bus.publish("model.published.v1", "models", new_envelope("trainer", promoted))
    live.on_model_published(new_envelope("trainer", promoted))
    sets = {1: ("a", "b", "c"), 2: ("b", "c", "d"), 3: ("c", "d", "e")}
    for iteration in (3, 1, 2):
        pairs = [_pair(t, iteration) for t in sets[iteration]]
        trainset_id = f"ts-{iteration:04d}"
        ref = ports.objects.put(
            "trainsets", f"{trainset_id}.json", manifest_json(pairs, trainset_id).encode()
        )
        event = events_pb2.TrainsetPublished(
            trainset_id=trainset_id,
            manifest=ref.to_proto(),
            pair_count=3,
            iteration=iteration,
            model_version="v1",
        )
        ports.bus.publish("trainset.published.v1", trainset_id, new_envelope("selector", event))
    scores_before = ports.kv.hgetall("sel:scores")

    def handlers() -> dict[str, Any]:
        fresh = SelectorState(ports, settings)
        return {
            "tracks.scored.v1": fresh.on_track_scored,
            "model.published.v1": fresh.on_model_published,
        }

    plan = selector_rebuild_plan(ports.kv, ports.objects, handlers, purges=True)
    _kv(ports).flush()
    rebuild(ports.bus, ports.kv, plan)
    assert ports.kv.hgetall("sel:purged") == {"a": "2", "b": "3"}
    last = json.loads(ports.kv.get("sel:trainset"))
    assert (last["trainset_id"], last["iteration"], last["published"]) == ("ts-0003", 3, True)
    assert [p["target_track_id"] for p in last["pairs"]] == ["c", "d", "e"]
    assert ports.kv.hgetall("sel:scores") == scores_before and ports.kv.get("sel:model") == "v2"
    first = _state_of(ports, "sel:", "sel:rebuilt")
    rebuild(ports.bus, ports.kv, plan)
    assert _state_of(ports, "sel:", "sel:rebuilt") == first
    restarted = SelectorState(ports, settings)
    restarted.rebuild()
    assert restarted.trainset == last and set(restarted.scores) == set("abcde")

    control = selector_rebuild_plan(ports.kv, ports.objects, handlers, purges=False)
    _kv(ports).flush()
    rebuild(ports.bus, ports.kv, control)
    assert ports.kv.hgetall("sel:purged") == {}  # the random arm purges nothing
    # and draws the next set from what no set trained on yet
    assert json.loads(ports.kv.get("sel:trainset"))["seen"] == list("abcde")


@pytest.mark.integration
@pytest.mark.slow
def test_a_running_canarys_evidence_comes_back_from_the_log() -> None:
    """A trainer watching a canary: Redis flushed, its watch rebuilds the evidence and looks
    from model.published.v1 and tracks.scored.v1; a trainer started then resumes the canary
    with all of it."""
    from riffloop.loop import GateReport, GateVerdict
    from services.trainer import TrainerHandlers, TrainerSettings

    ports = shared_ports()
    canary = {"canary_min_ratings": 4, "canary_max_ratings": 40, "canary_share": 0.25}
    trainer = start_service("trainer", ports, rebuild_check_s=0.1, **canary)
    try:
        core = trainer.state
        wait_for(lambda: core.store.current() is not None, 60, "the base model")
        child = core.store.load("v0001")
        child.version, child.parent = "v0002", "v0001"
        passed = GateVerdict(GateReport(True, 1.0, 1.0, 1.0, 1.0, 0.25, 0.15), samples=16)
        core.cycle.start_canary(child, trainset_id="ts-c", gate=passed)
        for i in range(5):
            for track_id, version in ((f"p{i}", "v0001"), (f"c{i}", "v0002")):
                provenance = common_pb2.TrackProvenance(
                    kind=common_pb2.TRACK_KIND_GENERATED, model_version=version
                )
                scored = events_pb2.TrackScored(
                    track_id=track_id,
                    mean_rating=3.0 + (i % 3) * 0.5,
                    rating_count=3,
                    confidence=0.5,
                    provenance=provenance,
                )
                ports.bus.publish("tracks.scored.v1", "track-scores", new_envelope("fb", scored))
        key = "trainer:canary:v0002"
        wait_for(lambda: len(ports.kv.hgetall(key)) == 10, 60, "the watch's evidence")
        before = (ports.kv.hgetall(key), ports.kv.get(key + ":looks"))
        assert before[1] == "1"  # 5 generations a side reached the first look (4)
        _kv(ports).flush()
        wait_for(lambda: is_rebuilt(ports.kv, _trainer_plan(ports)), 30, "the rebuild")
        assert (ports.kv.hgetall(key), ports.kv.get(key + ":looks")) == before
    finally:
        trainer.channel.close()
        trainer.runtime.stop()
    restarted = TrainerHandlers(TrainerSettings(**canary), ports)
    assert restarted.cycle.resume_canary() == "v0002"
    assert sorted(restarted.cycle.evidence) == sorted(before[0])
    assert restarted.cycle.looks_taken == 1


def _trainer_plan(ports: Ports) -> RebuildPlan:
    from services.trainer import TrainerSettings
    from services.trainer._build import rebuild_plan

    return rebuild_plan(TrainerSettings(), ports)

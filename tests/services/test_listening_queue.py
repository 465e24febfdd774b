"""The listening queue: any listener hears tracks made for anyone, blind, and rates them.

The gateway and the feedback service on shared in-memory ports; the generator's TrackReady
events are published by hand (the tracks' audio put in the object store), so these tests run in
a second. The same path on real servers, six processes, is tests/e2e/test_listening_queue_e2e.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from riffloop.loop import QueuedTrack, QueuePolicy, TrackKind, choose_next_track
from riffloop.v1 import common_pb2, events_pb2
from riffloop.v1 import gateway_service_pb2 as pb
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc
from tests.services.conftest import Running, shared_ports, start_service, wait_for, wav_bytes

pytestmark = pytest.mark.contract

Auth = Callable[[str], tuple[tuple[str, str], ...]]


def _publish_ready(
    running: dict[str, Running], track_id: str, owner: str, kind: int, sample: str = ""
) -> None:
    ports = running["gateway"].state
    audio = ports.objects.put("tracks", f"{track_id}.wav", wav_bytes(6.0), content_type="audio/wav")
    ready = events_pb2.TrackReady(
        track_id=track_id,
        user_id=owner,
        duration_seconds=6.0,
        audio=audio.to_proto(),
        provenance=common_pb2.TrackProvenance(
            kind=kind,
            model_version="v0001",
            input_song_ids=["a" * 64],
            similarity=0.5,
            quality=5,
            start_step=2 if kind == common_pb2.TRACK_KIND_GENERATED else 0,
            baseline_song_id=sample or "corpus#1",
        ),
    )
    ports.publish("tracks.ready.v1", track_id, ready)


def _stack(**gateway: object) -> dict[str, Running]:
    ports = shared_ports()
    return {
        "gateway": start_service("gateway", ports, audio=lambda _: 6.0, **gateway),
        "feedback": start_service("feedback", ports, score_interval_s=0.2, scorer="inline"),
    }


@pytest.fixture
def services() -> Iterator[dict[str, Running]]:
    running = _stack()
    try:
        yield running
    finally:
        for r in running.values():
            r.channel.close()
            r.runtime.stop()


def _queued(gateway: Running, n: int) -> None:
    wait_for(lambda: len(gateway.state.kv.hgetall("gw:queue")) >= n, what=f"{n} queued tracks")


def _ratings(running: dict[str, Running]) -> set[tuple[str, str, int]]:
    state = running["feedback"].state
    with state.lock:
        return {(o.track_id, o.rater_id, o.stars) for o in state.ledger.observations()}


def test_a_listener_who_uploaded_nothing_hears_and_rates_everyones_tracks(
    services: dict[str, Running], auth: Auth
) -> None:
    stub = pb_grpc.GatewayServiceStub(services["gateway"].channel)
    _publish_ready(services, "a1", "alice", common_pb2.TRACK_KIND_GENERATED)
    _publish_ready(services, "a2", "alice", common_pb2.TRACK_KIND_BASELINE)
    _publish_ready(services, "b1", "bob", common_pb2.TRACK_KIND_GENERATED)
    _queued(services["gateway"], 3)

    # Before being served a track, carol may neither fetch nor rate it.
    with pytest.raises(grpc.RpcError) as denied:
        stub.Rate(pb.RateRequest(track_id="a1", stars=4), metadata=auth("carol"))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    heard = []
    for _ in range(3):
        response = stub.NextTrack(pb.NextTrackRequest(), metadata=auth("carol"))
        assert response.HasField("track")
        assert response.track.status == pb.TRACK_STATUS_READY
        heard.append(response.track.track_id)
    assert sorted(heard) == ["a1", "a2", "b1"]
    # nothing left for carol; alice is only ever served bob's track, never her own
    assert not stub.NextTrack(pb.NextTrackRequest(), metadata=auth("carol")).HasField("track")
    only = stub.NextTrack(pb.NextTrackRequest(), metadata=auth("alice"))
    assert only.track.track_id == "b1"

    for track_id in heard:
        audio = b"".join(
            m.chunk
            for m in stub.StreamAudio(
                pb.StreamAudioRequest(track_id=track_id), metadata=auth("carol")
            )
        )
        assert audio[:4] == b"RIFF"
        stub.Rate(pb.RateRequest(track_id=track_id, stars=4), metadata=auth("carol"))
        stub.ReportListen(
            pb.ReportListenRequest(track_id=track_id, seconds_listened=6.0, completed=True),
            metadata=auth("carol"),
        )
    stub.Rate(pb.RateRequest(track_id="a1", stars=2), metadata=auth("alice"))  # her own
    wait_for(lambda: len(_ratings(services)) == 4, what="four ratings recorded")
    assert _ratings(services) == {
        ("a1", "carol", 4),
        ("a2", "carol", 4),
        ("b1", "carol", 4),
        ("a1", "alice", 2),
    }
    # bob was never served alice's tracks
    with pytest.raises(grpc.RpcError) as denied:
        stub.GetTrack(pb.GetTrackRequest(track_id="a1"), metadata=auth("bob"))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_queue_spreads_a_track_over_its_target_of_listeners(auth: Auth) -> None:
    running = _stack(queue_target_listeners=3, probe_share=0.0)
    try:
        stub = pb_grpc.GatewayServiceStub(running["gateway"].channel)
        _publish_ready(running, "t1", "alice", common_pb2.TRACK_KIND_GENERATED)
        _queued(running["gateway"], 1)
        served = [
            stub.NextTrack(pb.NextTrackRequest(), metadata=auth(f"u{i}")).HasField("track")
            for i in range(5)
        ]
        assert served == [True, True, True, False, False]  # out of the queue after 3
        assert running["gateway"].state.kv.hgetall("gw:queue") == {}
    finally:
        for r in running.values():
            r.channel.close()
            r.runtime.stop()


def test_a_rated_baseline_comes_back_under_a_new_id_as_a_consistency_probe(auth: Auth) -> None:
    running = _stack(probe_share=1.0)
    try:
        stub = pb_grpc.GatewayServiceStub(running["gateway"].channel)
        _publish_ready(running, "z0", "alice", common_pb2.TRACK_KIND_BASELINE, sample="s#7")
        _queued(running["gateway"], 1)
        first = stub.NextTrack(pb.NextTrackRequest(), metadata=auth("carol")).track
        assert first.track_id == "z0"  # nothing rated yet: no probe, the queue's track
        stub.Rate(pb.RateRequest(track_id="z0", stars=5), metadata=auth("carol"))
        probe = stub.NextTrack(pb.NextTrackRequest(), metadata=auth("carol")).track
        assert probe.track_id != "z0"
        assert len(probe.track_id) == 20  # the form of every id the dispatcher derives
        assert probe.size_bytes == first.size_bytes
        stub.Rate(pb.RateRequest(track_id=probe.track_id, stars=1), metadata=auth("carol"))
        wait_for(lambda: len(_ratings(running)) == 2, what="both ratings recorded")
        state = running["feedback"].state
        with state.lock:
            samples = {o.track_id: o.baseline_sample_id for o in state.ledger.observations()}
        # the spam filter compares the same z0's two ratings: 5 then 1 is inconsistent
        assert samples["z0"] == samples[probe.track_id] == "s#7"
    finally:
        for r in running.values():
            r.channel.close()
            r.runtime.stop()


def _at(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def test_a_batch_keeps_each_items_client_time_and_refuses_a_clock_a_day_off(
    services: dict[str, Running], auth: Auth
) -> None:
    """An honest client that queued ratings and sends them at once keeps their spacing (the
    burst check reads these times); a device clock days off is refused with its reason."""
    stub = pb_grpc.GatewayServiceStub(services["gateway"].channel)
    for i in range(4):
        _publish_ready(services, f"q{i}", "alice", common_pb2.TRACK_KIND_GENERATED)
    _queued(services["gateway"], 4)
    ids = [stub.NextTrack(pb.NextTrackRequest(), metadata=auth("dan")).track.track_id]
    ids += [
        stub.NextTrack(pb.NextTrackRequest(), metadata=auth("dan")).track.track_id for _ in range(3)
    ]
    now = time.time()
    later = [now + 0.5 * i for i in range(3)]  # within [served, receipt]: clamped to receipt
    request = pb.SubmitFeedbackRequest()
    for track_id, at in zip(ids[:3], later, strict=True):
        request.items.add(rating=pb.RateRequest(track_id=track_id, stars=3, client_time=_at(at)))
    request.items.add(
        rating=pb.RateRequest(track_id=ids[3], stars=3, client_time=_at(now - 3 * 24 * 3600))
    )
    response = stub.SubmitFeedback(request, metadata=auth("dan"))
    assert [r.code for r in response.results[:3]] == [0, 0, 0]
    assert response.results[3].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "clock" in response.results[3].reason
    wait_for(lambda: len(_ratings(services)) == 3, what="three ratings")
    state = services["feedback"].state
    with state.lock:
        times = sorted(o.submitted_at for o in state.ledger.observations())
    assert len(set(times)) == 3  # each item's own time, not the batch's one receipt time


def test_choose_next_track_draws_the_kind_then_the_least_served() -> None:
    policy = QueuePolicy(target_listeners=5, baseline_share=0.25)
    now = 1000.0
    waiting = [
        QueuedTrack("g1", TrackKind.GENERATED, "alice", ready_at=10.0, served=2),
        QueuedTrack("g2", TrackKind.GENERATED, "alice", ready_at=20.0, served=1),
        QueuedTrack("b1", TrackKind.BASELINE, "bob", ready_at=30.0, served=4),
        QueuedTrack("b2", TrackKind.BASELINE, "carol", ready_at=5.0, served=0),
        QueuedTrack("old", TrackKind.GENERATED, "bob", ready_at=now - 8 * 24 * 3600, served=0),
        QueuedTrack("full", TrackKind.GENERATED, "bob", ready_at=1.0, served=5),
    ]
    pick = choose_next_track
    assert pick(policy, waiting, "dan", set(), u=0.9, now_s=now).track_id == "g2"
    assert pick(policy, waiting, "dan", set(), u=0.1, now_s=now).track_id == "b2"
    # carol's own baseline is never hers to hear; b1 is the other baseline
    assert pick(policy, waiting, "carol", set(), u=0.1, now_s=now).track_id == "b1"
    # nothing of the drawn kind left: the other kind
    assert pick(policy, waiting, "dan", {"b1", "b2"}, u=0.1, now_s=now).track_id == "g2"
    assert pick(policy, waiting, "dan", {"g1", "g2", "b1", "b2"}, u=0.5, now_s=now) is None

"""Every malformed gateway call gets the right status code and a reason; the gateway keeps serving.

Runs the gateway alone on in-memory ports; a ready track is made by publishing a TrackReady on
the bus (the path the generator takes), so the consumer side is exercised too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import grpc
import pytest

from riffloop.core import new_envelope
from riffloop.v1 import common_pb2, events_pb2
from riffloop.v1 import gateway_service_pb2 as pb
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc
from tests.services.conftest import Running, shared_ports, start_service, wait_for, wav_bytes

pytestmark = pytest.mark.contract

Auth = Callable[[str], tuple[tuple[str, str], ...]]
MAX_UPLOAD = 256 * 1024


@pytest.fixture(scope="module")
def gateway() -> Iterator[Running]:
    running = start_service(
        "gateway",
        shared_ports(),
        max_upload_bytes=MAX_UPLOAD,
        rate_limit_per_s=10.0,
        rate_limit_burst=40,
        max_feedback_batch=20,
        # every call one token here: the per-method costs are test_gateway_limits.py's
        generate_cost=1,
        upload_cost=1,
        mel_image_cost=1,
    )
    yield running
    running.channel.close()
    running.runtime.stop()


@pytest.fixture
def stub(gateway: Running) -> pb_grpc.GatewayServiceStub:
    return pb_grpc.GatewayServiceStub(gateway.channel)


def upload(
    data: bytes,
    content_type: str = "audio/wav",
    chunk: int = 16 * 1024,
    metadata_first: bool = True,
) -> Iterator[pb.UploadSongRequest]:
    meta = pb.UploadSongRequest(
        metadata=pb.UploadSongMetadata(title="t", content_type=content_type)
    )
    if metadata_first:
        yield meta
    for i in range(0, len(data), chunk):
        yield pb.UploadSongRequest(chunk=data[i : i + chunk])
    if not metadata_first:
        yield meta


def expect(code: grpc.StatusCode, call: Callable[[], object], reason: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() is code, info.value.details()
    assert reason in (info.value.details() or ""), info.value.details()
    assert "Traceback" not in (info.value.details() or "")


def publish_track_ready(ports: Any, track_id: str, song_id: str, user: str) -> None:
    """What the generator does when a track is made: its audio stored, TrackReady published."""
    ref = ports.objects.put("tracks", f"{track_id}.wav", wav_bytes(0.5))
    ready = events_pb2.TrackReady(
        track_id=track_id,
        audio=ref.to_proto(),
        provenance=common_pb2.TrackProvenance(
            kind=common_pb2.TRACK_KIND_GENERATED,
            model_version="v0001",
            input_song_ids=[song_id],
            similarity=0.5,
            quality=50,
        ),
        user_id=user,
        duration_seconds=0.5,
    )
    ports.bus.publish("tracks.ready.v1", track_id, new_envelope("test", ready))


def make_ready_track(
    gateway: Running, stub: pb_grpc.GatewayServiceStub, auth: Auth, user: str
) -> str:
    song = stub.UploadSong(upload(wav_bytes(2.0, 330.0)), metadata=auth(user), timeout=10)
    response = stub.Generate(
        pb.GenerateRequest(song_ids=[song.song_id], similarity=0.5), metadata=auth(user), timeout=10
    )
    bus_ports = gateway.state  # the gateway's ports (shared in-memory adapters)
    publish_track_ready(bus_ports, response.track_id, song.song_id, user)
    key = f"gw:track:{response.track_id}"
    wait_for(lambda: '"ready"' in (bus_ports.kv.get(key) or ""), 10, "track ready")
    return response.track_id


def test_upload_generate_and_stream_round_trip(gateway: Running, stub, auth: Auth) -> None:
    data = wav_bytes(2.0)
    song = stub.UploadSong(upload(data), metadata=auth("alice"), timeout=10)
    assert len(song.song_id) == 64 and song.duration_seconds == pytest.approx(2.0, abs=0.01)
    again = stub.UploadSong(upload(data), metadata=auth("alice"), timeout=10)
    assert again.song_id == song.song_id and again.already_existed
    track_id = make_ready_track(gateway, stub, auth, "alice")
    chunks = list(
        stub.StreamAudio(
            pb.StreamAudioRequest(track_id=track_id, chunk_size=4096),
            metadata=auth("alice"),
            timeout=10,
        )
    )
    body = b"".join(c.chunk for c in chunks)
    assert len(body) == chunks[0].total_size_bytes and body[:4] == b"RIFF"
    rated = stub.Rate(pb.RateRequest(track_id=track_id, stars=4), metadata=auth("alice"))
    assert rated.event_id


def test_the_typed_client_streams_uploads_and_audio(
    gateway: Running, stub, auth: Auth, tmp_path
) -> None:
    """Bytes, a path and an open file upload the same song; audio comes as a stream."""
    import io

    from riffloop.client import GatewayClient

    token = dict(auth("lee"))["authorization"].removeprefix("Bearer ")
    client = GatewayClient("unused", token, channel=gateway.channel)
    data = wav_bytes(2.0, 612.0)
    (tmp_path / "song.wav").write_bytes(data)
    first = client.upload_song(data)
    from_path = client.upload_song(tmp_path / "song.wav")
    from_file = client.upload_song(io.BytesIO(data))
    assert first.song_id == from_path.song_id == from_file.song_id
    assert from_path.already_existed and from_file.already_existed
    track_id = make_ready_track(gateway, stub, auth, "lee")
    chunks = list(client.iter_audio(track_id, chunk_size=4096))
    assert len(chunks) > 1 and all(len(c) <= 4096 for c in chunks)
    assert b"".join(chunks) == client.audio(track_id)


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("no-metadata", grpc.StatusCode.INVALID_ARGUMENT, "metadata must be the first message"),
        ("empty", grpc.StatusCode.INVALID_ARGUMENT, "no audio bytes"),
        ("oversized", grpc.StatusCode.INVALID_ARGUMENT, f"limit of {MAX_UPLOAD} bytes"),
        ("corrupt", grpc.StatusCode.INVALID_ARGUMENT, "not a recognised audio file"),
        ("too-short", grpc.StatusCode.INVALID_ARGUMENT, "at least 1.5 s"),
        ("silent", grpc.StatusCode.INVALID_ARGUMENT, "silent"),
        ("content-type", grpc.StatusCode.INVALID_ARGUMENT, "is not supported"),
    ],
)
def test_bad_uploads_are_refused_with_a_reason(
    stub, auth: Auth, case: str, code: grpc.StatusCode, reason: str
) -> None:
    requests = {
        "no-metadata": lambda: upload(wav_bytes(2.0), metadata_first=False),
        "empty": lambda: upload(b""),
        "oversized": lambda: upload(b"\0" * (MAX_UPLOAD + 1)),
        "corrupt": lambda: upload(b"RIFF" + b"\x13" * 5000),
        "content-type": lambda: upload(wav_bytes(2.0), content_type="text/html"),
        "too-short": lambda: upload(wav_bytes(0.5)),
        "silent": lambda: upload(wav_bytes(2.0, amplitude=0.0)),
    }[case]
    expect(code, lambda: stub.UploadSong(requests(), metadata=auth("bob"), timeout=10), reason)


def test_uploads_beyond_the_concurrency_limit_are_refused_until_one_finishes(auth: Auth) -> None:
    """Each upload is decoded in the gateway: past RIFFLOOP_MAX_CONCURRENT_UPLOADS decodes at
    once the next upload waits RIFFLOOP_UPLOAD_DECODE_WAIT_S, then gets RESOURCE_EXHAUSTED (with
    retry-after-ms), and succeeds once the slot is free. A client still sending holds no slot."""
    import threading

    from services.gateway import GatewaySettings
    from services.gateway._build import audio_probe

    decoding, proceed = threading.Event(), threading.Event()
    real = audio_probe(GatewaySettings(auth_secret="x" * 16))

    def slow_decode(spooled: BinaryIO) -> float:
        decoding.set()
        proceed.wait(30)
        return float(real(spooled))

    running = start_service(
        "gateway",
        shared_ports(),
        max_concurrent_uploads=1,
        upload_decode_wait_s=1.0,
        audio=slow_decode,
    )
    stub = pb_grpc.GatewayServiceStub(running.channel)
    stalled = threading.Event()

    def stalled_upload() -> Iterator[pb.UploadSongRequest]:
        first, *_ = list(upload(wav_bytes(2.0, 440.0)))
        yield first
        stalled.wait(30)  # a client that stops sending

    try:
        stalling = stub.UploadSong.future(stalled_upload(), metadata=auth("eve"), timeout=60)
        held: dict[str, object] = {}
        sender = threading.Thread(
            target=lambda: held.update(
                song=stub.UploadSong(upload(wav_bytes(2.0, 441.0)), metadata=auth("carol"))
            )
        )
        sender.start()
        assert decoding.wait(30)  # carol's upload is decoding: the only slot is taken
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadSong(upload(wav_bytes(2.0)), metadata=auth("dave"), timeout=10)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many uploads in progress on this gateway (limit 1)" in info.value.details()
        assert dict(info.value.trailing_metadata())["retry-after-ms"] == "2000"
        proceed.set()
        sender.join(30)
        assert getattr(held["song"], "song_id", "")
        # eve is still stalled mid-stream, and holds nothing
        song = stub.UploadSong(upload(wav_bytes(2.0)), metadata=auth("dave"), timeout=10)
        assert len(song.song_id) == 64
        stalled.set()
        stalling.cancel()
    finally:
        proceed.set()
        stalled.set()
        running.channel.close()
        running.runtime.stop()


@pytest.mark.parametrize(
    ("request_", "code", "reason"),
    [
        (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "1 to 3 songs"),
        (pb.GenerateRequest(song_ids=["a"] * 4), grpc.StatusCode.INVALID_ARGUMENT, "1 to 3"),
        (pb.GenerateRequest(song_ids=["../etc"]), grpc.StatusCode.INVALID_ARGUMENT, "sha256"),
        (
            pb.GenerateRequest(song_ids=["a" * 64], similarity=1.0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "similarity",
        ),
        (
            pb.GenerateRequest(song_ids=["a" * 64], similarity=float("nan")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "similarity",
        ),
        (
            pb.GenerateRequest(song_ids=["a" * 64], quality=5000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "quality",
        ),
        *[
            (
                pb.GenerateRequest(song_ids=["a" * 64], duration_seconds=d),
                grpc.StatusCode.INVALID_ARGUMENT,
                "duration_seconds must lie in",
            )
            for d in (-1.0, 1.0, 61.0, float("nan"), float("inf"))
        ],
        (
            pb.GenerateRequest(song_ids=["a" * 64], duration_seconds=30.0),
            grpc.StatusCode.NOT_FOUND,
            "never uploaded",
        ),
        (pb.GenerateRequest(song_ids=["a" * 64]), grpc.StatusCode.NOT_FOUND, "never uploaded"),
    ],
)
def test_bad_generation_requests(stub, auth: Auth, request_, code, reason) -> None:
    expect(code, lambda: stub.Generate(request_, metadata=auth("carol"), timeout=5), reason)


def test_track_and_feedback_errors(gateway: Running, stub, auth: Auth) -> None:
    track_id = make_ready_track(gateway, stub, auth, "dave")
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.GetTrack(pb.GetTrackRequest(), metadata=auth("dave")),
        "required",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.GetTrack(pb.GetTrackRequest(track_id="x" * 65), metadata=auth("dave")),
        "track_id",
    )
    expect(
        grpc.StatusCode.NOT_FOUND,
        lambda: stub.GetTrack(pb.GetTrackRequest(track_id="nope"), metadata=auth("dave")),
        "does not exist",
    )
    expect(
        grpc.StatusCode.PERMISSION_DENIED,
        lambda: stub.Rate(pb.RateRequest(track_id=track_id, stars=3), metadata=auth("eve")),
        "not served to you",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.Rate(pb.RateRequest(track_id=track_id, stars=6), metadata=auth("dave")),
        "stars must be 1–5",
    )
    stub.Rate(pb.RateRequest(track_id=track_id, stars=2), metadata=auth("dave"))
    expect(
        grpc.StatusCode.ALREADY_EXISTS,
        lambda: stub.Rate(pb.RateRequest(track_id=track_id, stars=5), metadata=auth("dave")),
        "already rated",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.ReportListen(
            pb.ReportListenRequest(track_id=track_id, seconds_listened=-1), metadata=auth("dave")
        ),
        "seconds_listened",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.StreamAudio(
            pb.StreamAudioRequest(track_id=track_id, chunk_size=10), metadata=auth("dave")
        ).next(),
        "chunk_size",
    )


def _rating(track_id: str, stars: int) -> pb.FeedbackItem:
    return pb.FeedbackItem(rating=pb.RateRequest(track_id=track_id, stars=stars))


def _listen(track_id: str, seconds: float) -> pb.FeedbackItem:
    return pb.FeedbackItem(
        listen=pb.ReportListenRequest(track_id=track_id, seconds_listened=seconds)
    )


def test_submit_feedback_answers_each_item_and_publishes_one_event(
    gateway: Running, stub, auth: Auth
) -> None:
    mine = [make_ready_track(gateway, stub, auth, "hana") for _ in range(2)]
    theirs = make_ready_track(gateway, stub, auth, "ivan")
    subscription = gateway.state.bus.subscribe("test-batch", ["feedback.received.v1"])
    subscription.poll(0.1, 1000)  # from here on: this test's events only
    items = [
        _rating(mine[0], 5),  # accepted
        _listen(mine[0], 0.9),  # accepted: a timer overshooting the 0.5 s clip, clipped
        _rating(mine[0], 4),  # the same track twice in one batch
        _rating(mine[1], 0),  # stars out of range
        _listen(mine[1], 30.0),  # longer than the clip
        _rating(theirs, 3),  # served to someone else
        _rating("nope", 3),  # unknown track
        _rating("x" * 65, 3),  # malformed id
        pb.FeedbackItem(),  # neither kind
        _rating(mine[1], 2),  # accepted
    ]
    response = stub.SubmitFeedback(
        pb.SubmitFeedbackRequest(items=items), metadata=auth("hana"), timeout=10
    )
    codes = [grpc.StatusCode.OK.value[0]] * 2 + [
        grpc.StatusCode.ALREADY_EXISTS.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.PERMISSION_DENIED.value[0],
        grpc.StatusCode.NOT_FOUND.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.OK.value[0],
    ]
    assert [r.code for r in response.results] == codes, response
    assert response.accepted == 3 and response.event_id
    for result in response.results:
        assert (result.code == 0) == (result.reason == "")
        assert "Traceback" not in result.reason
    assert "already rated" in response.results[2].reason
    assert "exceeds the clip length" in response.results[4].reason
    # exactly one event, keyed by the user, carrying the accepted items in order
    messages = subscription.poll(2.0, 1000)
    subscription.close()
    assert len(messages) == 1 and messages[0].key == "hana"
    envelope = events_pb2.Envelope.FromString(messages[0].value)
    assert envelope.event_id == response.event_id
    batch = envelope.feedback_batch.items
    assert [(x.track_id, x.WhichOneof("feedback")) for x in batch] == [
        (mine[0], "rating"),
        (mine[0], "listen"),
        (mine[1], "rating"),
    ]
    assert batch[1].listen.clip_seconds == pytest.approx(0.5)
    assert batch[1].listen.seconds_listened == pytest.approx(0.5)  # what the ledger accepts
    # once only across calls too, and the unary Rate agrees
    again = stub.SubmitFeedback(
        pb.SubmitFeedbackRequest(items=[_rating(mine[1], 1)]), metadata=auth("hana")
    )
    assert again.results[0].code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert again.accepted == 0 and again.event_id == ""
    expect(
        grpc.StatusCode.ALREADY_EXISTS,
        lambda: stub.Rate(pb.RateRequest(track_id=mine[0], stars=1), metadata=auth("hana")),
        "already rated",
    )


def test_submit_feedback_batch_limits_and_item_priced_rate_limit(stub, auth: Auth) -> None:
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.SubmitFeedback(pb.SubmitFeedbackRequest(), metadata=auth("kim")),
        "1–20 items",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.SubmitFeedback(
            pb.SubmitFeedbackRequest(items=[_rating("nope", 3)] * 21), metadata=auth("kim")
        ),
        "got 21",
    )
    expect(  # larger than the burst too: still the size error, not "retry in …"
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.SubmitFeedback(
            pb.SubmitFeedbackRequest(items=[_rating("nope", 3)] * 41), metadata=auth("lou")
        ),
        "got 41",
    )
    # every item costs a token: burst 40 admits two batches of 20, not a third (the refused
    # batches above cost nothing)
    batch = pb.SubmitFeedbackRequest(items=[_rating("nope", 3)] * 20)
    for _ in range(2):
        response = stub.SubmitFeedback(batch, metadata=auth("lou"), timeout=5)
        assert response.accepted == 0
        assert {r.code for r in response.results} == {grpc.StatusCode.NOT_FOUND.value[0]}
    expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        lambda: stub.SubmitFeedback(batch, metadata=auth("lou"), timeout=5),
        "rate limit exceeded",
    )


def test_a_client_request_id_names_one_request_per_user(gateway: Running, stub, auth: Auth) -> None:
    song = stub.UploadSong(upload(wav_bytes(2.0, 620.0)), metadata=auth("ivy"), timeout=10)
    bus = gateway.state.bus
    subscription = bus.subscribe("idempotency-test", ["generation.requested.v1"])
    subscription.poll(0.1)

    def ask(user: str, key: str, similarity: float = 0.4) -> pb.GenerateResponse:
        request = pb.GenerateRequest(
            song_ids=[song.song_id], similarity=similarity, client_request_id=key
        )
        return stub.Generate(request, metadata=auth(user), timeout=5)

    first, retry = ask("ivy", "session-1:m0:r0"), ask("ivy", "session-1:m0:r0")
    assert (retry.request_id, retry.track_id) == (first.request_id, first.track_id)
    # the retry found its pending request and sent its event again (the first may be lost);
    # the generator's consumer is idempotent per request id
    sent = [m.key for m in subscription.poll(1.0, max_records=100)]
    assert sent == [first.request_id, first.request_id]
    # another user's key, or another key, is another request
    assert ask("jon", "session-1:m0:r0").track_id != first.track_id
    assert ask("ivy", "session-1:m0:r1").track_id != first.track_id
    subscription.close()
    # a key reused for different fields is a client bug
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: ask("ivy", "session-1:m0:r0", similarity=0.7),
        "already named a different request",
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: ask("ivy", "spaces are not allowed"),
        "client_request_id must be",
    )


def test_pending_track_cannot_be_streamed_or_rated(stub, auth: Auth) -> None:
    song = stub.UploadSong(upload(wav_bytes(2.0, 550.0)), metadata=auth("fay"), timeout=10)
    response = stub.Generate(pb.GenerateRequest(song_ids=[song.song_id]), metadata=auth("fay"))
    track = stub.GetTrack(pb.GetTrackRequest(track_id=response.track_id), metadata=auth("fay"))
    assert track.track.status == pb.TRACK_STATUS_PENDING
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: stub.Rate(
            pb.RateRequest(track_id=response.track_id, stars=3), metadata=auth("fay")
        ),
        "not ready",
    )


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "missing authorization"),
        ((("authorization", "Basic abc"),), "Bearer <token>"),
        ((("authorization", "Bearer nonsense"),), "malformed bearer token"),
        ((("authorization", "Bearer mallory.9999999999.AAAA"),), "signature does not match"),
    ],
)
def test_unauthenticated_calls_are_refused(stub, metadata, reason) -> None:
    expect(
        grpc.StatusCode.UNAUTHENTICATED,
        lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=5),
        reason,
    )


def test_expired_token_is_refused(stub) -> None:
    from riffloop.runtime import TokenSigner
    from tests.services.conftest import SECRET

    token = TokenSigner(SECRET, clock=lambda: 1_000.0).issue("old", ttl_s=1)
    expect(
        grpc.StatusCode.UNAUTHENTICATED,
        lambda: stub.ListModels(
            pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {token}"),)
        ),
        "expired",
    )


def test_rate_limit_is_per_user_and_the_gateway_keeps_serving(
    gateway: Running, stub, auth: Auth
) -> None:
    codes = []
    for _ in range(60):
        try:
            stub.ListModels(pb.ListModelsRequest(), metadata=auth("greedy"), timeout=5)
            codes.append("OK")
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "rate limit exceeded" in (error.details() or "")
            trailers = dict(error.trailing_metadata() or ())
            # when to come back, for clients (≈ one token at 10/s), and the request id
            assert 1 <= int(trailers["retry-after-ms"]) <= 100 and trailers["x-request-id"]
            codes.append("LIMITED")
    assert 38 <= codes.count("OK") <= 48, codes  # burst 40 (+ refill at 10/s meanwhile)
    assert codes[-1] == "LIMITED"
    # the typed client hands the wait on
    from riffloop.client import GatewayClient
    from riffloop.core import RateLimitedError

    token = dict(auth("greedy"))["authorization"].removeprefix("Bearer ")
    client = GatewayClient("unused", token, channel=gateway.channel)
    with pytest.raises(RateLimitedError) as limited:
        client.list_models()
    assert limited.value.retry_after_s is not None and 0 < limited.value.retry_after_s <= 0.1
    # Another user is unaffected, and so is the health probe.
    stub.ListModels(pb.ListModelsRequest(), metadata=auth("patient"), timeout=5)


def test_list_models_reports_published_versions_and_mean_ratings(
    gateway: Running, stub, auth: Auth
) -> None:
    """Versions come from model.published.v1; their ratings from the feedback service's read
    model (fb:model-ratings, written here as its scoring pass would)."""
    from riffloop.runtime import MODEL_RATINGS_KEY

    ports = gateway.state
    published = events_pb2.ModelPublished(version="v0001", action=common_pb2.MODEL_ACTION_PROMOTE)
    ports.bus.publish("model.published.v1", "v0001", new_envelope("trainer", published))
    wait_for(
        lambda: bool(stub.ListModels(pb.ListModelsRequest(), metadata=auth("lister")).models),
        10,
        "the published version in ListModels",
    )
    (model,) = stub.ListModels(pb.ListModelsRequest(), metadata=auth("lister")).models
    assert model.version == "v0001" and model.current and model.generated.rating_count == 0
    assert not model.generated.HasField("mean_stars_interval")

    def kind(stars: float, low: float | None, high: float | None, n: int, score: float) -> dict:
        return {
            "mean_stars": stars,
            "stars_low": low,
            "stars_high": high,
            "rating_count": n,
            "track_count": 1,
            "mean_normalised_score": score,
            "normalised_rating_count": n + 1,
        }

    rated = {
        "generated": kind(4.0, 3.2, 4.8, 4, 3.5),
        "baseline": kind(3.0, 1.0, 5.0, 2, 3.1),
    }
    base = {"generated": kind(2.0, None, None, 1, 2.5), "baseline": {}}
    ports.kv.hset(MODEL_RATINGS_KEY, {"v0001": json.dumps(rated), "v0000": json.dumps(base)})
    # v0000 was never announced (a base model is not): listed all the same, first, no parent
    first, model = stub.ListModels(pb.ListModelsRequest(), metadata=auth("lister")).models
    assert (first.version, first.parent_version, first.current) == ("v0000", "", False)
    assert (first.generated.mean_stars, first.generated.rating_count) == (2.0, 1)
    assert not first.generated.HasField("mean_stars_interval")  # one rating: no interval
    assert first.baseline == pb.ModelRatingSummary()
    g, b = model.generated, model.baseline
    assert (g.mean_stars, g.mean_stars_interval.low, g.mean_stars_interval.high) == (4.0, 3.2, 4.8)
    assert (g.rating_count, g.track_count) == (4, 1)
    assert (g.mean_normalised_score, g.normalised_rating_count) == (3.5, 5)
    assert (b.mean_stars, b.mean_stars_interval.low, b.rating_count) == (3.0, 1.0, 2)
    # the deprecated fields carry the normalised score, as before
    assert (model.mean_rating, model.rating_count) == (3.5, 5)
    assert (model.baseline_mean_rating, model.baseline_rating_count) == (3.1, 3)
    assert json.loads(ports.kv.hget("gw:models", "v0001"))["parent"] == ""


def test_an_upload_retried_after_its_event_was_lost_is_still_encoded(
    gateway: Running, stub, auth: Auth
) -> None:
    """The bytes were stored but SongUploaded was not published (UNAVAILABLE): the retry must
    announce the song again, or the encoder never sees it. Once encoded, a re-upload does not."""
    from riffloop.core import TransientError
    from riffloop.runtime import LATENTS_BUCKET, LatentRecord

    ports = gateway.state
    subscription = ports.bus.subscribe("test-uploads", ["songs.uploaded.v1"])
    subscription.poll(0.1, 1000)  # from here on: this test's events only
    data = wav_bytes(2.5, 523.0)

    def broker_away(topic: str, key: str, payload: object) -> str:
        raise TransientError("the broker is away")

    ports.publish = broker_away  # type: ignore[method-assign]
    try:
        expect(
            grpc.StatusCode.UNAVAILABLE,
            lambda: stub.UploadSong(upload(data), metadata=auth("jo"), timeout=10),
            "the broker is away",
        )
    finally:
        del ports.publish  # the class's method again
    again = stub.UploadSong(upload(data), metadata=auth("jo"), timeout=10)
    assert again.already_existed
    announced = [events_pb2.Envelope.FromString(m.value) for m in subscription.poll(2.0, 100)]
    assert [e.song_uploaded.song_id for e in announced] == [again.song_id]
    ports.objects.put(LATENTS_BUCKET, LatentRecord.key(again.song_id), b"encoded")
    stub.UploadSong(upload(data), metadata=auth("jo"), timeout=10)
    assert subscription.poll(0.5, 100) == []
    subscription.close()


def test_a_generation_the_generator_gave_up_on_turns_failed_with_its_reason(
    gateway: Running, stub, auth: Auth
) -> None:
    """generation.requested.v1.dlq → the client's track is FAILED with the generator's reason
    (a client-safe one; a bug's text is not shown), not PENDING for ever; a replay that then
    succeeds makes it READY."""
    from riffloop.core import ValidationError, publish_dead_letter

    ports = gateway.state
    requests = ports.bus.subscribe("test-requests", ["generation.requested.v1"])
    requests.poll(0.1, 1000)  # from here on: this test's requests only
    song = stub.UploadSong(upload(wav_bytes(2.0, 587.0)), metadata=auth("kim"), timeout=10)
    tracks = []
    for _ in range(2):
        response = stub.Generate(
            pb.GenerateRequest(song_ids=[song.song_id], similarity=0.5),
            metadata=auth("kim"),
            timeout=10,
        )
        tracks.append(response.track_id)
    records = requests.poll(2.0, 10)
    requests.close()
    assert len(records) == 2
    errors = [ValidationError(f"song {song.song_id[:8]} is not encoded"), KeyError("/srv/x")]
    for record, error in zip(records, errors, strict=True):
        publish_dead_letter(
            ports.bus,
            group="generator",
            topic="generation.requested.v1",
            key=record.key,
            value=record.value,
            event_id=events_pb2.Envelope.FromString(record.value).event_id,
            error=error,
            attempts=5,
        )

    def track(track_id: str) -> pb.Track:
        request = pb.GetTrackRequest(track_id=track_id)
        return stub.GetTrack(request, metadata=auth("kim"), timeout=10).track

    wait_for(lambda: all(track(t).status == pb.TRACK_STATUS_FAILED for t in tracks), 10, "fail")
    assert track(tracks[0]).failure_reason == f"song {song.song_id[:8]} is not encoded"
    assert track(tracks[1]).failure_reason == "the generator failed on this request"
    # the operator replays the DLQ after the fix, and the generator makes the track
    publish_track_ready(ports, tracks[0], song.song_id, "kim")
    wait_for(lambda: track(tracks[0]).status == pb.TRACK_STATUS_READY, 10, "ready")
    assert track(tracks[0]).failure_reason == ""


def test_a_track_ready_the_feedback_service_would_refuse_is_not_ready_here(
    gateway: Running,
) -> None:
    """The gateway and the feedback service check a TrackReady alike: a zero duration or a
    provenance without a kind is dead-lettered, and the track is not offered for rating."""
    from riffloop.core import ValidationError

    state = gateway.state
    bad = [
        events_pb2.TrackReady(
            track_id="zero-length",
            provenance=common_pb2.TrackProvenance(
                kind=common_pb2.TRACK_KIND_GENERATED,
                input_song_ids=["a" * 64],
                similarity=0.5,
                quality=5,
            ),
            duration_seconds=0.0,
        ),
        events_pb2.TrackReady(
            track_id="no-kind",
            provenance=common_pb2.TrackProvenance(input_song_ids=["a" * 64], quality=5),
            duration_seconds=1.0,
        ),
    ]
    from riffloop.loop import Dispatcher
    from services.gateway._service import GatewayEvents

    events = GatewayEvents(state, Dispatcher(key="test-dispatch-key"))
    for ready in bad:
        with pytest.raises(ValidationError):
            events.on_track_ready(new_envelope("test", ready))
        assert state.kv.get(f"gw:track:{ready.track_id}") is None

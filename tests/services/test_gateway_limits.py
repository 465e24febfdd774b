"""The gateway's resource bounds: spooled uploads with a server-side deadline, per-user in-flight
caps, per-method rate-limit costs, pending generations per user and admission control on the
generators' backlog. In-process gateway on in-memory ports."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from riffloop.core import (
    MemoryKeyValueStore,
    RateLimitedError,
    ValidationError,
    publish_dead_letter,
)
from riffloop.loop import AdmissionPolicy, GenerationBacklog
from riffloop.v1 import events_pb2
from riffloop.v1 import gateway_service_pb2 as pb
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc
from tests.services.conftest import Running, shared_ports, start_service, wait_for, wav_bytes
from tests.services.test_gateway_inputs import publish_track_ready, upload

pytestmark = pytest.mark.unit

Auth = Callable[[str], tuple[tuple[str, str], ...]]


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def spool_fds(directory: Path) -> list[str]:
    """Open files of this process that live (or lived, unlinked) in ``directory``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            out.append(target)
    return out


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Running]:
    running = start_service(
        "gateway",
        shared_ports(),
        max_upload_bytes=256 * 1024,
        upload_spool_dir=str(tmp_path),
        upload_deadline_s=1.5,
        max_user_uploads_in_flight=1,
        max_pending_generations_per_user=2,
        max_generation_backlog=3,
        generation_backlog_refresh_s=0.0,
    )
    yield running
    running.channel.close()
    running.runtime.stop()


def test_a_stalled_upload_ends_at_the_server_deadline_and_holds_nothing_after(
    gateway: Running, auth: Auth, tmp_path: Path
) -> None:
    """RIFFLOOP_UPLOAD_DEADLINE_S: a client that stops sending gets DEADLINE_EXCEEDED from the
    server (its own deadline is far off). While it stalls, its user's one upload place is
    taken (RESOURCE_EXHAUSTED with a reason); another user uploads meanwhile. After the
    deadline the place and the spool file are free again."""
    stub = pb_grpc.GatewayServiceStub(gateway.channel)
    release = threading.Event()

    def stalled() -> Iterator[pb.UploadSongRequest]:
        first, second, *_ = list(upload(wav_bytes(2.0, 440.0)))
        yield first
        yield second
        release.wait(30)

    try:
        call = stub.UploadSong.future(stalled(), metadata=auth("slow"), timeout=30)
        wait_for(lambda: bool(spool_fds(tmp_path)), 5, "the upload to be spooled")
        busy = refused(
            lambda: stub.UploadSong(upload(wav_bytes(2.0)), metadata=auth("slow"), timeout=10)
        )
        assert busy.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "uploads in progress for you: 1 (limit 1 per user)" in busy.details()
        other = stub.UploadSong(upload(wav_bytes(2.0, 300.0)), metadata=auth("fast"), timeout=10)
        assert len(other.song_id) == 64
        late = refused(lambda: call.result(timeout=20))
        assert late.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "the upload did not arrive within" in late.details(), late.details()
    finally:
        release.set()
    wait_for(lambda: not spool_fds(tmp_path), 10, "the stalled upload's spool file to close")
    song = stub.UploadSong(upload(wav_bytes(2.0, 500.0)), metadata=auth("slow"), timeout=10)
    assert song.duration_seconds == pytest.approx(2.0, abs=0.01)
    assert not spool_fds(tmp_path)


def test_an_upload_over_the_limit_stops_being_read_and_bad_audio_keeps_its_reason(
    gateway: Running, auth: Auth, tmp_path: Path
) -> None:
    stub = pb_grpc.GatewayServiceStub(gateway.channel)
    big = refused(
        lambda: stub.UploadSong(
            upload(b"RIFF" + b"\0" * (300 * 1024)), metadata=auth("big"), timeout=10
        )
    )
    assert big.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "upload exceeds the limit of 262144 bytes" in big.details()
    bad = refused(
        lambda: stub.UploadSong(upload(b"%PDF-1.4" * 400), metadata=auth("big"), timeout=10)
    )
    assert bad.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "a PDF document, not audio" in bad.details()
    meta = refused(
        lambda: stub.UploadSong(upload(wav_bytes(), "video/mp4"), metadata=auth("big"), timeout=10)
    )
    assert meta.code() is grpc.StatusCode.INVALID_ARGUMENT and "video/mp4" in meta.details()
    whole = stub.UploadWholeSong(
        pb.UploadWholeSongRequest(
            metadata=pb.UploadSongMetadata(content_type="audio/wav"), audio=wav_bytes(2.0, 610.0)
        ),
        metadata=auth("big"),
        timeout=10,
    )
    stored = gateway.state.objects.get("songs", whole.song_id)
    assert stored == wav_bytes(2.0, 610.0)
    wait_for(lambda: not spool_fds(tmp_path), 10, "spool files to close")


def test_costly_methods_pay_their_cost_in_rate_limit_tokens(auth: Auth) -> None:
    """A Generate pays RIFFLOOP_GENERATE_COST tokens and an upload (a stream)
    RIFFLOOP_UPLOAD_COST: with a burst of 10 two Generates pass, the third is refused."""
    ports = shared_ports()
    running = start_service(
        "gateway",
        ports,
        rate_limit_per_s=0.01,
        rate_limit_burst=10,
        max_feedback_batch=10,
        generate_cost=5,
        upload_cost=10,
    )
    stub = pb_grpc.GatewayServiceStub(running.channel)
    try:
        ports.objects.put("songs", "a" * 64, b"stored song")
        request = pb.GenerateRequest(song_ids=["a" * 64], similarity=0.5)
        for _ in range(2):
            stub.Generate(request, metadata=auth("spender"), timeout=10)
        third = refused(lambda: stub.Generate(request, metadata=auth("spender"), timeout=10))
        assert third.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate limit exceeded for user spender on Generate" in third.details()
        stub.UploadSong(upload(wav_bytes(2.0)), metadata=auth("uploader"), timeout=10)
        again = refused(
            lambda: stub.UploadSong(upload(wav_bytes(2.0)), metadata=auth("uploader"), timeout=10)
        )
        assert "rate limit exceeded for user uploader on UploadSong" in again.details()
    finally:
        running.channel.close()
        running.runtime.stop()


def test_pending_generations_are_capped_per_user_and_in_all(gateway: Running, auth: Auth) -> None:
    """Per user at most 2 pending requests; in all at most 3 (the generators' backlog). A
    ready track or a dead-lettered request frees its place; a keyed retry is never refused."""
    ports: Any = gateway.state
    stub = pb_grpc.GatewayServiceStub(gateway.channel)
    ports.objects.put("songs", "b" * 64, b"stored song")
    reader = ports.bus.subscribe("test-limits", ["generation.requested.v1"])
    reader.poll(0.1, 1000)

    def generate(user: str, key: str = "") -> pb.GenerateResponse:
        request = pb.GenerateRequest(song_ids=["b" * 64], similarity=0.5, client_request_id=key)
        return stub.Generate(request, metadata=auth(user), timeout=10)

    first = generate("ann", "ann-1")
    generate("ann")
    mine = refused(lambda: generate("ann"))
    assert mine.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "pending generation requests are 2 default requests' worth" in mine.details()
    assert "(limit 2)" in mine.details()
    assert generate("ann", "ann-1").track_id == first.track_id  # a retry, not a new request
    generate("bob")
    behind = refused(lambda: generate("cat"))
    assert behind.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the generators are behind (3 default requests' worth waiting, limit 3)" in (
        behind.details()
    )
    assert dict(behind.trailing_metadata())["retry-after-ms"] == "5000"
    # ann's first track is made: cat gets its place
    publish_track_ready(ports, first.track_id, "b" * 64, "ann")
    wait_for(lambda: _admitted(lambda: generate("cat")), 10, "a place after a ready track")
    # bob's request is dead-lettered: ann gets a place back in the backlog
    records = reader.poll(2.0, 100)
    reader.close()
    bob_record = next(
        r
        for r in records
        if events_pb2.Envelope.FromString(r.value).generation_requested.user_id == "bob"
    )
    publish_dead_letter(
        ports.bus,
        group="generator",
        topic="generation.requested.v1",
        key=bob_record.key,
        value=bob_record.value,
        event_id=events_pb2.Envelope.FromString(bob_record.value).event_id,
        error=ValidationError("song is not encoded"),
        attempts=3,
    )
    wait_for(lambda: _admitted(lambda: generate("ann")), 10, "a place after a dead letter")


def _admitted(call: Callable[[], object]) -> bool:
    try:
        call()
    except grpc.RpcError as error:
        if error.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False
    return True


def test_a_lost_answer_stops_holding_a_place_after_the_ttl() -> None:
    now = [1000.0]
    backlog = GenerationBacklog(
        MemoryKeyValueStore(),
        AdmissionPolicy(per_user=1, max_backlog=1, stale_after_s=60.0, refresh_s=0.0),
        clock=lambda: now[0],
    )
    backlog.admit("u")
    backlog.add("u", "t1")
    with pytest.raises(RateLimitedError, match="pending"):
        backlog.admit("u")
    now[0] += 61.0
    backlog.admit("u")  # t1's answer never came: it no longer counts
    assert backlog.backlog() == 0 and backlog.pending("u") == 0


def test_mel_images_are_capped_in_flight_like_uploads_and_generate() -> None:
    """A render costs ≈ 0.5 s of CPU for a 60 s track: its 2 tokens bound how often a user asks,
    the in-flight cap how many renders they hold at once (RIFFLOOP_MAX_*MEL_IMAGES_IN_FLIGHT)."""
    from riffloop.core import ConfigurationError, RateLimitedError
    from services.gateway import GatewaySettings
    from services.gateway._build import in_flight_limits

    settings = GatewaySettings.from_env(
        {
            "RIFFLOOP_AUTH_SECRET": "x" * 20,
            "RIFFLOOP_MAX_USER_MEL_IMAGES_IN_FLIGHT": "1",
            "RIFFLOOP_MAX_MEL_IMAGES_IN_FLIGHT": "2",
        }
    )
    limits = in_flight_limits(settings)
    with limits.hold("GetTrackMelImage", "ann"):
        with (
            pytest.raises(RateLimitedError, match=r"mel images in progress for you: 1"),
            limits.hold("GetTrackMelImage", "ann"),
        ):
            pass
        with (
            limits.hold("GetTrackMelImage", "bo"),
            pytest.raises(RateLimitedError, match=r"too many mel images .* \(limit 2\)"),
            limits.hold("GetTrackMelImage", "cy"),
        ):
            pass
        with limits.hold("Generate", "ann"):  # another kind: its own places
            pass
    with pytest.raises(ConfigurationError, match="RIFFLOOP_MAX_USER_MEL_IMAGES_IN_FLIGHT"):
        GatewaySettings.from_env(
            {"RIFFLOOP_AUTH_SECRET": "x" * 20, "RIFFLOOP_MAX_USER_MEL_IMAGES_IN_FLIGHT": "9"}
        )


def test_a_generate_pays_in_proportion_to_its_denoising_work() -> None:
    from riffloop.music import DEFAULT_TRACK_SECONDS
    from services.gateway._requests import DEFAULT_TRACK_SECONDS as RESTATED
    from services.gateway._requests import generate_cost

    assert RESTATED == DEFAULT_TRACK_SECONDS

    from services.gateway import GatewaySettings

    settings = GatewaySettings.from_env(
        {"RIFFLOOP_AUTH_SECRET": "x" * 20, "RIFFLOOP_RATE_LIMIT_BURST": "100"}
    )
    assert (settings.generate_cost, settings.default_quality) == (5, 50)

    def cost(**fields: float) -> int:
        return generate_cost(pb.GenerateRequest(**fields), settings)

    assert cost() == cost(quality=50, duration_seconds=5.9) == 5  # the default request
    assert cost(quality=20) == cost(duration_seconds=1.5) == 5  # less work: still one unit
    assert cost(quality=100) == cost(duration_seconds=11.8) == 10
    assert cost(quality=51) == 10  # any part of a unit more is a unit
    assert cost(quality=200, duration_seconds=30) == 100  # ≈ 20 units: capped at the burst
    assert cost(quality=1000, duration_seconds=60) == 100
    # out-of-range fields cost the default; the handler refuses them with its reason
    assert cost(quality=-3, duration_seconds=float("nan")) == cost(quality=5000) == 5
    assert cost(duration_seconds=float("inf")) == cost(duration_seconds=61) == 5


def test_pending_requests_count_their_work_and_a_large_one_passes_alone() -> None:
    """A request of q × seconds k times the default's holds k units of the per-user and the
    backlog bounds. One larger than a bound is admitted when nothing else is pending under
    it, so every valid request can be served; entries written before units were counted
    count one each."""
    kv = MemoryKeyValueStore()
    backlog = GenerationBacklog(
        kv, AdmissionPolicy(per_user=4, max_backlog=6, refresh_s=0.0), clock=lambda: 1000.0
    )
    backlog.admit("ann", 3)
    backlog.add("ann", "t1", 3)
    assert backlog.pending("ann") == 3 and backlog.backlog() == 3
    backlog.admit("ann", 1)  # 3 + 1 ≤ 4
    with pytest.raises(RateLimitedError, match="3 default requests' worth of work and this one 2"):
        backlog.admit("ann", 2)
    backlog.admit("bob", 3)
    backlog.add("bob", "t2", 3)
    with pytest.raises(RateLimitedError, match="generators are behind"):
        backlog.admit("cat", 1)  # 6 of 6
    backlog.done("t1")
    assert backlog.pending("ann") == 0 and backlog.backlog() == 3
    with pytest.raises(RateLimitedError, match="generators are behind"):
        backlog.admit("ann", 40)  # larger than both bounds, but bob's 3 are pending
    backlog.done("t2")
    backlog.admit("ann", 40)  # nothing pending: a large request passes alone
    backlog.add("ann", "t3", 40)
    with pytest.raises(RateLimitedError, match="pending"):
        backlog.admit("ann", 1)
    # an old gateway's entries ("<at> <user>", "<at>") count one unit each
    kv.hset_many({"gw:pending": {"old": "1000.0 dan"}, "gw:pending:dan": {"old": "1000.0"}})
    assert backlog.pending("dan") == 1 and backlog.backlog() == 41
    backlog.done("old")
    assert backlog.pending("dan") == 0 and backlog.backlog() == 40
    with pytest.raises(ValidationError):
        backlog.admit("ann", 0)


def test_a_generate_holds_its_work_in_the_backlog(gateway: Running, auth: Auth) -> None:
    """Through the gateway: a request of q = 100 for 5.9 s is two default ones' work, so a
    user capped at 2 units has no room for another."""
    ports: Any = gateway.state
    stub = pb_grpc.GatewayServiceStub(gateway.channel)
    ports.objects.put("songs", "c" * 64, b"stored song")
    heavy = pb.GenerateRequest(song_ids=["c" * 64], similarity=0.5, quality=100)
    stub.Generate(heavy, metadata=auth("dee"), timeout=10)
    light = pb.GenerateRequest(song_ids=["c" * 64], similarity=0.5)
    again = refused(lambda: stub.Generate(light, metadata=auth("dee"), timeout=10))
    assert again.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 default requests' worth" in again.details()

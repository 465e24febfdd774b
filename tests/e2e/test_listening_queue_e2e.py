"""The listening queue across six service processes on real Kafka, MinIO and Redis (tiny model).

Two users upload real recordings (Bach chorales rendered by fluidsynth, as the corpus is) and ask
for tracks; listeners who uploaded nothing take tracks from the queue and rate them through the
gateway, as a browser or an app would. What it shows:

- a listener is served tracks made for both users' inputs, blind, and rates them;
- a track collects ratings from many listeners, and ω grows with them (1 rating vs 10);
- no user ever receives another user's upload: every served track is a generation or a window
  of the model's training data, and a song id opens nothing;
- a bot that rates through the gateway without listening is flagged; an honest listener who
  sends a batch of ratings with their own times is not.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import threading
import time
from pathlib import Path

import grpc
import pytest
import soundfile

from riffloop.client import GatewayClient, Listen, Rating
from riffloop.core import NotFoundError, PermissionDeniedError, ValidationError
from riffloop.runtime import TokenSigner
from riffloop.v1 import feedback_service_pb2 as fb_pb
from riffloop.v1 import feedback_service_pb2_grpc as fb_grpc
from tests.services.conftest import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ALL = ("trainer", "encoder", "generator", "feedback", "selector", "gateway")
# Two chorales of the music21 corpus, rendered like the training corpus (riffloop.music).
PIECES = (("bach/bwv13.6.mxl", "piano"), ("bach/bwv108.6.mxl", "organ"))


def _recording(piece: str, instrument: str, tmp: Path, seconds: float = 12.0) -> bytes:
    """A real recording: the score rendered by fluidsynth with a GM soundfont, as FLAC."""
    from riffloop.music._corpus import _render_piece

    out = tmp / f"{Path(piece).stem}-{instrument}.flac"
    result = _render_piece(piece, (instrument,), (str(out),), 22050)[instrument]
    assert result["ok"], result
    audio, rate = soundfile.read(out, dtype="float32")
    buffer = io.BytesIO()
    soundfile.write(buffer, audio[: int(seconds * rate)], rate, format="FLAC")
    return buffer.getvalue()


def _listen_and_rate(client: GatewayClient, seed: int, errors: list[BaseException]) -> None:
    """An honest listener: plays each track to its end (in real time), takes a moment to decide
    (no person clicks within half a second: the spam filter's human floor), then rates it with
    stars of their own taste and some noise, until the queue has nothing left for them."""
    rng = random.Random(seed)
    try:
        while (track := client.next_track()) is not None:
            audio = client.audio(track.track_id)
            assert audio[:4] == b"RIFF"
            time.sleep(track.duration_seconds)
            client.report_listen(track.track_id, track.duration_seconds, completed=True)
            time.sleep(0.6)
            client.rate(track.track_id, rng.randint(2, 5))
    except BaseException as exc:  # (reported by the test thread)
        errors.append(exc)


def test_listeners_hear_everyones_tracks_blind_and_only_tracks(
    service_stack, tmp_path: Path
) -> None:
    stack = service_stack(ALL)
    procs = stack.state.processes
    signer = TokenSigner(stack.state.auth_secret)

    def client(user: str) -> GatewayClient:
        return GatewayClient(procs["gateway"].target, signer.issue(user), timeout_s=30)

    alice, bob, carol = client("alice"), client("bob"), client("carol")
    recordings = [_recording(piece, instrument, tmp_path) for piece, instrument in PIECES]
    uploads = {
        "alice": [alice.upload_song(recordings[0]).song_id],
        "bob": [bob.upload_song(recordings[1]).song_id],
    }
    upload_bytes = {hashlib.sha256(r).hexdigest() for r in recordings}
    assert upload_bytes == {ids[0] for ids in uploads.values()}
    requested: dict[str, str] = {}  # track → requester
    for round_ in range(4):
        for user, user_client in (("alice", alice), ("bob", bob)):
            track_id = user_client.generate(uploads[user], similarity=0.3 + 0.1 * round_, quality=5)
            requested[track_id] = user
    for track_id, user in requested.items():
        (alice if user == "alice" else bob).wait_ready(track_id, timeout_s=240)

    # 1. carol uploaded nothing: the queue serves her tracks made for both users' inputs.
    served: list[str] = []
    while (track := carol.next_track()) is not None:
        served.append(track.track_id)
        assert track.status == "ready" and track.size_bytes > 0
    assert set(served) == set(requested)  # each once, both users' tracks
    assert {requested[t] for t in served} == {"alice", "bob"}
    # No response names a kind; every id has the one 20-hex form.
    assert all(len(t) == 20 and int(t, 16) >= 0 for t in served)

    # 2. Nobody receives an upload: a song id opens no track, and no served audio is one.
    for song_id in (s for ids in uploads.values() for s in ids):
        with pytest.raises((NotFoundError, ValidationError)):
            carol.audio(song_id)
    served_audio = {hashlib.sha256(carol.audio(t)).hexdigest() for t in served}
    assert not served_audio & upload_bytes
    # A user is never served the other's request unless the queue served it to them.
    with pytest.raises(PermissionDeniedError):
        bob.audio(next(t for t, u in requested.items() if u == "alice"))

    # 3. Many listeners, in parallel, each hearing every track in real time and rating it.
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_listen_and_rate, args=(client(f"listener-{i}"), i, errors))
        for i in range(9)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    for track_id in served:
        carol.rate(track_id, 4 if requested[track_id] == "alice" else 3)

    # A fresh track rated only by its requester: ω of 1 rating against one of 10.
    lonely = alice.generate(uploads["alice"], similarity=0.5, quality=5)
    info = alice.wait_ready(lonely, timeout_s=240)
    alice.report_listen(lonely, info.duration_seconds, completed=True)
    alice.rate(lonely, 4)
    feedback = fb_grpc.FeedbackServiceStub(stack.operator_channel("feedback"))

    def score(track_id: str) -> fb_pb.TrackScoreResponse:
        return feedback.TrackScore(fb_pb.TrackScoreRequest(track_id=track_id), timeout=5)

    busy = served[0]
    # (TrackScore counts ratings live; ω is the last scoring pass's: published, then a pass more)
    wait_for(lambda: score(busy).score.rating_count == 10, 120, "ten ratings of one track")
    wait_for(lambda: score(lonely).score.rating_count == 1, 120, "one rating of the new track")
    wait_for(
        lambda: all(score(t).score.HasField("provenance") for t in (busy, lonely)),
        120,
        "scores published",
    )
    time.sleep(3.0)
    omega_busy, omega_lonely = score(busy).score.confidence, score(lonely).score.confidence
    raters = [f"listener-{i}" for i in range(9)] + ["carol", "alice"]
    reports = {
        r: feedback.RaterReport(fb_pb.RaterReportRequest(user_id=r), timeout=5) for r in raters
    }
    assert omega_busy > omega_lonely, (omega_busy, omega_lonely, score(busy), reports)

    # 4. A bot: takes tracks and rates them at once, never listening. Flagged.
    for _ in range(3):  # fresh tracks for it to rate
        for user, user_client in (("alice", alice), ("bob", bob)):
            requested[user_client.generate(uploads[user], similarity=0.6, quality=5)] = user
    for track_id, user in requested.items():
        (alice if user == "alice" else bob).wait_ready(track_id, timeout_s=240)
    bot = client("bot-1")
    while (track := bot.next_track()) is not None:
        bot.rate(track.track_id, 5)

    # An honest listener who queues ratings offline and sends them in one batch, each with the
    # time it was given: never flagged, though all arrive in one call.
    dora = client("dora")
    heard = []
    started = time.time()
    while (track := dora.next_track()) is not None:
        heard.append(track)
    items: list[Rating | Listen] = []
    at = started
    for i, track in enumerate(heard):
        at += track.duration_seconds + 1.0  # listened to the end, then a second to decide
        items.append(Listen(track.track_id, track.duration_seconds, completed=True, at=at))
        items.append(Rating(track.track_id, 2 + i % 4, at=at + 0.5))
    time.sleep(max(0.0, at + 1.0 - time.time()))  # (the times must lie in the past)
    _, outcomes = dora.submit_feedback(items)
    assert all(o.accepted for o in outcomes), [o.error for o in outcomes if o.error]

    def report(user: str) -> fb_pb.RaterReportResponse:
        try:
            return feedback.RaterReport(fb_pb.RaterReportRequest(user_id=user), timeout=5)
        except grpc.RpcError as exc:  # none of their ratings recorded yet (a busy machine)
            if exc.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            return fb_pb.RaterReportResponse(user_id=user)

    wait_for(lambda: report("bot-1").flagged, 120, "the bot flagged")
    wait_for(lambda: report("dora").accepted_ratings == len(heard), 120, "dora's batch recorded")
    time.sleep(2.0)  # a scoring pass after the batch
    dora_report = report("dora")
    assert not dora_report.flagged, list(dora_report.reasons)
    assert set(report("bot-1").reasons) & {"burst", "no_listening", "constant"}

    # 5. Every baseline served is a window of the model's training data, never an upload.
    objects = stack_objects(stack)
    for track_id in requested:
        sidecar = json.loads(objects.get("tracks", f"{track_id}.json"))
        sample = sidecar["provenance"].get("baseline_sample_id") or ""
        assert not any(song in sample for ids in uploads.values() for song in ids), sample


def stack_objects(stack):  # type: ignore[no-untyped-def]
    """The stack's object store, read with its own settings (the test's view of MinIO)."""
    from riffloop.core import Settings
    from riffloop.runtime import connect_ports

    env = {k: v for k, v in stack.infra_env.items() if k.startswith("RIFFLOOP_")}
    return connect_ports(Settings.from_env(env)).objects

"""kill -9 the feedback service while ratings stream; after a restart every accepted rating is
counted exactly once (real Kafka, MinIO and Redis; gateway and feedback as separate processes).
Half the listeners rate one call per rating (Rate), half in batches (SubmitFeedback).

Tracks are made ready by publishing TrackReady events on Kafka (what the generator does), so the
test needs no model.
"""

from __future__ import annotations

import io
import threading
import time
import uuid

import grpc
import numpy as np
import pytest
import soundfile

from riffloop.client import GatewayClient, Rating
from riffloop.core import KafkaEventBus, S3ObjectStore, Settings, new_envelope
from riffloop.runtime import TokenSigner
from riffloop.v1 import common_pb2, events_pb2
from riffloop.v1 import feedback_service_pb2 as fb
from riffloop.v1 import feedback_service_pb2_grpc as fb_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USERS = 12
TRACKS_PER_USER = 10


def _wav() -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(11025, dtype="float32"), 22050, format="WAV")
    return buffer.getvalue()


def test_feedback_kill_9_restart_counts_every_accepted_rating_once(service_stack) -> None:
    stack = service_stack(("feedback", "gateway"))
    settings = Settings.from_env(stack.infra_env)  # this test's topic prefix
    bus = KafkaEventBus.from_settings(settings)
    objects = S3ObjectStore.from_settings(settings)
    run = uuid.uuid4().hex[:8]
    wav = objects.put("tracks", f"e2e-{run}.wav", _wav(), content_type="audio/wav")
    tracks: dict[str, str] = {}  # track → its listener
    for u in range(USERS):
        user = f"listener-{run}-{u}"
        for t in range(TRACKS_PER_USER):
            track_id = f"trk-{run}-{u}-{t}"
            tracks[track_id] = user
            ready = events_pb2.TrackReady(
                track_id=track_id,
                audio=wav.to_proto(),
                provenance=common_pb2.TrackProvenance(
                    kind=common_pb2.TRACK_KIND_GENERATED
                    if t % 4
                    else common_pb2.TRACK_KIND_BASELINE,
                    model_version="v0001",
                    input_song_ids=["a" * 64],
                    similarity=0.5,
                    quality=5,
                    baseline_song_id="b" * 64,
                ),
                user_id=user,
                duration_seconds=0.5,
            )
            bus.publish("tracks.ready.v1", track_id, new_envelope("generator", ready))
    signer = TokenSigner(stack.state.auth_secret)
    target = stack.state.processes["gateway"].target
    clients = {user: GatewayClient(target, signer.issue(user)) for user in set(tracks.values())}
    accepted: dict[str, int] = {}
    lock = threading.Lock()

    def rate_all(part: list[str]) -> None:
        for track_id in part:
            client = clients[tracks[track_id]]
            for _ in range(200):  # the gateway may not have consumed tracks.ready yet
                try:
                    client.rate(track_id, 1 + hash(track_id) % 5)
                    with lock:
                        accepted[track_id] = accepted.get(track_id, 0) + 1
                    break
                except Exception as error:
                    if "already rated" in str(error):
                        break
                    time.sleep(0.1)
            time.sleep(0.05)

    def submit_all(users: list[str]) -> None:
        """The batch path: SubmitFeedback calls of up to 5 ratings per user."""
        for user in users:
            pending = sorted(t for t, u in tracks.items() if u == user)
            for _ in range(200):
                if not pending:
                    break
                part = pending[:5]
                try:
                    _, outcomes = clients[user].submit_feedback(
                        [Rating(t, 1 + hash(t) % 5) for t in part]
                    )
                except Exception:
                    time.sleep(0.1)  # the whole call failed: nothing was accepted, send again
                    continue
                for outcome in outcomes:
                    if outcome.accepted:
                        with lock:
                            accepted[outcome.track_id] = accepted.get(outcome.track_id, 0) + 1
                    if outcome.accepted or "already rated" in str(outcome.error):
                        pending.remove(outcome.track_id)
                time.sleep(0.1)

    ids = sorted(tracks)
    users = sorted(set(tracks.values()))
    one_by_one = [t for t in ids if users.index(tracks[t]) % 2 == 0]
    batched_users = users[1::2]
    workers = [threading.Thread(target=rate_all, args=(one_by_one[i::2],)) for i in range(2)] + [
        threading.Thread(target=submit_all, args=(batched_users[i::2],)) for i in range(2)
    ]
    for worker in workers:
        worker.start()
    # Kill the feedback service hard while ratings stream in, then bring it back.
    deadline = time.monotonic() + 60
    while len(accepted) < len(tracks) // 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    stack.kill("feedback")
    at_kill = len(accepted)
    time.sleep(1.0)
    stack.start("feedback")
    for worker in workers:
        worker.join(timeout=120)
    stack.wait_serving(("feedback",), 120)
    assert 0 < at_kill < len(tracks), "the kill must land while ratings stream"
    assert len(accepted) == len(tracks) and set(accepted.values()) == {1}

    channel = stack.operator_channel("feedback")
    stub = fb_grpc.FeedbackServiceStub(channel)

    def counted() -> dict[str, int]:
        out = {}
        for track_id in ids:
            try:
                score = stub.TrackScore(fb.TrackScoreRequest(track_id=track_id), timeout=5).score
                out[track_id] = score.rating_count
            except grpc.RpcError:
                out[track_id] = -1
        return out

    deadline = time.monotonic() + 90
    seen = counted()
    while time.monotonic() < deadline and seen != dict.fromkeys(ids, 1):
        time.sleep(1.0)
        seen = counted()
    channel.close()
    for client in clients.values():
        client.close()
    bus.close()
    assert seen == dict.fromkeys(ids, 1), {k: v for k, v in seen.items() if v != 1}

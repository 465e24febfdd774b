"""The whole loop in one process on in-memory ports with a tiny model: upload → encode →
generate (generations and baselines) → listen and rate → score → select → fine-tune → publish →
the generator hot-swaps and serves the new version. The multi-process version with real Kafka,
MinIO and Redis is tests/e2e/test_loop_e2e.py."""

from __future__ import annotations

import json
import random
import threading
import time

import grpc
import pytest

from riffloop.client import GatewayClient
from riffloop.runtime import TokenSigner
from riffloop.v1 import generator_service_pb2 as gen_pb
from riffloop.v1 import generator_service_pb2_grpc as gen_grpc
from riffloop.v1 import selector_service_pb2 as sel_pb
from riffloop.v1 import selector_service_pb2_grpc as sel_grpc
from tests.services.conftest import SECRET, Running, wait_for, wav_bytes

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_loop_publishes_a_new_model_that_the_generator_serves(
    all_services: dict[str, Running],
) -> None:
    ports = all_services["gateway"].state
    target = f"127.0.0.1:{all_services['gateway'].port}"
    signer = TokenSigner(SECRET)
    users = [GatewayClient(target, signer.issue(f"listener-{i}")) for i in range(4)]
    songs = [users[0].upload_song(wav_bytes(2.0, f)).song_id for f in (220.0, 330.0, 495.0)]
    wait_for(
        lambda: all(ports.objects.exists("latents", f"{s}.pt") for s in songs),
        120,
        "three songs encoded",
    )

    kinds: dict[str, str] = {}
    rng = random.Random(7)
    inputs = [songs[:2], songs[1:], [songs[0], songs[2]]]
    for round_ in range(40):
        user = users[round_ % len(users)]
        track_id = user.generate(inputs[round_ % 3], similarity=0.5, quality=5)
        user.wait_ready(track_id, timeout_s=60)
        sidecar = json.loads(ports.objects.get("tracks", f"{track_id}.json"))
        kind = sidecar["provenance"]["kind"]
        kinds[track_id] = kind
        assert user.audio(track_id)[:4] == b"RIFF"
        info = user.get_track(track_id)
        # Simulated taste: generations are liked, baselines less; every track is heard fully.
        user.report_listen(track_id, info.duration_seconds, completed=True)
        stars = rng.choice((4, 5)) if kind == "generated" else rng.choice((1, 2))
        user.rate(track_id, stars)
        if round_ >= 11 and {"generated", "baseline"} <= set(kinds.values()):
            break
    assert {"generated", "baseline"} <= set(kinds.values()), kinds

    selector = sel_grpc.SelectorServiceStub(all_services["selector"].channel)
    wait_for(
        lambda: (
            selector.CurrentTrainset(sel_pb.CurrentTrainsetRequest(), timeout=5).trainset.pair_count
            > 0
        ),
        60,
        "a published training set",
    )
    generator = gen_grpc.GeneratorServiceStub(all_services["generator"].channel)
    wait_for(
        lambda: generator.CurrentModel(gen_pb.CurrentModelRequest(), timeout=5).version >= "v0002",
        120,
        "the generator serving v0002",
    )
    # Later training sets may already have produced v0003…: each version names its parent.
    served = generator.CurrentModel(gen_pb.CurrentModelRequest(), timeout=5).version
    wait_for(
        lambda: any(m.current and m.version >= served for m in users[0].list_models()),
        30,
        "ListModels showing the served version",
    )
    models = {m.version: m for m in users[0].list_models()}
    assert models["v0002"].parent_version == "v0001"
    assert models["v0001"].rating_count + models["v0001"].baseline_rating_count > 0

    # New generations come from the new version.
    response = generator.Generate(
        gen_pb.GeneratorServiceGenerateRequest(
            song_ids=songs[:1], similarity=0.3, quality=5, kind=1
        ),
        timeout=60,
    )
    assert response.provenance.model_version >= "v0002"
    with pytest.raises(grpc.RpcError) as info:
        generator.Generate(
            gen_pb.GeneratorServiceGenerateRequest(song_ids=songs[:1], similarity=1.0), timeout=10
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # Rollback: the trainer moves CURRENT back to the parent and the generator obeys.
    from riffloop.v1 import trainer_service_pb2 as tr_pb
    from riffloop.v1 import trainer_service_pb2_grpc as tr_grpc

    # Quiesce the loop first, so that the only version change below is the rollback: no new
    # training sets (selector stopped), the trainer idle with nothing left to pick up, and the
    # generator on the trainer's current version. (CI saw a live loop publish a version during
    # this part: once before the rollback, v0006 not yet polled; once right after it.)
    trainer = tr_grpc.TrainerServiceStub(all_services["trainer"].channel)
    all_services["selector"].runtime.stop()

    def trainer_status() -> tr_pb.TrainStatusResponse:
        return trainer.TrainStatus(tr_pb.TrainStatusRequest(), timeout=5)

    quiet_since = [time.monotonic()]

    def trainer_quiet_for_2_s() -> bool:
        if trainer_status().state != tr_pb.TRAINER_STATE_IDLE:
            quiet_since[0] = time.monotonic()
        return time.monotonic() - quiet_since[0] >= 2.0

    wait_for(trainer_quiet_for_2_s, 300, "the trainer idle with no training set left")
    current = trainer_status().current_version
    wait_for(
        lambda: generator.CurrentModel(gen_pb.CurrentModelRequest(), timeout=5).version == current,
        60,
        "the generator on the trainer's current version",
    )

    # ... while requests keep coming: the swap drops none of them.
    stop = threading.Event()
    served_by: list[str] = []  # in the order the calls finished
    started_after_swap: list[str] = []  # calls begun once CurrentModel showed the rollback
    swapped = threading.Event()
    failures: list[BaseException] = []

    def keep_generating() -> None:
        request = gen_pb.GeneratorServiceGenerateRequest(
            song_ids=songs[1:], similarity=0.3, quality=5, kind=1
        )
        while not stop.is_set():
            after_swap = swapped.is_set()
            try:
                version = generator.Generate(request, timeout=60).provenance.model_version
                served_by.append(version)
                if after_swap:
                    started_after_swap.append(version)
            except BaseException as exc:  # any failure during the swap is the finding
                failures.append(exc)

    load = [threading.Thread(target=keep_generating) for _ in range(3)]
    for thread in load:
        thread.start()
    wait_for(lambda: len(served_by) >= 3, 60, "requests on the new version")
    rolled = trainer.Rollback(tr_pb.RollbackRequest(), timeout=30)
    assert rolled.previous_version >= "v0002" and rolled.version < rolled.previous_version
    try:
        wait_for(
            lambda: (
                generator.CurrentModel(gen_pb.CurrentModelRequest(), timeout=5).version
                == rolled.version
            ),
            60,
            "the generator rolling back",
        )
        swapped.set()
        wait_for(lambda: len(started_after_swap) >= 3, 60, "requests on the rolled-back version")
    finally:
        stop.set()
        for thread in load:
            thread.join(60)
    assert failures == []
    assert rolled.previous_version == current
    published = {m.version for m in users[0].list_models()}
    assert set(served_by) <= published, (served_by, published)
    assert set(served_by) == {rolled.previous_version, rolled.version}
    # A call begun before the swap may finish after it, on the version it started with; every
    # call begun after it is served by the rolled-back-to version.
    assert len(started_after_swap) >= 3
    assert set(started_after_swap) == {rolled.version}, started_after_swap
    for user in users:
        user.close()

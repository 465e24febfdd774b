"""The loop across six service processes on real Kafka, MinIO and Redis (tiny model):

upload three songs through the gateway, request generations until both generations and
baselines have been served, rate them as simulated listeners (who like generations), the
selector publishes a training set, the trainer publishes a new model, the generator serves it.
"""

from __future__ import annotations

import random
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from riffloop.client import GatewayClient
from riffloop.runtime import TokenSigner
from riffloop.v1 import generator_service_pb2 as gen_pb
from riffloop.v1 import generator_service_pb2_grpc as gen_grpc
from riffloop.v1 import selector_service_pb2 as sel_pb
from riffloop.v1 import selector_service_pb2_grpc as sel_grpc
from riffloop.v1 import trainer_service_pb2 as tr_pb
from riffloop.v1 import trainer_service_pb2_grpc as tr_grpc
from tests.services.conftest import wait_for, wav_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ALL = ("trainer", "encoder", "generator", "feedback", "selector", "gateway")


def _metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _rating_counts(user: GatewayClient) -> tuple[int, int]:
    """Ratings of generated and of baseline tracks over every version ListModels shows."""
    models = user.list_models()
    return (
        sum(m.rating_count for m in models),
        sum(m.baseline_rating_count for m in models),
    )


def test_six_processes_close_the_loop(service_stack) -> None:
    stack = service_stack(ALL)
    procs = stack.state.processes
    signer = TokenSigner(stack.state.auth_secret)
    users = [GatewayClient(procs["gateway"].target, signer.issue(f"e2e-{i}")) for i in range(4)]
    rng = random.Random(11)
    freqs = [rng.uniform(200, 800) for _ in range(3)]  # fresh songs: no cross-test dedupe
    songs = [users[0].upload_song(wav_bytes(2.0, f)).song_id for f in freqs]
    generator = gen_grpc.GeneratorServiceStub(stack.operator_channel("generator"))
    # The version served at the start: v0001 on fresh infrastructure, later on a developer's
    # reused object store (versions and models/CURRENT live there).
    base = generator.CurrentModel(gen_pb.CurrentModelRequest(), timeout=5).version

    # What ListModels counted before (the infrastructure may be a developer's, reused).
    generated_before, baseline_before = _rating_counts(users[0])
    kinds: dict[str, str] = {}
    # The selector keeps a generation only if it beats the baseline *of its own input merge*, and
    # dispatch is a coin flip per request: go on until some input has both kinds, not just the run.
    kinds_by_input: dict[frozenset[str], set[str]] = {}
    gen_url = f"http://127.0.0.1:{procs['generator'].metrics_port}/metrics"
    for round_ in range(40):
        user = users[round_ % len(users)]
        pair = [songs[round_ % 3], songs[(round_ + 1) % 3]]
        before_baseline = _metric(gen_url, "riffloop_tracks_generated_total", kind="baseline")
        track_id = user.generate(pair, similarity=0.5, quality=5)
        info = user.wait_ready(track_id, timeout_s=180)
        assert user.audio(track_id)[:4] == b"RIFF"
        after_baseline = _metric(gen_url, "riffloop_tracks_generated_total", kind="baseline")
        kind = "baseline" if after_baseline > before_baseline else "generated"
        kinds[track_id] = kind
        kinds_by_input.setdefault(frozenset(pair), set()).add(kind)
        user.report_listen(track_id, info.duration_seconds, completed=True)
        user.rate(track_id, rng.choice((4, 5)) if kind == "generated" else rng.choice((1, 2)))
        if round_ >= 11 and any(k == {"generated", "baseline"} for k in kinds_by_input.values()):
            break
    assert any(k == {"generated", "baseline"} for k in kinds_by_input.values()), kinds

    selector = sel_grpc.SelectorServiceStub(stack.operator_channel("selector"))
    wait_for(
        lambda: (
            selector.CurrentTrainset(sel_pb.CurrentTrainsetRequest(), timeout=5).trainset.pair_count
            > 0
        ),
        120,
        "a published training set",
    )
    trainer = tr_grpc.TrainerServiceStub(stack.operator_channel("trainer"))

    def trained() -> list[str]:
        versions = trainer.TrainStatus(tr_pb.TrainStatusRequest(), timeout=5).versions
        return sorted(v for v in versions if v > base)

    wait_for(lambda: trained(), 240, f"the trainer publishing a version after {base}")
    first = trained()[0]
    wait_for(
        lambda: generator.CurrentModel(gen_pb.CurrentModelRequest(), timeout=5).version >= first,
        120,
        "the generator serving the new model",
    )
    track_id = users[1].generate(songs[:2], similarity=0.4, quality=5)
    users[1].wait_ready(track_id, timeout_s=180)
    # The gateway learns of a version from model.published.v1, on its own consumer.
    wait_for(
        lambda: first in {m.version for m in users[1].list_models()}, 60, f"ListModels: {first}"
    )
    models = {m.version: m for m in users[1].list_models()}
    assert models[first].parent_version == base
    # ListModels' ratings come from the feedback service's read model (fb:model-ratings): every
    # track rated here is counted once, under whichever version served it, by kind.
    generated = sum(kind == "generated" for kind in kinds.values())
    expected = (generated_before + generated, baseline_before + len(kinds) - generated)
    seen = None
    deadline = time.monotonic() + 60
    while seen != expected and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = _rating_counts(users[1])
    assert seen == expected, f"ListModels counts (generated, baseline) {seen}, not {expected}"
    # Every process exports the shared metrics; the trainer counted its steps.
    for process in procs.values():
        url = f"http://127.0.0.1:{process.metrics_port}/metrics"
        assert _metric(url, "riffloop_dependency_ready", dependency="kafka") == 1
        # the start-up heap is frozen and every collection since is timed
        assert _metric(url, "riffloop_gc_pause_seconds_count") >= 1

    # Each process's own domain metrics, read from that process (not a shared registry).
    def url(service: str) -> str:
        return f"http://127.0.0.1:{procs[service].metrics_port}/metrics"

    assert _metric(url("trainer"), "riffloop_training_steps_total") >= 4
    serving = generator.CurrentModel(gen_pb.CurrentModelRequest(), timeout=5).version
    assert serving > base
    assert _metric(url("generator"), "riffloop_model_current_info", version=serving) == 1
    assert _metric(url("generator"), "riffloop_model_current_info", version=base) == 0
    generated_here = _metric(url("generator"), "riffloop_tracks_generated_total")
    assert generated_here >= len(kinds) + 1  # every track of this test, wherever served
    assert _metric(url("generator"), "riffloop_generation_seconds_count") >= generated_here
    assert _metric(url("gateway"), "riffloop_ratings_total", outcome="accepted") >= len(kinds)
    recorded = _metric(url("feedback"), "riffloop_feedback_recorded_total", outcome="recorded")
    assert recorded >= 2 * len(kinds)  # a rating and a listen per track
    assert _metric(url("feedback"), "riffloop_mean_rating", model_version=base) > 0
    assert _metric(url("gateway"), "riffloop_grpc_requests_total", method="Rate", code="OK") >= (
        len(kinds)
    )
    # SIGTERM drains: every service exits 0.
    codes = stack.down(grace_s=30.0)
    assert codes == dict.fromkeys(reversed(ALL), 0), codes
    for user in users:
        user.close()

"""kill -9 the trainer during a fine-tune (real Kafka, MinIO and Redis; trainer and generator as
separate processes, tiny settings): the restarted trainer resumes the fine-tune from its last
saved progress (riffloop.loop.FineTuneJournal) — it takes only the steps after that save — and
publishes the candidate; the generator serves the previous version the whole time until then.

The training set is written as the selector writes one (a manifest of pairs in ``trainsets``,
each target's sidecar in ``tracks``) and announced on trainset.published.v1, so no listener,
encoder or selector is needed. The stack has its own bucket prefix: its models bucket, CURRENT
and registry are its own.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from typing import Any

import numpy as np
import pytest

from riffloop.core import KafkaEventBus, S3ObjectStore, Settings, new_envelope, sha256_hex
from riffloop.v1 import events_pb2

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.slow]

STEPS = 100  # the fine-tune: long enough that the kill lands inside it on a fast machine
SAVE_EVERY = 10
PAIRS = 4
SIDE = 16  # the tiny preset's image size


def metric(process: Any, name: str, **labels: str) -> float | None:
    """A sample of ``name`` on the process's /metrics (None when absent or unreachable)."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=2
        ) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(2))
    return None


def served_version(generator: Any, candidates: tuple[str, ...]) -> str | None:
    for version in candidates:
        if metric(generator, "riffloop_model_current_info", version=version) == 1.0:
            return version
    return None


def test_trainer_kill_9_mid_fine_tune_resumes_and_generators_keep_serving(
    service_stack: Any,
) -> None:
    prefix = f"k{uuid.uuid4().hex[:8]}-"
    own = {"RIFFLOOP_S3_BUCKET_PREFIX": prefix}
    trainer_env = {
        **own,
        "RIFFLOOP_FINETUNE_STEPS": str(STEPS),
        "RIFFLOOP_FINETUNE_SAVE_EVERY": str(SAVE_EVERY),
        "RIFFLOOP_STEPS_PER_CHUNK": "5",
        "RIFFLOOP_BASELINE_ROWS": "8",
        "RIFFLOOP_BASELINE_INVERSION_STEPS": "3",
    }
    stack = service_stack(("trainer", "generator"), {"trainer": trainer_env, "generator": own})
    trainer, generator = stack.state.processes["trainer"], stack.state.processes["generator"]
    settings = Settings.from_env(stack.infra_env)
    objects = S3ObjectStore.connect(
        settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, bucket_prefix=prefix
    )
    deadline = time.monotonic() + 60
    while served_version(generator, ("v0001",)) != "v0001":
        assert time.monotonic() < deadline, "the generator never served the base model"
        time.sleep(0.5)

    # a training set as the selector publishes one
    run = uuid.uuid4().hex[:8]
    rng = np.random.default_rng(7)
    pairs = []
    for i in range(PAIRS):
        track = f"trk-{run}-{i}"
        image = rng.integers(0, 256, size=(SIDE, SIDE)).tolist()
        objects.put("tracks", f"{track}.json", json.dumps({"image_uint8": image}).encode())
        pairs.append(
            {"input_key": f"in-{i}", "target_track_id": track, "weight": 1.0, "score": 4.0}
        )
    trainset_id = f"ts-{run}"
    manifest = objects.put(
        "trainsets", f"{trainset_id}.json", json.dumps({"pairs": pairs}).encode()
    )
    event = events_pb2.TrainsetPublished(
        trainset_id=trainset_id, pair_count=PAIRS, iteration=1, model_version="v0001"
    )
    event.manifest.CopyFrom(manifest.to_proto())
    bus = KafkaEventBus.from_settings(settings)
    bus.publish("trainset.published.v1", trainset_id, new_envelope("selector", event))
    bus.close()

    # kill -9 as soon as a save is in the store, mid-way
    pointer = f"finetune/{sha256_hex(trainset_id.encode())[:32]}.json"
    deadline = time.monotonic() + 120
    while not objects.exists("models", pointer):
        assert time.monotonic() < deadline, "the fine-tune never saved its progress"
        time.sleep(0.1)
    stack.kill("trainer")
    killed = time.monotonic()
    saved = objects.read_artifact("models", pointer)
    at_kill = json.loads(saved["progress.json"])["step"]
    assert 0 < at_kill < STEPS, f"the kill came after the fine-tune ended (step {at_kill})"
    steps_before = metric(trainer, "riffloop_training_steps_total")  # None: the process is gone

    # the generator serves v0001 while the trainer is down, restarts and resumes
    served: list[str | None] = []
    time.sleep(2.0)
    served.append(served_version(generator, ("v0001", "v0002")))
    stack.start("trainer")
    stack.wait_serving(("trainer",), 120)
    deadline = time.monotonic() + 150
    while (version := served_version(generator, ("v0001", "v0002"))) != "v0002":
        served.append(version)
        assert time.monotonic() < deadline, "the restarted trainer never published v0002"
        time.sleep(0.5)
    published = time.monotonic()
    restarted = stack.state.processes["trainer"]
    steps_after = metric(restarted, "riffloop_training_steps_total")
    resumes = metric(restarted, "riffloop_finetune_resumes_total")
    print(
        f"\ntrainer killed at saved step {at_kill}/{STEPS} (save every {SAVE_EVERY}); the "
        f"restart took {steps_after:.0f} more steps, resumes {resumes:.0f}; v0002 served "
        f"{published - killed:.1f} s after the kill; the generator served "
        f"{sorted({str(v) for v in served})} until then"
    )
    assert steps_before is None
    assert steps_after == STEPS - at_kill  # resumed at the save, not from step 0
    assert resumes == 1.0
    assert served and set(served) == {"v0001"}
    deadline = time.monotonic() + 10  # cleared right after the announcement
    while objects.list("models", "finetune/"):
        assert time.monotonic() < deadline, "the progress is not cleared once published"
        time.sleep(0.2)
    objects.close()

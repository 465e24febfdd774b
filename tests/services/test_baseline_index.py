"""The baseline z0 comes from the serving version's training index, never from an upload; the
index travels with the model version (hot swap, canary included); a winning generation replaces
its input's baseline in the next version's index; latents are inverted per model version."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import soundfile

from tests.services.conftest import shared_ports

pytestmark = pytest.mark.unit

STEPS = 3  # DDIM inversion steps: the tiny model only has to be consistent, not good


def _tiny_model(version: str, seed: int) -> Any:
    from riffloop.music import MelConfig, ModelConfig, MusicDiffusion

    mel = MelConfig(n_mels=16, x_res=16, n_fft=256, hop_length=64)
    return MusicDiffusion.create(ModelConfig.preset("tiny"), mel, seed=seed, version=version)


def _base_index(model: Any) -> Any:
    from riffloop.music import TrainingIndex, tone_windows

    images, ids = tone_windows(model.mel, 12, seed=1)
    return TrainingIndex.build(model, images, ids, STEPS, model_version=model.version)


def _song(ports: Any, freq: float) -> str:
    """Upload a song (a tone) into the songs bucket; its id is its sha256."""
    t = np.arange(int(0.5 * 22050)) / 22050
    buffer = io.BytesIO()
    soundfile.write(
        buffer,
        (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32"),
        22050,
        "PCM_16",
        format="WAV",
    )
    data = buffer.getvalue()
    song_id = hashlib.sha256(data).hexdigest()
    ports.objects.put("songs", song_id, data)
    return song_id


@dataclass
class Loop:
    ports: Any
    store: Any
    encoder: Any
    generator: Any


def _loop(base: Any) -> Loop:
    """A store serving ``base`` (with its index), an encoder and a generator on it."""
    from riffloop.runtime import ModelStore, ServedModel
    from services.encoder import Encoder, EncoderSettings
    from services.generator import Generator, GeneratorSettings

    ports = shared_ports()
    ports.prepare()
    store = ModelStore(ports.objects)
    store.publish(base)
    store.set_current(base.version)
    encoder = Encoder(
        EncoderSettings(inversion_steps=STEPS),
        ports,
        ServedModel(ModelStore(ports.objects), "encoder", canaries=False),
    )
    generator = Generator(
        GeneratorSettings(default_quality=4, latent_wait_s=0.0),
        ports,
        ServedModel(ModelStore(ports.objects), "generator"),
    )
    assert encoder.models.load_current() and generator.model.load_current()
    return Loop(ports, store, encoder, generator)


def _baseline(loop: Loop, request_id: str, song_ids: tuple[str, ...]) -> tuple[str, list[int]]:
    """Serve a baseline track; its z0 id and the window it was served from (the sidecar)."""
    from riffloop.loop import TrackKind
    from services.generator._service import Request

    ready = loop.generator.make_track(
        Request(request_id, song_ids, 0.5, 4, 7, "listener", kind=TrackKind.BASELINE)
    )
    sidecar = json.loads(loop.ports.objects.get("tracks", f"{ready.track_id}.json"))
    return ready.provenance.baseline_song_id, sidecar["image_uint8"]


def test_z0_comes_from_the_versions_training_index_never_from_an_upload() -> None:
    base = _tiny_model("v0001", seed=0)
    base.baseline_index = _base_index(base)
    loop = _loop(base)
    songs = [_song(loop.ports, f) for f in (220.0, 330.0, 440.0, 660.0)]
    for song_id in songs:
        loop.encoder.encode(song_id)  # every upload encoded: the old path indexed these

    index = loop.generator.model.get().baseline_index
    for i, song_id in enumerate(songs):
        z0, window = _baseline(loop, f"req-{i}", (song_id,))
        assert z0 in index.ids and z0.startswith("tone:")
        assert not any(z0.startswith(s) for s in songs)
        row = index.ids.index(z0)
        # served from the stored window (its head: the tail is crossfaded into the next one)
        stored = index.images[row, 0].tolist()
        assert [w[:8] for w in window] == [r[:8] for r in stored]
    z0, _ = _baseline(loop, "req-merge", (songs[0], songs[1]))
    assert z0.startswith("tone:")


def test_the_index_hot_swaps_with_the_model_version_canary_included() -> None:
    from riffloop.music import Winner

    base = _tiny_model("v0001", seed=0)
    base.baseline_index = _base_index(base)
    loop = _loop(base)
    song = _song(loop.ports, 330.0)
    record = loop.encoder.encode(song)
    child = _tiny_model("v0002", seed=1)
    child.parent = "v0001"
    winner = Winner(song, "t-winner", 4.5, record.images[0])  # input key of one song: its id
    child.baseline_index = base.baseline_index.next_version(child, [winner], model_version="v0002")
    loop.store.publish(child)

    # a canary of v0002: each request's model carries its own version's index
    loop.store.set_canary("v0002", "v0001", 0.5)
    loop.generator.model.load_current()
    loop.encoder.reconcile()  # the encoder inverts the song for the candidate too
    served = loop.generator.model
    seen = {"v0001": set(), "v0002": set()}
    for i in range(40):
        request_id = f"canary-{i}"
        version = served.for_request(request_id).version
        z0, _ = _baseline(loop, request_id, (song,))
        seen[version].add(z0)
    assert seen["v0002"] == {"track:t-winner"}
    assert seen["v0001"] and not seen["v0001"] & {"track:t-winner"}

    # promoted: every request now answers from v0002's index
    loop.store.clear_canary()
    loop.store.set_current("v0002", "v0001")
    served.load_current()
    assert served.get().version == "v0002" and served.canary_version is None
    assert {_baseline(loop, f"after-{i}", (song,))[0] for i in range(5)} == {"track:t-winner"}


def test_a_winning_generation_replaces_its_inputs_baseline_in_the_next_versions_index() -> None:
    import torch

    from riffloop.music import TrainingIndex, Winner, merge_latents

    base_model = _tiny_model("v0001", seed=0)
    base = _base_index(base_model)
    z_agg = merge_latents(
        torch.randn(2, *base_model.image_shape, generator=torch.Generator().manual_seed(3))
    )
    before = base.baseline_for("a+b", z_agg)
    assert not before.champion and before.id.startswith("tone:")

    child = _tiny_model("v0002", seed=1)
    window = base.images[0]
    winners = [
        Winner("a+b", "t-best", 4.6, window),
        Winner("a+b", "t-second", 4.1, base.images[1]),  # same input, lower R: not crowned
        Winner("c", "t-other", 3.9, base.images[2]),
    ]
    nxt = base.next_version(child, winners, model_version="v0002")
    assert nxt.model_version == "v0002" and len(nxt) == len(base) + 2
    pick = nxt.baseline_for("a+b", z_agg)
    assert (pick.id, pick.champion) == ("track:t-best", True)
    every = {n.id: n.score for n in nxt.index.nearest(z_agg, k=len(nxt))}
    assert pick.score == pytest.approx(every["track:t-best"], abs=1e-3)  # Γ(z_agg, z0)
    assert before.id in nxt.ids  # the replaced row stays training data for other inputs
    assert nxt.baseline_for("d", z_agg).id == nxt.index.nearest(z_agg)[0].id
    assert nxt.champions == {"a+b": "track:t-best", "c": "track:t-other"}

    # stored and read back with the version; the next set carries t-best over and adds t-new
    again = TrainingIndex.from_bytes(nxt.to_bytes())
    assert again.champions == nxt.champions and again.ids == nxt.ids
    assert torch.equal(again.images, nxt.images)
    grandchild = _tiny_model("v0003", seed=2)
    later = again.next_version(
        grandchild,
        [Winner("a+b", "t-best", 4.6, window), Winner("a+b", "t-new", 4.0, base.images[3])],
        model_version="v0003",
    )
    assert later.ids.count("track:t-best") == 1
    assert later.baseline_for("a+b", z_agg).id == "track:t-new"


def test_latents_of_a_new_version_are_produced_and_used() -> None:
    import torch

    from riffloop.core import TransientError
    from riffloop.loop import TrackKind
    from riffloop.runtime import LATENTS_BUCKET, LatentRecord
    from services.generator._service import Request

    base = _tiny_model("v0001", seed=0)
    base.baseline_index = _base_index(base)
    loop = _loop(base)
    song = _song(loop.ports, 440.0)
    first = loop.encoder.encode(song)
    assert first.model_version == "v0001"

    child = _tiny_model("v0002", seed=1)
    child.parent = "v0001"
    child.baseline_index = base.baseline_index.next_version(child, [], model_version="v0002")
    loop.store.publish(child)
    loop.store.set_current("v0002", "v0001")
    loop.generator.model.load_current()

    # before the encoder has inverted the song for v0002, the generator does not use v0001's
    with pytest.raises(TransientError, match="no latents for model v0002"):
        loop.generator._record(song, "v0002", 0.0)

    loop.encoder.models.load_current()  # what model.published does, then the latents worker
    assert loop.encoder.reconcile() == 1
    stored = LatentRecord.from_bytes(
        loop.ports.objects.get(LATENTS_BUCKET, LatentRecord.version_key(song, "v0002"))
    )
    assert stored.model_version == "v0002"
    assert torch.equal(stored.images, first.images)  # the same windows, inverted again
    assert not torch.allclose(stored.latents, first.latents)
    assert loop.encoder.reconcile() == 0  # nothing left to do

    ready = loop.generator.make_track(
        Request("gen-1", (song,), 0.5, 4, 7, "listener", kind=TrackKind.GENERATED)
    )
    assert ready.provenance.model_version == "v0002"
    assert loop.generator._records[(song, "v0002")].model_version == "v0002"
    assert loop.ports.objects.exists(LATENTS_BUCKET, LatentRecord.key(song))  # the marker


def test_the_trainer_publishes_each_version_with_its_index_and_the_winner_in_it() -> None:
    import torch

    from riffloop.core import new_envelope
    from riffloop.runtime import ModelStore
    from riffloop.v1 import events_pb2
    from services.trainer import TrainerHandlers, TrainerSettings

    ports = shared_ports()
    ports.prepare()
    settings = TrainerSettings(
        untrained_base=True,
        base_preset="tiny",
        finetune_steps=2,
        batch_size=2,
        gate_mode="skip",
        canary_share=0.0,
        baseline_rows=8,
        baseline_inversion_steps=STEPS,
    )
    core = TrainerHandlers(settings, ports)
    assert core.ensure_base() == "v0001"
    store = ModelStore(ports.objects)
    base = store.load("v0001").baseline_index
    assert base.model_version == "v0001" and len(base) == 8
    assert all(i.startswith("tone:") for i in base.ids) and not base.champions

    # the selector kept one generation that beat the baseline of input "a+b"
    size = store.load("v0001").mel.n_mels
    window = torch.randint(0, 256, (size, size), dtype=torch.uint8)
    ports.objects.put("tracks", "t-win.json", json.dumps({"image_uint8": window.tolist()}).encode())
    pair = {"target_track_id": "t-win", "weight": 0.8, "input_key": "a+b", "score": 4.4}
    # a weighted set also trains generations that did not beat their baseline: they train,
    # and never become the input's champion (here one with a higher R, as a manifest may say)
    sidecar = json.dumps({"image_uint8": window.tolist()}).encode()
    ports.objects.put("tracks", "t-lose.json", sidecar)
    trained_only = {
        "target_track_id": "t-lose",
        "weight": 0.3,
        "input_key": "a+b",
        "score": 4.9,
        "beat_baseline": False,
    }
    manifest = {"pairs": [pair, trained_only]}
    ports.objects.put("trainsets", "ts-1.json", json.dumps(manifest).encode())
    event = events_pb2.TrainsetPublished(trainset_id="ts-1", pair_count=2, iteration=1)
    event.manifest.bucket, event.manifest.key = "trainsets", "ts-1.json"
    core.on_trainset_published(new_envelope("selector", event))

    assert store.current()["version"] == "v0002"
    child = store.load("v0002").baseline_index
    assert child.model_version == "v0002" and child.ids == [*base.ids, "track:t-win"]
    assert child.champions == {"a+b": "track:t-win"}
    assert torch.equal(child.images[-1, 0], window)
    z_agg = torch.randn(*store.load("v0002").image_shape)
    assert child.baseline_for("a+b", z_agg).id == "track:t-win"


def test_a_new_version_carries_the_older_rows_and_refreshes_them_every_kth_version() -> None:
    """Carried rows keep their latents; the new winner is inverted by the child; the
    ``refresh_every``-th version in a row inverts every row again (and so does a change of
    steps). Stored and read back, the count of carrying versions survives."""
    import torch

    from riffloop.core import ValidationError
    from riffloop.music import TrainingIndex, Winner, image_from_uint8, invert

    v1 = _tiny_model("v0001", seed=0)
    base = _base_index(v1)
    v2, v3 = _tiny_model("v0002", seed=1), _tiny_model("v0003", seed=2)
    win = Winner("a", "t-win", 4.5, base.images[0])
    carried = base.next_version(v2, [win], model_version="v0002", refresh_every=3)
    assert (carried.carried, len(carried)) == (1, len(base) + 1)
    assert torch.equal(carried.index.rows[: len(base)], base.index.rows)  # as v0001 inverted them
    fresh_row = base.index.similarity.row_features(
        invert(v2, image_from_uint8(carried.images[-1:]), STEPS).flatten(1)
    )
    assert torch.allclose(carried.index.rows[-1:].float(), fresh_row.float(), atol=2e-3)
    assert carried.baseline_for("a", carried.index.rows[:1].float()).id == "track:t-win"  # champion

    again = TrainingIndex.from_bytes(carried.to_bytes())
    assert again.carried == 1
    second = again.next_version(v3, [], model_version="v0003", refresh_every=3)
    assert second.carried == 2 and torch.equal(second.index.rows, carried.index.rows)
    refreshed = second.next_version(v1, [], model_version="v0004", refresh_every=3)
    rebuilt = TrainingIndex.build(v1, second.images, second.ids, STEPS, model_version="v0004")
    assert refreshed.carried == 0 and torch.equal(refreshed.index.rows, rebuilt.index.rows)
    assert refreshed.champions == {"a": "track:t-win"}

    assert base.next_version(v2, [], model_version="v0002").carried == 0  # the default: always
    other_steps = base.next_version(v2, [], model_version="v0002", steps=STEPS + 1)
    assert (other_steps.carried, other_steps.inversion_steps) == (0, STEPS + 1)
    with pytest.raises(ValidationError, match="refresh_every"):
        base.next_version(v2, [], model_version="v0002", refresh_every=0)

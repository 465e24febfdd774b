"""The generator batches the requests of one poll: one UNet batch per (model version, plan,
length), each request with its own seed's noise, so a track does not depend on its batch-mates;
an invalid request is dead-lettered alone; a chunk's tracks are published together."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import pytest
import soundfile

from riffloop.core import (
    Consumer,
    MemoryEventBus,
    TransientError,
    decode_envelope,
    dlq_topic,
    new_envelope,
)
from riffloop.v1 import events_pb2
from tests.services.conftest import shared_ports

pytestmark = pytest.mark.unit

STEPS = 3  # DDIM inversion steps: the tiny model only has to be consistent, not good
REQUESTED = "generation.requested.v1"


def _generator(batch: int = 16) -> tuple[Any, Any]:
    """Fresh in-memory ports serving one tiny model (seed 0) with its index, an encoder that
    inverted three songs, and a generator on them: (ports, generator)."""
    from riffloop.music import MelConfig, ModelConfig, MusicDiffusion, TrainingIndex, tone_windows
    from riffloop.runtime import ModelStore, ServedModel
    from services.encoder import Encoder, EncoderSettings
    from services.generator import Generator, GeneratorSettings

    mel = MelConfig(n_mels=16, x_res=16, n_fft=256, hop_length=64)
    model = MusicDiffusion.create(ModelConfig.preset("tiny"), mel, seed=0, version="v0001")
    images, ids = tone_windows(model.mel, 12, seed=1)
    model.baseline_index = TrainingIndex.build(model, images, ids, STEPS, model_version="v0001")
    ports = shared_ports()
    ports.prepare()
    store = ModelStore(ports.objects)
    store.publish(model)
    store.set_current(model.version)
    encoder = Encoder(
        EncoderSettings(inversion_steps=STEPS),
        ports,
        ServedModel(ModelStore(ports.objects), "encoder", canaries=False),
    )
    generator = Generator(
        GeneratorSettings(default_quality=4, latent_wait_s=0.0, generation_batch=batch),
        ports,
        ServedModel(ModelStore(ports.objects), "generator"),
    )
    assert encoder.models.load_current() and generator.model.load_current()
    for freq in (220.0, 330.0, 495.0):
        encoder.encode(_song(ports, freq))
    return ports, generator


def _song(ports: Any, freq: float) -> str:
    t = np.arange(int(0.5 * 22050)) / 22050
    buffer = io.BytesIO()
    tone = (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32")
    soundfile.write(buffer, tone, 22050, "PCM_16", format="WAV")
    data = buffer.getvalue()
    song_id = hashlib.sha256(data).hexdigest()
    ports.objects.put("songs", song_id, data)
    return song_id


def _songs(ports: Any) -> list[str]:
    return sorted(ports.objects.list("songs"))


def _requests(songs: list[str], kind: Any = None) -> list[Any]:
    from services.generator import Request

    pairs = [(songs[0], songs[1]), (songs[2],), (songs[1], songs[2], songs[0])]
    # 0.08 s: 2 overlapping windows of 0.046 s at this mel (16 frames of 64 samples)
    return [
        Request(f"req-{i}", pair, 0.5, 4, 11 + i, "listener", kind=kind, duration_seconds=0.08)
        for i, pair in enumerate(pairs)
    ]


def _sidecar(ports: Any, track_id: str) -> dict[str, Any]:
    return json.loads(ports.objects.get("tracks", f"{track_id}.json"))


def _audio(ports: Any, track_id: str) -> np.ndarray:
    audio, _ = soundfile.read(io.BytesIO(ports.objects.get("tracks", f"{track_id}.wav")))
    return np.asarray(audio)


def test_a_batch_of_three_gives_the_images_of_three_single_requests() -> None:
    import torch

    from riffloop.loop import TrackKind
    from riffloop.music import TrackLength, grid_from_npy

    ports_b, batched = _generator()
    ports_s, single = _generator()
    songs = _songs(ports_b)
    assert songs == _songs(ports_s)
    requests = _requests(songs, kind=TrackKind.GENERATED)

    together = batched.make_tracks(requests)
    alone = [single.make_track(r) for r in requests]

    # one UNet batch of 3 was timed (and no chunk of 1), and one chunk of 1 per single request
    plan_steps, windows = 8 - 4, 2  # total = ⌊4/(1−0.5)⌋ = 8, start = 4; 0.08 s → 2 windows
    assert batched.ready_delay.draw((plan_steps, windows, 3)) is not None
    assert batched.ready_delay.draw((plan_steps, windows, 1)) is None
    assert single.ready_delay.draw((plan_steps, windows, 1)) is not None
    for a, b in zip(together, alone, strict=True):
        assert isinstance(a, events_pb2.TrackReady)
        assert a.track_id == b.track_id and a.duration_seconds == b.duration_seconds
        sa, sb = _sidecar(ports_b, a.track_id), _sidecar(ports_s, b.track_id)
        assert sa["provenance"] == sb["provenance"] and sa["windows"] == windows
        np.testing.assert_allclose(sa["embedding"], sb["embedding"], atol=1e-5)
        # 8-bit images: equal but where a float difference crosses a rounding boundary
        ia, ib = np.array(sa["image_uint8"]), np.array(sb["image_uint8"])
        assert np.abs(ia - ib).max() <= 1 and (ia != ib).mean() < 0.01
        # the whole 8-bit image is stored beside the audio; its window 0 is the sidecar's
        length = TrackLength(sa["windows"], ia.shape[-1], sa["window_overlap"])
        grid = grid_from_npy(ports_b.objects.get("tracks", sa["mel_key"]))
        assert grid.shape == (ia.shape[0], length.frames)
        assert torch.equal(length.windows_of(grid[None])[0, 0], torch.as_tensor(ia).byte())
        # the same track, to float noise: a batch's UNet sums in another order (more so with
        # more threads: max |Δ| 1.8e-3 with one, 2.3e-3 with two, of a peak of 1), and Griffin-
        # Lim carries a one-level image difference into every sample near it. The difference's
        # rms is 0.004–0.13 % of the track's (measured); two unrelated tracks' would be ≈ √2.
        xa, xb = _audio(ports_b, a.track_id), _audio(ports_s, b.track_id)
        rms = float(np.sqrt(np.mean(xb**2)))
        assert float(np.sqrt(np.mean((xa - xb) ** 2))) <= 5e-3 * rms
        assert float(np.abs(xa - xb).max()) <= 1e-2
    # and the batch-mates do differ from one another (their own noise and inputs)
    embeddings = [_sidecar(ports_b, t.track_id)["embedding"] for t in together]
    assert not np.allclose(embeddings[0], embeddings[1], atol=1e-3)


def test_a_chunk_holds_at_most_generation_batch_requests() -> None:
    from riffloop.loop import TrackKind

    ports, generator = _generator(batch=2)
    results = generator.make_tracks(_requests(_songs(ports), kind=TrackKind.GENERATED))
    assert all(isinstance(r, events_pb2.TrackReady) for r in results)
    assert generator.ready_delay.draw((4, 2, 2)) is not None  # chunks of 2 and 1
    assert generator.ready_delay.draw((4, 2, 1)) is not None
    assert generator.ready_delay.draw((4, 2, 3)) is None


def test_a_baseline_is_published_with_its_chunks_generations() -> None:
    """A chunk of a generation and a baseline times one chunk of 2 requests, both published;
    a lone baseline with no lone request timed yet runs the generation anyway (timing it)."""
    from riffloop.loop import TrackKind

    ports, generator = _generator()
    gen, base, lone = _requests(_songs(ports))
    gen = type(gen)(**{**gen.__dict__, "kind": TrackKind.GENERATED})
    base = type(base)(**{**base.__dict__, "kind": TrackKind.BASELINE})
    lone = type(lone)(**{**lone.__dict__, "kind": TrackKind.BASELINE})
    results = generator.make_tracks([gen, base])
    kinds = [_sidecar(ports, r.track_id)["provenance"]["kind"] for r in results]
    assert kinds == ["generated", "baseline"]
    assert generator.ready_delay.draw((4, 2, 2)) is not None
    assert generator.ready_delay.draw((4, 2, 1)) is None
    generator.make_track(lone)
    assert generator.ready_delay.draw((4, 2, 1)) is not None


def test_one_bad_request_of_a_polled_batch_is_dead_lettered_alone() -> None:
    from riffloop.runtime import EventRouter

    ports, generator = _generator()
    songs = _songs(ports)
    bus: MemoryEventBus = ports.bus
    bus.ensure_topics([REQUESTED, dlq_topic(REQUESTED), "tracks.ready.v1"])

    def requested(i: int, song_ids: list[str]) -> events_pb2.Envelope:
        return new_envelope(
            "gateway",
            events_pb2.GenerationRequested(
                request_id=f"req-{i}",
                song_ids=song_ids,
                similarity=0.5,
                quality=4,
                user_id="listener",
                duration_seconds=0.08,
            ),
        )

    sent = [requested(0, songs[:2]), requested(1, ["not-a-song"]), requested(2, songs[2:])]
    for envelope in sent:
        bus.publish(REQUESTED, "one-partition", envelope)
    # the wiring of services/generator/_build.py
    router = EventRouter(
        {"model.published.v1": generator.on_model_published},
        {REQUESTED: generator.on_generation_requests},
        max_batch=generator.settings.generation_batch,
    )
    consumer = Consumer(
        bus,
        ports.kv,
        group="generator",
        topics=router.topics,
        handler=router,
        batch_handlers=router.batch_handlers(),
        max_batch=router.max_batch,
        poll_timeout_s=0.01,
    )
    assert consumer.run_once() == 3
    consumer.close()

    def read(topic: str) -> list[events_pb2.Envelope]:
        subscription = bus.subscribe("reader", [topic])
        try:
            return [decode_envelope(m.value, topic) for m in subscription.poll(0.01, 100)]
        finally:
            subscription.close()

    [dead] = [e.dead_letter for e in read(dlq_topic(REQUESTED))]
    assert dead.original_event_id == sent[1].event_id
    assert dead.error_type == "ValidationError" and "64-hex sha256" in dead.error
    ready = read("tracks.ready.v1")
    assert sorted(e.track_ready.provenance.request_id for e in ready) == ["req-0", "req-2"]
    # each track's event carries its own request's correlation id
    by_request = {e.track_ready.provenance.request_id: e.correlation_id for e in ready}
    assert by_request == {"req-0": sent[0].event_id, "req-2": sent[2].event_id}
    # the two good requests ran as one chunk of 2 (whatever their kinds)
    assert generator.ready_delay.draw((4, 2, 2)) is not None


def test_a_request_waiting_for_latents_holds_up_neither_the_ready_ones_nor_the_others() -> None:
    """Requests whose songs have no latents yet are put off: the ready ones are made first,
    and the put-off ones share one deadline (latent_wait_s after the batch began) instead of
    waiting it one after another."""
    import dataclasses
    import time

    from services.generator import Request

    ports, generator = _generator()
    generator.settings = dataclasses.replace(generator.settings, latent_wait_s=1.0)
    songs = _songs(ports)
    unencoded = [_song(ports, f) for f in (600.0, 700.0, 800.0)]  # uploaded, never inverted
    waiting = [Request(f"wait-{i}", (s,), 0.5, 4, 5 + i, "u") for i, s in enumerate(unencoded)]
    ready = Request("ready", (songs[0], songs[1]), 0.5, 4, 9, "u", duration_seconds=0.08)
    run_at: list[float] = []
    run_chunk = generator._run_chunk

    def timed(chunk: Any) -> Any:
        run_at.append(time.monotonic() - started)
        return run_chunk(chunk)

    generator._run_chunk = timed
    started = time.monotonic()
    results = generator.make_tracks([*waiting[:2], ready, waiting[2]])
    elapsed = time.monotonic() - started
    assert isinstance(results[2], events_pb2.TrackReady)
    for result in (results[0], results[1], results[3]):
        assert isinstance(result, TransientError) and "no latents" in str(result)
    assert run_at and run_at[0] < 0.5  # the ready request did not wait for the others
    assert 1.0 <= elapsed < 2.0, elapsed  # one shared wait of 1 s, not 3 × 1 s

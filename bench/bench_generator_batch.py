"""The generator service at generation batch 1 vs 16: N requests through the running service.

    PYTHONPATH=. .venv/bin/python -m bench.bench_generator_batch [--model assets/base-model]
        [--requests 32] [--batches 1 16] [--quality 20] [--similarity 0.5] [--seconds 5.94]
        [--threads 1]

One process, in-memory ports. The base model is published as v0001 with its shipped baseline
index (what the trainer does at start-up, riffloop.loop.ReleaseCycle.bootstrap); the encoder
inverts three short songs (one window each, its default 50 steps). Per batch size the generator
service is built and started (``services.generator.build``: consumer, model loader, gRPC) on a
fresh event bus, the requests are published at once (a backlog, as a listening session's ~100
requests make), and the time until the last tracks.ready.v1 is taken. The blind draw still makes
~25 % baselines; they cost what the service makes them cost (ReadyDelay). The 1-minute load
average is printed before and after each run: on a shared machine the figures are only
comparable when it stays put.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import time
from pathlib import Path

REQUESTED = "generation.requested.v1"
READY = "tracks.ready.v1"


def _song(freq: float, seconds: float = 1.6) -> bytes:
    import numpy as np
    import soundfile

    t = np.arange(int(seconds * 22050)) / 22050
    tone = 0.3 * np.sin(2 * np.pi * freq * t) + 0.1 * np.sin(2 * np.pi * 2.5 * freq * t)
    buffer = io.BytesIO()
    soundfile.write(buffer, tone.astype("float32"), 22050, "PCM_16", format="WAV")
    return buffer.getvalue()


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("assets/base-model"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--quality", type=int, default=20)
    parser.add_argument("--similarity", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=5.94)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    if args.requests < 1 or any(b < 1 for b in args.batches):
        parser.error("--requests and --batches must be ≥ 1")

    import torch

    from riffloop.core import (
        MemoryEventBus,
        MemoryKeyValueStore,
        MemoryObjectStore,
        decode_envelope,
        new_envelope,
    )
    from riffloop.music import MusicDiffusion
    from riffloop.runtime import ModelStore, Ports, ServedModel
    from riffloop.v1 import common_pb2, events_pb2
    from services.encoder import Encoder, EncoderSettings
    from services.generator import GeneratorSettings, build

    torch.set_num_threads(args.threads)
    objects, kv = MemoryObjectStore(), MemoryKeyValueStore()
    model = MusicDiffusion.from_pretrained(args.model)
    model.version, model.parent = "v0001", None
    if model.baseline_index is None:
        raise SystemExit(f"{args.model} has no baseline index")
    model.baseline_index.model_version = model.version
    setup = Ports("bench", MemoryEventBus(), objects, kv)
    setup.prepare()  # buckets and topics
    store = ModelStore(objects)
    store.publish(model)
    store.set_current(model.version)
    encoder = Encoder(
        EncoderSettings(), setup, ServedModel(ModelStore(objects), "encoder", canaries=False)
    )
    assert encoder.models.load_current()
    songs = []
    for freq in (220.0, 330.0, 495.0):
        data = _song(freq)
        song_id = hashlib.sha256(data).hexdigest()
        objects.put("songs", song_id, data)
        encoder.encode(song_id)
        songs.append(song_id)
    print(
        f"model {args.model} ({model.num_parameters() / 1e6:.1f} M parameters), "
        f"{args.requests} requests of {args.seconds} s, q={args.quality}, "
        f"s={args.similarity}, torch threads {args.threads}, cores {os.cpu_count()}"
    )

    for batch in args.batches:
        bus = MemoryEventBus()
        ports = Ports("generator", bus, objects, kv)
        settings = GeneratorSettings(
            grpc_port=0,
            metrics_port=0,
            consumer_poll_timeout_s=0.05,
            generation_batch=batch,
            torch_threads=args.threads,
            latent_wait_s=0.0,
        )
        runtime, generator = build(settings, ports)
        runtime.start()
        try:
            deadline = time.monotonic() + 120
            while not generator.model.ready:
                if time.monotonic() > deadline:
                    raise SystemExit("the generator did not load the model")
                time.sleep(0.1)
            reader = bus.subscribe("bench-reader", [READY])
            load_before = _load()
            started = time.perf_counter()
            for i in range(args.requests):
                pair = [songs[i % 3], songs[(i + 1) % 3]]
                event = events_pb2.GenerationRequested(
                    request_id=f"b{batch}-r{i:03d}",
                    song_ids=pair,
                    similarity=args.similarity,
                    quality=args.quality,
                    user_id="bench",
                    duration_seconds=args.seconds,
                )
                bus.publish(REQUESTED, event.request_id, new_envelope("bench", event))
            kinds: dict[str, int] = {}
            seen = 0
            firsts: list[float] = []
            while seen < args.requests:
                if time.perf_counter() - started > args.timeout:
                    raise SystemExit(f"batch {batch}: {seen}/{args.requests} after the timeout")
                for message in reader.poll(0.2, 100):
                    ready = decode_envelope(message.value, READY).track_ready
                    baseline = ready.provenance.kind == common_pb2.TRACK_KIND_BASELINE
                    kind = "baseline" if baseline else "generated"
                    kinds[kind] = kinds.get(kind, 0) + 1
                    seen += 1
                    firsts.append(time.perf_counter() - started)
            elapsed = time.perf_counter() - started
            print(
                f"batch {batch:>3}: {args.requests} tracks in {elapsed:7.1f} s "
                f"({elapsed / args.requests:5.2f} s/track; first ready after {min(firsts):.1f} s; "
                f"{kinds}); load {load_before} → {_load()}"
            )
            reader.close()
        finally:
            runtime.stop()


if __name__ == "__main__":
    main()

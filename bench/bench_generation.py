"""Generation throughput: Riffloop's batched path vs diffusers' AudioDiffusionPipeline.

    nice .venv/bin/python -m bench.bench_generation [--model assets/base-model] [--clips 16]
        [--steps 50] [--batch 16] [--threads 1] [--repeats 2]

Both sides use the *same* UNet object (identical weights), the same DDIM scheduler config, step
count, mel resolution and Griffin-Lim iteration count (``MelConfig.n_iter``), and the same x_T
noise, so their images agree (checked and printed: max |Δ| in 8-bit grey levels).

- **baseline** — ``diffusers.pipelines.deprecated.audio_diffusion.AudioDiffusionPipeline`` (still
  shipped in diffusers 0.42, deprecated), called once per clip as teticio/audio-diffusion and the
  paper's prototype serve requests: 50 DDIM steps on a batch of one, 8-bit PIL image, then
  ``Mel.image_to_audio`` = ``librosa.feature.inverse.mel_to_audio`` (NNLS mel inversion +
  librosa Griffin-Lim, n_iter iterations). Also timed with ``batch_size=B`` (its UNet batched, its
  audio still one librosa call per image) to split the gain between batching and Griffin-Lim.
- **ours** — ``riffloop.music.generate`` on batches of B x_T (η = 0, float images, no uint8
  round trip) and ``MelCodec.images_to_audio`` (one batched torchaudio InverseMelScale +
  GriffinLim call for the whole batch).

Reported: clips/s of each, the ratio, the share of wall time spent in Griffin-Lim (mel → audio)
for each, and single-clip latency (one request, batch of one) of each. Median of ``--repeats``.
Without ``--model`` (or when ``assets/base-model`` is absent) a freshly initialised ``cpu_small``
model is used: throughput does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

from riffloop.music import MelCodec, ModelConfig, MusicDiffusion, to_uint8
from riffloop.music._ddim import generate

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "base-model"


@dataclass
class Timing:
    seconds: float
    gl_seconds: float
    clips: int

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds

    @property
    def gl_share(self) -> float:
        return self.gl_seconds / self.seconds


def _median(runs: list[Timing]) -> Timing:
    return Timing(
        statistics.median(r.seconds for r in runs),
        statistics.median(r.gl_seconds for r in runs),
        runs[0].clips,
    )


def _baseline_pipeline(model: MusicDiffusion):  # type: ignore[no-untyped-def]
    from diffusers.pipelines.deprecated.audio_diffusion import AudioDiffusionPipeline, Mel

    mel_cfg = model.mel
    mel = Mel(
        x_res=mel_cfg.x_res,
        y_res=mel_cfg.n_mels,
        sample_rate=mel_cfg.sample_rate,
        n_fft=mel_cfg.n_fft,
        hop_length=mel_cfg.hop_length,
        top_db=int(mel_cfg.top_db),
        n_iter=mel_cfg.n_iter,
    )
    scheduler = DDIMScheduler.from_config(copy.deepcopy(dict(model.scheduler.config)))
    pipe = AudioDiffusionPipeline(vqvae=None, unet=model.unet, mel=mel, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _time_baseline(pipe, noise: torch.Tensor, steps: int, batch: int) -> tuple[Timing, np.ndarray]:  # type: ignore[no-untyped-def]
    """The pipeline on ``noise`` in calls of ``batch`` clips; Griffin-Lim timed by wrapping
    ``Mel.image_to_audio`` (the pipeline calls it once per image)."""
    gl = [0.0]
    original: Callable[..., np.ndarray] = pipe.mel.image_to_audio

    def timed(image):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = original(image)
        gl[0] += time.perf_counter() - t0
        return out

    pipe.mel.image_to_audio = timed
    images: list[np.ndarray] = []
    t0 = time.perf_counter()
    try:
        for i in range(0, noise.shape[0], batch):
            out = pipe(
                batch_size=min(batch, noise.shape[0] - i), steps=steps, noise=noise[i : i + batch]
            )
            images.extend(np.asarray(img) for img in out.images)
    finally:
        pipe.mel.image_to_audio = original
    return Timing(time.perf_counter() - t0, gl[0], noise.shape[0]), np.stack(images)


def _time_ours(
    model: MusicDiffusion, codec: MelCodec, noise: torch.Tensor, steps: int, batch: int
) -> tuple[Timing, np.ndarray]:
    gl = 0.0
    images = []
    t0 = time.perf_counter()
    for i in range(0, noise.shape[0], batch):
        imgs = generate(model, noise[i : i + batch], steps, batch_size=batch)
        t1 = time.perf_counter()
        codec.images_to_audio(imgs)
        gl += time.perf_counter() - t1
        images.append(to_uint8(imgs)[:, 0].numpy())
    return Timing(time.perf_counter() - t0, gl, noise.shape[0]), np.concatenate(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    path = args.model or (DEFAULT_MODEL if (DEFAULT_MODEL / "unet").is_dir() else None)
    if path is not None:
        model = MusicDiffusion.from_pretrained(path)
        source = str(path)
    else:
        model = MusicDiffusion.create(ModelConfig.preset("cpu_small"), seed=args.seed)
        source = "fresh cpu_small (no assets/base-model)"
    model.unet.eval()
    codec = MelCodec(model.mel)
    pipe = _baseline_pipeline(model)
    c, h, w = model.image_shape
    noise = torch.randn(args.clips, c, h, w, generator=torch.Generator().manual_seed(args.seed))
    print(
        f"model: {source}, {model.num_parameters() / 1e6:.2f} M params, {h}×{w} mel, "
        f"{model.prediction_type}; {args.steps} DDIM steps; Griffin-Lim n_iter={model.mel.n_iter}; "
        f"{args.clips} clips; batch {args.batch}; torch threads {args.threads}"
    )

    # warm-up (allocators, librosa's numba caches) outside the timings
    _time_baseline(pipe, noise[:1], 2, 1)
    _time_ours(model, codec, noise[:1], 2, 1)

    runs: dict[str, list[Timing]] = {"pipe1": [], "pipeB": [], "ours": [], "lat_p": [], "lat_o": []}
    img_pipe = img_ours = None
    for _ in range(args.repeats):  # interleaved so background load hits every side alike
        t, img_pipe = _time_baseline(pipe, noise, args.steps, 1)
        runs["pipe1"].append(t)
        runs["pipeB"].append(_time_baseline(pipe, noise, args.steps, args.batch)[0])
        t, img_ours = _time_ours(model, codec, noise, args.steps, args.batch)
        runs["ours"].append(t)
        runs["lat_p"].append(_time_baseline(pipe, noise[:1], args.steps, 1)[0])
        runs["lat_o"].append(_time_ours(model, codec, noise[:1], args.steps, 1)[0])
    res = {k: _median(v) for k, v in runs.items()}
    assert img_pipe is not None and img_ours is not None
    diff = np.abs(img_pipe.astype(np.int16) - img_ours.astype(np.int16))

    def row(name: str, t: Timing) -> str:
        return (
            f"  {name:<44} {t.clips_per_s:7.3f} clips/s  {t.seconds:8.2f} s  "
            f"Griffin-Lim {100 * t.gl_share:5.1f} %"
        )

    print("throughput (median of repeats):")
    print(row("AudioDiffusionPipeline, one clip per call", res["pipe1"]))
    print(row(f"AudioDiffusionPipeline, batch_size={args.batch}", res["pipeB"]))
    print(row(f"riffloop generate + MelCodec, batch {args.batch}", res["ours"]))
    ratio = res["ours"].clips_per_s / res["pipe1"].clips_per_s
    print(
        f"  ratio ours / pipeline (per clip): {ratio:.2f}×; "
        f"vs pipeline batched: {res['ours'].clips_per_s / res['pipeB'].clips_per_s:.2f}×"
    )
    print("single-clip latency (one request, batch of one):")
    print(
        f"  pipeline {res['lat_p'].seconds:.2f} s (Griffin-Lim {res['lat_p'].gl_seconds:.2f} s), "
        f"ours {res['lat_o'].seconds:.2f} s (Griffin-Lim {res['lat_o'].gl_seconds:.2f} s)"
    )
    print(
        f"same images: max |Δ| {int(diff.max())} grey levels, mean {diff.mean():.3f} "
        f"(8-bit; the pipeline quantises, we do not)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

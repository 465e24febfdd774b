"""Generation throughput: Riffloop's batched path vs diffusers' AudioDiffusionPipeline.

    bin/riffloop bench generation [--model assets/base-model] [--clips 16] [--batch 16]
        [--steps 50] [--fast-steps 20] [--threads 1 2] [--repeats 2]

Both sides use the *same* UNet object (identical weights), the same DDIM scheduler config, step
count, mel resolution and Griffin-Lim iteration count (``MelConfig.n_iter``), and the same x_T
noise, so their images agree (checked and printed: max |Δ| in 8-bit grey levels).

- **baseline** — ``diffusers.pipelines.deprecated.audio_diffusion.AudioDiffusionPipeline`` (still
  shipped in diffusers 0.42, deprecated), called once per clip as teticio/audio-diffusion and the
  paper's prototype serve requests: ``--steps`` DDIM steps on a batch of one, 8-bit PIL image, then
  ``Mel.image_to_audio`` = ``librosa.feature.inverse.mel_to_audio`` (NNLS mel inversion + librosa
  Griffin-Lim, n_iter iterations). Also timed with ``batch_size=B`` (its UNet batched, its audio
  still one librosa call per image) to split the gain between batching and Griffin-Lim.
- **ours** — ``riffloop.music.generate`` on batches of B x_T (η = 0, float images, no uint8 round
  trip; UNet input NCHW) and ``MelCodec.images_to_audio`` (one batched
  torchaudio InverseMelScale + GriffinLim call for the whole batch). Also timed with the layout
  lever on (``channels_last=True``, NHWC) and, with ``--fast-steps N``, with DPM-Solver++ at N
  steps (``sampler="dpmsolver++"``: fewer UNet calls; its quality is a separate question, answered
  by ``python -m riffloop.music.quality_cli report --sampler``).

Each repeat runs every side once, baseline and ours alternating, at each ``--threads`` count in
turn, and prints its own table with the 1-minute load average sampled before every side: a repeat
is *steady* when those samples stay within 0.5 and *quiet* when they stay below the core count;
quote a ratio only from a steady, quiet repeat. Per side: clips/s (wall), CPU seconds of the
process (``time.process_time``, all threads; a cross-check that other processes' load inflates
less than wall time), Griffin-Lim share, and the UNet's achieved GFLOP/s (FLOPs of one forward
counted with ``torch.utils.flop_counter.FlopCounterMode``) next to the peak of a 2048² float32
``torch.matmul`` at the same thread count, measured in the same repeat. Single-clip latency is one
request, batch of one. Without ``--model`` (or when ``assets/base-model`` is absent) a freshly
initialised ``cpu_small`` model is used: throughput does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from torch.utils.flop_counter import FlopCounterMode

from riffloop.music import MelCodec, ModelConfig, MusicDiffusion, to_uint8
from riffloop.music._ddim import generate

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "base-model"
STEADY = 0.5  # max spread of the 1-min load average within a repeat to call it steady


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


@dataclass
class Timing:
    seconds: float  # wall
    cpu_seconds: float  # process CPU time, all threads
    gl_seconds: float  # wall spent in mel → audio
    clips: int
    unet_calls_per_clip: int

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds

    @property
    def gl_share(self) -> float:
        return self.gl_seconds / self.seconds

    def unet_gflops(self, flops_per_clip_call: float) -> float:
        """Achieved GFLOP/s of the UNet: its FLOPs over the wall time outside Griffin-Lim."""
        flops = flops_per_clip_call * self.clips * self.unet_calls_per_clip
        return flops / (self.seconds - self.gl_seconds) / 1e9


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
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        for i in range(0, noise.shape[0], batch):
            out = pipe(
                batch_size=min(batch, noise.shape[0] - i), steps=steps, noise=noise[i : i + batch]
            )
            images.extend(np.asarray(img) for img in out.images)
    finally:
        pipe.mel.image_to_audio = original
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Timing(wall, cpu, gl[0], noise.shape[0], steps), np.stack(images)


def _time_ours(
    model: MusicDiffusion,
    codec: MelCodec,
    noise: torch.Tensor,
    steps: int,
    batch: int,
    **generate_kwargs: object,
) -> tuple[Timing, torch.Tensor]:
    gl = 0.0
    images = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, noise.shape[0], batch):
        imgs = generate(model, noise[i : i + batch], steps, batch_size=batch, **generate_kwargs)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        codec.images_to_audio(imgs)
        gl += time.perf_counter() - t1
        images.append(imgs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Timing(wall, cpu, gl, noise.shape[0], steps), torch.cat(images)


def unet_flops(model: MusicDiffusion, batch: int) -> float:
    """FLOPs of one UNet forward on ``batch`` clips (FlopCounterMode: conv, matmul, attention)."""
    x = torch.zeros(batch, *model.image_shape)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.unet(x, torch.tensor(500))
    return float(counter.get_total_flops())


def matmul_peak(n: int = 2048, tries: int = 5) -> tuple[float, float]:
    """(wall, CPU-time) GFLOP/s of the best of ``tries`` n×n float32 matmuls at the current
    thread count: the machine's practical limit for dense float32 work."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    wall, cpu = [], []
    for _ in range(tries):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    flops = 2.0 * n**3
    return flops / min(wall) / 1e9, flops / min(cpu) / 1e9


def _report(
    rep: int,
    threads: int,
    cores: int,
    loads: list[float],
    peak: tuple[float, float],
    t: dict[str, Timing],
    out: dict[str, object],
    labels: dict[str, str],
    per_clip: float,
) -> None:
    """One repeat's table, its ratios, and whether it may be quoted."""
    spread = max(loads) - min(loads)
    steady, quiet = spread <= STEADY, max(loads) < cores
    print(
        f"\nrepeat {rep + 1}, {threads} thread(s): 1-min load "
        f"{' → '.join(f'{x:.2f}' for x in loads)} ({'steady' if steady else 'CHANGED'}, "
        f"spread {spread:.2f}; {'quiet' if quiet else f'BUSY: above {cores} cores'})"
    )
    print(f"  matmul peak (2048² float32): {peak[0]:.1f} GFLOP/s wall, {peak[1]:.1f} per CPU-s")
    for (key, x), load in zip(t.items(), loads[1:], strict=True):
        print(
            f"  {labels[key]:<44} {x.clips_per_s:7.3f} clips/s {x.seconds:7.2f} s wall "
            f"{x.cpu_seconds:7.2f} s CPU  GL {100 * x.gl_share:4.1f} %  "
            f"UNet {x.unet_gflops(per_clip):5.1f} GFLOP/s  (load after {load:.2f})"
        )
    tag = "" if steady and quiet else "  [not quotable: load changed or machine busy]"
    pipe1, pipe_b, ours, nhwc = t["pipe1"], t["pipeB"], t["ours"], t["nhwc"]
    for key in ("ours", "fast"):
        if key in t:
            x = t[key]
            print(
                f"  {labels[key]} / {labels['pipe1']}: {x.clips_per_s / pipe1.clips_per_s:.2f}× "
                f"clips/s ({pipe1.cpu_seconds / x.cpu_seconds:.2f}× by CPU time); vs pipeline "
                f"batched {x.clips_per_s / pipe_b.clips_per_s:.2f}×{tag}"
            )
    print(
        f"  channels_last lever (ours NCHW / NHWC, > 1: the lever helps): "
        f"{ours.seconds / nhwc.seconds:.2f}× wall, "
        f"{ours.cpu_seconds / nhwc.cpu_seconds:.2f}× CPU time"
    )
    lat = ", ".join(
        f"{labels[k].removeprefix('latency: ')} {t[k].seconds:.2f} s (GL {t[k].gl_seconds:.2f} s)"
        for k in ("lat_p", "lat_o", "lat_f")
        if k in t
    )
    print(f"  single-clip latency: {lat}")
    u8_pipe = np.asarray(out["pipe1"]).astype(np.int16)
    img_ours = out["ours"]
    assert isinstance(img_ours, torch.Tensor)
    u8_ours = to_uint8(img_ours)[:, 0].numpy().astype(np.int16)
    nhwc_diff = float((out["nhwc"] - img_ours).abs().max())  # type: ignore[operator]
    line = (
        f"  images: ours vs pipeline max |Δ| {int(np.abs(u8_pipe - u8_ours).max())} grey levels "
        f"(8-bit; the pipeline quantises, we do not); NHWC vs NCHW max |Δ| {nhwc_diff:.1e}"
    )
    if "fast" in out:
        fast = to_uint8(out["fast"]).float()  # type: ignore[arg-type]
        d = float((fast - to_uint8(img_ours).float()).abs().mean())
        line += f"; DPM-Solver++ vs DDIM mean |Δ| {d:.2f} grey levels"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps, both sides")
    parser.add_argument(
        "--fast-steps", type=int, default=20, help="DPM-Solver++ steps for ours (0: skip)"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

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
    flops_b = unet_flops(model, args.batch)
    per_clip = flops_b / args.batch
    cores = os.cpu_count() or 1
    print(
        f"model: {source}, {model.num_parameters() / 1e6:.2f} M params, {h}×{w} mel, "
        f"{model.prediction_type}; {args.steps} DDIM steps (ours fast: DPM-Solver++ "
        f"{args.fast_steps}); Griffin-Lim n_iter={model.mel.n_iter}; {args.clips} clips; batch "
        f"{args.batch}; torch threads {args.threads}; {cores} cores\n"
        f"UNet forward: {flops_b / 1e9:.2f} GFLOP at batch {args.batch} "
        f"({per_clip / 1e9:.3f} GFLOP per clip)",
        flush=True,
    )

    # warm-up (allocators, oneDNN primitive caches, librosa's numba caches) outside the timings
    for threads in args.threads:
        torch.set_num_threads(threads)
        _time_baseline(pipe, noise[:1], 2, 1)
        _time_ours(model, codec, noise[: args.batch], 2, args.batch)
        _time_ours(model, codec, noise[:1], 2, 1)
        if args.fast_steps:
            _time_ours(model, codec, noise[:1], 2, 1, sampler="dpmsolver++")

    b, n, f = args.batch, args.steps, args.fast_steps
    labels = {
        "pipe1": f"pipeline, one clip per call, DDIM {n}",
        "ours": f"ours, batch {b}, DDIM {n}",
        "pipeB": f"pipeline, batch_size={b}, DDIM {n}",
        "nhwc": f"ours, batch {b}, DDIM {n}, NHWC (channels_last lever on)",
        "fast": f"ours, batch {b}, DPM-Solver++ {f}",
        "lat_p": f"latency: pipeline, DDIM {n}",
        "lat_o": f"latency: ours, DDIM {n}",
        "lat_f": f"latency: ours, DPM-Solver++ {f}",
    }
    one = noise[:1]
    dpm = {"sampler": "dpmsolver++"}
    plan: dict[str, Callable[[], tuple[Timing, object]]] = {  # baseline and ours alternate
        "pipe1": lambda: _time_baseline(pipe, noise, n, 1),
        "ours": lambda: _time_ours(model, codec, noise, n, b),
        "pipeB": lambda: _time_baseline(pipe, noise, n, b),
        "nhwc": lambda: _time_ours(model, codec, noise, n, b, channels_last=True),
        "fast": lambda: _time_ours(model, codec, noise, f, b, **dpm),
        "lat_p": lambda: _time_baseline(pipe, one, n, 1),
        "lat_o": lambda: _time_ours(model, codec, one, n, 1),
        "lat_f": lambda: _time_ours(model, codec, one, f, 1, **dpm),
    }
    if not f:
        del plan["fast"], plan["lat_f"]

    for rep in range(args.repeats):
        for threads in args.threads:
            torch.set_num_threads(threads)
            loads = [load1()]
            peak_wall, peak_cpu = matmul_peak()
            t: dict[str, Timing] = {}
            out: dict[str, object] = {}
            for key, fn in plan.items():
                t[key], out[key] = fn()
                loads.append(load1())
            _report(rep, threads, cores, loads, (peak_wall, peak_cpu), t, out, labels, per_clip)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Upload decode: ``riffloop.music.decode_audio`` (blocked, streamed resampler) against the
decode it replaced (blocks read and down-mixed, joined, then ``torchaudio.functional.resample``).

``python -m bench.bench_decode [--repeats 3] [--seconds 120]`` writes four uploads to a
temporary folder (44.1 kHz stereo WAV, 48 kHz stereo FLAC and 96 kHz mono FLAC of
``--seconds`` each, and 3 s of 44,101 Hz WAV, the rate torchaudio cannot reduce), then decodes
each with both, alternating baseline and ours in every repeat. It prints wall and CPU seconds
(``time.process_time``; one torch thread, so other processes' load inflates it far less than
wall time) and, from a second, traced run, the peak of Python allocations (tracemalloc:
numpy's buffers are traced, torch's are not, so the baseline's resampler tensors are missing
from its figure), with the 1-minute
load average after each side. A repeat is *quiet* when those samples stay below the core count;
only a quiet repeat's ratio may be quoted. The 44,101 Hz baseline is skipped by default: it
takes ≈ 65 s and 16 GiB (``--odd-baseline`` runs it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from riffloop.music import decode_audio

SAMPLE_RATE = 22050


def baseline_decode(path: Path) -> np.ndarray:
    """The decode before session 19 (riffloop/music/_audio.py at c1c38fc): blocks of 65,536
    frames, each checked finite and down-mixed, joined, then torchaudio's resample."""
    blocks = []
    with sf.SoundFile(path) as handle:
        rate = handle.samplerate
        while True:
            block = handle.read(frames=65536, dtype="float32", always_2d=True)
            if block.shape[0] == 0:
                break
            bool(np.isfinite(block).all())
            blocks.append(block.mean(axis=1, dtype=np.float64).astype(np.float32))
    mono = np.concatenate(blocks)
    if rate == SAMPLE_RATE:
        return mono
    with torch.inference_mode():
        resampled = torchaudio.functional.resample(torch.from_numpy(mono), rate, SAMPLE_RATE)
        return resampled.numpy().copy()


def ours(path: Path) -> np.ndarray:
    with path.open("rb") as file:
        return decode_audio(file).samples


def uploads(folder: Path, seconds: float) -> list[Path]:
    rng = np.random.default_rng(0)

    def music(rate: int, channels: int, length_s: float) -> np.ndarray:
        t = np.arange(int(length_s * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * 440 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
        noise = 0.02 * rng.standard_normal((t.size, channels))
        return (tone[:, None] + noise).astype(np.float32)

    specs = [
        ("44k1-stereo.wav", 44100, 2, seconds, "WAV", "PCM_16"),
        ("48k-stereo.flac", 48000, 2, seconds, "FLAC", "PCM_16"),
        ("96k-mono.flac", 96000, 1, seconds, "FLAC", "PCM_24"),
        ("44101-mono.wav", 44101, 1, 3.0, "WAV", "PCM_16"),
    ]
    paths = []
    for name, rate, channels, length_s, fmt, subtype in specs:
        path = folder / name
        sf.write(path, music(rate, channels, length_s), rate, format=fmt, subtype=subtype)
        paths.append(path)
    return paths


def measure(decode: Callable[[Path], np.ndarray], path: Path) -> tuple[float, float, float, int]:
    """(wall s, CPU s, peak traced MiB, samples): timed untraced, then traced once more for
    the peak (tracemalloc slows allocation, and ours allocates per block)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = decode(path)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tracemalloc.start()
    decode(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return wall, cpu, peak / 2**20, int(out.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--odd-baseline", action="store_true")
    args = parser.parse_args()
    if args.repeats < 1 or not 3.0 <= args.seconds <= 600.0:
        parser.error("--repeats must be ≥ 1 and --seconds in 3–600")
    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        paths = uploads(Path(tmp), args.seconds)
        for path in paths:  # warm both paths (imports, torchaudio's kernel cache)
            ours(path)
        baseline_decode(paths[0])
        for repeat in range(1, args.repeats + 1):
            loads: list[float] = []
            print(f"\nrepeat {repeat}")
            print("| upload | side | wall s | CPU s | peak traced MiB | samples | load |")
            print("|---|---|---|---|---|---|---|")
            ratios = []
            for path in paths:
                odd = "44101" in path.name
                rows = {}
                for side, decode in (("baseline", baseline_decode), ("ours", ours)):
                    if side == "baseline" and odd and not args.odd_baseline:
                        print(f"| {path.name} | baseline | skipped (≈ 65 s, 16 GiB) | | | | |")
                        continue
                    rows[side] = measure(decode, path)
                    load = os.getloadavg()[0]
                    loads.append(load)
                    wall, cpu, peak, n = rows[side]
                    print(
                        f"| {path.name} | {side} | {wall:.3f} | {cpu:.3f} | {peak:.0f} | {n} "
                        f"| {load:.2f} |"
                    )
                if len(rows) == 2:
                    ratios.append((path.name, rows["baseline"][1] / rows["ours"][1]))
            quiet = max(loads) < cores
            print(f"repeat {repeat}: {'quiet' if quiet else 'NOT quiet'} (load ≤ {max(loads):.2f})")
            for name, ratio in ratios:
                print(f"  {name}: baseline CPU / ours CPU = {ratio:.2f}")


if __name__ == "__main__":
    main()

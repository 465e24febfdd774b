"""resample: torchaudio's filter and values for common rates; any integer rates in memory that
does not grow with the rates' ratio, and a band-limited tone comes through at any of them."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torchaudio

from riffloop.music import resample
from riffloop.music._resample import Resampler

pytestmark = pytest.mark.unit


def noise(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(
        np.float32
    )


@pytest.mark.parametrize(
    ("source", "target"),
    [(44100, 22050), (48000, 22050), (8000, 22050), (16000, 22050), (96000, 22050),
     (192000, 22050), (11025, 22050), (22050, 44100)],
)  # fmt: skip
def test_matches_torchaudio_on_common_rates(source: int, target: int) -> None:
    x = noise(1.5, source)
    ours = resample(x, source, target)
    theirs = torchaudio.functional.resample(torch.from_numpy(x), source, target).numpy()
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    # float32 sums in another order: the same filter to ~1e-5 of a 0.3-rms signal
    np.testing.assert_allclose(ours, theirs, atol=5e-5)


@pytest.mark.parametrize("source", [4001, 22051, 44101, 191999])
def test_a_tone_comes_through_at_rates_that_do_not_reduce(source: int) -> None:
    # well inside the pass band: 6 zero crossings ripple by ≈ 3e-3 at half the cut-off
    # (torchaudio's filter alike: 2.8e-3 for a 1 kHz tone from 4,000 Hz)
    freq, seconds = min(1000.0, source / 8), 1.0
    x = np.sin(2 * np.pi * freq * np.arange(int(seconds * source)) / source).astype(np.float32)
    y = resample(x, source, 22050)
    assert y.size == -(-x.size * 22050 // source)  # ⌈len · target / source⌉
    expected = np.sin(2 * np.pi * freq * np.arange(y.size) / 22050)
    inner = slice(200, y.size - 200)  # away from the zeros assumed beyond both ends
    np.testing.assert_allclose(y[inner], expected[inner], atol=2e-3)


def _peak_bytes(seconds: float, source: int) -> tuple[int, int]:
    """(tracemalloc's peak while resampling ``seconds`` of noise to 22,050 Hz, output bytes)."""
    x = noise(seconds, source)
    tracemalloc.start()
    try:
        y = resample(x, source, 22050)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, y.nbytes


@pytest.mark.parametrize("source", [191999, 48000, 44100])
def test_memory_does_not_grow_with_the_rates_ratio_or_the_length(source: int) -> None:
    """torchaudio's kernel for 191,999 → 22,050 Hz is [22,050, ≈ 192,000] values (17 GB); here
    the weights are [22,050, 109] float32 (9.6 MB) and one block's temporaries (2^19 values,
    a few int64/float64 arrays at once: ≈ 24 MiB), whatever the input's length. Common rates
    (48 kHz: 147 phases; 44.1 kHz: one) go phase by phase over a chunk of 2^18 inputs."""
    table, block = 22050 * 109 * 4, 32 << 20
    short, short_out = _peak_bytes(20.0, source)
    assert short <= short_out + table + block, f"peak {short / 2**20:.0f} MiB"
    long, long_out = _peak_bytes(80.0, source)
    assert long - short <= (long_out - short_out) + (1 << 20)  # only the output grows


def test_equal_rates_copy_and_bad_rates_are_refused() -> None:
    x = noise(0.1, 22050)
    y = resample(x, 22050, 22050)
    assert y is not x and np.array_equal(x, y)
    np.testing.assert_array_equal(resample(x, 44100, 44100), x)
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, 22050)


def test_empty_input_gives_empty_output() -> None:
    assert resample(np.zeros(0, np.float32), 44100, 22050).size == 0


@pytest.mark.parametrize(("source", "target"), [(44100, 22050), (44101, 22050), (8000, 22050)])
def test_a_stream_in_blocks_of_any_size_gives_the_whole_arrays_result(
    source: int, target: int
) -> None:
    x = noise(3.0, source, seed=1)
    whole = resample(x, source, target)
    stream = Resampler(source, target)
    sizes = np.random.default_rng(2).integers(1, 40_000, size=200)
    cuts = np.cumsum(sizes)
    cuts = cuts[cuts < x.size]
    pieces = [stream.push(part) for part in np.split(x, cuts)]
    streamed = np.concatenate([*pieces, stream.finish()])
    np.testing.assert_array_equal(streamed, whole)


def test_a_finished_stream_takes_no_more_input() -> None:
    stream = Resampler(44100, 22050)
    stream.push(noise(0.1, 44100))
    stream.finish()
    with pytest.raises(ValueError, match="finished"):
        stream.push(noise(0.1, 44100))
    with pytest.raises(ValueError, match="finished"):
        stream.finish()

"""Band-limited resampling between any two integer rates, in memory bounded by the output block.

The filter is torchaudio's default (``torchaudio.functional.resample``: windowed sinc, Hann
window, ``lowpass_filter_width`` 6 zero crossings, ``rolloff`` 0.99), and so are the values
(tests/music/test_resample.py compares them). What differs is how it is computed.

torchaudio reduces the rates by their gcd to ``orig`` and ``new`` and builds one kernel per
output phase, a ``[new, 2·width + orig]`` tensor, and convolves the whole waveform with it at
once. For common rates that is small (44.1 kHz → 22.05 kHz: ``orig`` 2, ``new`` 1), but the
rates come from an upload's header: 44,101 Hz → 22,050 Hz reduces to ``orig`` 44,101 and
``new`` 22,050, a 3.9 GB kernel, and a 3 s file took 65 s and 16 GiB (192 kHz − 1 Hz was
killed). Here output sample y_j is the dot product of the input around its centre with a
``T``-tap slice of the same kernel, ``T`` ≈ 2·width (at most 109 taps for 192 kHz → 22.05 kHz),
taken from a table of ``new × T`` weights (≤ 22,050 × 109 float32, 9.6 MB) and applied to
blocks of outputs, so the memory beyond the input and output is that table and one block.

The maths (times in seconds; x_n sampled at f_in, y_j at f_out; f_c = rolloff · min(f_in, f_out)
the cut-off; L = ``lowpass_filter_width``):

    y_j = Σ_n x_n · (f_c / f_in) · sinc(π τ) · cos²(π τ / 2L),  τ = f_c · (n / f_in − j / f_out)

clamped to |τ| ≤ L (the window is zero there). With j = p·new + i, the centre j·orig/new lies
at p·orig + i·orig/new, so the weights depend only on the phase i: row i of the table.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["resample"]

LOWPASS_FILTER_WIDTH = 6  # zero crossings of the sinc on each side (torchaudio's default)
ROLLOFF = 0.99  # cut-off as a fraction of the lower Nyquist rate (torchaudio's default)
_BLOCK_VALUES = 1 << 19  # outputs × taps per block: 2 MiB per float32 temporary


def _phase_table(orig: int, new: int) -> tuple[np.ndarray, np.ndarray]:
    """(tap offsets d from each output's floor centre, weights [new, T] as float32), built a
    block of phases at a time so that its float64 temporaries stay at a block's size."""
    cutoff = min(orig, new) * ROLLOFF  # f_c in the reduced units
    radius = LOWPASS_FILTER_WIDTH * orig / cutoff  # |τ| ≤ L ⇔ |n − centre| ≤ radius (inputs)
    reach = math.ceil(radius) + 1
    offsets = np.arange(-reach, reach + 1, dtype=np.int64)
    weights = np.empty((new, offsets.size), dtype=np.float32)
    rows = max(1, _BLOCK_VALUES // offsets.size)
    for first in range(0, new, rows):
        phase = np.arange(first, min(first + rows, new), dtype=np.int64)
        taps = (phase * orig // new)[:, None] + offsets[None, :]  # n − p·orig: ⌊i·orig/new⌋ + d
        # τ = f_c · (n/orig − i/new) = f_c · (n·new − i·orig) / (orig·new), exact in int64
        tau = (taps * new - phase[:, None] * orig) / (orig * new) * cutoff
        tau = np.clip(tau, -LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
        window = np.cos(tau * (math.pi / LOWPASS_FILTER_WIDTH / 2)) ** 2
        weights[phase[0] : phase[-1] + 1] = np.sinc(tau) * window * (cutoff / orig)
    return offsets, weights


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 ``samples`` at ``source_rate`` → float32 at ``target_rate``, of length
    ⌈len · target / source⌉ (torchaudio's), zeros assumed beyond both ends."""
    if source_rate <= 0 or target_rate <= 0:
        raise ValueError("sample rates must be positive")
    x = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
    common = math.gcd(source_rate, target_rate)
    orig, new = source_rate // common, target_rate // common
    if orig == new:
        return x.copy()
    out = np.empty(math.ceil(new * x.size / orig), dtype=np.float32)
    offsets, weights = _phase_table(orig, new)
    reach = int(offsets[-1])
    block = max(1, _BLOCK_VALUES // offsets.size)
    for start in range(0, out.size, block):
        j = np.arange(start, min(start + block, out.size), dtype=np.int64)
        centre = (j * orig) // new  # ⌊j·orig/new⌋
        # the inputs this block reads, zero-padded where they run past either end
        low, high = int(centre[0]) - reach, int(centre[-1]) + reach + 1
        window = np.zeros(high - low, dtype=np.float32)
        inside = slice(max(low, 0), min(high, x.size))
        if inside.start < inside.stop:
            window[inside.start - low : inside.stop - low] = x[inside]
        values = window[(centre - low)[:, None] + offsets[None, :]]
        out[start : start + j.size] = np.einsum("bt,bt->b", values, weights[j % new])
    return out

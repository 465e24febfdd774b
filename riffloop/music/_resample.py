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
taken from a table of ``new × T`` weights (≤ 22,050 × 109 float32, 9.6 MB). With few phases
(common rates: 44.1 kHz has one, 48 kHz 147) each phase's outputs are one matrix-vector product
over a strided view of the input; with many (a rate that does not reduce) each output gathers
its inputs, a block of outputs at a time. The input is taken a chunk at a time, so the memory
beyond the output is the table, a chunk and one block.

The maths (times in seconds; x_n sampled at f_in, y_j at f_out; f_c = rolloff · min(f_in, f_out)
the cut-off; L = ``lowpass_filter_width``):

    y_j = Σ_n x_n · (f_c / f_in) · sinc(π τ) · cos²(π τ / 2L),  τ = f_c · (n / f_in − j / f_out)

clamped to |τ| ≤ L (the window is zero there). With j = p·new + i, the centre j·orig/new lies
at p·orig + i·orig/new, so the weights depend only on the phase i: row i of the table.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

__all__ = ["Resampler", "resample"]

LOWPASS_FILTER_WIDTH = 6  # zero crossings of the sinc on each side (torchaudio's default)
ROLLOFF = 0.99  # cut-off as a fraction of the lower Nyquist rate (torchaudio's default)
_BLOCK_VALUES = 1 << 19  # outputs × taps per block: 2 MiB per float32 temporary
_CHUNK_SAMPLES = 1 << 18  # inputs taken at a time (1 MiB of float32)
_STRIDED_PHASES = 1024  # up to this many phases, outputs are computed phase by phase


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


class Resampler:
    """The same filter over a stream: ``push`` blocks of input as they are decoded, and get
    back the output samples whose inputs have all arrived, computed a chunk of inputs (2^18)
    at a time; ``finish`` returns the rest (zeros assumed beyond the last input). It holds at
    most a chunk and the filter's reach, so a decoder need not keep the whole song at its
    source rate (a 600 s upload at 96 kHz is 230 MB of float32 there, 53 MB at 22,050 Hz)."""

    def __init__(self, source_rate: int, target_rate: int) -> None:
        if source_rate <= 0 or target_rate <= 0:
            raise ValueError("sample rates must be positive")
        common = math.gcd(source_rate, target_rate)
        self.orig, self.new = source_rate // common, target_rate // common
        self._identity = self.orig == self.new
        if not self._identity:
            self._offsets, self._weights = _phase_table(self.orig, self.new)
        else:
            self._offsets = np.zeros(1, dtype=np.int64)
        self._reach = int(self._offsets[-1])
        self._block = max(1, _BLOCK_VALUES // self._offsets.size)
        # inputs held, from input index ``_start``; zeros stand in before the first input
        self._held = np.zeros(self._reach, dtype=np.float32)
        self._start = -self._reach
        self._fed = 0  # inputs pushed so far
        self._next = 0  # the next output index to compute
        self._finished = False

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Take more input; return the outputs it completes (float32, possibly none)."""
        pieces = list(self.pieces(samples))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    def pieces(self, samples: np.ndarray) -> Iterator[np.ndarray]:
        """``push``, an input chunk at a time: the outputs each chunk completes, so that what
        is held stays a chunk and the filter's reach, whatever ``samples``' length. Iterate it
        to the end: the input is taken as the pieces are."""
        if self._finished:
            raise ValueError("the stream is finished: push before finish")
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._identity:
            self._fed += x.size
            yield x.copy()
            return
        for first in range(0, x.size, _CHUNK_SAMPLES):
            chunk = x[first : first + _CHUNK_SAMPLES]
            self._held = np.concatenate([self._held, chunk])
            self._fed += chunk.size
            if self._held.size < _CHUNK_SAMPLES:
                continue  # small pushes (a decoder's blocks) gather into a chunk first
            # output j is complete once ⌊j·orig/new⌋ + reach < fed: j·orig < (fed − reach)·new
            complete = -(-(self._fed - self._reach) * self.new // self.orig)
            yield self._outputs(max(self._next, complete))

    def finish(self) -> np.ndarray:
        """The outputs left, up to ⌈inputs · target / source⌉ in all."""
        if self._finished:
            raise ValueError("the stream is finished already")
        self._finished = True
        if self._identity:
            return np.zeros(0, dtype=np.float32)
        self._held = np.concatenate([self._held, np.zeros(self._reach + 1, dtype=np.float32)])
        return self._outputs(-(-self._fed * self.new // self.orig))

    def _outputs(self, end: int) -> np.ndarray:
        """Outputs ``_next`` … ``end`` − 1; then drop the inputs no later output reads."""
        out = np.empty(max(0, end - self._next), dtype=np.float32)
        if out.size:
            if self.new <= _STRIDED_PHASES:
                self._by_phase(out, end)
            else:
                self._by_block(out, end)
        self._next = max(self._next, end)
        keep_from = (self._next * self.orig) // self.new - self._reach  # the next output's first
        if keep_from > self._start:
            self._held = self._held[keep_from - self._start :].copy()
            self._start = keep_from
        return out

    def _by_phase(self, out: np.ndarray, end: int) -> None:
        """Few phases (common rates: 44.1 kHz → 22.05 kHz has one, 48 kHz 147): the outputs of
        phase i read the inputs at a stride of ``orig``, a view of the held inputs' sliding
        windows, and are one matrix-vector product with row i of the table."""
        orig, new, first = self.orig, self.new, self._next
        windows = np.lib.stride_tricks.sliding_window_view(self._held, self._offsets.size)
        for phase in range(new):
            j0 = first + (phase - first) % new  # the first output of this phase
            if j0 >= end:
                continue
            count = (end - 1 - j0) // new + 1
            row = (j0 * orig) // new - self._reach - self._start  # its first input, held
            rows = windows[row : row + (count - 1) * orig + 1 : orig]
            out[j0 - first :: new][:count] = rows @ self._weights[phase]

    def _by_block(self, out: np.ndarray, end: int) -> None:
        """Many phases (a rate that does not reduce, e.g. 44,101 Hz): each output gathers its
        inputs and its phase's weights, a block of outputs at a time."""
        orig, new, start, first = self.orig, self.new, self._start, self._next
        for lo in range(first, end, self._block):
            j = np.arange(lo, min(lo + self._block, end), dtype=np.int64)
            centre = (j * orig) // new  # ⌊j·orig/new⌋
            values = self._held[(centre - start)[:, None] + self._offsets[None, :]]
            out[lo - first : lo - first + j.size] = np.einsum(
                "bt,bt->b", values, self._weights[j % new]
            )


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 ``samples`` at ``source_rate`` → float32 at ``target_rate``, of length
    ⌈len · target / source⌉ (torchaudio's, which rounds it in float32 and so may give one
    sample fewer beyond ≈ 2^23 outputs), zeros assumed beyond both ends."""
    stream = Resampler(source_rate, target_rate)
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    out = np.empty(-(-x.size * stream.new // stream.orig), dtype=np.float32)
    at = 0
    for piece in stream.pieces(x):  # one piece held at a time
        out[at : at + piece.size] = piece
        at += piece.size
    last = stream.finish()
    out[at : at + last.size] = last
    return out

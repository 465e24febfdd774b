"""Tracks longer than one mel window: each window continues the previous one's tail.

The model sees W = ``x_res`` STFT frames (64 frames ≈ 1.49 s for the CPU model). A track of n
windows overlaps consecutive windows by o frames (``overlap``, W/4 by default), so it holds

    T = W + (n − 1)(W − o) frames  →  T·hop − 1 samples            (``TrackLength``)

and n is the smallest count whose T covers the requested seconds (5.9 s → n = 5, T = 256
frames = 5.94 s at 64 × 64, the paper prototype's window; 30 s → n = 27).

**Continuation** (RePaint-style inpainting, Lugmayr et al. 2022, on DDIM with η = 0). Notation of
``riffloop.music._ddim``: z_agg is the merged latent, x̂_0(z_agg) its decoded merged input, s and
q give the ``InjectionPlan`` (total steps, start step), t* = timesteps[start − 1].

1. Window 0 is the usual injected generation: x_{t*} = √ᾱ_{t*} x̂_0(z_agg) + √(1−ᾱ_{t*}) ε_0,
   denoised from t* to 0 (``inject_at_step``; with the same ε_0 it is the same image).
2. Window k ≥ 1 starts from the *same* merged input at the *same* level t*, with fresh noise:
   x_{t*} = √ᾱ_{t*} x̂_0(z_agg) + √(1−ᾱ_{t*}) ε_k. Every window therefore keeps the similarity s
   to the inputs and costs the same plan.denoising_steps UNet calls; starting window k from pure
   noise at t* instead would let the track drift away from the songs after its first 1.5 s.
3. Its first o columns are known: y = the last o columns of window k − 1 (x_0 of that window).
   Before each DDIM step at level t (t = t*, …, 0) the known columns of x_t are blended with y
   noised to level t with window k's own noise ε_k (``DDIMScheduler.add_noise``):

       x_t[..., j] ← m_j (√ᾱ_t y_j + √(1−ᾱ_t) ε_k,j) + (1 − m_j) x_t[..., j],  m_j = cos²(πu/2)

   with u = min(1, (j + ½)/(h·o)), h = ``HOLD_SPAN`` = ½: held where window k − 1 dominates the
   crossfade (step 4), released toward the free columns by mid-crossfade, so the sample has no
   hard mask edge (a hard mask, m = 1, left a flux spike of 2–4× at column o on the base model)
   and the soft one's edge falls where the crossfade weighs both windows alike. Then
   ``DDIMScheduler.step`` denoises the whole window. The last ``free_fraction`` (20 %) of the
   steps run without the constraint, so the model harmonises the held columns with the rest
   (RePaint's resampling jumps would do that too at several times the cost). Using one ε_k at
   every level keeps the held columns on the η = 0 DDIM path of y. The output's first o columns
   are the model's reading of y, close to it.
4. The windows are joined with an equal-power crossfade over the o shared frames, in the
   *log*-power (dB) mel domain the images live in: x = cos²(πu/2)·x_prev + sin²(πu/2)·x_next for
   u = (j + ½)/o, j = 0 … o−1. The weights sum to 1, so two equally loud windows keep their level
   through the fade (no dip, no bump). Weighting the log power rather than the power keeps the
   louder window from dominating the whole fade (mixing powers, 0.2 % of a window 30 dB louder
   already adds 4 dB at the first faded frame). One Griffin-Lim over the whole long image then
   phases the track coherently (``MelCodec.track_to_audio``), with no audio-domain seam.

Latent models (a VAE in ``model.vqvae``) continue in the UNet's latent columns: o must map to a
whole number of latent columns.

**Baselines of the same length** (blindness): a baseline track is n training windows joined by the
same crossfade, so it has the same T and the same WAV size as a generation. The training index
(``TrainingIndex``) stores an evenly strided subset of the corpus windows, not every window, so
the index's neighbours of z0 are the *next indexed windows of the same piece and instrument* in
time order (ids ``corpus:<piece>:<instrument>:<window>``), wrapping to that source's first
indexed window; a row without a source in the corpus (a kept generation ``track:…``, a synthetic
``tone:…``) is looped (``baseline_windows``).

**Seams** (``seam_flux``): spectral flux f_j = ‖x_{j+1} − x_j‖₂/√H between consecutive frames of
the dB image; the joins are the frame pairs where one window's frames give way to the next (the
start of each crossfade and the end of the previous window); a track has no seam when the median
flux at its joins is no larger than the median flux *inside the windows*: the frame pairs of one
window outside every crossfade. Pairs inside a crossfade are left out of that reference: they mix
two windows, and an average of two partly independent images moves less from frame to frame than
either (measured on base-v2: about 0.85 of the track's median), which would make any join look
rough.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from riffloop.core import ValidationError
from riffloop.music._ddim import (
    DEFAULT_BATCH,
    DenoisingModel,
    InjectionPlan,
    _check_batch,
    _decode,
    _device_dtype,
    _encode,
    _scheduler,
)
from riffloop.music._mel import MelConfig, image_from_uint8

__all__ = [
    "DEFAULT_TRACK_SECONDS",
    "MAX_TRACK_SECONDS",
    "SeamReport",
    "TrackLength",
    "baseline_track",
    "baseline_windows",
    "continue_window",
    "crossfade_windows",
    "generate_long",
    "naive_concatenation",
    "seam_flux",
    "spectral_flux",
    "track_noise",
]

# The paper's prototype served 5.94 s windows (256 frames); a request may ask for up to a minute.
DEFAULT_TRACK_SECONDS = 5.9
MAX_TRACK_SECONDS = 60.0
FREE_FRACTION = 0.2  # the last 20 % of each continued window's steps run unconstrained
# The held mask falls from 1 to 0 over the first half of the overlap, so the edge between held
# and free columns lies mid-crossfade, where both windows weigh ≈ ½ (over the whole overlap the
# edge sat under the crossfade's end, where the new window weighs ≈ 1, and left a flux bump
# there: docs/results/LONG_TRACKS.md).
HOLD_SPAN = 0.5


@dataclass(frozen=True)
class TrackLength:
    """n windows of W frames, consecutive windows sharing o frames (see the module docstring)."""

    windows: int
    x_res: int
    overlap: int

    def __post_init__(self) -> None:
        if self.windows < 1 or self.x_res < 2 or not 0 <= self.overlap < self.x_res:
            raise ValidationError(
                f"a track needs ≥ 1 window and 0 ≤ overlap < x_res, got {self.windows}, "
                f"{self.overlap}, {self.x_res}"
            )

    @classmethod
    def for_seconds(
        cls,
        seconds: float,
        mel: MelConfig,
        *,
        default: float = DEFAULT_TRACK_SECONDS,
        maximum: float = MAX_TRACK_SECONDS,
        overlap: int | None = None,
    ) -> TrackLength:
        """The fewest windows covering ``seconds`` (0 → ``default``). Outside [one window,
        ``maximum``] is an input error (INVALID_ARGUMENT)."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ValidationError(f"duration must be a number of seconds, got {seconds!r}")
        if seconds == 0:
            seconds = default
        one = mel.slice_seconds
        if not math.isfinite(seconds) or not one - 1e-3 <= seconds <= maximum:
            raise ValidationError(
                f"duration must lie in [{one:.2f}, {maximum:g}] s (one window to the maximum), "
                f"or be 0 for the default {default:g} s; got {seconds!r}"
            )
        o = mel.x_res // 4 if overlap is None else overlap
        step = mel.x_res - o
        frames = math.ceil((seconds * mel.sample_rate + 1) / mel.hop_length - 1e-9)
        n = 1 + max(0, math.ceil((frames - mel.x_res) / step))
        return cls(windows=n, x_res=mel.x_res, overlap=o)

    @property
    def frames(self) -> int:
        """T = W + (n − 1)(W − o)."""
        return self.x_res + (self.windows - 1) * (self.x_res - self.overlap)

    def samples(self, hop_length: int) -> int:
        return self.frames * hop_length - 1

    def seconds(self, mel: MelConfig) -> float:
        return self.samples(mel.hop_length) / mel.sample_rate

    def window_starts(self) -> list[int]:
        """First frame of each window in the track."""
        return [k * (self.x_res - self.overlap) for k in range(self.windows)]

    def windows_of(self, image: Tensor) -> Tensor:
        """The track's n windows, ``image`` [..., H, T] → [n, ..., H, W]: window k is frames
        k(W − o) … k(W − o) + W − 1 of the joined track, what the listener heard there
        (crossfades included)."""
        if image.shape[-1] != self.frames:
            raise ValidationError(
                f"a track of {self.windows} windows has {self.frames} frames, got {image.shape[-1]}"
            )
        return torch.stack([image[..., k : k + self.x_res] for k in self.window_starts()])

    def joins(self) -> list[int]:
        """Frames j where the track's frames pass from one window to the next: the pair
        (j − 1, j) straddles a join. The start of each crossfade and the end of the window
        before it (the same frame without overlap)."""
        out: set[int] = set()
        for k in range(1, self.windows):
            start = k * (self.x_res - self.overlap)
            out.update((start, start + self.overlap))
        return sorted(j for j in out if 0 < j < self.frames)


def track_noise(shape: tuple[int, ...], windows: int, seed: int) -> Tensor:
    """ε_0 … ε_{n−1} ``[n, *shape]`` of one request, drawn in order from
    ``torch.Generator().manual_seed(seed)``: ε_0 is the draw a one-window track makes."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(shape, generator=gen) for _ in range(windows)])


def _latent_overlap(model: DenoisingModel, overlap: int, x_res: int, width: int) -> int:
    if overlap * width % x_res:
        raise ValidationError(
            f"an overlap of {overlap} frames is not a whole number of the UNet's {width} columns"
        )
    return overlap * width // x_res


@torch.inference_mode()
def continue_window(
    model: DenoisingModel,
    merged_image: Tensor,
    plan: InjectionPlan,
    noise: Tensor,
    tail: Tensor | None = None,
    *,
    free_fraction: float = FREE_FRACTION,
    soft: bool = True,
    hold: float = HOLD_SPAN,
    batch_size: int = DEFAULT_BATCH,
) -> Tensor:
    """One window per merged input ``[B, 1, H, W]``: noised to t* with ``noise`` (ε_k, the
    UNet's input shape ``[B, C, h, w]``) and denoised to 0, its first columns held to ``tail``
    (``[B, C, h, o]`` in the UNet's space: pixels, or VAE latents) noised to each level t
    (steps 2–3 of the module docstring). ``tail`` None is plain injection (window 0).
    Returns the UNet-space x_0 ``[B, C, h, w]``; ``decode`` it for the mel image."""
    if not isinstance(plan, InjectionPlan):
        raise ValidationError("plan must be an InjectionPlan")
    _check_batch(model, merged_image, "merged_image", pixel=True)
    _check_batch(model, noise, "noise", pixel=False)
    if noise.shape[0] != merged_image.shape[0]:
        raise ValidationError("noise needs one draw per merged image")
    if tail is not None and (
        tail.ndim != 4
        or tail.shape[:3] != noise.shape[:3]
        or not 0 < tail.shape[3] < noise.shape[3]
    ):
        raise ValidationError(f"tail must be [B, C, h, o] with 0 < o < w, got {tuple(tail.shape)}")
    if not 0.0 < hold <= 1.0 or not 0.0 <= free_fraction < 1.0:
        raise ValidationError(
            f"hold must lie in (0, 1] and free_fraction in [0, 1), got {hold}, {free_fraction}"
        )
    device, dtype = _device_dtype(model)
    scheduler = _scheduler(model, plan.total_steps, device)
    outs = []
    for i in range(0, merged_image.shape[0], batch_size):
        part = slice(i, i + batch_size)
        x0 = _encode(model, merged_image[part].to(device=device, dtype=dtype))
        eps = noise[part].to(device, dtype)
        b = x0.shape[0]
        if plan.start_step == 0:
            x = eps.clone()
        else:
            t_star = scheduler.timesteps[plan.first_index]
            x = scheduler.add_noise(x0, eps, t_star.reshape(1).expand(b))
        known = None if tail is None else tail[part].to(device, dtype)
        if known is not None:
            o = known.shape[-1]
            u = (torch.arange(o, device=device, dtype=torch.float64) + 0.5) / (o * hold)
            u = u.clamp(max=1.0)
            mask = (torch.cos(math.pi / 2 * u).pow(2) if soft else torch.ones_like(u)).to(dtype)
        steps = scheduler.timesteps[plan.first_index :]
        held = len(steps) - math.floor(len(steps) * free_fraction)
        for i_step, t in enumerate(steps):
            if known is not None and i_step < held:
                o = known.shape[-1]
                # x_t[..., :o] ← m·(√ᾱ_t y + √(1−ᾱ_t) ε_k[..., :o]) + (1 − m)·x_t[..., :o]
                y_t = scheduler.add_noise(known, eps[..., :o], t.reshape(1).expand(b))
                x[..., :o] = mask * y_t + (1 - mask) * x[..., :o]
            out = model.unet(x, t).sample
            x = scheduler.step(out, int(t), x, eta=0.0, return_dict=True).prev_sample
        outs.append(x)
    return torch.cat(outs)


@torch.inference_mode()
def generate_long(
    model: DenoisingModel,
    merged_image: Tensor,
    plan: InjectionPlan,
    length: TrackLength,
    noise: Tensor,
    *,
    top_db: float = 80.0,
    free_fraction: float = FREE_FRACTION,
    soft: bool = True,
    hold: float = HOLD_SPAN,
    batch_size: int = DEFAULT_BATCH,
) -> Tensor:
    """Long tracks ``[B, 1, H, T]`` (mel images in [−1, 1], T = ``length.frames``) from merged
    inputs x̂_0(z_agg) ``[B, 1, H, W]``: window 0 injected with ε_0, each later window k
    continuing window k − 1's tail with ε_k, crossfaded (module docstring). ``noise`` holds
    ε_0 … ε_{n−1} per input, ``[B, n, C, h, w]`` (``track_noise`` per request)."""
    if not isinstance(length, TrackLength):
        raise ValidationError("length must be a TrackLength")
    if noise.ndim != 5 or noise.shape[0] != merged_image.shape[0]:
        raise ValidationError("noise must be [B, n, C, h, w], one row of draws per input")
    if noise.shape[1] < length.windows:
        raise ValidationError(f"noise holds {noise.shape[1]} draws for {length.windows} windows")
    if merged_image.shape[-1] != length.x_res:
        raise ValidationError(f"windows of {length.x_res} frames expected")
    width = int(noise.shape[-1])
    o_lat = _latent_overlap(model, length.overlap, length.x_res, width)
    windows: list[Tensor] = []
    x: Tensor | None = None
    for k in range(length.windows):
        tail = None if x is None or o_lat == 0 else x[..., width - o_lat :]
        x = continue_window(
            model,
            merged_image,
            plan,
            noise[:, k],
            tail,
            free_fraction=free_fraction,
            soft=soft,
            hold=hold,
            batch_size=batch_size,
        )
        windows.append(_decode(model, x).to(device=merged_image.device, dtype=torch.float32))
    stacked = torch.stack(windows, dim=1)  # [B, n, 1, H, W]
    return torch.stack(
        [crossfade_windows(stacked[b], length.overlap, top_db) for b in range(stacked.shape[0])]
    )


def crossfade_windows(windows: Tensor, overlap: int, top_db: float = 80.0) -> Tensor:
    """Windows ``[n, 1, H, W]`` in [−1, 1] → one image ``[1, H, W + (n−1)(W−o)]``, each join an
    equal-power crossfade over the o shared frames (step 4 of the module docstring)."""
    if windows.ndim != 4 or windows.shape[1] != 1 or windows.shape[0] < 1:
        raise ValidationError(f"windows must be [n, 1, H, W], got {tuple(windows.shape)}")
    n, _, h, w = windows.shape
    if not 0 <= overlap < w:
        raise ValidationError(f"overlap must lie in [0, {w}), got {overlap}")
    step = w - overlap
    # the images are dB scaled linearly: x = 2(dB + top_db)/top_db − 1, so weighting x weights
    # the log power
    x = windows.to(torch.float64).clamp(-1, 1)
    out = torch.zeros((1, h, w + (n - 1) * step), dtype=torch.float64)
    u = (torch.arange(overlap, dtype=torch.float64) + 0.5) / max(overlap, 1)
    fade_in = torch.sin(math.pi / 2 * u).pow(2)  # sin² + cos² = 1
    for k in range(n):
        start = k * step
        xk = x[k].clone()
        if k > 0 and overlap > 0:
            prev = out[..., start : start + overlap]
            xk[..., :overlap] = (1 - fade_in) * prev + fade_in * xk[..., :overlap]
        out[..., start : start + w] = xk
    return out.to(torch.float32)


_CORPUS_ID = re.compile(r"^(corpus:.+:)(\d+)$")


def baseline_windows(ids: list[str], images: Tensor, row: int, windows: int) -> Tensor:
    """The n training windows ``[n, 1, 1, H, W]`` (uint8, the index's) of a baseline track
    starting at row ``row`` (z0): then the next indexed windows of the same corpus piece and
    instrument in time order, wrapping to the source's first; a row of no corpus source repeats.
    ``ids``/``images``: ``TrainingIndex.ids`` and ``TrainingIndex.images``."""
    if not 0 <= row < len(ids) or images.shape[0] != len(ids):
        raise ValidationError("row must name one of the index's rows")
    if windows < 1:
        raise ValidationError("a baseline needs at least one window")
    match = _CORPUS_ID.match(ids[row])
    if match is None:
        order = [row]
    else:
        source = match.group(1)
        same = [
            (int(m.group(2)), r)
            for r, row_id in enumerate(ids)
            if (m := _CORPUS_ID.match(row_id)) is not None and m.group(1) == source
        ]
        order = [r for _, r in sorted(same)]
        first = order.index(row)
        order = order[first:] + order[:first]
    picks = [order[k % len(order)] for k in range(windows)]
    return images[torch.tensor(picks)]


def baseline_track(
    ids: list[str], images: Tensor, row: int, length: TrackLength, top_db: float = 80.0
) -> Tensor:
    """The baseline's long image ``[1, 1, H, T]``: ``baseline_windows`` crossfaded like a
    generation, so a baseline and a generation of one length have the same T."""
    chosen = baseline_windows(ids, images, row, length.windows).reshape(
        length.windows, 1, images.shape[-2], images.shape[-1]
    )
    return crossfade_windows(image_from_uint8(chosen), length.overlap, top_db)[None]


@dataclass(frozen=True)
class SeamReport:
    """Spectral flux at the joins against flux inside the windows: medians (the verdict) and
    means. The median asks whether joins are *typically* rougher than the inside of a window;
    a note onset that happens to land on one of a few joins moves the mean.

    Three kinds of frame pair (module docstring, **Seams**): the joins; pairs inside one window,
    outside every crossfade (``window_flux``); and pairs inside a crossfade (``blend_flux``),
    which mix two windows and so move less than either (averaging two partly independent
    images smooths them). ``other_flux`` pools the last two: the earlier verdict, biased low by
    the blend."""

    join_flux: float
    window_flux: float
    blend_flux: float
    other_flux: float
    join_mean: float
    window_mean: float
    joins: int

    @property
    def ratio(self) -> float:
        """Median flux at the joins / median flux inside the windows (≤ 1: no audible seam)."""
        return self.join_flux / max(self.window_flux, 1e-12)

    @property
    def ratio_to_others(self) -> float:
        """Median flux at the joins / median of every other pair, crossfades included."""
        return self.join_flux / max(self.other_flux, 1e-12)

    @property
    def seamless(self) -> bool:
        return self.join_flux <= self.window_flux


def spectral_flux(image: Tensor) -> Tensor:
    """f_j = ‖x_{j+1} − x_j‖₂/√H over the H mel bins of a dB image ``[..., H, T]`` →
    ``[..., T−1]``."""
    x = image.to(torch.float64)
    diff = x[..., 1:] - x[..., :-1]
    return diff.pow(2).mean(dim=-2).sqrt()


def seam_flux(image: Tensor, length: TrackLength) -> SeamReport:
    """``SeamReport`` of one long image ``[1, H, T]`` or ``[1, 1, H, T]`` joined per ``length``
    (several images ``[B, 1, H, T]`` pool their joins and their other frames)."""
    x = image.reshape(-1, image.shape[-2], image.shape[-1])
    if x.shape[-1] != length.frames:
        raise ValidationError(f"image has {x.shape[-1]} frames, the length {length.frames}")
    flux = spectral_flux(x)  # flux[:, i] is between frames i and i + 1
    join_frames = length.joins()
    if not join_frames:
        raise ValidationError("a one-window track has no joins")
    n = flux.shape[-1]
    at_join = torch.zeros(n, dtype=torch.bool)
    at_join[[j - 1 for j in join_frames]] = True
    in_blend = torch.zeros(n, dtype=torch.bool)  # both frames inside one crossfade
    for start in length.window_starts()[1:]:
        in_blend[start : start + length.overlap - 1] = True
    in_blend &= ~at_join
    in_window = ~(at_join | in_blend)
    at, window = flux[:, at_join].flatten(), flux[:, in_window].flatten()
    blend, other = flux[:, in_blend].flatten(), flux[:, ~at_join].flatten()
    return SeamReport(
        join_flux=float(at.median()),
        window_flux=float(window.median()),
        blend_flux=float(blend.median()) if blend.numel() else math.nan,
        other_flux=float(other.median()),
        join_mean=float(at.mean()),
        window_mean=float(window.mean()),
        joins=len(at),
    )


def naive_concatenation(windows: Tensor) -> Tensor:
    """Windows ``[n, 1, H, W]`` side by side without overlap or crossfade ``[1, H, n·W]`` (the
    reference a seam test compares against)."""
    return torch.cat(list(windows[:, 0]), dim=-1)[None]

"""Deterministic DDIM: inversion (song → x_T), generation (x_T → image) and injection.

Notation (DDIM, Song et al. 2020; the paper's prototype, teticio/audio-diffusion): ᾱ_t is the
scheduler's ``alphas_cumprod[t]``; a sample at level t is x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε. The UNet
predicts ε (``prediction_type="epsilon"``) or v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (``"v_prediction"``); either
way we read it as the pair

    ε̂ = ε_θ(x, t)                      (for v: ε̂ = √ᾱ_t v̂ + √(1−ᾱ_t) x)
    x̂_0 = (x − √(1−ᾱ_t) ε̂) / √ᾱ_t      (for v: x̂_0 = √ᾱ_t x − √(1−ᾱ_t) v̂, the same thing).

**Generation** is diffusers' ``DDIMScheduler.step`` with η = 0 — that is the model; we do not
re-implement it. For each t of ``set_timesteps(n)`` (default "leading" spacing 980, 960, …, 0 for
n = 50) it maps x_t to the level t' = t − 1000/n (ᾱ_{t'} = ``final_alpha_cumprod`` = 1 below 0):

    x_{t'} = √ᾱ_{t'} x̂_0(x_t, t) + √(1−ᾱ_{t'}) ε̂(x_t, t)      (x̂_0 clipped to [−1, 1] if the
                                                                scheduler's ``clip_sample`` says so)

**Inversion** walks the same (t', t) pairs backwards with the standard approximation
ε̂(x_t, t) ≈ ε̂(x_{t'}, t) (the sample one step less noisy stands in for the unknown x_t):

    x_t = √ᾱ_t x̂_0 + √(1−ᾱ_t) ε̂,   ε̂ = ε_θ(x_{t'}, t),   x̂_0 = (x_{t'} − √(1−ᾱ_{t'}) ε̂)/√ᾱ_{t'}

which is the exact algebraic inverse of the generation step whenever ε̂ is the same at both ends.
No clipping on the way up (a clamp cannot be inverted). The result x_T (at t = timesteps[0]) is
the song's latent z_i.

**Injection** (the paper's "similarity" s and "quality" q): ``InjectionPlan.from_similarity`` gives
total = min(1000, ⌊q/(1−s)⌋) DDIM steps and start = ⌊total·s⌋. The *merged input* is the image
x̂_0(z_agg) = generate(z_agg): the song latents z_i are merged on the sphere into z_agg
(``merge_latents``), and z_agg is decoded deterministically (η = 0, the same number of steps as
the inversion) into a mel image that mixes the songs. That image is then re-noised to
t* = timesteps[start−1] with fresh noise from the seeded generator,

    x_{t*} = √ᾱ_{t*} x̂_0(z_agg) + √(1−ᾱ_{t*}) ε,   ε ~ N(0, I)

(``DDIMScheduler.add_noise``), and denoised from t* to 0: the steps timesteps[start−1:], i.e.
total − start + 1 UNet calls. This keeps the sample's noise level and the timestep fed to the UNet
equal. (diffusers' AudioDiffusionPipeline noises to timesteps[start−1] but then denoises only
timesteps[start:], feeding the UNet a sample one step noisier than the timestep it is told; we do
not copy that off-by-one.) start = 0 (s = 0) means no injection: denoise fresh noise ε from t_0.

**Fewer steps** (``generate(..., sampler="dpmsolver++")``): DPM-Solver++ (Lu et al. 2022; diffusers'
``DPMSolverMultistepScheduler``, 2nd-order multistep, ``algorithm_type="dpmsolver++"``) on the same
noise schedule, prediction type and timestep spacing. It solves the same probability-flow ODE as
DDIM η = 0 with a 2nd-order step in log-SNR, so it needs fewer steps for the same end point
(the quality figures of 20 and 10 steps against DDIM 50 are in ``bench/README.md``). DDIM's
``clip_sample`` (x̂_0 clipped to [−1, 1]) becomes DPM-Solver's ``thresholding`` with
``sample_max_value = clip_sample_range``: its dynamic threshold s = quantile(|x̂_0|) is clamped
to [1, sample_max_value] = {1}, i.e. the same clip. Only unconditional generation takes it:
``decode_latents`` and injection stay DDIM, whose steps are the exact inverse of ``invert``.

All entry points are batched (``batch_size`` chunks), run under ``torch.inference_mode`` on the
UNet's device (CPU or CUDA), and never mutate the model (neither its weights' layout nor its own
scheduler: each call builds a private scheduler from its config, so concurrent requests cannot race
on ``set_timesteps``). The UNet's input stays in the default NCHW layout: handing it over in
``channels_last`` (NHWC, ``channels_last=True``) measured 10–13 % *slower* at 1 torch thread on a
quiet AVX2 EPYC and ±15 % either way at 2 (``bench/README.md``); results equal to float rounding.
``MusicGenerator`` strings it together for the services: song audio → mel windows → z_i
(``encode_audio``), and batches of ``TrackRequest`` → merged inputs → injected images → audio.
Latent models (``model.vqvae`` set) invert/generate in the VAE's latent space: images are encoded
with the posterior mean (deterministic) times ``scaling_factor`` and decoded back at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from torch import Tensor

from riffloop.core import ValidationError
from riffloop.music._mel import MelCodec
from riffloop.music._merge import merge_latents

if TYPE_CHECKING:
    from riffloop.music._model import MusicDiffusion

__all__ = [
    "SAMPLERS",
    "DenoisingModel",
    "GeneratedTrack",
    "InjectionPlan",
    "MusicGenerator",
    "TrackRequest",
    "decode_latents",
    "generate",
    "inject_at_step",
    "invert",
]

MAX_STEPS = 1000
DEFAULT_BATCH = 32
SAMPLERS = ("ddim", "dpmsolver++")


class DenoisingModel(Protocol):
    """What the DDIM functions need; ``riffloop.music.MusicDiffusion`` satisfies it."""

    unet: UNet2DModel
    scheduler: DDIMScheduler
    vqvae: AutoencoderKL | None


# -- helpers ----------------------------------------------------------------------------------


def _scheduler(model: DenoisingModel, steps: int, device: torch.device) -> DDIMScheduler:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValidationError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    return scheduler


def _dpm_solver(
    model: DenoisingModel, steps: int, device: torch.device
) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M) on the model's own noise schedule; a fresh one per batch, since the
    multistep solver keeps the previous model outputs and its step index as state."""
    _scheduler(model, steps, device)  # the same validation of ``steps``
    c = model.scheduler.config
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=c.num_train_timesteps,
        beta_start=c.beta_start,
        beta_end=c.beta_end,
        beta_schedule=c.beta_schedule,
        trained_betas=c.trained_betas,
        prediction_type=c.prediction_type,
        timestep_spacing=c.timestep_spacing,
        steps_offset=c.steps_offset,
        algorithm_type="dpmsolver++",
        solver_order=2,
        # clip x̂_0 to [−1, 1] as DDIM's clip_sample does: s = clamp(quantile, 1, max) = 1
        thresholding=bool(c.get("clip_sample", False)),
        sample_max_value=float(c.get("clip_sample_range", 1.0)),
    )
    scheduler.set_timesteps(steps, device=device)
    return scheduler


def _unet_layout(x: Tensor, channels_last: bool | None) -> Tensor:
    """x in the requested layout: ``channels_last`` None or False = NCHW, True = NHWC.

    ``.to`` rather than ``.contiguous``: with C = 1 an NCHW tensor already counts as
    channels_last-contiguous, keeps its NCHW strides, and oneDNN would then pick NCHW."""
    return x.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _device_dtype(model: DenoisingModel) -> tuple[torch.device, torch.dtype]:
    param = next(model.unet.parameters())
    return param.device, param.dtype


def _check_batch(model: DenoisingModel, x: Tensor, what: str, pixel: bool) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValidationError(f"{what} must be a tensor [B, C, H, W]")
    if pixel and model.vqvae is not None:
        c = int(model.vqvae.config.in_channels)
        if x.shape[1] != c:
            raise ValidationError(f"{what} must have {c} channel(s), got {x.shape[1]}")
    else:
        cfg = model.unet.config
        size = cfg.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        expected = (int(cfg.in_channels), int(hw[0]), int(hw[1]))
        if tuple(x.shape[1:]) != expected:
            raise ValidationError(f"{what} must be [B, {expected}], got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValidationError(f"{what} contain NaN or infinite values")


def _chunks(n: int, batch_size: int) -> list[slice]:
    if batch_size < 1:
        raise ValidationError("batch_size must be at least 1")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _epsilon(
    model_output: Tensor, sample: Tensor, alpha_prod_t: Tensor, prediction_type: str
) -> Tensor:
    """ε̂ from the UNet output at level t (v → ε: ε̂ = √ᾱ_t v̂ + √(1−ᾱ_t) x)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_prod_t.sqrt() * model_output + (1 - alpha_prod_t).sqrt() * sample
    raise ValidationError(
        f"DDIM inversion supports epsilon and v_prediction, not {prediction_type}"
    )


def _alpha_prev(scheduler: DDIMScheduler, t: int) -> tuple[int, Tensor]:
    """The level t' = t − 1000/n that ``DDIMScheduler.step`` maps t to, and ᾱ_{t'}."""
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return prev, alpha


def _encode(model: DenoisingModel, images: Tensor) -> Tensor:
    """Pixel images → what the UNet denoises (identity without a VAE; posterior mean with one)."""
    if model.vqvae is None:
        return images
    latents = model.vqvae.encode(images).latent_dist.mean
    return latents * float(model.vqvae.config.scaling_factor)


def _decode(model: DenoisingModel, x: Tensor) -> Tensor:
    if model.vqvae is None:
        return x
    return model.vqvae.decode(x / float(model.vqvae.config.scaling_factor)).sample


def _denoise(
    model: DenoisingModel,
    scheduler: DDIMScheduler | DPMSolverMultistepScheduler,
    x: Tensor,
    first_index: int,
    eta: float,
    generator: torch.Generator | None,
    channels_last: bool | None = None,
) -> Tensor:
    """Run ``scheduler.step`` for timesteps[first_index:], starting from x at that level."""
    x = _unet_layout(x, channels_last)
    for t in scheduler.timesteps[first_index:]:
        model_output = model.unet(x, t).sample
        if isinstance(scheduler, DDIMScheduler):
            x = scheduler.step(
                model_output, int(t), x, eta=eta, generator=generator, return_dict=True
            ).prev_sample
        else:
            x = scheduler.step(model_output, t, x, return_dict=True).prev_sample
    return x.contiguous()


# -- public API -------------------------------------------------------------------------------


@torch.inference_mode()
def invert(
    model: DenoisingModel, images: Tensor, steps: int = 50, *, batch_size: int = DEFAULT_BATCH
) -> Tensor:
    """Deterministic DDIM inversion of mel images ``[B, 1, H, W]`` in [−1, 1] to x_T (the latents
    z_i), on the UNet's device and dtype; returned on the input's device as float32."""
    _check_batch(model, images, "images", pixel=True)
    device, dtype = _device_dtype(model)
    scheduler = _scheduler(model, steps, device)
    prediction_type = str(scheduler.config.prediction_type)
    outs = []
    for part in _chunks(images.shape[0], batch_size):
        x = _unet_layout(_encode(model, images[part].to(device=device, dtype=dtype)), None)
        for t in scheduler.timesteps.flip(0):
            _, alpha_prev = _alpha_prev(scheduler, int(t))
            alpha_t = scheduler.alphas_cumprod[int(t)]
            alpha_prev, alpha_t = alpha_prev.to(device, dtype), alpha_t.to(device, dtype)
            eps = _epsilon(model.unet(x, t).sample, x, alpha_t, prediction_type)
            x0 = (x - (1 - alpha_prev).sqrt() * eps) / alpha_prev.sqrt()
            x = alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * eps
        outs.append(x.to(device=images.device, dtype=torch.float32).contiguous())
    return torch.cat(outs)


@torch.inference_mode()
def generate(
    model: DenoisingModel,
    x_T: Tensor,
    steps: int = 50,
    generator: torch.Generator | None = None,
    *,
    eta: float = 0.0,
    batch_size: int = DEFAULT_BATCH,
    sampler: str = "ddim",
    channels_last: bool | None = None,
) -> Tensor:
    """Denoise x_T ``[B, C, h, w]`` with ``steps`` steps of ``sampler`` into mel images
    ``[B, 1, H, W]``.

    ``"ddim"`` (default): with η = 0 this is deterministic and ``generator`` is unused; with η > 0
    the scheduler draws its per-step variance noise from ``generator``. ``"dpmsolver++"``:
    DPM-Solver++ (2M), deterministic, η must be 0; fewer steps for the same ODE (module
    docstring). ``channels_last``: True hands the UNet NHWC input (a speed lever only; None or
    False: NCHW, the measured faster on this CPU)."""
    _check_batch(model, x_T, "x_T", pixel=False)
    if not math.isfinite(eta) or eta < 0:
        raise ValidationError(f"eta must be a finite number ≥ 0, got {eta}")
    if sampler not in SAMPLERS:
        raise ValidationError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler != "ddim" and eta != 0:
        raise ValidationError(f"eta > 0 needs the ddim sampler, not {sampler}")
    device, dtype = _device_dtype(model)
    scheduler = _scheduler(model, steps, device)
    outs = []
    for part in _chunks(x_T.shape[0], batch_size):
        if sampler == "dpmsolver++":
            scheduler = _dpm_solver(model, steps, device)
        x = _denoise(
            model, scheduler, x_T[part].to(device, dtype), 0, eta, generator, channels_last
        )
        outs.append(_decode(model, x).to(device=x_T.device, dtype=torch.float32))
    return torch.cat(outs)


def decode_latents(model: DenoisingModel, z_agg: Tensor, steps: int = 50) -> Tensor:
    """The merged input of injection: x̂_0(z_agg), the deterministic (η = 0) decoding of merged
    latents. Use the same ``steps`` as the inversion that produced the z_i."""
    return generate(model, z_agg, steps)


@dataclass(frozen=True)
class InjectionPlan:
    """Where to inject: ``total`` DDIM steps, noise to timesteps[start−1], denoise from there.

    total = min(1000, ⌊q/(1−s)⌋), start = ⌊total·s⌋ (the paper's prototype). Larger s keeps more
    of the input (fewer steps are re-done); q sets how many steps the remaining (1−s) share gets.
    """

    similarity: float
    quality: float
    total_steps: int
    start_step: int

    @classmethod
    def from_similarity(cls, s: float, q: float) -> InjectionPlan:
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
            raise ValidationError(f"similarity s must be a number in [0, 1), got {s!r}")
        if isinstance(q, bool) or not isinstance(q, int | float) or not math.isfinite(q):
            raise ValidationError(f"quality q must be a positive number, got {q!r}")
        if not 0.0 <= s < 1.0:
            raise ValidationError(f"similarity s must lie in [0, 1), got {s}")
        if q <= 0:
            raise ValidationError(f"quality q must be positive, got {q}")
        total = min(MAX_STEPS, math.floor(q / (1.0 - s)))
        start = math.floor(total * s)
        if total < 1 or start >= total:
            raise ValidationError(
                f"s={s}, q={q} leave nothing to denoise (total={total}, start={start}); raise q"
            )
        return cls(similarity=float(s), quality=float(q), total_steps=total, start_step=start)

    @property
    def first_index(self) -> int:
        """Index into ``timesteps`` of the noise level t* and of the first denoising step."""
        return max(self.start_step - 1, 0)

    @property
    def denoising_steps(self) -> int:
        """UNet evaluations: total − start + 1 (or total when start = 0, pure noise)."""
        return self.total_steps - self.first_index

    def noise_timestep(self, scheduler: DDIMScheduler | None = None) -> int:
        """t* = timesteps[start−1] of ``total`` steps under ``scheduler``'s spacing (a default
        ``DDIMScheduler`` — "leading" spacing — when None; the model's own is used by injection)."""
        config = scheduler.config if scheduler is not None else {"num_train_timesteps": MAX_STEPS}
        fresh = DDIMScheduler.from_config(config)
        fresh.set_timesteps(self.total_steps)
        return int(fresh.timesteps[self.first_index])


@torch.inference_mode()
def inject_at_step(
    model: DenoisingModel,
    merged_image: Tensor,
    plan: InjectionPlan,
    generator: torch.Generator | None = None,
    *,
    noise: Tensor | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> Tensor:
    """Noise the merged input images ``[B, 1, H, W]`` to t* = timesteps[start−1] and denoise the
    rest of the ``plan.total_steps`` DDIM trajectory. ε is drawn on the CPU from ``generator`` (so a
    seed gives the same track on CPU and CUDA), one [C, h, w] draw per image in batch order, or
    taken from ``noise`` (shape of the UNet's input batch) when the caller seeds per request."""
    if not isinstance(plan, InjectionPlan):
        raise ValidationError("plan must be an InjectionPlan")
    _check_batch(model, merged_image, "merged_image", pixel=True)
    if noise is not None:
        _check_batch(model, noise, "noise", pixel=False)
        if noise.shape[0] != merged_image.shape[0]:
            raise ValidationError("noise needs one draw per merged image")
    device, dtype = _device_dtype(model)
    scheduler = _scheduler(model, plan.total_steps, device)
    outs = []
    for part in _chunks(merged_image.shape[0], batch_size):
        x0 = _encode(model, merged_image[part].to(device=device, dtype=dtype))
        if noise is not None:
            eps = noise[part].to(device, dtype)
        else:
            eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device, dtype)
        if plan.start_step == 0:
            x = eps
        else:
            t_star = scheduler.timesteps[plan.first_index]
            # x_t* = √ᾱ_t* x̂_0 + √(1−ᾱ_t*) ε  (DDIMScheduler.add_noise)
            x = scheduler.add_noise(x0, eps, t_star.reshape(1).expand(x0.shape[0]))
        x = _denoise(model, scheduler, x, plan.first_index, 0.0, None)
        outs.append(_decode(model, x).to(device=merged_image.device, dtype=torch.float32))
    return torch.cat(outs)


# -- the facade: songs → latents → merge → injected tracks → audio ----------------------------


@dataclass(frozen=True)
class TrackRequest:
    """One generation: the latents z_i ``[k, C, h, w]`` of its 1–3 input songs (one window each),
    optional merge weights, the injection plan and the seed of its noise ε."""

    latents: Tensor
    plan: InjectionPlan
    seed: int
    weights: tuple[float, ...] | None = None


@dataclass(frozen=True)
class GeneratedTrack:
    image: Tensor  # [1, H, W] mel image in [−1, 1]
    audio: np.ndarray  # float32 [slice_samples] at the mel config's sample rate
    merged_input: Tensor  # [1, H, W] x̂_0(z_agg), what was injected
    z_agg: Tensor  # [C, h, w]
    seed: int
    plan: InjectionPlan


class MusicGenerator:
    """Model + MelCodec: encode songs to latents, and turn requests into tracks in batches.

    ``generate`` works in three batched passes over all requests: (1) merge each request's z_i on
    the sphere (``merge_latents``) and decode every z_agg into its merged input x̂_0(z_agg) in one
    DDIM call; (2) inject, one batched ``inject_at_step`` per distinct plan, with ε drawn per
    request from ``torch.Generator().manual_seed(seed)`` (so a track's image does not depend on
    what it was batched with); (3) one batched Griffin-Lim over all images. Griffin-Lim's random
    initial phases come from the global RNG, seeded here from the first request's seed: the audio
    of a request can differ in phase detail with its batch, never its mel image."""

    def __init__(
        self,
        model: MusicDiffusion,
        codec: MelCodec | None = None,
        *,
        steps: int = 50,
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        self.model = model
        self.codec = codec or MelCodec(model.mel)
        self.steps = steps
        self.batch_size = batch_size

    def encode_images(self, images: Tensor) -> Tensor:
        return invert(self.model, images, self.steps, batch_size=self.batch_size)

    def encode_audio(self, samples: np.ndarray) -> Tensor:
        """Mono samples at the mel config's rate → the latents of each whole window."""
        images = self.codec.audio_to_images(samples)
        if images.shape[0] == 0:
            raise ValidationError(
                f"audio shorter than one {self.model.mel.slice_seconds:.2f} s window"
            )
        return self.encode_images(images)

    def generate(self, requests: list[TrackRequest]) -> list[GeneratedTrack]:
        if not requests:
            return []
        shape = tuple(self.model.image_shape)
        for r in requests:
            if r.latents.ndim != 4 or tuple(r.latents.shape[1:]) != shape:
                raise ValidationError(f"request latents must be [k, {shape}]")
            if not 1 <= r.latents.shape[0] <= 3:
                raise ValidationError("a request merges 1 to 3 songs")
        # 1. z_agg and the merged inputs x̂_0(z_agg)
        z_agg = torch.stack([merge_latents(r.latents, r.weights) for r in requests])
        merged = generate(self.model, z_agg, self.steps, batch_size=self.batch_size)
        # 2. injection, batched per plan, ε seeded per request
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(r.seed)) for r in requests]
        )
        images = torch.empty_like(merged)
        for plan in dict.fromkeys(r.plan for r in requests):
            idx = torch.tensor([i for i, r in enumerate(requests) if r.plan == plan])
            images[idx] = inject_at_step(
                self.model, merged[idx], plan, noise=noise[idx], batch_size=self.batch_size
            )
        # 3. audio, one batched Griffin-Lim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(requests[0].seed)
            audio = self.codec.images_to_audio(images)
        return [
            GeneratedTrack(images[i], audio[i], merged[i], z_agg[i], r.seed, r.plan)
            for i, r in enumerate(requests)
        ]

"""DDIM inversion / generation / injection: reconstruction, injection plan maths, input errors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from riffloop.core import ValidationError
from riffloop.music import MelCodec, MelConfig, ModelConfig, MusicDiffusion
from riffloop.music._ddim import (
    InjectionPlan,
    MusicGenerator,
    TrackRequest,
    decode_latents,
    generate,
    inject_at_step,
    invert,
)
from riffloop.music._merge import merge_latents

torch.set_num_threads(1)

BASE_MODEL = Path(__file__).resolve().parents[2] / "assets" / "base-model"


def tiny_model(prediction_type: str = "v_prediction", seed: int = 0) -> MusicDiffusion:
    cfg = ModelConfig(
        **{**ModelConfig.preset("tiny").to_dict(), "prediction_type": prediction_type}
    )
    return MusicDiffusion.create(cfg, mel=MelConfig(n_mels=16, x_res=16), seed=seed)


def tone_images(mel: MelConfig, n: int = 4) -> torch.Tensor:
    """Mel images of a steady tone plus a gliding partial: a structured, music-like input."""
    t = np.arange(mel.slice_samples * n) / mel.sample_rate
    audio = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1500 * t * (1 + t / 10))
    return MelCodec(mel).audio_to_images(audio.astype(np.float32))


class GaussianOracle(torch.nn.Module):
    """The exact denoiser of data x_0 ~ N(μ, σ²I): E[ε | x_t] and E[x_0 | x_t] in closed form.

    Not a fake of the UNet's quality but an exact model of a known distribution, so DDIM with it is
    a discretised probability-flow ODE and inversion must reconstruct — for either prediction type,
    which checks the ε/v conversions."""

    def __init__(self, mu: torch.Tensor, sigma: float, scheduler: DDIMScheduler) -> None:
        super().__init__()
        self.register_buffer("mu", mu)
        self.sigma = sigma
        self.alphas = scheduler.alphas_cumprod
        self.prediction_type = scheduler.config.prediction_type
        self.config = SimpleNamespace(sample_size=mu.shape[-1], in_channels=mu.shape[0])
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the module a device and dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        a = self.alphas[int(t)]
        var = a * self.sigma**2 + (1 - a)
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mu) / var
        x0 = self.mu + a.sqrt() * self.sigma**2 * (x - a.sqrt() * self.mu) / var
        out = eps if self.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return SimpleNamespace(sample=out)


@dataclass
class OracleModel:
    unet: GaussianOracle
    scheduler: DDIMScheduler
    vqvae: None = None


# -- reconstruction --------------------------------------------------------------------------


@pytest.mark.unit
def test_invert_then_generate_reconstructs_with_tiny_random_unet() -> None:
    """Stated error: mean |x̂ − x| < 0.05 (in [−1, 1] image units) at 50 steps, while a random x_T
    lands ≥ 10× further away."""
    model = tiny_model()
    images = tone_images(model.mel)
    z = invert(model, images, steps=50)
    assert z.shape == images.shape and bool(torch.isfinite(z).all())
    rec = generate(model, z, steps=50)
    rand = generate(model, torch.randn(z.shape, generator=torch.Generator().manual_seed(1)), 50)
    err = float((rec - images).abs().mean())
    err_random = float((rand - images).abs().mean())
    assert err < 0.05
    assert err_random > 10 * err


def _oracle_run(prediction_type: str, steps: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(x_T error vs the exact flow map, reconstruction error, σ) for N(μ, σ²) data."""
    gen = torch.Generator().manual_seed(0)
    sigma = 0.3
    mu = torch.tanh(torch.randn(1, 8, 8, generator=gen))
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    model = OracleModel(GaussianOracle(mu, sigma, scheduler), scheduler)
    x = (mu + sigma * torch.randn(3, 1, 8, 8, generator=gen)).clamp(-1, 1)
    z = invert(model, x, steps=steps)  # type: ignore[arg-type]
    rec = generate(model, z, steps=steps)  # type: ignore[arg-type]
    # The probability-flow ODE of Gaussian data keeps the standardised coordinate (x_0 − μ)/σ:
    # x_T = √ᾱ_T μ + √(ᾱ_T σ² + 1 − ᾱ_T) (x_0 − μ)/σ, with T = timesteps[0].
    scheduler.set_timesteps(steps)
    a = scheduler.alphas_cumprod[int(scheduler.timesteps[0])]
    z_exact = a.sqrt() * mu + (a * sigma**2 + 1 - a).sqrt() * (x - mu) / sigma
    return z - z_exact, rec - x, sigma


@pytest.mark.unit
def test_inversion_converges_to_the_exact_flow_map_for_a_gaussian_oracle() -> None:
    """Both prediction types give the same x_T (the ε/v conversions agree), x_T approaches the
    exact ODE map at first order in the step size, and generate(invert(x)) ≈ x."""
    z50_eps, rec50, _ = _oracle_run("epsilon", 50)
    z50_v, _, _ = _oracle_run("v_prediction", 50)
    z200, rec200, _ = _oracle_run("v_prediction", 200)
    torch.testing.assert_close(z50_eps, z50_v, rtol=1e-4, atol=1e-4)
    e50, e200 = float(z50_v.abs().mean()), float(z200.abs().mean())
    assert e50 < 0.1
    assert e200 < e50 / 3  # first order: 4× the steps, ≈ ¼ the error
    assert float(rec50.abs().mean()) < 0.04
    assert float(rec200.abs().mean()) < float(rec50.abs().mean()) / 2


@pytest.mark.unit
def test_invert_is_deterministic_batched_and_leaves_the_model_scheduler_alone() -> None:
    model = tiny_model()
    before = dict(model.scheduler.config)
    images = tone_images(model.mel, 3)
    a = invert(model, images, steps=10, batch_size=2)
    b = invert(model, images, steps=10, batch_size=3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(invert(model, images[1:2], steps=10), a[1:2], rtol=1e-5, atol=1e-5)
    assert dict(model.scheduler.config) == before
    assert model.scheduler.num_inference_steps is None


@pytest.mark.unit
def test_generate_eta_uses_generator() -> None:
    model = tiny_model()
    x_t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(generate(model, x_t, 5), generate(model, x_t, 5))
    a = generate(model, x_t, 5, torch.Generator().manual_seed(1), eta=1.0)
    b = generate(model, x_t, 5, torch.Generator().manual_seed(1), eta=1.0)
    c = generate(model, x_t, 5, torch.Generator().manual_seed(2), eta=1.0)
    torch.testing.assert_close(a, b)
    assert float((a - c).abs().mean()) > 1e-3


# -- injection plan ----------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("s", "q", "total", "start"),
    [
        (0.0, 50, 50, 0),
        (0.5, 50, 100, 50),
        (0.6, 20, 50, 30),
        (0.75, 10, 40, 30),
        (0.9, 50, 500, 450),
        (0.99, 50, 1000, 990),  # capped at 1000
        (0.3, 1, 1, 0),
    ],
)
def test_injection_plan_maths(s: float, q: float, total: int, start: int) -> None:
    plan = InjectionPlan.from_similarity(s, q)
    assert plan.total_steps == min(1000, math.floor(q / (1 - s)))
    assert plan.start_step == math.floor(plan.total_steps * s)
    assert (plan.total_steps, plan.start_step) == (total, start)
    assert plan.denoising_steps == plan.total_steps - max(plan.start_step - 1, 0)
    assert 1 <= plan.denoising_steps <= plan.total_steps


@pytest.mark.unit
@pytest.mark.parametrize(
    ("s", "q"),
    [(1.0, 50), (1.5, 50), (-0.1, 50), (0.5, 0), (0.5, -3), (float("nan"), 5), (0.5, float("inf"))],
)
def test_injection_plan_rejects_bad_inputs(s: float, q: float) -> None:
    with pytest.raises(ValidationError):
        InjectionPlan.from_similarity(s, q)


@pytest.mark.unit
def test_injection_plan_rejects_nothing_to_denoise() -> None:
    with pytest.raises(ValidationError, match="nothing to denoise"):
        InjectionPlan.from_similarity(0.2, 0.5)  # ⌊0.5/0.8⌋ = 0 steps


@pytest.mark.unit
def test_noise_timestep_is_timesteps_start_minus_one() -> None:
    plan = InjectionPlan.from_similarity(0.6, 20)  # total 50, start 30: t* = timesteps[29]
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(plan.total_steps)
    assert plan.noise_timestep() == int(sched.timesteps[plan.start_step - 1])


# -- injection ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_injection_keeps_more_of_the_input_as_similarity_grows() -> None:
    model = tiny_model()
    images = tone_images(model.mel, 2)
    errs = []
    for s in (0.0, 0.5, 0.9):
        plan = InjectionPlan.from_similarity(s, 10)
        out = inject_at_step(model, images, plan, torch.Generator().manual_seed(0))
        assert out.shape == images.shape and bool(torch.isfinite(out).all())
        errs.append(float((out - images).abs().mean()))
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.unit
def test_injection_is_seeded() -> None:
    model = tiny_model()
    images = tone_images(model.mel, 2)
    plan = InjectionPlan.from_similarity(0.5, 6)
    a = inject_at_step(model, images, plan, torch.Generator().manual_seed(3))
    b = inject_at_step(model, images, plan, torch.Generator().manual_seed(3), batch_size=1)
    c = inject_at_step(model, images, plan, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert float((a - c).abs().mean()) > 1e-3


@pytest.mark.unit
def test_merged_input_is_the_decoded_merged_latent() -> None:
    """Two copies of one song merge to that song's latent, so the merged input is the song."""
    model = tiny_model()
    images = tone_images(model.mel, 1)
    z = invert(model, images, steps=20)
    z_agg = merge_latents(torch.cat([z, z]))
    merged = decode_latents(model, z_agg[None], steps=20)
    assert float((merged - images).abs().mean()) < 0.08


@pytest.mark.unit
def test_bad_tensors_are_validation_errors() -> None:
    model = tiny_model()
    with pytest.raises(ValidationError):
        invert(model, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValidationError):
        invert(model, torch.full((1, 1, 16, 16), float("nan")))
    with pytest.raises(ValidationError):
        generate(model, torch.zeros(1, 1, 16, 16), steps=0)
    with pytest.raises(ValidationError):
        generate(model, torch.zeros(16, 16))


@pytest.mark.unit
def test_music_generator_end_to_end_batches_without_changing_tracks() -> None:
    model = tiny_model()
    gen = MusicGenerator(model, steps=10, batch_size=4)
    t = np.arange(model.mel.slice_samples * 3) / model.mel.sample_rate
    song_a = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    song_b = (0.3 * np.sin(2 * np.pi * 1200 * t)).astype(np.float32)
    z_a, z_b = gen.encode_audio(song_a), gen.encode_audio(song_b)
    assert z_a.shape == (3, 1, 16, 16)
    plan_a, plan_b = InjectionPlan.from_similarity(0.5, 5), InjectionPlan.from_similarity(0.8, 4)
    requests = [
        TrackRequest(torch.stack([z_a[0], z_b[0]]), plan_a, seed=1),
        TrackRequest(z_a[1:2], plan_b, seed=2),
        TrackRequest(torch.stack([z_a[2], z_b[1], z_b[2]]), plan_a, seed=3, weights=(2, 1, 1)),
    ]
    tracks = gen.generate(requests)
    assert len(tracks) == 3
    for track in tracks:
        assert track.image.shape == (1, 16, 16) and bool(torch.isfinite(track.image).all())
        assert track.audio.shape == (model.mel.slice_samples,) and track.audio.dtype == np.float32
    # a request's image does not depend on its batch
    alone = gen.generate([requests[2]])[0]
    torch.testing.assert_close(alone.image, tracks[2].image, rtol=1e-4, atol=1e-4)
    # one song alone: the merged input is that song's own reconstruction
    single = tracks[1].merged_input
    assert float((single - model_images_of(gen, song_a)[1]).abs().mean()) < 0.1
    with pytest.raises(ValidationError):
        gen.generate([TrackRequest(torch.cat([z_a, z_b]), plan_a, seed=0)])  # 6 songs


def model_images_of(gen: MusicGenerator, samples: np.ndarray) -> torch.Tensor:
    return gen.codec.audio_to_images(samples)


# -- the trained base model ----------------------------------------------------------------------


def _heldout_or_tone_images(mel: MelConfig, n: int = 8) -> torch.Tensor:
    """Held-out corpus windows when the corpus is built (music the model never saw), else tones."""
    from riffloop.music._corpus import corpus_dir, load_corpus

    mel_dir = corpus_dir() / f"mel-{mel.n_mels}x{mel.x_res}"
    if (mel_dir / "manifest.json").is_file():
        split = load_corpus(mel_dir, "heldout")
        pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:n]
        return split.images[pick]
    return tone_images(mel, n)


@pytest.mark.slow
@pytest.mark.skipif(not (BASE_MODEL / "unet").is_dir(), reason="assets/base-model not exported yet")
def test_base_model_inversion_reconstructs_held_out_music() -> None:
    """On the trained base model: invert-then-regenerate within 0.1 mean |error| (50 steps, [−1, 1]
    image units), and ≥ 4× closer than regenerating from a random x_T."""
    model = MusicDiffusion.from_pretrained(BASE_MODEL)
    images = _heldout_or_tone_images(model.mel)
    z = invert(model, images, steps=50)
    rec = generate(model, z, steps=50)
    rand = generate(model, torch.randn(z.shape, generator=torch.Generator().manual_seed(0)), 50)
    err = float((rec - images).abs().mean())
    err_random = float((rand - images).abs().mean())
    print(f"\nbase model: inversion error {err:.4f}, random x_T {err_random:.4f}")
    assert err < 0.1
    assert err_random > 4 * err

"""Sampling speed levers leave the results alone: NHWC layout and inference mode equal the plain
NCHW loop; DPM-Solver++ returns images of the right shape and range and solves the same ODE."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from riffloop.core import ValidationError
from riffloop.music._ddim import _dpm_solver, _unet_layout, generate
from tests.music.test_ddim import GaussianOracle, OracleModel, tiny_model

torch.set_num_threads(1)


def _plain_ddim(model, x_t: torch.Tensor, steps: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The reference: diffusers' DDIMScheduler.step on NCHW tensors under no_grad, no levers."""
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    x = x_t.contiguous()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model.unet(x, t).sample, int(t), x, eta=0.0).prev_sample
    return x


@pytest.mark.unit
def test_unet_input_is_really_nhwc_when_the_lever_is_on() -> None:
    """With C = 1, NCHW strides already count as channels_last; the lever must restride."""
    x = torch.randn(3, 1, 8, 8)
    assert _unet_layout(x, True).stride() == (64, 1, 8, 1)
    assert _unet_layout(x, None).stride() == _unet_layout(x, False).stride() == (64, 64, 8, 1)


@pytest.mark.unit
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_levers_equal_the_plain_loop(prediction_type: str) -> None:
    model = tiny_model(prediction_type)
    x_t = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = _plain_ddim(model, x_t, 10)
    fast = generate(model, x_t, 10, channels_last=True)  # inference_mode + NHWC
    nchw = generate(model, x_t, 10)  # the default: NCHW
    torch.testing.assert_close(nchw, plain, rtol=1e-5, atol=1e-5)
    # NHWC convolutions sum in another order; 10 steps of the ODE amplify that rounding (ε̂ → x̂_0
    # divides by √ᾱ_t ≈ 0.07 at the first t). 5e-4 is 1/16 of an 8-bit grey level.
    torch.testing.assert_close(fast, plain, rtol=0, atol=5e-4)
    assert fast.is_contiguous()


@pytest.mark.unit
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_returns_clipped_images_batch_independent(steps: int) -> None:
    model = tiny_model()
    x_t = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    a = generate(model, x_t, steps, sampler="dpmsolver++", batch_size=2)
    b = generate(model, x_t, steps, sampler="dpmsolver++", batch_size=3)
    assert a.shape == (3, 1, 16, 16) and a.dtype == torch.float32
    assert bool(torch.isfinite(a).all())
    # the final step lands on x̂_0, thresholded like DDIM's clip_sample
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # solver state reset per batch
    ddim = generate(model, x_t, 50)
    assert float((a - ddim).abs().mean()) < 0.2  # the same ODE, not another image


@pytest.mark.unit
def test_dpm_solver_keeps_the_models_schedule_and_clip() -> None:
    model = tiny_model()
    s = _dpm_solver(model, 20, torch.device("cpu"))
    assert isinstance(s, DPMSolverMultistepScheduler)
    assert s.config.prediction_type == model.scheduler.config.prediction_type
    assert s.config.algorithm_type == "dpmsolver++"
    assert s.config.thresholding == model.scheduler.config.clip_sample
    torch.testing.assert_close(s.alphas_cumprod, model.scheduler.alphas_cumprod)
    assert len(s.timesteps) == 20


def _oracle_error(sampler: str, steps: int) -> float:
    """mean |x̂_0 − x_0| from the exact x_T of N(μ, σ²) data: how well a sampler solves the ODE."""
    gen = torch.Generator().manual_seed(0)
    sigma = 0.3
    mu = torch.tanh(torch.randn(1, 8, 8, generator=gen))
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    model = OracleModel(GaussianOracle(mu, sigma, scheduler), scheduler)
    x = (mu + sigma * torch.randn(3, 1, 8, 8, generator=gen)).clamp(-1, 1)
    if sampler == "ddim":
        scheduler.set_timesteps(steps)
        t0 = int(scheduler.timesteps[0])
    else:
        t0 = int(_dpm_solver(model, steps, torch.device("cpu")).timesteps[0])  # type: ignore[arg-type]
    a = scheduler.alphas_cumprod[t0]
    # the probability-flow ODE of Gaussian data keeps (x_0 − μ)/σ (see test_ddim)
    z = a.sqrt() * mu + (a * sigma**2 + 1 - a).sqrt() * (x - mu) / sigma
    rec = generate(model, z, steps, sampler=sampler)  # type: ignore[arg-type]
    return float((rec - x).abs().mean())


@pytest.mark.unit
def test_dpm_solver_solves_the_ode_better_than_ddim_at_few_steps() -> None:
    """On an exact Gaussian denoiser, DPM-Solver++ at 10 steps is closer to the ODE's end point
    than DDIM at 10 steps (2nd vs 1st order)."""
    dpm, ddim = _oracle_error("dpmsolver++", 10), _oracle_error("ddim", 10)
    assert dpm < ddim


@pytest.mark.unit
def test_bad_sampler_arguments_are_validation_errors() -> None:
    model = tiny_model()
    x_t = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValidationError):
        generate(model, x_t, 5, sampler="euler")
    with pytest.raises(ValidationError):
        generate(model, x_t, 5, sampler="dpmsolver++", eta=0.5)
    with pytest.raises(ValidationError):
        generate(model, x_t, 0, sampler="dpmsolver++")

"""Properties of merge_latents / slerp: order independence, norms, 2 songs = SLERP(½)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from riffloop.core import ValidationError
from riffloop.music._merge import merge_latents, slerp

torch.set_num_threads(1)
pytestmark = pytest.mark.unit


@st.composite
def latent_sets(draw: st.DrawFn, max_n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """N Gaussian latents [N, D] from a drawn seed plus positive weights."""
    n = draw(st.integers(1, max_n))
    dim = draw(st.integers(2, 64))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    w = torch.tensor(
        draw(st.lists(st.floats(0.05, 10.0), min_size=n, max_size=n)), dtype=torch.float64
    )
    return z, w


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.flatten() @ b.flatten() / (a.norm() * b.norm()))


@given(latent_sets(), st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_merge_is_order_independent(zw: tuple[torch.Tensor, torch.Tensor], rnd) -> None:
    z, w = zw
    perm = list(range(z.shape[0]))
    rnd.shuffle(perm)
    a = merge_latents(z, w)
    b = merge_latents(z[perm], w[perm])
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


@given(latent_sets())
@settings(max_examples=60, deadline=None)
def test_unit_inputs_give_unit_output(zw: tuple[torch.Tensor, torch.Tensor]) -> None:
    z, w = zw
    u = z / z.norm(dim=1, keepdim=True)
    out = merge_latents(u, w)
    assert math.isclose(float(out.norm()), 1.0, rel_tol=1e-9)
    assert bool(torch.isfinite(out).all())


@given(latent_sets())
@settings(max_examples=60, deadline=None)
def test_norm_is_weighted_mean_of_input_norms(zw: tuple[torch.Tensor, torch.Tensor]) -> None:
    z, w = zw
    out = merge_latents(z, w)
    expected = float((w / w.sum()) @ z.norm(dim=1))
    assert math.isclose(float(out.norm()), expected, rel_tol=1e-9)


@given(latent_sets())
@settings(max_examples=40, deadline=None)
def test_merge_is_the_weighted_karcher_mean(zw: tuple[torch.Tensor, torch.Tensor]) -> None:
    """First-order optimality: Σ w_i log_p(u_i) = 0 at the merged direction p."""
    z, w = zw
    w = w / w.sum()
    u = z / z.norm(dim=1, keepdim=True)
    p = merge_latents(z, w)
    p = p / p.norm()
    cos = (u @ p).clamp(-1, 1)
    theta = torch.arccos(cos)
    if bool((theta > math.pi - 1e-3).any()):
        return  # antipodal input: Karcher mean not unique, log undefined
    tangent = (u - cos[:, None] * p) * torch.where(
        theta < 1e-9, torch.ones_like(theta), theta / torch.sin(theta)
    )[:, None]
    grad = w @ tangent
    # Away from the vanishing-sum fallback the gradient must be ~0.
    if float((w @ u).norm()) > 1e-6:
        assert float(grad.norm()) < 1e-6


@given(latent_sets(max_n=2).filter(lambda zw: zw[0].shape[0] == 2))
@settings(max_examples=60, deadline=None)
def test_two_songs_equal_slerp_half(zw: tuple[torch.Tensor, torch.Tensor]) -> None:
    z, _ = zw
    torch.testing.assert_close(merge_latents(z), slerp(z[0], z[1], 0.5), rtol=1e-9, atol=1e-9)


@given(st.integers(2, 64), st.integers(0, 2**31 - 1), st.floats(0.0, 1e-7), st.floats(0.5, 2.0))
@settings(max_examples=60, deadline=None)
def test_near_parallel_and_antiparallel_inputs_stay_finite(
    dim: int, seed: int, eps: float, scale: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, generator=gen, dtype=torch.float64)
    jitter = eps * torch.randn(dim, generator=gen, dtype=torch.float64)
    for b in (a * scale + jitter, -a * scale + jitter):
        m = merge_latents(torch.stack([a, b]))
        assert bool(torch.isfinite(m).all())
        assert math.isclose(float(m.norm()), float((a.norm() + b.norm()) / 2), rel_tol=1e-9)
        for t in (0.0, 0.3, 0.5, 1.0):
            s = slerp(a, b, t)
            assert bool(torch.isfinite(s).all())
        torch.testing.assert_close(slerp(a, b, 0.0), a)
        torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=1e-6, atol=1e-6)


def test_antiparallel_pair_merges_to_the_equidistant_direction() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4096, generator=gen)
    m = merge_latents(torch.stack([a, -a]))
    assert abs(_cos(m, a)) < 1e-5  # at π/2 from both inputs
    torch.testing.assert_close(m, merge_latents(torch.stack([-a, a])))
    torch.testing.assert_close(slerp(a, -a, 0.5), m, rtol=1e-5, atol=1e-5)
    # slerp(a, b, t) = slerp(b, a, 1 − t) even through the fallback
    torch.testing.assert_close(slerp(a, -a, 0.2), slerp(-a, a, 0.8), rtol=1e-5, atol=1e-5)


def test_three_songs_are_weighted_equally_unlike_nested_slerp() -> None:
    """The prototype's slerp(slerp(z1, z2, ½), z3, ½) sits closest to z3; ours is equidistant."""
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(3, 1, 64, 64, generator=gen)
    m = merge_latents(z)
    angles = [math.acos(_cos(m, z[i])) for i in range(3)]
    assert max(angles) - min(angles) < 0.05
    nested = slerp(slerp(z[0], z[1], 0.5), z[2], 0.5)
    nested_angles = [math.acos(_cos(nested, z[i])) for i in range(3)]
    assert nested_angles[2] < min(nested_angles[:2]) - 0.1


def test_typical_gaussian_norm_is_kept() -> None:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(3, 4096, generator=gen)
    m = merge_latents(z)
    lerp = z.mean(dim=0)
    assert abs(float(m.norm()) / math.sqrt(4096) - 1) < 0.03
    assert float(lerp.norm()) / math.sqrt(4096) < 0.65  # why a plain average is wrong
    g = merge_latents(z, norm="gaussian")
    assert abs(float(g.norm()) - math.sqrt(4096 - 0.5)) < 1e-2  # E‖z‖ ≈ √(D − ½)


def test_single_latent_and_identical_latents_are_fixed_points() -> None:
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(2, 8, 8, generator=gen)
    torch.testing.assert_close(merge_latents(a[None]), a)
    torch.testing.assert_close(merge_latents(torch.stack([a, a, a])), a)


def test_zero_weight_song_is_ignored() -> None:
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(3, 32, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(merge_latents(z, [1.0, 1.0, 0.0]), slerp(z[0], z[1], 0.5))


def test_weights_pull_towards_heavier_song() -> None:
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(2, 256, generator=gen, dtype=torch.float64)
    m = merge_latents(z, [3.0, 1.0])
    # for two points the weighted Karcher mean is slerp at the weight share of the second
    torch.testing.assert_close(m / m.norm(), (s := slerp(z[0], z[1], 0.25)) / s.norm())


@pytest.mark.parametrize(
    ("latents", "weights"),
    [
        (torch.zeros(0, 4), None),
        (torch.ones(4), None),
        (torch.tensor([[1.0, float("nan")]]), None),
        (torch.zeros(2, 4), None),
        (torch.ones(2, 4), [1.0]),
        (torch.ones(2, 4), [-1.0, 2.0]),
        (torch.ones(2, 4), [0.0, 0.0]),
    ],
)
def test_bad_inputs_are_validation_errors(
    latents: torch.Tensor, weights: list[float] | None
) -> None:
    with pytest.raises(ValidationError):
        merge_latents(latents, weights)


def test_slerp_rejects_bad_t_and_shapes() -> None:
    a = torch.ones(4)
    for t in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValidationError):
            slerp(a, a, t)
    with pytest.raises(ValidationError):
        slerp(a, torch.ones(5), 0.5)


def test_merge_keeps_dtype_and_shape() -> None:
    z = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32))
    m = merge_latents(z)
    assert m.dtype == torch.float32 and m.shape == (1, 4, 4)

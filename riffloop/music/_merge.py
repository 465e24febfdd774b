"""Merging 1–3 song latents on the sphere: ``merge_latents`` (order-independent) and ``slerp``.

Why the sphere. A latent z_i = x_T of a song (deterministic DDIM inversion, see ``_ddim``) behaves
like a draw from N(0, I) in D = C·H·W dimensions, so its norm concentrates at ≈ √D and the model has
only ever seen inputs on that shell. A plain weighted average Σ w_i z_i of independent latents has
norm ≈ √(Σ w_i²)·√D (½√2·√D for two songs): off the shell, and DDIM turns such low-energy x_T into
washed-out, near-silent images. So the *direction* and the *norm* are merged separately:

1. directions u_i = z_i / ‖z_i‖ are merged by their weighted Fréchet (Karcher) mean on the unit
   sphere S^{D−1}: the point p minimising Σ w_i d(p, u_i)², d the geodesic angle. It is a symmetric
   function of the (u_i, w_i) pairs, hence order-independent — unlike the 2023 prototype's nested
   SLERP(SLERP(z_1, z_2, ½), z_3, ½), which weights the songs ¼, ¼, ½.
   For two songs with equal weights it is exactly the geodesic midpoint: ``slerp(z_1, z_2, ½)``.
2. the norm is the weighted mean of the input norms, r = Σ w_i ‖z_i‖ (for Gaussian latents all
   norms are ≈ √D, so r is the typical norm of a Gaussian latent; for slightly atypical inversions
   it stays as typical as its inputs). ``norm="gaussian"`` forces r = E‖N(0, I_D)‖ instead.

The Karcher mean is computed by Riemannian gradient descent with unit step (the standard fixed
point iteration p ← exp_p(Σ w_i log_p(u_i))), started from the normalised weighted sum
Σ w_i u_i / ‖Σ w_i u_i‖ — itself a good (order-independent) estimate. Cosines are clamped to
[−1, 1]; log_p uses θ/sin θ → 1 as θ → 0 (the lerp limit) and ignores exactly antipodal points
(their log is undefined; every direction is a geodesic). When the weighted sum vanishes (two
antiparallel latents, three at 120° in a plane) every point equidistant from all inputs is a
critical point; we then return a fixed reference direction projected onto the orthogonal complement
of span{u_i} — a deterministic, order-independent choice at angle π/2 from every input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from riffloop.core import ValidationError

__all__ = ["merge_latents", "slerp"]

# Below this angle (radians) SLERP and the log map are replaced by their lerp limits.
_SMALL_ANGLE = 1e-6
# A weighted direction sum shorter than this (relative to Σ w_i = 1) counts as "vanished".
_DEGENERATE_SUM = 1e-9
_KARCHER_MAX_ITERS = 64
_KARCHER_TOL = 1e-12


def _gaussian_norm(dim: int) -> float:
    """E‖z‖ for z ~ N(0, I_dim): the mean of a chi distribution, √2·Γ((D+1)/2)/Γ(D/2)."""
    return math.sqrt(2.0) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))


def _reference_direction(flat: Tensor) -> Tensor:
    """A unit vector orthogonal to span(rows of ``flat``), chosen without regard to row order.

    The candidates are fixed (all-ones, then a seeded Gaussian), so the choice depends only on the
    subspace spanned by the inputs. If the inputs span the whole space there is no orthogonal
    direction; the all-ones direction is returned then (only possible when N ≥ D, i.e. toy sizes).
    """
    dim = flat.shape[1]
    # Orthonormal basis of span{u_i} from the SVD, keeping only non-negligible singular values, so
    # rank-deficient inputs (u_2 = −u_1) do not contribute noise columns the way plain QR would.
    basis, sv, _ = torch.linalg.svd(flat.T, full_matrices=False)
    q = basis[:, sv > 1e-9 * sv[0]]
    gen = torch.Generator().manual_seed(0x5EED)
    candidates = [
        torch.ones(dim, dtype=flat.dtype),
        torch.randn(dim, generator=gen, dtype=torch.float64).to(flat.dtype),
    ]
    for ref in candidates:
        ortho = ref - q @ (q.T @ ref)
        n = torch.linalg.vector_norm(ortho)
        if n > 1e-6 * torch.linalg.vector_norm(ref):
            return ortho / n
    ref = candidates[0]
    return ref / torch.linalg.vector_norm(ref)


def _log_map(p: Tensor, u: Tensor) -> Tensor:
    """log_p(u_i) for unit p [D] and unit rows u [N, D]: tangents of length θ_i = ∠(p, u_i)."""
    cos = (u @ p).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    tangent = u - cos[:, None] * p[None, :]
    sin = torch.sin(theta)
    # θ/sin θ → 1 as θ → 0 (lerp limit); antipodal inputs (sin θ ≈ 0, θ ≈ π) contribute nothing.
    scale = torch.where(
        theta < _SMALL_ANGLE,
        torch.ones_like(theta),
        torch.where(sin < _SMALL_ANGLE, torch.zeros_like(theta), theta / sin.clamp_min(1e-300)),
    )
    return tangent * scale[:, None]


def _exp_map(p: Tensor, v: Tensor) -> Tensor:
    """exp_p(v): walk the great circle from p along tangent v for angle ‖v‖."""
    n = torch.linalg.vector_norm(v)
    out = p + v if n < _SMALL_ANGLE else torch.cos(n) * p + torch.sin(n) * (v / n)
    return out / torch.linalg.vector_norm(out)


def _spherical_mean(u: Tensor, w: Tensor) -> Tensor:
    """Weighted Karcher mean of unit rows u [N, D] with weights w [N] (Σ w = 1), in float64."""
    s = w @ u
    s_norm = torch.linalg.vector_norm(s)
    if s_norm < _DEGENERATE_SUM:
        return _reference_direction(u)
    p = s / s_norm
    for _ in range(_KARCHER_MAX_ITERS):
        g = w @ _log_map(p, u)  # Riemannian gradient of −½ Σ w_i d(p, u_i)²
        p = _exp_map(p, g)
        if float(torch.linalg.vector_norm(g)) < _KARCHER_TOL:
            break
    return p


def _check_latents(latents: Tensor) -> None:
    if latents.ndim < 2 or latents.shape[0] < 1:
        raise ValidationError("latents must have shape [N, ...] with N ≥ 1 latents to merge")
    if latents[0].numel() < 2:
        raise ValidationError("each latent needs at least 2 elements to live on a sphere")
    if not bool(torch.isfinite(latents).all()):
        raise ValidationError("latents contain NaN or infinite values")


def _check_weights(weights: Tensor | Sequence[float] | None, n: int) -> Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten().cpu()
    if w.shape[0] != n:
        raise ValidationError(f"got {w.shape[0]} weights for {n} latents")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0.0:
        raise ValidationError("weights must be finite, non-negative and not all zero")
    return w / w.sum()


def merge_latents(
    latents: Tensor,
    weights: Tensor | Sequence[float] | None = None,
    *,
    norm: Literal["inputs", "gaussian"] = "inputs",
) -> Tensor:
    """Merge N latents ``[N, *shape]`` into one latent z_agg ``[*shape]`` on the sphere.

    Equal weights by default; ``weights`` are normalised to sum to 1. The result does not depend on
    the order of the (latent, weight) pairs (up to floating-point rounding). Its direction is the
    weighted spherical (Karcher) mean of the input directions and its norm the weighted mean of the
    input norms (``norm="inputs"``) or E‖N(0, I)‖ (``norm="gaussian"``). See the module docstring.
    """
    _check_latents(latents)
    n = latents.shape[0]
    w = _check_weights(weights, n)
    flat = latents.detach().reshape(n, -1).to(device="cpu", dtype=torch.float64)
    norms = torch.linalg.vector_norm(flat, dim=1)
    if bool((norms <= 0).any()):
        raise ValidationError("a zero latent has no direction to merge")
    u = flat / norms[:, None]
    # Songs with zero weight take no part (and cannot trigger the antipodal fallback).
    keep = w > 0
    direction = _spherical_mean(u[keep], w[keep] / w[keep].sum())
    radius = float(w @ norms) if norm == "inputs" else _gaussian_norm(flat.shape[1])
    merged = direction * radius
    return merged.reshape(latents.shape[1:]).to(device=latents.device, dtype=latents.dtype)


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical linear interpolation from ``a`` (t = 0) to ``b`` (t = 1).

    Directions move along the great circle at constant angular speed,
    sin((1−t)θ)/sin θ·â + sin(tθ)/sin θ·b̂; the norm is interpolated linearly, (1−t)‖a‖ + t‖b‖, so
    ``slerp(a, b, ½)`` equals ``merge_latents([a, b])``. θ ≈ 0 falls back to normalised lerp;
    antiparallel inputs rotate through the reference direction ``merge_latents`` uses, so
    slerp(a, b, t) = slerp(b, a, 1−t) there too.
    """
    if a.shape != b.shape:
        raise ValidationError(
            f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if not math.isfinite(t) or not 0.0 <= t <= 1.0:
        raise ValidationError(f"slerp t must lie in [0, 1], got {t}")
    _check_latents(torch.stack([a, b]))
    fa = a.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    fb = b.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    na, nb = torch.linalg.vector_norm(fa), torch.linalg.vector_norm(fb)
    if na <= 0 or nb <= 0:
        raise ValidationError("a zero latent has no direction to interpolate")
    ua, ub = fa / na, fb / nb
    cos = torch.clamp(ua @ ub, -1.0, 1.0)
    theta = torch.arccos(cos)
    if theta < _SMALL_ANGLE:
        direction = (1 - t) * ua + t * ub
    elif math.pi - float(theta) < _SMALL_ANGLE:
        m = _reference_direction(ua[None, :])
        direction = math.cos(t * math.pi) * ua + math.sin(t * math.pi) * m
    else:
        sin = torch.sin(theta)
        direction = (torch.sin((1 - t) * theta) / sin) * ua + (torch.sin(t * theta) / sin) * ub
    direction = direction / torch.linalg.vector_norm(direction)
    out = direction * ((1 - t) * na + t * nb)
    return out.reshape(a.shape).to(device=a.device, dtype=a.dtype)

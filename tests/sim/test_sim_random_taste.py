"""The random-taste population: each seed its own direction over the clip space, ratings that
follow it, and the plug-in contract of docs/LISTENERS.md."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import pytest

from riffloop.core import ValidationError
from riffloop.sim import (
    ClipVector,
    RandomTasteListener,
    bright_dense_listeners,
    checked_answer,
    dark_sparse_listeners,
    load_listener_factory,
    make_population,
    random_taste_listeners,
    random_taste_population,
)

pytestmark = pytest.mark.unit
SR = 22_050
N = 32_767  # one 64 × 64 mel window, the base model's clip


def _clip(rng: np.random.Generator) -> np.ndarray:
    """A random timbre: 1–3 harmonic tones (80–2,000 Hz, random partial decay), gated or decaying,
    sometimes with noise."""
    t = np.arange(N) / SR
    x = np.zeros(N)
    for _ in range(int(rng.integers(1, 4))):
        f0 = float(np.exp(rng.uniform(np.log(80), np.log(2000))))
        decay = float(rng.uniform(0.2, 1.0))
        tone = np.zeros(N)
        for h in range(1, int(rng.integers(2, 10))):
            if f0 * h < SR / 2:
                tone += decay**h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.5:
            tone *= np.sin(2 * np.pi * rng.uniform(0.5, 12) * t) > rng.uniform(-1, 0.8)
        else:
            tone *= np.exp(-t * rng.uniform(0, 4))
        x += tone
    x += rng.uniform(0, 0.5) * rng.normal(size=N) * (rng.random() < 0.5)
    return (0.3 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [_clip(rng) for _ in range(48 + 80)]  # 48 to anchor on, 80 to rate


@pytest.fixture(scope="module", params=["embedding", "mel statistics"])
def clip_vector(request: pytest.FixtureRequest) -> ClipVector:
    if request.param == "mel statistics":
        return ClipVector(None)
    from riffloop.core import NotFoundError
    from riffloop.music import AudioEmbedding

    try:
        return ClipVector(AudioEmbedding.load())
    except NotFoundError:
        pytest.skip("no trained AudioEmbedding in assets/quality-embedding")


def _heard(seed: int, clip_vector: ClipVector, clips: list[np.ndarray], n: int = 12) -> list[Any]:
    pop: list[Any] = random_taste_population(n, 0.0, seed, clip_vector=clip_vector)
    for listener in pop:
        for i, c in enumerate(clips[:48]):
            listener.listen(f"c{i}", c, SR)
    return pop


def _direction(seed: int, vec: ClipVector) -> np.ndarray:
    listener = random_taste_population(3, 0.0, seed, clip_vector=vec)[0]
    assert isinstance(listener, RandomTasteListener)
    return listener.space.direction


def test_two_seeds_draw_different_directions_one_seed_the_same() -> None:
    vec = ClipVector(None)
    d = {s: _direction(s, vec) for s in range(8)}
    assert all(np.linalg.norm(x) == pytest.approx(1.0) for x in d.values())
    cosines = [abs(d[a] @ d[b]) for a in d for b in d if a < b]
    assert max(cosines) < 0.9 and np.mean(cosines) < 0.4  # ≈ |N(0, 1/16)|: mean ≈ 0.2
    again = _direction(5, vec)
    assert np.array_equal(again, d[5])


def test_ratings_follow_the_own_direction_and_not_another_seeds(
    clip_vector: ClipVector, clips: list[np.ndarray]
) -> None:
    """Mean stars per clip correlate with the population's own liking u; what they share with
    another seed's liking is no more than its own liking explains (the residual is noise)."""
    pops = {s: _heard(s, clip_vector, clips) for s in (1, 2)}
    fresh = clips[48:]
    u = {s: np.array([pop[0].space.liking(c, SR) for c in fresh]) for s, pop in pops.items()}
    bound = 3 / np.sqrt(len(fresh))  # 3 sd of a correlation of independent series
    for own, other in ((1, 2), (2, 1)):
        stars = np.array(
            [
                [checked_answer(x.listen("t", c, SR), 2.0)[0] or np.nan for c in fresh]
                for x in pops[own]
            ]
        )
        mean = np.nanmean(stars, axis=0)
        assert np.corrcoef(mean, u[own])[0, 1] > 0.8
        resid = mean - np.polyval(np.polyfit(u[own], mean, 1), u[own])
        assert abs(np.corrcoef(resid, u[other])[0, 1]) < bound
        assert 0.6 < u[own].std() < 1.5  # u ≈ unit variance on clips beyond the anchor


def test_listening_time_follows_liking(clips: list[np.ndarray]) -> None:
    pop = _heard(3, ClipVector(None), clips, n=6)
    fresh = clips[48:]
    u = np.array([pop[0].space.liking(c, SR) for c in fresh])
    liked = [fresh[i] for i in np.argsort(u)[-15:]]
    disliked = [fresh[i] for i in np.argsort(u)[:15]]
    heard = {
        name: np.mean([x.listen("t", c, SR).seconds_listened for x in pop for c in group])
        for name, group in (("liked", liked), ("disliked", disliked))
    }
    assert heard["liked"] > heard["disliked"] + 0.2


def test_the_anchor_is_shared_and_frozen(clips: list[np.ndarray]) -> None:
    vec = ClipVector(None)
    pop: list[Any] = random_taste_population(4, 0.0, 7, clip_vector=vec, calibration_clips=10)
    space = pop[0].space
    assert all(x.space is space for x in pop)
    assert pop[0].utility(clips[0], SR) == 0.0  # nothing heard: no axis yet
    for i, c in enumerate(clips[:6]):
        pop[0].listen(f"c{i}", c, SR)
        pop[1].listen(f"again{i}", c, SR)  # the same clip again does not count twice
    assert not space.calibrated
    for i, c in enumerate(clips[6:12]):
        pop[2].listen(f"d{i}", c, SR)
    assert space.calibrated
    before = space.liking(clips[100], SR)
    for i, c in enumerate(clips[12:30]):
        pop[3].listen(f"e{i}", c, SR)
    assert space.liking(clips[100], SR) == before


FACTORIES = {
    "riffloop.sim:bright_dense_listeners": bright_dense_listeners,
    "riffloop.sim:dark_sparse_listeners": dark_sparse_listeners,
    "riffloop.sim:random_taste_listeners": random_taste_listeners,
}


@pytest.mark.parametrize("spec", list(FACTORIES))
def test_the_plugin_contract(spec: str, clips: list[np.ndarray]) -> None:
    """docs/LISTENERS.md for each of our populations: loadable by its spec, n listeners with
    distinct ids and a spam share of bots, valid answers, one seed one population, deep copies
    that answer as the original, and as many random draws whatever the answer."""
    factory = load_listener_factory(spec)
    assert factory is FACTORIES[spec]
    pop = make_population(factory, 20, 0.2, 3)
    kinds = [getattr(x, "kind", "?") for x in pop]
    assert sum(k != "honest" for k in kinds) == 4 and kinds.count("honest") == 16
    assert [x.listener_id for x in make_population(factory, 20, 0.2, 3)] == [
        x.listener_id for x in pop
    ]
    for x in pop:
        for i, c in enumerate(clips[:6]):
            stars, seconds, elapsed = checked_answer(x.listen(f"c{i}", c, SR), N / SR)
            assert stars is None or 1 <= stars <= 5
            if getattr(x, "kind", "") == "honest":
                assert elapsed >= seconds
    twins = copy.deepcopy(pop)
    for x, y in zip(pop, twins, strict=True):
        for i, c in enumerate(clips[6:10]):
            assert dataclasses.astuple(x.listen(f"d{i}", c, SR)) == dataclasses.astuple(
                y.listen(f"d{i}", c, SR)
            )
    honest = [x for x in make_population(factory, 6, 0.0, 4)]
    for a, b in zip(honest, copy.deepcopy(honest), strict=True):  # one liked, one not
        a.listen("p", clips[10], SR)
        b.listen("q", clips[11], SR)
        assert a.rng.bit_generator.state == b.rng.bit_generator.state  # type: ignore[attr-defined]


def test_bad_population_arguments_are_validation_errors() -> None:
    vec = ClipVector(None)
    for kwargs in ({"seed": -1}, {"rank": 0}, {"calibration_clips": 2}):
        args = {"n": 3, "spam_share": 0.0, "seed": 0, "clip_vector": vec, **kwargs}
        with pytest.raises(ValidationError):
            random_taste_population(**args)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        random_taste_population(3, 1.0, 0, clip_vector=vec)
    listener = random_taste_population(1, 0.0, 0, clip_vector=vec)[0]
    assert isinstance(listener, RandomTasteListener)
    with pytest.raises(ValidationError, match="NaN"):
        listener.listen("t", np.full(N, np.nan, dtype=np.float32), SR)
    short = listener.listen("t", np.zeros(1000, dtype=np.float32), 16_000)  # padded, resampled
    assert checked_answer(short, 1000 / 16_000)[1] <= 1000 / 16_000

from __future__ import annotations

import numpy as np
import pytest

from riffloop.core import ValidationError
from riffloop.sim import (
    ListenOutcome,
    TasteListener,
    audio_features,
    bright_dense_listeners,
    checked_answer,
    dark_sparse_listeners,
    load_listener_factory,
    make_population,
)

pytestmark = pytest.mark.unit
SR = 22_050


def _bright_dense(rng: np.random.Generator) -> np.ndarray:
    """Clicks of high partials every 100 ms."""
    t = np.arange(int(1.5 * SR)) / SR
    x = np.zeros_like(t)
    for start in np.arange(0, 1.5, 0.1):
        idx = (t >= start) & (t < start + 0.03)
        x[idx] += np.sin(2 * np.pi * 4000 * t[idx]) + 0.5 * rng.normal(size=idx.sum())
    return (0.3 * x).astype(np.float32)


def _dark_sparse(rng: np.random.Generator) -> np.ndarray:
    """One sustained low note."""
    t = np.arange(int(1.5 * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 110 * t) + 0.001 * rng.normal(size=t.size)).astype(np.float32)


def test_features_separate_bright_dense_from_dark_sparse() -> None:
    rng = np.random.default_rng(0)
    a = audio_features(_bright_dense(rng), SR)
    b = audio_features(_dark_sparse(rng), SR)
    assert a.brightness > b.brightness + 2  # octaves
    assert a.onset_rate > b.onset_rate + 3
    assert b.pitch == pytest.approx(np.log2(110), abs=0.2)
    silent = audio_features(np.zeros(SR, dtype=np.float32), SR)
    assert np.all(np.isfinite(silent.vector()))


def _mean_rating(listeners, clips) -> float:
    stars = []
    for lst in listeners:
        for i, c in enumerate(clips):
            out = lst.listen(f"t{i}", c, SR)
            assert isinstance(out, ListenOutcome)
            assert 0 <= out.seconds_listened <= c.size / SR + 1e-9
            if out.rating is not None:
                assert 1 <= out.rating <= 5
                stars.append(out.rating)
    return float(np.mean(stars))


def test_the_two_taste_families_disagree() -> None:
    rng = np.random.default_rng(1)
    # calibrate on a mix of both kinds, then rate fresh clips of each kind
    calib = [_bright_dense(rng) if i % 2 else _dark_sparse(rng) for i in range(16)]
    bright = [x for x in bright_dense_listeners(20, 0.0, seed=3)]
    dark = [x for x in dark_sparse_listeners(20, 0.0, seed=3)]
    for lst in bright + dark:
        for i, c in enumerate(calib):
            lst.listen(f"c{i}", c, SR)
    bd = [_bright_dense(rng) for _ in range(4)]
    ds = [_dark_sparse(rng) for _ in range(4)]
    assert _mean_rating(bright, bd) > _mean_rating(bright, ds) + 1.0
    assert _mean_rating(dark, ds) > _mean_rating(dark, bd) + 1.0


def test_listening_time_follows_liking_and_humans_take_real_time() -> None:
    rng = np.random.default_rng(2)
    lst = TasteListener("x", np.array([1.0, 0.8, 0.2, 0.3]), rng, noise=0.3)
    for i in range(16):
        lst.listen(f"c{i}", _bright_dense(rng) if i % 2 else _dark_sparse(rng), SR)
    liked = [lst.listen("a", _bright_dense(rng), SR) for _ in range(20)]
    disliked = [lst.listen("b", _dark_sparse(rng), SR) for _ in range(20)]
    assert np.mean([o.seconds_listened for o in liked]) > np.mean(
        [o.seconds_listened for o in disliked]
    )
    assert all(o.elapsed_seconds >= o.seconds_listened for o in liked + disliked)


def test_a_listener_draws_as_many_random_numbers_whatever_it_heard() -> None:
    """Common random numbers: one listener replayed in two arms hears a clip it skips in one and
    not in the other; its later draws must still be the same in both."""
    rng = np.random.default_rng(5)
    liked, disliked = _bright_dense(rng), _dark_sparse(rng)
    twins = [
        TasteListener("x", np.array([1.0, 0.8, 0.2, 0.3]), np.random.default_rng(9), noise=0.3)
        for _ in range(2)
    ]
    for twin, clip in zip(twins, (liked, disliked), strict=True):
        for _ in range(12):
            twin.listen("t", clip, SR)
    states = [twin.rng.bit_generator.state for twin in twins]
    assert states[0] == states[1]


def test_spam_share_and_bot_kinds() -> None:
    pop = bright_dense_listeners(50, 0.2, seed=4)
    kinds = [getattr(x, "kind", "?") for x in pop]
    assert len(pop) == 50 and sum(k != "honest" for k in kinds) == 10
    assert {"constant", "random", "zero_listen", "burst"} <= set(kinds)
    assert len({x.listener_id for x in pop}) == 50
    again = [x.listener_id for x in bright_dense_listeners(50, 0.2, seed=4)]
    assert again == [x.listener_id for x in pop]


def test_factory_plugin_loading() -> None:
    assert load_listener_factory("riffloop.sim:dark_sparse_listeners") is dark_sparse_listeners
    for bad in ("riffloop.loop", "no.such.module:f", "riffloop.sim:nothing_here"):
        with pytest.raises(ValidationError):
            load_listener_factory(bad)


def test_a_foreign_population_is_checked_where_it_plugs_in() -> None:
    """make_population names a factory that fails or returns no listeners; checked_answer
    refuses what the gateway would refuse from a client (docs/LISTENERS.md)."""
    assert len(make_population(dark_sparse_listeners, 10, 0.2, 0)) == 10

    def wrong_signature() -> list[object]:
        return []

    class NoId:
        def listen(self, track_id: str, audio: np.ndarray, sample_rate: int) -> None: ...

    for factory, why in [
        (wrong_signature, "failed: TypeError"),
        (lambda n, s, seed: dark_sparse_listeners(n - 1, s, seed), "returned 9 listeners"),
        (lambda n, s, seed: [NoId()] * n, "non-empty str listener_id"),
        (lambda n, s, seed: dark_sparse_listeners(1, s, seed) * n, "duplicate listener ids"),
    ]:
        with pytest.raises(ValidationError, match=why):
            make_population(factory, 10, 0.2, 0)  # type: ignore[arg-type]

    assert checked_answer(ListenOutcome(4, 1.0, 2.5), 2.0) == (4, 1.0, 2.5)
    assert checked_answer(ListenOutcome(None, 9.0, 0.0), 2.0) == (None, 2.0, 0.0)  # clipped
    assert checked_answer(ListenOutcome(5.0, 1.0, 1.0), 2.0)[0] == 5  # a whole float is fine
    for bad in [
        ListenOutcome(0, 1.0, 1.0),
        ListenOutcome(6, 1.0, 1.0),
        ListenOutcome(4.5, 1.0, 1.0),  # type: ignore[arg-type]
        ListenOutcome(True, 1.0, 1.0),
        ListenOutcome("5", 1.0, 1.0),  # type: ignore[arg-type]
        ListenOutcome(3, float("nan"), 1.0),
        ListenOutcome(3, -1.0, 1.0),
        ListenOutcome(3, 1.0, float("inf")),
        (3, 1.0, 1.0),
    ]:
        with pytest.raises(ValidationError):
            checked_answer(bad, 2.0)

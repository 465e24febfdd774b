"""The demo drives the six services: three embedded deployments, listeners through the gateway.

A pipeline test on an untrained tiny model and synthetic input songs (no claim on quality): what
it checks is that the simulation reaches the loop only through the services' APIs, that the
paired deployments stay paired, and that the release step runs in each arm.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from riffloop.sim import (
    InputSong,
    LoopConfig,
    LoopExperiment,
    SimClock,
    dark_sparse_listeners,
    format_table,
)
from riffloop.sim._report import write_result
from tests.services.conftest import wav_bytes

pytestmark = pytest.mark.slow

# An untrained tiny model (its tracks are noise), no offline gate: a pipeline test.
TINY = {
    "trainer": {
        "base_model_dir": "",
        "untrained_base": True,
        "base_preset": "tiny",
        "gate_mode": "skip",
        "baseline_rows": 32,
    },
}


def _inputs(n: int = 5) -> list[InputSong]:
    return [InputSong(f"tone-{i}", wav_bytes(8.0, 220.0 * (1.25**i))) for i in range(n)]


def _tiny_config(**changes: Any) -> LoopConfig:
    sizes: dict[str, Any] = dict(
        iterations=1,
        n_listeners=10,
        n_inputs=5,
        n_merges=2,
        requests_per_merge=4,
        ratings_per_listener=6,
        queue_target_listeners=5,
        invert_steps=3,
        quality=4,
        finetune_steps=2,
        finetune_batch=2,
        torch_threads=1,
        eval_merges=2,
        eval_requests_per_merge=2,
        eval_ratings_per_listener=4,
    )
    return LoopConfig(**{**sizes, **changes})


def test_the_demo_runs_three_paired_deployments_through_their_apis(tmp_path: Path) -> None:
    lines: list[str] = []
    config = _tiny_config()
    result = LoopExperiment(config, _inputs(), progress=lines.append, overrides=TINY).run()
    sel, ctl = result.iterations("selected"), result.iterations("control")
    assert len(sel) == len(ctl) == 2
    # iteration 0: the same request keys meet the same draws and seeds in both deployments,
    # the same listeners hear the same tracks in the same order: the same numbers, up to the
    # stars that float rounding tips the other way (a track batched with other requests; on
    # this untrained model's noise a flip moves a mean of ~6 tracks by ~0.1)
    a, b = sel[0], ctl[0]
    assert (a.ratings_used, a.model_version) == (b.ratings_used, b.model_version)
    assert a.mean_generated == pytest.approx(b.mean_generated, abs=0.3)
    assert a.mean_baseline == pytest.approx(b.mean_baseline, abs=0.3)
    assert a.ratings_used > 0 and a.spammers == 2
    # the control's selector drew as many pairs as the selected arm's kept
    assert sel[1].train_pairs == ctl[1].train_pairs
    if sel[1].train_pairs:  # a fine-tuned version serves the next session
        assert sel[1].model_version != sel[0].model_version
    evaluated = {r.arm: r for r in result.rows if r.session == "eval"}
    assert set(evaluated) == {"base", "selected", "control"}
    assert evaluated["base"].model_version == sel[0].model_version
    table = format_table(result)
    assert "| selected | 1 |" in table and "| base | eval |" in table
    paths = write_result(result, tmp_path)
    assert paths["plot"].stat().st_size > 1000
    # the evaluation session's tracks, by request key, in all three arms
    kept = {(t["arm"], t["request_key"]) for t in result.eval_tracks}
    assert {arm for arm, _ in kept} == {"base", "selected", "control"}
    assert len(kept) == len(result.eval_tracks) == 3 * 2 * 2
    assert paths["tracks"].read_text().count("\n") == 1 + len(result.eval_tracks)
    assert any("six services up" in line for line in lines)
    assert any("selection:" in line for line in lines)


class _Sloppy:
    """A foreign listener that answers 3.5 stars (refused), or crashes when ``fail``."""

    def __init__(self, inner: Any, fail: bool) -> None:
        self.inner, self.fail = inner, fail
        self.listener_id = inner.listener_id
        self.kind = inner.kind

    def listen(self, track_id: str, audio: Any, sample_rate: int) -> Any:
        if self.fail:
            raise RuntimeError("plug-in bug")
        out = self.inner.listen(track_id, audio, sample_rate)
        return type(out)(3.5, out.seconds_listened, out.elapsed_seconds)


def test_a_foreign_listeners_bad_answers_are_refused_and_its_crash_is_named() -> None:
    from riffloop.core import ValidationError

    def population(fail: bool):  # type: ignore[no-untyped-def]
        def factory(n: int, spam_share: float, seed: int) -> list[object]:
            listeners: list[object] = list(dark_sparse_listeners(n, spam_share, seed))
            listeners[0] = _Sloppy(listeners[0], fail)
            return listeners

        return factory

    config = _tiny_config(eval_merges=0, requests_per_merge=2)
    lines: list[str] = []
    experiment = LoopExperiment(
        config, _inputs(), population(False), progress=lines.append, overrides=TINY
    )
    result = experiment.run()
    refused = [line for line in lines if "refused listener answers" in line]
    assert refused and "not a whole number of stars 1–5" in refused[0]
    assert result.iterations("selected")[1].ratings_used > 0  # the run went on
    with pytest.raises(ValidationError, match=r"listener .* raised RuntimeError: plug-in bug"):
        LoopExperiment(
            config, _inputs(), population(True), progress=lines.append, overrides=TINY
        ).run()


def test_a_listener_over_the_gateways_rate_limit_waits_its_hint_and_goes_on() -> None:
    """A tight per-user limit (the burst bot submits every 50 ms, the studio uploads and asks at
    once): each refused call waits the gateway's retry-after, is counted, and the run ends."""
    tight = {
        **TINY,
        "gateway": {"rate_limit_per_s": 2.0, "rate_limit_burst": 12, "max_feedback_batch": 12},
    }
    config = _tiny_config(eval_merges=0, requests_per_merge=2)
    lines: list[str] = []
    result = LoopExperiment(config, _inputs(), progress=lines.append, overrides=tight).run()
    refused = [line for line in lines if "refused listener answers" in line]
    assert refused and "rate limited (RESOURCE_EXHAUSTED)" in refused[0]
    assert result.iterations("selected")[1].ratings_used > 0


@pytest.mark.unit
def test_the_sim_clock_skips_listening_time_and_never_goes_back() -> None:
    clock = SimClock()
    before = clock()
    clock.skip(3600.0)
    after = clock()
    assert 3600.0 <= after - before < 3660.0 and after >= time.time() + 3599.0
    with pytest.raises(ValueError, match="cannot skip"):
        clock.skip(-1.0)
    with pytest.raises(ValueError, match="cannot skip"):
        clock.skip(float("nan"))


@pytest.mark.unit
def test_a_stack_deployment_names_its_own_redis_database_and_env_values() -> None:
    from riffloop.sim._deployment import _env_value, _redis_db

    assert _redis_db("redis://127.0.0.1:6390", 2) == "redis://127.0.0.1:6390/2"
    assert (
        _redis_db("redis://127.0.0.1:6390/0?timeout=1", 3) == "redis://127.0.0.1:6390/3?timeout=1"
    )
    assert [_env_value(v) for v in (True, False, 0.25, 7, "x")] == [
        "true",
        "false",
        "0.25",
        "7",
        "x",
    ]


@pytest.mark.unit
def test_hidden_liking_reads_each_populations_own_taste() -> None:
    import numpy as np

    from riffloop.sim import bright_dense_listeners
    from riffloop.sim._experiment import SAMPLE_RATE, _hidden_liking
    from riffloop.sim._listeners import audio_features

    tone = np.sin(2 * np.pi * 440.0 * np.arange(SAMPLE_RATE * 2) / SAMPLE_RATE).astype("float32")
    honest = [x for x in bright_dense_listeners(10, 0.0, 3) if x.kind == "honest"]
    expected = np.mean([x.liking(audio_features(tone, SAMPLE_RATE)) for x in honest])
    assert _hidden_liking(honest, tone) == pytest.approx(expected)

    class Space:
        def liking(self, audio: Any, rate: int) -> float:
            return 0.75

    class Drawn:
        kind, space = "honest", Space()

    assert _hidden_liking([Drawn()], tone) == 0.75  # type: ignore[list-item]
    assert np.isnan(_hidden_liking([], tone))

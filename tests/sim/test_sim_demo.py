"""The embedded demo end to end on a tiny random model (a pipeline test: no claim on quality)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from riffloop.sim import LoopConfig, LoopExperiment, LoopWorld, format_table
from riffloop.sim._report import write_result

pytestmark = pytest.mark.slow


def _clips(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.randn(n, 1, 4, 4, generator=g), size=16)
    return x.clamp(-1, 1)


def _tiny_world() -> LoopWorld:
    """A random tiny model (16 × 16 mel) and random clips: 6 inputs, 40 training, 16 reference."""
    from riffloop.music import MelConfig, ModelConfig, MusicDiffusion

    torch.set_num_threads(1)
    model = MusicDiffusion.create(
        ModelConfig.preset("tiny"), MelConfig(n_mels=16, x_res=16), seed=0, version="base"
    )
    return LoopWorld(model, _clips(6, 1), _clips(40, 2), _clips(16, 3))


def _tiny_config(**changes: int) -> LoopConfig:
    """One iteration on the tiny world, every count small."""
    sizes = dict(
        iterations=1,
        n_listeners=20,
        n_inputs=6,
        n_merges=5,
        requests_per_merge=4,
        ratings_per_listener=10,
        baseline_pool=20,
        replay_pool=20,
        invert_steps=5,
        quality=6,
        finetune_steps=4,
        finetune_batch=4,
        torch_threads=1,
        eval_merges=3,
        eval_requests_per_merge=4,
        eval_ratings_per_listener=10,
    )
    return LoopConfig(**{**sizes, **changes})  # type: ignore[arg-type]


def test_demo_runs_both_arms_with_common_random_numbers(tmp_path: Path) -> None:
    world = _tiny_world()
    config = _tiny_config()
    lines: list[str] = []
    result = LoopExperiment(config, world, progress=lines.append).run()
    sel = result.iterations("selected")
    ctl = result.iterations("control")
    assert len(sel) == len(ctl) == 2
    # iteration 0 is shared: identical numbers in both arms
    a, b = sel[0], ctl[0]
    assert (a.mean_generated, a.mean_baseline, a.ratings_used) == (
        b.mean_generated,
        b.mean_baseline,
        b.ratings_used,
    )
    # the control trains on as many generations as the selected arm
    assert sel[1].train_pairs == ctl[1].train_pairs
    assert sel[0].spammers == 4 and sel[1].ratings_used > 0
    versions = {v["version"]: v for v in result.registry_versions}
    assert "base" in versions
    for v in versions.values():
        if v["version"] != "base":
            assert v["parent"] == "base" and v["status"] != "candidate"
    # the evaluation session: base and both arms' serving models on the same fresh requests
    evaluated = {r.arm: r for r in result.rows if r.session == "eval"}
    assert set(evaluated) == {"base", "selected", "control"}
    assert evaluated["base"].model_version == "base"
    for arm in ("selected", "control"):
        assert result.final(arm) is evaluated[arm]
        serving = versions[evaluated[arm].model_version]
        assert serving["status"] != "rolled_back", "a rolled-back candidate is not what serves"
    table = format_table(result)
    assert "| selected | 1 |" in table and "| control | 1 |" in table
    assert "| base | eval |" in table and "Lift over the base model" in table
    paths = write_result(result, tmp_path)
    assert paths["plot"].stat().st_size > 1000
    assert any("shared by both arms" in line for line in lines)


def test_evaluation_session_is_paired_same_model_same_row() -> None:
    """Two labels serving one model in the evaluation session get identical rows: requests,
    dispatch, seeds and listener state are shared, so only the model can make rows differ."""
    import copy
    from dataclasses import replace

    from riffloop.loop import FeedbackLedger
    from riffloop.sim import load_listener_factory

    world = _tiny_world()
    model = world.model
    config = LoopConfig(
        n_listeners=12,
        n_inputs=6,
        n_merges=2,
        baseline_pool=20,
        replay_pool=20,
        invert_steps=5,
        quality=6,
        torch_threads=1,
        eval_merges=3,
        eval_requests_per_merge=4,
        eval_ratings_per_listener=8,
    )
    exp = LoopExperiment(config, world, progress=lambda _: None)
    exp.timings = {}
    exp._prepare()
    listeners = load_listener_factory(config.listeners)(12, 0.25, 0)
    start = (copy.deepcopy(listeners), FeedbackLedger().snapshot(), {})
    a, b = exp._evaluate({"a": model, "b": model}, start)
    assert a.ratings_used > 0 and a.session == "eval"
    assert replace(b, arm="a", seconds=a.seconds) == a
    merges = exp._evaluation_merges()
    assert len(merges) == 3 and not set(merges) & set(exp.merges)  # requests no iteration served


class _Recorder:
    """Wraps a listener and keeps every track id it was shown."""

    def __init__(self, inner: object, seen: list[str]) -> None:
        self.inner, self.seen = inner, seen
        self.listener_id = inner.listener_id  # type: ignore[attr-defined]
        self.kind = getattr(inner, "kind", "honest")

    def __deepcopy__(self, memo: dict[int, object]) -> _Recorder:
        import copy

        return _Recorder(copy.deepcopy(self.inner, memo), self.seen)  # one list for all copies

    def listen(self, track_id: str, audio: object, sample_rate: int) -> object:
        self.seen.append(track_id)
        return self.inner.listen(track_id, audio, sample_rate)  # type: ignore[attr-defined]


def test_listeners_see_opaque_ids_the_same_for_a_request_in_every_arm() -> None:
    """Blind dispatch: the id a listener is shown names no arm, session, model or probe, and a
    request has one public id whichever model answered it (so the arms stay paired)."""
    import copy

    from riffloop.loop import FeedbackLedger
    from riffloop.sim import load_listener_factory

    world = _tiny_world()
    config = _tiny_config()
    exp = LoopExperiment(config, world, progress=lambda _: None)
    exp.timings = {}
    exp._prepare()
    seen: dict[str, list[str]] = {"a": [], "b": []}
    inner = load_listener_factory(config.listeners)(8, 0.25, 0)
    for label in seen:
        listeners = [_Recorder(x, seen[label]) for x in copy.deepcopy(inner)]
        start = (listeners, FeedbackLedger().snapshot(), {})
        exp._evaluate({label: world.model}, start)
    assert seen["a"] and seen["a"] == seen["b"]
    for public in seen["a"]:
        assert len(public) == 16 and int(public, 16) >= 0  # hex, nothing readable
    ours = set(exp.provenance)
    assert not ours & set(seen["a"])


class _Sloppy:
    """Wraps a listener; every third answer claims 7 stars, or the listener raises."""

    def __init__(self, inner: object, fail: bool) -> None:
        self.inner, self.fail, self.calls = inner, fail, 0
        self.listener_id = inner.listener_id  # type: ignore[attr-defined]
        self.kind = getattr(inner, "kind", "honest")

    def listen(self, track_id: str, audio: object, sample_rate: int) -> object:
        from riffloop.sim import ListenOutcome

        self.calls += 1
        out = self.inner.listen(track_id, audio, sample_rate)  # type: ignore[attr-defined]
        if self.calls % 3:
            return out
        if self.fail:
            raise RuntimeError("plug-in bug")
        return ListenOutcome(7, out.seconds_listened, out.elapsed_seconds)


def test_a_foreign_listeners_bad_answers_are_refused_and_its_crash_is_named() -> None:
    from riffloop.core import ValidationError
    from riffloop.sim import dark_sparse_listeners

    def population(fail: bool):  # type: ignore[no-untyped-def]
        def factory(n: int, spam_share: float, seed: int) -> list[object]:
            listeners: list[object] = list(dark_sparse_listeners(n, spam_share, seed))
            listeners[0] = _Sloppy(listeners[0], fail)
            return listeners

        return factory

    config = _tiny_config(
        n_listeners=10,
        n_merges=4,
        ratings_per_listener=6,
        invert_steps=3,
        quality=4,
        finetune_steps=2,
        eval_merges=2,
        eval_ratings_per_listener=6,
    )
    world = _tiny_world()
    lines: list[str] = []
    result = LoopExperiment(config, world, population(False), progress=lines.append).run()
    refused = [line for line in lines if "refused" in line and "listener answers" in line]
    assert refused and "not a whole number of stars 1–5" in refused[0]
    assert result.iterations("selected")[1].ratings_used > 0  # the run went on
    with pytest.raises(ValidationError, match=r"listener .* raised RuntimeError: plug-in bug"):
        LoopExperiment(config, world, population(True), progress=lines.append).run()


def test_after_a_rollback_the_next_candidate_is_judged_against_the_served_models_tracks() -> None:
    """The canary rolls every candidate back (α ≈ 1) and the gate lets every one through: the
    second candidate's gate must compare with the tracks of the model actually served (the base
    model's, iteration 0), not with the rolled-back candidate's (iteration 1)."""
    config = _tiny_config(
        iterations=2, canary_alpha=0.999, gate_fd_increase=1e6, gate_diversity_drop=1.0
    )
    result = LoopExperiment(config, _tiny_world()).run()
    versions = {v["version"]: v for v in result.registry_versions}
    checked = 0
    for arm in ("selected", "control"):
        rows = result.iterations(arm)
        first, second = versions.get(f"{arm}-v1"), versions.get(f"{arm}-v2")
        if first is None or second is None or first["status"] != "rolled_back":
            continue
        assert second["parent"] == "base"
        report = second["gate_report"]
        assert report["diversity_parent"] == pytest.approx(rows[0].diversity)  # iteration 0
        assert report["diversity_parent"] != pytest.approx(rows[1].diversity)
        assert report["diversity_base"] != report["diversity_base"]  # parent is base: not compared
        checked += 1
    assert checked >= 1

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from riffloop.core import ValidationError
from riffloop.sim import IterationRow, LoopConfig, LoopResult, format_table, paired_interval
from riffloop.sim._cli import main
from riffloop.sim._report import paired_evaluation, read_result, save_run, write_evidence

pytestmark = pytest.mark.unit


def test_cli_usage_and_missing_model_exit_2(tmp_path: Path, capsys) -> None:
    assert main([]) == 2
    assert main(["nonsense"]) == 2
    assert main(["demo", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    assert "no base model" in capsys.readouterr().err


def test_every_demo_flag_says_what_it_does(capsys) -> None:
    from dataclasses import fields

    from riffloop.sim._cli import _HELP

    documented = {f.name for f in fields(LoopConfig)} - {"seed", "protocol"}
    assert documented == set(_HELP)
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "requested track length (5.9 s = 4 overlapping windows) (default 5.9)" in text


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--torch-threads", "0"], "torch_threads must be an integer ≥ 1"),
        (["--finetune-batch", "1"], "finetune_batch must be an integer ≥ 2"),
        (["--seed", "-1"], "seed must be an integer ≥ 0"),
        (["--spam-share", "1"], "spam_share must lie in [0, 1)"),
        (["--learning-rate", "nan"], "learning_rate must lie in"),
        (["--n-inputs", "1"], "n_inputs must be an integer ≥ 2"),
        # the release cycle's own check, met before anything starts rather than in a trainer
        (["--finetune-batch", "2", "--replay-ratio", "0.9"], "replay_ratio leaves no room"),
    ],
)
def test_bad_demo_flags_are_usage_errors_before_anything_loads(
    tmp_path: Path, capsys, flags: list[str], reason: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--model", str(tmp_path / "nothing"), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert reason in err and "Traceback" not in err and "no base model" not in err


def _row(arm: str, it: int, delta: float, hidden: float) -> IterationRow:
    return IterationRow(
        arm,
        it,
        f"{arm}-v{it}",
        100,
        3.0 + delta,
        3.0,
        delta,
        delta - 0.2,
        delta + 0.2,
        1.0,
        9,
        10,
        0,
        hidden,
        0.0,
        4,
        "pass",
        "promote",
        1.0,
    )


def _result(seed: int, sel: float, ctl: float) -> LoopResult:
    rows = [_row("selected", 0, 0.0, 0.0), _row("control", 0, 0.0, 0.0)]
    rows += [_row("selected", 1, sel, sel), _row("control", 1, ctl, ctl)]
    return LoopResult(LoopConfig(seed=seed), rows)


def test_table_and_paired_evidence(tmp_path: Path) -> None:
    res = _result(0, 0.3, 0.1)
    table = format_table(res)
    assert "| selected | 1 | selected-v1 | 100 |" in table
    assert "selected − control: Δ rating +0.20" in table
    m, lo, hi = paired_interval([0.2, 0.4, 0.3])
    assert m == pytest.approx(0.3) and lo < 0.3 < hi
    assert np.isnan(paired_interval([0.2])[1])
    results = {("bright", s): _result(s, 0.3 + 0.1 * s, 0.1) for s in range(3)}
    md = write_evidence(results, tmp_path)
    assert "| bright | 3 | +0.30" in md.read_text()
    assert (tmp_path / "evidence.csv").read_text().count("\n") == 1 + 3 * 4
    assert (tmp_path / "evidence.png").stat().st_size > 1000


def test_saved_run_resumes_only_with_the_same_config(tmp_path: Path) -> None:
    res = _result(1, 0.3, 0.1)
    res.timings["total"] = 12.5
    paths = save_run(res, tmp_path, "bright-seed1")
    again = read_result(paths["csv"], LoopConfig(seed=1))
    assert again is not None
    assert again.rows == res.rows and again.timings["total"] == 12.5
    assert read_result(paths["csv"], LoopConfig(seed=2)) is None  # another config: rerun
    assert read_result(tmp_path / "absent.csv", LoopConfig(seed=1)) is None


def test_a_run_recorded_under_the_riffloop_loop_factory_path_is_reused(tmp_path: Path) -> None:
    """docs/results/*/runs name the populations riffloop.loop:<factory>; the same factories are
    riffloop.sim:<factory>, so those runs still resume the evidence."""
    paths = save_run(_result(1, 0.3, 0.1), tmp_path, "bright-seed1")
    sidecar = paths["csv"].with_suffix(".run.json")
    saved = json.loads(sidecar.read_text())
    assert saved["config"]["listeners"] == "riffloop.sim:bright_dense_listeners"
    saved["config"]["listeners"] = "riffloop.loop:bright_dense_listeners"
    sidecar.write_text(json.dumps(saved))
    assert read_result(paths["csv"], LoopConfig(seed=1)) is not None
    other = replace(LoopConfig(seed=1), listeners="riffloop.sim:dark_sparse_listeners")
    assert read_result(paths["csv"], other) is None


def test_a_run_saved_before_a_config_field_existed_reads_it_as_its_default(
    tmp_path: Path,
) -> None:
    """A field added later (preference_beta) keeps what runs did before it at its default: a
    run saved without it is the default's run, and not a run of any other value."""
    paths = save_run(_result(1, 0.3, 0.1), tmp_path, "bright-seed1")
    sidecar = paths["csv"].with_suffix(".run.json")
    saved = json.loads(sidecar.read_text())
    del saved["config"]["preference_beta"]
    sidecar.write_text(json.dumps(saved))
    assert read_result(paths["csv"], LoopConfig(seed=1)) is not None
    assert read_result(paths["csv"], LoopConfig(seed=1, preference_beta=500.0)) is None


def test_preference_beta_reaches_both_arms_selector_and_trainer() -> None:
    from riffloop.sim import LoopExperiment

    for beta, pairs in ((0.0, False), (500.0, True)):
        experiment = LoopExperiment.__new__(LoopExperiment)  # settings() reads cfg alone
        experiment.cfg = LoopConfig(preference_beta=beta)
        experiment.model_dir = Path("assets/base-model")
        for selection in ("genetic", "random"):
            settings = experiment.settings(selection)
            assert settings["selector"]["preference_pairs"] is pairs
            assert settings["trainer"]["preference_beta"] == beta
    with pytest.raises(ValidationError, match="preference_beta"):
        LoopConfig(preference_beta=-1.0)


def test_train_windows_reaches_both_arms_trainers_and_keeps_saved_runs() -> None:
    from riffloop.sim import LoopExperiment

    experiment = LoopExperiment.__new__(LoopExperiment)  # settings() reads cfg alone
    experiment.model_dir = Path("assets/base-model")
    for windows in ("first", "all"):
        experiment.cfg = LoopConfig(train_windows=windows)
        for selection in ("genetic", "random"):
            assert experiment.settings(selection)["trainer"]["train_windows"] == windows
    with pytest.raises(ValidationError, match="first or all"):
        LoopConfig(train_windows="last")
    with pytest.raises(ValidationError, match="preference_beta"):
        LoopConfig(train_windows="all", preference_beta=500.0)


def test_a_weighted_experiment_gives_its_control_the_shuffled_weights_and_keeps_saved_runs(
    tmp_path: Path,
) -> None:
    from riffloop.sim import LoopExperiment

    experiment = LoopExperiment.__new__(LoopExperiment)  # arm_selections() reads cfg alone
    experiment.model_dir = Path("assets/base-model")
    experiment.cfg = LoopConfig()
    assert dict(experiment.arm_selections()) == {
        "selected": "genetic",
        "control": "random",
        "base": "genetic",
    }
    experiment.cfg = LoopConfig(selection="weighted")
    arms = dict(experiment.arm_selections())
    assert arms["selected"] == "weighted" and arms["control"] == "permuted"
    assert experiment.settings(arms["control"])["selector"]["selection"] == "permuted"
    with pytest.raises(ValidationError, match="genetic or weighted"):
        LoopConfig(selection="random")
    with pytest.raises(ValidationError, match="preference_beta needs the genetic"):
        LoopConfig(selection="weighted", preference_beta=500.0)
    # a run saved before the field existed is the genetic selection's
    paths = save_run(_result(1, 0.3, 0.1), tmp_path, "bright-seed1")
    sidecar = paths["csv"].with_suffix(".run.json")
    saved = json.loads(sidecar.read_text())
    del saved["config"]["selection"]
    sidecar.write_text(json.dumps(saved))
    assert read_result(paths["csv"], LoopConfig(seed=1)) is not None
    assert read_result(paths["csv"], LoopConfig(seed=1, selection="weighted")) is None


def test_a_saved_run_is_not_reused_for_another_base_model(tmp_path: Path) -> None:
    paths = save_run(_result(1, 0.3, 0.1), tmp_path, "bright-seed1", model="base-v1:aaaa")
    assert read_result(paths["csv"], LoopConfig(seed=1), "base-v1:aaaa") is not None
    assert read_result(paths["csv"], LoopConfig(seed=1), "base-v2:bbbb") is None


def test_model_identity_names_version_and_weights(tmp_path: Path) -> None:
    from riffloop.core import NotFoundError
    from riffloop.sim._cli import model_identity

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w1")
    (tmp_path / "model_card.json").write_text('{"version": "base-v9"}')
    first = model_identity(tmp_path)
    assert first.startswith("base-v9:")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w2")
    assert model_identity(tmp_path) != first
    with pytest.raises(NotFoundError):
        model_identity(tmp_path / "missing")


def test_evidence_runs_exactly_the_declared_fresh_seeds(tmp_path: Path, monkeypatch) -> None:
    """``--first-seed 5 --seeds 3`` runs seeds 5, 6 and 7 per family and nothing else; a seed
    already saved with the same config is reused, not rerun."""
    import riffloop.sim._cli as cli

    ran: list[tuple[str, int]] = []

    class FakeExperiment:
        def __init__(
            self,
            config: LoopConfig,
            inputs: object,
            progress: object,
            model_dir: Path,
            stack: object,
        ) -> None:
            self.config = config

        def run(self) -> LoopResult:
            ran.append((self.config.listeners, self.config.seed))
            return LoopResult(self.config, _result(self.config.seed, 0.3, 0.1).rows)

    monkeypatch.setattr(cli, "model_identity", lambda _: "base-v9:feed")
    monkeypatch.setattr(cli, "load_inputs", lambda config: [])
    monkeypatch.setattr(cli, "LoopExperiment", FakeExperiment)
    spec = "riffloop.sim:bright_dense_listeners"
    cfg = replace(LoopConfig(seed=6), listeners=spec)
    save_run(
        LoopResult(cfg, _result(6, 0.3, 0.1).rows),
        tmp_path / "runs",
        "bright_dense-seed6",
        model="base-v9:feed",
    )
    argv = ["evidence", "--out", str(tmp_path), "--families", spec, "--first-seed", "5"]
    assert main([*argv, "--seeds", "3"]) == 0
    assert ran == [(spec, 5), (spec, 7)]
    assert "| bright_dense | 3 |" in (tmp_path / "evidence.md").read_text()


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--first-seed", "-1"], "--first-seed must be an integer ≥ 0"),
        (["--seeds", "0"], "--seeds must be an integer ≥ 1"),
        (["--spam-share", "1"], "spam_share must lie in [0, 1)"),
        (
            [
                "--families",
                "riffloop.sim:bright_dense_listeners,riffloop.loop:dark_sparse_listeners",
            ],
            "live in riffloop.sim, not riffloop.loop (use 'riffloop.sim:dark_sparse_listeners')",
        ),
        (["--families", "riffloop.sim:no_such_population"], "is not a callable factory"),
    ],
)
def test_bad_evidence_flags_are_usage_errors(tmp_path: Path, capsys, flags, reason) -> None:
    with pytest.raises(SystemExit) as info:
        main(["evidence", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert reason in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["demo", "evidence"])
def test_an_old_listeners_spec_names_the_new_module(tmp_path: Path, capsys, command) -> None:
    """--listeners riffloop.loop:<factory> is a usage error naming riffloop.sim, before anything
    loads (the model folder does not even exist)."""
    with pytest.raises(SystemExit) as info:
        main(
            [
                command,
                "--model",
                str(tmp_path / "nothing"),
                "--out",
                str(tmp_path),
                "--listeners",
                "riffloop.loop:bright_dense_listeners",
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "use 'riffloop.sim:bright_dense_listeners'" in err and "Traceback" not in err


def test_a_machine_without_the_corpus_is_told_the_command_that_builds_it(
    tmp_path: Path, monkeypatch
) -> None:
    from riffloop.sim._experiment import load_inputs

    monkeypatch.setenv("RIFFLOOP_CACHE", str(tmp_path))
    with pytest.raises(ValidationError, match="bin/riffloop evidence` build it themselves"):
        load_inputs(LoopConfig())


def test_the_evaluation_is_paired_by_request_key() -> None:
    """selected − control over the requests that gave a generation in both arms, with the
    standard error of the per-request differences; baselines and unrated tracks are left out."""
    res = _result(0, 0.3, 0.1)

    def track(arm: str, key: str, score: float, liking: float, kind: str = "generated") -> dict:
        return {
            "arm": arm,
            "request_key": key,
            "kind": kind,
            "input_key": "m0",
            "model_version": "v",
            "score": score,
            "ratings": 5,
            "liking": liking,
        }

    res.eval_tracks = [
        track("selected", "eval:m0:r0", 3.5, 0.5),
        track("control", "eval:m0:r0", 3.0, 0.1),
        track("selected", "eval:m0:r1", 4.0, 0.2),
        track("control", "eval:m0:r1", 3.0, 0.0),
        track("selected", "eval:m1:r0", 2.5, -0.1),
        track("control", "eval:m1:r0", 2.0, -0.4),
        track("selected", "eval:m1:r1", 3.0, 0.0, kind="baseline"),
        track("control", "eval:m1:r1", 1.0, 0.0, kind="baseline"),
        track("selected", "eval:m2:r0", 5.0, 1.0),  # no control track for it
    ]
    paired = paired_evaluation(res, "selected", "control")
    d = np.array([0.5, 1.0, 0.5])
    assert paired["n"] == 3
    assert paired["score"] == pytest.approx(d.mean())
    assert paired["score_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert paired["liking"] == pytest.approx(np.mean([0.4, 0.2, 0.3]))
    assert -1 <= paired["score_r"] <= 1
    assert "Paired by request (3 evaluation requests" in format_table(res)
    assert paired_evaluation(res, "selected", "base")["n"] == 0

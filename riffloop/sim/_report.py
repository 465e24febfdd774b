"""The paper's table, the demo plot, and the evidence over seeds (markdown + CSV + PNG)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from riffloop.sim._experiment import IterationRow, LoopConfig, LoopResult

DIVERSITY_KEPT = 0.80  # the bar: an arm's diversity stays ≥ 80 % of the base model's


def _f(x: float, digits: int = 2, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def format_table(result: LoopResult) -> str:
    """Markdown table, one row per (arm, iteration), in the paper's columns plus the truth."""
    head = (
        "| arm | it | model version | ratings used | mean generated | mean baseline | "
        "Δ [95 % CI] | diversity | spam caught | false alarms | hidden liking Δ | train pairs |"
        " gate | canary |\n|" + "---|" * 14
    )
    lines = [head]
    for r in result.rows:
        it = "eval" if r.session == "eval" else str(r.iteration)
        lines.append(
            f"| {r.arm} | {it} | {r.model_version} | {r.ratings_used} | "
            f"{_f(r.mean_generated)} | {_f(r.mean_baseline)} | {_f(r.delta, sign=True)} "
            f"[{_f(r.delta_lo, sign=True)}, {_f(r.delta_hi, sign=True)}] | {_f(r.diversity, 3)} | "
            f"{r.spam_caught}/{r.spammers} | {r.false_alarms} | "
            f"{_f(r.hidden_generated - r.hidden_baseline, sign=True)} | {r.train_pairs} | "
            f"{r.gate} | {r.canary} |"
        )
    sel, ctl = result.final("selected"), result.final("control")
    where = "Evaluation session" if sel.session == "eval" else "Final iteration"
    lines.append("")
    lines.append(
        f"{where}, selected − control: Δ rating {_f(sel.delta - ctl.delta, sign=True)}, "
        f"hidden liking of generations {_f(sel.hidden_generated - ctl.hidden_generated, 3, True)} "
        f"(one seed: see `evidence` for the paired interval over seeds)."
    )
    base = [r for r in result.rows if r.arm == "base" and r.session == "eval"]
    if base:
        lines.append(
            f"Lift over the base model on the evaluation requests: selected "
            f"{_f(sel.delta - base[0].delta, sign=True)}, control "
            f"{_f(ctl.delta - base[0].delta, sign=True)} (Δ rating)."
        )
    for a, b in (("selected", "control"), ("selected", "base"), ("control", "base")):
        paired = paired_evaluation(result, a, b)
        if paired["n"]:
            lines.append(
                f"Paired by request ({paired['n']} evaluation requests generated in both), "
                f"{a} − {b}: R {_f(paired['score'], sign=True)} ± {_f(paired['score_se'])} "
                f"(s.e.; r = {_f(paired['score_r'])}), hidden liking "
                f"{_f(paired['liking'], 3, True)} ± {_f(paired['liking_se'], 3)} "
                f"(r = {_f(paired['liking_r'])})."
            )
    return "\n".join(lines)


def paired_evaluation(result: LoopResult, a: str, b: str) -> dict[str, float]:
    """Arms ``a`` and ``b`` on the evaluation requests that gave a generation in both (the same
    request key meets the same blind draw in every deployment): the mean per-request
    difference of R and of hidden liking u, each with its standard error and the correlation
    of the two arms' values. The standard error is the evaluation's own noise: how far the
    seed's difference could move with other evaluation requests, the models fixed."""
    by_arm: dict[str, dict[str, dict[str, Any]]] = {}
    for t in result.eval_tracks:
        if t["kind"] == "generated" and int(t["ratings"]) > 0:
            by_arm.setdefault(t["arm"], {})[t["request_key"]] = t
    keys = sorted(set(by_arm.get(a, {})) & set(by_arm.get(b, {})))
    out: dict[str, float] = {"n": len(keys)}
    for name in ("score", "liking"):
        x = np.array([float(by_arm[a][k][name]) for k in keys])
        y = np.array([float(by_arm[b][k][name]) for k in keys])
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if x.size < 3:
            out |= {name: math.nan, f"{name}_se": math.nan, f"{name}_r": math.nan}
            continue
        d = x - y
        r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else math.nan
        out |= {
            name: float(d.mean()),
            f"{name}_se": float(d.std(ddof=1) / math.sqrt(d.size)),
            f"{name}_r": r,
        }
    return out


def plot_result(result: LoopResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, colour in (("selected", "tab:blue"), ("control", "tab:orange")):
        rows = result.iterations(arm)
        evaluated = [r for r in result.rows if r.arm == arm and r.session == "eval"]
        if evaluated:  # the evaluation session, one step right of the last iteration
            rows = [*rows, replace(evaluated[0], iteration=rows[-1].iteration + 1)]
        it = np.array([r.iteration for r in rows]) + (0.05 if arm == "control" else 0.0)
        d = np.array([r.delta for r in rows])
        err = np.array([[r.delta - r.delta_lo for r in rows], [r.delta_hi - r.delta for r in rows]])
        ax1.errorbar(it, d, yerr=np.nan_to_num(err), marker="o", capsize=3, label=arm, color=colour)
        ax2.plot(
            it,
            [r.hidden_generated - r.hidden_baseline for r in rows],
            marker="o",
            label=arm,
            color=colour,
        )
    base = [r for r in result.rows if r.arm == "base" and r.session == "eval"]
    x_eval = len(result.iterations("selected"))
    if base:
        ax1.plot([x_eval], [base[0].delta], marker="s", color="grey", label="base (evaluation)")
        ax2.plot(
            [x_eval], [base[0].hidden_generated - base[0].hidden_baseline], marker="s", color="grey"
        )
    ax1.axhline(0, color="grey", lw=0.8)
    ax2.axhline(0, color="grey", lw=0.8)
    xlabel = "iteration (last point: evaluation session)" if base else "iteration"
    ax1.set(xlabel=xlabel, ylabel="mean rating: generated − baseline (95 % CI)")
    ax2.set(xlabel=xlabel, ylabel="hidden liking: generated − baseline")
    ax1.legend()
    fig.suptitle(f"Riffloop demo ({result.config.listeners}, seed {result.config.seed})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_result(result: LoopResult, out_dir: Path, stem: str = "demo") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    md.write_text(
        format_table(result)
        + "\n\nTimings (s): "
        + json.dumps({k: round(v, 1) for k, v in result.timings.items()})
        + "\n"
    )
    csv_path = out_dir / f"{stem}.csv"
    write_rows(result.rows, csv_path)
    paths = {"markdown": md, "csv": csv_path, "plot": plot_result(result, out_dir / f"{stem}.png")}
    if result.eval_tracks:  # the evaluation session's tracks, for the paired analysis
        tracks_path = out_dir / f"{stem}.tracks.csv"
        with tracks_path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(result.eval_tracks[0]))
            w.writeheader()
            w.writerows(result.eval_tracks)
        paths["tracks"] = tracks_path
    return paths


def write_rows(rows: Sequence[IterationRow], path: Path, extra: dict[str, object] | None = None):
    names = [f.name for f in fields(IterationRow)]
    extra = extra or {}
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*extra.keys(), *names])
        w.writeheader()
        for r in rows:
            w.writerow({**extra, **asdict(r)})


def read_result(csv_path: Path, config: LoopConfig, model: str = "") -> LoopResult | None:
    """A finished run saved by `save_run`, or None when absent or made with another config or
    another base model (``model``: its identity, e.g. version and weights digest).

    The evidence command resumes from these, so a stopped multi-hour run loses one cell at most.
    """
    sidecar = csv_path.with_suffix(".run.json")
    if not (csv_path.exists() and sidecar.exists()):
        return None
    saved = json.loads(sidecar.read_text())
    recorded = saved.get("config")
    if isinstance(recorded, dict) and isinstance(recorded.get("listeners"), str):
        # a record naming a factory by its riffloop.loop path (docs/results/*/runs) names the
        # same riffloop.sim factory
        module, sep, attr = recorded["listeners"].partition(":")
        if module == "riffloop.loop" and sep:
            recorded = {**recorded, "listeners": f"riffloop.sim:{attr}"}
    if isinstance(recorded, dict):
        # a field added to LoopConfig after the run was saved reads as its default: a new
        # field's default keeps what runs did before it (a change of behaviour bumps protocol)
        added = {f.name: f.default for f in fields(LoopConfig) if f.name not in recorded}
        recorded = {**added, **recorded}
    if recorded != asdict(config) or saved.get("model", "") != model:
        return None
    kinds = {f.name: str(getattr(f.type, "__name__", f.type)) for f in fields(IterationRow)}
    rows = []
    with csv_path.open(newline="") as fh:
        for raw in csv.DictReader(fh):
            values: dict[str, object] = {}
            for name, kind in kinds.items():
                text = raw[name]
                values[name] = (
                    int(text) if kind == "int" else float(text) if kind == "float" else text
                )
            rows.append(IterationRow(**values))  # type: ignore[arg-type]
    return LoopResult(config, rows, dict(saved.get("timings", {})))


def save_run(result: LoopResult, out_dir: Path, stem: str, model: str = "") -> dict[str, Path]:
    """`write_result` plus the config, base model identity and timings beside the CSV, for
    `read_result`."""
    paths = write_result(result, out_dir, stem)
    sidecar = paths["csv"].with_suffix(".run.json")
    record = {"config": asdict(result.config), "model": model, "timings": result.timings}
    sidecar.write_text(json.dumps(record, indent=1) + "\n")
    return {**paths, "run": sidecar}


def paired_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-seed differences (selected − control) with its t interval."""
    d = np.asarray([x for x in diffs if math.isfinite(x)], dtype=float)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    if d.size == 1:
        return float(d[0]), math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def write_evidence(results: dict[tuple[str, int], LoopResult], out_dir: Path) -> Path:
    """results[(family, seed)] → docs/results/evidence.{md,csv,png}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "evidence.csv").open("w", newline="") as fh:
        names = [f.name for f in fields(IterationRow)]
        w = csv.DictWriter(fh, fieldnames=["family", "seed", *names])
        w.writeheader()
        for (family, seed), res in sorted(results.items()):
            for r in res.rows:
                w.writerow({"family": family, "seed": seed, **asdict(r)})
    lines = [
        "# Evidence: selected vs random control (same budget, same seeds)",
        "",
        "Per seed, selected − control in the evaluation session: fresh requests (merges no",
        "iteration served) answered by the model each arm ended up serving, with the same request",
        "ids, dispatch, generation seeds and listener state for both (runs made without an",
        "evaluation session fall back to the final iteration's rows). One observation per seed,",
        "t interval over seeds. Lift = the arm's Δ minus the base model's Δ on the same requests.",
        "",
        "Diversity / base = the arm's generations' diversity over the base model's on the same",
        "evaluation requests (mean over seeds, worst seed in brackets); the bar is ≥ 80 %.",
        "",
        "R generated = mean rating R (the feedback service's, spam-weighted, per-rater normalised)",
        "of the generated tracks; since the loop runs through the services (protocol 5) it is "
        "the primary",
        "measure: the genetic step moves SELECTED's baselines to its winners, so Δ (generated − "
        "baseline)",
        "compares each arm with a different reference. Lift of R generated = the arm's minus "
        "the base model's.",
        "",
        "| family | seeds | R generated sel − ctl [95 % CI] | lift of R generated over base, "
        "selected [95 % CI] / control | Δrating sel − ctl [95 % CI] | hidden liking sel − ctl "
        "[95 % CI] | lift selected / control (Δ rating) | diversity / base, selected · control "
        "[worst] | per-seed R generated differences |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    families = sorted({f for f, _ in results})
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        seeds = sorted(s for f, s in results if f == family)
        finals = [
            (results[(family, s)].final("selected"), results[(family, s)].final("control"))
            for s in seeds
        ]
        d_rating = [sel.delta - ctl.delta for sel, ctl in finals]
        d_gen = [sel.mean_generated - ctl.mean_generated for sel, ctl in finals]
        m0, lo0, hi0 = paired_interval(d_gen)
        d_hidden = [sel.hidden_generated - ctl.hidden_generated for sel, ctl in finals]
        m1, lo1, hi1 = paired_interval(d_rating)
        m2, lo2, hi2 = paired_interval(d_hidden)
        lifts = diversity = lift_gen = "—"
        base_rows = [_eval_row(results[(family, s)], "base") for s in seeds]
        bases = [b for b in base_rows if b is not None]
        if len(bases) == len(seeds):
            pairs = list(zip(finals, bases, strict=True))
            lift_s = float(np.mean([sel.delta - b.delta for (sel, _), b in pairs]))
            lift_c = float(np.mean([ctl.delta - b.delta for (_, ctl), b in pairs]))
            lifts = f"{_f(lift_s, sign=True)} / {_f(lift_c, sign=True)}"
            up_s = [sel.mean_generated - b.mean_generated for (sel, _), b in pairs]
            up_c = [ctl.mean_generated - b.mean_generated for (_, ctl), b in pairs]
            ms, los, his = paired_interval(up_s)
            lift_gen = (
                f"{_f(ms, sign=True)} [{_f(los, sign=True)}, {_f(his, sign=True)}] / "
                f"{_f(float(np.mean(up_c)), sign=True)}"
            )
            diversity = " · ".join(
                _diversity_kept([(arm_rows[k], b) for arm_rows, b in pairs]) for k in (0, 1)
            )
        observed = sum(math.isfinite(x) for x in d_rating)  # a seed without a difference is not one
        lines.append(
            f"| {family} | {observed} | {_f(m0, sign=True)} [{_f(lo0, sign=True)}, "
            f"{_f(hi0, sign=True)}] | {lift_gen} | {_f(m1, sign=True)} [{_f(lo1, sign=True)}, "
            f"{_f(hi1, sign=True)}] | {_f(m2, 3, True)} [{_f(lo2, 3, True)}, {_f(hi2, 3, True)}]"
            f" | {lifts} | {diversity} | {', '.join(_f(x, 2, True) for x in d_gen)} |"
        )
        x = np.arange(len(seeds))
        ax.bar(x - 0.2, d_gen, width=0.4, color="tab:blue", label="R generated")
        ax.bar(x + 0.2, d_hidden, width=0.4, color="tab:green", label="hidden liking")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=family, xlabel="seed", ylabel="selected − control")
        ax.set_xticks(x, [str(s) for s in seeds])
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "evidence.png", dpi=110)
    plt.close(fig)
    lines += _lift_table(results)
    md = out_dir / "evidence.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def _diversity_kept(pairs: Sequence[tuple[IterationRow, IterationRow]]) -> str:
    """Mean and worst of (arm diversity / base diversity) over seeds, flagged below 80 %."""
    ratios = [row.diversity / base.diversity for row, base in pairs if base.diversity > 0]
    if not ratios:
        return "—"
    flag = "" if min(ratios) >= DIVERSITY_KEPT else " ✗"
    return f"{np.mean(ratios):.0%} [{min(ratios):.0%}]{flag}"


def _eval_row(result: LoopResult, arm: str) -> IterationRow | None:
    rows = [r for r in result.rows if r.arm == arm and r.session == "eval"]
    return rows[0] if rows else None


def _lift_table(results: dict[tuple[str, int], LoopResult]) -> list[str]:
    """The paper's view per arm: Δ = mean rating generated − baseline at each iteration, its
    change from the previous iteration (the paper: +0.20 after iteration 1, +0.39 more after 2),
    and the diversity of the generations relative to the base model's (must stay ≥ 80 %)."""
    lines = [
        "",
        "## Lift per iteration (mean over seeds)",
        "",
        "Δ = mean rating of generations − mean rating of baselines in that iteration's session;",
        "lift = change of Δ from the previous iteration; diversity relative to iteration 0",
        "(the base model), worst seed in brackets.",
        "",
        "| family | arm | iteration | Δ rating | lift vs previous | hidden liking Δ | "
        "diversity / base [worst] |",
        "|---|---|---|---|---|---|---|",
    ]
    families = sorted({f for f, _ in results})
    for family in families:
        seeds = sorted(s for f, s in results if f == family)
        for arm in ("selected", "control"):
            per_seed = [results[(family, s)].iterations(arm) for s in seeds]
            iterations = min(len(rows) for rows in per_seed)
            for it in range(iterations):
                delta = float(np.mean([rows[it].delta for rows in per_seed]))
                hidden = float(
                    np.mean(
                        [rows[it].hidden_generated - rows[it].hidden_baseline for rows in per_seed]
                    )
                )
                ratios = [
                    rows[it].diversity / rows[0].diversity
                    for rows in per_seed
                    if rows[0].diversity > 0
                ]
                lift = (
                    "—"
                    if it == 0
                    else _f(
                        delta - float(np.mean([rows[it - 1].delta for rows in per_seed])), sign=True
                    )
                )
                lines.append(
                    f"| {family} | {arm} | {it} | {_f(delta, sign=True)} | {lift} | "
                    f"{_f(hidden, 3, True)} | {np.mean(ratios):.0%} [{min(ratios):.0%}] |"
                )
    return lines

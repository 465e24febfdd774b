"""The command line: ``demo``, ``evidence`` and ``soak`` (``python -m riffloop.sim``)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

from riffloop.core import NotFoundError, RiffloopError
from riffloop.sim._experiment import DEFAULT_MODEL_DIR, LoopConfig, LoopExperiment, load_inputs
from riffloop.sim._listeners import load_listener_factory
from riffloop.sim._report import (
    format_table,
    read_result,
    save_run,
    write_evidence,
    write_result,
)

# What each LoopConfig field does, for --help (its default is appended).
_HELP = {
    "iterations": "release steps; each arm listens iterations + 1 sessions",
    "n_listeners": "simulated listeners per deployment, bots included",
    "spam_share": "share of the listeners that are bots (rate at random or always the same)",
    "listeners": "listener population, module:function (docs/LISTENERS.md)",
    "n_inputs": "held-out recordings in the input pool",
    "n_merges": "input merges per session (pairs of recordings; one studio user each)",
    "requests_per_merge": "Generate calls per merge and session",
    "ratings_per_listener": "NextTrack calls per listener and session",
    "queue_target_listeners": "the gateway's RIFFLOOP_QUEUE_TARGET_LISTENERS: listens per track",
    "baseline_share": "share of requests served the baseline instead (blind)",
    "similarity": "s: how much of the inputs a generation keeps (injection step t*)",
    "quality": "q: DDIM steps of the injection plan",
    "invert_steps": "DDIM inversion steps (encoder and each version's baseline index)",
    "finetune_steps": "optimizer steps per fine-tune",
    "finetune_batch": "training pairs per fine-tune batch",
    "learning_rate": "fine-tune learning rate (LoRA)",
    "lora_rank": "LoRA rank (0: full fine-tune)",
    "replay_ratio": "share of each batch replayed from the base model's training windows",
    "preference_beta": "exploratory: β of the Diffusion-DPO loss on (winner, loser) pairs of one "
    "input (0: the ω-weighted loss on the winners alone)",
    "train_windows": "exploratory: what a kept track teaches the trainer, its first window "
    "(first) or every window (all)",
    "selection": "exploratory: the selected arm's selector, genetic (winners beat their "
    "baseline; control: as many drawn at random) or weighted (every generation, weighted by its "
    "rating within its input; control: the same weights shuffled within each input)",
    "canary_alpha": "significance level of the canary's test before a promotion",
    "torch_threads": "torch threads per UNet call (the deployments work at once)",
    "input_seconds": "seconds of each input recording uploaded",
    "track_seconds": "requested track length (5.9 s = 4 overlapping windows)",
    "eval_merges": "merges of the final evaluation session (0: none)",
    "eval_requests_per_merge": "Generate calls per merge in the evaluation session",
    "eval_ratings_per_listener": "NextTrack calls per listener in the evaluation session",
}


def _config_args(p: argparse.ArgumentParser, out: Path) -> None:
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="base model folder")
    p.add_argument("--out", type=Path, default=out, help=f"output folder (default {out})")
    for f in fields(LoopConfig):
        if f.name in ("seed", "protocol"):
            continue
        kind = type(f.default)
        flag = "--" + f.name.replace("_", "-")
        text = f"{_HELP.get(f.name, f.name.replace('_', ' '))} (default {f.default})"
        if kind is bool:
            p.add_argument(
                flag,
                type=lambda s: s.lower() in ("1", "true", "yes"),
                default=f.default,
                help=text,
            )
        else:
            p.add_argument(flag, type=kind, default=f.default, help=text)


def _stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stack",
        action="store_true",
        help="run each deployment as the six service processes on the local Kafka, MinIO and "
        "Redis (started as `bin/riffloop stack up` starts them) instead of embedded; listeners "
        "then listen in real time",
    )


def _stack_env(ns: argparse.Namespace) -> dict[str, str] | None:
    """The local infrastructure's settings with --stack (started if it is not running)."""
    if not ns.stack:
        return None
    from riffloop.infra import LocalInfra, default_state_dir

    return LocalInfra(default_state_dir()).start().env()


def _config(ns: argparse.Namespace, seed: int) -> LoopConfig:
    values = {
        f.name: getattr(ns, f.name)
        for f in fields(LoopConfig)
        if f.name not in ("seed", "protocol")
    }
    config = LoopConfig(seed=seed, **values)
    load_listener_factory(config.listeners)  # a bad --listeners fails before the model loads
    return config


def demo(argv: list[str] | None = None) -> int:
    """The demo as a function (the top-level ``./riffloop demo`` calls it)."""
    p = argparse.ArgumentParser(prog="python -m riffloop.sim demo")
    # A user's demo run writes outside the tracked tree; the committed results come from
    # `evidence` (docs/results) or an explicit --out.
    _config_args(p, Path(".riffloop/results"))
    _stack_args(p)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    try:
        config = _config(ns, ns.seed)
    except RiffloopError as exc:
        p.error(exc.reason)  # usage and the reason, exit status 2
    try:
        inputs = load_inputs(config)
        print(f"base model {model_identity(ns.model)} from {ns.model}; {len(inputs)} input songs")
        result = LoopExperiment(
            config,
            inputs,
            progress=lambda s: print(s, flush=True),
            model_dir=ns.model,
            stack=_stack_env(ns),
        ).run()
    except RiffloopError as exc:
        print(f"demo: {exc.reason}", file=sys.stderr)
        return 2
    print()
    print(format_table(result))
    paths = write_result(result, ns.out, stem=f"demo-seed{ns.seed}")
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    print(f"total {result.timings['total']:.0f} s")
    return 0


def model_identity(model_dir: Path) -> str:
    """``<version>:<digest of the UNet weights>``: what a saved run must match to be reused."""
    folder = Path(model_dir)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    card = folder / "model_card.json"
    if not (weights.exists() and card.exists()):
        raise NotFoundError(f"no base model (a MusicDiffusion folder) at {folder}")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    return f"{json.loads(card.read_text()).get('version', '?')}:{digest}"


def evidence(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m riffloop.sim evidence")
    _config_args(p, Path("docs/results"))
    _stack_args(p)
    p.add_argument("--seeds", type=int, default=3, help="how many seeds per family (default 3)")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="run seeds first-seed … first-seed+seeds−1 (default 0); fresh seeds for a "
        "confirmatory run whose count was fixed before it started",
    )
    p.add_argument(
        "--families",
        default="riffloop.sim:bright_dense_listeners,riffloop.sim:dark_sparse_listeners",
        help="comma-separated listener factories",
    )
    ns = p.parse_args(argv)
    if ns.seeds < 1:
        p.error("--seeds must be an integer ≥ 1")
    if ns.first_seed < 0:
        p.error("--first-seed must be an integer ≥ 0")
    try:
        _config(ns, ns.first_seed)
        for spec in ns.families.split(","):
            load_listener_factory(spec)
    except RiffloopError as exc:
        p.error(exc.reason)  # usage and the reason, exit status 2, before anything loads
    results = {}
    try:
        model = model_identity(ns.model)
        for spec in ns.families.split(","):
            family = spec.split(":")[-1].removesuffix("_listeners")
            for seed in range(ns.first_seed, ns.first_seed + ns.seeds):
                config = replace(_config(ns, seed), listeners=spec)
                stem = f"{family}-seed{seed}"
                done = read_result(ns.out / "runs" / f"{stem}.csv", config, model)
                if done is not None:  # finished earlier with this exact config: resume past it
                    print(f"== {family} seed {seed}: reusing {ns.out / 'runs' / stem}.csv")
                    results[(family, seed)] = done
                    continue
                inputs = load_inputs(config)
                print(f"== {family} seed {seed}", flush=True)
                res = LoopExperiment(
                    config,
                    inputs,
                    progress=lambda s: print(s, flush=True),
                    model_dir=ns.model,
                    stack=_stack_env(ns),
                ).run()
                save_run(res, ns.out / "runs", stem=stem, model=model)
                results[(family, seed)] = res
    except RiffloopError as exc:
        print(f"evidence: {exc.reason}", file=sys.stderr)
        return 2
    md = write_evidence(results, ns.out)
    print(md.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from riffloop.sim._soak import soak

    commands = {"demo": demo, "evidence": evidence, "soak": soak}
    if not argv or argv[0] not in commands:
        print("usage: python -m riffloop.sim {demo|evidence|soak} [options]  (--help per command)")
        return 2
    return commands[argv[0]](argv[1:])

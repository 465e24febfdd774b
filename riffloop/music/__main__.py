"""``python -m riffloop.music corpus|train|export|baseline-index`` — build the corpus, train,
export weights, index a model's training windows for the baseline z0.

``train`` also runs data-parallel over several processes, machines or GPUs, launched by torchrun
(or a Kubeflow PyTorchJob, deploy/k8s/training/), e.g.
``torchrun --nproc-per-node 2 -m riffloop.music train --device cpu …``: ``--batch-size`` is the
global batch, shared out among the ranks; rank 0 writes the checkpoint and the export."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from riffloop.core import RiffloopError, ValidationError
from riffloop.music._corpus import (
    build_corpus,
    corpus_dir,
    default_cache_dir,
    load_corpus,
    pack_corpus,
)
from riffloop.music._distributed import TrainingWorld, init_training_world
from riffloop.music._mel import MelConfig
from riffloop.music._model import ModelConfig, MusicDiffusion
from riffloop.music._train import (
    CHECKPOINT_FILE,
    MelDataset,
    Trainer,
    TrainingConfig,
    export_checkpoint,
    resolve_device,
)


def _corpus(args: argparse.Namespace) -> int:
    mel = MelConfig.preset(args.resolution)
    out = build_corpus(
        Path(args.cache) if args.cache else default_cache_dir(),
        mel,
        seed=args.seed,
        workers=args.workers,
        limit=args.limit,
        progress=lambda line: print(line, flush=True),
    )
    print(out)
    return 0


def _mel_dir(args: argparse.Namespace, resolution: int, *, corpus_flag: bool = True) -> Path:
    """``--corpus`` when given, else the cache's ``mel-<r>x<r>`` folder (``--cache`` or the
    default cache)."""
    if corpus_flag and args.corpus:
        return Path(args.corpus)
    return corpus_dir(Path(args.cache) if args.cache else None) / f"mel-{resolution}x{resolution}"


def _pack(args: argparse.Namespace) -> int:
    mel_dir = _mel_dir(args, args.resolution, corpus_flag=False)
    out = pack_corpus(mel_dir, Path(args.out), tuple(args.splits))
    sizes = ", ".join(f"{f.name} {f.stat().st_size / 1e6:.1f} MB" for f in sorted(out.iterdir()))
    print(f"packed {mel_dir} into {out}: {sizes}")
    return 0


def _corpus_dataset(args: argparse.Namespace, resolution: int) -> MelDataset:
    mel = MelConfig.preset(resolution)
    mel_dir = _mel_dir(args, resolution)
    split = load_corpus(mel_dir, "train")
    if split.mel != mel:
        raise ValidationError(f"corpus at {mel_dir} was made with another mel config")
    manifest = json.loads((mel_dir / "manifest.json").read_text())
    return MelDataset.from_images(
        split.images,
        manifest={
            "source": "corpus",
            "corpus": manifest["version"],
            "split": "train",
            "corpus_fingerprint": manifest["fingerprint"],
            "encoding": manifest.get("encoding", "float16"),
        },
    )


def _steps_per_second(
    model: MusicDiffusion,
    data: MelDataset,
    config: TrainingConfig,
    device: torch.device,
    world: TrainingWorld,
) -> float:
    """Time a few steps of a throw-away copy (the real run's RNG streams are untouched). With
    several ranks each times its own share of the batch alone (the all-reduce is not counted)
    and the slowest rank's rate is the world's."""
    share = -(-config.batch_size // world.world_size)
    probe = Trainer(
        copy.deepcopy(model),
        data,
        TrainingConfig(total_steps=100, seed=12345, batch_size=share, lora=config.lora),
        device=device,
    )
    fast = device.type != "cpu"
    for _ in range(10 if fast else 1):  # warm-up (allocator, kernel selection)
        probe.step()
    started = time.monotonic()
    n = 40 if fast else 4
    for _ in range(n):
        probe.step()  # each step reads its loss back, so the device is in sync when it returns
    rate = torch.tensor([n / (time.monotonic() - started)], device=device)
    if world.distributed:
        torch.distributed.all_reduce(rate, op=torch.distributed.ReduceOp.MIN)
    return float(rate.item())


def _say(world: TrainingWorld, message: str) -> None:
    if world.is_main:
        print(message, flush=True)


def _train(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    world, device = init_training_world(args.device)  # one process unless WORLD_SIZE > 1
    try:
        return _train_in(world, device, args)
    finally:
        if world.distributed:
            torch.distributed.destroy_process_group()


def _train_in(world: TrainingWorld, device: torch.device, args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.minutes * 60.0 if args.minutes else None
    out = Path(args.out)
    resume_dir = Path(args.resume) if args.resume else out
    resolution = ModelConfig.preset(args.config).resolution
    data = _corpus_dataset(args, resolution)
    if (resume_dir / CHECKPOINT_FILE).exists():
        trainer = Trainer.resume(resume_dir, data, device=device, world=world)
        _say(
            world, f"resumed {resume_dir} at step {trainer.step_count}/{trainer.config.total_steps}"
        )
    else:
        if args.resume:
            raise ValidationError(f"--resume {resume_dir} holds no checkpoint")
        if args.init:
            model = MusicDiffusion.from_pretrained(args.init)
        else:
            model = MusicDiffusion.create(ModelConfig.preset(args.config), seed=args.seed)
        config = TrainingConfig(
            total_steps=args.steps or 1,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
        )
        if not args.steps:
            if not args.minutes:
                raise ValidationError("give --steps, --minutes or both")
            rate = _steps_per_second(model, data, config, device, world)
            steps = max(1, int(rate * (args.minutes * 60.0 - (time.monotonic() - started))))
            if world.distributed:  # every rank must run the same schedule
                agreed = torch.tensor([steps], device=device)
                torch.distributed.broadcast(agreed, src=0)
                steps = int(agreed.item())
            _say(world, f"measured {rate:.3f} steps/s → schedule of {steps} steps")
            config = TrainingConfig(
                total_steps=steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed
            )
        trainer = Trainer(model, data, config, device=device, world=world)
        _say(
            world,
            f"new run on {device} × {world.world_size}: {model.num_parameters():,} parameters, "
            f"{len(data)} windows, {config.total_steps} steps of batch {config.batch_size}",
        )
    stop_steps = None
    if args.stop_at_step is not None:
        if args.stop_at_step < 1:
            raise ValidationError("--stop-at-step must be at least 1")
        stop_steps = max(0, args.stop_at_step - trainer.step_count)
    report = trainer.train(
        stop_steps,
        deadline=deadline,
        checkpoint_dir=out,
        checkpoint_every_s=args.checkpoint_minutes * 60.0,
        progress=True,
    )
    _say(
        world,
        f"steps {report.start_step}→{report.end_step} in {report.seconds / 60:.1f} min "
        f"({report.steps_per_second:.3f} steps/s), stopped by {report.stopped_by}, "
        f"last loss {report.losses[-1][1] if report.losses else float('nan'):.4f}",
    )
    if args.export and world.is_main:
        export_checkpoint(out, args.export, args.version)
        print(f"exported EMA weights to {args.export}", flush=True)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    """A fine-tune bundle written by the trainer service (riffloop/music/_pytorchjob.py), run
    by every rank of a PyTorchJob under torchrun."""
    from riffloop.music._pytorchjob import run_bundle

    torch.set_num_threads(args.threads)
    world, device = init_training_world(args.device)
    try:
        step = run_bundle(args.bundle, device, world, args.checkpoint_minutes * 60.0)
    finally:
        if world.distributed:
            torch.distributed.destroy_process_group()
    _say(world, f"fine-tune {args.bundle} at step {step} on {device} × {world.world_size}")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.parent is None:
        model = export_checkpoint(args.checkpoint, args.out, args.version)
    else:
        parent = None if args.parent == "none" else args.parent
        model = export_checkpoint(args.checkpoint, args.out, args.version, parent=parent)
    print(
        f"exported {model.version} (parent {model.parent}, "
        f"{model.card['training']['steps']} steps) to {args.out}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Unconditional DDIM samples from seeded noise vs held-out corpus windows: spectral flatness
    of the mel images (and Fréchet distance in the quality embedding when one is available),
    plus a PNG of the samples above held-out windows."""
    import tempfile

    from riffloop.music._ddim import generate
    from riffloop.music._quality import (
        DEFAULT_EMBEDDING_DIR,
        AudioEmbedding,
        frechet_distance,
        spectral_flatness,
    )

    torch.set_num_threads(args.threads)
    if args.checkpoint:
        with tempfile.TemporaryDirectory() as tmp:
            model = export_checkpoint(args.checkpoint, Path(tmp) / "m", "evaluated")
    else:
        model = MusicDiffusion.from_pretrained(args.model)
    model.unet.to(resolve_device(args.device)).eval()
    resolution = model.mel.n_mels
    mel_dir = _mel_dir(args, resolution)
    # The reference windows: held-out (the judgement) or training (for choosing between runs
    # without looking at the held-out set).
    heldout = load_corpus(mel_dir, args.reference)
    started = time.monotonic()
    x_T = torch.randn(
        (args.n, *model.image_shape), generator=torch.Generator().manual_seed(args.seed)
    )
    samples = generate(model, x_T, steps=args.steps)
    seconds = time.monotonic() - started
    top_db = model.mel.top_db
    result: dict[str, object] = {
        "model": model.version,
        "reference": args.reference,
        "steps_trained": model.card.get("training", {}).get("steps"),
        "samples": args.n,
        "ddim_steps": args.steps,
        "sampling_seconds": round(seconds, 1),
        "flatness_samples": round(float(spectral_flatness(samples, top_db=top_db).mean()), 4),
        "flatness_heldout": round(
            float(spectral_flatness(heldout.images, top_db=top_db).mean()), 4
        ),
    }
    embedding_dir = Path(args.embedding) if args.embedding else DEFAULT_EMBEDDING_DIR
    if embedding_dir.exists():
        embedding = AudioEmbedding.load(embedding_dir)
        pick = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(1))
        n_ref = max(args.n, 256)
        reference = embedding.embed(heldout.images[pick[:n_ref]])
        result["fd_embedding"] = round(frechet_distance(embedding.embed(samples), reference), 3)
        # The floor: as many other held-out windows against the same reference.
        others = heldout.images[pick[n_ref : n_ref + args.n]]
        result["fd_embedding_floor"] = round(
            frechet_distance(embedding.embed(others), reference), 3
        )
    print(json.dumps(result))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = 8
        rows = (args.n + cols - 1) // cols + 1
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.3))
        reference = heldout.images[
            torch.randperm(len(heldout), generator=torch.Generator().manual_seed(2))[:cols]
        ]
        tiles = [*samples, *[None] * ((rows - 1) * cols - args.n), *reference]
        for ax, tile in zip(axes.flat, tiles, strict=True):
            ax.axis("off")
            if tile is not None:
                ax.imshow(tile[0].numpy(), origin="lower", cmap="magma", vmin=-1, vmax=1)
        fig.suptitle(
            f"{model.version}: {args.n} samples ({args.steps} DDIM steps); last row held-out"
        )
        fig.savefig(args.png, dpi=80)
        plt.close(fig)
    return 0


def _baseline_index(args: argparse.Namespace) -> int:
    """Invert a strided subset of the corpus's training windows with the model and store the
    index in the model folder (``baseline-index.safetensors``), where the trainer finds it
    when it publishes the folder as the base model."""
    from riffloop.music._training_index import TrainingIndex, base_windows

    torch.set_num_threads(args.threads)
    model = MusicDiffusion.from_pretrained(args.model)
    res = model.image_shape[1]
    split = load_corpus(_mel_dir(args, res), "train")
    if split.mel != model.mel:
        raise ValidationError("the corpus was sliced with another mel config than the model's")
    images, ids = base_windows(split, args.rows)
    started = time.perf_counter()
    index = TrainingIndex.build(model, images, ids, args.steps, model_version=model.version)
    seconds = time.perf_counter() - started
    out = index.save(Path(args.out) if args.out else Path(args.model))
    print(
        json.dumps(
            {
                **index.describe(),
                "corpus_windows": len(split),
                "seconds": round(seconds, 1),
                "file": str(out),
                "file_bytes": out.stat().st_size,
            }
        )
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m riffloop.music", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    corpus = sub.add_parser("corpus", help="render music21's corpus and slice it into mel windows")
    corpus.add_argument("--resolution", type=int, default=64, choices=MelConfig.PRESETS)
    corpus.add_argument("--cache", help="cache folder (default: RIFFLOOP_CACHE or ~/.cache)")
    corpus.add_argument("--workers", type=int, default=2)
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--limit", type=int, help="only the first N pieces (smoke tests)")
    corpus.set_defaults(handler=_corpus)

    pack = sub.add_parser(
        "pack", help="8-bit, xz-compressed copy of the corpus mels (to carry to a GPU machine)"
    )
    pack.add_argument("--resolution", type=int, default=64, choices=MelConfig.PRESETS)
    pack.add_argument("--cache", help="cache folder (default: RIFFLOOP_CACHE or ~/.cache)")
    pack.add_argument("--out", required=True, help="folder for the packed copy")
    pack.add_argument("--splits", nargs="+", default=["train"], choices=["train", "heldout"])
    pack.set_defaults(handler=_pack)

    train = sub.add_parser("train", help="train (or resume training) on the corpus")
    train.add_argument("--config", default="cpu_small", choices=ModelConfig.PRESET_NAMES)
    train.add_argument("--out", required=True, help="checkpoint folder (resumed if it holds one)")
    train.add_argument("--resume", help="resume from this checkpoint folder, write to --out")
    train.add_argument("--init", help="warm-start from a MusicDiffusion folder (fine-tuning)")
    train.add_argument("--steps", type=int, help="schedule length (default: fit --minutes)")
    train.add_argument("--minutes", type=float, help="wall-clock budget; checkpoint and stop")
    train.add_argument(
        "--stop-at-step", type=int, help="stop (checkpoint, export) at this step of the schedule"
    )
    train.add_argument("--checkpoint-minutes", type=float, default=5.0)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=3e-4)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda…")
    train.add_argument("--version", default="base-v2", help="version of the exported model")
    train.add_argument("--export", help="after training, export EMA weights to this folder")
    train.add_argument("--corpus", help="corpus mel folder (default: the cache's)")
    train.add_argument("--cache", help="cache folder (default: RIFFLOOP_CACHE or ~/.cache)")
    train.set_defaults(handler=_train)

    finetune = sub.add_parser(
        "finetune", help="run a fine-tune bundle the trainer service wrote (under torchrun)"
    )
    finetune.add_argument("--bundle", required=True, help="the bundle folder (shared volume)")
    finetune.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    finetune.add_argument("--threads", type=int, default=2)
    finetune.add_argument("--checkpoint-minutes", type=float, default=5.0)
    finetune.set_defaults(handler=_finetune)

    export = sub.add_parser("export", help="write a checkpoint's EMA weights as a model folder")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--version", required=True)
    export.add_argument("--parent", help="override the recorded parent version ('none': no parent)")
    export.set_defaults(handler=_export)

    evaluate = sub.add_parser("evaluate", help="sample unconditionally and compare to held-out")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="MusicDiffusion folder")
    source.add_argument("--checkpoint", help="training checkpoint folder (EMA weights)")
    evaluate.add_argument("--n", type=int, default=16)
    evaluate.add_argument("--steps", type=int, default=50)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--threads", type=int, default=1)
    evaluate.add_argument("--png", help="write a picture of the samples here")
    evaluate.add_argument("--embedding", help="quality embedding folder (default: assets/)")
    evaluate.add_argument("--corpus", help="corpus mel folder (default: the cache's)")
    evaluate.add_argument("--cache", help="cache folder (default: RIFFLOOP_CACHE or ~/.cache)")
    evaluate.add_argument("--device", default="cpu", help="where to sample: cpu, cuda, auto")
    evaluate.add_argument(
        "--reference",
        default="heldout",
        choices=["heldout", "train"],
        help="reference windows for the Fréchet distance (train: to pick between runs)",
    )
    evaluate.set_defaults(handler=_evaluate)

    index = sub.add_parser(
        "baseline-index", help="index a model's base-corpus windows for the baseline z0"
    )
    index.add_argument("--model", required=True, help="MusicDiffusion folder")
    index.add_argument("--out", help="folder for the index (default: the model folder)")
    index.add_argument("--rows", type=int, default=256, help="windows, strided through the split")
    index.add_argument("--steps", type=int, default=50, help="DDIM inversion steps")
    index.add_argument("--threads", type=int, default=2)
    index.add_argument("--corpus", help="corpus mel folder (default: the cache's)")
    index.add_argument("--cache", help="cache folder (default: RIFFLOOP_CACHE or ~/.cache)")
    index.set_defaults(handler=_baseline_index)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except RiffloopError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m riffloop.music.quality_cli train-embedding|report`` — the quality embedding and the
generation quality report.

``train-embedding`` trains the instrument classifier on the corpus's training pieces, measures
held-out-piece accuracy and the sensitivity test (blur, 10 dB noise vs the floor; see
``riffloop.music._quality``), prints the figures and saves weights + report to
``assets/quality-embedding/``.

``report`` draws ``--n`` unconditional samples (``--sampler``: DDIM η = 0 or DPM-Solver++;
``--steps`` steps; seeded x_T) from a model, and prints their Fréchet distance to the held-out
corpus in the embedding (next to the floor), the spectral flatness of generated vs held-out mels,
and the diversity of both; it writes ``sheet.png`` (held-out corpus mels above generated mels)
and a few WAVs to ``--out``.
:func:`quality_report` is the same as a function, for other CLIs (training, the demo).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch

from riffloop.core import RiffloopError, ValidationError
from riffloop.music._corpus import CorpusPiece, CorpusSplit, corpus_dir, load_corpus
from riffloop.music._ddim import SAMPLERS, generate
from riffloop.music._mel import MelCodec
from riffloop.music._model import MusicDiffusion
from riffloop.music._quality import (
    DEFAULT_EMBEDDING_DIR,
    AudioEmbedding,
    diversity,
    frechet_distance,
    noise_to_snr,
    spectral_flatness,
    train_embedding,
    validate_embedding,
)
from riffloop.music._train import resolve_device


def _default_mel_dir(resolution: int = 64) -> Path:
    return corpus_dir() / f"mel-{resolution}x{resolution}"


def noisy_heldout_images(
    split: CorpusSplit, mel_dir: Path, snr_db: float, seed: int
) -> torch.Tensor:
    """Re-make each held-out window from its rendered audio with white noise at ``snr_db``."""
    audio_dir = Path(mel_dir).parent / "audio"
    codec = MelCodec(split.mel)
    size = split.mel.slice_samples
    rng = np.random.default_rng(seed)
    cache: dict[tuple[int, int], np.ndarray] = {}
    windows = np.zeros((len(split), size), dtype=np.float32)
    for i in range(len(split)):
        key = (int(split.pieces[i]), int(split.instruments[i]))
        if key not in cache:
            piece = CorpusPiece(split.piece_ids[key[0]], "", "", ())
            path = audio_dir / piece.render_name(split.instrument_names[key[1]])
            cache[key] = soundfile.read(path, dtype="float32")[0]
        w = int(split.windows[i])
        windows[i] = cache[key][w * size : (w + 1) * size]
    noisy = noise_to_snr(windows, snr_db, rng)
    return codec.audio_to_images(noisy.reshape(-1))


def _train_embedding(args: argparse.Namespace) -> int:
    mel_dir = Path(args.corpus) if args.corpus else _default_mel_dir()
    train = load_corpus(mel_dir, "train")
    heldout = load_corpus(mel_dir, "heldout")
    print(
        f"corpus {mel_dir}: {len(train)} train / {len(heldout)} held-out windows, "
        f"instruments {train.instrument_names}",
        flush=True,
    )
    torch.manual_seed(args.seed)
    emb = train_embedding(
        train.images,
        train.instruments,
        train.instrument_names,
        epochs=args.epochs,
        samples_per_epoch=args.samples_per_epoch,
        seed=args.seed,
        max_seconds=args.max_seconds,
        progress=lambda line: print(line, flush=True),
    )
    return _validate_and_save(emb, heldout, mel_dir, args)


def _validate_and_save(
    emb: AudioEmbedding, heldout: CorpusSplit, mel_dir: Path, args: argparse.Namespace
) -> int:
    noisy = noisy_heldout_images(heldout, mel_dir, 10.0, args.seed)
    report = validate_embedding(
        emb, heldout.images, heldout.instruments, noisy, clips=64, draws=args.draws, seed=args.seed
    )
    out = emb.save(args.out)
    print(json.dumps(report.to_dict(), indent=2))
    print(f"saved to {out}")
    ok = report.blur_ratio >= 5 and report.noise_ratio >= 5
    print(
        f"held-out accuracy {report.heldout_accuracy:.3f}; FD floor {report.fd_floor_mean:.3f} "
        f"± {report.fd_floor_std:.3f}; blur σ={report.blur_sigma_frames:g} frames "
        f"{report.fd_blur:.3f} ({report.blur_ratio:.1f}×; by σ {report.blur_ratio_by_sigma}), "
        f"10 dB noise {report.fd_noise_10db:.3f} ({report.noise_ratio:.1f}×): "
        f"{'sensitive' if ok else 'NOT sensitive enough (< 5×)'}"
    )
    return 0 if ok else 1


def _validate_embedding(args: argparse.Namespace) -> int:
    """Re-measure a saved embedding (no training) and rewrite its report."""
    mel_dir = Path(args.corpus) if args.corpus else _default_mel_dir()
    heldout = load_corpus(mel_dir, "heldout")
    emb = AudioEmbedding.load(args.out)
    return _validate_and_save(emb, heldout, mel_dir, args)


def _save_sheet(corpus: torch.Tensor, generated: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(8, corpus.shape[0], generated.shape[0])
    fig, axes = plt.subplots(2, cols, figsize=(1.6 * cols, 3.6), squeeze=False)
    for row, (name, imgs) in enumerate((("held-out corpus", corpus), ("generated", generated))):
        for c in range(cols):
            ax = axes[row][c]
            ax.imshow(imgs[c, 0].numpy(), origin="lower", cmap="magma", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quality_report(
    model: MusicDiffusion,
    heldout: CorpusSplit,
    embedding: AudioEmbedding,
    *,
    n: int = 64,
    steps: int = 50,
    seed: int = 0,
    out_dir: Path | None = None,
    wavs: int = 4,
    sampler: str = "ddim",
) -> dict[str, Any]:
    """Generate ``n`` unconditional clips and measure them against the held-out corpus."""
    if n < 2:
        raise ValidationError("the report needs at least 2 generated clips")
    shape = model.image_shape
    x_t = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    images = generate(model, x_t, steps, sampler=sampler).clamp(-1, 1)
    gen_feats = embedding.embed(images)
    ref_feats = embedding.embed(heldout.images)
    pick = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(seed + 1))
    ref_sample = heldout.images[pick[:n]]
    top_db = model.mel.top_db
    result: dict[str, Any] = {
        "model": model.version,
        "clips": n,
        "steps": steps,
        "sampler": sampler,
        "fd": frechet_distance(gen_feats, ref_feats),
        "fd_floor": embedding.report.fd_floor_mean,
        "flatness_generated": float(spectral_flatness(images, top_db=top_db).mean()),
        "flatness_heldout": float(spectral_flatness(heldout.images, top_db=top_db).mean()),
        "diversity_generated": diversity(images, embedding),
        "diversity_heldout": diversity(ref_sample, embedding),
        "predicted_instruments": {
            name: int((embedding.predict(images) == i).sum())
            for i, name in enumerate(embedding.instrument_names)
        },
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _save_sheet(ref_sample, images, out_dir / "sheet.png")
        codec = MelCodec(model.mel)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gen_audio = codec.images_to_audio(images[:wavs])
            ref_audio = codec.images_to_audio(ref_sample[:wavs])
        for i in range(min(wavs, n)):
            soundfile.write(out_dir / f"generated-{i}.wav", gen_audio[i], model.mel.sample_rate)
            soundfile.write(out_dir / f"heldout-{i}.wav", ref_audio[i], model.mel.sample_rate)
        (out_dir / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _report(args: argparse.Namespace) -> int:
    model = MusicDiffusion.from_pretrained(args.model)
    mel_dir = Path(args.corpus) if args.corpus else _default_mel_dir(model.mel.n_mels)
    heldout = load_corpus(mel_dir, "heldout")
    if heldout.mel != model.mel:
        raise ValidationError(f"corpus at {mel_dir} was made with another mel config")
    embedding = AudioEmbedding.load(args.embedding)
    if args.draws < 1:
        raise ValidationError("--draws must be at least 1")
    model.unet.to(resolve_device(args.device))
    out = Path(args.out)
    r = quality_report(
        model,
        heldout,
        embedding,
        n=args.n,
        steps=args.steps,
        seed=args.seed,
        out_dir=out,
        sampler=args.sampler,
    )
    # FD from n clips is noisy (the floor's own spread is in the embedding report): more draws
    # of n clips each, from seeds seed+1…, give its mean and spread (reference embedded once).
    fds = [r["fd"]]
    reference = embedding.embed(heldout.images) if args.draws > 1 else torch.empty(0)
    for k in range(1, args.draws):
        x_t = torch.randn(
            args.n, *model.image_shape, generator=torch.Generator().manual_seed(args.seed + k)
        )
        images = generate(model, x_t, args.steps, sampler=args.sampler).clamp(-1, 1)
        fds.append(frechet_distance(embedding.embed(images), reference))
    print(f"model {r['model']}: {r['clips']} clips, {r['steps']} {args.sampler} steps")
    if args.draws > 1:
        mean = float(np.mean(fds))
        print(
            f"  Fréchet distance to held-out: {mean:.3f} ± {float(np.std(fds)):.3f} over "
            f"{args.draws} draws of {args.n} clips (floor {r['fd_floor']:.3f}; "
            f"{mean / r['fd_floor']:.2f}× the floor); draws {[round(x, 2) for x in fds]}"
        )
    else:
        print(f"  Fréchet distance to held-out: {r['fd']:.3f} (floor {r['fd_floor']:.3f})")
    print(
        f"  spectral flatness: generated {r['flatness_generated']:.4f}, "
        f"held-out {r['flatness_heldout']:.4f}"
    )
    print(
        f"  diversity: generated {r['diversity_generated']:.3f}, "
        f"held-out {r['diversity_heldout']:.3f}"
    )
    print(f"  instruments heard in the samples: {r['predicted_instruments']}")
    print(f"  wrote {out / 'sheet.png'}, WAVs and report.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m riffloop.music.quality_cli")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-embedding", help="train + validate the quality embedding")
    t.add_argument("--corpus", help="mel folder (default: the cache's corpus mel-64x64)")
    t.add_argument("--out", default=str(DEFAULT_EMBEDDING_DIR))
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--samples-per-epoch", type=int, default=4096)
    t.add_argument("--max-seconds", type=float, default=None)
    t.add_argument("--draws", type=int, default=20)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_train_embedding)
    v = sub.add_parser("validate-embedding", help="re-measure a saved embedding's report")
    v.add_argument("--corpus", help="mel folder (default: the cache's corpus mel-64x64)")
    v.add_argument("--out", default=str(DEFAULT_EMBEDDING_DIR))
    v.add_argument("--draws", type=int, default=20)
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=_validate_embedding)
    r = sub.add_parser("report", help="FD / flatness / diversity of a model's samples")
    r.add_argument("--model", default="assets/base-model")
    r.add_argument("--corpus")
    r.add_argument("--embedding", default=str(DEFAULT_EMBEDDING_DIR))
    r.add_argument("--n", type=int, default=64)
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="out/quality")
    r.add_argument("--draws", type=int, default=1, help="draws of --n clips for the FD's mean")
    r.add_argument("--device", default="cpu", help="where to sample (cpu, cuda)")
    r.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    r.set_defaults(func=_report)
    args = parser.parse_args(argv)
    torch.set_num_threads(getattr(args, "threads", 2))
    try:
        return int(args.func(args))
    except RiffloopError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

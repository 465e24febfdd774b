"""How far a fine-tune moves the baseline index: Γ's argmax over rows carried over from the
parent (inverted by P) against the same rows re-inverted by the child C.

The release cycle re-inverts every row of Z_V for each new version (``TrainingIndex.next_version``),
which costs rows × steps UNet calls per release. This measures what that buys: for merges of
held-out recordings inverted by C (the generator's z_agg), the share whose baseline z0 is the
same row under both indexes, and how much Γ(z_agg, z0) differs.

    bin/riffloop python scripts/index_drift.py [--rows 256] [--steps 20] [--queries 64]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from riffloop.loop import CycleSettings
from riffloop.music import (
    MelDataset,
    MusicDiffusion,
    Trainer,
    TrainingIndex,
    base_windows,
    image_from_uint8,
    invert,
    load_corpus,
    merge_latents,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("assets/base-model"))
    p.add_argument(
        "--corpus", type=Path, default=Path.home() / ".cache/riffloop/corpus-v1/mel-64x64"
    )
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--train", type=int, default=12, help="training pairs (held-out windows)")
    p.add_argument("--finetune-steps", type=int, default=60)
    p.add_argument("--generations", type=int, default=2, help="fine-tunes in a row")
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args()
    torch.set_num_threads(2)
    parent = MusicDiffusion.from_pretrained(ns.model)
    train = load_corpus(ns.corpus, "train")
    held = load_corpus(ns.corpus, "heldout")
    images, ids = base_windows(train, ns.rows)
    g = torch.Generator().manual_seed(ns.seed)
    pick = torch.randperm(held.images.shape[0], generator=g)
    targets = held.images[pick[: ns.train]]
    songs = held.images[pick[ns.train : ns.train + 2 * ns.queries]]
    t0 = time.perf_counter()
    stale = TrainingIndex.build(parent, images, ids, ns.steps, model_version="P")
    print(f"index of {ns.rows} rows × {ns.steps} steps: {time.perf_counter() - t0:.1f} s")
    model = parent
    for gen in range(1, ns.generations + 1):
        # the trainer service's recipe (riffloop.loop.CycleSettings' defaults)
        config = CycleSettings(finetune_steps=ns.finetune_steps).training_config(gen, replay=True)
        data = MelDataset.from_images(targets)
        replay = MelDataset.from_images(image_from_uint8(images))
        t0 = time.perf_counter()
        trainer = Trainer(copy.deepcopy(model), data, config, replay)
        trainer.train()
        child = trainer.ema_model(f"C{gen}")
        print(f"fine-tune {gen}: {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        fresh = TrainingIndex.build(child, images, ids, ns.steps, model_version=f"C{gen}")
        print(f"re-inverted index: {time.perf_counter() - t0:.1f} s")
        s = songs
        z = invert(child, s, ns.steps).reshape(ns.queries, 2, *s.shape[1:])
        z_agg = torch.stack([merge_latents(pair) for pair in z])
        same, gaps, best = 0, [], []
        for q in z_agg:
            a = fresh.index.nearest(q, k=1)[0]
            b = stale.index.nearest(q, k=1)[0]
            same += a.row == b.row
            # Γ under the fresh index of the row the stale one picks: how much worse z0 is
            gaps.append(a.score - fresh._gamma(q, b.row))
            best.append(a.score)
        gaps_t = torch.tensor(gaps)
        print(
            f"generation {gen}: same z0 for {same}/{ns.queries} merges "
            f"({100 * same / ns.queries:.0f} %); Γ lost where they differ: median "
            f"{gaps_t[gaps_t > 0].median().item() if (gaps_t > 0).any() else 0.0:.4f}, max "
            f"{gaps_t.max().item():.4f} (Γ of z0: median {torch.tensor(best).median().item():.4f})"
        )
        model = child


if __name__ == "__main__":
    main()

"""What one fine-tune of the loop's recipe does to the model's denoising error, with and without
the preference loss (riffloop/music/_train.py, docs/LOOP.md §5).

Eight windows of the shipped baseline index play the winners x^w, eight others the losers x^l,
80 more the replay, and 32 more are held out. After the trainer's recipe (LoRA rank 8, 60 steps,
batch 8, lr 5e-4, half replay), d_θ(x) = ‖v − v_θ(x_t, t)‖² − ‖v − v_ref(x_t, t)‖² (the parent is
the reference; below 0: the fine-tune predicts x better than the parent did) is averaged over
four seeded draws of (t, ε) for each group. β = 0 is the plain fine-tune toward the winners.

The pairs are arbitrary windows, not a taste: this measures how far each β moves the model, and
whether it damages windows it never saw (d_θ(held-out) > 0), not whether it learns a taste.

    bin/riffloop python scripts/preference_fit.py [--betas 0 2500 10000] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from riffloop.loop import CycleSettings
from riffloop.music import MelDataset, MusicDiffusion, Trainer, image_from_uint8


def denoising_gap(trainer: Trainer, images: torch.Tensor) -> float:
    """Mean d_θ over ``images`` and four seeded draws of (t, ε)."""
    model = trainer.model
    gaps = []
    for draw in range(4):
        g = torch.Generator().manual_seed(100 + draw)
        t = torch.randint(0, 1000, (images.shape[0],), generator=g)
        eps = torch.randn(images.shape, generator=g)
        x_t, target = trainer.noised(images, eps, t)
        with torch.no_grad():
            own = ((model.unet(x_t, t).sample - target) ** 2).mean(dim=(1, 2, 3))
            parent = ((trainer.reference_prediction(x_t, t) - target) ** 2).mean(dim=(1, 2, 3))
        gaps.append(own - parent)
    return float(torch.stack(gaps).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="assets/base-model")
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 2500.0, 10000.0])
    p.add_argument("--steps", type=int, default=60)
    ns = p.parse_args()
    torch.set_num_threads(1)
    base = MusicDiffusion.from_pretrained(ns.model)
    if base.baseline_index is None or len(base.baseline_index) < 128:
        raise SystemExit(f"{ns.model}: needs a baseline index of at least 128 windows")
    windows = image_from_uint8(base.baseline_index.images[:128])
    order = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    winners, losers = windows[order[:8]], windows[order[8:16]]
    replay = MelDataset.from_images(windows[order[16:96]])
    held_out = windows[order[96:]]
    for beta in ns.betas:
        model = MusicDiffusion.from_pretrained(ns.model)
        pairs = MelDataset.from_images(
            winners, torch.ones(8), {"preference_fit": beta}, losers if beta > 0 else None
        )
        # the trainer service's recipe (riffloop.loop.CycleSettings' defaults)
        recipe = CycleSettings(finetune_steps=ns.steps, preference_beta=beta)
        config = recipe.training_config(seed=0, replay=True, preference=beta > 0)
        trainer = Trainer(model, pairs, config, replay)
        started = time.monotonic()
        trainer.train(progress=False)
        trainer.model.unet.eval()
        row = {
            "beta": beta,
            "d_winners": denoising_gap(trainer, winners),
            "d_losers": denoising_gap(trainer, losers),
            "d_held_out": denoising_gap(trainer, held_out),
            "train_s": round(time.monotonic() - started, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

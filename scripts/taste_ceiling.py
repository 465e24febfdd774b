"""How much of a taste can one fine-tune of the loop's recipe carry to new generations, when the
winners are picked by the taste itself, not by ratings? The ceiling of the paper's loop.

The evidence (docs/results/services) measures the whole loop: listeners rate through the
gateway, the feedback service weighs them, the selector keeps the winners, the trainer
fine-tunes. A miss there can come from the ratings (noise, bots, few listeners per track) or
from the fine-tune (16 windows may not teach a taste that new merges show). This script takes
the ratings out. Per seed k of the random-taste population (riffloop.sim._random_taste):

1. 16 held-out recordings of seed k (``load_inputs``, as the loop's studio users upload them),
   inverted by the model that serves the request (20 DDIM steps, the encoder's setting in the
   loop, which re-inverts every upload for a new version).
2. A training session: 8 merges × 6 requests = 48 generations (s = 0.5, q = 20, the loop's
   plan) of one mel window each, or with ``--track-seconds 5.9`` of the loop's length as the
   generator service makes them; the trainer learns from a track's first window alone. The
   population's taste space is calibrated on these 48 clips, as the listeners calibrate it on
   what they hear first; u_j is the seed's liking of clip j.
3. Two training sets of K windows: ORACLE, the K highest u (the best a perfect rating could
   select); RANDOM, K drawn at random (the control arm). Each fine-tunes a copy of the base
   model with the trainer's recipe (``CycleSettings`` defaults: LoRA rank 8, 60 steps, batch 8,
   lr 5e-4, half of each batch replayed from the base rows of the baseline index).
4. An evaluation session: 8 fresh merges × 6 requests, the same songs, windows and seeds for
   BASE, ORACLE and RANDOM; mean u of each model's 48 clips.

Printed per seed (one JSON line): the training sets' mean u (the selection differential S),
the evaluation means, each fine-tune's diversity on the evaluation requests over BASE's (mean
pairwise distance of the quality embedding, as the loop reports it), and the transfer ratio
(ORACLE − RANDOM at evaluation) / S. A ratio near 0 means the fine-tune does not carry what the
winners share to new merges, whatever the ratings; then better ratings cannot help, and the
levers are in the fine-tune.

    bin/riffloop python scripts/taste_ceiling.py [--seeds 900 901 902] [--pairs 16]
        [--steps 60] [--learning-rate 5e-4] [--replay-ratio 0.5] [--lora-rank 8]
        [--track-seconds 5.9 [--all-windows]] [--weighted TAU [--within-merge]]
        [--advantage] [--max-timestep T] [--similarity s]

``--weighted τ`` trains both fine-tunes on all 48 clips: ORACLE with ω_j = exp((u_j − max u)/τ)
(reward-weighted; τ = 1 keeps an effective sample of ≈ 48/e clips, like the 16 picks), RANDOM
with the same weights permuted at random. The two then differ only in which clip weighs what,
so whatever the fine-tune does to any set of the model's own clips is common to both.
``--within-merge`` takes each clip's u relative to its merge's mean (what the request drew, not
which songs were merged) and permutes the weights within each merge; ``--advantage`` trains
every clip with signed, zero-sum weights a_j = standardised u (``AdvantageTrainer``), so a move
all clips share has no first-order gradient. ``--max-timestep T`` fine-tunes on noise levels
t ≤ T only (the loop's plan injects at t* = 500). ``--similarity s`` generates every session
with that s (0.5, the loop's, by default): a lower s leaves more of each track to the model.
Each row also reports ``between_merge_share``, the share of the training clips' u variance
between merges.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import math
import time
from typing import cast

import numpy as np
import soundfile
import torch

from riffloop.core import ValidationError
from riffloop.loop import CycleSettings
from riffloop.music import (
    InjectionPlan,
    MelCodec,
    MelDataset,
    MusicDiffusion,
    MusicGenerator,
    TrackLength,
    TrackRequest,
    Trainer,
    decode_latents,
    diversity,
    generate_long,
    image_from_uint8,
    merge_latents,
    min_snr_weights,
    track_noise,
    weighted_diffusion_loss,
)
from riffloop.sim import LoopConfig
from riffloop.sim._experiment import load_inputs
from riffloop.sim._random_taste import RANK, TasteSpace, default_clip_vector

MERGES = 8
REQUESTS_PER_MERGE = 6
INVERT_STEPS = 20  # LoopConfig.invert_steps
TRACKS = MERGES * REQUESTS_PER_MERGE


def song_audio(config: LoopConfig, rate: int) -> list[np.ndarray]:
    """The input recordings' samples (``load_inputs``: the loop's studio uploads)."""
    out = []
    for song in load_inputs(config):
        samples, song_rate = soundfile.read(io.BytesIO(song.wav), dtype="float32")
        if song_rate != rate:
            raise SystemExit(f"input at {song_rate} Hz; the model expects {rate}")
        out.append(samples)
    return out


def session(n_songs: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """MERGES pairs of distinct songs, REQUESTS_PER_MERGE requests each: (song a, song b, seed)."""
    requests = []
    for _ in range(MERGES):
        a, b = rng.choice(n_songs, size=2, replace=False)
        for _ in range(REQUESTS_PER_MERGE):
            requests.append((int(a), int(b), int(rng.integers(1, 2**31 - 1))))
    return requests


def likings(
    space: TasteSpace,
    model: MusicDiffusion,
    songs: list[np.ndarray],
    requests: list[tuple[int, int, int]],
    learn: bool,
    track_seconds: float = 0.0,
    similarity: float = 0.5,
) -> tuple[torch.Tensor, np.ndarray]:
    """(windows [N, n, 1, H, W], u per clip) of ``model``'s tracks for ``requests``: each
    track's n windows as ``generate_long`` laid them out (n = 1 for one window). As in
    the loop, the songs are inverted by the model that serves the request (the encoder
    re-inverts every upload for a new version), and the seed picks each song's window and the
    noise ε. ``track_seconds`` 0: one window (``MusicGenerator``); else the generator service's
    long tracks (``generate_long``: window 0 injected, each later one continuing the last)."""
    generator = MusicGenerator(model, steps=INVERT_STEPS)
    latents = [generator.encode_audio(x) for x in songs]
    plan = InjectionPlan.from_similarity(similarity, 20)  # LoopConfig's quality q

    def z(a: int, b: int, seed: int) -> torch.Tensor:
        return torch.stack([latents[i][seed % latents[i].shape[0]] for i in (a, b)])

    rate = model.mel.sample_rate
    if not track_seconds:
        tracks = generator.generate(
            [TrackRequest(latents=z(a, b, seed), plan=plan, seed=seed) for a, b, seed in requests]
        )
        u = np.array([space.liking(t.audio, rate, learn=learn) for t in tracks])
        return torch.stack([t.image for t in tracks]).unsqueeze(1), u
    length = TrackLength.for_seconds(track_seconds, model.mel)
    codec = MelCodec(model.mel)
    windows, u_list = [], []
    for chunk in range(0, len(requests), 8):  # the generator's batches
        part = requests[chunk : chunk + 8]
        z_agg = torch.stack([merge_latents(z(a, b, seed)) for a, b, seed in part])
        noise = torch.stack(
            [track_noise(tuple(model.image_shape), length.windows, seed) for _, _, seed in part]
        )
        merged = decode_latents(model, z_agg, INVERT_STEPS)
        images = generate_long(model, merged, plan, length, noise, top_db=model.mel.top_db)
        for image in images:
            audio = codec.track_to_audio(image)
            u_list.append(space.liking(audio, rate, learn=learn))
            windows.append(length.windows_of(image))
    return torch.stack(windows), np.array(u_list)


class AdvantageTrainer(Trainer):
    """The ω-weighted fine-tune with signed weights a_j (``--advantage``): the training clips'
    loss is Σ a_j · w(t) · ‖ε − ε_θ‖² over the batch's count, not its Σ ω, so with Σ a_j = 0
    a move every clip shares (self-training on the model's own output) has no first-order
    gradient, and clips below the mean are pushed away from. Replay rows keep their weight.
    One process only (no distributed shard)."""

    advantages: torch.Tensor

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n_replay = self.config.replay_per_batch
        idx = self._data_sampler.take(self.config.batch_size - n_replay)
        images, omega = [self.data.images[idx]], [self.advantages[idx]]
        if n_replay and self.replay is not None and self._replay_sampler is not None:
            ridx = self._replay_sampler.take(n_replay)
            images.append(self.replay.images[ridx])
            omega.append(self.replay.weights[ridx] * self.config.replay_weight)
        return torch.cat(images).float(), torch.cat(omega).float()

    def compute_loss(
        self, x0: torch.Tensor, omega: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        g = generator if generator is not None else self.noise_generator
        n = x0.shape[0]
        t = torch.randint(0, self._t_bound, (n,), generator=g, device=g.device)
        noise = torch.randn(x0.shape, generator=g, device=g.device)
        x_t, target = self.noised(x0, noise, t)
        out = self._forward(x_t, t).sample
        w = min_snr_weights(
            self._alphas_cumprod, t, self.config.min_snr_gamma, self.model.prediction_type
        )
        return weighted_diffusion_loss(out, target, w, omega, torch.tensor(float(n)))


def fine_tuned(
    base: MusicDiffusion,
    images: torch.Tensor,
    replay: MelDataset,
    recipe: CycleSettings,
    seed: int,
    weights: torch.Tensor | None = None,
    max_timestep: int | None = None,
    advantages: torch.Tensor | None = None,
) -> MusicDiffusion:
    """A copy of ``base`` fine-tuned on ``images`` (with ω = ``weights``, else 1) with the
    trainer's ``recipe`` (its noise levels t ≤ ``max_timestep`` when given); signed
    ``advantages`` instead of ω train with ``AdvantageTrainer``."""
    config = recipe.training_config(seed=seed, replay=recipe.replay_ratio > 0)
    config = dataclasses.replace(config, max_timestep=max_timestep)
    if advantages is not None:
        data = MelDataset.from_images(images, None, {"taste_ceiling": seed})
        trainer: Trainer = AdvantageTrainer(copy.deepcopy(base), data, config, replay)
        cast(AdvantageTrainer, trainer).advantages = advantages.float()
    else:
        data = MelDataset.from_images(images, weights, {"taste_ceiling": seed})
        trainer = Trainer(copy.deepcopy(base), data, config, replay)
    trainer.train(progress=False)
    model = trainer.ema_model("candidate")  # LoRA merged, as the trainer serves it
    model.unet.eval()
    return model


def one_seed(
    base: MusicDiffusion,
    replay: MelDataset,
    recipe: CycleSettings,
    seed: int,
    pairs: int,
    track_seconds: float = 0.0,
    all_windows: bool = False,
    weighted: float = 0.0,
    within_merge: bool = False,
    max_timestep: int | None = None,
    advantage: bool = False,
    similarity: float = 0.5,
) -> dict:
    started = time.monotonic()
    songs = song_audio(LoopConfig(seed=seed), base.mel.sample_rate)
    rng = np.random.default_rng([seed, 11])
    train_requests = session(len(songs), rng)
    eval_requests = session(len(songs), rng)
    # the seed's taste, drawn as random_taste_population draws it
    d = np.random.default_rng(np.random.SeedSequence([seed, 9_241])).normal(size=RANK)
    space = TasteSpace(d, default_clip_vector())
    images, u = likings(
        space, base, songs, train_requests, True, track_seconds, similarity
    )  # calibrates on these 48
    oracle = np.argsort(-u)[:pairs]
    drawn = rng.choice(len(u), size=pairs, replace=False)
    # --weighted τ: every clip, ω_j = exp((u_j − max u)/τ) (reward-weighted), against the same
    # clips with those weights permuted at random: the arms differ only in which clip weighs what
    # --within-merge: u relative to its merge's mean (what the model, not the input songs,
    # decided), the weights permuted within each merge
    merge_of = np.arange(len(u)) // REQUESTS_PER_MERGE
    merge_mean = np.array([u[merge_of == m].mean() for m in merge_of])
    tilt = u - merge_mean if within_merge else u
    if advantage:  # signed: a_j = (tilt_j − mean) / sd, Σ a_j = 0 (with --within-merge per merge)
        centred = tilt - tilt.mean()
        w_oracle = centred / centred.std()
    else:
        w_oracle = np.exp((tilt - tilt.max()) / weighted) if weighted else None
    w_random = None
    if w_oracle is not None:
        if within_merge:
            w_random = w_oracle.copy()
            for m in range(MERGES):
                at = np.flatnonzero(merge_of == m)
                w_random[at] = w_oracle[rng.permutation(at)]
        else:
            w_random = rng.permutation(w_oracle)
    row: dict = {
        "seed": seed,
        "pairs": pairs if not weighted else None,  # every clip trains when weighted
        "steps": recipe.finetune_steps,
        "learning_rate": recipe.learning_rate,
        "replay_ratio": recipe.replay_ratio,
        "lora_rank": recipe.lora_rank,
        "track_seconds": track_seconds,
        "all_windows": all_windows,
        "weighted_tau": weighted,
        "within_merge": within_merge,
        "max_timestep": max_timestep,
        "advantage": advantage,
        "similarity": similarity,
        # share of the training clips' u variance between merges (the input songs' part)
        "between_merge_share": float(merge_mean.var() / u.var()),
    }
    row["train_u"] = {"all": u.mean(), "oracle": u[oracle].mean(), "random": u[drawn].mean()}
    if advantage and w_oracle is not None and w_random is not None:
        # a_j-weighted mean u over Σ|a_j| (the clips pulled toward minus those pushed from)
        row["train_u"] |= {
            "oracle": float((w_oracle * u).sum() / np.abs(w_oracle).sum()),
            "random": float((w_random * u).sum() / np.abs(w_random).sum()),
        }
    elif w_oracle is not None and w_random is not None:
        row["train_u"] |= {
            "oracle": float((w_oracle * u).sum() / w_oracle.sum()),
            "random": float((w_random * u).sum() / w_random.sum()),
        }
        row["effective_n"] = float(w_oracle.sum() ** 2 / (w_oracle**2).sum())
    embedding = space.clip_vector.embedding
    base_images, base_u = likings(
        space, base, songs, eval_requests, False, track_seconds, similarity
    )
    base_images = base_images[:, 0]
    row["eval_u"] = {"base": base_u.mean()}
    row["diversity_vs_base"] = {}
    for name, picked, w in (("oracle", oracle, w_oracle), ("random", drawn, w_random)):
        omega = None
        if w is not None:  # every clip, weighted
            picked = np.arange(len(u))
            per_window = images.shape[1] if all_windows else 1
            omega = torch.tensor(np.repeat(w, per_window), dtype=torch.float32)
        # the trainer's target is a track's first window; --all-windows trains on every one
        chosen = images[picked] if all_windows else images[picked, :1]
        model = fine_tuned(
            base,
            chosen.flatten(0, 1),
            replay,
            recipe,
            seed,
            None if advantage else omega,
            max_timestep,
            omega if advantage else None,  # signed a_j
        )
        eval_images, eval_u = likings(
            space, model, songs, eval_requests, False, track_seconds, similarity
        )
        eval_images = eval_images[:, 0]  # diversity on first windows, as the loop reports it
        row["eval_u"][name] = eval_u.mean()
        if embedding is not None:  # the loop's diversity: mean pairwise embedding distance
            row["diversity_vs_base"][name] = diversity(eval_images, embedding) / diversity(
                base_images, embedding
            )
    s = row["train_u"]["oracle"] - row["train_u"]["random"]
    moved = row["eval_u"]["oracle"] - row["eval_u"]["random"]
    row["selection_differential"] = s
    row["oracle_minus_random"] = moved
    row["oracle_minus_base"] = row["eval_u"]["oracle"] - row["eval_u"]["base"]
    row["transfer"] = moved / s if s else math.nan
    row["seconds"] = round(time.monotonic() - started, 1)
    return row


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, float | np.floating):
        return round(float(value), 4)
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="assets/base-model")
    p.add_argument("--seeds", type=int, nargs="+", default=[900, 901, 902])
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument(
        "--track-seconds",
        type=float,
        default=0.0,
        help="0: one window (1.49 s); else tracks of this length as the generator makes them "
        "(the loop's are 5.9 s)",
    )
    # the fine-tune's recipe: riffloop.loop.CycleSettings' defaults unless given
    p.add_argument("--steps", type=int, default=CycleSettings.finetune_steps)
    p.add_argument("--learning-rate", type=float, default=CycleSettings.learning_rate)
    p.add_argument("--replay-ratio", type=float, default=CycleSettings.replay_ratio)
    p.add_argument("--lora-rank", type=int, default=CycleSettings.lora_rank)
    p.add_argument(
        "--all-windows",
        action="store_true",
        help="train on every window of a picked track (the trainer uses its first window only)",
    )
    p.add_argument(
        "--weighted",
        type=float,
        default=0.0,
        metavar="TAU",
        help="train on every clip with ω = exp(u/τ) (ORACLE) against the same clips with those "
        "weights permuted (RANDOM), instead of the top --pairs against --pairs drawn at random",
    )
    p.add_argument(
        "--within-merge",
        action="store_true",
        help="with --weighted: weigh each clip by its u relative to its merge's mean, and "
        "permute the weights within each merge for RANDOM",
    )
    p.add_argument(
        "--max-timestep",
        type=int,
        default=None,
        metavar="T",
        help="fine-tune on noise levels t ≤ T only (the loop's s = 0.5, q = 20 injects at 500)",
    )
    p.add_argument(
        "--advantage",
        action="store_true",
        help="train every clip with a signed weight a_j = standardised u (centred per merge "
        "with --within-merge), Σ a_j = 0; RANDOM the same a_j permuted",
    )
    p.add_argument(
        "--similarity",
        type=float,
        default=LoopConfig.similarity,
        help="s of every generation's injection plan (q = 20): lower s leaves more of each "
        "track to the model",
    )
    ns = p.parse_args()
    try:
        InjectionPlan.from_similarity(ns.similarity, 20)
    except ValidationError as exc:
        raise SystemExit(f"taste_ceiling: {exc.reason}") from None
    if ns.advantage and not ns.weighted:
        ns.weighted = 1.0  # every clip, as --weighted; τ is not used
    if ns.max_timestep is not None and not 0 <= ns.max_timestep < 1000:
        raise SystemExit("--max-timestep must be a noise level in 0–999")
    if ns.within_merge and not ns.weighted:
        raise SystemExit("--within-merge needs --weighted")
    if ns.weighted < 0:
        raise SystemExit("--weighted must be a positive τ (0: off)")
    if ns.all_windows and not ns.track_seconds:
        raise SystemExit("--all-windows needs --track-seconds (a one-window clip has one window)")
    if not 2 <= ns.pairs <= TRACKS // 2:
        raise SystemExit(f"--pairs must lie in 2–{TRACKS // 2}")
    try:
        recipe = CycleSettings(
            finetune_steps=ns.steps,
            learning_rate=ns.learning_rate,
            replay_ratio=ns.replay_ratio,
            lora_rank=ns.lora_rank,
            lora_alpha=max(ns.lora_rank, 1),
        )
    except ValidationError as exc:
        raise SystemExit(f"taste_ceiling: {exc.reason}") from None
    torch.set_num_threads(1)
    base = MusicDiffusion.from_pretrained(ns.model)
    base.unet.eval()
    index = base.baseline_index
    if index is None:
        raise SystemExit(f"{ns.model}: needs a baseline index (its base rows are the replay)")
    rows = [i for i, row_id in enumerate(index.ids) if not row_id.startswith("track:")]
    replay = MelDataset.from_images(image_from_uint8(index.images[rows]))
    for seed in ns.seeds:
        row = one_seed(
            base,
            replay,
            recipe,
            seed,
            ns.pairs,
            ns.track_seconds,
            ns.all_windows,
            ns.weighted,
            ns.within_merge,
            ns.max_timestep,
            ns.advantage,
            ns.similarity,
        )
        print(json.dumps(_rounded(row)), flush=True)


if __name__ == "__main__":
    main()

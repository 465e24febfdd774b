"""The embedded demo: the whole loop in one process, a SELECTED arm against a random CONTROL arm.

Per iteration k = 0 … K, for each arm (iteration 0 is shared: both arms start from the base model):

1. Requests: every input merge (a pair of held-out clips) gets ``requests_per_merge`` requests; the
   ``Dispatcher`` answers each blind with the baseline z0 = argmax_z Γ(z_agg, z) over the training
   pool (p = 0.25) or a generation by ``inject_at_step`` (s, q) with a per-request seed. Request ids
   and seeds are the same in both arms (common random numbers).
2. Listeners (a plug-in population, 20 % bots) hear a random subset of the tracks plus repeated
   baselines (consistency probes); ratings and listen events go through the ``FeedbackLedger``.
3. ``SpamFilter`` → ρ, ``ConfidenceWeight`` → R, ω per track; the paper's table row.
4. Selection: SELECTED keeps generations with R > R_b(input) (``GeneticSelector``, ω as loss
   weight, purge at the boundary); CONTROL draws the same number of its own generations at random
   (ω = 1). Both fine-tune with the same budget, seed, replay data and LoRA settings.
5. The next iteration's generations pass the offline gate (FD and diversity against the parent's
   and, from the second fine-tune on, the base model's iteration-0 generations);
   a rejected candidate is replaced by its parent, and the canary compares the candidate's
   scores with the parent's on the same requests (Mann-Whitney, one-sided) before promotion.

After the last iteration, an evaluation session (rows with ``session == "eval"``) serves fresh
requests — merges no iteration used — from the base model and from the model each arm ended up
serving (a rolled-back candidate is not it), with the same request ids, seeds and listener state
for all three. The evidence's paired selected − control difference is read from these rows: a
between-arm comparison on identical requests, not on two sessions' different draws.

Nothing here sees the listeners' hidden tastes except the evaluation column "hidden liking"
(mean u over honest listeners), which is what the ratings are supposed to move.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from riffloop.core import MemoryObjectStore, PermanentError, ValidationError
from riffloop.loop import (
    Canary,
    CanaryDecision,
    ConfidenceWeight,
    Dispatcher,
    FeedbackLedger,
    GateReport,
    GeneticSelector,
    ListenEvent,
    ModelRecord,
    ModelRegistry,
    Observation,
    OfflineGate,
    PurgeCycle,
    RandomSelector,
    Rating,
    SpamFilter,
    SpamReport,
    TrackKind,
    TrackProvenance,
    TrackScored,
    TrainingPair,
    VersionStatus,
    auto_near_duplicate,
    baseline_scores,
    model_score_by_input,
    welch_ci,
)
from riffloop.sim._listeners import (
    Listener,
    ListenerFactory,
    TasteListener,
    audio_features,
    checked_answer,
    load_listener_factory,
    make_population,
)

Progress = Callable[[str], None]
_EVAL_SESSION = 10_000  # the listening session number of the evaluation (iterations are 0 … K)
DEFAULT_MODEL_DIR = Path("assets/base-model")


@dataclass(frozen=True)
class LoopConfig:
    """Demo parameters. Defaults aim at ≤ 20 min on 2 CPU cores with the 64 × 64 model."""

    iterations: int = 2  # fine-tuning rounds; the table has iterations + 1 rows per arm
    n_listeners: int = 50
    spam_share: float = 0.2
    listeners: str = "riffloop.sim:bright_dense_listeners"
    seed: int = 0
    n_inputs: int = 16  # held-out clips in the input pool
    n_merges: int = 8  # input merges (pairs of clips)
    # 12 requests per merge: ≈ 9 generations compete for each input, and R_b rests on ≈ 3
    # baseline tracks instead of ≈ 1.5 (at 6, some inputs fell back to the pooled baseline
    # mean); 48 ratings per listener keep ≈ 25 ratings per track.
    requests_per_merge: int = 12
    ratings_per_listener: int = 48  # tracks each listener hears per iteration
    probes_per_listener: int = 2  # re-served baselines (consistency checks)
    baseline_share: float = 0.25
    similarity: float = 0.5
    quality: int = 20
    invert_steps: int = 20
    baseline_pool: int = 128  # training windows indexed for z0
    replay_pool: int = 512
    finetune_steps: int = 60
    finetune_batch: int = 8
    learning_rate: float = 5e-4
    lora_rank: int = 8
    replay_ratio: float = 0.5
    spam_filter: bool = True
    uniform_omega: bool = False
    purge: bool = True
    canary_alpha: float = 0.05
    gate_fd_increase: float = 0.25
    gate_diversity_drop: float = 0.15
    torch_threads: int = 2
    # The evaluation session after the last iteration: fresh requests (new merges of the same
    # inputs) served by the base model and by each arm's serving model, with the same request ids,
    # seeds, dispatch and listener states for all three (common random numbers). 0 merges: off.
    eval_merges: int = 16
    eval_requests_per_merge: int = 6
    eval_ratings_per_listener: int = 48
    # What a saved run was made with, beyond these numbers (a run is reused only when equal):
    # 1 = sessions 2–6; 2 = LoRA adapters seeded from the fine-tuning seed (session 7), so both
    # arms' fine-tunes start from one adapter and a run repeats exactly; 3 = (session 8) a
    # listener draws the same random numbers whether it skipped or not (the arms stay paired),
    # training ω used relative to their mean (ω / ω̄: replay_ratio alone sets the training
    # data's share, whatever the level of ω), the control arm fine-tunes on as many random
    # generations as the selected arm had pairs — none when it had none — and listeners see
    # opaque track ids; 4 = (session 9) 12 requests per merge and 48 ratings per listener (a
    # stronger selection per iteration at the same ratings per track), and the gate also tests
    # a candidate against the base model's generations (drift cannot compound over iterations).
    protocol: int = 4

    def __post_init__(self) -> None:
        """Every field in its range, so a bad ``--flag`` fails before the model loads."""
        at_least = {
            "iterations": 1,
            "n_listeners": 1,
            "seed": 0,
            "n_inputs": 2,  # a merge pairs two clips
            "n_merges": 1,
            "requests_per_merge": 1,
            "ratings_per_listener": 1,
            "probes_per_listener": 0,
            "quality": 1,
            "invert_steps": 1,
            "baseline_pool": 1,
            "replay_pool": 1,
            "finetune_steps": 1,
            "finetune_batch": 1,
            "lora_rank": 1,
            "torch_threads": 1,
            "eval_merges": 0,  # 0: no evaluation session
            "eval_requests_per_merge": 1,
            "eval_ratings_per_listener": 1,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValidationError(f"{name} must be an integer ≥ {low}, got {value!r}")
        shares: dict[str, tuple[float, float, bool]] = {  # name: (low, high, high included?)
            "spam_share": (0.0, 1.0, False),
            "baseline_share": (0.0, 1.0, True),
            "similarity": (0.0, 1.0, False),
            "replay_ratio": (0.0, 1.0, False),
            "canary_alpha": (0.0, 1.0, False),
            "learning_rate": (0.0, 1.0, True),
            "gate_fd_increase": (0.0, math.inf, False),
            "gate_diversity_drop": (0.0, 1.0, True),
        }
        for name, (floor, ceiling, closed) in shares.items():
            value = getattr(self, name)
            inside = floor <= value <= ceiling if closed else floor <= value < ceiling
            if not (isinstance(value, int | float) and math.isfinite(value) and inside):
                bracket = "]" if closed else ")"
                raise ValidationError(
                    f"{name} must lie in [{floor:g}, {ceiling:g}{bracket}, got {value!r}"
                )
        if self.canary_alpha == 0 or self.learning_rate == 0:
            raise ValidationError("canary_alpha and learning_rate must be above 0")


@dataclass
class LoopWorld:
    """What the loop needs from the ML side: a model and clips (mel images in [−1, 1])."""

    model: Any  # riffloop.music.MusicDiffusion
    inputs: torch.Tensor  # held-out clips [N, 1, H, W]
    train_images: torch.Tensor  # training windows [M, 1, H, W] (baseline pool + replay)
    reference: torch.Tensor  # held-out clips for the gate's reference statistics


@dataclass(frozen=True)
class IterationRow:
    """One row of the paper's table."""

    arm: str
    iteration: int
    model_version: str
    ratings_used: int
    mean_generated: float
    mean_baseline: float
    delta: float
    delta_lo: float
    delta_hi: float
    diversity: float
    spam_caught: int
    spammers: int
    false_alarms: int
    hidden_generated: float  # mean hidden liking u of generations (honest listeners)
    hidden_baseline: float
    train_pairs: int
    gate: str
    canary: str
    seconds: float
    session: str = "train"  # "train": an iteration's own session; "eval": the evaluation session


@dataclass
class LoopResult:
    config: LoopConfig
    rows: list[IterationRow] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    registry_versions: list[dict[str, Any]] = field(default_factory=list)

    def final(self, arm: str) -> IterationRow:
        """The arm's last row: its evaluation-session row when there is one (the model the arm
        ended up serving, measured on the shared evaluation requests), else its last iteration."""
        rows = [r for r in self.rows if r.arm == arm]
        evaluated = [r for r in rows if r.session == "eval"]
        return (evaluated or rows)[-1]

    def iterations(self, arm: str) -> list[IterationRow]:
        return [r for r in self.rows if r.arm == arm and r.session == "train"]


# -- quality functions (the ML core's when present) ----------------------------------------------
def _quality(
    image_size: tuple[int, int],
) -> tuple[Callable[[torch.Tensor], np.ndarray], Callable[..., float], Callable[..., float], str]:
    """(embed(images) → [N, D], frechet(a, b), diversity(e), name).

    The ML core's trained ``AudioEmbedding`` (assets/quality-embedding) with its
    ``frechet_distance``; diversity is its definition (mean pairwise Euclidean distance of the
    embeddings) applied to embeddings already computed. When no embedding was trained for this
    image size, the coarse mel statistics of design.md §7 (per-bin mean and std of the image)
    stand in, with the exact Fréchet formula — the name says which was used."""
    from riffloop.core import NotFoundError
    from riffloop.music import AudioEmbedding, frechet_distance

    def frechet(a: np.ndarray, b: np.ndarray) -> float:
        return float(frechet_distance(torch.as_tensor(a), torch.as_tensor(b)))

    try:
        embedder = AudioEmbedding.load()
    except NotFoundError:
        embedder = None
    if embedder is not None and tuple(embedder.image_size) == tuple(image_size):

        def embed(images: torch.Tensor) -> np.ndarray:
            return embedder.embed(images).numpy()

        return embed, frechet, _mean_pairwise_distance, "AudioEmbedding (instrument CNN)"
    return _mel_stats_embedding, frechet, _mean_pairwise_distance, "mel statistics (fallback)"


def _mel_stats_embedding(images: torch.Tensor) -> np.ndarray:
    x = images.detach().to(torch.float32).squeeze(1)  # [N, mels, time]
    return torch.cat([x.mean(dim=2), x.std(dim=2)], dim=1).numpy().astype(np.float64)


def _mean_pairwise_distance(e: np.ndarray) -> float:
    e = np.asarray(e, dtype=np.float64)
    if len(e) < 2:
        return 0.0
    d = np.sqrt(((e[:, None, :] - e[None, :, :]) ** 2).sum(-1))
    return float(d[np.triu_indices(len(e), 1)].mean())


# -- the world ----------------------------------------------------------------------------------
def load_world(config: LoopConfig, model_dir: Path = DEFAULT_MODEL_DIR) -> LoopWorld:
    """The base model and held-out / training clips of the corpus it was trained on."""
    from riffloop.music import MusicDiffusion
    from riffloop.music._corpus import corpus_dir, load_corpus

    if not Path(model_dir).is_dir() or not any(Path(model_dir).iterdir()):
        raise PermanentError(
            f"no base model at {model_dir}: train one (`python -m riffloop.music train`) or pass "
            "--model PATH"
        )
    model = MusicDiffusion.from_pretrained(model_dir)
    res = model.image_shape[1]  # from_pretrained returns the UNet in eval mode
    mel_dir = corpus_dir() / f"mel-{res}x{res}"
    heldout = load_corpus(mel_dir, "heldout")
    train = load_corpus(mel_dir, "train")
    rng = np.random.default_rng(config.seed)
    # inputs: one window per distinct held-out piece where possible (spread over pieces)
    order = rng.permutation(len(heldout))
    seen: set[int] = set()
    picks: list[int] = []
    for i in order:
        piece = int(heldout.pieces[i])
        if piece not in seen or len(seen) >= len(heldout.piece_ids):
            seen.add(piece)
            picks.append(int(i))
        if len(picks) == config.n_inputs:
            break
    rest = [int(i) for i in order if int(i) not in set(picks)][:256]
    n_train = min(len(train), config.baseline_pool + config.replay_pool)
    train_idx = rng.choice(len(train), size=n_train, replace=False)
    return LoopWorld(
        model=model,
        inputs=heldout.images[picks],
        train_images=train.images[train_idx],
        reference=heldout.images[rest],
    )


# -- one arm's state ------------------------------------------------------------------------------
@dataclass
class _Arm:
    name: str
    model: Any
    listeners: list[Listener]
    ledger: FeedbackLedger
    pairs: list[TrainingPair] = field(default_factory=list)
    parent_embeddings: np.ndarray | None = None
    parent_scores: dict[str, float] = field(default_factory=dict)  # request → R of parent
    clock: dict[str, float] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)  # listener answers refused, by reason
    # one registry per arm: each arm is its own lineage with its own serving version
    registry: ModelRegistry = field(default_factory=lambda: ModelRegistry(MemoryObjectStore()))


class LoopExperiment:
    """Runs the demo; ``run()`` returns a ``LoopResult`` (printed as the paper's table)."""

    def __init__(
        self,
        config: LoopConfig,
        world: LoopWorld,
        factory: ListenerFactory | None = None,
        progress: Progress = print,
    ) -> None:
        self.cfg = config
        self.world = world
        self.factory = factory or load_listener_factory(config.listeners)
        self.progress = progress
        shape = (int(world.inputs.shape[-2]), int(world.inputs.shape[-1]))
        self.embed, self.frechet, self.diversity, self.embedding_name = _quality(shape)
        self.dispatcher = Dispatcher(config.baseline_share, key=config.seed)
        self.images: dict[str, torch.Tensor] = {}
        self.audio: dict[str, np.ndarray] = {}
        self.embeddings: dict[str, np.ndarray] = {}
        self.features: dict[str, Any] = {}
        self.provenance: dict[str, TrackProvenance] = {}
        # What a listener is shown instead of our track id, which names the arm, session and
        # model: a keyed hash of the request slot (session, merge, request), so the same request
        # has the same public id in both arms (pairing) and says nothing about kind or model.
        self.public_ids: dict[str, str] = {}
        self.made_at: dict[str, int] = {}  # model version → the iteration that fine-tuned it
        self._id_key = hashlib.sha256(f"riffloop-public-id/{config.seed}".encode()).digest()
        self._merged_images: dict[tuple[str, tuple[Any, ...]], torch.Tensor] = {}

    # 1. set-up ---------------------------------------------------------------------------------
    def _prepare(self) -> None:
        from riffloop.sim._ml import BaselineIndex, MelCodec, invert

        cfg, world = self.cfg, self.world
        self.codec = MelCodec(world.model.mel)
        self.sr = world.model.mel.sample_rate
        t0 = time.monotonic()
        pool = world.train_images[: cfg.baseline_pool]
        self.replay = world.train_images[cfg.baseline_pool :]
        if len(self.replay) == 0:
            self.replay = pool
        self.pool_images = pool
        # Γ is computed on the base model's latents: the baseline of an input merge is a fixed
        # training sample, the same in every iteration and arm.
        self.pool_latents = invert(world.model, pool, cfg.invert_steps)
        self.baseline_index = BaselineIndex(
            self.pool_latents.flatten(1), [f"train-{i:04d}" for i in range(len(pool))]
        )
        self.input_latents = invert(world.model, world.inputs, cfg.invert_steps)
        rng = np.random.default_rng(cfg.seed + 1)
        n = len(world.inputs)
        merges: set[tuple[int, int]] = set()
        while len(merges) < min(cfg.n_merges, n * (n - 1) // 2):
            a, b = sorted(int(x) for x in rng.choice(n, size=2, replace=False))
            merges.add((a, b))
        self.merges = sorted(merges)
        self.reference_embeddings = self.embed(world.reference)
        self.progress(f"quality embedding: {self.embedding_name}")
        self.timings["prepare"] = time.monotonic() - t0
        self.progress(
            f"prepared: {len(pool)} training latents indexed, {n} inputs inverted, "
            f"{len(self.merges)} merges ({self.timings['prepare']:.0f} s)"
        )

    def _z_agg(self, merge: tuple[int, int]) -> torch.Tensor:
        from riffloop.sim._ml import merge_latents

        return merge_latents(self.input_latents[list(merge)]).unsqueeze(0)  # z_agg [1, C, h, w]

    # 2. serving one session ---------------------------------------------------------------------
    def _serve(
        self,
        arm: _Arm,
        label: str,
        merges: Sequence[tuple[int, int]] | None = None,
        requests_per_merge: int | None = None,
    ) -> list[str]:
        """Answer ``requests_per_merge`` requests per merge (ids ``{label}-m{m}-r{r}``) with
        ``arm.model``; returns the track ids in request order. The generated tracks of a session
        are denoised as one batch, each from its own request's seeded ε, so a track does not
        depend on which other requests share its batch."""
        from riffloop.sim._ml import InjectionPlan, decode_latents, inject_at_step

        cfg = self.cfg
        merges = list(self.merges if merges is None else merges)
        per_merge = cfg.requests_per_merge if requests_per_merge is None else requests_per_merge
        plan = InjectionPlan.from_similarity(cfg.similarity, cfg.quality)
        z_aggs = torch.cat([self._z_agg(merge) for merge in merges])
        # x̂_0(z_agg) of every merge in one deterministic (η = 0) batch, once per model version
        key = (arm.model.version, tuple(merges))
        if key not in self._merged_images:
            self._merged_images[key] = decode_latents(arm.model, z_aggs, cfg.invert_steps)
        merged = self._merged_images[key]
        # the same request in two arms, or under two model versions of one arm (a canary that
        # hands the iteration back to the parent), must not collide: the arm and the model
        # version are part of the track id (the generation seed is not: CRN)
        version_tag = hashlib.sha256(arm.model.version.encode()).hexdigest()[:4]
        served: list[tuple[TrackProvenance, int, str]] = []  # (provenance, merge index, z0 id)
        for m, merge in enumerate(merges):
            sample_id = self.baseline_index.nearest(z_aggs[m : m + 1])[0].id  # argmax_z Γ(z_agg, z)
            for r in range(per_merge):
                prov = self.dispatcher.dispatch(
                    f"{label}-m{m}-r{r}",
                    [f"in{merge[0]}", f"in{merge[1]}"],
                    cfg.similarity,
                    cfg.quality,
                    arm.model.version,
                    plan.start_step,
                    _constant(sample_id),
                )
                track_id = f"{arm.name[0]}{label}-{version_tag}-{prov.track_id[:12]}"
                self.public_ids[track_id] = self._public_id(f"{label}-m{m}-r{r}")
                served.append((replace(prov, track_id=track_id), m, sample_id))
        # baselines are training windows; generations are overwritten below, as one batch
        images = torch.stack(
            [self.pool_images[int(sample_id.split("-")[1])] for _, _, sample_id in served]
        )
        generated = [i for i, (prov, _, _) in enumerate(served) if prov.kind is TrackKind.GENERATED]
        if generated:
            noise = torch.cat([_request_noise(arm.model, served[i][0].seed) for i in generated])
            merged_in = merged[[served[i][1] for i in generated]]
            images[generated] = inject_at_step(arm.model, merged_in, plan, noise=noise)
        self._add_tracks(arm, [prov for prov, _, _ in served], images)
        return [prov.track_id for prov, _, _ in served]

    def _add_tracks(
        self, arm: _Arm, provenances: Sequence[TrackProvenance], images: torch.Tensor
    ) -> None:
        audio = self.codec.images_to_audio(images).astype(np.float32)
        embeddings = self.embed(images)
        for k, prov in enumerate(provenances):
            self.provenance[prov.track_id] = prov
            self.images[prov.track_id] = images[k]
            self.audio[prov.track_id] = audio[k]
            self.features[prov.track_id] = audio_features(audio[k], self.sr)
            self.embeddings[prov.track_id] = embeddings[k]
            arm.ledger.register_track(prov, audio[k].size / self.sr)

    def _public_id(self, slot: str) -> str:
        return hashlib.blake2b(slot.encode(), digest_size=8, key=self._id_key).hexdigest()

    # 3. listening ---------------------------------------------------------------------------------
    def _listen(
        self,
        arm: _Arm,
        session: int,
        track_ids: list[str],
        ratings_per_listener: int | None = None,
    ) -> None:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, session, 99])  # same draws in both arms
        per_listener = (
            cfg.ratings_per_listener if ratings_per_listener is None else ratings_per_listener
        )
        baselines = [t for t in track_ids if self.provenance[t].kind is TrackKind.BASELINE]
        refused_before = arm.refused.total()
        for li, listener in enumerate(arm.listeners):
            lid = listener.listener_id
            k = min(per_listener, len(track_ids))
            chosen = [track_ids[int(i)] for i in rng.choice(len(track_ids), size=k, replace=False)]
            for p in range(min(cfg.probes_per_listener, len(baselines))):
                original = self.provenance[baselines[int(rng.integers(len(baselines)))]]
                probe = replace(original, track_id=f"{original.track_id}-p{li}-{p}")
                self.public_ids[probe.track_id] = self._public_id(
                    f"{self.public_ids[original.track_id]}-p{li}-{p}"
                )
                self.provenance[probe.track_id] = probe
                self.audio[probe.track_id] = self.audio[original.track_id]
                arm.ledger.register_track(probe, self.audio[probe.track_id].size / self.sr)
                chosen.insert(int(rng.integers(len(chosen) + 1)), probe.track_id)
            t = arm.clock.get(lid, float(rng.uniform(0, 60)))
            for tid in chosen:
                audio = self.audio[tid]
                clip = audio.size / self.sr
                arm.ledger.mark_served(tid, lid, t)
                try:
                    answer = listener.listen(self.public_ids[tid], audio, self.sr)
                except Exception as exc:  # a bug in the plug-in: stop, naming it
                    raise ValidationError(
                        f"listener {lid} ({type(listener).__name__}) raised "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                try:
                    stars, seconds, elapsed = checked_answer(answer, clip)
                except ValidationError as exc:  # refused as the gateway refuses a client's
                    arm.refused[exc.reason] += 1
                    continue
                t += elapsed
                arm.ledger.listen(
                    ListenEvent(tid, lid, seconds, clip, seconds >= clip, seconds < clip, t)
                )
                if stars is not None:
                    arm.ledger.rate(Rating(tid, lid, stars, t))
            arm.clock[lid] = t + 3600.0  # an hour between sessions
        refused = arm.refused.total() - refused_before
        if refused:
            reasons = "; ".join(f"{why} ×{k}" for why, k in arm.refused.most_common(3))
            self.progress(f"[{arm.name}] refused {refused} listener answers ({reasons})")

    # 4. scoring and the table row ---------------------------------------------------------------
    def _score(
        self, arm: _Arm, track_ids: list[str]
    ) -> tuple[dict[str, TrackScored], SpamReport, list[Observation]]:
        observations = arm.ledger.observations()
        report = SpamFilter(enabled=self.cfg.spam_filter).inspect(observations)
        current = set(track_ids) | {
            t for t in self.provenance if any(t.startswith(f"{x}-p") for x in track_ids)
        }
        now = [o for o in observations if o.track_id in current]
        scores = ConfidenceWeight(uniform=self.cfg.uniform_omega).score(now, report)
        return scores, report, now

    def _hidden(self, listeners: Sequence[Listener], track_ids: Sequence[str]) -> float:
        honest = [x for x in listeners if isinstance(x, TasteListener)]
        if not honest or not track_ids:
            return math.nan
        return float(np.mean([[x.liking(self.features[t]) for x in honest] for t in track_ids]))

    def _row(
        self,
        arm: _Arm,
        iteration: int,
        track_ids: list[str],
        scores: dict[str, TrackScored],
        report: SpamReport,
        now: list[Observation],
        extra: dict[str, Any],
    ) -> IterationRow:
        trusted = [o for o in now if report.reliability.get(o.rater_id, 1.0) > 0]
        gen = [o.stars for o in trusted if o.kind is TrackKind.GENERATED]
        base = [o.stars for o in trusted if o.kind is TrackKind.BASELINE]
        delta, lo, hi = welch_ci(gen, base)
        gen_ids = [t for t in track_ids if self.provenance[t].kind is TrackKind.GENERATED]
        base_ids = [t for t in track_ids if self.provenance[t].kind is TrackKind.BASELINE]
        kinds = {x.listener_id: getattr(x, "kind", "unknown") for x in arm.listeners}
        spammers = {k for k, v in kinds.items() if v not in ("honest", "unknown")}
        caught = set(report.caught)
        return IterationRow(
            arm=arm.name,
            iteration=iteration,
            model_version=arm.model.version,
            ratings_used=len(trusted),
            mean_generated=float(np.mean(gen)) if gen else math.nan,
            mean_baseline=float(np.mean(base)) if base else math.nan,
            delta=delta,
            delta_lo=lo,
            delta_hi=hi,
            diversity=float(self.diversity(np.stack([self.embeddings[t] for t in gen_ids]))),
            spam_caught=len(caught & spammers),
            spammers=len(spammers),
            false_alarms=len(caught - spammers),
            hidden_generated=self._hidden(arm.listeners, gen_ids),
            hidden_baseline=self._hidden(arm.listeners, base_ids),
            train_pairs=len(arm.pairs),
            gate=str(extra.get("gate", "—")),
            canary=str(extra.get("canary", "—")),
            seconds=float(extra.get("seconds", 0.0)),
        )

    # 5. fine-tuning -------------------------------------------------------------------------------
    def _finetune(self, arm: _Arm, pairs: list[TrainingPair], iteration: int) -> Any:
        from riffloop.sim._ml import LoraSettings, MelDataset, Trainer, TrainingConfig

        cfg = self.cfg
        images = torch.stack([self.images[p.target_track_id] for p in pairs])
        weights = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
        data = MelDataset.from_images(
            images, weights, {"trainset": f"{arm.name}-it{iteration}", "pairs": len(pairs)}
        )
        replay = MelDataset.from_images(self.replay, manifest={"replay": "base corpus"})
        config = TrainingConfig(
            total_steps=cfg.finetune_steps,
            batch_size=cfg.finetune_batch,
            learning_rate=cfg.learning_rate,
            warmup_fraction=0.1,
            ema_decay=0.0,  # a short fine-tune: keep the final weights
            replay_ratio=cfg.replay_ratio,
            lora=LoraSettings(rank=cfg.lora_rank, alpha=cfg.lora_rank),
            seed=cfg.seed * 1000 + iteration,  # the same in both arms
            log_every=max(1, cfg.finetune_steps // 4),
        )
        model = copy.deepcopy(arm.model)
        trainer = Trainer(model, data, config, replay=replay)
        trainer.train(progress=False)
        version = f"{arm.name}-v{iteration + 1}"
        self.made_at[version] = iteration + 1
        tuned = trainer.ema_model(version=version)
        tuned.parent = arm.model.version
        return tuned

    # 6. the loop --------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        cfg = self.cfg
        torch.set_num_threads(cfg.torch_threads)
        result = LoopResult(cfg)
        self.timings = result.timings
        started = time.monotonic()
        # the listener population first: a bad --n-listeners / --spam-share fails before minutes
        # of preparation (inversion of every input) are spent
        listeners = make_population(self.factory, cfg.n_listeners, cfg.spam_share, cfg.seed)
        self._prepare()
        base = self.world.model
        shared = _Arm("selected", base, listeners, FeedbackLedger())

        # iteration 0, shared by both arms
        t0 = time.monotonic()
        tracks0 = self._serve(shared, "it0")
        self._listen(shared, 0, tracks0)
        scores0, report0, now0 = self._score(shared, tracks0)
        self.timings["iteration0"] = time.monotonic() - t0
        arms = {
            "selected": shared,
            "control": _Arm(
                "control",
                base,
                copy.deepcopy(listeners),
                FeedbackLedger.restore(shared.ledger.snapshot()),
                clock=dict(shared.clock),
            ),
        }
        # the evaluation session starts every model from this same listener and ledger state
        eval_start = (copy.deepcopy(listeners), shared.ledger.snapshot(), dict(shared.clock))
        for arm in arms.values():
            arm.registry.register(ModelRecord(base.version, None, None, VersionStatus.SERVING))
        state = {name: (tracks0, scores0, report0, now0) for name in arms}
        # The generations and scores of the model each arm serves: what the gate and the canary
        # compare a candidate with (after a rollback, ``state`` holds the rolled-back candidate's
        # tracks, which are no longer the parent's).
        served = {name: (tracks0, scores0) for name in arms}
        for name, arm in arms.items():
            row = self._row(arm, 0, tracks0, scores0, report0, now0, {"seconds": 0.0})
            result.rows.append(replace(row, arm=name))
        self.progress(_progress_line(result.rows[0], "base model, shared by both arms"))

        for iteration in range(1, cfg.iterations + 1):
            budget = 0
            for name in ("selected", "control"):
                arm = arms[name]
                t1 = time.monotonic()
                tracks, scores, _, _ = state[name]
                gen_ids = [t for t in tracks if self.provenance[t].kind is TrackKind.GENERATED]
                # 4. selection → training set
                if name == "selected":
                    selector = GeneticSelector(cap_per_input=3)
                    sel = selector.select(
                        scores,
                        {t: self.provenance[t] for t in scores},
                        self.embeddings,
                        iteration,
                    )
                    candidates = arm.pairs + sel.pairs
                    if cfg.purge:
                        delta = auto_near_duplicate([self.embeddings[t] for t in gen_ids])
                        current = model_score_by_input(scores, arm.model.version, self.provenance)
                        arm.pairs = (
                            PurgeCycle(max_age=2, near_duplicate=delta, cap_per_input=3)
                            .apply(candidates, iteration, current)
                            .kept
                        )
                    else:
                        arm.pairs = candidates
                    budget = len(arm.pairs)
                else:
                    # the same budget as the selected arm, none when it kept its model
                    arm.pairs = (
                        RandomSelector(cfg.seed * 1000 + iteration).select(
                            [self.provenance[t] for t in gen_ids],
                            self.embeddings,
                            budget,
                            iteration,
                        )
                        if budget
                        else []
                    )
                if not arm.pairs:
                    why = (
                        "no generation beat its baseline"
                        if name == "selected"
                        else "no budget (the selected arm had no pairs)"
                    )
                    self.progress(f"{name}: {why}; keeping the model")
                    tuned = arm.model
                else:
                    tuned = self._finetune(arm, arm.pairs, iteration - 1)
                    arm.registry.register(
                        ModelRecord(
                            tuned.version,
                            arm.model.version,
                            f"{name}-it{iteration - 1}",
                            VersionStatus.CANDIDATE,
                        )
                    )
                t_ft = time.monotonic() - t1
                # 5. generate with the candidate, gate against the parent's generations
                parent, parent_tracks = arm.model, served[name][0]
                arm.model = tuned
                new_tracks = self._serve(arm, f"it{iteration}")
                gate_note = "—"
                if tuned is not parent:
                    # the base model's own generations bound the drift over iterations
                    base_tracks = tracks0 if parent is not base else None
                    report_g = self._gate(parent_tracks, new_tracks, base_tracks)
                    arm.registry.gate(tuned.version, report_g)
                    gate_note = (
                        "pass" if report_g.passed else "reject:" + ",".join(report_g.reasons)
                    )
                    if not report_g.passed:
                        arm.model = parent
                        new_tracks = self._serve(arm, f"it{iteration}")
                self._listen(arm, iteration, new_tracks)
                scores_n, report_n, now_n = self._score(arm, new_tracks)
                canary_note = "—"
                rolled_back = None
                if arm.model is tuned and tuned is not parent:
                    verdict = self._canary(parent.version, tuned.version, served[name][1], scores_n)
                    canary_note = f"{verdict.decision.value} (p_worse={verdict.p_worse:.2f})"
                    if verdict.decision is CanaryDecision.ROLLBACK:
                        arm.registry.roll_back(tuned.version, verdict)
                        rolled_back = parent  # the next iteration starts from the parent again
                    else:
                        arm.registry.promote(tuned.version, verdict)
                state[name] = (new_tracks, scores_n, report_n, now_n)
                if rolled_back is None:  # the arm now serves the model that made new_tracks
                    served[name] = (new_tracks, scores_n)
                row = self._row(
                    arm,
                    iteration,
                    new_tracks,
                    scores_n,
                    report_n,
                    now_n,
                    {"gate": gate_note, "canary": canary_note, "seconds": time.monotonic() - t1},
                )
                result.rows.append(row)
                if rolled_back is not None:
                    arm.model = rolled_back
                self.timings[f"{name}-finetune-{iteration}"] = t_ft
                self.progress(_progress_line(row, f"fine-tune {t_ft:.0f} s"))
        if cfg.eval_merges > 0:
            t2 = time.monotonic()
            served = {"base": base, **{name: arm.model for name, arm in arms.items()}}
            for row in self._evaluate(served, eval_start):
                result.rows.append(row)
                self.progress(_progress_line(row, "evaluation session"))
            self.timings["evaluation"] = time.monotonic() - t2
        result.timings["total"] = time.monotonic() - started
        result.registry_versions = [
            {"arm": name, **asdict(arm.registry.get(v))}
            for name, arm in arms.items()
            for v in arm.registry.versions()
        ]
        return result

    # 7. the evaluation session -------------------------------------------------------------------
    def _evaluation_merges(self) -> list[tuple[int, int]]:
        """``eval_merges`` input pairs the iterations never served (all pairs if too few remain):
        new requests from the same users' songs, so the models are judged on what they were not
        fine-tuned on."""
        n = len(self.world.inputs)
        pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
        fresh = [p for p in pairs if p not in set(self.merges)] or pairs
        rng = np.random.default_rng([self.cfg.seed, _EVAL_SESSION])
        picks = rng.choice(len(fresh), size=min(self.cfg.eval_merges, len(fresh)), replace=False)
        return sorted(fresh[int(i)] for i in picks)

    def _evaluate(
        self, models: dict[str, Any], start: tuple[list[Listener], bytes, dict[str, float]]
    ) -> list[IterationRow]:
        """One session per model on the same evaluation requests: same request ids, dispatch,
        baselines and generation seeds, and listeners restored to the same state (after iteration
        0) hearing the same positions — so the rows differ only by the model (paired design).
        ``models``: row label → the model that label ended up serving."""
        cfg = self.cfg
        merges = self._evaluation_merges()
        listeners, snapshot, clock = start
        rows = []
        for name, model in models.items():
            t0 = time.monotonic()
            arm = _Arm(
                name,
                model,
                copy.deepcopy(listeners),
                FeedbackLedger.restore(snapshot),
                clock=dict(clock),
            )
            tracks = self._serve(arm, "eval", merges, cfg.eval_requests_per_merge)
            self._listen(arm, _EVAL_SESSION, tracks, cfg.eval_ratings_per_listener)
            scores, report, now = self._score(arm, tracks)
            # the iteration that made the model it serves (a rollback serves an earlier one)
            iteration = self.made_at.get(model.version, 0)
            row = self._row(
                arm, iteration, tracks, scores, report, now, {"seconds": time.monotonic() - t0}
            )
            rows.append(replace(row, session="eval"))
        return rows

    def _gate(
        self, parent_tracks: list[str], new_tracks: list[str], base_tracks: list[str] | None
    ) -> GateReport:
        gate = OfflineGate(
            self.cfg.gate_fd_increase,
            self.cfg.gate_diversity_drop,
            frechet=self.frechet,
            diversity=self.diversity,
        )

        def gens(ids: list[str]) -> np.ndarray:
            return np.stack(
                [self.embeddings[t] for t in ids if self.provenance[t].kind is TrackKind.GENERATED]
            )

        return gate.evaluate(
            self.reference_embeddings,
            gens(parent_tracks),
            gens(new_tracks),
            gens(base_tracks) if base_tracks is not None else None,
        )

    def _canary(
        self,
        parent: str,
        candidate: str,
        parent_scores: dict[str, TrackScored],
        candidate_scores: dict[str, TrackScored],
    ) -> Any:
        """Candidate vs parent on the same requests and listeners. Each model's generations are
        compared through their margins R − R_b(input) over the baselines rated in the same
        session, so a drift of the listeners' scale between sessions cancels."""
        canary = Canary(parent, candidate, alpha=self.cfg.canary_alpha, min_ratings=10)
        canary.max_ratings = 10  # the demo decides after one round of ratings
        for version, scores in ((parent, parent_scores), (candidate, candidate_scores)):
            r_b = baseline_scores(scores)
            pooled = float(np.mean(list(r_b.values()))) if r_b else 3.0
            for s in scores.values():
                if s.kind is TrackKind.GENERATED:
                    canary.record(version, s.score - r_b.get(s.input_key, pooled))
        return canary.decide()


def _request_noise(model: Any, seed: int) -> torch.Tensor:
    """ε of one request: the draw ``inject_at_step`` makes for a one-image batch seeded ``seed``
    ([1, C, h, w] in the UNet's input space, on the CPU), so batching does not change tracks."""
    cfg = model.unet.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((1, int(cfg.in_channels), int(h), int(w)), generator=gen)


def _constant(value: str) -> Callable[[], str]:
    return lambda: value


def _progress_line(row: IterationRow, note: str) -> str:
    where = "eval" if row.session == "eval" else f"it{row.iteration}"
    return (
        f"[{row.arm} {where}] {row.model_version}: gen {row.mean_generated:.2f} vs "
        f"base {row.mean_baseline:.2f} (Δ {row.delta:+.2f}), spam {row.spam_caught}/"
        f"{row.spammers}, pairs {row.train_pairs}, gate {row.gate}, canary {row.canary} — {note}"
    )

"""riffloop.loop.ReleaseCycle on in-memory ports: the fine-tune trains only LoRA adapters and
weighs each window by its ω, replaying the base rows of the parent's index; the gate rejects a
noised candidate (on the trained quality embedding) and compares with the lineage's root; the
canary decides on margins over each version's baselines and a restarted cycle resumes a watch."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch

from riffloop.core import MemoryKeyValueStore, MemoryObjectStore, ValidationError
from riffloop.loop import (
    CycleSettings,
    GateReport,
    GateVerdict,
    ReleaseAction,
    ReleaseCycle,
    ScoredTrack,
    TrackKind,
    VersionStatus,
    canary_margins,
)
from riffloop.music import (
    LoraSettings,
    MelConfig,
    MelDataset,
    ModelConfig,
    MusicDiffusion,
    Winner,
    grid_to_npy,
    image_from_uint8,
    to_uint8,
)
from riffloop.runtime import ModelStore

PASSED = GateVerdict(GateReport(True, 1.0, 1.0, 1.0, 1.0, 0.25, 0.15), samples=16)
FAST = {"baseline_rows": 8, "baseline_inversion_steps": 2, "device": "cpu"}
CANARY = {"canary_share": 0.25, "canary_min_ratings": 8, "canary_max_ratings": 12}


class FixedSongs:
    """The gate's inputs: fixed x_T and reference windows."""

    def __init__(self, latents: torch.Tensor | None, windows: torch.Tensor | None) -> None:
        self._latents, self._windows = latents, windows

    def latents(self, limit: int) -> torch.Tensor | None:
        return None if self._latents is None else self._latents[:limit]

    def windows(self) -> torch.Tensor | None:
        return self._windows


class CountingShelf(ModelStore):
    """The object-store ModelStore, counting the loads of each version."""

    def __init__(self, objects: Any) -> None:
        super().__init__(objects)
        self.loads: list[str] = []

    def load(self, version: str) -> Any:
        self.loads.append(version)
        return super().load(version)


class Harness:
    """A cycle on fresh in-memory ports; ``announced`` and ``resubmitted`` record the events."""

    def __init__(self, songs: FixedSongs | None = None, **settings: Any) -> None:
        self.objects = MemoryObjectStore()
        self.kv = MemoryKeyValueStore()
        self.shelf = CountingShelf(self.objects)
        self.songs = songs or FixedSongs(None, None)
        self.settings = CycleSettings(**{**FAST, **settings})
        self.announced: list[Any] = []
        self.resubmitted: list[Any] = []
        self.cycle = self.restart()

    def restart(self, **settings: Any) -> ReleaseCycle:
        """A new cycle on the same ports, as a restarted trainer process builds one."""
        return ReleaseCycle(
            CycleSettings(**{**FAST, **settings}) if settings else self.settings,
            self.objects,
            self.kv,
            self.shelf,
            self.songs,
            lambda release: self.announced.append(release) or f"event-{len(self.announced)}",
            lambda trainset: self.resubmitted.append(trainset) or "again",
        )


def tiny_model(seed: int = 0) -> MusicDiffusion:
    mel = MelConfig(n_mels=16, x_res=16, n_fft=256, hop_length=64)
    return MusicDiffusion.create(ModelConfig.preset("tiny"), mel, seed=seed)


def windows(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def weights_of(model: MusicDiffusion) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.unet.state_dict().items()}


# -- fine-tune --------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_recipe_defaults_and_their_checks() -> None:
    s = CycleSettings()
    assert (s.lora_rank, s.lora_alpha, s.learning_rate, s.finetune_steps) == (8, 8, 5e-4, 60)
    assert (s.batch_size, s.warmup_fraction, s.ema_decay, s.replay_ratio) == (8, 0.1, 0.0, 0.5)
    for bad in (
        {"lora_rank": -1},
        {"learning_rate": 0.0},
        {"replay_ratio": 1.0},
        {"batch_size": 2, "replay_ratio": 0.75},  # round(1.5) = 2: no room for the set
        {"canary_share": 1.0},
        {"gate_mode": "later"},
        {"canary_min_ratings": 30, "canary_max_ratings": 20},
        {"finetune_steps": True},
    ):
        with pytest.raises(ValidationError):
            CycleSettings(**bad)
    config = CycleSettings().training_config(seed=3, replay=True)
    assert config.lora == LoraSettings(rank=8, alpha=8) and config.replay_ratio == 0.5
    assert CycleSettings(lora_rank=0).training_config(seed=3, replay=False).lora is None


@pytest.mark.slow
def test_the_fine_tune_changes_only_lora_targets_and_replays_the_base_rows() -> None:
    h = Harness(finetune_steps=6, batch_size=4, steps_per_chunk=2)
    parent = tiny_model()
    parent.version = "v0001"
    parent.baseline_index = h.cycle.base_index(parent)  # 8 synthetic tones
    before = weights_of(parent)
    candidate = h.cycle.fine_tune(
        parent, MelDataset.from_images(windows(4, 1), torch.ones(4)), "v0002"
    )
    assert candidate.parent == "v0001" and candidate.version == "v0002"
    assert all(torch.equal(v, before[k]) for k, v in weights_of(parent).items())  # a copy trained
    after = weights_of(candidate)
    assert set(after) == set(before)  # the adapters are merged into the UNet's own weights
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    target = re.compile(LoraSettings().target_modules)
    assert changed, "the fine-tune changed nothing"
    assert all(k.endswith(".weight") and target.match(k[: -len(".weight")]) for k in changed)
    training = candidate.card["training"]
    assert training["config"]["lora"]["rank"] == 8 and training["steps"] == 6
    assert training["replay"]["rows"] == training["replay"]["size"] == 8  # the base rows
    status = h.cycle.status()
    assert (status.step, status.total_steps) == (6, 6)

    # winners in the index are training data of their own set, not replay
    winner = Winner("a+b", "t-1", 4.2, to_uint8(windows(1, 9)[0]))
    parent.baseline_index = parent.baseline_index.next_version(
        parent, [winner], model_version="v0001"
    )
    assert len(parent.baseline_index) == 9
    assert len(h.cycle.replay_windows(parent)) == 8


@pytest.mark.slow
def test_the_fine_tune_weighs_each_window_by_its_omega() -> None:
    """ω = 0 removes a window from the loss exactly (the same candidate whatever the window
    holds); ω = 1 on the same window changes the candidate."""
    h = Harness(finetune_steps=4, batch_size=4, steps_per_chunk=4)
    parent = tiny_model()
    parent.version = "v0001"
    parent.baseline_index = h.cycle.base_index(parent)
    a, b, c = windows(1, 1), windows(1, 2), windows(1, 3)

    def tuned(images: torch.Tensor, omega: list[float]) -> dict[str, torch.Tensor]:
        data = MelDataset.from_images(images, torch.tensor(omega))
        return weights_of(h.cycle.fine_tune(parent, data, "v0002", seed=5))

    ignored_b = tuned(torch.cat([a, b]), [1.0, 0.0])
    ignored_c = tuned(torch.cat([a, c]), [1.0, 0.0])
    weighted_b = tuned(torch.cat([a, b]), [1.0, 1.0])
    assert all(torch.equal(ignored_b[k], ignored_c[k]) for k in ignored_b)
    assert any(not torch.equal(ignored_b[k], weighted_b[k]) for k in ignored_b)


@pytest.mark.unit
def test_a_stop_request_ends_the_fine_tune_between_chunks() -> None:
    from riffloop.core import Interrupted

    h = Harness(finetune_steps=4, batch_size=2, steps_per_chunk=1)
    parent = tiny_model()
    parent.version = "v0001"
    h.cycle.stopping.set()
    with pytest.raises(Interrupted):
        h.cycle.fine_tune(parent, MelDataset.from_images(windows(2, 1)), "v0002")
    assert h.cycle.status().phase == "idle"


# -- the offline gate -------------------------------------------------------------------------
@pytest.mark.slow
def test_the_gate_rejects_a_noised_candidate_and_compares_with_the_root() -> None:
    """On the bundled base model (64 × 64, the trained quality embedding's size): a copy of the
    parent passes; the same weights with Gaussian noise (σ = ½ of each tensor's std) fail."""
    from riffloop.music import image_from_uint8
    from riffloop.music._quality import DEFAULT_EMBEDDING_DIR

    if not (DEFAULT_EMBEDDING_DIR / "config.json").is_file():
        pytest.skip("no trained quality embedding in assets/")
    base = MusicDiffusion.from_pretrained("assets/base-model")
    reference = image_from_uint8(base.baseline_index.images[::4])  # 64 corpus windows
    x_t = torch.randn((16, *base.image_shape), generator=torch.Generator().manual_seed(0))
    h = Harness(FixedSongs(x_t, reference), gate_samples=16, gate_steps=5)
    h.cycle.bootstrap(lambda: base)  # v0001, the root
    child = h.shelf.load("v0001")
    child.version, child.parent = "v0002", "v0001"
    h.cycle.publish_version(child, trainset_id="ts-1", gate=PASSED)

    same = h.shelf.load("v0002")
    same.version, same.parent = "v0003", "v0002"
    noised = h.shelf.load("v0002")
    noised.version, noised.parent = "v0004", "v0002"
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noised.unet.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=generator) * 0.5 * p.std())
    h.shelf.loads.clear()
    passed = h.cycle.gate(child, same)
    failed = h.cycle.gate(child, noised)
    assert passed.passed and passed.report.embedding.startswith("AudioEmbedding")
    assert passed.samples == 16 and "AudioEmbedding" in passed.summary()
    assert not failed.passed, failed.report
    assert failed.report.fd_base == failed.report.fd_base  # compared with the root (not NaN)
    assert h.shelf.loads == ["v0001"]  # the root's samples of one x_T are made once


@pytest.mark.unit
def test_the_quality_embedding_falls_back_to_mel_statistics() -> None:
    from riffloop.loop import QualityEmbedding

    fallback = QualityEmbedding.for_images((16, 16))  # no embedding trained for 16 × 16
    assert fallback.name.startswith("mel statistics")
    assert fallback.embed(windows(3, 0)).shape == (3, 32)  # per bin: mean and std


# -- the canary -------------------------------------------------------------------------------
def _generations(version: str, mean: float, n: int, prefix: str) -> list[ScoredTrack]:
    return [
        ScoredTrack(
            f"{prefix}{i}", TrackKind.GENERATED, version, f"in{i % 3}", mean + (i % 3) * 0.3
        )
        for i in range(n)
    ]


def _baselines(version: str, mean: float, prefix: str) -> list[ScoredTrack]:
    return [
        ScoredTrack(f"{prefix}{k}", TrackKind.BASELINE, version, f"in{k}", mean, 0.5)
        for k in range(3)
    ]


def _canary_running(h: Harness) -> None:
    h.cycle.bootstrap(tiny_model)
    child = h.shelf.load("v0001")
    child.version, child.parent = "v0002", "v0001"
    h.cycle.start_canary(child, trainset_id="ts-1", gate=PASSED)
    assert h.announced[-1].action is ReleaseAction.CANARY and h.cycle.running_canary() == "v0002"


@pytest.mark.unit
def test_margins_use_each_versions_baselines_of_the_same_input() -> None:
    evidence = {
        s.track_id: s
        for s in [
            ScoredTrack("g1", TrackKind.GENERATED, "v1", "a", 4.0),
            ScoredTrack("g2", TrackKind.GENERATED, "v1", "b", 3.0),  # no baseline of b: v1's mean
            ScoredTrack("g3", TrackKind.GENERATED, "v2", "a", 3.0),  # v2 has none: both's mean
            ScoredTrack("b1", TrackKind.BASELINE, "v1", "a", 3.5, 1.0),
            ScoredTrack("b2", TrackKind.BASELINE, "v1", "c", 2.5, 3.0),
        ]
    }
    margins = canary_margins(evidence, ("v1", "v2"))
    pooled = (3.5 * 1.0 + 2.5 * 3.0) / 4.0
    assert margins == {"v1": [0.5, 3.0 - pooled], "v2": [3.0 - pooled]}
    assert canary_margins({}, ("v1", "v2")) == {"v1": [], "v2": []}


@pytest.mark.unit
def test_the_canary_rolls_back_a_clearly_worse_version() -> None:
    h = Harness(**CANARY)
    _canary_running(h)
    h.cycle.on_scores(_baselines("v0001", 3.0, "bp") + _baselines("v0002", 3.0, "bc"))
    assert h.cycle.on_scores(_generations("v0001", 4.0, 8, "p")) is None
    verdict = h.cycle.on_scores(_generations("v0002", 1.5, 8, "c"))
    assert verdict is not None and verdict.decision == "rollback"
    assert h.cycle.registry.get("v0002").status is VersionStatus.ROLLED_BACK
    assert h.shelf.current()["version"] == "v0001" and h.shelf.canary() is None
    last = h.announced[-1]
    assert (last.action, last.version) == (ReleaseAction.ROLLBACK, "v0001")
    assert h.cycle.watch is None and h.kv.hgetall("trainer:canary:v0002") == {}


@pytest.mark.unit
def test_the_canary_promotes_an_equal_version_and_margins_cancel_a_scale_drift() -> None:
    """The candidate's tracks were rated on a harsher scale (everything 1 star lower, its
    baselines too): on raw R it would lose; on margins it equals its parent and is promoted
    when canary_max_ratings is reached."""
    h = Harness(**CANARY)
    _canary_running(h)
    h.cycle.on_scores(_baselines("v0001", 3.5, "bp") + _baselines("v0002", 2.5, "bc"))
    h.cycle.on_scores(_generations("v0001", 3.5, 12, "p"))
    verdict = h.cycle.on_scores(_generations("v0002", 2.5, 12, "c"))
    assert verdict is not None and verdict.decision == "promote"
    assert verdict.mean_candidate == pytest.approx(verdict.mean_current)
    record = h.cycle.registry.get("v0002")
    assert record.status is VersionStatus.SERVING and record.canary["decision"] == "promote"
    assert h.shelf.current()["version"] == "v0002"
    assert h.announced[-1].action is ReleaseAction.PROMOTE


@pytest.mark.unit
def test_a_restarted_cycle_resumes_the_watch_with_its_evidence() -> None:
    h = Harness(**CANARY)
    _canary_running(h)
    h.cycle.on_scores(_baselines("v0002", 3.0, "bc") + _generations("v0001", 4.0, 6, "p"))
    h.cycle.on_scores(_generations("v0002", 1.5, 6, "c"))
    restarted = h.restart(**CANARY)
    assert restarted.watch is None  # before its bootstrap
    assert restarted.bootstrap(tiny_model) == "v0001"  # served: no new base model
    assert restarted.watch == ("v0001", "v0002") and len(restarted.evidence) == 15
    assert restarted.evidence["bc1"].kind is TrackKind.BASELINE
    restarted.on_scores(_generations("v0001", 4.0, 8, "p") + _generations("v0002", 1.5, 8, "c"))
    assert restarted.registry.get("v0002").status is VersionStatus.ROLLED_BACK
    assert h.kv.get("trainer:watch") is None


@pytest.mark.unit
def test_a_training_set_during_a_canary_waits_and_goes_out_after_it() -> None:
    from riffloop.loop import TrainingSet

    h = Harness(**CANARY)
    _canary_running(h)
    waiting = TrainingSet("ts-2", "trainsets", "ts-2.json", pair_count=3, iteration=2)
    assert h.cycle.on_training_set(waiting) is None and h.cycle.deferred() == waiting
    target, dropped, release = h.cycle.rollback("")  # the operator ends the canary
    assert (target, dropped, release.event_id) == ("v0001", "v0002", "event-3")
    assert h.cycle.release_deferred() == "ts-2" and h.resubmitted == [waiting]
    assert h.cycle.deferred() is None


# -- preference pairs -------------------------------------------------------------------------
def _training_set(h: Harness, losers: list[str]) -> Any:
    """A two-pair manifest toward t-1, t-2 (``losers``: their loser_track_id), with sidecars."""
    from riffloop.loop import TrainingSet

    h.objects.ensure_bucket("tracks")
    h.objects.ensure_bucket("trainsets")
    for i, track in enumerate(["t-1", "t-2", "t-3", "t-4"]):
        grid = to_uint8(windows(1, 10 + i)[0, 0]).tolist()
        h.objects.put("tracks", f"{track}.json", json.dumps({"image_uint8": grid}).encode())
    pairs = [
        {"target_track_id": target, "weight": 0.5, "loser_track_id": loser}
        for target, loser in zip(["t-1", "t-2"], losers, strict=True)
    ]
    h.objects.put("trainsets", "ts-p.json", json.dumps({"pairs": pairs}).encode())
    return TrainingSet("ts-p", "trainsets", "ts-p.json", pair_count=2, iteration=1)


@pytest.mark.unit
def test_a_preference_set_reads_each_pairs_loser_and_trains_by_preference() -> None:
    h = Harness(preference_beta=300.0)
    _, images, weights, losers = h.cycle._read_pairs(_training_set(h, ["t-3", "t-4"]))
    assert images.shape == (2, 1, 16, 16) and weights.tolist() == [0.5, 0.5]
    assert losers is not None and losers.shape == images.shape
    assert not torch.equal(losers, images)
    assert h.settings.training_config(seed=1, replay=True, preference=True).preference_beta == 300.0
    assert h.settings.training_config(seed=1, replay=True).preference_beta == 0.0
    with pytest.raises(ValidationError, match="preference_beta"):
        CycleSettings(preference_beta=-1.0)


@pytest.mark.unit
def test_a_set_without_losers_trains_toward_its_targets(caplog: pytest.LogCaptureFixture) -> None:
    """β > 0 with a plain set (a selector without RIFFLOOP_PREFERENCE_PAIRS), or a set whose
    pairs name losers under β = 0: the ω-weighted ε loss toward the targets, nothing refused."""
    h = Harness(preference_beta=300.0)
    with caplog.at_level("WARNING"):
        *_, losers = h.cycle._read_pairs(_training_set(h, ["t-3", ""]))
    assert losers is None and "name no loser" in caplog.text
    plain = Harness()
    *_, losers = plain.cycle._read_pairs(_training_set(plain, ["t-3", "t-4"]))
    assert losers is None


@pytest.mark.slow
def test_a_preference_fine_tune_moves_only_the_adapters_and_records_its_beta() -> None:
    h = Harness(finetune_steps=4, batch_size=4, steps_per_chunk=2, preference_beta=300.0)
    parent = tiny_model()
    parent.version = "v0001"
    parent.baseline_index = h.cycle.base_index(parent)
    _, images, weights, losers = h.cycle._read_pairs(_training_set(h, ["t-3", "t-4"]))
    data = MelDataset.from_images(images, weights, {"trainset_id": "ts-p"}, losers)
    candidate = h.cycle.fine_tune(parent, data, "v0002")
    training = candidate.card["training"]
    assert training["config"]["preference_beta"] == 300.0
    assert training["data"]["preference_pairs"] is True
    before, after = weights_of(parent), weights_of(candidate)
    assert any(not torch.equal(after[k], before[k]) for k in after)


# -- every window of a kept track --------------------------------------------------------------
def _long_track(h: Harness, track: str, grid: torch.Tensor, windows: int, overlap: int) -> None:
    """A generator's stored track: the sidecar (first window, layout) and the whole image."""
    sidecar = {
        "image_uint8": grid[:, :16].tolist(),
        "windows": windows,
        "window_overlap": overlap,
        "mel_key": f"{track}.mel.npy",
    }
    h.objects.put("tracks", f"{track}.json", json.dumps(sidecar).encode())
    h.objects.put("tracks", f"{track}.mel.npy", grid_to_npy(grid))


@pytest.mark.unit
def test_train_windows_all_learns_every_window_of_each_kept_track_with_its_omega() -> None:
    from riffloop.loop import TrainingSet

    h = Harness(train_windows="all")
    h.objects.ensure_bucket("tracks")
    h.objects.ensure_bucket("trainsets")
    long = to_uint8(windows(1, 30, size=16)[0, 0].repeat(1, 3)[:, :40])  # 3 windows of 16, o = 4
    _long_track(h, "t-long", long, windows=3, overlap=4)
    short = to_uint8(windows(1, 31)[0, 0])  # a sidecar without the whole image: first window
    h.objects.put("tracks", "t-short.json", json.dumps({"image_uint8": short.tolist()}).encode())
    pairs = [
        {"target_track_id": "t-long", "weight": 0.5},
        {"target_track_id": "t-short", "weight": 0.25},
    ]
    h.objects.put("trainsets", "ts-w.json", json.dumps({"pairs": pairs}).encode())
    trainset = TrainingSet("ts-w", "trainsets", "ts-w.json", pair_count=2, iteration=1)

    reads: list[str] = []
    get = h.objects.get

    def counted(bucket: str, key: str) -> bytes:
        reads.append(f"{bucket}/{key}")
        return get(bucket, key)

    h.objects.get = counted  # type: ignore[method-assign]
    kept, firsts, data = h.cycle.training_data(trainset)
    h.objects.get = get  # type: ignore[method-assign]
    # each object once: the manifest, each sidecar, the long track's whole image
    assert sorted(reads) == sorted(
        [
            "trainsets/ts-w.json",
            "tracks/t-long.json",
            "tracks/t-short.json",
            "tracks/t-long.mel.npy",
        ]
    )
    assert kept == pairs and firsts.shape == (2, 1, 16, 16)  # the index's rows: one per pair
    assert data.images.shape == (4, 1, 16, 16) and data.manifest["windows"] == 4
    assert data.weights.tolist() == [0.5, 0.5, 0.5, 0.25]
    expected = image_from_uint8(torch.stack([long[:, k : k + 16] for k in (0, 12, 24)]))
    assert torch.equal(data.images[:3, 0], expected)
    assert torch.equal(data.images[0], firsts[0]) and torch.equal(data.images[3], firsts[1])

    h.cycle.settings = CycleSettings(**FAST)  # the default: first windows alone
    _, _, first_only = h.cycle.training_data(trainset)
    assert torch.equal(first_only.images, firsts) and "windows" not in first_only.manifest

    h.objects.put("tracks", "t-long.mel.npy", grid_to_npy(long[:8]))  # of another height
    h.cycle.settings = CycleSettings(**FAST, train_windows="all")
    with pytest.raises(ValidationError, match="bins"):
        h.cycle.training_data(trainset)
    _long_track(h, "t-long", long, windows=3, overlap=4)
    layout = json.loads(h.objects.get("tracks", "t-long.json"))
    h.objects.put("tracks", "t-long.json", json.dumps({**layout, "windows": "three"}).encode())
    with pytest.raises(ValidationError, match="malformed"):
        h.cycle.training_data(trainset)
    odd = json.dumps({"image_uint8": short[:8].tolist()}).encode()
    h.objects.put("tracks", "t-short.json", odd)  # a first window of another shape
    with pytest.raises(ValidationError, match="different shapes"):
        h.cycle.training_data(trainset)


@pytest.mark.unit
def test_train_windows_is_first_or_all_and_not_with_a_preference_beta() -> None:
    assert CycleSettings().train_windows == "first"
    with pytest.raises(ValidationError, match="first or all"):
        CycleSettings(train_windows="every")
    with pytest.raises(ValidationError, match="preference_beta"):
        CycleSettings(train_windows="all", preference_beta=100.0)

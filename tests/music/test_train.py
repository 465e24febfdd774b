"""Trainer: the ω-weighted Min-SNR loss, schedules, replay, LoRA and bit-exact resume."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from riffloop.core import ConflictError, NotFoundError, ValidationError
from riffloop.music import (
    LoraSettings,
    MelConfig,
    MelDataset,
    ModelConfig,
    MusicDiffusion,
    Trainer,
    TrainingConfig,
    apply_adapter,
    export_checkpoint,
    min_snr_weights,
    weighted_diffusion_loss,
)

pytestmark = pytest.mark.unit

TINY_MEL = MelConfig(n_mels=16, x_res=16, n_fft=256, hop_length=64)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _data(n: int = 12, seed: int = 0, value: float | None = None) -> MelDataset:
    if value is not None:
        images = torch.full((n, 1, 16, 16), value)
    else:
        images = torch.rand((n, 1, 16, 16), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return MelDataset.from_images(images, manifest={"source": "test", "seed": seed})


def _model(seed: int = 3) -> MusicDiffusion:
    return MusicDiffusion.create(ModelConfig.preset("tiny"), TINY_MEL, seed=seed)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.unet.state_dict().items()}


# -- loss ------------------------------------------------------------------------------------


def test_a_zero_weight_sample_contributes_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 1, 4, 4, generator=g)
    prediction = torch.randn(3, 1, 4, 4, generator=g).requires_grad_(True)
    w = torch.tensor([0.5, 1.0, 0.2])
    omega = torch.tensor([1.0, 2.0, 0.0])
    loss = weighted_diffusion_loss(prediction, target, w, omega)
    loss.backward()
    assert prediction.grad is not None
    assert torch.count_nonzero(prediction.grad[2]) == 0
    assert torch.count_nonzero(prediction.grad[:2]) > 0
    # Equals the loss of the first two samples alone.
    alone = weighted_diffusion_loss(prediction[:2], target[:2], w[:2], omega[:2])
    assert loss.item() == pytest.approx(alone.item(), rel=1e-6)
    # …and the third sample's error does not matter at all.
    worse = prediction.detach().clone()
    worse[2] += 100.0
    assert weighted_diffusion_loss(worse, target, w, omega).item() == pytest.approx(loss.item())


def test_loss_is_invariant_to_scaling_omega_and_is_a_weighted_mean() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(4, 1, 4, 4, generator=g)
    prediction = torch.randn(4, 1, 4, 4, generator=g)
    w = torch.rand(4, generator=g)
    omega = torch.tensor([0.3, 1.0, 2.5, 0.7])
    base = weighted_diffusion_loss(prediction, target, w, omega).item()
    for c in (1e-3, 7.0, 1e4):
        assert weighted_diffusion_loss(prediction, target, w, c * omega).item() == pytest.approx(
            base, rel=1e-5
        )
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    expected = float((omega * w * per_sample).sum() / omega.sum())
    assert base == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValidationError):
        weighted_diffusion_loss(prediction, target, w, torch.zeros(4))


def test_min_snr_weights() -> None:
    alphas = _model().scheduler.alphas_cumprod
    t = torch.tensor([0, 50, 200, 999])
    snr = alphas[t] / (1 - alphas[t])
    v = min_snr_weights(alphas, t, 5.0, "v_prediction")
    eps = min_snr_weights(alphas, t, 5.0, "epsilon")
    assert torch.allclose(v, torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-5)
    assert torch.allclose(eps, torch.clamp(snr, max=5.0) / snr, rtol=1e-5)
    # Low-noise (high-SNR) steps are down-weighted; at high noise ε-weights are 1.
    assert float(v[0]) < 0.01 and float(eps[-1]) == pytest.approx(1.0)
    assert torch.equal(min_snr_weights(alphas, t, None, "epsilon"), torch.ones(4))


# -- configuration and data ------------------------------------------------------------------


def test_warmup_is_relative_to_the_run_length() -> None:
    config = TrainingConfig(total_steps=120, warmup_fraction=0.05)
    assert config.warmup_steps == 6
    factors = [config.lr_factor(s) for s in range(120)]
    assert factors[0] == pytest.approx(1 / 6)
    assert factors[5] == pytest.approx(1.0)
    assert max(factors) == pytest.approx(1.0)
    assert factors[-1] < 0.01
    assert all(a >= b for a, b in itertools.pairwise(factors[5:]))
    long = TrainingConfig(total_steps=10_000)
    assert long.warmup_steps == 500 and long.lr_factor(499) == pytest.approx(1.0)


def test_config_validation_and_dict_round_trip() -> None:
    config = TrainingConfig(total_steps=10, lora=LoraSettings(rank=4), replay_ratio=0.5)
    assert TrainingConfig.from_dict(config.to_dict()) == config
    for bad in (
        {"total_steps": 0},
        {"total_steps": 5, "warmup_fraction": 1.0},
        {"total_steps": 5, "replay_ratio": 1.0},
        {"total_steps": 5, "ema_decay": 1.0},
        {"total_steps": 5, "min_snr_gamma": 0.0},
    ):
        with pytest.raises(ValidationError):
            TrainingConfig(**bad)
    with pytest.raises(ValidationError, match="unknown training config keys"):
        TrainingConfig.from_dict({"total_steps": 5, "lr": 1e-3})


def test_max_timestep_bounds_the_noise_levels_trained_and_is_checked() -> None:
    drawn: list[torch.Tensor] = []
    config = TrainingConfig(total_steps=4, batch_size=8, max_timestep=120)
    trainer = Trainer(_model(), _data(), config)
    forward = trainer._forward

    def recording(x_t: torch.Tensor, t: torch.Tensor) -> Any:
        drawn.append(t.detach().clone())
        return forward(x_t, t)

    trainer._forward = recording
    for _ in range(4):
        trainer.compute_loss(*trainer.next_batch())
    levels = torch.cat(drawn)
    assert int(levels.max()) <= 120 and len(levels) == 32
    assert len(set(levels.tolist())) > 16  # drawn across the range, not one level
    assert TrainingConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValidationError, match="max_timestep"):
        TrainingConfig(total_steps=4, max_timestep=-1)
    with pytest.raises(ValidationError, match="past the scheduler"):
        Trainer(_model(), _data(), TrainingConfig(total_steps=4, max_timestep=1000))


def test_dataset_validation() -> None:
    images = torch.zeros(3, 1, 16, 16)
    with pytest.raises(ValidationError):
        MelDataset.from_images(images, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValidationError):
        MelDataset.from_images(images, torch.zeros(3))
    with pytest.raises(ValidationError):
        MelDataset.from_images(images, torch.ones(2))
    with pytest.raises(ValidationError):
        MelDataset.from_images(torch.zeros(3, 16, 16))
    with pytest.raises(ValidationError, match="model needs"):
        Trainer(_model(), MelDataset.from_images(torch.zeros(3, 1, 8, 8)), TrainingConfig(5))


def test_every_window_is_seen_once_per_epoch_and_replay_is_mixed_in() -> None:
    data = _data(10, value=1.0)
    replay = _data(6, value=-1.0)
    config = TrainingConfig(total_steps=10, batch_size=4, replay_ratio=0.5, replay_weight=0.25)
    trainer = Trainer(_model(), data, config, replay=replay)
    for _ in range(5):
        x0, omega = trainer.next_batch()
        assert x0.shape == (4, 1, 16, 16)
        # Two training windows (ω = 1) and two replayed base windows (ω = replay_weight).
        assert torch.equal(x0[:, 0, 0, 0], torch.tensor([1.0, 1.0, -1.0, -1.0]))
        assert torch.equal(omega, torch.tensor([1.0, 1.0, 0.25, 0.25]))
    # The data order is a permutation per epoch: indices of the first epoch are all distinct.
    fresh = Trainer(_model(), _data(10), TrainingConfig(total_steps=10, batch_size=5))
    first_epoch = torch.cat([fresh.next_batch()[0] for _ in range(2)])
    assert sorted(first_epoch[:, 0, 0, 0].tolist()) == sorted(
        fresh.data.images[:, 0, 0, 0].tolist()
    )
    with pytest.raises(ValidationError, match="replay data"):
        Trainer(_model(), data, config)


def test_training_omega_is_used_relative_to_its_mean_against_replay() -> None:
    """ω ranks the training samples; replay_ratio alone sets their share against replay: a set
    with ω = 0.25 everywhere trains exactly as one with ω = 1 (a low-confidence set is not
    out-weighed by replay), and unequal ω keep their ratios."""
    config = TrainingConfig(total_steps=4, batch_size=4, replay_ratio=0.5)
    replay = _data(6, value=-1.0)
    quarter = MelDataset.from_images(torch.zeros(10, 1, 16, 16), torch.full((10,), 0.25))
    low = Trainer(_model(), quarter, config, replay=replay)
    _, omega = low.next_batch()
    assert torch.equal(omega, torch.ones(4))
    weights = torch.tensor([0.2, 0.6] * 5)
    ranked = Trainer(
        _model(), MelDataset.from_images(torch.zeros(10, 1, 16, 16), weights), config, replay=replay
    )
    seen = torch.cat([ranked.next_batch()[1][:2] for _ in range(5)])  # one epoch of the data
    assert sorted(seen.tolist()) == pytest.approx(sorted((weights / weights.mean()).tolist()))


# -- training --------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_lowers_the_loss_on_a_learnable_set() -> None:
    data = _data(8, value=0.5)
    config = TrainingConfig(total_steps=60, batch_size=8, learning_rate=3e-3, log_every=10)
    trainer = Trainer(_model(), data, config)
    x0, omega = data.images, data.weights

    def held_loss() -> float:
        with torch.no_grad():
            return trainer.compute_loss(x0, omega, torch.Generator().manual_seed(99)).item()

    before = held_loss()
    report = trainer.train(progress=False)
    after = held_loss()
    assert report.end_step == 60 and report.stopped_by == "total_steps"
    assert [s for s, _ in report.losses] == [10, 20, 30, 40, 50, 60]
    assert after < 0.5 * before
    with pytest.raises(ConflictError):
        trainer.step()


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path: Path) -> None:
    data = _data(10)
    replay = _data(7, seed=5)
    config = TrainingConfig(total_steps=9, batch_size=4, replay_ratio=0.25, log_every=2)

    uninterrupted = Trainer(_model(), data, config, replay=replay)
    uninterrupted.train(progress=False)

    interrupted = Trainer(_model(), data, config, replay=replay)
    interrupted.train(4, progress=False, checkpoint_dir=tmp_path / "ckpt")
    # Disturb every RNG the process has: resume must restore them.
    torch.manual_seed(12345)
    del interrupted
    resumed = Trainer.resume(tmp_path / "ckpt", data, replay=replay)
    assert resumed.step_count == 4
    resumed.train(progress=False)

    assert resumed.step_count == uninterrupted.step_count == 9
    expected = _state(uninterrupted)
    for name, tensor in _state(resumed).items():
        assert torch.equal(tensor, expected[name]), name
    for name, tensor in resumed.ema.items():
        assert torch.equal(tensor, uninterrupted.ema[name]), name
    opt_a = uninterrupted.optimizer.state_dict()["state"]
    opt_b = resumed.optimizer.state_dict()["state"]
    for key in opt_a:
        assert torch.equal(opt_a[key]["exp_avg_sq"], opt_b[key]["exp_avg_sq"])
    assert resumed.lr_scheduler.get_last_lr() == uninterrupted.lr_scheduler.get_last_lr()


def test_resume_refuses_other_data_or_config(tmp_path: Path) -> None:
    data = _data(10)
    config = TrainingConfig(total_steps=5, batch_size=4)
    Trainer(_model(), data, config).train(2, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ConflictError, match="data"):
        Trainer.resume(tmp_path, _data(10, seed=1))
    with pytest.raises(ConflictError, match="config"):
        Trainer.resume(tmp_path, data, config=TrainingConfig(total_steps=6, batch_size=4))
    with pytest.raises(NotFoundError):
        Trainer.resume(tmp_path / "missing", data)


@pytest.mark.slow
def test_lora_adapters_start_from_the_seed_not_the_global_generator() -> None:
    """Two fine-tunes with one seed start from the same A (the loop's arms share their random
    numbers); another seed gives another A; the global generator is left where it was."""

    def adapters(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
        model = _model()  # (MusicDiffusion.create seeds the global generator itself)
        config = TrainingConfig(total_steps=1, batch_size=4, lora=LoraSettings(rank=2), seed=seed)
        torch.manual_seed(global_seed)
        Trainer(model, _data(8), config)
        after = torch.rand(1)  # the global stream continues as if no adapter had been drawn
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1))
        return {n: p.detach().clone() for n, p in model.unet.named_parameters() if "lora_A" in n}

    first, again, other = adapters(5, 0), adapters(5, 99), adapters(6, 0)
    assert first and all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def test_lora_changes_only_adapter_parameters(tmp_path: Path) -> None:
    model = _model()
    model.version = "base-v1"
    parent = MusicDiffusion.create(ModelConfig.preset("tiny"), TINY_MEL, seed=3)
    parent.version = "base-v1"
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    config = TrainingConfig(
        total_steps=6, batch_size=4, learning_rate=1e-2, lora=LoraSettings(rank=2, alpha=2)
    )
    trainer = Trainer(model, _data(8), config)
    trainable = [n for n, p in model.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".to_q." in n for n in trainable) and any(".conv1." in n for n in trainable)
    trainer.train(progress=False, checkpoint_dir=tmp_path / "ckpt")

    after = model.unet.state_dict()
    for name, tensor in after.items():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(tensor, base[original]), name
    assert any(torch.count_nonzero(t) > 0 for n, t in after.items() if "lora_B" in n), (
        "adapters did not train"
    )

    merged = trainer.ema_model("ft-1")
    assert set(merged.unet.state_dict()) == set(base)  # plain UNet, adapters merged in
    changed = [k for k in base if not torch.equal(base[k], merged.unet.state_dict()[k])]
    assert changed and all(
        k.endswith(
            (
                "to_q.weight",
                "to_k.weight",
                "to_v.weight",
                "to_out.0.weight",
                "conv1.weight",
                "conv2.weight",
            )
        )
        for k in changed
    )
    exported = export_checkpoint(tmp_path / "ckpt", tmp_path / "model", "ft-1")
    for name, tensor in exported.unet.state_dict().items():
        assert torch.allclose(tensor, merged.unet.state_dict()[name], atol=1e-6), name
    # The adapter alone, merged into an untouched copy of the parent, gives the same network.
    trainer.save_adapter(tmp_path / "adapter")
    applied = apply_adapter(parent, tmp_path / "adapter", "ft-1")
    assert (applied.version, applied.parent) == ("ft-1", "base-v1")
    for name, tensor in applied.unet.state_dict().items():
        assert torch.allclose(tensor, merged.unet.state_dict()[name], atol=1e-6), name
    other = _model(seed=4)
    other.version = "base-v2"
    with pytest.raises(ConflictError, match="base-v1"):
        apply_adapter(other, tmp_path / "adapter", "ft-1")


def test_export_writes_the_ema_weights_and_lineage(tmp_path: Path) -> None:
    parent = _model()
    parent.version = "base-v1"
    data = _data(8)
    config = TrainingConfig(total_steps=4, batch_size=4, log_every=2)
    trainer = Trainer(parent, data, config)
    trainer.train(progress=False, checkpoint_dir=tmp_path / "ckpt")
    exported = export_checkpoint(tmp_path / "ckpt", tmp_path / "model", "ft-1")
    loaded = MusicDiffusion.from_pretrained(tmp_path / "model")
    assert (loaded.version, loaded.parent) == ("ft-1", "base-v1")
    relabelled = export_checkpoint(tmp_path / "ckpt", tmp_path / "m2", "base-v0", parent=None)
    assert relabelled.parent is None and relabelled.card["training"]["parent"] is None
    training = loaded.card["training"]
    assert training["steps"] == 4 and training["data"]["source"] == "test"
    assert training["loss_curve"][-1][0] == 4 and math.isfinite(training["final_loss"])
    params = dict(loaded.unet.named_parameters())
    for name, tensor in trainer.ema.items():
        assert torch.equal(params[name], tensor), name
    assert not all(torch.equal(params[n], p) for n, p in trainer.model.unet.named_parameters()), (
        "EMA weights should differ from the raw weights"
    )
    assert set(exported.unet.state_dict()) == set(loaded.unet.state_dict())


def test_a_checkpoint_resumes_only_on_the_device_kind_it_was_made_on(tmp_path: Path) -> None:
    """A CUDA noise stream cannot continue on the CPU (or back): resume says so plainly."""
    data = _data(10)
    Trainer(_model(), data, TrainingConfig(total_steps=5, batch_size=4)).train(
        1, progress=False, checkpoint_dir=tmp_path
    )
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert state["device_type"] == "cpu"
    state["device_type"] = "cuda"
    torch.save(state, tmp_path / "trainer_state.pt")
    with pytest.raises(ConflictError, match="trained on cuda"):
        Trainer.resume(tmp_path, data)
    # export needs no trainer and works wherever the weights were made
    exported = export_checkpoint(tmp_path, tmp_path / "out", "v-test")
    assert next(exported.unet.parameters()).device.type == "cpu"


def test_a_device_name_is_checked_before_anything_runs() -> None:
    from riffloop.music import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValidationError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValidationError, match="no CUDA"):
            resolve_device("cuda")


# -- preference pairs (Diffusion-DPO) --------------------------------------------------------


def _pairs(n: int = 8, liked: float = 0.5, disliked: float = -0.5) -> MelDataset:
    winners, losers = torch.full((n, 1, 16, 16), liked), torch.full((n, 1, 16, 16), disliked)
    return MelDataset.from_images(winners, manifest={"source": "pairs"}, losers=losers)


def _preference_gap(trainer: Trainer, data: MelDataset) -> float:
    """Mean d_θ(x^w) − d_θ(x^l) on held-out t and ε: below 0 where the fine-tune favours the
    winners against the parent more than it favours the losers."""
    trainer.model.unet.eval()
    gaps = []
    for seed in range(4):
        g = torch.Generator().manual_seed(200 + seed)
        k = data.images.shape[0]
        t = torch.randint(0, 1000, (k,), generator=g)
        eps = torch.randn(data.images.shape, generator=g)
        x0 = torch.cat([data.images, cast(torch.Tensor, data.losers)])
        t2, eps2 = t.repeat(2), eps.repeat(2, 1, 1, 1)
        x_t = trainer.model.scheduler.add_noise(x0, eps2, t2)
        with torch.no_grad():
            own = ((trainer.model.unet(x_t, t2).sample - eps2) ** 2).mean(dim=(1, 2, 3))
            ref = ((trainer.reference_prediction(x_t, t2) - eps2) ** 2).mean(dim=(1, 2, 3))
        d = own - ref
        gaps.append(float((d[:k] - d[k:]).mean()))
    trainer.model.unet.train()
    return sum(gaps) / len(gaps)


@pytest.mark.parametrize("lora", [LoraSettings(rank=4, alpha=4), None], ids=["lora", "full"])
def test_preference_pairs_move_the_model_toward_the_liked_image_and_a_swap_reverses_it(
    lora: LoraSettings | None,
) -> None:
    config = TrainingConfig(
        total_steps=30, batch_size=8, learning_rate=3e-3, lora=lora, preference_beta=500.0
    )
    liked_plus = Trainer(_model(), _pairs(), config)
    start = _preference_gap(liked_plus, _pairs())
    assert start == pytest.approx(0.0, abs=1e-6)  # at step 0 the model is its own reference
    first = liked_plus.compute_preference_loss(liked_plus.next_preference_batch())
    # ℓ = −log σ(0) = log 2, plus the anchor: the winners' ε loss
    assert math.log(2) < first.item() < math.log(2) + 2.0
    liked_plus.train(progress=False)
    assert _preference_gap(liked_plus, _pairs()) < -1e-4

    liked_minus = Trainer(_model(), _pairs(liked=-0.5, disliked=0.5), config)
    liked_minus.train(progress=False)
    # the same images, judged the other way round: the +0.5 image now loses ground
    assert _preference_gap(liked_minus, _pairs()) > 1e-4


def test_preference_replay_is_mixed_into_the_same_step() -> None:
    config = TrainingConfig(
        total_steps=2,
        batch_size=8,
        replay_ratio=0.5,
        preference_beta=100.0,
        lora=LoraSettings(rank=2),
    )
    trainer = Trainer(_model(), _pairs(), config, replay=_data(6, seed=2))
    batch = trainer.next_preference_batch()
    assert batch.winners.shape[0] == 4 and batch.losers.shape[0] == 4
    assert batch.replay is not None and batch.replay.shape[0] == 4
    loss = trainer.compute_preference_loss(batch)
    assert loss.item() > math.log(2)  # ℓ at the start plus the replay samples' ε loss
    batch.omega = torch.zeros_like(batch.omega)  # pairs of ω = 0 alone: nothing, not 0 / 0
    batch.replay = None
    assert trainer.compute_preference_loss(batch).item() == 0.0
    trainer.train(progress=False)
    assert trainer.step_count == 2


def test_preference_data_and_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="preference_beta"):
        TrainingConfig(total_steps=1, preference_beta=-1.0)
    with pytest.raises(ValidationError, match="preference_beta"):
        TrainingConfig(total_steps=1, preference_beta=math.inf)
    with pytest.raises(ValidationError, match="one loser per image"):
        MelDataset.from_images(torch.zeros(4, 1, 16, 16), losers=torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValidationError, match="NaN"):
        MelDataset.from_images(
            torch.zeros(2, 1, 16, 16), losers=torch.full((2, 1, 16, 16), math.nan)
        )
    config = TrainingConfig(total_steps=3, batch_size=4, preference_beta=10.0)
    with pytest.raises(ValidationError, match="preference pairs"):
        Trainer(_model(), _data(4), config)
    plain = Trainer(_model(), _data(4), TrainingConfig(total_steps=1, batch_size=4))
    with pytest.raises(ConflictError, match="no parent copy"):
        plain.reference_prediction(torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long))
    assert _pairs().describe()["preference_pairs"] is True
    assert _pairs().fingerprint() != _pairs(disliked=-0.4).fingerprint()
    Trainer(_model(), _pairs(), config).train(1, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ConflictError, match="data"):  # other losers are other data
        Trainer.resume(tmp_path, _pairs(disliked=-0.4))
    assert Trainer.resume(tmp_path, _pairs()).step_count == 1

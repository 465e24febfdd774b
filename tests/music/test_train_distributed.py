"""Data-parallel training: two CPU processes on gloo take the steps one process takes with the
same global batch (full and LoRA, ω-weighted with replay), only rank 0 writes the checkpoint,
and a two-rank checkpoint resumes in one process as if the run had never been split."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from riffloop.core import ValidationError
from riffloop.music import (
    LoraSettings,
    MelConfig,
    MelDataset,
    ModelConfig,
    MusicDiffusion,
    Trainer,
    TrainingConfig,
)
from riffloop.music._distributed import TrainingWorld, init_training_world

pytestmark = [pytest.mark.unit, pytest.mark.slow]

TINY_MEL = MelConfig(n_mels=16, x_res=16, n_fft=256, hop_length=64)
WORLD = 2
FIRST_STEPS = 3  # trained split over the ranks, then checkpointed
TOTAL_STEPS = 5  # the last two resumed in one process


def _data() -> tuple[MelDataset, MelDataset]:
    g = torch.Generator().manual_seed(7)
    images = torch.rand((11, 1, 16, 16), generator=g) * 2 - 1
    # unequal ω: a per-shard Σω normalisation would give a different step than the global one
    weights = torch.rand(11, generator=g) * 3 + 0.1
    data = MelDataset.from_images(images, weights, {"source": "test"})
    replay = MelDataset.from_images(torch.rand((6, 1, 16, 16), generator=g) * 2 - 1)
    return data, replay


def _configs() -> dict[str, TrainingConfig]:
    # batch 5 over 2 ranks: shards of 3 and 2 samples; replay 2 of the 5
    common = {
        "total_steps": TOTAL_STEPS,
        "batch_size": 5,
        "learning_rate": 1e-3,
        "warmup_fraction": 0.0,
        "replay_ratio": 0.4,
        "replay_weight": 0.5,
        "log_every": 1,
    }
    return {
        "full": TrainingConfig(**common),
        "lora": TrainingConfig(**common, lora=LoraSettings(rank=4, alpha=4)),
    }


def _trainer(name: str, world: TrainingWorld | None = None) -> Trainer:
    data, replay = _data()
    model = MusicDiffusion.create(ModelConfig.preset("tiny"), TINY_MEL, seed=3)
    return Trainer(model, data, _configs()[name], replay=replay, world=world)


def _snapshot(trainer: Trainer) -> dict[str, Any]:
    return {
        "unet": {k: v.detach().clone() for k, v in trainer.model.unet.state_dict().items()},
        "ema": {k: v.clone() for k, v in trainer.ema.items()},
        "losses": list(trainer.loss_history),
        "step": trainer.step_count,
    }


def _rank_main(rank: int, port: int, out: str) -> None:
    """One rank, as torchrun would start it (the world comes from the environment)."""
    torch.set_num_threads(1)
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(WORLD),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    os.environ.update(env)
    world, device = init_training_world("cpu", timeout_s=120)
    assert world == TrainingWorld(rank=rank, world_size=WORLD, local_rank=rank)
    assert torch.distributed.get_backend() == "gloo" and device.type == "cpu"
    results = {}
    for name in _configs():
        trainer = _trainer(name, world)
        trainer.train(FIRST_STEPS, progress=False, checkpoint_dir=Path(out) / f"ckpt-{name}")
        results[name] = _snapshot(trainer)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    """Float tolerance: a shard's convolutions and the all-reduce sum in another order than one
    batch's, and Adam's g / √v turns that rounding noise into steps of up to lr wherever the
    true gradient is near 0 (the attention key biases: softmax is invariant to them). Measured
    after 3 steps at lr 1e-3: on one machine ≤ 8.4e-6 everywhere (LoRA ≤ 2.3e-6) but the key
    biases (≤ 3.3e-5); on an AMD EPYC (session 16) 3.6e-5 in a convolution too. 1e-4 stays ten
    times below the move the test requires of training (> 1e-3)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=f"{what} {key}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(
        _rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn"
    )
    return out


@pytest.mark.parametrize("name", ["full", "lora"])
def test_two_gloo_ranks_take_the_steps_of_one_process(two_ranks: Path, name: str) -> None:
    torch.set_num_threads(1)
    single = _trainer(name)
    single.train(FIRST_STEPS, progress=False)
    expected = _snapshot(single)
    ranks = [torch.load(two_ranks / f"rank{r}.pt", weights_only=True)[name] for r in range(WORLD)]
    for got in ranks:
        assert got["step"] == FIRST_STEPS
        _assert_close(got["unet"], expected["unet"], "weights")
        _assert_close(got["ema"], expected["ema"], "EMA")
        assert [s for s, _ in got["losses"]] == [s for s, _ in expected["losses"]]
        for (_, a), (_, b) in zip(got["losses"], expected["losses"], strict=True):
            assert a == pytest.approx(b, rel=1e-5)  # the global batch's loss on every rank
    # the ranks agree with each other bit for bit (DDP hands both the same averaged gradient)
    for key, tensor in ranks[0]["unet"].items():
        assert torch.equal(tensor, ranks[1]["unet"][key]), key
    # training moved the weights far more than the two runs differ
    moved = max(
        float((expected["unet"][k] - v).abs().max())
        for k, v in _trainer(name).model.unet.state_dict().items()
    )
    assert moved > 1e-3


@pytest.mark.parametrize("name", ["full", "lora"])
def test_a_two_rank_checkpoint_resumes_in_one_process(two_ranks: Path, name: str) -> None:
    torch.set_num_threads(1)
    folder = two_ranks / f"ckpt-{name}"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "trainer_state.pt"]
    data, replay = _data()
    resumed = Trainer.resume(folder, data, replay=replay)
    assert resumed.step_count == FIRST_STEPS
    resumed.train(progress=False)
    uninterrupted = _trainer(name)
    uninterrupted.train(progress=False)
    assert resumed.step_count == uninterrupted.step_count == TOTAL_STEPS
    _assert_close(_snapshot(resumed)["unet"], _snapshot(uninterrupted)["unet"], "resumed")
    _assert_close(resumed.ema, uninterrupted.ema, "resumed EMA")


def test_one_process_is_the_default_and_the_world_is_checked() -> None:
    world, device = init_training_world("cpu", environ={})
    assert world == TrainingWorld() and not world.distributed and world.is_main
    assert device.type == "cpu" and not torch.distributed.is_initialized()
    assert TrainingWorld.from_env({"WORLD_SIZE": "4", "RANK": "3"}).local_rank == 3
    assert TrainingWorld(rank=1, world_size=2).shard(5) == slice(1, 5, 2)
    with pytest.raises(ValidationError):
        TrainingWorld(rank=2, world_size=2)
    with pytest.raises(ValidationError):
        TrainingWorld.from_env({"WORLD_SIZE": "two"})

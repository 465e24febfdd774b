"""MusicDiffusion: presets, save/load round trip, teticio/audio-diffusion folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from riffloop.core import NotFoundError, ValidationError
from riffloop.music import MelConfig, ModelConfig, MusicDiffusion

pytestmark = pytest.mark.unit

TINY_MEL = MelConfig(n_mels=16, x_res=16, n_fft=256, hop_length=64)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _output(model: MusicDiffusion, seed: int = 0) -> torch.Tensor:
    x = torch.randn((2, *model.image_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.unet(x, torch.tensor([10, 900])).sample


def test_cpu_small_preset_matches_the_measured_architecture() -> None:
    model = MusicDiffusion.create(ModelConfig.preset("cpu_small"))
    assert 2_400_000 < model.num_parameters() < 3_000_000
    assert model.image_shape == (1, 64, 64)
    assert model.prediction_type == "v_prediction"
    assert model.scheduler.config.num_train_timesteps == 1000
    assert model.mel == MelConfig.preset(64)


def test_create_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = MusicDiffusion.create(ModelConfig.preset("tiny"), TINY_MEL, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b = MusicDiffusion.create(ModelConfig.preset("tiny"), TINY_MEL, seed=7)
    c = MusicDiffusion.create(ModelConfig.preset("tiny"), TINY_MEL, seed=8)
    assert torch.equal(_output(a), _output(b))
    assert not torch.equal(_output(a), _output(c))


def test_create_rejects_a_mel_config_of_another_size() -> None:
    with pytest.raises(ValidationError, match="16"):
        MusicDiffusion.create(ModelConfig.preset("tiny"), MelConfig.preset(64))
    with pytest.raises(ValidationError):
        ModelConfig.preset("huge")
    with pytest.raises(ValidationError):
        ModelConfig.from_dict({**ModelConfig.preset("tiny").to_dict(), "dropout": 0.1})


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = MusicDiffusion.create(ModelConfig.preset("tiny"), TINY_MEL, seed=1, version="m2")
    model.parent = "m1"
    model.card["training"] = {"steps": 5}
    folder = model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == [
        "mel_config.json",
        "model_card.json",
        "scheduler",
        "unet",
    ]
    loaded = MusicDiffusion.from_pretrained(folder)
    assert (loaded.version, loaded.parent) == ("m2", "m1")
    assert loaded.mel == TINY_MEL
    assert loaded.prediction_type == "v_prediction"
    assert loaded.card["training"] == {"steps": 5}
    assert loaded.card["model_config"] == ModelConfig.preset("tiny").to_dict() | {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    }
    assert torch.equal(_output(model), _output(loaded))
    card = json.loads((folder / "model_card.json").read_text())
    assert card["version"] == "m2"


def test_save_replaces_an_existing_folder(tmp_path: Path) -> None:
    first = MusicDiffusion.create(ModelConfig.preset("tiny"), TINY_MEL, seed=1, version="a")
    second = MusicDiffusion.create(ModelConfig.preset("tiny"), TINY_MEL, seed=2, version="b")
    first.save_pretrained(tmp_path / "m")
    second.save_pretrained(tmp_path / "m")
    loaded = MusicDiffusion.from_pretrained(tmp_path / "m")
    assert loaded.version == "b"
    assert torch.equal(_output(loaded), _output(second))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def _teticio_folder(root: Path, y_res: int = 16) -> Path:
    """A folder laid out like teticio/audio-diffusion-*: model_index.json, unet/ (3-level UNet,
    ε-prediction), scheduler/ (a DDPM config) and mel/mel_config.json."""
    unet = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )
    unet.save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    (root / "mel").mkdir()
    mel = {
        "_class_name": "Mel",
        "x_res": 16,
        "y_res": y_res,
        "sample_rate": 22050,
        "n_fft": 256,
        "hop_length": 64,
        "top_db": 80,
        "n_iter": 32,
    }
    (root / "mel" / "mel_config.json").write_text(json.dumps(mel))
    index = {
        "_class_name": "AudioDiffusionPipeline",
        "mel": ["audio_diffusion", "Mel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_loads_a_teticio_style_folder(tmp_path: Path) -> None:
    folder = _teticio_folder(tmp_path / "audio-diffusion-16")
    model = MusicDiffusion.from_pretrained(folder)
    assert model.mel == TINY_MEL
    assert model.prediction_type == "epsilon"
    assert type(model.scheduler).__name__ == "DDIMScheduler"
    assert model.vqvae is None
    assert model.version == "audio-diffusion-16"
    # Re-saving writes our layout, which loads to the same network.
    again = MusicDiffusion.from_pretrained(model.save_pretrained(tmp_path / "ours"))
    assert torch.equal(_output(model), _output(again))


def test_rejects_a_unet_that_does_not_fit_the_mel_images(tmp_path: Path) -> None:
    folder = _teticio_folder(tmp_path / "mismatch", y_res=32)
    with pytest.raises(ValidationError, match="UNet expects"):
        MusicDiffusion.from_pretrained(folder)


def test_missing_or_incomplete_folders(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        MusicDiffusion.from_pretrained(tmp_path / "nothing")
    folder = _teticio_folder(tmp_path / "no-mel")
    (folder / "mel" / "mel_config.json").unlink()
    with pytest.raises(ValidationError, match="no mel config"):
        MusicDiffusion.from_pretrained(folder)

"""The trainer serves the trained base model by default (assets/base-model, docs/BASE_MODEL.md):
an untrained model only behind RIFFLOOP_UNTRAINED_BASE, and no start at all without either.

The last test shows why: samples of the model the default trainer publishes are music-like by
the corpus's own spectral flatness, the untrained model's are not, by the same check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from riffloop.core import ConfigurationError
from services.trainer import BUNDLED_BASE_MODEL, TrainerHandlers, TrainerSettings, build
from tests.services.conftest import OPERATOR_SECRET, shared_ports

REPO = Path(__file__).resolve().parents[2]

# Held-out corpus windows' mean spectral flatness (docs/BASE_MODEL.md, base-v2 table: 0.0315),
# the reference when the corpus is not built on this machine.
DOCUMENTED_HELDOUT_FLATNESS = 0.0315
MUSIC_LIKE = 1.5  # the bar: flatness within 1.5× of the corpus's, either way


def test_the_default_is_the_bundled_trained_model() -> None:
    settings = TrainerSettings()
    assert not settings.untrained_base
    assert settings.base_model_path() == BUNDLED_BASE_MODEL == REPO / "assets" / "base-model"
    assert TrainerSettings(base_model_dir=str(BUNDLED_BASE_MODEL)).base_model_path() == (
        BUNDLED_BASE_MODEL
    )
    assert TrainerSettings(untrained_base=True).base_model_path() is None


def test_without_a_trained_model_or_the_flag_the_trainer_refuses_to_start(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for missing in (empty, tmp_path / "absent"):
        # parses: checked at start (with the operator secret a deployment has, so the
        # missing model is what refuses)
        settings = TrainerSettings(base_model_dir=str(missing), operator_secret=OPERATOR_SECRET)
        with pytest.raises(ConfigurationError, match="RIFFLOOP_UNTRAINED_BASE=1"):
            build(settings, shared_ports())
    with pytest.raises(ConfigurationError, match="exclude each other"):
        TrainerSettings(untrained_base=True, base_model_dir=str(BUNDLED_BASE_MODEL))


@pytest.mark.slow
def test_the_trainer_process_exits_2_without_a_base_model(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIFFLOOP_")}
    env.update(
        PYTHONPATH=str(REPO),
        RIFFLOOP_BASE_MODEL_DIR=str(tmp_path / "absent"),
        RIFFLOOP_DATA_DIR=str(tmp_path / "data"),
        RIFFLOOP_GRPC_PORT="0",
        RIFFLOOP_METRICS_PORT="0",
    )
    result = subprocess.run(
        [sys.executable, "-m", "services.trainer"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no trained base model" in result.stderr and "Traceback" not in result.stderr


def _corpus_flatness(top_db: float, resolution: int) -> tuple[float, str]:
    """Mean spectral flatness of the corpus's held-out windows (music the model never saw), as
    ``python -m riffloop.music evaluate`` computes it; the documented figure without a corpus."""
    from riffloop.music import spectral_flatness
    from riffloop.music._corpus import corpus_dir, load_corpus

    mel_dir = corpus_dir() / f"mel-{resolution}x{resolution}"
    if (mel_dir / "manifest.json").is_file():
        images = load_corpus(mel_dir, "heldout").images
        return float(spectral_flatness(images, top_db=top_db).mean()), str(mel_dir)
    return DOCUMENTED_HELDOUT_FLATNESS, "docs/BASE_MODEL.md"


@pytest.mark.slow
def test_the_default_base_model_draws_music_like_tracks_and_an_untrained_one_does_not() -> None:
    """What the trainer publishes as v0001, loaded as a generator loads it: 8 unconditional
    20-step DDIM samples from seeded noise. The default (trained) model's mean spectral
    flatness lies within 1.5× of the corpus's; the untrained smoke-test model's (same
    architecture, cpu_small) does not, by the same check."""
    from riffloop.music import spectral_flatness
    from riffloop.music._ddim import generate

    flatness: dict[str, float] = {}
    reference, source = 0.0, ""
    cheap_index = {"baseline_rows": 2, "baseline_inversion_steps": 2}  # not what is judged
    for name, settings in (
        ("default", TrainerSettings(**cheap_index)),
        ("untrained", TrainerSettings(untrained_base=True, base_preset="cpu_small", **cheap_index)),
    ):
        ports = shared_ports()
        ports.prepare(settings.kafka_partitions)
        core = TrainerHandlers(settings, ports)
        version = core.ensure_base()
        model = core.store.load(version)  # what a generator serves
        assert (version, model.parent) == ("v0001", None)
        x_t = torch.randn((8, *model.image_shape), generator=torch.Generator().manual_seed(0))
        samples = generate(model, x_t, steps=20)
        flatness[name] = float(spectral_flatness(samples, top_db=model.mel.top_db).mean())
        if not reference:
            reference, source = _corpus_flatness(model.mel.top_db, model.mel.n_mels)
    ratio = {k: max(v / reference, reference / v) for k, v in flatness.items()}
    print(
        f"\nspectral flatness vs corpus {reference:.4f} ({source}): "
        + ", ".join(f"{k} {flatness[k]:.4f} ({ratio[k]:.2f}×)" for k in flatness)
    )
    assert ratio["default"] <= MUSIC_LIKE, flatness
    assert ratio["untrained"] > MUSIC_LIKE, flatness

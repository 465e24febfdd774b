"""The trainer's settings (``RIFFLOOP_*``): the release cycle's, the bootstrap's, the launcher's."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from riffloop.core import ConfigurationError, ValidationError
from riffloop.runtime import OperatorGuarded

# The trained base model shipped with the code (docs/BASE_MODEL.md): <root>/assets/base-model,
# /app/assets/base-model in the trainer image (services/trainer/Dockerfile copies it there).
BUNDLED_BASE_MODEL = Path(__file__).resolve().parents[2] / "assets" / "base-model"


@dataclasses.dataclass(frozen=True, repr=False)
class TrainerSettings(OperatorGuarded):
    service_name: str = "trainer"
    grpc_port: int = 50056
    metrics_port: int = 9106
    # Bootstrap: the trained base model, a MusicDiffusion folder; "" = the bundled
    # assets/base-model next to the code (/app/assets/base-model in the trainer image).
    base_model_dir: str = ""
    # Smoke tests only: publish a fresh, untrained ``base_preset`` model (its samples are noise)
    # instead of a trained one. Never set together with base_model_dir.
    untrained_base: bool = False
    base_preset: str = "cpu_small"
    # The baseline index Z_V stored with every version (riffloop.music.TrainingIndex): a base
    # model folder that ships baseline-index.safetensors is published with it; otherwise the
    # trainer builds it from ``baseline_rows`` windows strided through the train split of the
    # corpus mel folder ``base_corpus_dir`` (the untrained smoke-test model: synthetic tones),
    # each inverted with ``baseline_inversion_steps`` DDIM steps (the encoder's default).
    base_corpus_dir: str = ""
    baseline_rows: int = 256
    baseline_inversion_steps: int = 50
    # A new version inverts only its new rows and carries the older ones over, except every
    # this-many-th version in a row, which inverts every row again (1: always; measured in
    # riffloop/music/_training_index.py)
    baseline_refresh_every: int = 3
    # Training runs in the consumer thread (between polls): allow it up to 30 min per set.
    kafka_max_poll_interval_s: float = 1800.0
    # Fine-tune (riffloop.loop.CycleSettings): LoRA adapters (rank, alpha; rank 0 = every UNet
    # weight), the loop experiment's recipe — the one under which selection beat a random
    # control (docs/LOOP.md §7) — with half of each batch replayed from the base corpus.
    finetune_steps: int = 60
    batch_size: int = 8
    learning_rate: float = 5e-4
    warmup_fraction: float = 0.1
    ema_decay: float = 0.0
    replay_ratio: float = 0.5
    lora_rank: int = 8
    lora_alpha: int = 8
    # β of the preference loss (Diffusion-DPO) for sets whose pairs name losers (the selector's
    # RIFFLOOP_PREFERENCE_PAIRS); 0 = the ω-weighted ε loss. Exploratory (docs/LOOP.md §5).
    preference_beta: float = 0.0
    # What a kept track teaches: "first" (its first window) or "all" (every window the listener
    # heard, each with the track's ω). Exploratory (docs/LOOP.md §5).
    train_windows: str = "first"
    steps_per_chunk: int = 10
    # Progress (adapters, optimiser state, step) saved to the object store every this many
    # steps, so a killed trainer resumes the fine-tune there; 0 = never.
    finetune_save_every: int = 20
    gate_mode: str = "offline"  # "offline" or "skip"
    gate_samples: int = 16
    gate_steps: int = 20
    # Canary: the share of requests a gated candidate serves before it is promoted or rolled
    # back (riffloop.loop.Canary on the margins of each version's generations over their
    # baselines); 0 = promote at once and watch afterwards.
    canary_share: float = 0.2
    canary_min_ratings: int = 20
    canary_max_ratings: int = 200
    canary_alpha: float = 0.05
    torch_threads: int = 1
    # Where fine-tuning runs: auto (the GPU when the pod has one, else the CPU), cpu, cuda,
    # cuda:N. The candidate comes back to the CPU for the gate and for serving.
    device: str = "auto"
    # Or fine-tune in a Kubeflow PyTorchJob (data-parallel GPU pods): "pytorchjob" creates one
    # per training set from the PyTorchJob manifest ``train_job_template`` (a mounted ConfigMap)
    # with its bundle in ``train_job_dir``, a volume the job's pods mount at the same path
    # (riffloop/music/_pytorchjob.py; RBAC and volumes in docs/DEPLOY.md).
    train_launcher: str = "in_process"  # in_process | pytorchjob
    train_job_template: str = ""
    train_job_dir: str = ""

    def _validate(self) -> None:
        super()._validate()
        from riffloop.music import ModelConfig, resolve_device

        if self.base_preset not in ModelConfig.PRESET_NAMES:
            raise ConfigurationError(
                f"RIFFLOOP_BASE_PRESET must be one of {', '.join(ModelConfig.PRESET_NAMES)}, "
                f"got {self.base_preset!r}"
            )
        try:
            self.cycle_settings()
        except ValidationError as exc:  # "<field> must …": named as the variable
            name, _, rest = exc.reason.partition(" ")
            raise ConfigurationError(f"RIFFLOOP_{name.upper()} {rest}") from None
        if self.base_corpus_dir and not (Path(self.base_corpus_dir) / "manifest.json").is_file():
            raise ConfigurationError(
                f"RIFFLOOP_BASE_CORPUS_DIR {self.base_corpus_dir} is no corpus mel folder"
            )
        if self.untrained_base and self.base_model_dir:
            raise ConfigurationError(
                "RIFFLOOP_UNTRAINED_BASE and RIFFLOOP_BASE_MODEL_DIR exclude each other: the "
                "first publishes a fresh, untrained model, the second a trained one"
            )
        try:
            resolve_device(self.device)  # a GPU named here must exist at start-up
        except ValidationError as exc:
            raise ConfigurationError(f"RIFFLOOP_DEVICE: {exc.reason}") from None
        if self.train_launcher not in ("in_process", "pytorchjob"):
            raise ConfigurationError("RIFFLOOP_TRAIN_LAUNCHER must be in_process or pytorchjob")
        if self.train_launcher == "pytorchjob" and self.preference_beta > 0:
            raise ConfigurationError(
                "RIFFLOOP_PREFERENCE_BETA > 0 trains in one process: it needs "
                "RIFFLOOP_TRAIN_LAUNCHER=in_process (a PyTorchJob trains data-parallel)"
            )
        if self.train_launcher == "pytorchjob" and not (
            self.train_job_template and self.train_job_dir
        ):
            raise ConfigurationError(
                "RIFFLOOP_TRAIN_LAUNCHER=pytorchjob needs RIFFLOOP_TRAIN_JOB_TEMPLATE and "
                "RIFFLOOP_TRAIN_JOB_DIR"
            )

    def cycle_settings(self) -> Any:
        """The release cycle's share of these settings (riffloop.loop.CycleSettings)."""
        from riffloop.loop import CycleSettings

        names = {f.name for f in dataclasses.fields(CycleSettings)}
        return CycleSettings(**{n: getattr(self, n) for n in names if hasattr(self, n)})

    def base_model_path(self) -> Path | None:
        """The trained base model's folder, or None with ``untrained_base``. Checked when the
        trainer starts (not when the settings parse, so a manifest's settings can be checked
        where the image's folder does not exist): no trained model and no flag → refuse."""
        if self.untrained_base:
            return None
        path = Path(self.base_model_dir) if self.base_model_dir else BUNDLED_BASE_MODEL
        if not (path / "unet").is_dir() or not (path / "model_card.json").is_file():
            where = "RIFFLOOP_BASE_MODEL_DIR" if self.base_model_dir else "the bundled default"
            raise ConfigurationError(
                f"no trained base model at {path} ({where}): point RIFFLOOP_BASE_MODEL_DIR at a "
                "MusicDiffusion folder (docs/BASE_MODEL.md), or set RIFFLOOP_UNTRAINED_BASE=1 "
                "for a smoke test with an untrained model, whose tracks are noise"
            )
        return path

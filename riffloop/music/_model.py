"""The diffusion model: a diffusers ``UNet2DModel`` ε_θ/v_θ over mel images, its
``DDIMScheduler`` (1000 training steps) and the ``MelConfig`` the images were made with.

Folder layout written by :meth:`MusicDiffusion.save_pretrained` (diffusers' own sub-folders, so
``UNet2DModel.from_pretrained(dir, subfolder="unet")`` works on it directly)::

    <dir>/unet/config.json, diffusion_pytorch_model.safetensors
    <dir>/scheduler/scheduler_config.json
    <dir>/vqvae/...                       (only for latent models)
    <dir>/mel_config.json                 MelConfig.to_dict()
    <dir>/model_card.json                 version, parent, model config name, training manifest
    <dir>/baseline-index.safetensors      the version's training index Z_V (TrainingIndex), if built

:meth:`MusicDiffusion.from_pretrained` also reads a teticio/audio-diffusion folder (``unet/``,
``scheduler/`` — their DDPM config is read as DDIM —, optional ``vqvae/``, and
``mel/mel_config.json`` with ``x_res``/``y_res``) and checks that the UNet fits the mel images
before returning.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

from riffloop.core import NotFoundError, ValidationError
from riffloop.music._mel import MelConfig

__all__ = ["ModelConfig", "MusicDiffusion", "PredictionType"]

PredictionType = Literal["epsilon", "v_prediction"]
_PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
NUM_TRAIN_TIMESTEPS = 1000

MEL_CONFIG_FILE = "mel_config.json"
MODEL_CARD_FILE = "model_card.json"
INDEX_FILE = "baseline-index.safetensors"  # riffloop.music._training_index.INDEX_FILE


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the UNet and the prediction target. Use :meth:`preset`."""

    name: str
    resolution: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int = 8
    prediction_type: str = "v_prediction"

    PRESET_NAMES: ClassVar[tuple[str, ...]] = ("cpu_small", "gpu_256", "tiny")

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if n == 0 or len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValidationError(
                "block_out_channels, down and up block types must match in length"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValidationError(
                f"every block width must be a multiple of norm_num_groups={self.norm_num_groups}"
            )
        if self.resolution % (2 ** (n - 1)):
            raise ValidationError(f"resolution {self.resolution} is not divisible by 2^{n - 1}")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValidationError(
                f"prediction_type must be one of {_PREDICTION_TYPES}, got {self.prediction_type!r}"
            )

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """``cpu_small``: 64 × 64, widths (16, 32, 64, 128), one layer per block, attention at the
        lowest resolution, ≈2.7 M parameters (≈16–25 img/s training on 2 cores, design.md §7).
        ``gpu_256``: teticio/audio-diffusion-256's UNet (≈114 M parameters). ``tiny``: 16 × 16,
        for tests."""
        if name == "cpu_small":
            return cls(
                name=name,
                resolution=64,
                block_out_channels=(16, 32, 64, 128),
                down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
            )
        if name == "gpu_256":
            return cls(
                name=name,
                resolution=256,
                block_out_channels=(128, 128, 256, 256, 512, 512),
                down_block_types=(
                    "DownBlock2D",
                    "DownBlock2D",
                    "DownBlock2D",
                    "DownBlock2D",
                    "AttnDownBlock2D",
                    "DownBlock2D",
                ),
                up_block_types=(
                    "UpBlock2D",
                    "AttnUpBlock2D",
                    "UpBlock2D",
                    "UpBlock2D",
                    "UpBlock2D",
                    "UpBlock2D",
                ),
                layers_per_block=2,
                norm_num_groups=32,
            )
        if name == "tiny":
            return cls(
                name=name,
                resolution=16,
                block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=4,
                attention_head_dim=4,
            )
        raise ValidationError(f"no model preset {name!r}; choose one of {cls.PRESET_NAMES}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValidationError(f"unknown model config keys: {', '.join(unknown)}")
        values = dict(data)
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def build_unet(self) -> UNet2DModel:
        return UNet2DModel(
            sample_size=self.resolution,
            in_channels=1,
            out_channels=1,
            block_out_channels=self.block_out_channels,
            down_block_types=self.down_block_types,
            up_block_types=self.up_block_types,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            attention_head_dim=self.attention_head_dim,
        )

    def build_scheduler(self) -> DDIMScheduler:
        # diffusers defaults relied on: linear β from 1e-4 to 0.02, clip_sample to [−1, 1],
        # set_alpha_to_one, "leading" timestep spacing.
        return DDIMScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type=self.prediction_type
        )


def architecture_of(unet: UNet2DModel) -> dict[str, Any]:
    """The UNet config entries that decide the shapes of its weights (for resume checks)."""
    keys = (
        "sample_size",
        "in_channels",
        "out_channels",
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "layers_per_block",
        "norm_num_groups",
        "attention_head_dim",
    )
    out: dict[str, Any] = {}
    for key in keys:
        value = unet.config.get(key)
        out[key] = list(value) if isinstance(value, list | tuple) else value
    return out


@dataclass
class MusicDiffusion:
    """UNet + scheduler + mel config + lineage. ``vqvae`` is None for our pixel-space models."""

    unet: UNet2DModel
    scheduler: DDIMScheduler
    mel: MelConfig
    version: str = "untrained"
    parent: str | None = None
    vqvae: AutoencoderKL | None = None
    card: dict[str, Any] = field(default_factory=dict)
    # Z_V, the version's training latents for the baseline z0 (riffloop.music.TrainingIndex);
    # saved beside the weights as ``baseline-index.safetensors``. None until one is built.
    baseline_index: Any = None

    def __post_init__(self) -> None:
        self.check_architecture()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        config: ModelConfig,
        mel: MelConfig | None = None,
        seed: int = 0,
        version: str = "untrained",
    ) -> MusicDiffusion:
        """A freshly initialised model; weights depend only on ``seed``."""
        mel = mel or MelConfig.preset(config.resolution)
        if (mel.n_mels, mel.x_res) != (config.resolution, config.resolution):
            raise ValidationError(
                f"model {config.name} works on {config.resolution}² images but the mel config "
                f"makes {mel.n_mels} × {mel.x_res}"
            )
        devices: list[int] = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            unet = config.build_unet()
        return cls(
            unet=unet,
            scheduler=config.build_scheduler(),
            mel=mel,
            version=version,
            card={"model_config": config.to_dict()},
        )

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of what the UNet denoises (latents when a VAE is present)."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(h), int(w))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def check_architecture(self) -> None:
        """The UNet must map the mel images (or their VAE latents) to themselves."""
        cfg = self.unet.config
        if cfg.in_channels != cfg.out_channels:
            raise ValidationError("UNet in_channels and out_channels differ")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValidationError(f"unsupported prediction_type {self.prediction_type!r}")
        _, h, w = self.image_shape
        expected: tuple[int, int] = (self.mel.n_mels, self.mel.x_res)
        channels = 1
        if self.vqvae is not None:
            factor = 2 ** (len(self.vqvae.config.block_out_channels) - 1)
            expected = (self.mel.n_mels // factor, self.mel.x_res // factor)
            channels = int(self.vqvae.config.latent_channels)
        if cfg.in_channels != channels or (h, w) != expected:
            raise ValidationError(
                f"UNet expects {cfg.in_channels}×{h}×{w} but the mel config gives "
                f"{channels}×{expected[0]}×{expected[1]}"
            )
        if self.scheduler.config.num_train_timesteps != NUM_TRAIN_TIMESTEPS:
            raise ValidationError("scheduler must have 1000 training timesteps")

    def to(self, device: str | torch.device) -> MusicDiffusion:
        self.unet.to(device)
        if self.vqvae is not None:
            self.vqvae.to(device)
        return self

    # -- persistence ----------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the folder atomically: into a sibling temp dir, then rename over ``directory``."""
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is for everyone to read
        self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(tmp / "scheduler")
        if self.vqvae is not None:
            self.vqvae.save_pretrained(tmp / "vqvae", safe_serialization=True)
        (tmp / MEL_CONFIG_FILE).write_text(json.dumps(self.mel.to_dict(), indent=2) + "\n")
        card = dict(self.card)
        card.update(version=self.version, parent=self.parent)
        (tmp / MODEL_CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        if self.baseline_index is not None:
            self.baseline_index.save(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                _rmtree(old)
            target.rename(old)
            tmp.rename(target)
            _rmtree(old)
        else:
            tmp.rename(target)
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> MusicDiffusion:
        """Load our layout or a teticio/audio-diffusion folder; raises ``NotFoundError`` when
        the folder is missing and ``ValidationError`` when its parts do not fit together."""
        root = Path(directory)
        if not (root / "unet").is_dir():
            raise NotFoundError(f"no model at {root} (missing unet/)")
        if not (root / "scheduler").is_dir():
            raise ValidationError(f"model at {root} has no scheduler/")
        mel = _read_mel_config(root)
        unet = UNet2DModel.from_pretrained(root / "unet")
        scheduler = DDIMScheduler.from_pretrained(root / "scheduler")
        vqvae = AutoencoderKL.from_pretrained(root / "vqvae") if (root / "vqvae").is_dir() else None
        card: dict[str, Any] = {}
        if (root / MODEL_CARD_FILE).is_file():
            card = json.loads((root / MODEL_CARD_FILE).read_text())
        version = str(card.pop("version", None) or root.name)
        parent = card.pop("parent", None)
        unet.eval()
        model = cls(
            unet=unet,
            scheduler=scheduler,
            mel=mel,
            version=version,
            parent=parent,
            vqvae=vqvae,
            card=card,
        )
        index_path = root / INDEX_FILE
        if index_path.is_file():
            from riffloop.music._training_index import TrainingIndex

            index = TrainingIndex.from_bytes(index_path.read_bytes())
            if index.index.dim != math.prod(model.image_shape):
                raise ValidationError(
                    f"baseline index at {root} holds latents of {index.index.dim} values, "
                    f"the model makes {math.prod(model.image_shape)}"
                )
            model.baseline_index = index
        return model


def _read_mel_config(root: Path) -> MelConfig:
    if (root / MEL_CONFIG_FILE).is_file():
        return MelConfig.from_dict(json.loads((root / MEL_CONFIG_FILE).read_text()))
    # teticio/audio-diffusion: the pipeline's Mel module (x_res, y_res = n_mels, …).
    for candidate in (root / "mel" / "mel_config.json", root / "model_index.json"):
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            data = data.get("mel", data) if isinstance(data.get("mel"), dict) else data
            if "x_res" in data:
                return _mel_from_teticio(data)
    raise ValidationError(f"model at {root} has no mel config ({MEL_CONFIG_FILE} or mel/)")


def _mel_from_teticio(data: dict[str, Any]) -> MelConfig:
    defaults = MelConfig()
    try:
        return MelConfig(
            sample_rate=int(data.get("sample_rate", defaults.sample_rate)),
            n_fft=int(data.get("n_fft", defaults.n_fft)),
            hop_length=int(data.get("hop_length", defaults.hop_length)),
            n_mels=int(data.get("y_res", data.get("n_mels", defaults.n_mels))),
            x_res=int(data["x_res"]),
            top_db=float(data.get("top_db", defaults.top_db)),
            n_iter=int(data.get("n_iter", defaults.n_iter)),
        )
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"unreadable teticio mel config: {exc}") from exc


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)

"""Audio ⇄ mel-spectrogram images, the representation the diffusion model works in.

An image is one window of ``slice_samples`` mono samples at ``sample_rate``: a power mel
spectrogram (``n_mels`` rows, row 0 = lowest band; ``x_res`` columns, one per STFT frame)
converted to dB relative to the window's own maximum (as teticio/audio-diffusion does with
``librosa.power_to_db(S, ref=np.max, top_db=80)``), clipped to [−top_db, 0] dB and scaled
linearly to [−1, 1]:

    x = 2 · (dB + top_db) / top_db − 1

Going back, the dB image is turned into power, lifted from the mel to the linear-frequency
scale with ``torchaudio.transforms.InverseMelScale`` (least squares, torchaudio's default
``driver="gels"``) and phased with ``torchaudio.transforms.GriffinLim`` (``n_iter`` iterations,
torchaudio's default momentum 0.99 and random phase init drawn from the global torch RNG).

The filter bank is librosa's default (Slaney mel scale, Slaney area normalisation), so images
match those of teticio/audio-diffusion checkpoints. Their 8-bit images are available through
:func:`to_uint8` / :func:`image_from_uint8`; our own models work in float and are never
quantised.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
import torchaudio

from riffloop.core import ValidationError

__all__ = ["MelCodec", "MelConfig", "image_from_uint8", "to_uint8"]

# Power below this counts as silence (librosa.power_to_db's default ``amin``).
_AMIN = 1e-10
_GRIFFIN_LIM_SEED = 0  # initial phases of Griffin-Lim (see MelCodec.images_to_audio)


@dataclass(frozen=True)
class MelConfig:
    """Parameters of the mel image. Defaults follow teticio/audio-diffusion except ``n_mels``
    and ``x_res`` (64 × 64 for the CPU model; see :meth:`preset`)."""

    sample_rate: int = 22050
    n_fft: int = 2048
    hop_length: int = 512
    n_mels: int = 64
    x_res: int = 64
    top_db: float = 80.0
    n_iter: int = 32

    PRESETS: ClassVar[tuple[int, ...]] = (64, 128, 256)

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels", "x_res", "n_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValidationError(f"MelConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.top_db, bool) or not isinstance(self.top_db, int | float):
            raise ValidationError(f"MelConfig.top_db must be a number, got {self.top_db!r}")
        if not (math.isfinite(self.top_db) and self.top_db > 0):
            raise ValidationError(f"MelConfig.top_db must be positive, got {self.top_db!r}")
        if self.hop_length > self.n_fft:
            raise ValidationError("MelConfig.hop_length must not exceed n_fft")
        if self.n_mels > self.n_fft // 2 + 1:
            raise ValidationError(
                f"MelConfig.n_mels={self.n_mels} exceeds the {self.n_fft // 2 + 1} STFT bins"
            )

    @property
    def slice_samples(self) -> int:
        """Samples per image window: with a centred STFT, ``x_res·hop − 1`` samples give exactly
        ``x_res`` frames (teticio's ``slice_size``). 64 × 512 − 1 = 32,767 samples ≈ 1.49 s."""
        return self.x_res * self.hop_length - 1

    @property
    def slice_seconds(self) -> float:
        return self.slice_samples / self.sample_rate

    @classmethod
    def preset(cls, resolution: int) -> MelConfig:
        """Square presets: 64 (CPU model, ≈1.49 s), 128 (≈2.97 s), 256 (teticio, ≈5.94 s)."""
        if resolution not in cls.PRESETS:
            raise ValidationError(f"no mel preset {resolution!r}; choose one of {cls.PRESETS}")
        return cls(n_mels=resolution, x_res=resolution)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MelConfig:
        """Build from a dict, rejecting unknown keys (a typo must not silently use a default)."""
        if not isinstance(data, dict):
            raise ValidationError(f"mel config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValidationError(f"unknown mel config keys: {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values.get("top_db"), int) and not isinstance(values["top_db"], bool):
            values["top_db"] = float(values["top_db"])
        return cls(**values)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[−1, 1] float images → teticio's 8-bit grey levels (0 = −top_db dB, 255 = 0 dB)."""
    return ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def image_from_uint8(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """teticio's 8-bit grey levels → [−1, 1] float32 (their pipeline's ``x / 255 · 2 − 1``)."""
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8:
        raise ValidationError(f"8-bit images expected, got dtype {tensor.dtype}")
    return tensor.to(torch.float32) / 255.0 * 2.0 - 1.0


def grid_to_npy(grid: torch.Tensor) -> bytes:
    """An 8-bit mel image [H, T] (``to_uint8``) as .npy bytes: how a generated track's whole
    image is stored beside its audio (``tracks/<id>.mel.npy``)."""
    if grid.dtype != torch.uint8 or grid.dim() != 2:
        shape = tuple(grid.shape)
        raise ValidationError(f"an 8-bit [H, T] image expected, got {grid.dtype} {shape}")
    out = io.BytesIO()
    np.save(out, grid.numpy(), allow_pickle=False)
    return out.getvalue()


def grid_from_npy(raw: bytes) -> torch.Tensor:
    """:func:`grid_to_npy`'s inverse; a stored object that is not an 8-bit [H, T] array is
    refused (ValidationError), never unpickled."""
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValidationError(f"not a .npy mel image: {exc}") from None
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 2:
        kind = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array)
        raise ValidationError(f"an 8-bit [H, T] mel image expected, got {kind}")
    return torch.from_numpy(array.copy())


class MelCodec:
    """Batched audio → image and image → audio conversion for one :class:`MelConfig`."""

    def __init__(self, config: MelConfig | None = None) -> None:
        self.config = config or MelConfig()
        c = self.config
        # torchaudio defaults relied on: hann window, win_length = n_fft, centred reflect-padded
        # STFT, f_min 0, f_max = sr/2. mel_scale/norm "slaney" match librosa's defaults.
        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=c.sample_rate,
            n_fft=c.n_fft,
            hop_length=c.hop_length,
            n_mels=c.n_mels,
            power=2.0,
            norm="slaney",
            mel_scale="slaney",
        )
        self._inverse_mel = torchaudio.transforms.InverseMelScale(
            n_stft=c.n_fft // 2 + 1,
            n_mels=c.n_mels,
            sample_rate=c.sample_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        self._griffin_lim = torchaudio.transforms.GriffinLim(
            n_fft=c.n_fft,
            n_iter=c.n_iter,
            hop_length=c.hop_length,
            power=2.0,
            length=c.slice_samples,
        )

    def count_windows(self, n_samples: int) -> int:
        return n_samples // self.config.slice_samples

    def audio_to_images(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Mono samples → ``[N, 1, n_mels, x_res]`` float32 in [−1, 1], one image per whole
        window of ``slice_samples`` (a trailing partial window is dropped)."""
        audio = torch.as_tensor(samples)
        if audio.ndim != 1:
            raise ValidationError(f"mono 1-D samples expected, got shape {tuple(audio.shape)}")
        if not torch.is_floating_point(audio):
            raise ValidationError(f"float samples expected, got dtype {audio.dtype}")
        audio = audio.to(torch.float32)
        if not bool(torch.isfinite(audio).all()):
            raise ValidationError("samples contain NaN or infinity")
        c = self.config
        n = self.count_windows(audio.shape[0])
        if n == 0:
            return torch.empty((0, 1, c.n_mels, c.x_res), dtype=torch.float32)
        windows = audio[: n * c.slice_samples].reshape(n, c.slice_samples)
        with torch.inference_mode():
            power = self._mel(windows)[..., : c.x_res]  # [N, n_mels, x_res]
            ref = power.amax(dim=(1, 2), keepdim=True)
            # dB relative to the window's maximum, floored at −top_db.
            db = 10.0 * torch.log10(power.clamp_min(_AMIN)) - 10.0 * torch.log10(
                ref.clamp_min(_AMIN)
            )
            db = db.clamp(min=-c.top_db, max=0.0)
            images = 2.0 * (db + c.top_db) / c.top_db - 1.0
            # A silent window has no reference level: it is all −top_db, i.e. −1.
            images = torch.where(ref <= _AMIN, torch.full_like(images, -1.0), images)
        return images.unsqueeze(1).clone()

    def audio_to_track_image(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Mono samples of any length ≥ 1 → one image ``[1, n_mels, T]`` in [−1, 1] of the whole
        recording, T = 1 + len // hop (centred STFT), in dB relative to the *recording's*
        maximum (not each window's), so a level change between windows stays visible. The
        inverse of :meth:`track_to_audio` in frame count: T·hop − 1 samples give T frames, and
        one window of ``slice_samples`` gives the same image as :meth:`audio_to_images`."""
        audio = torch.as_tensor(samples)
        if audio.ndim != 1 or audio.shape[0] == 0:
            raise ValidationError(f"mono 1-D samples expected, got shape {tuple(audio.shape)}")
        if not torch.is_floating_point(audio):
            raise ValidationError(f"float samples expected, got dtype {audio.dtype}")
        audio = audio.to(torch.float32)
        if not bool(torch.isfinite(audio).all()):
            raise ValidationError("samples contain NaN or infinity")
        c = self.config
        with torch.inference_mode():
            power = self._mel(audio[None])  # [1, n_mels, T]
            ref = power.amax()
            if float(ref) <= _AMIN:
                return torch.full_like(power, -1.0)
            db = 10.0 * torch.log10(power.clamp_min(_AMIN)) - 10.0 * torch.log10(ref)
            db = db.clamp(min=-c.top_db, max=0.0)
            return (2.0 * (db + c.top_db) / c.top_db - 1.0).clone()

    def images_to_audio(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """``[N, 1, n_mels, x_res]`` (or ``[N, n_mels, x_res]``) images in [−1, 1] → float32
        ``[N, slice_samples]`` audio. Values outside [−1, 1] are clipped first. The level is
        relative (each window's loudest bin is 0 dB, power 1), as the images carry no loudness."""
        tensor = torch.as_tensor(images)
        c = self.config
        if tensor.ndim == 4:
            if tensor.shape[1] != 1:
                raise ValidationError(f"one-channel images expected, got {tuple(tensor.shape)}")
            tensor = tensor[:, 0]
        if tensor.ndim != 3 or tuple(tensor.shape[1:]) != (c.n_mels, c.x_res):
            raise ValidationError(
                f"images of shape [N, 1, {c.n_mels}, {c.x_res}] expected, got {tuple(tensor.shape)}"
            )
        if tensor.shape[0] == 0:
            return np.zeros((0, c.slice_samples), dtype=np.float32)
        with torch.inference_mode():
            x = tensor.to(torch.float32).clamp(-1.0, 1.0)
            db = (x + 1.0) / 2.0 * c.top_db - c.top_db
            mel_power = torch.pow(10.0, db / 10.0)
            linear_power = self._inverse_mel(mel_power)  # [N, n_fft/2+1, x_res]
            # Griffin-Lim starts from random phases; drawing them from a fixed seed, per image,
            # makes the audio a function of the image alone (not of the global RNG or of the
            # batch it came in), so a track regenerates bit for bit from its provenance.
            with torch.random.fork_rng(devices=[]):
                audio = torch.cat(
                    [self._phased(linear_power[i : i + 1]) for i in range(linear_power.shape[0])]
                )
        return audio.numpy().astype(np.float32, copy=False)

    def track_to_audio(self, image: torch.Tensor | np.ndarray) -> np.ndarray:
        """One image of any width ``[1, n_mels, T]`` (or ``[1, 1, n_mels, T]``), e.g. a long
        track of crossfaded windows (``riffloop.music.generate_long``), → float32 audio of
        ``T·hop − 1`` samples, phased by one Griffin-Lim over the whole image (seeded as
        :meth:`images_to_audio`; T = ``x_res`` gives the same audio as that method)."""
        tensor = torch.as_tensor(image)
        c = self.config
        if tensor.ndim == 4:
            tensor = tensor[:, 0] if tensor.shape[1] == 1 else tensor
        if tensor.ndim != 3 or tensor.shape[0] != 1 or tensor.shape[1] != c.n_mels:
            raise ValidationError(
                f"one image [1, {c.n_mels}, T] expected, got {tuple(tensor.shape)}"
            )
        frames = int(tensor.shape[-1])
        if frames < 1:
            raise ValidationError("the image has no frames")
        griffin_lim = torchaudio.transforms.GriffinLim(
            n_fft=c.n_fft,
            n_iter=c.n_iter,
            hop_length=c.hop_length,
            power=2.0,
            length=frames * c.hop_length - 1,
        )
        with torch.inference_mode():
            x = tensor.to(torch.float32).clamp(-1.0, 1.0)
            db = (x + 1.0) / 2.0 * c.top_db - c.top_db
            linear_power = self._inverse_mel(torch.pow(10.0, db / 10.0))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_GRIFFIN_LIM_SEED)
                audio = griffin_lim(linear_power)[0]
        return audio.numpy().astype(np.float32, copy=False)

    def _phased(self, linear_power: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(_GRIFFIN_LIM_SEED)
        return self._griffin_lim(linear_power)

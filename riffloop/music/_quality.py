"""Quality measures of generated mel images: a Fréchet distance in a learned audio embedding,
spectral flatness, and diversity.

**The embedding** (``AudioEmbedding``). FID compares Inception-v3 pool features of real and
generated images; Inception features are meaningful because the network was trained to tell
ImageNet classes apart. No pre-trained audio network can be downloaded here, so we train the
analogue on what we have: a small CNN that tells the corpus's four General MIDI instruments
(piano, organ, strings, flute) apart from one mel window, trained on the corpus's *training*
pieces; its global-average-pooled last convolutional features (64 values, before the linear
classifier) are the embedding. A classifier that hears timbre must represent harmonic structure,
attack and spectral envelope — what blurred or noisy generations lack. That the embedding is
meaningful is *shown*, not assumed (``validate_embedding``): its held-out-piece accuracy, and the
sensitivity test — held-out clips blurred in time (Gaussian, σ = 4 STFT frames ≈ 93 ms) or
noised to 10 dB SNR must score ≥ 5× the floor, the FD between 64 held-out clips and the
remaining held-out clips (averaged over draws).
The measured figures are saved next to the weights (``assets/quality-embedding/report.json``).

Network: four blocks of conv 3×3 → BatchNorm → ReLU → 2×2 max-pool (widths 8, 16, 32, 64),
then global average pooling (so any image size works, though it was trained on 64 × 64) and a
linear layer to the instrument logits. ≈ 25 k parameters, ≈ 4 MFLOP per 64 × 64 image (small on
purpose: it trains in minutes on a shared 2-core CPU); trained with AdamW (one-cycle schedule),
class-balanced cross-entropy, random circular time shifts as augmentation, and a fresh random
subset of ``samples_per_epoch`` training windows each epoch.

**Fréchet distance** between feature sets a [N, D] and b [M, D] with means μ and covariances Σ:
FD = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½), with Tr (Σ_a Σ_b)^½ computed as
Σ √λ_i(Σ_a^½ Σ_b Σ_a^½) (symmetric PSD, so eigvalsh is stable; negative round-off clipped to 0).

**Spectral flatness** (Wiener entropy) of each frame: geometric mean / arithmetic mean of its
power spectrum — 1 for white noise, → 0 for a few pure partials. For images the power is the mel
power the image encodes (dB = (x + 1)/2 · top_db − top_db, P = 10^{dB/10}); for audio, the STFT
power. Reported as the mean over frames per clip.

**Diversity**: the mean pairwise Euclidean distance between the embeddings of a set of clips
(collapse onto one mode drives it to 0).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from riffloop.core import NotFoundError, ValidationError

__all__ = [
    "DEFAULT_EMBEDDING_DIR",
    "AudioEmbedding",
    "EmbeddingReport",
    "InstrumentClassifier",
    "blur_in_time",
    "diversity",
    "frechet_distance",
    "noise_to_snr",
    "spectral_flatness",
    "train_embedding",
    "validate_embedding",
]

DEFAULT_EMBEDDING_DIR = Path(__file__).resolve().parents[2] / "assets" / "quality-embedding"
WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "config.json"
REPORT_FILE = "report.json"
_AMIN = 1e-10


# -- the embedding network ----------------------------------------------------------------------


class InstrumentClassifier(nn.Module):
    """Mel image [B, 1, H, W] → (embedding [B, 64], instrument logits [B, n_classes])."""

    def __init__(self, n_classes: int, widths: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for width in widths:
            layers += [
                nn.Conv2d(c_in, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, n_classes)
        self.widths = widths
        self.n_classes = n_classes

    def embed(self, images: Tensor) -> Tensor:
        return self.features(images).mean(dim=(2, 3))  # global average pooling

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.embed(images)
        return emb, self.head(emb)


@dataclass
class EmbeddingReport:
    """How the embedding was trained and what it was shown to do."""

    train_windows: int = 0
    heldout_windows: int = 0
    epochs: int = 0
    train_seconds: float = 0.0
    heldout_accuracy: float = float("nan")
    heldout_accuracy_per_class: dict[str, float] = field(default_factory=dict)
    fd_floor_mean: float = float("nan")
    fd_floor_std: float = float("nan")
    blur_sigma_frames: float = float("nan")
    fd_blur: float = float("nan")
    fd_noise_10db: float = float("nan")
    blur_ratio: float = float("nan")
    noise_ratio: float = float("nan")
    blur_ratio_by_sigma: dict[str, float] = field(default_factory=dict)
    draws: int = 0
    clips_per_draw: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class AudioEmbedding:
    """The trained classifier's pooled features as an audio embedding for Fréchet distances."""

    def __init__(
        self,
        classifier: InstrumentClassifier,
        instrument_names: tuple[str, ...],
        image_size: tuple[int, int],
        report: EmbeddingReport | None = None,
    ) -> None:
        self.classifier = classifier.eval()
        self.instrument_names = instrument_names
        self.image_size = image_size
        self.report = report or EmbeddingReport()

    @property
    def dim(self) -> int:
        return int(self.classifier.widths[-1])

    @torch.inference_mode()
    def embed(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """[N, 1, H, W] images in [−1, 1] → float64 features [N, 64] (on the CPU)."""
        _check_images(images)
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValidationError(
                f"the embedding was trained on {self.image_size} images, got "
                f"{tuple(images.shape[-2:])}"
            )
        outs = [
            self.classifier.embed(images[i : i + batch_size].to(torch.float32).cpu())
            for i in range(0, images.shape[0], batch_size)
        ]
        return torch.cat(outs).to(torch.float64)

    @torch.inference_mode()
    def predict(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Instrument index per image."""
        _check_images(images)
        outs = [
            self.classifier(images[i : i + batch_size].to(torch.float32).cpu())[1].argmax(dim=1)
            for i in range(0, images.shape[0], batch_size)
        ]
        return torch.cat(outs)

    # -- persistence --------------------------------------------------------------------------

    def save(self, directory: str | Path = DEFAULT_EMBEDDING_DIR) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.classifier.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE))
        config = {
            "instrument_names": list(self.instrument_names),
            "image_size": list(self.image_size),
            "widths": list(self.classifier.widths),
        }
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (out / REPORT_FILE).write_text(json.dumps(self.report.to_dict(), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path = DEFAULT_EMBEDDING_DIR) -> AudioEmbedding:
        root = Path(directory)
        if not (root / WEIGHTS_FILE).is_file() or not (root / CONFIG_FILE).is_file():
            raise NotFoundError(
                f"no quality embedding at {root} "
                "(train one: python -m riffloop.music.quality_cli train-embedding)"
            )
        config = json.loads((root / CONFIG_FILE).read_text())
        names = tuple(config["instrument_names"])
        classifier = InstrumentClassifier(len(names), tuple(config["widths"]))
        classifier.load_state_dict(load_file(str(root / WEIGHTS_FILE)))
        report = EmbeddingReport()
        if (root / REPORT_FILE).is_file():
            report = EmbeddingReport(**json.loads((root / REPORT_FILE).read_text()))
        return cls(
            classifier, names, (int(config["image_size"][0]), int(config["image_size"][1])), report
        )


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 1:
        raise ValidationError("images must be a tensor [N, 1, H, W]")
    if images.shape[0] == 0:
        raise ValidationError("no images given")
    if not bool(torch.isfinite(images).all()):
        raise ValidationError("images contain NaN or infinite values")


# -- training -----------------------------------------------------------------------------------


def train_embedding(
    train_images: Tensor,
    train_labels: Tensor,
    instrument_names: tuple[str, ...],
    *,
    epochs: int = 6,
    samples_per_epoch: int | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    max_seconds: float | None = None,
    progress: Any = print,
) -> AudioEmbedding:
    """Train the instrument classifier on the training split (labels = instrument index)."""
    _check_images(train_images)
    if train_labels.shape != (train_images.shape[0],):
        raise ValidationError("one instrument label per training image expected")
    n_classes = len(instrument_names)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InstrumentClassifier(n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = train_images.shape[0]
    per_epoch = min(n, samples_per_epoch or n)
    steps_total = epochs * math.ceil(per_epoch / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps_total)
    # Balance the classes: a window's weight is 1 / (its class's share).
    counts = torch.bincount(train_labels, minlength=n_classes).clamp_min(1).to(torch.float32)
    class_weight = counts.sum() / (n_classes * counts)
    started = time.monotonic()
    model.train()
    done_epochs = 0
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)[:per_epoch]
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, per_epoch, batch_size):
            idx = perm[i : i + batch_size]
            x = train_images[idx].to(torch.float32)
            # augmentation: a random circular shift in time (the label does not depend on phase)
            shift = int(torch.randint(0, x.shape[-1], (1,), generator=gen))
            x = torch.roll(x, shift, dims=-1)
            y = train_labels[idx]
            _, logits = model(x)
            loss = F.cross_entropy(logits, y, weight=class_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(idx)
            correct += int((logits.argmax(dim=1) == y).sum())
            loss_sum += float(loss.detach()) * len(idx)
        done_epochs = epoch + 1
        progress(
            f"embedding: epoch {done_epochs}/{epochs} loss {loss_sum / total:.3f} "
            f"train acc {correct / total:.3f} ({time.monotonic() - started:.0f} s)"
        )
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            break
    report = EmbeddingReport(
        train_windows=n, epochs=done_epochs, train_seconds=round(time.monotonic() - started, 1)
    )
    size = (int(train_images.shape[-2]), int(train_images.shape[-1]))
    return AudioEmbedding(model, instrument_names, size, report)


# -- degradations for the sensitivity check -------------------------------------------------------


def blur_in_time(images: Tensor, sigma_frames: float = 2.0) -> Tensor:
    """Gaussian blur of the mel image along time (x), σ in STFT frames (≈ 23 ms each)."""
    radius = max(1, math.ceil(3 * sigma_frames))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma_frames) ** 2)
    kernel = (kernel / kernel.sum()).reshape(1, 1, 1, -1)
    padded = F.pad(images.to(torch.float32), (radius, radius, 0, 0), mode="replicate")
    return F.conv2d(padded, kernel)


def noise_to_snr(audio: np.ndarray, snr_db: float, generator: np.random.Generator) -> np.ndarray:
    """Add white Gaussian noise to each row of ``audio`` [N, samples] at ``snr_db`` dB SNR."""
    power = (audio.astype(np.float64) ** 2).mean(axis=-1, keepdims=True)
    noise_power = power / (10.0 ** (snr_db / 10.0))
    noise = generator.standard_normal(audio.shape) * np.sqrt(noise_power)
    return (audio + noise).astype(np.float32)


# -- the measures -------------------------------------------------------------------------------


def _sqrtm_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValidationError("feature sets must be [N, D] and [M, D] with the same D")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValidationError("each feature set needs at least 2 rows")
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    if not bool(torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        raise ValidationError("features contain NaN or infinite values")
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    cov_a, cov_b = (
        torch.cov(a64.T).reshape(a.shape[1], -1),
        torch.cov(b64.T).reshape(b.shape[1], -1),
    )
    s = _sqrtm_psd(cov_a)
    cross = s @ cov_b @ s
    tr_sqrt = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_sqrt
    return float(fd.clamp_min(0))


def spectral_flatness(
    x: Tensor | np.ndarray, *, top_db: float = 80.0, n_fft: int = 2048, hop_length: int = 512
) -> Tensor:
    """Mean per-frame spectral flatness of each clip → [N].

    ``x`` is either mel images [N, 1, H, W] in [−1, 1] (the mel power they encode; ``top_db`` of
    their MelConfig) or audio [N, samples] / [samples] (STFT power, Hann window)."""
    t = torch.as_tensor(x).to(torch.float64)
    if t.ndim == 4:
        db = (t[:, 0].clamp(-1, 1) + 1) / 2 * top_db - top_db  # [N, H (mel), W (time)]
        power = torch.pow(10.0, db / 10.0)
        bins_dim = 1
    elif t.ndim in (1, 2):
        audio = t.reshape(-1, t.shape[-1])
        spec = torch.stft(
            audio,
            n_fft=n_fft,
            hop_length=hop_length,
            window=torch.hann_window(n_fft, dtype=torch.float64),
            return_complex=True,
        )
        power = spec.abs().pow(2)  # [N, freq, frames]
        bins_dim = 1
    else:
        raise ValidationError("spectral_flatness takes images [N, 1, H, W] or audio [N, samples]")
    power = power.clamp_min(_AMIN)
    geo = power.log().mean(dim=bins_dim).exp()
    arith = power.mean(dim=bins_dim)
    return (geo / arith).mean(dim=-1).to(torch.float32)


def diversity(images: Tensor, embedding: AudioEmbedding) -> float:
    """Mean pairwise Euclidean distance between the clips' embeddings."""
    if images.shape[0] < 2:
        raise ValidationError("diversity needs at least 2 clips")
    return float(torch.pdist(embedding.embed(images)).mean())


# -- validation ---------------------------------------------------------------------------------


def validate_embedding(
    embedding: AudioEmbedding,
    heldout_images: Tensor,
    heldout_labels: Tensor,
    noisy_images: Tensor | None = None,
    *,
    clips: int = 64,
    draws: int = 20,
    seed: int = 0,
    blur_sigma: float = 4.0,
    extra_blur_sigmas: tuple[float, ...] = (2.0,),
) -> EmbeddingReport:
    """Held-out accuracy and the sensitivity test; fills and returns ``embedding.report``.

    Floor: FD(64 random held-out clips, the other held-out clips), mean over ``draws``. Each
    degraded score uses the *same* draws with the 64 clips replaced by their degraded versions
    (blurred in time with a Gaussian of σ = ``blur_sigma`` STFT frames — 4 frames ≈ 93 ms, which
    audibly smears note onsets; ``noisy_images``: the same windows re-made from audio with white
    noise at 10 dB SNR), so the ratio isolates the degradation. The ratios at
    ``extra_blur_sigmas`` are recorded too (``blur_ratio_by_sigma``), so a milder blur's weaker
    response is on record rather than hidden."""
    n = heldout_images.shape[0]
    if n < clips + 2:
        raise ValidationError(f"need more than {clips + 2} held-out clips, got {n}")
    report = embedding.report
    pred = embedding.predict(heldout_images)
    report.heldout_windows = n
    report.heldout_accuracy = float((pred == heldout_labels).to(torch.float64).mean())
    report.heldout_accuracy_per_class = {
        name: float((pred[heldout_labels == i] == i).to(torch.float64).mean())
        for i, name in enumerate(embedding.instrument_names)
        if bool((heldout_labels == i).any())
    }
    feats = embedding.embed(heldout_images)
    sigmas = (blur_sigma, *[s for s in extra_blur_sigmas if s != blur_sigma])
    blurred = {s: embedding.embed(blur_in_time(heldout_images, s)) for s in sigmas}
    noisy = embedding.embed(noisy_images) if noisy_images is not None else None
    gen = torch.Generator().manual_seed(seed)
    floors, noises = [], []
    blurs: dict[float, list[float]] = {s: [] for s in sigmas}
    for _ in range(draws):
        perm = torch.randperm(n, generator=gen)
        pick, rest = perm[:clips], perm[clips:]
        floors.append(frechet_distance(feats[pick], feats[rest]))
        for s in sigmas:
            blurs[s].append(frechet_distance(blurred[s][pick], feats[rest]))
        if noisy is not None:
            noises.append(frechet_distance(noisy[pick], feats[rest]))
    report.fd_floor_mean = float(np.mean(floors))
    report.fd_floor_std = float(np.std(floors))
    report.blur_sigma_frames = blur_sigma
    report.fd_blur = float(np.mean(blurs[blur_sigma]))
    report.blur_ratio = report.fd_blur / report.fd_floor_mean
    report.blur_ratio_by_sigma = {
        f"{s:g}": float(np.mean(blurs[s])) / report.fd_floor_mean for s in sigmas
    }
    if noises:
        report.fd_noise_10db = float(np.mean(noises))
        report.noise_ratio = report.fd_noise_10db / report.fd_floor_mean
    report.draws, report.clips_per_draw = draws, clips
    return report

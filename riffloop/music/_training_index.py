"""The baseline index of one model version: its training windows, DDIM-inverted by that version.

The baseline of an input merge is z0 = argmax_{z ∈ Z_V} Γ(z_agg, z) (design.md §3), where Z_V
holds the latents of version V's *training data* — never a user's upload — and z_agg is the
merge of the inputs' latents inverted by the same V, so Γ compares latents of one model. Γ is
``riffloop.music.BaselineIndex``'s (cosine by default). Each row keeps its mel window (8-bit),
so a baseline track is served as-is from the stored window.

Rows of Z_V:

1. The base model: a bounded, evenly strided subset of the base corpus's training windows
   (``base_windows``: ``rows`` windows out of the split, spread over pieces and instruments),
   inverted with a fixed number of DDIM steps (the encoder's, 50, so z_agg and the rows are
   inverted alike). Building costs rows × steps UNet evaluations: 256 × 50 = 12,800 for the
   trainer's default, against ≈ 540,000 for all ≈ 10.8k windows of the full corpus, which two
   CPU cores cannot afford at every fine-tune; 256 evenly strided windows still visit every
   piece and instrument of a corpus of a few hundred renders.
2. A fine-tuned version V with parent P: P's rows plus the targets of the training pairs the
   selector kept for V's training set (the generations that beat their input's baseline)
   (``next_version``). The new rows are inverted by V. P's rows are carried over as P's
   ancestors inverted them for up to ``refresh_every − 1`` versions in a row, then every row is
   inverted again by V. Re-inverting keeps Γ(z_agg, z) a comparison inside one latent space
   (z_agg comes from latents the encoder inverted with V), but it costs rows × steps UNet calls
   per release: 256 × 20 took 85–94 s of the ≈ 150 s of a release step on 2 CPU cores. A LoRA
   fine-tune moves the latents little. ``scripts/index_drift.py`` measured it on base-v2, with
   64 merges of held-out recordings, 256 rows, 20 steps and the loop's fine-tune. Carried rows
   picked the same z0 as re-inverted ones for 62/64 merges after one fine-tune and for 58/64
   after two. Where the picks differed they were near-ties: the carried pick's Γ was at most
   0.0037 below the best row's, against a median Γ(z_agg, z0) of 0.10. So the default carries
   rows for two versions and re-inverts them at the third (``refresh_every`` = 3).

The genetic step (design.md §3): a generation ẑ whose rating R beat its input's baseline rating
R_b (the selector's survival rule, R > R_b) replaces that input's baseline. Per input key k
(the order-independent merge of its songs), ``champions[k]`` names the row of the winning
generation; for k, z0 = that row instead of the argmax, and the row it replaced stays in Z_V
as training data for every other input. When several of a set's winners answer the same k,
the one with the highest R becomes the champion (ties: the smaller track id). A winner already
in the parent's rows (the selector's sets are cumulative) is neither added nor crowned again.

The index serialises to one safetensors file (``INDEX_FILE``, stored with the checkpoint at
``models/<version>/baseline-index.safetensors``): the row features Γ searches, the 8-bit
windows, the ids, the champions, the version that inverted the rows and the step count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from riffloop.core import ValidationError
from riffloop.music._baseline import BaselineIndex, Neighbour
from riffloop.music._corpus import CorpusSplit
from riffloop.music._ddim import DenoisingModel, invert
from riffloop.music._mel import MelCodec, MelConfig, image_from_uint8, to_uint8
from riffloop.music._model import INDEX_FILE

__all__ = [
    "INDEX_FILE",
    "BaselinePick",
    "TrainingIndex",
    "Winner",
    "base_windows",
    "tone_windows",
]

INDEX_FORMAT = "1"
# Row ids: ``corpus:<piece>:<instrument>:<window>``, ``tone:<i>``, ``track:<track id>``.
TRACK_PREFIX = "track:"


@dataclass(frozen=True)
class Winner:
    """A generation that beat its input's baseline: the target of a kept training pair."""

    input_key: str
    track_id: str
    score: float  # R of the generation
    image: Tensor  # [1, n_mels, x_res] uint8, the generated window


@dataclass(frozen=True)
class BaselinePick:
    """z0 for one input: its row id, its window (uint8 ``[1, 1, H, W]``), Γ(z_agg, z0), and
    whether it is the input's champion (a generation that replaced the argmax)."""

    id: str
    row: int
    score: float
    image: Tensor
    champion: bool


class TrainingIndex:
    """Z_V of one model version (see the module docstring): rows, windows and champions."""

    def __init__(
        self,
        index: BaselineIndex,
        images: Tensor,
        *,
        model_version: str,
        inversion_steps: int,
        champions: dict[str, str] | None = None,
        carried: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != len(index):
            raise ValidationError("a training index needs one uint8 window [1, H, W] per row")
        ids = index.ids
        self._row_of = {row_id: row for row, row_id in enumerate(ids)}
        champions = dict(champions or {})
        unknown = [c for c in champions.values() if c not in self._row_of]
        if unknown:
            raise ValidationError(f"champions name rows the index lacks: {unknown[:3]}")
        self.index = index
        self.images = images
        self.model_version = model_version
        self.inversion_steps = inversion_steps
        self.champions = champions
        # versions in a row that carried the older rows over (0: ``model_version`` inverted
        # every row); the rows are at most this many fine-tunes older than the version
        self.carried = carried

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: DenoisingModel,
        images: Tensor,
        ids: list[str],
        steps: int,
        *,
        model_version: str,
        champions: dict[str, str] | None = None,
    ) -> TrainingIndex:
        """Invert the 8-bit windows ``[M, 1, H, W]`` with ``model`` (``steps`` DDIM steps, as
        the encoder inverts songs) and index the x_T."""
        if images.dtype != torch.uint8:
            raise ValidationError("training windows must be 8-bit (riffloop.music.to_uint8)")
        latents = invert(model, image_from_uint8(images), steps)
        index = BaselineIndex(latents.flatten(1), ids)
        return cls(
            index,
            images.contiguous(),
            model_version=model_version,
            inversion_steps=steps,
            champions=champions,
        )

    def next_version(
        self,
        model: DenoisingModel,
        winners: Sequence[Winner],
        *,
        model_version: str,
        steps: int | None = None,
        refresh_every: int = 1,
    ) -> TrainingIndex:
        """Z_V of the child version: these rows plus the new winners, with each input's
        champion moved to its best new winner. The new rows are inverted by ``model`` (the
        child); the others are carried over unless this is the ``refresh_every``-th version in
        a row to carry them (or ``steps`` changed): then ``model`` inverts every row."""
        if (
            isinstance(refresh_every, bool)
            or not isinstance(refresh_every, int)
            or refresh_every < 1
        ):
            raise ValidationError(f"refresh_every must be an integer ≥ 1, got {refresh_every!r}")
        ids = self.index.ids
        known = set(ids)
        best: dict[str, Winner] = {}
        for w in sorted(winners, key=lambda w: (-w.score, w.track_id)):
            if not math.isfinite(w.score):
                raise ValidationError(f"winner {w.track_id} has no finite rating")
            if TRACK_PREFIX + w.track_id in known:
                continue  # carried over from an earlier set: already a row (and crowned then)
            best.setdefault(w.input_key, w)
        new = sorted(best.values(), key=lambda w: w.track_id)
        new_ids = [TRACK_PREFIX + w.track_id for w in new]
        extra = (
            torch.stack([w.image.reshape(self.images.shape[1:]) for w in new]).to(torch.uint8)
            if new
            else self.images[:0]
        )
        champions = {**self.champions, **{w.input_key: TRACK_PREFIX + w.track_id for w in new}}
        steps = steps or self.inversion_steps
        carried = self.carried + 1
        if carried >= refresh_every or steps != self.inversion_steps:
            return TrainingIndex.build(
                model,
                torch.cat([self.images, extra]),
                ids + new_ids,
                steps,
                model_version=model_version,
                champions=champions,
            )
        index = BaselineIndex.from_rows(
            self.index.rows.clone(), ids, self.index.similarity.name, self.index.dim
        )
        images = self.images
        if new:
            index.extend(invert(model, image_from_uint8(extra), steps).flatten(1), new_ids)
            images = torch.cat([images, extra])
        return TrainingIndex(
            index,
            images.contiguous(),
            model_version=model_version,
            inversion_steps=steps,
            champions=champions,
            carried=carried,
        )

    # -- search -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.index)

    @property
    def ids(self) -> list[str]:
        return self.index.ids

    def baseline_for(self, input_key: str, z_agg: Tensor) -> BaselinePick:
        """z0 for the input merge ``input_key`` whose merged latent is z_agg: its champion if a
        generation replaced its baseline, else argmax_z Γ(z_agg, z) over the rows."""
        champion = self.champions.get(input_key)
        if champion is not None:
            row = self._row_of[champion]
            score = self._gamma(z_agg, row)
            return BaselinePick(champion, row, score, self.images[row : row + 1], True)
        best: Neighbour = self.index.nearest(z_agg, k=1)[0]
        return BaselinePick(
            best.id, best.row, best.score, self.images[best.row : best.row + 1], False
        )

    def _gamma(self, z_agg: Tensor, row: int) -> float:
        """Γ(z_agg, z_row) through the index's feature maps."""
        similarity = self.index.similarity
        q = similarity.query_features(z_agg.detach().reshape(1, -1).to(torch.float32))
        r = self.index.row(row).to(torch.float32)
        return float(q[0] @ r)

    # -- persistence ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        metadata = {
            "format": INDEX_FORMAT,
            "similarity": self.index.similarity.name,
            "dim": str(self.index.dim),
            "ids": json.dumps(self.index.ids),
            "champions": json.dumps(self.champions, sort_keys=True),
            "model_version": self.model_version,
            "inversion_steps": str(self.inversion_steps),
            "carried": str(self.carried),
        }
        tensors = {"rows": self.index.rows, "images": self.images.contiguous()}
        return st_save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainingIndex:
        try:
            tensors = st_load(data)
            # safetensors keeps the metadata in its JSON header: 8-byte length, then the header.
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + header_len])["__metadata__"]
            if meta["format"] != INDEX_FORMAT:
                raise ValueError(f"format {meta['format']} is not {INDEX_FORMAT}")
            index = BaselineIndex.from_rows(
                tensors["rows"], json.loads(meta["ids"]), meta["similarity"], int(meta["dim"])
            )
            return cls(
                index,
                tensors["images"],
                model_version=meta["model_version"],
                inversion_steps=int(meta["inversion_steps"]),
                champions=json.loads(meta["champions"]),
                carried=int(meta.get("carried", "0")),  # files before it: every row fresh
            )
        except (SafetensorError, KeyError, ValueError, TypeError) as exc:
            raise ValidationError(f"not a training index: {exc}") from exc

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / INDEX_FILE
        path.write_bytes(self.to_bytes())
        return path

    def describe(self) -> dict[str, Any]:
        return {
            "rows": len(self),
            "champions": len(self.champions),
            "model_version": self.model_version,
            "inversion_steps": self.inversion_steps,
            "carried": self.carried,
            "bytes": self.index.nbytes + int(self.images.numel()),
        }


# -- where base rows come from ----------------------------------------------------------------


def base_windows(split: CorpusSplit, rows: int) -> tuple[Tensor, list[str]]:
    """``rows`` training windows of the base corpus, evenly strided through the split (which is
    ordered by piece, then instrument, then time), so the subset spans its pieces and
    instruments; 8-bit, with ids ``corpus:<piece>:<instrument>:<window>``."""
    if rows < 1:
        raise ValidationError("a base index needs at least one row")
    n = len(split)
    if n == 0:
        raise ValidationError("the corpus split has no windows")
    picks = np.unique(np.linspace(0, n - 1, min(rows, n)).round().astype(np.int64))
    ids = [
        f"corpus:{split.piece_ids[int(split.pieces[i])]}:"
        f"{split.instrument_names[int(split.instruments[i])]}:{int(split.windows[i])}"
        for i in picks
    ]
    return to_uint8(split.images[torch.from_numpy(picks)]), ids


def tone_windows(mel: MelConfig, count: int, seed: int = 0) -> tuple[Tensor, list[str]]:
    """Synthetic training windows for a model that has no corpus (a fresh preset model in tests
    and demos): ``count`` harmonic tones, each a seeded pitch (MIDI 40–84) with 1/h partial
    amplitudes and a decay, cut to one mel window. Ids ``tone:<i>``. Never anyone's upload."""
    if count < 1:
        raise ValidationError("count must be at least 1")
    rng = np.random.default_rng(seed)
    t = np.arange(mel.slice_samples) / mel.sample_rate
    clips = []
    for _ in range(count):
        f0 = 440.0 * 2.0 ** ((int(rng.integers(40, 85)) - 69) / 12)
        partials = int(rng.integers(1, 6))
        wave = sum(
            np.sin(2 * np.pi * f0 * h * t) / h
            for h in range(1, partials + 1)
            if f0 * h < mel.sample_rate / 2
        )
        envelope = np.exp(-t * float(rng.uniform(0.2, 2.0)))
        clips.append((0.3 * wave * envelope).astype(np.float32))
    images = MelCodec(mel).audio_to_images(np.concatenate(clips))
    return to_uint8(images), [f"tone:{i}" for i in range(count)]

"""Track provenance: everything needed to regenerate a served track exactly.

A listener never sees this record (the dispatch is blind); it travels with the track in the
object store (``tracks/<id>.json``) and in ``TrackReady`` events.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from riffloop.core import ValidationError


class TrackKind(StrEnum):
    """What a served track is: a new generation ẑ, or the baseline z0 (a training sample)."""

    GENERATED = "generated"
    BASELINE = "baseline"


@dataclass(frozen=True, slots=True)
class TrackProvenance:
    """How one track was made.

    ``GENERATED``: inputs merged into z_agg, noised to ``start_step`` of the DDIM schedule chosen by
    (s, q) and denoised by ``model_version`` with ``seed``. ``BASELINE``: the training sample
    ``baseline_sample_id`` = argmax_z Γ(z_agg, z), served as-is (``model_version`` is the model
    whose training set it came from).
    """

    track_id: str
    kind: TrackKind
    model_version: str
    input_song_ids: tuple[str, ...]
    seed: int
    similarity: float  # s ∈ [0, 1)
    quality: int  # q: total DDIM steps before the similarity cut, min(1000, ⌊q/(1−s)⌋)
    start_step: int | None = None  # index into the plan's timesteps; None for a baseline
    baseline_sample_id: str | None = None  # the z0 sample; also recorded for generations

    def __post_init__(self) -> None:
        if not 1 <= len(self.input_song_ids) <= 3:
            raise ValidationError("a track is made from 1 to 3 input songs")
        if not 0.0 <= self.similarity < 1.0:
            raise ValidationError("similarity s must lie in [0, 1)")
        if self.quality < 1:
            raise ValidationError("quality q must be a positive number of steps")
        if self.kind is TrackKind.BASELINE and self.baseline_sample_id is None:
            raise ValidationError("a baseline track must name its training sample")

    @property
    def input_key(self) -> str:
        """The input merge this track answers: order-independent, like the spherical merge."""
        return "+".join(sorted(self.input_song_ids))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> TrackProvenance:
        raw: dict[str, Any] = json.loads(text)
        raw["kind"] = TrackKind(raw["kind"])
        raw["input_song_ids"] = tuple(raw["input_song_ids"])
        return cls(**raw)

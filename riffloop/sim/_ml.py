"""The ML core entry points the loop uses, from ``riffloop.music``'s public surface.

Until the ML package re-exports every name of docs/ARCHITECTURE.md, the missing ones are taken
from their defining modules; this file is the only place that knows.
"""

from __future__ import annotations

try:
    from riffloop.music import (  # type: ignore[attr-defined]
        BaselineIndex,
        InjectionPlan,
        LoraSettings,
        MelDataset,
        Trainer,
        TrainingConfig,
        decode_latents,
        inject_at_step,
        invert,
        merge_latents,
    )
except ImportError:  # pragma: no cover - depends on the ML package's progress
    from riffloop.music._baseline import BaselineIndex
    from riffloop.music._ddim import InjectionPlan, decode_latents, inject_at_step, invert
    from riffloop.music._merge import merge_latents
    from riffloop.music._train import LoraSettings, MelDataset, Trainer, TrainingConfig

from riffloop.music import MelCodec, MusicDiffusion

__all__ = [
    "BaselineIndex",
    "InjectionPlan",
    "LoraSettings",
    "MelCodec",
    "MelDataset",
    "MusicDiffusion",
    "Trainer",
    "TrainingConfig",
    "decode_latents",
    "inject_at_step",
    "invert",
    "merge_latents",
]

"""Riffloop's ML core: mel images, the diffusion model, training and the training corpus.

See docs/ARCHITECTURE.md ("ML core API") for the contract other packages code against.
"""

from riffloop.music._mel import MelCodec, MelConfig, image_from_uint8, to_uint8
from riffloop.music._model import ModelConfig, MusicDiffusion, PredictionType

__all__ = [
    "MelCodec",
    "MelConfig",
    "ModelConfig",
    "MusicDiffusion",
    "PredictionType",
    "image_from_uint8",
    "to_uint8",
]

"""Riffloop's ML core: mel images, the diffusion model, training and the training corpus.

See docs/ARCHITECTURE.md ("ML core API") for the contract other packages code against.
"""

from riffloop.music._audio import (
    AudioErrorCode,
    AudioLimits,
    DecodedAudio,
    InvalidAudio,
    decode_audio,
)
from riffloop.music._baseline import (
    BaselineIndex,
    CosineSimilarity,
    DotProductSimilarity,
    NegativeSquaredDistance,
    Neighbour,
    Similarity,
    register_similarity,
)
from riffloop.music._ddim import (
    GeneratedTrack,
    InjectionPlan,
    MusicGenerator,
    TrackRequest,
    decode_latents,
    generate,
    inject_at_step,
    invert,
)
from riffloop.music._mel import MelCodec, MelConfig, image_from_uint8, to_uint8
from riffloop.music._merge import merge_latents, slerp
from riffloop.music._model import ModelConfig, MusicDiffusion, PredictionType
from riffloop.music._quality import (
    AudioEmbedding,
    diversity,
    frechet_distance,
    spectral_flatness,
)

__all__ = [
    "AudioEmbedding",
    "AudioErrorCode",
    "AudioLimits",
    "BaselineIndex",
    "CosineSimilarity",
    "DecodedAudio",
    "DotProductSimilarity",
    "GeneratedTrack",
    "InjectionPlan",
    "InvalidAudio",
    "MelCodec",
    "MelConfig",
    "ModelConfig",
    "MusicDiffusion",
    "MusicGenerator",
    "NegativeSquaredDistance",
    "Neighbour",
    "PredictionType",
    "Similarity",
    "TrackRequest",
    "decode_audio",
    "decode_latents",
    "diversity",
    "frechet_distance",
    "generate",
    "image_from_uint8",
    "inject_at_step",
    "invert",
    "merge_latents",
    "register_similarity",
    "slerp",
    "spectral_flatness",
    "to_uint8",
]

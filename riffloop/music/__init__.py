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
from riffloop.music._corpus import (
    CORPUS_VERSION,
    INSTRUMENTS,
    CorpusPiece,
    CorpusSplit,
    build_corpus,
    corpus_dir,
    default_cache_dir,
    load_corpus,
    pack_corpus,
    select_pieces,
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
from riffloop.music._train import (
    LoraSettings,
    MelDataset,
    Trainer,
    TrainingConfig,
    TrainingReport,
    apply_adapter,
    export_checkpoint,
    min_snr_weights,
    weighted_diffusion_loss,
)

__all__ = [
    "CORPUS_VERSION",
    "INSTRUMENTS",
    "AudioEmbedding",
    "AudioErrorCode",
    "AudioLimits",
    "BaselineIndex",
    "CorpusPiece",
    "CorpusSplit",
    "CosineSimilarity",
    "DecodedAudio",
    "DotProductSimilarity",
    "GeneratedTrack",
    "InjectionPlan",
    "InvalidAudio",
    "LoraSettings",
    "MelCodec",
    "MelConfig",
    "MelDataset",
    "ModelConfig",
    "MusicDiffusion",
    "MusicGenerator",
    "NegativeSquaredDistance",
    "Neighbour",
    "PredictionType",
    "Similarity",
    "TrackRequest",
    "Trainer",
    "TrainingConfig",
    "TrainingReport",
    "apply_adapter",
    "build_corpus",
    "corpus_dir",
    "decode_audio",
    "decode_latents",
    "default_cache_dir",
    "diversity",
    "export_checkpoint",
    "frechet_distance",
    "generate",
    "image_from_uint8",
    "inject_at_step",
    "invert",
    "load_corpus",
    "merge_latents",
    "min_snr_weights",
    "pack_corpus",
    "register_similarity",
    "select_pieces",
    "slerp",
    "spectral_flatness",
    "to_uint8",
    "weighted_diffusion_loss",
]

"""Typed Python client of the Riffloop gateway (``GatewayClient``), and ``operator_channel`` for
the internal services' operator RPCs."""

from riffloop.client._client import (
    FeedbackOutcome,
    GatewayClient,
    Listen,
    ModelInfo,
    Rating,
    TrackInfo,
    UploadedSong,
)
from riffloop.client._operator import operator_channel

__all__ = [
    "FeedbackOutcome",
    "GatewayClient",
    "Listen",
    "ModelInfo",
    "Rating",
    "TrackInfo",
    "UploadedSong",
    "operator_channel",
]

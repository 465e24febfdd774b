"""Typed Python client of the Riffloop gateway (``GatewayClient``)."""

from riffloop.client._client import (
    FeedbackOutcome,
    GatewayClient,
    Listen,
    ModelInfo,
    Rating,
    TrackInfo,
    UploadedSong,
)

__all__ = [
    "FeedbackOutcome",
    "GatewayClient",
    "Listen",
    "ModelInfo",
    "Rating",
    "TrackInfo",
    "UploadedSong",
]

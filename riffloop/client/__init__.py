"""Typed Python client of the Riffloop gateway (``GatewayClient``)."""

from riffloop.client._client import GatewayClient, ModelInfo, TrackInfo, UploadedSong

__all__ = ["GatewayClient", "ModelInfo", "TrackInfo", "UploadedSong"]

"""The gateway service: Riffloop's public gRPC API (``python -m services.gateway``)."""

from services.gateway._build import audio_probe, build
from services.gateway._service import GatewayEvents, GatewayServicer
from services.gateway._settings import GatewaySettings

__all__ = ["GatewayEvents", "GatewayServicer", "GatewaySettings", "audio_probe", "build"]

"""The gateway service: Riffloop's public gRPC API (``python -m services.gateway``)."""

from services.gateway._build import build, probe_audio
from services.gateway._service import GatewayEvents, GatewayServicer, GatewaySettings

__all__ = ["GatewayEvents", "GatewayServicer", "GatewaySettings", "build", "probe_audio"]

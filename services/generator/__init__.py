"""The generator service: requests → tracks, model hot-swap (``python -m services.generator``)."""

from services.generator._build import build
from services.generator._service import (
    Generator,
    GeneratorServicer,
    GeneratorSettings,
    Request,
    validate_request,
)

__all__ = [
    "Generator",
    "GeneratorServicer",
    "GeneratorSettings",
    "Request",
    "build",
    "validate_request",
]

"""Riffloop core: settings, the error hierarchy, ports and their adapters."""

from riffloop.core._errors import (
    ConfigurationError,
    ConflictError,
    NotFoundError,
    PermanentError,
    PermissionDeniedError,
    RateLimitedError,
    RiffloopError,
    TransientError,
    UnauthenticatedError,
    ValidationError,
)
from riffloop.core._settings import Settings, run_main

__all__ = [
    "ConfigurationError",
    "ConflictError",
    "NotFoundError",
    "PermanentError",
    "PermissionDeniedError",
    "RateLimitedError",
    "RiffloopError",
    "Settings",
    "TransientError",
    "UnauthenticatedError",
    "ValidationError",
    "run_main",
]

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

__all__ = [
    "ConfigurationError",
    "ConflictError",
    "NotFoundError",
    "PermanentError",
    "PermissionDeniedError",
    "RateLimitedError",
    "RiffloopError",
    "TransientError",
    "UnauthenticatedError",
    "ValidationError",
]

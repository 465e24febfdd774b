"""The documented error hierarchy, each class mapped to exactly one gRPC status code.

    RiffloopError
    ├── ValidationError       INVALID_ARGUMENT    caller sent something wrong; retrying won't help
    ├── NotFoundError         NOT_FOUND           an id that does not exist (track, song, model)
    ├── ConflictError         ALREADY_EXISTS      a duplicate submission (second rating of a track)
    ├── UnauthenticatedError  UNAUTHENTICATED     missing or bad credentials
    ├── PermissionDeniedError PERMISSION_DENIED   not allowed (rating a track never served)
    ├── RateLimitedError      RESOURCE_EXHAUSTED  over a per-user limit; retry later
    ├── TransientError        UNAVAILABLE         a dependency is down or slow; retry with backoff
    │   └── DeadlineExceededError DEADLINE_EXCEEDED the server's own time limit for the call ran out
    ├── PermanentError        FAILED_PRECONDITION the system state forbids it (no model loaded yet)
    │   └── ChecksumMismatchError                 stored bytes differ from their recorded sha256
    └── ConfigurationError    (process exit 2)    bad settings at start-up; never reaches a client

Services translate with ``grpc.StatusCode[err.grpc_code]`` in one interceptor; nothing else picks
status codes.
"""

from __future__ import annotations


class RiffloopError(Exception):
    """Base of every error Riffloop raises on purpose. ``reason`` is safe to show to a client."""

    grpc_code = "INTERNAL"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ValidationError(RiffloopError):
    grpc_code = "INVALID_ARGUMENT"


class NotFoundError(RiffloopError):
    grpc_code = "NOT_FOUND"


class ConflictError(RiffloopError):
    grpc_code = "ALREADY_EXISTS"


class UnauthenticatedError(RiffloopError):
    grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(RiffloopError):
    grpc_code = "PERMISSION_DENIED"


class RateLimitedError(RiffloopError):
    """Too much at once; ``retry_after_s`` says when a retry can succeed (the gateway sends it
    as the ``retry-after-ms`` trailer), when known."""

    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class TransientError(RiffloopError):
    """A dependency is down or slow; ``retry_after_s``, when known, is when a retry is worth
    making (sent as the ``retry-after-ms`` trailer, as for ``RateLimitedError``)."""

    grpc_code = "UNAVAILABLE"

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(TransientError):
    """The call ran past the server's own time limit for it (an upload slower than
    RIFFLOOP_UPLOAD_DEADLINE_S); a retry may succeed, as for any transient failure."""

    grpc_code = "DEADLINE_EXCEEDED"


class PermanentError(RiffloopError):
    grpc_code = "FAILED_PRECONDITION"


class ConfigurationError(RiffloopError):
    """Bad settings at start-up: the process prints ``reason`` and exits with status 2."""

    grpc_code = "INTERNAL"


class ChecksumMismatchError(PermanentError):
    """An object's bytes do not match the SHA-256 recorded when it was written (torn or corrupt)."""

    def __init__(self, reason: str, *, bucket: str, key: str, expected: str, actual: str) -> None:
        super().__init__(reason)
        self.bucket = bucket
        self.key = key
        self.expected = expected
        self.actual = actual

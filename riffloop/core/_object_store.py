"""The ``ObjectStore`` port: buckets of immutable-ish blobs, every object checksummed.

Adapters implement six primitives (``ensure_bucket``, ``put``, ``get``, ``stat``, ``list``,
``delete``); the derived operations live here once:

- ``put_content_addressed``: key = sha256(data) + suffix, so writing the same bytes twice is a no-op
  (songs are stored this way, so a re-upload dedupes for free).
- ``publish_artifact``: the "pointer written last" protocol for multi-object artefacts
  (checkpoints): 1. write every part under ``prefix/``; 2. verify each part's recorded sha256 and
  size; 3. only then write the pointer (e.g. ``models/CURRENT``) naming every part with its sha256.
  A reader that follows the pointer never sees a half-written artefact, and
  ``read_artifact`` re-checks each part against the pointer.

Every ``get`` recomputes the sha256 of the bytes it returns and compares it with the one recorded at
``put`` time; a difference raises :class:`ChecksumMismatchError` (a torn write or corruption).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO

from riffloop.core._errors import ChecksumMismatchError, NotFoundError, ValidationError

if TYPE_CHECKING:
    from riffloop.v1 import common_pb2

DEFAULT_CONTENT_TYPE = "application/octet-stream"
POINTER_FORMAT = "riffloop.artifact.v1"

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MAX_KEY_BYTES = 1024


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def validate_bucket(bucket: str) -> str:
    """S3 bucket naming rules (3–63 chars, lower-case letters, digits, '-' and '.')."""
    if not isinstance(bucket, str) or not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValidationError(
            f"bucket name {bucket!r} is invalid: use 3–63 lower-case letters, digits, '-' or '.'"
        )
    return bucket


def validate_key(key: str) -> str:
    """Object keys are '/'-separated relative paths with no empty, '.'-leading or control parts.

    The rule is stricter than S3 so that every key is also a safe relative file path for the
    local-directory adapter (no '..', no absolute paths, no hidden temp-file names).
    """
    if not isinstance(key, str) or not key:
        raise ValidationError("object key must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
        raise ValidationError(f"object key is longer than {_MAX_KEY_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 or c == "\\" for c in key):
        raise ValidationError(f"object key {key!r} contains a control character or backslash")
    for segment in key.split("/"):
        if not segment or segment.startswith("."):
            raise ValidationError(
                f"object key {key!r} is invalid: parts must be non-empty and not start with '.'"
            )
    return key


@dataclasses.dataclass(frozen=True)
class ObjectRef:
    """Where an object lives and what its bytes hash to (the claim check carried by events)."""

    bucket: str
    key: str
    sha256: str
    size_bytes: int

    def to_proto(self) -> common_pb2.ObjectRef:
        from riffloop.core._envelopes import load_generated

        common = load_generated("common_pb2")
        return common.ObjectRef(
            bucket=self.bucket, key=self.key, sha256=self.sha256, size_bytes=self.size_bytes
        )

    @classmethod
    def from_proto(cls, message: common_pb2.ObjectRef) -> ObjectRef:
        """Validate an ObjectRef that arrived from outside (an event or a request)."""
        validate_bucket(message.bucket)
        validate_key(message.key)
        if not re.fullmatch(r"[0-9a-f]{64}", message.sha256):
            raise ValidationError(f"object ref {message.key!r} has no valid sha256")
        if message.size_bytes < 0:
            raise ValidationError(f"object ref {message.key!r} has a negative size")
        return cls(message.bucket, message.key, message.sha256, message.size_bytes)


@dataclasses.dataclass(frozen=True)
class ArtifactPointer:
    """The pointer object of a multi-part artefact: every part's ref, written after the parts."""

    bucket: str
    pointer_key: str
    prefix: str
    parts: Mapping[str, ObjectRef]
    published_at: str

    def to_json(self) -> bytes:
        body = {
            "format": POINTER_FORMAT,
            "prefix": self.prefix,
            "published_at": self.published_at,
            "parts": {
                name: {"key": ref.key, "sha256": ref.sha256, "size_bytes": ref.size_bytes}
                for name, ref in sorted(self.parts.items())
            },
        }
        return json.dumps(body, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, bucket: str, pointer_key: str, data: bytes) -> ArtifactPointer:
        try:
            body: Any = json.loads(data)
            if body.get("format") != POINTER_FORMAT:
                raise ValueError(f"format is {body.get('format')!r}")
            parts = {
                str(name): ObjectRef(
                    bucket,
                    validate_key(str(part["key"])),
                    str(part["sha256"]),
                    int(part["size_bytes"]),
                )
                for name, part in body["parts"].items()
            }
            return cls(bucket, pointer_key, str(body["prefix"]), parts, str(body["published_at"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValidationError(
                f"object {bucket}/{pointer_key} is not an artefact pointer ({exc})"
            ) from None


class ObjectStore(abc.ABC):
    """Port: S3-like buckets of checksummed objects. Adapters: memory, local dir, S3/MinIO."""

    # -- primitives ---------------------------------------------------------------------------

    @abc.abstractmethod
    def ensure_bucket(self, bucket: str) -> None:
        """Create the bucket if it does not exist (idempotent)."""

    @abc.abstractmethod
    def put(
        self, bucket: str, key: str, data: bytes, *, content_type: str = DEFAULT_CONTENT_TYPE
    ) -> ObjectRef:
        """Write (or overwrite) an object; record its sha256. NotFoundError if no bucket."""

    @abc.abstractmethod
    def get(self, bucket: str, key: str) -> bytes:
        """Read an object and verify its sha256; NotFoundError or ChecksumMismatchError."""

    @abc.abstractmethod
    def stat(self, bucket: str, key: str) -> ObjectRef:
        """The recorded ref of an object without reading it; NotFoundError if absent."""

    @abc.abstractmethod
    def list(self, bucket: str, prefix: str = "") -> list[str]:
        """Keys that start with ``prefix``, sorted. NotFoundError if no bucket."""

    @abc.abstractmethod
    def delete(self, bucket: str, key: str) -> None:
        """Remove an object; deleting a missing object is not an error."""

    def ping(self) -> None:
        """Raise TransientError if the store cannot be reached (readiness checks)."""
        return None

    def close(self) -> None:
        """Release connections."""
        return None

    # -- derived operations -------------------------------------------------------------------

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self.stat(bucket, key)
        except NotFoundError:
            return False
        return True

    def put_file(
        self,
        bucket: str,
        key: str,
        source: BinaryIO,
        *,
        sha256: str,
        content_type: str = DEFAULT_CONTENT_TYPE,
    ) -> ObjectRef:
        """Write an object from an open binary file (read from its start), without holding
        it whole where the adapter can stream (S3 multipart, a file copy). ``sha256`` is the
        hash the caller computed as it wrote the file (a spooled upload); the bytes read are
        hashed again, and a difference raises ChecksumMismatchError with nothing stored.
        This default reads the file whole (the in-memory adapter holds it anyway)."""
        source.seek(0)
        data = source.read()
        check_bytes(bucket, key, data, sha256)
        return self.put(bucket, key, data, content_type=content_type)

    def put_content_addressed(
        self,
        bucket: str,
        data: bytes,
        suffix: str = "",
        *,
        prefix: str = "",
        content_type: str = DEFAULT_CONTENT_TYPE,
    ) -> ObjectRef:
        """Store ``data`` under ``prefix + sha256(data) + suffix``; a second call is a no-op."""
        if suffix and ("/" in suffix or not suffix.startswith(".")):
            raise ValidationError(f"suffix {suffix!r} must look like '.wav' (no '/')")
        digest = sha256_hex(data)
        key = validate_key(f"{prefix}{digest}{suffix}")
        try:
            existing = self.stat(bucket, key)
        except NotFoundError:
            return self.put(bucket, key, data, content_type=content_type)
        if existing.sha256 == digest and existing.size_bytes == len(data):
            return existing
        # A torn earlier write under the same content address: rewrite it.
        return self.put(bucket, key, data, content_type=content_type)

    def publish_artifact(
        self,
        bucket: str,
        prefix: str,
        parts: Mapping[str, bytes],
        pointer_key: str,
    ) -> ArtifactPointer:
        """Write every part under ``prefix/``, verify them, then write the pointer (last)."""
        validate_key(prefix)
        validate_key(pointer_key)
        if not parts:
            raise ValidationError("an artefact needs at least one part")
        if pointer_key.startswith(prefix.rstrip("/") + "/"):
            raise ValidationError("the pointer must live outside the artefact's prefix")
        # 1. every part
        written: dict[str, ObjectRef] = {}
        for name, data in parts.items():
            key = validate_key(f"{prefix.rstrip('/')}/{name}")
            written[name] = self.put(bucket, key, data)
        # 2. verify what the store recorded against what we hashed before writing
        for name, data in parts.items():
            recorded = self.stat(bucket, written[name].key)
            expected = sha256_hex(data)
            if recorded.sha256 != expected or recorded.size_bytes != len(data):
                raise ChecksumMismatchError(
                    f"part {name!r} of {bucket}/{prefix} did not land intact; pointer not written",
                    bucket=bucket,
                    key=recorded.key,
                    expected=expected,
                    actual=recorded.sha256,
                )
        # 3. the pointer, last
        pointer = ArtifactPointer(
            bucket=bucket,
            pointer_key=pointer_key,
            prefix=prefix.rstrip("/"),
            parts=written,
            published_at=datetime.now(UTC).isoformat(),
        )
        self.put(bucket, pointer_key, pointer.to_json(), content_type="application/json")
        return pointer

    def read_pointer(self, bucket: str, pointer_key: str) -> ArtifactPointer:
        return ArtifactPointer.from_json(bucket, pointer_key, self.get(bucket, pointer_key))

    def read_artifact(
        self, bucket: str, pointer_key: str, *, pointer_sha256: str = ""
    ) -> dict[str, bytes]:
        """Follow a pointer and return every part, each checked against the pointer's sha256
        and size. With ``pointer_sha256`` (the artefact's content hash, as its publisher
        recorded it elsewhere) the pointer's own bytes are checked first: the hash is computed
        from the bytes read, so an artefact published again or tampered with since — pointer
        and metadata alike — is refused (ChecksumMismatchError)."""
        raw = self.get(bucket, pointer_key)
        if pointer_sha256:
            check_bytes(bucket, pointer_key, raw, pointer_sha256)
        pointer = ArtifactPointer.from_json(bucket, pointer_key, raw)
        out: dict[str, bytes] = {}
        for name, ref in pointer.parts.items():
            data = self.get(bucket, ref.key)
            actual = sha256_hex(data)
            if actual != ref.sha256 or len(data) != ref.size_bytes:
                raise ChecksumMismatchError(
                    f"part {name!r} of {bucket}/{pointer.prefix} changed after it was published "
                    f"({len(data)} bytes, {ref.size_bytes} published)",
                    bucket=bucket,
                    key=ref.key,
                    expected=ref.sha256,
                    actual=actual,
                )
            out[name] = data
        return out


def check_bytes(bucket: str, key: str, data: bytes, expected: str) -> bytes:
    """Adapters call this on every read: raise ChecksumMismatchError when the bytes changed."""
    actual = sha256_hex(data)
    if actual != expected:
        raise ChecksumMismatchError(
            f"object {bucket}/{key} is corrupt: sha256 {actual[:12]}… ≠ recorded {expected[:12]}…",
            bucket=bucket,
            key=key,
            expected=expected,
            actual=actual,
        )
    return data

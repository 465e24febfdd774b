"""In-process ObjectStore: a dict of buckets, for unit tests and the embedded demo."""

from __future__ import annotations

import dataclasses
import threading

from riffloop.core._errors import NotFoundError
from riffloop.core._object_store import (
    DEFAULT_CONTENT_TYPE,
    ObjectRef,
    ObjectStore,
    check_bytes,
    sha256_hex,
    validate_bucket,
    validate_key,
)


@dataclasses.dataclass
class _Stored:
    data: bytes
    sha256: str
    content_type: str


class MemoryObjectStore(ObjectStore):
    """Thread-safe, in-memory buckets. Bytes are copied in and out, as a real store would."""

    def __init__(self) -> None:
        self._buckets: dict[str, dict[str, _Stored]] = {}
        self._lock = threading.Lock()

    def ensure_bucket(self, bucket: str) -> None:
        validate_bucket(bucket)
        with self._lock:
            self._buckets.setdefault(bucket, {})

    def _bucket(self, bucket: str) -> dict[str, _Stored]:
        validate_bucket(bucket)
        try:
            return self._buckets[bucket]
        except KeyError:
            raise NotFoundError(f"bucket {bucket!r} does not exist") from None

    def put(
        self, bucket: str, key: str, data: bytes, *, content_type: str = DEFAULT_CONTENT_TYPE
    ) -> ObjectRef:
        validate_key(key)
        blob = bytes(data)
        digest = sha256_hex(blob)
        with self._lock:
            self._bucket(bucket)[key] = _Stored(blob, digest, content_type)
        return ObjectRef(bucket, key, digest, len(blob))

    def _stored(self, bucket: str, key: str) -> _Stored:
        validate_key(key)
        with self._lock:
            stored = self._bucket(bucket).get(key)
        if stored is None:
            raise NotFoundError(f"object {bucket}/{key} does not exist")
        return stored

    def get(self, bucket: str, key: str) -> bytes:
        stored = self._stored(bucket, key)
        return check_bytes(bucket, key, bytes(stored.data), stored.sha256)

    def stat(self, bucket: str, key: str) -> ObjectRef:
        stored = self._stored(bucket, key)
        return ObjectRef(bucket, key, stored.sha256, len(stored.data))

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(k for k in self._bucket(bucket) if k.startswith(prefix))

    def delete(self, bucket: str, key: str) -> None:
        validate_key(key)
        with self._lock:
            self._bucket(bucket).pop(key, None)

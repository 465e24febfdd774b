"""ObjectStore on any S3-compatible server (MinIO in tests) through the minio SDK.

The sha256 recorded at ``put`` travels as user metadata (``x-amz-meta-sha256``), so ``get`` can
verify the bytes with the headers of the same response and ``stat`` is one HEAD request. Only
generic S3 calls are used (no MinIO admin API), so production can point at any S3.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

from riffloop.core._errors import (
    ChecksumMismatchError,
    NotFoundError,
    PermanentError,
    TransientError,
)
from riffloop.core._object_store import (
    DEFAULT_CONTENT_TYPE,
    ObjectRef,
    ObjectStore,
    check_bytes,
    sha256_hex,
    validate_bucket,
    validate_key,
)

if TYPE_CHECKING:
    from minio import Minio

    from riffloop.core._settings import Settings

_SHA_HEADER = "x-amz-meta-sha256"
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}
# The retry hint of a call refused while S3 is down or failing (TransientError.retry_after_s):
# the client's own bounded retries (``connect``) have run out by then, so a caller's next try
# is worth making after a pause of this order, not at once.
RETRY_AFTER_S = 2.0
# Parts of a streamed upload (put_file): S3's smallest multipart part.
_PART_BYTES = 5 * 1024 * 1024
T = TypeVar("T")


class _HashingReader:
    """A file that hashes what is read from it (the minio SDK reads a part at a time)."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.digest.update(data)
        return data


class S3ObjectStore(ObjectStore):
    """S3 adapter; the minio client is injected (see :meth:`from_settings` for the usual one)."""

    def __init__(self, client: Minio, bucket_prefix: str = "", http: Any = None) -> None:
        """``bucket_prefix``: prepended to every bucket name on the server (not in the
        ``ObjectRef``s, which name the logical bucket), so several deployments share one S3."""
        self._client = client
        self._prefix = bucket_prefix
        self._http = http  # the connection pool ``connect`` made (closed by ``close``)

    @classmethod
    def connect(
        cls,
        endpoint: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool = False,
        region: str = "us-east-1",
        timeout_s: float = 10.0,
        retries: int = 2,
        bucket_prefix: str = "",
    ) -> S3ObjectStore:
        """A client with bounded timeouts and retries (the SDK default retries for minutes)."""
        import urllib3
        from minio import Minio

        host = endpoint.split("://", 1)[1] if "://" in endpoint else endpoint
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
            retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[502, 503]),
            maxsize=8,
        )
        client = Minio(
            host.rstrip("/"),
            access_key=access_key,
            secret_key=secret_key,
            secure=secure or endpoint.startswith("https://"),
            region=region,
            http_client=http,
        )
        return cls(client, bucket_prefix, http)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3ObjectStore:
        return cls.connect(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key,
            secure=settings.s3_uses_tls,
            region=settings.s3_region,
            bucket_prefix=settings.s3_bucket_prefix,
        )

    # -- error mapping ------------------------------------------------------------------------

    def _call(self, what: str, action: Callable[[], T]) -> T:
        from minio.error import MinioException, S3Error
        from urllib3.exceptions import HTTPError

        try:
            return action()
        except S3Error as exc:
            if exc.code in _NOT_FOUND_CODES:
                raise NotFoundError(f"{what}: {exc.code}") from None
            if exc.code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                raise PermanentError(f"{what}: S3 refused the credentials ({exc.code})") from None
            raise TransientError(
                f"{what}: S3 error {exc.code}", retry_after_s=RETRY_AFTER_S
            ) from None
        except (MinioException, HTTPError, OSError) as exc:
            raise TransientError(
                f"{what}: S3 endpoint unreachable ({type(exc).__name__})",
                retry_after_s=RETRY_AFTER_S,
            ) from None

    # -- primitives ---------------------------------------------------------------------------

    def ensure_bucket(self, bucket: str) -> None:
        from minio.error import S3Error

        validate_bucket(bucket)

        def create() -> None:
            if self._client.bucket_exists(self._prefix + bucket):
                return
            try:
                self._client.make_bucket(self._prefix + bucket)
            except S3Error as exc:  # a concurrent creator won the race
                if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

        self._call(f"create bucket {bucket}", create)

    def put(
        self, bucket: str, key: str, data: bytes, *, content_type: str = DEFAULT_CONTENT_TYPE
    ) -> ObjectRef:
        validate_bucket(bucket)
        validate_key(key)
        blob = bytes(data)
        digest = sha256_hex(blob)
        self._call(
            f"put {bucket}/{key}",
            lambda: self._client.put_object(
                self._prefix + bucket,
                key,
                io.BytesIO(blob),
                len(blob),
                content_type=content_type,
                metadata={"sha256": digest},
            ),
        )
        return ObjectRef(bucket, key, digest, len(blob))

    def put_file(
        self,
        bucket: str,
        key: str,
        source: BinaryIO,
        *,
        sha256: str,
        content_type: str = DEFAULT_CONTENT_TYPE,
    ) -> ObjectRef:
        """Streamed: a multipart upload of 5 MiB parts (S3's smallest) read one at a time, so
        a 20 MiB upload holds one part in memory, not the file. The parts are hashed as they
        leave; if they do not hash to ``sha256`` the object is deleted again."""
        validate_bucket(bucket)
        validate_key(key)
        size = source.seek(0, io.SEEK_END)
        source.seek(0)
        reader = _HashingReader(source)
        self._call(
            f"put {bucket}/{key}",
            lambda: self._client.put_object(
                self._prefix + bucket,
                key,
                cast(BinaryIO, reader),  # the SDK only calls read(n)
                size,
                content_type=content_type,
                metadata={"sha256": sha256},
                part_size=_PART_BYTES,
                num_parallel_uploads=1,  # more would read further parts ahead into memory
            ),
        )
        actual = reader.digest.hexdigest()
        if actual != sha256:
            self.delete(bucket, key)
            raise ChecksumMismatchError(
                f"{bucket}/{key}: the file changed while it was stored (sha256 {actual[:12]}… ≠ "
                f"declared {sha256[:12]}…); nothing stored",
                bucket=bucket,
                key=key,
                expected=sha256,
                actual=actual,
            )
        return ObjectRef(bucket, key, sha256, size)

    def get(self, bucket: str, key: str) -> bytes:
        validate_bucket(bucket)
        validate_key(key)

        def read() -> tuple[bytes, Any]:
            response = self._client.get_object(self._prefix + bucket, key)
            try:
                return response.read(), response.headers.get(_SHA_HEADER)
            finally:
                response.close()
                response.release_conn()

        blob, expected = self._call(f"get {bucket}/{key}", read)
        if not expected:
            raise PermanentError(f"object {bucket}/{key} has no recorded sha256")
        return check_bytes(bucket, key, blob, str(expected))

    def stat(self, bucket: str, key: str) -> ObjectRef:
        validate_bucket(bucket)
        validate_key(key)
        info = self._call(
            f"stat {bucket}/{key}", lambda: self._client.stat_object(self._prefix + bucket, key)
        )
        metadata = info.metadata or {}
        expected = metadata.get(_SHA_HEADER) or metadata.get(_SHA_HEADER.title())
        if not expected:
            raise PermanentError(f"object {bucket}/{key} has no recorded sha256")
        return ObjectRef(bucket, key, str(expected), int(info.size or 0))

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        validate_bucket(bucket)

        def collect() -> list[str]:
            if not self._client.bucket_exists(self._prefix + bucket):
                raise NotFoundError(f"bucket {bucket!r} does not exist")
            objects = self._client.list_objects(
                self._prefix + bucket, prefix=prefix or None, recursive=True
            )
            return sorted(o.object_name for o in objects if o.object_name is not None)

        return self._call(f"list {bucket}/{prefix}", collect)

    def delete(self, bucket: str, key: str) -> None:
        validate_bucket(bucket)
        validate_key(key)
        self._call(
            f"delete {bucket}/{key}", lambda: self._client.remove_object(self._prefix + bucket, key)
        )

    def ping(self) -> None:
        self._call("list buckets", self._client.list_buckets)

    def close(self) -> None:
        if self._http is not None:
            self._http.clear()  # urllib3: close every pooled connection

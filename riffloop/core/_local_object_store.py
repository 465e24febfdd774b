"""ObjectStore on a local directory (the embedded backend's ``data_dir``).

Layout: data at ``<root>/<bucket>/<key>`` (browsable as plain files), the recorded sha256, size and
content type at ``<root>/.meta/<bucket>/<key>.json``; ``.meta`` can never be a bucket name. An
object exists when its meta file exists.

Writes are atomic per file (write a temp file in the same directory, fsync, ``os.replace``), in the
order data, then meta. A crash between the two renames leaves either no object (first write) or new
bytes under the old checksum, which the next ``get`` reports as ``ChecksumMismatchError`` instead of
returning silently wrong data; repeating the ``put`` repairs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from riffloop.core._errors import (
    ChecksumMismatchError,
    ConflictError,
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

_META = ".meta"
_META_SUFFIX = ".json"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class LocalDirObjectStore(ObjectStore):
    """Buckets as directories under ``root``; safe for several processes on one machine."""

    def __init__(self, root: Path | str) -> None:
        self._root = Path(root).expanduser().resolve()
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransientError(
                f"cannot create object store directory {self._root}: {exc}"
            ) from None

    @property
    def root(self) -> Path:
        return self._root

    def _bucket_dir(self, bucket: str, *, must_exist: bool = True) -> Path:
        path = self._root / validate_bucket(bucket)
        if must_exist and not path.is_dir():
            raise NotFoundError(f"bucket {bucket!r} does not exist")
        return path

    def _paths(self, bucket: str, key: str) -> tuple[Path, Path]:
        validate_key(key)
        data = self._bucket_dir(bucket) / key
        meta = self._root / _META / bucket / (key + _META_SUFFIX)
        return data, meta

    def ensure_bucket(self, bucket: str) -> None:
        self._bucket_dir(bucket, must_exist=False).mkdir(parents=True, exist_ok=True)
        (self._root / _META / bucket).mkdir(parents=True, exist_ok=True)

    def put(
        self, bucket: str, key: str, data: bytes, *, content_type: str = DEFAULT_CONTENT_TYPE
    ) -> ObjectRef:
        data_path, meta_path = self._paths(bucket, key)
        blob = bytes(data)
        ref = ObjectRef(bucket, key, sha256_hex(blob), len(blob))
        meta = {"sha256": ref.sha256, "size_bytes": ref.size_bytes, "content_type": content_type}
        try:
            _atomic_write(data_path, blob)
            _atomic_write(meta_path, json.dumps(meta).encode())
        except (NotADirectoryError, IsADirectoryError, FileExistsError):
            # S3 allows both "a" and "a/b"; a directory tree cannot hold both.
            raise ConflictError(
                f"object key {key!r} clashes with an existing object or prefix in {bucket!r}"
            ) from None
        return ref

    def put_file(
        self,
        bucket: str,
        key: str,
        source: BinaryIO,
        *,
        sha256: str,
        content_type: str = DEFAULT_CONTENT_TYPE,
    ) -> ObjectRef:
        """Copied in 1 MiB blocks, hashed on the way; renamed into place only if the copy
        hashes to ``sha256``, then the meta file (the order of ``put``)."""
        data_path, meta_path = self._paths(bucket, key)
        source.seek(0)
        digest = hashlib.sha256()
        size = 0
        try:
            data_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=data_path.parent, prefix=".tmp-", suffix=".part")
        except (NotADirectoryError, FileExistsError):
            raise ConflictError(
                f"object key {key!r} clashes with an existing object or prefix in {bucket!r}"
            ) from None
        try:
            with os.fdopen(fd, "wb") as handle:
                while block := source.read(1 << 20):
                    digest.update(block)
                    size += len(block)
                    handle.write(block)
                handle.flush()
                os.fsync(handle.fileno())
            if digest.hexdigest() != sha256:
                raise ChecksumMismatchError(
                    f"{bucket}/{key}: the file does not hash to its declared sha256; not stored",
                    bucket=bucket,
                    key=key,
                    expected=sha256,
                    actual=digest.hexdigest(),
                )
            os.replace(tmp, data_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        meta = {"sha256": sha256, "size_bytes": size, "content_type": content_type}
        _atomic_write(meta_path, json.dumps(meta).encode())
        return ObjectRef(bucket, key, sha256, size)

    def _meta(self, bucket: str, key: str) -> tuple[Path, dict[str, Any]]:
        data_path, meta_path = self._paths(bucket, key)
        try:
            meta = json.loads(meta_path.read_bytes())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"object {bucket}/{key} does not exist") from None
        except ValueError:
            raise PermanentError(f"metadata of {bucket}/{key} is corrupt") from None
        return data_path, meta

    def get(self, bucket: str, key: str) -> bytes:
        data_path, meta = self._meta(bucket, key)
        try:
            blob = data_path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"object {bucket}/{key} does not exist") from None
        return check_bytes(bucket, key, blob, str(meta["sha256"]))

    def stat(self, bucket: str, key: str) -> ObjectRef:
        _, meta = self._meta(bucket, key)
        return ObjectRef(bucket, key, str(meta["sha256"]), int(meta["size_bytes"]))

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        self._bucket_dir(bucket)
        meta_root = self._root / _META / bucket
        keys: list[str] = []
        for directory, _dirs, files in os.walk(meta_root):
            for name in files:
                if not name.endswith(_META_SUFFIX) or name.startswith(".tmp-"):
                    continue
                rel = Path(directory, name).relative_to(meta_root).as_posix()
                key = rel[: -len(_META_SUFFIX)]
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, bucket: str, key: str) -> None:
        data_path, meta_path = self._paths(bucket, key)
        # Meta first: the object disappears in one step; the data file is then only garbage.
        for path in (meta_path, data_path):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                path.unlink()

    def ping(self) -> None:
        if not os.access(self._root, os.W_OK):
            raise TransientError(f"object store directory {self._root} is not writable")

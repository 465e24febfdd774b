"""Uploads spooled to disk as they arrive: never held whole in memory, bounded in size and time.

A reader thread takes an UploadSong stream's messages (metadata first, then chunks) and writes
the chunks to an unlinked temporary file (``tempfile.TemporaryFile`` in
RIFFLOOP_UPLOAD_SPOOL_DIR; the system's temporary directory when unset), hashing them as they
come (the song id is their sha256). It stops at the first bad message: metadata the gateway
refuses, or the size cap passed. The handler's thread waits for it until the upload's deadline
(RIFFLOOP_UPLOAD_DEADLINE_S, or the client's own deadline if sooner). The wait lives outside the
request iterator because gRPC's sync server has no server-side deadline: a handler blocked in
``next(requests)`` behind a stalled client would wait for ever. Past the deadline the call ends
with DEADLINE_EXCEEDED; gRPC then ends the stream, and the reader closes (so deletes) the file.

Memory per upload: one message (≤ the server's 2 MiB message limit) at a time, whatever its size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

from riffloop.core import DeadlineExceededError, RiffloopError, TransientError, ValidationError
from riffloop.v1 import gateway_service_pb2 as pb


@dataclasses.dataclass(frozen=True)
class SpooledUpload:
    metadata: pb.UploadSongMetadata
    file: BinaryIO  # the bytes, in an unlinked temporary file
    size: int
    sha256: str


class _StreamReader(threading.Thread):
    """Reads one UploadSong stream into ``file``; whoever finishes last closes the file."""

    def __init__(
        self,
        requests: Iterator[pb.UploadSongRequest],
        file: BinaryIO,
        limit: int,
        check_metadata: Callable[[pb.UploadSongMetadata], None],
    ) -> None:
        super().__init__(name="upload-reader", daemon=True)
        self.requests = requests
        self.file = file
        self.limit = limit
        self.check_metadata = check_metadata
        self.metadata: pb.UploadSongMetadata | None = None
        self.size = 0
        self.digest = hashlib.sha256()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._abandoned = False
        self._done = False

    def run(self) -> None:
        try:
            for index, part in enumerate(self.requests):
                if self._abandoned:
                    break
                which = part.WhichOneof("part")
                if which == "metadata":
                    if index != 0:
                        raise ValidationError("metadata must be the first message of an upload")
                    self.check_metadata(part.metadata)
                    self.metadata = part.metadata
                elif which == "chunk":
                    self.size += len(part.chunk)
                    if self.size > self.limit:
                        raise ValidationError(f"upload exceeds the limit of {self.limit} bytes")
                    self.digest.update(part.chunk)
                    self.file.write(part.chunk)
                else:
                    raise ValidationError(
                        f"upload message {index} carries neither metadata nor chunk"
                    )
        except Exception as exc:  # a refusal, the stream broken off (grpc.RpcError), the disk
            self.error = exc
        finally:
            with self._lock:
                self._done = True
                if self._abandoned:
                    self.file.close()

    def abandon(self) -> bool:
        """The handler gives up waiting. True: the reader still runs and will close the file;
        False: it has just finished, and the file is the handler's to close."""
        with self._lock:
            self._abandoned = True
            return not self._done


class UploadSpool:
    """Where uploads wait, on disk, between the network and the object store."""

    def __init__(self, directory: str, max_bytes: int) -> None:
        self.directory = directory or None  # None: tempfile's default (TMPDIR, /tmp)
        self.max_bytes = max_bytes

    def _new_file(self) -> BinaryIO:
        try:
            return tempfile.TemporaryFile(dir=self.directory)  # unlinked: gone when closed
        except OSError as exc:
            raise TransientError(
                f"the gateway cannot spool uploads now ({type(exc).__name__})", retry_after_s=5.0
            ) from None

    @contextlib.contextmanager
    def receive(
        self,
        requests: Iterator[pb.UploadSongRequest],
        deadline_s: float,
        check_metadata: Callable[[pb.UploadSongMetadata], None],
    ) -> Iterator[SpooledUpload]:
        """Spool one UploadSong stream; the file lives while the block runs."""
        file = self._new_file()
        reader = _StreamReader(requests, file, self.max_bytes, check_metadata)
        reader.start()
        reader.join(max(0.0, deadline_s))
        if reader.is_alive() and reader.abandon():
            raise DeadlineExceededError(
                f"the upload did not arrive within {deadline_s:.1f} s (received "
                f"{reader.size} bytes); send it again over a faster connection"
            )
        try:
            if isinstance(reader.error, RiffloopError):
                raise reader.error
            if reader.error is not None:
                raise TransientError(
                    f"the upload stream broke off after {reader.size} bytes "
                    f"({type(reader.error).__name__}); send it again"
                ) from None
            if reader.metadata is None:
                raise ValidationError("an upload must start with a metadata message")
            yield SpooledUpload(reader.metadata, file, reader.size, reader.digest.hexdigest())
        finally:
            file.close()

    @contextlib.contextmanager
    def hold(self, metadata: pb.UploadSongMetadata, data: bytes) -> Iterator[SpooledUpload]:
        """An upload that arrived in one message (UploadWholeSong), spooled like a stream."""
        if len(data) > self.max_bytes:
            raise ValidationError(f"upload exceeds the limit of {self.max_bytes} bytes")
        with self._new_file() as file:
            file.write(data)
            yield SpooledUpload(metadata, file, len(data), hashlib.sha256(data).hexdigest())

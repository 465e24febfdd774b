"""Object store semantics beyond the contract: pointer-last publishing and torn local writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from riffloop.core import (
    ChecksumMismatchError,
    ConflictError,
    LocalDirObjectStore,
    MemoryObjectStore,
    NotFoundError,
    ObjectRef,
    TransientError,
    ValidationError,
    sha256_hex,
)
from riffloop.v1 import common_pb2

pytestmark = pytest.mark.unit


class RecordingStore(MemoryObjectStore):
    """Records the order of writes and can fail the n-th one (a crash mid-publish)."""

    def __init__(self, fail_on_put: int | None = None) -> None:
        super().__init__()
        self.puts: list[str] = []
        self.fail_on_put = fail_on_put

    def put(self, bucket: str, key: str, data: bytes, *, content_type: str = "x") -> ObjectRef:
        if self.fail_on_put is not None and len(self.puts) + 1 == self.fail_on_put:
            raise TransientError("connection reset while writing")
        self.puts.append(key)
        return super().put(bucket, key, data, content_type=content_type)


class LyingStore(MemoryObjectStore):
    """A store that records a different checksum than it was given (bit rot on the way in)."""

    def stat(self, bucket: str, key: str) -> ObjectRef:
        ref = super().stat(bucket, key)
        return ObjectRef(bucket, key, "0" * 64, ref.size_bytes) if key.endswith(".bin") else ref


PARTS = {"unet/diffusion.safetensors": b"\x01" * 100, "mel.json": b"{}", "gate.json": b"[]"}


def test_the_pointer_is_written_last() -> None:
    store = RecordingStore()
    store.ensure_bucket("models")
    store.publish_artifact("models", "v3", PARTS, "CURRENT")
    assert store.puts[-1] == "CURRENT"
    assert sorted(store.puts[:-1]) == sorted(f"v3/{name}" for name in PARTS)


@pytest.mark.parametrize("failing_put", [1, 2, 3])
def test_a_failed_part_leaves_the_old_pointer(failing_put: int) -> None:
    store = RecordingStore()
    store.ensure_bucket("models")
    store.publish_artifact("models", "v1", {"a.bin": b"old"}, "CURRENT")
    store.fail_on_put, store.puts = failing_put, []
    with pytest.raises(TransientError):
        store.publish_artifact("models", "v2", PARTS, "CURRENT")
    assert "CURRENT" not in store.puts
    assert store.read_artifact("models", "CURRENT") == {"a.bin": b"old"}


def test_a_part_that_did_not_land_intact_blocks_the_pointer() -> None:
    store = LyingStore()
    store.ensure_bucket("models")
    with pytest.raises(ChecksumMismatchError, match="pointer not written"):
        store.publish_artifact("models", "v4", {"w.bin": b"weights", "c.json": b"{}"}, "CURRENT")
    assert not store.exists("models", "CURRENT")


def test_a_pointer_that_is_not_a_pointer_is_a_validation_error() -> None:
    store = MemoryObjectStore()
    store.ensure_bucket("models")
    store.put("models", "CURRENT", b"v3")
    with pytest.raises(ValidationError, match="not an artefact pointer"):
        store.read_artifact("models", "CURRENT")
    store.put("models", "CURRENT", json.dumps({"format": "other"}).encode())
    with pytest.raises(ValidationError):
        store.read_pointer("models", "CURRENT")


def test_local_torn_write_is_detected_and_repaired(tmp_path: Path) -> None:
    """A crash between the data rename and the meta rename: new bytes, old checksum."""
    store = LocalDirObjectStore(tmp_path)
    store.ensure_bucket("tracks")
    store.put("tracks", "t1/audio.wav", b"version one")
    (tmp_path / "tracks" / "t1" / "audio.wav").write_bytes(b"version two")  # data landed, meta not
    with pytest.raises(ChecksumMismatchError):
        store.get("tracks", "t1/audio.wav")
    store.put("tracks", "t1/audio.wav", b"version two")  # the retry repairs it
    assert store.get("tracks", "t1/audio.wav") == b"version two"


def test_local_data_without_meta_does_not_exist(tmp_path: Path) -> None:
    """A crash before the first meta write: the object was never published."""
    store = LocalDirObjectStore(tmp_path)
    store.ensure_bucket("songs")
    (tmp_path / "songs" / "orphan.wav").write_bytes(b"half written")
    (tmp_path / "songs" / ".tmp-abc.part").write_bytes(b"temp")
    assert store.list("songs") == []
    with pytest.raises(NotFoundError):
        store.get("songs", "orphan.wav")


def test_local_key_that_clashes_with_a_prefix_is_a_conflict(tmp_path: Path) -> None:
    store = LocalDirObjectStore(tmp_path)
    store.ensure_bucket("models")
    store.put("models", "v1", b"a file")
    with pytest.raises(ConflictError):
        store.put("models", "v1/unet.bin", b"under a file")
    store.put("models", "v2/unet.bin", b"a prefix")
    with pytest.raises(ConflictError):
        store.put("models", "v2", b"over a directory")
    assert store.list("models") == ["v1", "v2/unet.bin"]


def test_local_store_survives_a_new_instance(tmp_path: Path) -> None:
    LocalDirObjectStore(tmp_path).ensure_bucket("latents")
    ref = LocalDirObjectStore(tmp_path).put("latents", "s1.pt", b"z")
    assert LocalDirObjectStore(tmp_path).stat("latents", "s1.pt") == ref


def test_object_ref_proto_roundtrip_validates() -> None:
    ref = ObjectRef("songs", "ab.wav", sha256_hex(b"x"), 1)
    assert ObjectRef.from_proto(ref.to_proto()) == ref
    with pytest.raises(ValidationError):
        ObjectRef.from_proto(common_pb2.ObjectRef(bucket="songs", key="../etc", sha256="0" * 64))
    with pytest.raises(ValidationError):
        ObjectRef.from_proto(common_pb2.ObjectRef(bucket="songs", key="k", sha256="nothex"))

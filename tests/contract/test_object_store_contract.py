"""The ObjectStore contract, run against every adapter (memory, local dir, S3/MinIO)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from riffloop.core import (
    ChecksumMismatchError,
    NotFoundError,
    ObjectRef,
    ValidationError,
    sha256_hex,
)
from tests.contract.adapters import StoreUnderTest, fresh_name

pytestmark = pytest.mark.contract


class TestObjectStoreContract:
    def test_put_get_roundtrip_returns_ref_with_sha256(self, object_store: StoreUnderTest) -> None:
        store, bucket = object_store.store, object_store.bucket
        data = b"RIFF" + bytes(range(256)) * 40
        ref = store.put(bucket, "tracks/t1/audio.wav", data, content_type="audio/wav")
        assert ref == ObjectRef(bucket, "tracks/t1/audio.wav", sha256_hex(data), len(data))
        assert store.get(bucket, "tracks/t1/audio.wav") == data
        assert store.stat(bucket, "tracks/t1/audio.wav") == ref

    def test_empty_object(self, object_store: StoreUnderTest) -> None:
        ref = object_store.store.put(object_store.bucket, "empty", b"")
        assert ref.size_bytes == 0
        assert object_store.store.get(object_store.bucket, "empty") == b""

    def test_overwrite_replaces_bytes_and_checksum(self, object_store: StoreUnderTest) -> None:
        store, bucket = object_store.store, object_store.bucket
        store.put(bucket, "k", b"first")
        ref = store.put(bucket, "k", b"second, longer")
        assert store.get(bucket, "k") == b"second, longer"
        assert store.stat(bucket, "k").sha256 == ref.sha256 == sha256_hex(b"second, longer")

    def test_missing_object_and_bucket_raise_not_found(self, object_store: StoreUnderTest) -> None:
        store, bucket = object_store.store, object_store.bucket
        with pytest.raises(NotFoundError):
            store.get(bucket, "nope")
        with pytest.raises(NotFoundError):
            store.stat(bucket, "nope")
        assert not store.exists(bucket, "nope")
        with pytest.raises(NotFoundError):
            store.put("no-such-bucket-" + bucket[-12:], "k", b"x")

    def test_exists_list_and_delete(self, object_store: StoreUnderTest) -> None:
        store, bucket = object_store.store, object_store.bucket
        for key in ["models/v2/unet.bin", "models/v1/unet.bin", "models/v1/config.json", "x"]:
            store.put(bucket, key, key.encode())
        assert store.exists(bucket, "models/v1/unet.bin")
        assert store.list(bucket, "models/v1/") == ["models/v1/config.json", "models/v1/unet.bin"]
        assert store.list(bucket) == sorted(
            ["models/v2/unet.bin", "models/v1/unet.bin", "models/v1/config.json", "x"]
        )
        store.delete(bucket, "models/v1/unet.bin")
        store.delete(bucket, "models/v1/unet.bin")  # idempotent
        assert not store.exists(bucket, "models/v1/unet.bin")
        assert store.list(bucket, "models/v1/") == ["models/v1/config.json"]

    def test_ensure_bucket_is_idempotent(self, object_store: StoreUnderTest) -> None:
        object_store.store.ensure_bucket(object_store.bucket)
        object_store.store.put(object_store.bucket, "k", b"v")
        object_store.store.ensure_bucket(object_store.bucket)
        assert object_store.store.get(object_store.bucket, "k") == b"v"

    @pytest.mark.parametrize("key", ["", "/abs", "a//b", "../up", "a/./b", ".hidden", "a\\b"])
    def test_bad_keys_are_validation_errors(self, object_store: StoreUnderTest, key: str) -> None:
        with pytest.raises(ValidationError):
            object_store.store.put(object_store.bucket, key, b"x")

    def test_bad_bucket_name_is_a_validation_error(self, object_store: StoreUnderTest) -> None:
        with pytest.raises(ValidationError):
            object_store.store.ensure_bucket("Not_A_Bucket")

    def test_tampered_bytes_raise_checksum_mismatch(self, object_store: StoreUnderTest) -> None:
        store, bucket = object_store.store, object_store.bucket
        ref = store.put(bucket, "latents/song.pt", b"original latent bytes")
        object_store.tamper("latents/song.pt", b"flipped latent bytes!")
        with pytest.raises(ChecksumMismatchError) as info:
            store.get(bucket, "latents/song.pt")
        assert info.value.expected == ref.sha256
        assert info.value.actual == sha256_hex(b"flipped latent bytes!")
        assert info.value.key == "latents/song.pt"

    def test_put_file_streams_a_file_and_checks_its_declared_sha256(
        self, object_store: StoreUnderTest, tmp_path: Any
    ) -> None:
        """A spooled upload: more than one S3 part (5 MiB), stored from an open file."""
        store, bucket = object_store.store, object_store.bucket
        data = bytes(range(256)) * (6 * 1024 * 4 + 7)  # 6 MiB and a little
        with (tmp_path / "upload").open("w+b") as spool:
            spool.write(data)
            ref = store.put_file(bucket, "songs/big", spool, sha256=sha256_hex(data))
            assert ref == ObjectRef(bucket, "songs/big", sha256_hex(data), len(data))
            assert store.get(bucket, "songs/big") == data
            assert store.stat(bucket, "songs/big") == ref
            with pytest.raises(ChecksumMismatchError):
                store.put_file(bucket, "songs/wrong", spool, sha256=sha256_hex(b"other"))
        assert not store.exists(bucket, "songs/wrong")

    def test_content_addressed_put_dedupes(self, object_store: StoreUnderTest) -> None:
        store, bucket = object_store.store, object_store.bucket
        audio = b"\x00\x01" * 1000
        first = store.put_content_addressed(bucket, audio, ".wav")
        second = store.put_content_addressed(bucket, audio, ".wav")
        assert first == second
        assert first.key == sha256_hex(audio) + ".wav"
        assert store.list(bucket) == [first.key]
        with pytest.raises(ValidationError):
            store.put_content_addressed(bucket, audio, "wav/../x")

    def test_publish_artifact_writes_parts_then_pointer(self, object_store: StoreUnderTest) -> None:
        store, bucket = object_store.store, object_store.bucket
        parts = {"unet/model.safetensors": b"\x01" * 5000, "config.json": b"{}", "gate.json": b"[]"}
        pointer = store.publish_artifact(bucket, "models/v7", parts, "models/CURRENT")
        assert set(pointer.parts) == set(parts)
        assert store.read_artifact(bucket, "models/CURRENT") == parts
        body = json.loads(store.get(bucket, "models/CURRENT"))
        assert body["prefix"] == "models/v7"
        assert body["parts"]["config.json"]["sha256"] == sha256_hex(b"{}")
        assert store.read_pointer(bucket, "models/CURRENT").parts == pointer.parts

    def test_read_artifact_detects_a_part_changed_after_publishing(
        self, object_store: StoreUnderTest
    ) -> None:
        store, bucket = object_store.store, object_store.bucket
        store.publish_artifact(bucket, "models/v8", {"a.bin": b"aaaa"}, "models/CURRENT")
        store.put(bucket, "models/v8/a.bin", b"bbbb")  # a legit write, but not what was published
        with pytest.raises(ChecksumMismatchError):
            store.read_artifact(bucket, "models/CURRENT")

    def test_pointer_must_sit_outside_the_prefix(self, object_store: StoreUnderTest) -> None:
        with pytest.raises(ValidationError):
            object_store.store.publish_artifact(
                object_store.bucket, "models/v9", {"a": b"a"}, "models/v9/CURRENT"
            )


@pytest.mark.integration
def test_two_bucket_prefixes_share_one_s3_without_seeing_each_other(real_infra: Any) -> None:
    from riffloop.core import NotFoundError, S3ObjectStore

    def store(prefix: str) -> S3ObjectStore:
        return S3ObjectStore.connect(
            real_infra.s3_endpoint,
            real_infra.s3_access_key,
            real_infra.s3_secret_key,
            bucket_prefix=prefix,
        )

    bucket = fresh_name("tracks")
    first, second = store("dep-a-"), store("dep-b-")
    for s in (first, second):
        s.ensure_bucket(bucket)
    ref = first.put(bucket, "t.wav", b"first")
    assert ref.bucket == bucket  # refs name the logical bucket: events carry no prefix
    assert first.get(bucket, "t.wav") == b"first"
    with pytest.raises(NotFoundError):
        second.get(bucket, "t.wav")
    assert second.list(bucket) == []
    first.close()
    second.close()

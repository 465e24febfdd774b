"""A checkpoint is loaded only if the bytes read hash to the content hash the trainer recorded
(riffloop.runtime.ModelStore): a truncated part, a pointer rewritten with its metadata to
match, or a publish cut short are refused; the serving process keeps its model and counts the
refusal (``riffloop_model_load_refusals_total``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from riffloop.core import (
    ChecksumMismatchError,
    MemoryObjectStore,
    NotFoundError,
    ObjectRef,
    ObjectStore,
    TransientError,
    sha256_hex,
)

pytestmark = pytest.mark.unit

UNET_PART = "unet/diffusion_pytorch_model.safetensors"


def tiny(version: str) -> Any:
    from riffloop.music import MelConfig, ModelConfig, MusicDiffusion

    mel = MelConfig(n_mels=16, x_res=16, n_fft=256, hop_length=64)
    model = MusicDiffusion.create(ModelConfig.preset("tiny"), mel, seed=int(version[1:]))
    model.version = version
    return model


class StoreThatGoesDown(ObjectStore):
    """``inner``, until ``puts_left`` writes have gone through; then every call raises
    TransientError, as an S3 client does while the server is stopped."""

    def __init__(self, inner: ObjectStore, puts_left: int) -> None:
        self.inner, self.puts_left = inner, puts_left

    def _up(self) -> ObjectStore:
        if self.puts_left <= 0:
            raise TransientError("S3 endpoint unreachable (test)", retry_after_s=2.0)
        return self.inner

    def ensure_bucket(self, bucket: str) -> None:
        self._up().ensure_bucket(bucket)

    def put(self, bucket: str, key: str, data: bytes, **kwargs: Any) -> ObjectRef:
        ref = self._up().put(bucket, key, data, **kwargs)
        self.puts_left -= 1
        return ref

    def get(self, bucket: str, key: str) -> bytes:
        return self._up().get(bucket, key)

    def stat(self, bucket: str, key: str) -> ObjectRef:
        return self._up().stat(bucket, key)

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        return self._up().list(bucket, prefix)

    def delete(self, bucket: str, key: str) -> None:
        self._up().delete(bucket, key)


def serving(objects: ObjectStore, service: str = "generator-integrity") -> tuple[Any, Any]:
    """A store with v0001 published and current, and a ServedModel holding it."""
    from riffloop.runtime import ModelStore, ServedModel

    objects.ensure_bucket("models")
    store = ModelStore(objects)
    store.publish(tiny("v0001"))
    store.set_current("v0001")
    served = ServedModel(store, service)
    assert served.load_current() and served.get().version == "v0001"
    return store, served


def refusals(service: str) -> float:
    from riffloop.runtime import metrics

    return float(metrics.MODEL_LOAD_REFUSALS.labels(service, "checksum")._value.get())


def test_the_content_hash_is_computed_from_the_bytes_and_recorded_in_the_marker() -> None:
    objects = MemoryObjectStore()
    store, _ = serving(objects)
    pointer = objects.get("models", "v0001.json")
    ref = store.checkpoint_ref("v0001")
    assert ref.sha256 == sha256_hex(pointer) and ref.size_bytes == len(pointer)
    assert store.current()["checkpoint_sha256"] == ref.sha256  # type: ignore[index]
    assert store.load("v0001").version == "v0001"


def test_a_truncated_part_is_refused_and_the_previous_model_keeps_serving() -> None:
    objects = MemoryObjectStore()
    store, served = serving(objects, "generator-truncated")
    store.publish(tiny("v0002"))
    store.set_current("v0002", "v0001")
    weights = objects.get("models", f"v0002/{UNET_PART}")
    objects.put("models", f"v0002/{UNET_PART}", weights[: len(weights) // 2])  # a torn rewrite
    before = refusals("generator-truncated")
    with pytest.raises(ChecksumMismatchError, match="bytes"):
        served.load_current()
    assert served.get().version == "v0001"
    assert refusals("generator-truncated") == before + 1


def test_a_pointer_rewritten_with_matching_metadata_is_refused() -> None:
    """The store's recorded sha256 (S3 metadata) and the pointer agree with the tampered bytes;
    only the content hash recorded at publication tells."""
    objects = MemoryObjectStore()
    store, served = serving(objects, "generator-tampered")
    store.publish(tiny("v0002"))
    store.set_current("v0002", "v0001")
    tampered = objects.get("models", f"v0002/{UNET_PART}")[:-64]
    objects.put("models", f"v0002/{UNET_PART}", tampered)
    pointer = json.loads(objects.get("models", "v0002.json"))
    pointer["parts"][UNET_PART].update(sha256=sha256_hex(tampered), size_bytes=len(tampered))
    objects.put("models", "v0002.json", json.dumps(pointer).encode())
    assert objects.read_artifact("models", "v0002.json")  # consistent with itself
    with pytest.raises(ChecksumMismatchError):
        store.load("v0002")
    with pytest.raises(ChecksumMismatchError):
        served.load_current()
    assert served.get().version == "v0001"


def test_a_publish_cut_short_by_an_outage_leaves_nothing_loadable() -> None:
    from riffloop.runtime import ModelStore

    objects = MemoryObjectStore()
    store, served = serving(objects, "generator-outage")
    down = ModelStore(StoreThatGoesDown(objects, puts_left=2))  # two parts, then S3 stops
    with pytest.raises(TransientError) as info:
        down.publish(tiny("v0002"))
    assert info.value.retry_after_s == 2.0
    assert any(k.startswith("v0002/") for k in objects.list("models"))  # parts, no pointer
    assert not store.exists("v0002")
    with pytest.raises(NotFoundError):
        store.load("v0002")
    with pytest.raises(NotFoundError):
        store.set_current("v0002", "v0001")
    assert served.load_current() and served.get().version == "v0001"
    store.publish(tiny("v0002"))  # the retry, after the outage: parts rewritten, then pointer
    store.set_current("v0002", "v0001")
    assert served.load_current() and served.get().version == "v0002"


def test_a_version_published_again_is_checked_against_its_new_record() -> None:
    """The trainer records the new hash when it publishes a version again (a set trained anew
    after a crash); a marker still naming the old hash refuses the new bytes."""
    from riffloop.loop import ModelRecord, ModelRegistry, VersionStatus

    objects = MemoryObjectStore()
    store, _ = serving(objects, "generator-republished")
    registry = ModelRegistry(objects)
    first = store.publish(tiny("v0002"))
    registry.register(
        ModelRecord("v0002", None, None, VersionStatus.SERVING, "v0002.json", first.sha256)
    )
    assert store.recorded_sha256("v0002") == first.sha256
    store.set_canary("v0002", "v0001", 0.2, first.sha256)
    again = store.publish(tiny("v0002"))
    assert again.sha256 != first.sha256  # the pointer's publication time differs
    with pytest.raises(ChecksumMismatchError):
        store.load("v0002")
    registry.record_checkpoint("v0002", "v0002.json", again.sha256)
    store.set_canary("v0002", "v0001", 0.2, again.sha256)
    assert store.load("v0002").version == "v0002"


def test_a_version_nobody_recorded_a_hash_for_is_checked_part_by_part() -> None:
    objects = MemoryObjectStore()
    store, _ = serving(objects)
    store.publish(tiny("v0003"))  # no marker, no registry record
    assert store.recorded_sha256("v0003") == ""
    assert store.load("v0003").version == "v0003"
    weights = objects.get("models", f"v0003/{UNET_PART}")
    objects.put("models", f"v0003/{UNET_PART}", weights[:100])
    with pytest.raises(ChecksumMismatchError):
        store.load("v0003")

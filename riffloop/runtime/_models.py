"""Model checkpoints in the object store (design.md §2): ``models/<version>/...`` in diffusers
layout, one pointer per version (``models/<version>.json``, written after every part), and
``models/CURRENT`` naming the served version, written last of all.

``publish`` saves a ``riffloop.music.MusicDiffusion`` through ``ObjectStore.publish_artifact``
(parts, verify, pointer); ``load`` follows a pointer and loads the folder with
``MusicDiffusion.from_pretrained``. torch and diffusers load lazily.

A checkpoint's content hash is the sha256 of its pointer, which names every part with its own
sha256 and size (a hash tree). The trainer computes it from the bytes it wrote and records it
in the version's registry record and in the ``CURRENT`` / ``CANARY`` marker that names the
version. ``load`` computes the hash of the bytes it reads — pointer, then every part — and
refuses (ChecksumMismatchError) a checkpoint that differs from the recorded hash: a publish
that failed halfway, a part truncated or rewritten, a pointer replaced. Neither the object's
S3 metadata (written by the same uploader as the bytes) nor an event's ObjectRef is trusted
for this. A version with no recorded hash anywhere (a registry from before the hash was kept)
is checked part by part against its pointer only, with a warning.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from riffloop.core import (
    ChecksumMismatchError,
    NotFoundError,
    ObjectRef,
    PermanentError,
    TransientError,
    ValidationError,
    sha256_hex,
)
from riffloop.runtime import metrics

_log = logging.getLogger("riffloop.models")

# diffusers' from_pretrained builds modules under accelerate's init_empty_weights, which patches
# torch.nn.Module globally: a model created or copied in another thread meanwhile lands on the
# meta device. Every construction in a process goes through this lock.
MODEL_CONSTRUCTION_LOCK = threading.RLock()

MODELS_BUCKET = "models"
CURRENT_KEY = "CURRENT"
# {"version", "parent", "share"} while a canary runs; removed when it is decided. Processes that
# start meanwhile (a restarted generator or trainer) resume the canary from it.
CANARY_KEY = "CANARY"
# riffloop.loop.ModelRegistry's record of a version (``checkpoint_sha256`` among its fields).
REGISTRY_RECORD_KEY = "registry/{version}.json"


class ModelStore:
    def __init__(self, objects: Any) -> None:
        self.objects = objects

    @staticmethod
    def pointer_key(version: str) -> str:
        return f"{version}.json"

    def publish(self, model: Any) -> Any:
        """Write every file of the checkpoint, then its pointer; return the pointer's ObjectRef,
        whose sha256 (the checkpoint's content hash) is computed from the bytes read back."""
        with tempfile.TemporaryDirectory(prefix="riffloop-model-") as tmp, MODEL_CONSTRUCTION_LOCK:
            folder = model.save_pretrained(Path(tmp) / "model")
            parts = {
                path.relative_to(folder).as_posix(): path.read_bytes()
                for path in sorted(folder.rglob("*"))
                if path.is_file()
            }
        pointer = self.objects.publish_artifact(
            MODELS_BUCKET, model.version, parts, self.pointer_key(model.version)
        )
        ref = self.checkpoint_ref(model.version)
        if sha256_hex(pointer.to_json()) != ref.sha256:  # replaced by another writer meanwhile
            raise ChecksumMismatchError(
                f"checkpoint {model.version} changed while it was published",
                bucket=MODELS_BUCKET,
                key=ref.key,
                expected=sha256_hex(pointer.to_json()),
                actual=ref.sha256,
            )
        return ref

    def exists(self, version: str) -> bool:
        return bool(self.objects.exists(MODELS_BUCKET, self.pointer_key(version)))

    def recorded_sha256(self, version: str) -> str:
        """The content hash the trainer recorded for ``version``: in the ``CURRENT`` or
        ``CANARY`` marker naming it, else in its registry record; "" when none records one."""
        for marker in (self.current(), self.canary()):
            if marker is not None and marker.get("version") == version:
                recorded = str(marker.get("checkpoint_sha256") or "")
                if recorded:
                    return recorded
        try:
            record = json.loads(
                self.objects.get(MODELS_BUCKET, REGISTRY_RECORD_KEY.format(version=version))
            )
        except NotFoundError:
            return ""
        except ValueError:
            raise ValidationError(f"the registry record of {version} is not JSON") from None
        return str(record.get("checkpoint_sha256") or "") if isinstance(record, dict) else ""

    def load(self, version: str) -> Any:
        """The checkpoint of ``version``, verified against its recorded content hash."""
        from riffloop.music import MusicDiffusion

        if not self.exists(version):
            raise NotFoundError(f"model {version} has no checkpoint in the object store")
        recorded = self.recorded_sha256(version)
        if not recorded:
            _log.warning(
                "no recorded content hash: parts checked against the pointer only",
                extra={"model_version": version},
            )
        parts = self.objects.read_artifact(
            MODELS_BUCKET, self.pointer_key(version), pointer_sha256=recorded
        )
        with tempfile.TemporaryDirectory(prefix="riffloop-model-") as tmp:
            root = Path(tmp) / version
            for name, data in parts.items():
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            with MODEL_CONSTRUCTION_LOCK:
                model = MusicDiffusion.from_pretrained(root)
        model.version = version
        return model

    def checkpoint_ref(self, version: str) -> ObjectRef:
        """The pointer's ref, its sha256 computed from the bytes read (NotFoundError if none)."""
        key = self.pointer_key(version)
        data = self.objects.get(MODELS_BUCKET, key)
        return ObjectRef(MODELS_BUCKET, key, sha256_hex(data), len(data))

    def current(self) -> dict[str, Any] | None:
        """``{"version", "parent", "history"}`` of the served model, or None before the first."""
        try:
            return dict(json.loads(self.objects.get(MODELS_BUCKET, CURRENT_KEY)))
        except NotFoundError:
            return None

    def set_current(self, version: str, parent: str = "", checkpoint_sha256: str = "") -> None:
        """Point ``models/CURRENT`` at ``version`` (written after its checkpoint is complete),
        with its content hash: ``checkpoint_sha256`` as recorded at publication, or without
        one, the hash of the pointer as it reads now."""
        if not self.exists(version):
            raise NotFoundError(f"model {version} has no checkpoint; CURRENT not moved")
        digest = checkpoint_sha256 or self.checkpoint_ref(version).sha256
        previous = self.current() or {"history": []}
        history = [*previous.get("history", []), version]
        body = {
            "version": version,
            "parent": parent,
            "history": history,
            "checkpoint_sha256": digest,
        }
        self.objects.put(
            MODELS_BUCKET, CURRENT_KEY, json.dumps(body).encode(), content_type="application/json"
        )

    def canary(self) -> dict[str, Any] | None:
        """The running canary (``{"version", "parent", "share", "checkpoint_sha256"}``), or
        None."""
        try:
            return dict(json.loads(self.objects.get(MODELS_BUCKET, CANARY_KEY)))
        except NotFoundError:
            return None

    def set_canary(
        self, version: str, parent: str, share: float, checkpoint_sha256: str = ""
    ) -> None:
        digest = checkpoint_sha256 or self.checkpoint_ref(version).sha256
        body = {"version": version, "parent": parent, "share": share, "checkpoint_sha256": digest}
        self.objects.put(
            MODELS_BUCKET, CANARY_KEY, json.dumps(body).encode(), content_type="application/json"
        )

    def clear_canary(self, version: str | None = None) -> None:
        """Forget the running canary (only if it is ``version``, when given)."""
        marker = self.canary()
        if marker is not None and (version is None or marker.get("version") == version):
            self.objects.delete(MODELS_BUCKET, CANARY_KEY)


class ServedModel:
    """The model a process serves, loaded from the store and hot-swapped: the new version is
    loaded aside (requests keep using the old one), then the reference is swapped under a lock;
    a request holds the reference it got for its whole run, so no request is dropped. A
    version's training index (``model.baseline_index``, the baseline z0's candidates, a part of
    its checkpoint) is loaded with it, so the index swaps with the model, canary included.

    During a canary a second model (the candidate) is held beside it and ``for_request`` routes
    a share of requests to it by a hash of the request id (``riffloop.loop.Canary.route``, so
    every replica and every replay routes a request the same way).

    model.published reaches one replica of a service (the replicas share a consumer group), so
    each replica also reconciles with ``models/CURRENT`` and ``models/CANARY`` on a timer
    (:func:`keep_current`): the event is the fast path, the markers are the truth.
    """

    def __init__(self, store: ModelStore, service: str, *, canaries: bool = True) -> None:
        self.store = store
        self.service = service
        self.canaries = canaries  # False: serve the current model only (the encoder)
        self.lock = threading.Lock()  # guards the references requests read
        # Serialises changes (event handler and reconciler): a slow load of an older version
        # must not land after a newer one. Requests never take it.
        self.changes = threading.RLock()
        self.model: Any = None
        self.loaded_at = 0.0
        self.canary: tuple[Any, Any] | None = None  # (riffloop.loop.Canary router, candidate)
        # Set when the first ``load_current`` finished: the current model *and* a running
        # canary's candidate are held, so a new replica takes traffic only with both.
        self._settled = threading.Event()

    def for_request(self, request_id: str) -> Any:
        """The model this request runs on: the candidate for its canary share, else current."""
        with self.lock:
            if self.model is None:
                raise PermanentError("no model loaded yet; the trainer has not published one")
            if self.canary is not None:
                router, candidate = self.canary
                if router.route(request_id) == router.candidate:
                    return candidate
            return self.model

    @property
    def canary_version(self) -> str | None:
        with self.lock:
            return None if self.canary is None else str(self.canary[1].version)

    def start_canary(self, version: str, share: float) -> None:
        """Load ``version`` aside and route ``share`` of requests to it."""
        from riffloop.loop import Canary

        with self.changes:
            current = self.get()
            if version == current.version or version == self.canary_version:
                return  # redelivered event: already serving it
            router = Canary(current.version, version, share=share)  # validates 0 < share < 1
            candidate = self._load(version)
            candidate.unet.eval()
            with self.lock:
                self.canary = (router, candidate)
        _log.info("canary started", extra={"model_version": version, "share": share})

    def serve_only(self, version: str) -> None:
        """End any canary and serve ``version`` alone (PROMOTE or ROLLBACK); a promoted
        candidate is installed as loaded, without reading it again."""
        with self.changes:
            with self.lock:
                canary, self.canary = self.canary, None
                promoted = canary[1] if canary and canary[1].version == version else None
                if promoted is not None:
                    self.model, self.loaded_at = promoted, time.time()
                held = self.model.version if self.model is not None else None
            if promoted is not None:
                metrics.set_current_model(self.service, version)
                _log.info("canary promoted", extra={"model_version": version})
            elif held != version:
                self.swap_to(version)

    def get(self) -> Any:
        with self.lock:
            if self.model is None:
                raise PermanentError("no model loaded yet; the trainer has not published one")
            return self.model

    @property
    def ready(self) -> bool:
        return self.model is not None and self._settled.is_set()

    def load_current(self) -> bool:
        """Reconcile with the markers: serve the version ``models/CURRENT`` names (a promoted
        canary's candidate is installed as held, not read again), hold the canary
        ``models/CANARY`` names against it, drop one it no longer names. True once a model is
        held. Cheap when nothing changed: two small reads."""
        with self.changes:
            current = self.store.current()
            if current is None:
                return False
            if self.model is None or self.model.version != current["version"]:
                self.serve_only(str(current["version"]))  # a canary against the old one ends
            try:
                self.resume_canary()
                self.drop_ended_canary()
            except Exception:
                # An unreadable candidate must not keep this replica out of service: it serves
                # the current model (the canary's ratings come from the replicas that have it).
                _log.exception("resuming the running canary failed; serving the current model")
            self._settled.set()
            return True

    def resume_canary(self) -> None:
        """Serve the running canary's share too, if one runs against the model held (a process
        that starts mid-canary learns of it from ``models/CANARY``, not from the event it missed;
        the decision event, consumed afterwards, ends it as usual)."""
        if not self.canaries:
            return
        marker = self.store.canary()
        if marker is None or self.canary_version == marker.get("version"):
            return
        held = self.get().version
        if marker.get("parent") != held:
            return  # a canary against another version: not this process's business
        try:
            self.start_canary(str(marker["version"]), float(marker["share"]))
        except NotFoundError:
            _log.warning("canary marker names a missing checkpoint", extra=marker)
        self.drop_ended_canary()

    def drop_ended_canary(self) -> None:
        """After a canary is installed: end it if ``models/CANARY`` no longer names it. Loading
        the candidate takes a while; a decision (ROLLBACK or PROMOTE) handled meanwhile found no
        canary to end, and the trainer removes the marker before it announces a decision. A
        candidate that ``models/CURRENT`` names was promoted: it is installed, not dropped."""
        version = self.canary_version
        if version is None:
            return
        marker = self.store.canary()
        if marker is None or marker.get("version") != version:
            current = self.store.current()
            if current is not None and current.get("version") == version:
                self.serve_only(version)  # it was promoted: the loaded candidate serves
                return
            with self.lock:
                if self.canary is not None and self.canary[1].version == version:
                    self.canary = None
            _log.info("ended canary dropped", extra={"model_version": version})

    def _load(self, version: str) -> Any:
        """``store.load``; a refused checkpoint is logged and counted, and the error raised:
        the caller keeps what it held, and the retry (the event's, or the next reconcile)
        tries again, in case the trainer publishes the version again."""
        try:
            return self.store.load(version)
        except (ChecksumMismatchError, ValidationError) as exc:
            reason = "checksum" if isinstance(exc, ChecksumMismatchError) else "malformed"
            metrics.MODEL_LOAD_REFUSALS.labels(self.service, reason).inc()
            held = self.model.version if self.model is not None else None
            _log.error(
                "checkpoint refused",
                extra={
                    "model_version": version,
                    "reason": exc.reason,
                    "serving": held,
                },
            )
            raise

    def swap_to(self, version: str) -> bool:
        with self.changes:
            model = self._load(version)  # outside self.lock: requests keep the old model
            model.unet.eval()
            with self.lock:
                self.model = model
                self.loaded_at = time.time()
        metrics.set_current_model(self.service, version)
        _log.info("model loaded", extra={"model_version": version})
        return True


def keep_current(
    model: ServedModel, poll_s: float, retry_s: float = 2.0
) -> Callable[[threading.Event], None]:
    """A ``LoopWorker`` body: load the first model (retrying every ``retry_s`` until the trainer
    has published one), then reconcile with the markers every ``poll_s``. A replica whose
    consumer never saw a model.published event (another replica of the group took it) thus
    serves the promoted, rolled-back or canary version within ``poll_s`` plus a load."""

    def body(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                held = model.load_current()
            except TransientError as exc:  # the store is down: said once a poll, no traceback
                _log.warning(
                    "loading the current model failed; retrying", extra={"why": exc.reason}
                )
                held = False
            except Exception:
                _log.exception("loading the current model failed; retrying")
                held = False
            stop.wait(poll_s if held else min(poll_s, retry_s))

    return body

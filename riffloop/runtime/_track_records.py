"""The gateway's track records and listening-queue state in the key-value store, and how each
is derived from the log (the gateway's consumer and its rebuild apply the same rules).

Keys (the gateway's ``gw:`` prefix):

- ``gw:track:<track>``: JSON record — owner, status (pending, ready, failed), requested_at,
  request_id, the request's fingerprint; once ready the audio ref, duration, kind, provenance,
  ready_at; a consistency probe has ``probe_of`` and no owner.
- ``gw:queue`` (track → kind, owner, ready_at) and ``gw:queue:served`` (track → times served):
  the open listening queue; ``gw:served:<track>:<user>`` (when the queue served it to them);
  ``gw:heard:<user>`` (track → when they heard it); ``gw:rated:<track>:<user>`` (rated once).
- ``gw:models`` (version → parent, published_at) and ``gw:models:current``.

Facts and the topics they are on:

1. A request (owner, time, request id) — generation.requested.v1; the record is created
   pending only where none exists, so a replay never turns a ready track back to pending.
2. A failure — generation.requested.v1.dlq (``on_generation_dead_lettered``).
3. A ready track — tracks.ready.v1 (``on_track_ready``); in a rebuild, a TrackReady this
   gateway published itself is a consistency probe (its ``user_id`` is the one listener it was
   served to; live, the probe's record is written before its event).
4. Who was served and who rated — feedback.received.v1: every item carries ``served_at`` (the
   gateway's word) and a rating claims its once-key. Serves that no feedback followed are not
   on the log: after a rebuild the queue may serve such a track to a few more listeners.
5. Models — model.published.v1 (``on_model_published``).

Times: the live consumer stamps ``ready_at`` with the gateway's clock; a rebuild (``event_time``)
uses each record's ``occurred_at``, so replaying twice gives the same records.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from riffloop.core import KeyValueStore, ValidationError, decode_envelope
from riffloop.runtime._convert import checked_track_ready

_log = logging.getLogger("riffloop.gateway")

REBUILT_MARKER = "gw:rebuilt"
QUEUE_KEY = "gw:queue"
QUEUE_SERVED_KEY = "gw:queue:served"
MODELS_KEY = "gw:models"
CURRENT_MODEL_KEY = "gw:models:current"

# Error types whose text (RiffloopError.reason) is safe to show a client.
_CLIENT_SAFE_ERRORS = frozenset(
    {
        "ValidationError",
        "NotFoundError",
        "ConflictError",
        "PermanentError",
        "InvalidAudio",
        "ChecksumMismatchError",
    }
)


def track_key(track_id: str) -> str:
    return f"gw:track:{track_id}"


def rated_key(track_id: str, user: str) -> str:
    """Set once when ``user`` rates ``track_id``: a second rating is refused."""
    return f"gw:rated:{track_id}:{user}"


def served_key(track_id: str, user: str) -> str:
    """When the queue served ``track_id`` to ``user`` (their right to fetch, rate, report)."""
    return f"gw:served:{track_id}:{user}"


def heard_key(user: str) -> str:
    return f"gw:heard:{user}"


def request_fingerprint(payload: Any) -> str:
    """SHA-256 of a GenerationRequested without its request id: a reused client key with other
    fields is told apart from a retry."""
    clean = type(payload)()
    clean.CopyFrom(payload)
    clean.request_id = ""
    return hashlib.sha256(clean.SerializeToString(deterministic=True)).hexdigest()


def ref_to_dict(ref: Any) -> dict[str, Any]:
    return {"bucket": ref.bucket, "key": ref.key, "sha256": ref.sha256, "size": ref.size_bytes}


def _event_seconds(envelope: Any) -> float:
    return float(envelope.occurred_at.ToNanoseconds() / 1e9)


class TrackRecords:
    """The rules above on a key-value store. ``dispatcher`` maps a request id to its track id
    (riffloop.loop.Dispatcher); ``producer`` is the gateway's own name (its TrackReady events
    are probes); ``event_time`` stamps times from the events (a rebuild) instead of ``clock``."""

    def __init__(
        self,
        kv: KeyValueStore,
        dispatcher: Any,
        *,
        producer: str = "gateway",
        clock: Callable[[], float] = time.time,
        event_time: bool = False,
    ) -> None:
        self.kv = kv
        self.dispatcher = dispatcher
        self.producer = producer
        self.clock = clock
        self.event_time = event_time
        # what a rebuild learns as it goes: track → users served (the queue's counts), owners
        self._served: dict[str, set[str]] = {}
        self._owners: dict[str, str] = {}

    def _now(self, envelope: Any) -> float:
        return _event_seconds(envelope) if self.event_time else self.clock()

    # 1. requests --------------------------------------------------------------------------
    def on_generation_requested(self, envelope: Any) -> None:
        """A pending record for a request whose track has none (a rebuild; the servicer
        writes it itself before publishing)."""
        request = envelope.generation_requested
        if not request.request_id or not request.user_id:
            raise ValidationError("a GenerationRequested needs request_id and user_id")
        track_id = self.dispatcher.track_id_for(request.request_id)
        at = _event_seconds(envelope)
        record = {
            "owner": request.user_id,
            "status": "pending",
            "requested_at": at,
            "request_id": request.request_id,
            "fingerprint": request_fingerprint(request),
        }
        self.kv.set_if_absent(track_key(track_id), json.dumps(record))
        if self.kv.hget(heard_key(request.user_id), track_id) is None:
            self.kv.hset(heard_key(request.user_id), {track_id: repr(at)})

    # 2. failures --------------------------------------------------------------------------
    def on_generation_dead_lettered(self, envelope: Any) -> None:
        """generation.requested.v1.dlq: the generator gave up on a request (its songs were
        never encoded, an input it refuses, a bug). The client's track turns ``failed`` with
        the reason, instead of ``pending`` for ever. A replay of the DLQ that then succeeds
        makes it ``ready`` (on_track_ready overwrites the status)."""
        dead = envelope.dead_letter
        if dead.original_topic != "generation.requested.v1":
            return
        try:
            original = decode_envelope(bytes(dead.original_value), dead.original_topic)
        except ValidationError:
            return  # poison that never was a request: no client waits for it
        request_id = original.generation_requested.request_id
        key = track_key(self.dispatcher.track_id_for(request_id))
        raw = self.kv.get(key)
        if raw is None:
            return  # requested elsewhere (the generator's own Generate RPC)
        record = json.loads(raw)
        if record["status"] == "ready":
            return  # a replay made it meanwhile
        # A RiffloopError's reason is written for clients; anything else may carry internals.
        known = dead.error_type in _CLIENT_SAFE_ERRORS
        record.update(
            status="failed",
            failure_reason=dead.error if known else "the generator failed on this request",
        )
        self.kv.set(key, json.dumps(record))
        _log.warning(
            "generation failed",
            extra={"track_id": key.removeprefix("gw:track:"), "request_id": request_id},
        )

    # 3. ready tracks ----------------------------------------------------------------------
    def on_track_ready(self, envelope: Any) -> None:
        """A track turns ready for its owner and enters the listening queue. The kind and the
        provenance are kept in the record for the queue's rules; no response ever carries
        them. Idempotent: a redelivered TrackReady of a ready track changes nothing, so a
        track that has left the queue does not come back."""
        ready = envelope.track_ready
        prov = checked_track_ready(ready)  # what the feedback service refuses is never "ready"
        key = track_key(ready.track_id)
        raw = self.kv.get(key)
        now = self._now(envelope)
        if raw:
            record: dict[str, Any] = json.loads(raw)
        elif self.event_time and envelope.producer == self.producer:
            # a rebuild: the gateway publishes no TrackReady but its probes, whose record
            # (written before the event, live) went with the store
            record = {"owner": "", "requested_at": now, "probe_of": ""}
            if ready.user_id:
                self._mark_served(ready.track_id, ready.user_id, now)
        else:
            record = {
                "owner": ready.user_id,
                "requested_at": now,
                "request_id": ready.provenance.request_id,
            }
        if record.get("status") == "ready":
            return
        if "probe_of" not in record:  # a consistency probe is served once, to one listener
            queued = {"kind": prov.kind.value, "owner": record["owner"], "ready_at": now}
            self.kv.hset(QUEUE_KEY, {ready.track_id: json.dumps(queued)})
        record.update(
            status="ready",
            audio=ref_to_dict(ready.audio),
            duration=ready.duration_seconds,
            ready_at=now,
            kind=prov.kind.value,
            provenance=base64.b64encode(ready.provenance.SerializeToString()).decode(),
        )
        record.pop("failure_reason", None)
        self.kv.set(key, json.dumps(record))
        if self.event_time:
            self._owners[ready.track_id] = str(record.get("owner", ""))

    # 4. serves and ratings ----------------------------------------------------------------
    def on_feedback(self, envelope: Any) -> None:
        """feedback.received.v1 (one item or a FeedbackBatch): each item's ``served_at`` marks
        the track served to its user (unless they own it) and a rating claims its once-key."""
        items = (
            envelope.feedback_batch.items
            if envelope.WhichOneof("payload") == "feedback_batch"
            else [envelope.feedback_received]
        )
        for item in items:
            if not item.track_id or not item.user_id:
                continue
            if item.HasField("served_at"):
                owner = self._owners.get(item.track_id)
                if owner is None:  # not made ready in this rebuild: the record says
                    raw = self.kv.get(track_key(item.track_id))
                    owner = json.loads(raw).get("owner") if raw else None
                if owner != item.user_id:
                    self._mark_served(item.track_id, item.user_id, _event_seconds_of(item))
            if item.WhichOneof("feedback") == "rating":
                self.kv.set_if_absent(rated_key(item.track_id, item.user_id), "1")

    def _mark_served(self, track_id: str, user: str, at: float) -> None:
        self.kv.set_if_absent(served_key(track_id, user), repr(at))
        if self.kv.hget(heard_key(user), track_id) is None:
            self.kv.hset(heard_key(user), {track_id: repr(at)})
        self._served.setdefault(track_id, set()).add(user)

    def count_queue_serves(self) -> None:
        """After a rebuild: each queued track's serve count is the listeners the log shows it
        was served to (a count, not an increment: replaying twice gives the same)."""
        queued = set(self.kv.hgetall(QUEUE_KEY))
        counts = {t: repr(float(len(users))) for t, users in self._served.items() if t in queued}
        if counts:
            self.kv.hset(QUEUE_SERVED_KEY, counts)

    # 5. models ----------------------------------------------------------------------------
    def on_model_published(self, envelope: Any) -> None:
        from riffloop.v1 import common_pb2

        event = envelope.model_published
        if event.action == common_pb2.MODEL_ACTION_UNSPECIFIED:
            raise ValidationError(f"model.published for {event.version} names no action")
        known = self.kv.hget(MODELS_KEY, event.version)
        if known is None:
            info = {"parent": event.parent_version, "published_at": _event_seconds(envelope)}
            self.kv.hset(MODELS_KEY, {event.version: json.dumps(info)})
        if event.action != common_pb2.MODEL_ACTION_CANARY:  # a canary serves only a share
            self.kv.set(CURRENT_MODEL_KEY, event.version)


def _event_seconds_of(item: Any) -> float:
    return float(item.served_at.ToNanoseconds() / 1e9)

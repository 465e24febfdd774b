"""The gateway: Riffloop's public API, a thin shell over the ports and the loop's rules.

It validates every client input, stores uploads content-addressed, and turns calls into events:
UploadSong → songs.uploaded.v1, Generate → generation.requested.v1, Rate / ReportListen →
feedback.received.v1 (FeedbackReceived), SubmitFeedback → feedback.received.v1 (one FeedbackBatch
per call). It consumes tracks.ready.v1 (a pending track becomes ready) and model.published.v1.
ListModels reads the per-version mean ratings from the feedback service's read model
(``fb:model-ratings``, written by its scoring pass) rather than replaying every TrackScored: at
5,000 ratings/s that consumer was an eighth of the gateway's CPU. Auth and the per-user rate
limit are interceptors (riffloop.runtime), not handler code; so are the per-user caps on uploads
and Generate calls in progress. Uploads are spooled to disk (services/gateway/_uploads.py). The
checks of each request field are in _requests.py, the settings in _settings.py.

NextTrack serves the listening queue (riffloop.loop.choose_next_track): every ready track,
baseline or generation, for anyone's inputs, until enough listeners have heard it. A user may
fetch, rate and report on a track once it was served to them: their own request, or the queue.

Key-value layout (prefix ``gw:``):
  gw:track:<track_id>          JSON track record (owner, status, audio ref, duration; once ready
                               also its kind and provenance, which no client ever sees)
  gw:served:<track_id>:<user>  when the queue served the track to a listener (not its owner)
  gw:heard:<user>              hash track → served at: every track served to the user
  gw:queue                     hash track → JSON QueuedTrack fields: the tracks still waiting
  gw:queue:served              hash track → listeners the queue served it to
  gw:rated:<track_id>:<user>   set once: a second rating of the same track is ALREADY_EXISTS
  gw:models                    hash version → JSON (parent, published_at)
  gw:models:current            the version generators serve
  gw:pending                   hash track → "<requested at> <user> <units>": Generate requests
                               waiting for their track, weighted by their work
                               (riffloop.loop.GenerationBacklog; admission control)
  gw:pending:<user>            hash track → "<requested at> <units>": the user's
Read, owned by the feedback service:
  fb:model-ratings             hash version → JSON stars (mean, 95 % interval, counts) and the
                               normalised score, generated and baseline apart
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from riffloop.core import (
    ConflictError,
    NotFoundError,
    PermanentError,
    PermissionDeniedError,
    RateLimitedError,
    RiffloopError,
    ValidationError,
    decode_envelope,
)
from riffloop.loop import (
    GenerationBacklog,
    QueuedTrack,
    TrackKind,
    choose_next_track,
)
from riffloop.runtime import (
    LATENTS_BUCKET,
    MODEL_RATINGS_KEY,
    LatentRecord,
    TrackRecords,
    current_user,
    metrics,
    remaining_seconds,
)
from riffloop.v1 import (
    common_pb2,
    events_pb2,
)
from riffloop.v1 import (
    gateway_service_pb2 as pb,
)
from riffloop.v1 import (
    gateway_service_pb2_grpc as pb_grpc,
)
from services.gateway._requests import (
    CLIENT_REQUEST_ID,
    SONG_ID,
    SONGS_BUCKET,
    check_ready,
    check_seconds,
    check_stars,
    check_track_id,
    check_upload_metadata,
    checked_client_time,
    feedback_batch_size,
    generate_work,
    listen_event,
    rated_key,
    served_key,
    stamp_times,
    timestamp_at,
    track_message,
)
from services.gateway._settings import GatewaySettings
from services.gateway._uploads import SpooledUpload, UploadSpool

_log = logging.getLogger("riffloop.gateway")


class GatewayServicer(pb_grpc.GatewayServiceServicer):
    """Handlers: validate, call a port or the loop, publish an event. Nothing else."""

    def __init__(
        self,
        settings: GatewaySettings,
        ports: Any,
        audio: Any,
        dispatcher: Any,
        mel_image: Any = None,
        *,
        clock: Callable[[], float] = time.time,
        draw: random.Random | None = None,
    ) -> None:
        self.settings = settings
        # The server's clock (serving, receipt and the client-time checks read it) and the
        # queue's draws. Production: wall time and the OS's entropy, which no client can
        # predict. A simulation that replays a day of listening in minutes passes its own.
        self.clock = clock
        # renders a track's WAV as a mel PNG → (png, width, height) (riffloop.music.mel_png)
        self.mel_image = mel_image
        self.ports = ports  # riffloop.runtime.Ports: bus, objects, kv
        self.audio = audio  # decodes and checks an upload (riffloop.music.decode_audio)
        self.dispatcher = dispatcher  # riffloop.loop.Dispatcher: opaque track ids
        self.upload_slots = threading.BoundedSemaphore(settings.max_concurrent_uploads)
        self.spool = UploadSpool(settings.upload_spool_dir, settings.max_upload_bytes)
        # pending generation requests, per user and in all (admission control)
        self.backlog = GenerationBacklog(ports.kv, settings.admission_policy(), clock=clock)
        self.queue = settings.queue_policy()
        self._draw = draw or random.SystemRandom()

    # -- uploads ------------------------------------------------------------------------------

    def _decode_in_a_slot(self, upload: SpooledUpload, wait_s: float) -> float:
        """Decoding is what costs memory (≈ 0.3 GB for a 10-minute stereo upload), so at most
        ``max_concurrent_uploads`` run at once; the stream itself is spooled without a slot,
        so slow or stalled clients cannot hold the slots for everyone. A spooled upload waits
        for a slot up to ``wait_s`` (its spool is on disk, not in memory)."""
        if not self.upload_slots.acquire(timeout=max(0.0, wait_s)):
            raise RateLimitedError(
                "too many uploads in progress on this gateway (limit "
                f"{self.settings.max_concurrent_uploads}); retry in a few seconds",
                retry_after_s=2.0,
            )
        try:
            # raises ValidationError (InvalidAudio) with a reason
            return float(self.audio(upload.file))
        finally:
            self.upload_slots.release()

    def UploadSong(self, request_iterator: Iterator[pb.UploadSongRequest], context: Any) -> Any:
        """Spooled to disk as it arrives (services/gateway/_uploads.py), within the upload
        deadline; then decoded, stored and announced like UploadWholeSong."""
        deadline = time.monotonic() + remaining_seconds(context, self.settings.upload_deadline_s)
        with self.spool.receive(
            request_iterator, deadline - time.monotonic(), check_upload_metadata
        ) as upload:
            return self._store_upload(upload, deadline)

    def UploadWholeSong(
        self, request: pb.UploadWholeSongRequest, context: Any
    ) -> pb.UploadWholeSongResponse:
        """UploadSong in one message (browsers cannot stream a request): the same checks."""
        deadline = time.monotonic() + remaining_seconds(context, self.settings.upload_deadline_s)
        check_upload_metadata(request.metadata)
        with self.spool.hold(request.metadata, request.audio) as upload:
            stored = self._store_upload(upload, deadline)
        return pb.UploadWholeSongResponse(
            song_id=stored.song_id,
            audio=stored.audio,
            duration_seconds=stored.duration_seconds,
            already_existed=stored.already_existed,
        )

    def _store_upload(self, upload: SpooledUpload, deadline: float) -> Any:
        """Decode and store one spooled upload; announce it on songs.uploaded.v1.
        ``deadline``: time.monotonic() by which the call must be answered."""
        user = current_user()
        metadata = upload.metadata
        content_type = metadata.content_type.strip().lower()
        if not upload.size:
            raise ValidationError("the upload carries no audio bytes")
        wait_s = min(self.settings.upload_decode_wait_s, deadline - time.monotonic())
        duration = self._decode_in_a_slot(upload, wait_s)
        objects = self.ports.objects
        existed = False
        try:
            ref = objects.stat(SONGS_BUCKET, upload.sha256)
            existed = True
        except NotFoundError:
            # content-addressed (the key is the sha256), streamed from the spool
            ref = objects.put_file(
                SONGS_BUCKET,
                upload.sha256,
                upload.file,
                sha256=upload.sha256,
                content_type=content_type or "application/octet-stream",
            )
        song_id = ref.sha256
        proto_ref = ref.to_proto()
        # Stored but not encoded yet: announce it again. The first upload's SongUploaded may be
        # lost (the publish failed after the bytes were stored, the client got UNAVAILABLE and
        # retried), and the song would then never be encoded; a repeat while the encoder is at
        # work only makes it write the same content-addressed latents twice.
        if not existed or not self._encoded(song_id):
            payload = events_pb2.SongUploaded(
                song_id=song_id,
                audio=proto_ref,
                user_id=user,
                title=metadata.title,
                content_type=content_type,
                duration_seconds=duration,
            )
            self.ports.publish("songs.uploaded.v1", song_id, payload)
        return pb.UploadSongResponse(
            song_id=song_id, audio=proto_ref, duration_seconds=duration, already_existed=existed
        )

    def _encoded(self, song_id: str) -> bool:
        return bool(self.ports.objects.exists(LATENTS_BUCKET, LatentRecord.key(song_id)))

    # -- generation ---------------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        ids = list(request.song_ids)
        if not 1 <= len(ids) <= 3:
            raise ValidationError(f"song_ids must name 1 to 3 songs, got {len(ids)}")
        for song_id in ids:
            if not SONG_ID.match(song_id):
                raise ValidationError(f"song id {song_id[:80]!r} is not a 64-hex sha256")
        if len(set(ids)) != len(ids):
            raise ValidationError("song_ids must not repeat a song")
        s = request.similarity
        if not math.isfinite(s) or not 0.0 <= s < 1.0:
            raise ValidationError(f"similarity must lie in [0, 1), got {s!r}")
        q = request.quality or self.settings.default_quality
        if not 1 <= q <= self.settings.max_quality:
            raise ValidationError(f"quality must lie in 1–{self.settings.max_quality}, got {q}")
        if request.seed < 0:
            raise ValidationError("seed must not be negative")
        d = request.duration_seconds
        lo, hi = self.settings.min_track_seconds, self.settings.max_track_seconds
        if not math.isfinite(d) or not (d == 0 or lo <= d <= hi):
            raise ValidationError(
                f"duration_seconds must lie in [{lo:g}, {hi:g}] (one window to the maximum), "
                f"or be 0 for the default; got {d!r}"
            )
        for song_id in ids:
            if not self.ports.objects.exists(SONGS_BUCKET, song_id):
                raise NotFoundError(f"song {song_id} was never uploaded")
        user = current_user()
        payload = events_pb2.GenerationRequested(
            user_id=user,
            song_ids=ids,
            similarity=s,
            quality=q,
            seed=request.seed,
            duration_seconds=d,
        )
        # Idempotency: a client key names one request of its user. The request id is keyed by
        # the dispatch secret, so the same key always meets the same draw and track id, and a
        # retry after a lost response finds its request instead of making a second one.
        idempotency = request.client_request_id
        if idempotency and not CLIENT_REQUEST_ID.match(idempotency):
            raise ValidationError(
                "client_request_id must be 1–128 characters of A–Z, a–z, 0–9, '.', '_', ':', '-'"
            )
        # the request's fields, kept so a reused key can be told from a retry (keyed requests)
        fingerprint = (
            hashlib.sha256(payload.SerializeToString(deterministic=True)).hexdigest()
            if idempotency
            else ""
        )
        request_id = (
            self.dispatcher.request_id_for(user, idempotency) if idempotency else uuid.uuid4().hex
        )
        payload.request_id = request_id
        track_id = self.dispatcher.track_id_for(request_id)
        key = f"gw:track:{track_id}"
        if idempotency and (raw := self.ports.kv.get(key)) is not None:
            earlier: dict[str, Any] = json.loads(raw)
            if earlier.get("fingerprint") != fingerprint:
                raise ValidationError(
                    f"client_request_id {idempotency!r} already named a different request"
                )
            if earlier.get("status") == "pending":  # its event may not have gone out
                self.ports.publish("generation.requested.v1", request_id, payload)
            return pb.GenerateResponse(request_id=request_id, track_id=track_id)
        # a new request: refused while the user has too many waiting, or the generators are
        # behind (RESOURCE_EXHAUSTED with a retry hint); a retry above is never refused
        work = generate_work(request, self.settings)  # in default requests' worth
        self.backlog.admit(user, work)
        now = self.clock()
        record = {
            "owner": user,
            "status": "pending",
            "requested_at": now,
            "request_id": request_id,
        }
        if fingerprint:
            record["fingerprint"] = fingerprint
        self.ports.kv.set(key, json.dumps(record))
        # heard by its requester: the queue never serves them their own track again
        self.ports.kv.hset(f"gw:heard:{user}", {track_id: repr(now)})
        self.backlog.add(user, track_id, work)
        try:
            self.ports.publish("generation.requested.v1", request_id, payload)
        except BaseException:
            self.backlog.done(track_id)  # not sent: it holds no place in the queue
            raise
        return pb.GenerateResponse(request_id=request_id, track_id=track_id)

    def _track(self, track_id: str) -> tuple[dict[str, Any], float | None]:
        """The record of a track served to the caller, and when the queue served it to them
        (None for the track's owner); PERMISSION_DENIED for a track never served to them."""
        raw = self.ports.kv.get(f"gw:track:{check_track_id(track_id)}")
        if raw is None:
            raise NotFoundError(f"track {track_id} does not exist")
        record: dict[str, Any] = json.loads(raw)
        user = current_user()
        if record.get("owner") == user:
            return record, None
        served = self.ports.kv.get(served_key(track_id, user))
        if served is None:
            raise PermissionDeniedError(f"track {track_id} was not served to you")
        return record, float(served)

    def GetTrack(self, request: pb.GetTrackRequest, context: Any) -> pb.GetTrackResponse:
        record, _ = self._track(request.track_id)
        return pb.GetTrackResponse(track=track_message(request.track_id, record))

    def StreamAudio(self, request: pb.StreamAudioRequest, context: Any) -> Iterator[Any]:
        chunk = request.chunk_size or self.settings.stream_chunk_bytes
        if not 1024 <= chunk <= 1024 * 1024:
            raise ValidationError("chunk_size must lie in 1024–1048576 bytes (or 0)")
        record, _ = self._track(request.track_id)
        if record["status"] != "ready":
            raise PermanentError(f"track {request.track_id} is not ready yet")
        audio = record["audio"]
        data = self.ports.objects.get(audio["bucket"], audio["key"])
        total = len(data)
        for offset in range(0, total, chunk):
            if not context.is_active():
                return
            yield pb.StreamAudioResponse(
                offset=offset, chunk=data[offset : offset + chunk], total_size_bytes=total
            )

    def GetTrackMelImage(
        self, request: pb.GetTrackMelImageRequest, context: Any
    ) -> pb.GetTrackMelImageResponse:
        record, _ = self._track(request.track_id)
        if record["status"] != "ready":
            raise PermanentError(f"track {request.track_id} is not ready yet")
        if self.mel_image is None:
            raise PermanentError("this gateway renders no mel images")
        audio = record["audio"]
        png, width, height = self.mel_image(self.ports.objects.get(audio["bucket"], audio["key"]))
        return pb.GetTrackMelImageResponse(png=png, width=width, height=height)

    # -- the listening queue ------------------------------------------------------------------

    def NextTrack(self, request: pb.NextTrackRequest, context: Any) -> pb.NextTrackResponse:
        """The caller's next track: a consistency probe now and then, else the queue's pick
        (riffloop.loop.choose_next_track). Serving it records who heard it, so the caller may
        then fetch, rate and report on it."""
        user = current_user()
        kv = self.ports.kv
        now = self.clock()
        heard = kv.hgetall(f"gw:heard:{user}")
        track_id: str | None = None
        if self._draw.random() < self.queue.probe_share:
            track_id = self._consistency_probe(user, heard, now)
        if track_id is None:
            track_id = self._from_queue(user, heard, now)
        if track_id is None:
            return pb.NextTrackResponse(retry_after_ms=5000)
        record = json.loads(kv.get(f"gw:track:{track_id}") or "{}")
        metrics.QUEUE_SERVED.inc()
        return pb.NextTrackResponse(track=track_message(track_id, record))

    def _from_queue(self, user: str, heard: dict[str, str], now: float) -> str | None:
        kv = self.ports.kv
        served = kv.hgetall("gw:queue:served")
        waiting: list[QueuedTrack] = []
        closed: list[QueuedTrack] = []
        for track_id, raw in kv.hgetall("gw:queue").items():
            fields = json.loads(raw)
            track = QueuedTrack(
                track_id=track_id,
                kind=TrackKind(fields["kind"]),
                owner=fields["owner"],
                ready_at=float(fields["ready_at"]),
                served=int(float(served.get(track_id, 0))),
            )
            (waiting if self.queue.is_open(track, now) else closed).append(track)
        if closed:  # enough listeners, or stale: out of the queue
            kv.hdel("gw:queue", [t.track_id for t in closed])
            kv.hdel("gw:queue:served", [t.track_id for t in closed])
        pick = choose_next_track(self.queue, waiting, user, heard, self._draw.random(), now)
        if pick is None:
            return None
        self._mark_served(pick.track_id, user, now)
        if kv.hincrbyfloat("gw:queue:served", pick.track_id, 1.0) >= self.queue.target_listeners:
            kv.hdel("gw:queue", [pick.track_id])
            kv.hdel("gw:queue:served", [pick.track_id])
        return pick.track_id

    def _mark_served(self, track_id: str, user: str, now: float) -> None:
        self.ports.kv.set(served_key(track_id, user), repr(now))
        self.ports.kv.hset(f"gw:heard:{user}", {track_id: repr(now)})

    def _consistency_probe(self, user: str, heard: dict[str, str], now: float) -> str | None:
        """Re-serve a baseline the caller rated, under a new opaque id (rule 4 of
        riffloop.loop._queue). The new id is announced on tracks.ready.v1 with the original's
        provenance (same z0, same ``baseline_sample_id``), so the feedback service registers it
        and the spam filter compares the caller's two ratings of the same sample."""
        kv = self.ports.kv
        ids = list(heard)
        if not ids:
            return None
        records = kv.get_many([f"gw:track:{t}" for t in ids])
        rated = kv.get_many([rated_key(t, user) for t in ids])
        candidates = [
            (track_id, json.loads(raw))
            for track_id, raw, was_rated in zip(ids, records, rated, strict=True)
            if raw and was_rated
        ]
        candidates = [
            (t, r)
            for t, r in candidates
            if r.get("kind") == TrackKind.BASELINE.value and r.get("provenance")
        ]
        if not candidates:
            return None
        original_id, original = self._draw.choice(candidates)
        probe_id = self.dispatcher.opaque_id("probe", original_id, user, uuid.uuid4().hex)
        provenance = common_pb2.TrackProvenance.FromString(base64.b64decode(original["provenance"]))
        provenance.request_id = uuid.uuid4().hex
        record = {
            "owner": "",
            "status": "ready",
            "requested_at": now,
            "ready_at": now,
            "audio": original["audio"],
            "duration": original["duration"],
            "kind": original["kind"],
            "probe_of": original_id,
        }
        kv.set(f"gw:track:{probe_id}", json.dumps(record))
        self._mark_served(probe_id, user, now)
        audio = original["audio"]
        ready = events_pb2.TrackReady(
            track_id=probe_id,
            audio=common_pb2.ObjectRef(
                bucket=audio["bucket"],
                key=audio["key"],
                sha256=audio["sha256"],
                size_bytes=int(audio["size"]),
            ),
            provenance=provenance,
            user_id=user,
            duration_seconds=float(original["duration"]),
        )
        self.ports.publish("tracks.ready.v1", probe_id, ready)
        metrics.QUEUE_PROBES.inc()
        return probe_id

    # -- feedback -----------------------------------------------------------------------------

    def _feedback_times(
        self, record: dict[str, Any], queue_served: float | None, given: Timestamp
    ) -> tuple[float, float]:
        """(the item's client time, when the track was served to the caller), checked."""
        served_at = (
            queue_served  # through the queue; the owner heard it from the moment it was ready
            if queue_served is not None
            else float(record.get("ready_at", record.get("requested_at", 0.0)))
        )
        now = self.clock()
        client = checked_client_time(given, served_at, now, self.settings.client_time_max_skew_s)
        return client, served_at

    def Rate(self, request: pb.RateRequest, context: Any) -> pb.RateResponse:
        try:
            check_stars(request.stars)
            record, queue_served = self._track(request.track_id)
            check_ready(request.track_id, record)
            user = current_user()
            times = self._feedback_times(record, queue_served, request.client_time)
            once_key = rated_key(request.track_id, user)
            if not self.ports.kv.set_if_absent(once_key, "1"):
                raise ConflictError(f"you already rated track {request.track_id}")
            payload = events_pb2.FeedbackReceived(
                user_id=user,
                track_id=request.track_id,
                rating=events_pb2.TrackRating(stars=request.stars),
            )
            stamp_times(payload, times)
            try:
                event_id = self.ports.publish("feedback.received.v1", request.track_id, payload)
            except BaseException:
                self.ports.kv.delete(once_key)  # the rating did not leave: let the user retry
                raise
        except BaseException:
            metrics.RATINGS.labels("rejected").inc()
            raise
        metrics.RATINGS.labels("accepted").inc()
        return pb.RateResponse(event_id=event_id)

    def ReportListen(self, request: pb.ReportListenRequest, context: Any) -> Any:
        check_seconds(request.seconds_listened)
        record, queue_served = self._track(request.track_id)
        check_ready(request.track_id, record)
        user = current_user()
        times = self._feedback_times(record, queue_served, request.client_time)
        payload = listen_event(user, request, record, times)
        event_id = self.ports.publish("feedback.received.v1", request.track_id, payload)
        return pb.ReportListenResponse(event_id=event_id)

    def SubmitFeedback(self, request: pb.SubmitFeedbackRequest, context: Any) -> Any:
        """Many Rate / ReportListen items of the caller in one call: the same checks per item,
        one MGET of the track records, one pipelined once-only claim for the ratings and one
        event (FeedbackBatch, keyed by user) for everything accepted — O(1) round trips per
        batch instead of O(items). A refused item does not stop the others."""
        feedback_batch_size(request, self.settings.max_feedback_batch)  # (checked before, too)
        user = current_user()
        # Each item's kind, body and track id, read once: at 100 items a call the protobuf
        # accessors were a good share of the handler's own time.
        parsed: list[tuple[str | None, Any, str]] = []
        refused: dict[int, RiffloopError] = {}
        for i, item in enumerate(request.items):
            which = item.WhichOneof("item")
            body = item.rating if which == "rating" else item.listen
            parsed.append((which, body, body.track_id))
            try:
                if which == "rating":
                    check_track_id(body.track_id)
                    check_stars(body.stars)
                elif which == "listen":
                    check_track_id(body.track_id)
                    check_seconds(body.seconds_listened)
                else:
                    raise ValidationError(f"item {i} carries neither a rating nor a listen")
            except RiffloopError as exc:
                refused[i] = exc
        wanted = sorted({track for i, (_, _, track) in enumerate(parsed) if i not in refused})
        raws = self.ports.kv.get_many([f"gw:track:{t}" for t in wanted])
        records = {t: json.loads(raw) for t, raw in zip(wanted, raws, strict=True) if raw}
        # Tracks of others need the queue's word that they were served to the caller.
        foreign = [t for t, r in records.items() if r.get("owner") != user]
        queue_served = {
            t: float(at)
            for t, at in zip(
                foreign,
                self.ports.kv.get_many([served_key(t, user) for t in foreign]),
                strict=True,
            )
            if at is not None
        }
        times: dict[int, tuple[float, float]] = {}
        listens: dict[int, events_pb2.FeedbackReceived] = {}
        rated: list[int] = []  # ratings that passed every check so far: they need their claim
        for i, (which, body, track_id) in enumerate(parsed):
            if i in refused:
                continue
            try:
                record = records.get(track_id)
                if record is None:
                    raise NotFoundError(f"track {track_id} does not exist")
                if record.get("owner") != user and track_id not in queue_served:
                    raise PermissionDeniedError(f"track {track_id} was not served to you")
                check_ready(track_id, record)
                times[i] = self._feedback_times(
                    record, queue_served.get(track_id), body.client_time
                )
                if which == "listen":
                    listens[i] = listen_event(user, body, record, times[i])
                else:
                    rated.append(i)
            except RiffloopError as exc:
                refused[i] = exc
        once_keys = [rated_key(parsed[i][2], user) for i in rated]
        claimed = self.ports.kv.set_many_if_absent(once_keys, "1")
        for i, fresh in zip(rated, claimed, strict=True):
            if not fresh:
                refused[i] = ConflictError(f"you already rated track {parsed[i][2]}")
        n_ratings = sum(1 for which, _, _ in parsed if which == "rating")
        batch = events_pb2.FeedbackBatch()
        for i, (which, body, track_id) in enumerate(parsed):
            if i in refused:
                continue
            if which == "rating":
                item = batch.items.add(user_id=user, track_id=track_id)
                item.rating.stars = body.stars
                stamp_times(item, times[i])
            else:
                batch.items.append(listens[i])
        event_id = ""
        if batch.items:
            try:
                event_id = self.ports.publish("feedback.received.v1", user, batch)
            except BaseException:
                # nothing left: release this call's claims so the client can send the batch again
                for key, fresh in zip(once_keys, claimed, strict=True):
                    if fresh:
                        self.ports.kv.delete(key)
                metrics.RATINGS.labels("rejected").inc(n_ratings)  # none of them left
                raise
        results = []
        for i, (_, _, track_id) in enumerate(parsed):
            error = refused.get(i)
            if error is None:
                results.append(pb.FeedbackItemResult(track_id=track_id))
            else:
                code = grpc.StatusCode[error.grpc_code].value[0]
                results.append(
                    pb.FeedbackItemResult(track_id=track_id, code=code, reason=error.reason)
                )
        accepted = n_ratings - sum(1 for i in refused if parsed[i][0] == "rating")
        metrics.RATINGS.labels("accepted").inc(accepted)
        metrics.RATINGS.labels("rejected").inc(n_ratings - accepted)
        return pb.SubmitFeedbackResponse(
            event_id=event_id, results=results, accepted=len(parsed) - len(refused)
        )

    # -- models -------------------------------------------------------------------------------

    def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        kv = self.ports.kv
        current = kv.get("gw:models:current") or ""
        ratings = kv.hgetall(MODEL_RATINGS_KEY)
        published = kv.hgetall("gw:models")
        out = []

        # A version that served rated tracks is listed even if it was never announced on
        # model.published.v1 (the base model a trainer starts from is not).
        def summary(kind: dict[str, Any]) -> pb.ModelRatingSummary:
            """One kind's ratings (feedback's KindRatings JSON): stars with their 95 %
            t-interval (absent below 2 ratings), and the normalised score apart."""
            message = pb.ModelRatingSummary(
                mean_stars=float(kind.get("mean_stars", 0.0)),
                rating_count=int(kind.get("rating_count", 0)),
                track_count=int(kind.get("track_count", 0)),
                mean_normalised_score=float(kind.get("mean_normalised_score", 0.0)),
                normalised_rating_count=int(kind.get("normalised_rating_count", 0)),
            )
            if kind.get("stars_low") is not None and kind.get("stars_high") is not None:
                message.mean_stars_interval.low = float(kind["stars_low"])
                message.mean_stars_interval.high = float(kind["stars_high"])
            return message

        for version in sorted(published.keys() | ratings.keys()):
            info = json.loads(published[version]) if version in published else {}
            rated = json.loads(ratings[version]) if version in ratings else {}
            generated = summary(rated.get("generated", {}))
            baseline = summary(rated.get("baseline", {}))
            out.append(
                pb.ModelSummary(
                    version=version,
                    parent_version=info.get("parent", ""),
                    current=version == current,
                    generated=generated,
                    baseline=baseline,
                    # the deprecated fields, for older clients: the normalised score, as before
                    mean_rating=generated.mean_normalised_score,
                    rating_count=generated.normalised_rating_count,
                    baseline_mean_rating=baseline.mean_normalised_score,
                    baseline_rating_count=baseline.normalised_rating_count,
                    published_at=timestamp_at(float(info.get("published_at", 0.0))),
                )
            )
        out.sort(key=lambda m: m.published_at.ToNanoseconds())
        return pb.ListModelsResponse(models=out)


# -- event handlers (consumer side) -------------------------------------------------------------


class GatewayEvents(TrackRecords):
    """What the gateway does with the events it consumes: ``riffloop.runtime.TrackRecords``,
    the rules its rebuild replays too; each handler is idempotent."""

    def __init__(
        self,
        ports: Any,
        dispatcher: Any,
        clock: Callable[[], float] = time.time,
        backlog: GenerationBacklog | None = None,
    ) -> None:
        super().__init__(ports.kv, dispatcher, producer=ports.producer, clock=clock)
        self.backlog = backlog  # the servicer's pending requests: an answered one waits no more

    def on_track_ready(self, envelope: events_pb2.Envelope) -> None:
        super().on_track_ready(envelope)
        if self.backlog is not None:
            self.backlog.done(envelope.track_ready.track_id)

    def on_generation_dead_lettered(self, envelope: events_pb2.Envelope) -> None:
        super().on_generation_dead_lettered(envelope)
        dead = envelope.dead_letter
        if self.backlog is None or dead.original_topic != "generation.requested.v1":
            return
        try:
            original = decode_envelope(bytes(dead.original_value), dead.original_topic)
        except ValidationError:
            return  # never a request
        request_id = original.generation_requested.request_id
        self.backlog.done(self.dispatcher.track_id_for(request_id))


__all__ = ["GatewayEvents", "GatewayServicer"]

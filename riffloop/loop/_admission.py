"""Admission of generation requests: what one user, and everyone, may have waiting.

A Generate is pending from the moment the gateway publishes it until its track is ready or the
generator gives up on it (dead letter). Requests differ in work: the generator runs ≈ q DDIM
steps per 1.49 s window, so a request of q = 1,000 for 60 s is ≈ 200 default ones (q = 50 for
5.9 s). Each request is counted in *units* of the default request's work (``work``, at least
1), and two bounds keep the generators' queue serviceable:

1. per user: pending work of at most ``per_user`` units, so one user cannot fill the queue that
   every listener's requests wait in;
2. in all: at most ``max_backlog`` units pending. Past that the generators are behind (the
   consumer lag of generation.requested.v1 grows), and a new request would be answered long
   after its listener left: it is refused with a retry hint instead (admission control).

A request larger than a bound on its own is admitted when nothing is pending under that bound
(every valid request can be served, one at a time). Both refusals are ``RateLimitedError``
(RESOURCE_EXHAUSTED) with ``retry_after_s``.

The pending requests live in the key-value store, so every gateway replica counts the same ones:

    <prefix>          hash track id → "<requested at> <user> <units>"   every pending request
    <prefix>:<user>   hash track id → "<requested at> <units>"          the user's

(An entry written before units were counted, without its last field, counts 1 unit.) An entry
older than ``stale_after_s`` is dropped when read: a request whose answer was lost stops
counting after that long instead of holding a place for ever. The backlog is re-read at most
every ``refresh_s`` (one HGETALL of the pending requests); the user's own entries are read on
every call.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from riffloop.core import RateLimitedError, ValidationError


@dataclasses.dataclass(frozen=True)
class AdmissionPolicy:
    per_user: int = 16
    max_backlog: int = 1000
    stale_after_s: float = 3600.0
    refresh_s: float = 1.0
    retry_after_s: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.per_user <= self.max_backlog:
            raise ValidationError("admission: need 1 ≤ per_user ≤ max_backlog")
        if not (self.stale_after_s > 0 and self.refresh_s >= 0 and self.retry_after_s > 0):
            raise ValidationError("admission: stale_after_s and retry_after_s > 0, refresh_s ≥ 0")


class GenerationBacklog:
    """The pending generation requests (module docstring): admit, add, done."""

    def __init__(
        self,
        kv: Any,
        policy: AdmissionPolicy,
        *,
        prefix: str = "gw:pending",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kv = kv
        self.policy = policy
        self.prefix = prefix
        self.clock = clock
        self._lock = threading.Lock()
        self._backlog = 0  # as last read, plus what this process added since
        self._read_at = float("-inf")

    def _user_key(self, user: str) -> str:
        return f"{self.prefix}:{user}"

    def _live(self, key: str, parse: Callable[[str], tuple[float, int]], now: float) -> int:
        """The units of the entries of hash ``key`` younger than stale_after_s; stale ones are
        deleted. ``parse`` reads an entry as (requested at, units)."""
        entries = self.kv.hgetall(key)
        stale, units = [], 0
        for track_id, value in entries.items():
            try:
                at, work = parse(value)
            except (ValueError, IndexError):
                at, work = float("-inf"), 0  # unreadable: drop it rather than count it for ever
            if now - at > self.policy.stale_after_s:
                stale.append(track_id)
            else:
                units += max(1, work)
        if stale:
            self.kv.hdel(key, stale)
        return units

    def backlog(self) -> int:
        """Units of work pending for all users (re-read at most every refresh_s)."""
        now = self.clock()
        with self._lock:
            if now - self._read_at < self.policy.refresh_s:
                return self._backlog
        count = self._live(self.prefix, _parse_backlog_entry, now)
        with self._lock:
            self._backlog, self._read_at = count, now
        return count

    def pending(self, user: str) -> int:
        """Units of work pending for ``user``."""
        return self._live(self._user_key(user), _parse_user_entry, self.clock())

    def admit(self, user: str, work: int = 1) -> None:
        """Raise RateLimitedError when ``user`` may not add a request of ``work`` units now."""
        policy = self.policy
        work = _units(work)
        mine = self.pending(user)
        if mine and mine + work > policy.per_user:
            raise RateLimitedError(
                f"your pending generation requests are {mine} default requests' worth of work "
                f"and this one {work} (limit {policy.per_user}); wait until one of your "
                "tracks is ready",
                retry_after_s=policy.retry_after_s,
            )
        backlog = self.backlog()
        if backlog and backlog + work > policy.max_backlog:
            raise RateLimitedError(
                f"the generators are behind ({backlog} default requests' worth waiting, limit "
                f"{policy.max_backlog}); retry in {policy.retry_after_s:g} s",
                retry_after_s=policy.retry_after_s,
            )

    def add(self, user: str, track_id: str, work: int = 1) -> None:
        now = self.clock()
        work = _units(work)
        self.kv.hset_many(
            {
                self.prefix: {track_id: f"{now!r} {user} {work}"},
                self._user_key(user): {track_id: f"{now!r} {work}"},
            }
        )
        with self._lock:
            self._backlog += work

    def done(self, track_id: str) -> None:
        """The request's track is ready, or failed for good: it waits no more (a track that
        was never pending here, such as a probe, changes nothing)."""
        value = self.kv.hget(self.prefix, track_id)
        if value is None:
            return
        self.kv.hdel(self.prefix, [track_id])
        fields = value.split(" ")
        user = fields[1] if len(fields) > 1 else ""
        if user:
            self.kv.hdel(self._user_key(user), [track_id])


def _units(work: int) -> int:
    if isinstance(work, bool) or not isinstance(work, int) or work < 1:
        raise ValidationError(f"a request's work is a whole number of units ≥ 1, got {work!r}")
    return work


def _parse_backlog_entry(value: str) -> tuple[float, int]:
    """ "<at> <user> <units>" (or "<at> <user>", 1 unit) → (at, units)."""
    fields = value.split(" ")
    return float(fields[0]), int(fields[2]) if len(fields) > 2 else 1


def _parse_user_entry(value: str) -> tuple[float, int]:
    """ "<at> <units>" (or "<at>", 1 unit) → (at, units)."""
    fields = value.split(" ")
    return float(fields[0]), int(fields[1]) if len(fields) > 1 else 1

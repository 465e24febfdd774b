"""The ``EventBus`` port (Kafka semantics) and its in-process adapter ``MemoryEventBus``.

Semantics every adapter keeps (checked by tests/contract/test_event_bus_contract.py):

- topics exist only after ``ensure_topics`` (auto-create is off); each has a fixed number of
  partitions; a record goes to ``partition(key)`` so the order per key (song, track, model) holds;
- a consumer group reads each record at least once: ``poll`` returns records after the group's
  committed offset, ``commit(message)`` moves it past that record, and records polled but not
  committed are delivered again to whoever next owns the partition (at-least-once);
- the partitions of a topic are shared among the group's live subscriptions;
- ``replay(topic)`` reads a topic from its first record to its end as of the call, outside any
  consumer group (nothing committed, no member joins): how a cache of the log is rebuilt.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import re
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from riffloop.core._errors import NotFoundError, TransientError, ValidationError

if TYPE_CHECKING:
    from riffloop.v1 import events_pb2

_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_GROUP_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


def validate_topic(topic: str) -> str:
    if not isinstance(topic, str) or not _TOPIC_RE.match(topic) or topic in {".", ".."}:
        raise ValidationError(f"topic name {topic!r} is invalid (letters, digits, '.', '_', '-')")
    return topic


def validate_group(group: str) -> str:
    if not isinstance(group, str) or not _GROUP_RE.match(group):
        raise ValidationError(
            f"consumer group {group!r} is invalid (letters, digits, '.', '_', '-')"
        )
    return group


def validate_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or not name or not isinstance(value, str):
            raise ValidationError("message headers must map non-empty names to strings")
        out[name] = value
    return out


@dataclasses.dataclass(frozen=True)
class Message:
    """One record as read from a topic."""

    topic: str
    partition: int
    offset: int
    key: str
    value: bytes
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    timestamp_ms: int = 0


@dataclasses.dataclass(frozen=True)
class Published:
    """Where a published record landed."""

    topic: str
    partition: int
    offset: int


class Subscription(abc.ABC):
    """One member of a consumer group (not thread-safe: one thread polls and commits)."""

    @abc.abstractmethod
    def poll(self, timeout_s: float, max_records: int = 100) -> list[Message]:
        """Records after this member's position, in order per partition; [] after timeout_s."""

    @abc.abstractmethod
    def commit(self, message: Message) -> None:
        """Commit the group's offset past ``message``. TransientError if the partition moved."""

    @abc.abstractmethod
    def assignment(self) -> set[tuple[str, int]]:
        """The (topic, partition) pairs this member owns right now (empty while joining)."""

    @abc.abstractmethod
    def lag(self) -> dict[str, int]:
        """Per topic: records on the assigned partitions not yet committed by the group."""

    @abc.abstractmethod
    def close(self) -> None:
        """Leave the group (uncommitted records go to the next owner)."""
        return None


class EventBus(abc.ABC):
    """Port: a partitioned log with consumer groups. Adapters: memory, Kafka."""

    @abc.abstractmethod
    def ensure_topics(self, topics: Iterable[str], *, partitions: int = 3) -> None:
        """Create the topics that do not exist yet (idempotent)."""

    @abc.abstractmethod
    def topic_exists(self, topic: str) -> bool: ...

    @abc.abstractmethod
    def publish_raw(
        self, topic: str, key: str, value: bytes, headers: Mapping[str, str] | None = None
    ) -> Published:
        """Append one record and wait until it is durable; NotFoundError for a missing topic."""

    @abc.abstractmethod
    def subscribe(self, group: str, topics: Sequence[str]) -> Subscription: ...

    @abc.abstractmethod
    def replay(self, topic: str) -> Iterator[Message]:
        """Every record of ``topic`` from the earliest kept to the end as of this call, in
        order per partition (partitions one after another), read outside any consumer group;
        records published after the call are not included. NotFoundError for a missing topic."""

    def publish(
        self,
        topic: str,
        key: str,
        envelope: events_pb2.Envelope,
        headers: Mapping[str, str] | None = None,
    ) -> Published:
        """Publish an Envelope (keyed by its entity id so order holds per entity)."""
        if not envelope.event_id:
            raise ValidationError("cannot publish an envelope without an event_id")
        return self.publish_raw(topic, key, envelope.SerializeToString(), headers)

    def ping(self) -> None:
        """Raise TransientError if the bus cannot be reached (readiness checks)."""
        return None

    def close(self) -> None:
        """Flush and release connections."""
        return None


def partition_for(key: str, partitions: int) -> int:
    """Stable key → partition (CRC32 of the UTF-8 key); the same key always lands together."""
    return zlib.crc32(key.encode()) % partitions


# -- in-memory adapter ------------------------------------------------------------------------


@dataclasses.dataclass
class _Group:
    members: list[_MemorySubscription] = dataclasses.field(default_factory=list)
    committed: dict[tuple[str, int], int] = dataclasses.field(default_factory=dict)
    generation: int = 0


class MemoryEventBus(EventBus):
    """In-process bus with Kafka's delivery semantics; safe to use from several threads."""

    def __init__(self) -> None:
        self._logs: dict[str, list[list[Message]]] = {}
        self._groups: dict[str, _Group] = {}
        self._cond = threading.Condition()
        self._clock_ms = 0

    def ensure_topics(self, topics: Iterable[str], *, partitions: int = 3) -> None:
        if partitions < 1:
            raise ValidationError("a topic needs at least one partition")
        with self._cond:
            for topic in topics:
                validate_topic(topic)
                self._logs.setdefault(topic, [[] for _ in range(partitions)])

    def topic_exists(self, topic: str) -> bool:
        with self._cond:
            return topic in self._logs

    def partitions(self, topic: str) -> int:
        with self._cond:
            return len(self._log(topic))

    def _log(self, topic: str) -> list[list[Message]]:
        try:
            return self._logs[validate_topic(topic)]
        except KeyError:
            raise NotFoundError(f"topic {topic!r} does not exist; create it first") from None

    def publish_raw(
        self, topic: str, key: str, value: bytes, headers: Mapping[str, str] | None = None
    ) -> Published:
        if not isinstance(key, str) or not key:
            raise ValidationError("a record needs a non-empty key (the entity id)")
        clean = validate_headers(headers)
        with self._cond:
            log = self._log(topic)
            partition = partition_for(key, len(log))
            self._clock_ms += 1
            offset = len(log[partition])
            log[partition].append(
                Message(topic, partition, offset, key, bytes(value), clean, self._clock_ms)
            )
            self._cond.notify_all()
        return Published(topic, partition, offset)

    def replay(self, topic: str) -> Iterator[Message]:
        with self._cond:  # (checked now, not on the first next())
            snapshot = [list(records) for records in self._log(topic)]
        return itertools.chain.from_iterable(snapshot)

    def subscribe(self, group: str, topics: Sequence[str]) -> Subscription:
        validate_group(group)
        if not topics:
            raise ValidationError("subscribe needs at least one topic")
        with self._cond:
            for topic in topics:
                self._log(topic)
            state = self._groups.setdefault(group, _Group())
            member = _MemorySubscription(self, group, tuple(topics))
            state.members.append(member)
            state.generation += 1  # a rebalance: every member re-reads its assignment
            return member

    # -- used by _MemorySubscription under self._cond --

    def _assignment(self, group: str, member: _MemorySubscription) -> list[tuple[str, int]]:
        """Round-robin the partitions of the member's topics over the members subscribed to them."""
        state = self._groups[group]
        owned: list[tuple[str, int]] = []
        for topic in member.topics:
            subscribers = [m for m in state.members if topic in m.topics]
            index = subscribers.index(member)
            for partition in range(len(self._logs[topic])):
                if partition % len(subscribers) == index:
                    owned.append((topic, partition))
        return owned

    def _leave(self, member: _MemorySubscription) -> None:
        with self._cond:
            state = self._groups[member.group]
            if member in state.members:
                state.members.remove(member)
                state.generation += 1
                self._cond.notify_all()


class _MemorySubscription(Subscription):
    def __init__(self, bus: MemoryEventBus, group: str, topics: tuple[str, ...]) -> None:
        self._bus = bus
        self.group = group
        self.topics = topics
        self._generation = -1
        self._positions: dict[tuple[str, int], int] = {}
        self._closed = False

    def _refresh(self) -> None:
        state = self._bus._groups[self.group]
        if self._generation != state.generation:
            # Like a Kafka rebalance: positions restart from the group's committed offsets.
            self._generation = state.generation
            self._positions = {
                tp: state.committed.get(tp, 0) for tp in self._bus._assignment(self.group, self)
            }

    def _ready(self, max_records: int) -> list[Message]:
        self._refresh()
        out: list[Message] = []
        for (topic, partition), position in self._positions.items():
            records = self._bus._logs[topic][partition][position : position + max_records]
            out.extend(records)
        out.sort(key=lambda m: m.timestamp_ms)
        return out[:max_records]

    def poll(self, timeout_s: float, max_records: int = 100) -> list[Message]:
        if self._closed:
            raise ValidationError("poll on a closed subscription")
        if max_records < 1:
            raise ValidationError("max_records must be at least 1")
        with self._bus._cond:
            batch = self._ready(max_records)
            if not batch and timeout_s > 0:
                self._bus._cond.wait_for(lambda: bool(self._ready(1)), timeout=timeout_s)
                batch = self._ready(max_records)
            for message in batch:
                self._positions[(message.topic, message.partition)] = message.offset + 1
            return batch

    def commit(self, message: Message) -> None:
        with self._bus._cond:
            self._refresh()
            tp = (message.topic, message.partition)
            if tp not in self._positions:
                raise TransientError(
                    f"cannot commit {message.topic}[{message.partition}]: partition was reassigned"
                )
            committed = self._bus._groups[self.group].committed
            committed[tp] = max(committed.get(tp, 0), message.offset + 1)

    def assignment(self) -> set[tuple[str, int]]:
        with self._bus._cond:
            self._refresh()
            return set(self._positions)

    def lag(self) -> dict[str, int]:
        with self._bus._cond:
            self._refresh()
            committed = self._bus._groups[self.group].committed
            out = {topic: 0 for topic in self.topics}
            for topic, partition in self._positions:
                end = len(self._bus._logs[topic][partition])
                out[topic] += end - committed.get((topic, partition), 0)
            return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._bus._leave(self)

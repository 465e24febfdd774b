"""Rebuild a service's key-value state from the Kafka topics it is derived from.

Kafka is the record and Redis a cache of it (design.md §2). A service that keeps state in Redis
describes it with a :class:`RebuildPlan`: the topics it is derived from, in the order they are
replayed, each with the handler that applies one envelope — the rules its consumer applies,
written so that applying a record again changes nothing (upserts, set-if-absent, once-keys).
Replaying every topic twice therefore gives the same state as once.

The plan's marker key tells an emptied store from a new deployment. It is written after every
completed rebuild (on a new deployment the topics are empty and the first one is instant) and
lives as long as the store's data. It also names the store's server process
(``KeyValueStore.instance_id``, Redis's run_id): a Redis restarted from its append-only file,
fsynced every second, may have lost the last second of writes after a crash, and a failed-over
replica what it had not yet received, so a marker from another process counts as absent too. A
service that finds it absent at start-up rebuilds before it consumes; :class:`RebuildWatch`
looks at it every few seconds while the service runs and rebuilds when it is gone (a FLUSHALL,
a Redis restarted with or without its files, an eviction).

Steps of :func:`rebuild`:

1. claim: set the marker to ``rebuilding`` (a flush during the rebuild takes the claim with it,
   a restart changes the server process);
2. replay each topic from its first record to its end as of the replay (``EventBus.replay``),
   decoding each record as the consumer does; a record the consumer would refuse (it was
   dead-lettered then) is skipped and counted, a transient failure stops the rebuild;
3. the plan's ``finish`` (what waited for a later topic);
4. if the claim (or another replica's marker) is still there under the same server process,
   mark done (the report, with the process); else the store was emptied or restarted
   meanwhile: start again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from riffloop.core import (
    ConfigurationError,
    EventBus,
    KeyValueStore,
    RiffloopError,
    Settings,
    TransientError,
    ValidationError,
    decode_envelope,
)
from riffloop.runtime._server import LoopWorker

_log = logging.getLogger("riffloop.rebuild")

EnvelopeHandler = Callable[[Any], None]
REBUILDING = "rebuilding"


@dataclasses.dataclass(frozen=True)
class Replay:
    """One rebuild's handlers (topic → handler of one envelope, on fresh in-memory state) and
    what runs once after the last topic."""

    handlers: Mapping[str, EnvelopeHandler]
    finish: Callable[[], None] | None = None


@dataclasses.dataclass(frozen=True)
class RebuildPlan:
    """What one service rebuilds: ``marker`` (its key), ``topics`` (in replay order) and
    ``start`` (a fresh :class:`Replay` for each rebuild: the consumer's rules, with their own
    in-memory state, writing to the store)."""

    marker: str
    topics: Sequence[str]
    start: Callable[[], Replay]


@dataclasses.dataclass(frozen=True)
class RebuildReport:
    """Records replayed per topic, those skipped (refused by their handler, as the consumer
    refused them), and the seconds it took."""

    records: dict[str, int]
    skipped: dict[str, int]
    seconds: float
    instance: str = ""  # the store's server process it was written under

    @property
    def total(self) -> int:
        return sum(self.records.values())

    def to_json(self) -> str:
        return json.dumps(
            {
                "records": self.records,
                "skipped": self.skipped,
                "seconds": round(self.seconds, 3),
                "instance": self.instance,
            }
        )


def is_rebuilt(kv: KeyValueStore, plan: RebuildPlan) -> bool:
    """True when the plan's marker says a rebuild completed on this store's data, under the
    server process that holds it now."""
    raw = kv.get(plan.marker)
    if raw is None or raw == REBUILDING:
        return False
    try:
        written_under = str(json.loads(raw).get("instance", ""))
    except (ValueError, AttributeError):
        return False  # not a marker this code wrote: rebuild (it is idempotent)
    return not written_under or written_under == kv.instance_id()


def rebuild(
    bus: EventBus, kv: KeyValueStore, plan: RebuildPlan, *, max_rounds: int = 3
) -> RebuildReport:
    """Replay ``plan`` into ``kv`` (the module's steps); TransientError if the store was
    emptied or restarted during each of ``max_rounds`` tries, or a dependency failed."""
    for _ in range(max_rounds):
        started = time.monotonic()
        instance = kv.instance_id()
        kv.set(plan.marker, REBUILDING)  # 1.
        replay = plan.start()
        records: dict[str, int] = {}
        skipped: dict[str, int] = {}
        for topic in plan.topics:  # 2.
            records[topic], skipped[topic] = _replay_topic(bus, topic, replay.handlers[topic])
        if replay.finish is not None:  # 3.
            replay.finish()
        report = RebuildReport(records, skipped, time.monotonic() - started, instance)
        # 4. (a claim or a marker another replica wrote since is as good: its rebuild ran on
        # the same data, and a flush would have left neither)
        if kv.get(plan.marker) is not None and kv.instance_id() == instance:
            kv.set(plan.marker, report.to_json())
            _log.info(
                "key-value state rebuilt from the log",
                extra={"marker": plan.marker, "records": report.total, "skipped": skipped},
            )
            return report
        _log.warning("the store was emptied during the rebuild; starting again")
    raise TransientError(f"the key-value store was emptied during {max_rounds} rebuilds")


def _replay_topic(bus: EventBus, topic: str, handler: EnvelopeHandler) -> tuple[int, int]:
    applied = refused = 0
    for message in bus.replay(topic):
        try:
            handler(decode_envelope(message.value, topic))
            applied += 1
        except TransientError:
            raise
        except RiffloopError as exc:  # refused by the consumer too: dead-lettered back then
            refused += 1
            _log.debug("record skipped in rebuild", extra={"topic": topic, "reason": exc.reason})
    return applied, refused


def ensure_rebuilt(bus: EventBus, kv: KeyValueStore, plan: RebuildPlan) -> RebuildReport | None:
    """Rebuild unless the marker says the store holds a completed rebuild; the report or None."""
    if is_rebuilt(kv, plan):
        return None
    return rebuild(bus, kv, plan)


class RebuildWatch(LoopWorker):
    """Worker (``ServiceRuntime.add_worker``): every ``interval_s``, rebuild when the plan's
    marker is gone. A failed rebuild (Redis or Kafka down) is retried on the next tick;
    ``on_rebuilt`` runs after each rebuild (e.g. to reload what the process holds in memory)."""

    def __init__(
        self,
        name: str,
        bus: EventBus,
        kv: KeyValueStore,
        plan: RebuildPlan,
        *,
        interval_s: float = 2.0,
        on_rebuilt: Callable[[RebuildReport], None] | None = None,
    ) -> None:
        if not 0 < interval_s <= 3600:
            raise ValidationError("the rebuild watch's interval must lie in (0, 3600] s")
        super().__init__(f"{name}-rebuild-watch", self._watch)
        self.rebuilds = 0
        self._bus, self._kv, self._plan = bus, kv, plan
        self._interval_s = interval_s
        self._on_rebuilt = on_rebuilt

    def check(self) -> RebuildReport | None:
        """One look at the marker (and a rebuild if it is gone)."""
        report = ensure_rebuilt(self._bus, self._kv, self._plan)
        if report is not None:
            self.rebuilds += 1
            _log.warning(
                "key-value state was lost and has been rebuilt from the log",
                extra={"marker": self._plan.marker, "records": report.total},
            )
            if self._on_rebuilt is not None:
                self._on_rebuilt(report)
        return report

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self._interval_s):
            try:
                self.check()
            except TransientError as exc:  # Redis or Kafka away: the next tick tries again
                _log.warning("rebuild check failed", extra={"reason": exc.reason})
            except Exception:
                _log.exception("rebuild check failed")


def rebuild_command(
    program: str,
    argv: Sequence[str],
    settings: Settings,
    plan_of: Callable[[Any], RebuildPlan],
) -> int:
    """``<program> rebuild [--force]``, the operator's command: rebuild unless the marker says
    the store is complete (always with ``--force``; replaying is idempotent). ``plan_of`` makes
    the service's plan from its ports. Exit 0 done, 2 bad arguments or settings (one line on
    stderr); a dependency down raises TransientError (``run_main``: exit 1)."""
    from riffloop.runtime._ports import connect_ports

    parser = argparse.ArgumentParser(
        prog=program,
        description="Rebuild this service's key-value state (Redis) from its Kafka topics.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = commands.add_parser("rebuild", help="replay the topics into the key-value store")
    sub.add_argument(
        "--force",
        action="store_true",
        help="rebuild even when the marker says the store is complete",
    )
    try:
        options = parser.parse_args(list(argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if settings.backend != "real":
        raise ConfigurationError(
            "rebuild needs RIFFLOOP_BACKEND=real: an embedded stack keeps its state in its process"
        )
    ports = connect_ports(settings)
    try:
        plan = plan_of(ports)
        if options.force:
            report: RebuildReport | None = rebuild(ports.bus, ports.kv, plan)
        else:
            report = ensure_rebuilt(ports.bus, ports.kv, plan)
    finally:
        ports.close()
    if report is None:
        print(f"{program}: nothing to do, the store holds a completed rebuild (--force redoes it)")
    else:
        print(f"{program}: rebuilt from {report.total} records {report.to_json()}")
    return 0

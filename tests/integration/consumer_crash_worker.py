"""A real consumer process for tests/integration/test_consumer_crash.py (not a test module).

    python tests/integration/consumer_crash_worker.py TOPIC NAMESPACE MODE

Settings come from RIFFLOOP_* (backend real: Kafka + Redis). The handler counts every call in
``<ns>:calls`` (not idempotent: it proves redeliveries) and applies the rating to
``<ns>:aggregate`` with ``apply_once`` (idempotent: the effect). A rating of track "poison" raises.
Every outcome the consumer reports lands in ``<ns>:outcome:<outcome>``.

MODE: ``run`` consumes until SIGTERM (graceful stop, exit 0); ``hang-in-handler`` hangs right
after applying the effect; ``hang-in-commit`` hangs when asked to commit (after the dedupe mark).
Both hangs first set ``<ns>:hanging`` so the test knows when to kill -9.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence

from riffloop.core import (
    Consumer,
    ConsumerHooks,
    Delivery,
    KafkaEventBus,
    KeyValueStore,
    Message,
    Outcome,
    RedisKeyValueStore,
    Settings,
    Subscription,
    run_main,
)


class HangOnCommit(Subscription):
    """Delegates to a real subscription, but never returns from commit (the crash window)."""

    def __init__(self, inner: Subscription, kv: KeyValueStore, namespace: str) -> None:
        self._inner, self._kv, self._ns = inner, kv, namespace

    def poll(self, timeout_s: float, max_records: int = 100) -> list[Message]:
        return self._inner.poll(timeout_s, max_records)

    def commit(self, message: Message) -> None:
        self._kv.set(f"{self._ns}:hanging", "commit")
        threading.Event().wait()

    def assignment(self) -> set[tuple[str, int]]:
        return self._inner.assignment()

    def lag(self) -> dict[str, int]:
        return self._inner.lag()

    def close(self) -> None:
        self._inner.close()


class HangOnCommitBus(KafkaEventBus):
    kv: KeyValueStore
    namespace: str

    def subscribe(self, group: str, topics: Sequence[str]) -> Subscription:
        return HangOnCommit(super().subscribe(group, topics), self.kv, self.namespace)


def main() -> int:
    topic, namespace, mode = sys.argv[1:4]
    settings = Settings.from_env()
    kv = RedisKeyValueStore.from_settings(settings)
    bus: KafkaEventBus
    if mode == "hang-in-commit":
        hanging = HangOnCommitBus.from_settings(settings)
        assert isinstance(hanging, HangOnCommitBus)
        hanging.kv, hanging.namespace = kv, namespace
        bus = hanging
    else:
        bus = KafkaEventBus.from_settings(settings)

    def handle(delivery: Delivery) -> None:
        kv.incr(f"{namespace}:calls")
        feedback = delivery.envelope.feedback_received
        if feedback.track_id == "poison":
            raise RuntimeError("poison track: cannot score")
        kv.apply_once(
            f"{namespace}:applied:{delivery.event_id}",
            3600,
            {f"{namespace}:aggregate": {"sum": feedback.rating.stars, "n": 1}},
        )
        if mode == "hang-in-handler":
            kv.set(f"{namespace}:hanging", "handler")
            threading.Event().wait()

    def on_outcome(topic: str, outcome: Outcome) -> None:
        kv.incr(f"{namespace}:outcome:{outcome.value}")

    consumer = Consumer.from_settings(
        settings, bus, kv, topics=[topic], handler=handle, hooks=ConsumerHooks(on_outcome)
    )
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
    kv.set(f"{namespace}:pid-started", "1")
    consumer.run()
    bus.close()
    kv.close()
    return 0


if __name__ == "__main__":
    run_main(main, program="consumer-crash-worker")

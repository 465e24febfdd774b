"""Types shared by the contract fixtures (conftest.py) and the contract test classes."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable

from riffloop.core import EventBus, ObjectStore


def fresh_name(prefix: str) -> str:
    """A name no other test uses: valid as a bucket, a topic and a key prefix."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclasses.dataclass
class StoreUnderTest:
    store: ObjectStore
    bucket: str
    # Overwrite an object's bytes behind the store's back, keeping its recorded sha256.
    tamper: Callable[[str, bytes], None]


@dataclasses.dataclass
class BusUnderTest:
    bus: EventBus
    make_bus: Callable[[], EventBus]  # a second client of the same bus (another process)
    real: bool

    def topic(self, partitions: int = 3) -> str:
        name = fresh_name("ct-topic")
        self.bus.ensure_topics([name], partitions=partitions)
        return name

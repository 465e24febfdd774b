"""One Kafka broker of its own, beside (never instead of) the shared local stack.

For tests that need a broker configured unlike the stack's, e.g. with a SASL/SCRAM listener: a fresh
cluster id, free loopback ports and every file under the given folder, ready when the context is
entered and stopped when it is left. The stack's own broker (``LocalInfra``) stays PLAINTEXT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from riffloop.infra._layout import CacheLayout, InfraError
from riffloop.infra._process import free_port, is_alive, log_tail, spawn, stop, wait_until
from riffloop.infra._servers import KafkaServer, ScramUser


@contextlib.contextmanager
def standalone_kafka(
    home: Path, *, scram: ScramUser | None = None, layout: CacheLayout | None = None
) -> Iterator[KafkaServer]:
    """A running single-node KRaft broker under ``home``; ``scram``: its client listener is
    SASL_PLAINTEXT with that SCRAM-SHA-512 user (``KafkaServer.client_config()`` connects)."""
    from riffloop.infra._local import new_cluster_id

    taken: set[int] = set()
    ports = {name: free_port(taken) for name in KafkaServer.port_names}
    server = KafkaServer(
        home, ports, layout or CacheLayout.default(), new_cluster_id(), scram=scram
    )
    server.check_installed()
    server.prepare()
    server.format_storage()
    # tie_to_parent: the broker dies with this process even if it is killed hard
    handle, record = spawn(
        server.argv(), log_path=server.log_path, cwd=home, env=server.env(), tie_to_parent=True
    )
    try:
        outcome = wait_until(
            server.probe,
            timeout_s=server.ready_timeout_s,
            alive=lambda: is_alive(record),
            interval_s=server.probe_interval_s,
        )
        if outcome != "ready":
            raise InfraError(
                f"{server.description} {outcome} before it was ready; see {server.log_path}:\n"
                f"{log_tail(server.log_path)}"
            )
        yield server
    finally:
        stop(record, handle=handle, grace_s=10.0)

"""``python -m services.feedback``: read settings, wire the ports, serve until SIGTERM.

``python -m services.feedback rebuild [--force]``: rebuild its Redis state from Kafka and exit.
"""

from __future__ import annotations

import sys

from riffloop.core import run_main
from riffloop.runtime import (
    configure_logging,
    connect_ports,
    feedback_rebuild_plan,
    rebuild_command,
)
from services.feedback import FeedbackSettings, build


def main() -> int:
    settings = FeedbackSettings.from_env()
    configure_logging(settings.service_name, settings.log_level)
    if sys.argv[1:]:
        return rebuild_command(
            "python -m services.feedback",
            sys.argv[1:],
            settings,
            lambda ports: feedback_rebuild_plan(ports.kv, ports.bus, producer=ports.producer),
        )
    sys.setswitchinterval(settings.gil_switch_interval_s)  # the process's, not a test's
    ports = connect_ports(settings)
    runtime, _ = build(settings, ports)
    runtime.start()
    try:
        return runtime.run_until_signal()
    finally:
        ports.close()


if __name__ == "__main__":
    run_main(main, program="feedback")

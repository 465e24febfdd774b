"""``python -m services.selector``: read settings, wire the ports, serve until SIGTERM.

``python -m services.selector rebuild [--force]``: rebuild its Redis state from Kafka and exit.
"""

from __future__ import annotations

import sys

from riffloop.core import run_main
from riffloop.runtime import configure_logging, connect_ports, rebuild_command
from services.selector import SelectorSettings, build
from services.selector._build import rebuild_plan


def main() -> int:
    settings = SelectorSettings.from_env()
    configure_logging(settings.service_name, settings.log_level)
    if sys.argv[1:]:
        return rebuild_command(
            "python -m services.selector",
            sys.argv[1:],
            settings,
            lambda ports: rebuild_plan(settings, ports),
        )
    ports = connect_ports(settings)
    runtime, _ = build(settings, ports)
    runtime.start()
    try:
        return runtime.run_until_signal()
    finally:
        ports.close()


if __name__ == "__main__":
    run_main(main, program="selector")

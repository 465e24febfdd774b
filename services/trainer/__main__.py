"""``python -m services.trainer``: read settings, wire the ports, serve until SIGTERM.

``python -m services.trainer rebuild [--force]``: rebuild its Redis state from Kafka and exit.
"""

from __future__ import annotations

import sys

from riffloop.core import run_main
from riffloop.runtime import configure_logging, connect_ports, rebuild_command
from services.trainer import TrainerSettings, build
from services.trainer._build import rebuild_plan


def main() -> int:
    settings = TrainerSettings.from_env()
    if sys.argv[1:]:
        configure_logging(settings.service_name, settings.log_level)
        return rebuild_command(
            "python -m services.trainer",
            sys.argv[1:],
            settings,
            lambda ports: rebuild_plan(settings, ports),
        )
    settings.base_model_path()  # before any connection: refuse without a trained base model
    configure_logging(settings.service_name, settings.log_level)
    ports = connect_ports(settings)
    runtime, _ = build(settings, ports)
    runtime.start()
    try:
        return runtime.run_until_signal()
    finally:
        ports.close()


if __name__ == "__main__":
    run_main(main, program="trainer")

"""``python -m services.gateway``: read settings, wire the ports, serve until SIGTERM.

``python -m services.gateway rebuild [--force]``: rebuild its Redis state from Kafka and exit.
"""

from __future__ import annotations

import logging
import sys

from riffloop.core import run_main
from riffloop.loop import Dispatcher
from riffloop.runtime import (
    configure_logging,
    connect_ports,
    gateway_rebuild_plan,
    rebuild_command,
)
from services.gateway import GatewaySettings, build


def main() -> int:
    settings = GatewaySettings.from_env()
    configure_logging(settings.service_name, settings.log_level)
    if sys.argv[1:]:
        dispatcher = Dispatcher(key=settings.effective_dispatch_key())
        return rebuild_command(
            "python -m services.gateway",
            sys.argv[1:],
            settings,
            lambda ports: gateway_rebuild_plan(ports.kv, dispatcher, producer=ports.producer),
        )
    logging.getLogger("riffloop.gateway").info("settings", extra={"settings": settings.describe()})
    ports = connect_ports(settings)
    runtime = build(settings, ports)
    runtime.start()
    try:
        return runtime.run_until_signal()
    finally:
        ports.close()


if __name__ == "__main__":
    run_main(main, program="gateway")

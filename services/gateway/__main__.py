"""``python -m services.gateway``: read settings, wire the ports, serve until SIGTERM."""

from __future__ import annotations

import logging

from riffloop.core import run_main
from riffloop.runtime import configure_logging, connect_ports
from services.gateway import GatewaySettings, build


def main() -> int:
    settings = GatewaySettings.from_env()
    configure_logging(settings.service_name, settings.log_level)
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

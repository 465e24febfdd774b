"""``python -m services.feedback``: read settings, wire the ports, serve until SIGTERM."""

from __future__ import annotations

import sys

from riffloop.core import run_main
from riffloop.runtime import configure_logging, connect_ports
from services.feedback import FeedbackSettings, build


def main() -> int:
    settings = FeedbackSettings.from_env()
    sys.setswitchinterval(settings.gil_switch_interval_s)  # the process's, not a test's
    configure_logging(settings.service_name, settings.log_level)
    ports = connect_ports(settings)
    runtime, _ = build(settings, ports)
    runtime.start()
    try:
        return runtime.run_until_signal()
    finally:
        ports.close()


if __name__ == "__main__":
    run_main(main, program="feedback")

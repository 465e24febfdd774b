"""``python -m services.trainer``: read settings, wire the ports, serve until SIGTERM."""

from __future__ import annotations

from riffloop.core import run_main
from riffloop.runtime import configure_logging, connect_ports
from services.trainer import TrainerSettings, build


def main() -> int:
    settings = TrainerSettings.from_env()
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

"""Operator commands of the core, configured by the same RIFFLOOP_* variables as the services.

    python -m riffloop.core settings            the effective settings (secrets masked)
    python -m riffloop.core replay-dlq TOPIC    republish <TOPIC>.dlq to TOPIC (after a fix)
        [--limit N] [--group NAME]

Exit codes: 0 done, 2 bad settings or arguments, 1 a dependency failed (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from riffloop.core._consumer import REPLAY_GROUP, replay_dead_letters
from riffloop.core._envelopes import Topic
from riffloop.core._errors import ConfigurationError, RiffloopError
from riffloop.core._settings import Settings, run_main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m riffloop.core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("settings", help="print the effective settings, secrets masked")
    replay = commands.add_parser("replay-dlq", help="republish <topic>.dlq to <topic>")
    replay.add_argument("topic", choices=[t.value for t in Topic], metavar="TOPIC")
    replay.add_argument("--limit", type=int, default=None, help="replay at most N dead letters")
    replay.add_argument("--group", default=REPLAY_GROUP, help="consumer group of the replay")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        options = _parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    settings = Settings.from_env()
    if options.command == "settings":
        for name, value in settings.describe().items():
            print(f"{name}={value}")
        return 0
    if settings.backend != "real":
        raise ConfigurationError("replay-dlq needs RIFFLOOP_BACKEND=real (embedded is per process)")
    if options.limit is not None and options.limit < 1:
        raise ConfigurationError("--limit must be at least 1")
    from riffloop.core._kafka_event_bus import KafkaEventBus

    bus = KafkaEventBus.from_settings(settings)
    try:
        count = replay_dead_letters(bus, options.topic, group=options.group, limit=options.limit)
    except RiffloopError as exc:
        print(f"riffloop.core: {exc.reason}", file=sys.stderr)
        return 1
    finally:
        bus.close()
    print(f"replayed {count} dead letter(s) from {options.topic}.dlq to {options.topic}")
    return 0


if __name__ == "__main__":
    run_main(main, program="python -m riffloop.core")

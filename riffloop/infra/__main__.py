"""`python -m riffloop.infra install|up|down|status`: see `riffloop.infra`."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from riffloop.infra._install import COMPONENTS, install, print_progress
from riffloop.infra._layout import InfraError, cache_dir, default_state_dir
from riffloop.infra._local import LocalInfra


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m riffloop.infra",
        description="Local Kafka, S3 (MinIO) and Redis for Riffloop development and tests.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    install_parser = commands.add_parser(
        "install", help=f"fetch or build the servers into the cache ({cache_dir()})"
    )
    install_parser.add_argument(
        "components", nargs="*", metavar="COMPONENT",
        help=f"any of {', '.join(COMPONENTS)} (default: all)",
    )  # fmt: skip
    for name, help_text in (
        ("up", "install if needed, start all servers and wait until they are ready"),
        ("down", "stop the servers that `up` started"),
        ("status", "show each server's address and whether it is alive and ready"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "--state-dir", type=Path, default=default_state_dir(),
            help="folder for configs, data, logs and infra.env (default: %(default)s)",
        )  # fmt: skip
        if name == "down":
            command.add_argument(
                "--purge", action="store_true", help="also delete the data and logs"
            )
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "install":
        started = time.monotonic()
        install(args.components or COMPONENTS, progress=print_progress)
        print_progress(f"install done ({time.monotonic() - started:.1f} s)")
        return 0
    infra = LocalInfra(args.state_dir, progress=print_progress)
    if args.command == "up":
        install(COMPONENTS, progress=print_progress)
        started = time.monotonic()
        addresses = infra.start()
        print_progress(f"up: ready in {time.monotonic() - started:.1f} s")
        for key, value in addresses.env().items():
            print(f"{key}={'***' if key.endswith('SECRET_KEY') else value}")
        print(f"# load them with: set -a; . {infra.env_path}; set +a")
        return 0
    if args.command == "down":
        if args.purge:
            infra.purge()
        else:
            infra.stop()
        print_progress("down: nothing of this stack is running")
        return 0
    statuses = infra.status()
    for status in statuses:
        state = "ready" if status.ready else ("alive, not ready" if status.alive else "stopped")
        pid = f"pid {status.pid}" if status.pid and status.alive else "-"
        print(f"{status.name:<6} {status.description:<20} {status.address:<28} {pid:<12} {state}")
    return 0 if all(status.ready for status in statuses) else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so a build in progress is stopped, not orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args)
    except InfraError as error:
        print(f"riffloop.infra: {error.reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        advice = (
            "the unfinished step starts over next time"
            if args.command == "install"
            else "run `down` to stop anything it left running"
        )
        print(f"riffloop.infra: interrupted; {advice}.", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(
            f"riffloop.infra: unexpected {type(error).__name__}: {error}; rerun with --debug "
            "for the traceback and report it.",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())

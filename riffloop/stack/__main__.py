"""``python -m riffloop.stack up|down|status [--tiny]``: infra + the six services, locally.

``up`` starts Kafka, MinIO and Redis (``riffloop.infra``), then every service process, and
waits until each answers SERVING; it prints the gateway address, a token for a test user, an
operator token for the internal services' RPCs (riffloop.client.operator_channel) and the web page's
URL (the gateway's browser API, web/; built by ``bin/riffloop stack up``).
The trainer serves the trained ``assets/base-model``; ``--tiny`` swaps in an untrained tiny model
(RIFFLOOP_UNTRAINED_BASE=1: fast, but its tracks are noise) for smoke tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from riffloop.core import RiffloopError
from riffloop.infra import LocalInfra, default_state_dir
from riffloop.runtime import TokenSigner, operator_token
from riffloop.stack._stack import TINY, ServiceProcesses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m riffloop.stack", description=__doc__)
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--state-dir", type=Path, default=default_state_dir().parent / "stack")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="untrained tiny model (noise) and few steps: smoke tests only",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to wait for every service to be SERVING",
    )
    options = parser.parse_args(argv)
    infra = LocalInfra(default_state_dir())
    try:
        if options.command == "up":
            addresses = infra.start()
            processes = ServiceProcesses(
                options.state_dir, addresses.env(), overrides=TINY if options.tiny else None
            )
            processes.up(timeout_s=options.timeout)
            gateway = processes.state.processes["gateway"]
            token = TokenSigner(processes.state.auth_secret).issue("demo")
            print(f"gateway {gateway.target}\ntoken (user demo) {token}")
            operator = operator_token(processes.state.operator_secret, "operator")
            print(f"operator token (internal RPCs, 12 h) {operator}")
            print(f"web page {gateway.web_url} (sign in with any name: a development stack)")
            for name, line in processes.status().items():
                print(f"{name:10} {line}")
            return 0
        processes = ServiceProcesses(options.state_dir, {})
        if options.command == "status":
            for name, line in processes.status().items():
                print(f"{name:10} {line}")
            for server in infra.status():
                state = "ready" if server.ready else ("alive" if server.alive else "stopped")
                print(f"{server.name:10} {state} {server.address or ''} ({server.description})")
            return 0
        codes = processes.down()
        infra.stop()
        print(
            "down: "
            + ", ".join(
                f"{n} " + (f"exit {c}" if c is not None else "stopped") for n, c in codes.items()
            )
        )
        return 0
    except RiffloopError as error:
        print(f"riffloop.stack: {error.reason}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m riffloop.music corpus|train|export`` — build the corpus, train, export weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from riffloop.core import RiffloopError
from riffloop.music._corpus import build_corpus, default_cache_dir
from riffloop.music._mel import MelConfig


def _corpus(args: argparse.Namespace) -> int:
    mel = MelConfig.preset(args.resolution)
    out = build_corpus(
        Path(args.cache) if args.cache else default_cache_dir(),
        mel,
        seed=args.seed,
        workers=args.workers,
        limit=args.limit,
        progress=lambda line: print(line, flush=True),
    )
    print(out)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m riffloop.music", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    corpus = sub.add_parser("corpus", help="render music21's corpus and slice it into mel windows")
    corpus.add_argument("--resolution", type=int, default=64, choices=MelConfig.PRESETS)
    corpus.add_argument("--cache", help="cache folder (default: RIFFLOOP_CACHE or ~/.cache)")
    corpus.add_argument("--workers", type=int, default=2)
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--limit", type=int, help="only the first N pieces (smoke tests)")
    corpus.set_defaults(handler=_corpus)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except RiffloopError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

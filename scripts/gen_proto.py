#!/usr/bin/env python3
"""Generate Python code (+ .pyi stubs and gRPC stubs) from proto/riffloop/v1/*.proto.

The modules land in ``riffloop/v1/<name>_pb2.py`` (git-ignored) because protoc mirrors the proto
package path under the output root, which is the repository root. The run is idempotent: a stamp
file holds the SHA-256 of every source, of this script and of the grpcio-tools version, and the
generator does nothing when they are unchanged (``--force`` regenerates anyway).

Usage: ``python scripts/gen_proto.py [--force] [--quiet]``. Exit 0 on success, 1 with one sentence
on stderr on failure.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_DIR = PROTO_ROOT / "riffloop" / "v1"
OUT_PACKAGE = REPO_ROOT / "riffloop" / "v1"
STAMP = OUT_PACKAGE / ".gen_proto.stamp"
INIT_TEXT = '"""Generated from proto/riffloop/v1 by scripts/gen_proto.py; do not edit."""\n'


class GenerationError(Exception):
    """A failure with a one-sentence explanation for the user."""


def proto_sources(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Every .proto file of the v1 tree, sorted so the stamp is stable."""
    sources = sorted(proto_dir.glob("*.proto"))
    if not sources:
        raise GenerationError(f"no .proto files found in {proto_dir}")
    return sources


def source_digest(sources: list[Path]) -> str:
    """SHA-256 over the sources (names and bytes), this script and the generator's version."""
    digest = hashlib.sha256()
    for path in [*sources, Path(__file__).resolve()]:
        digest.update(path.name.encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    try:
        digest.update(importlib.metadata.version("grpcio-tools").encode())
    except importlib.metadata.PackageNotFoundError as exc:
        raise GenerationError("grpcio-tools is not installed in this Python environment") from exc
    return digest.hexdigest()


def is_up_to_date(digest: str) -> bool:
    if not STAMP.is_file() or STAMP.read_text().strip() != digest:
        return False
    # The stamp alone is not enough: someone may have deleted a generated module.
    return all((OUT_PACKAGE / f"{p.stem}_pb2.py").is_file() for p in proto_sources())


def _run_protoc(sources: list[Path], out_dir: Path) -> None:
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise GenerationError("grpcio-tools is not installed in this Python environment") from exc
    import importlib.resources

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in sources),
    ]
    code = protoc.main(args)
    if code != 0:
        raise GenerationError(
            f"protoc failed with exit code {code} on {PROTO_DIR} (its message is printed above)"
        )


def generate(*, force: bool = False) -> bool:
    """Generate the modules; return False when they were already up to date."""
    sources = proto_sources()
    digest = source_digest(sources)
    if not force and is_up_to_date(digest):
        return False
    # Generate into a temporary tree, then swap the files in, so a failed run leaves the previous
    # generation intact and importable.
    with tempfile.TemporaryDirectory(prefix="riffloop-gen-proto-") as tmp:
        tmp_root = Path(tmp)
        _run_protoc(sources, tmp_root)
        generated = tmp_root / "riffloop" / "v1"
        OUT_PACKAGE.mkdir(parents=True, exist_ok=True)
        for old in OUT_PACKAGE.glob("*_pb2*.py*"):
            old.unlink()
        for new in generated.iterdir():
            shutil.copy2(new, OUT_PACKAGE / new.name)
    (OUT_PACKAGE / "__init__.py").write_text(INIT_TEXT)
    (OUT_PACKAGE / "py.typed").write_text("")
    STAMP.write_text(digest + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    options = parser.parse_args(argv)
    try:
        changed = generate(force=options.force)
    except (GenerationError, OSError) as exc:
        print(f"gen_proto: {exc}", file=sys.stderr)
        return 1
    if not options.quiet:
        what = "generated" if changed else "up to date"
        print(f"gen_proto: {OUT_PACKAGE.relative_to(REPO_ROOT)} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Builds the ``riffloop`` distribution (``pip install .``): the generated protobuf modules are
made first (scripts/gen_proto.py, needs grpcio-tools: a build requirement), since the typed
gateway client (``riffloop.client``) needs them and git does not hold them."""

import subprocess
import sys
from pathlib import Path

from setuptools import setup

subprocess.run(
    [sys.executable, str(Path(__file__).parent / "scripts" / "gen_proto.py"), "--quiet"],
    check=True,
)
setup()

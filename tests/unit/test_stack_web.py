"""A stack's gateway process serves the web page and its API on the port ``stack up`` prints."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from riffloop.stack import ServiceProcesses

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_the_stacks_gateway_serves_the_page_with_dev_sign_in(tmp_path: Path) -> None:
    stack = ServiceProcesses(tmp_path, {}, tied_to_parent=True)  # embedded backend
    gateway = stack.start("gateway")
    try:
        assert gateway.web_url.startswith("http://127.0.0.1:") and gateway.web_port > 0
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{gateway.web_url}auth/config", timeout=2) as reply:
                    assert json.loads(reply.read()) == {"devSignIn": True}
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, Path(gateway.log).read_text()[-2000:]
                time.sleep(0.5)
        if (REPO / "web" / "dist" / "index.html").is_file():
            with urllib.request.urlopen(gateway.web_url, timeout=5) as reply:
                assert b"<title>Riffloop</title>" in reply.read()
                assert "default-src 'self'" in reply.headers["content-security-policy"]
    finally:
        stack.down()

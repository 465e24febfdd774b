"""Fixtures of the offline deploy checks (the helpers live in deploy_support.py, a module with a
name of its own: every test folder has a conftest.py, so ``import conftest`` would be ambiguous)."""

from __future__ import annotations

from typing import Any

import pytest
from deploy_support import OVERLAYS, render


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(overlay: str) -> list[dict[str, Any]]:
    return render(overlay)

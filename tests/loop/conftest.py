"""Loop test fixtures; the synthetic crowd lives in tests/loop/crowd.py."""

from __future__ import annotations

import pytest
import torch

from riffloop.loop import Dispatcher

torch.set_num_threads(1)


@pytest.fixture
def dispatcher() -> Dispatcher:
    return Dispatcher(baseline_share=0.25, key=7)

"""The trainer service: training sets → gated model versions (``python -m services.trainer``)."""

from services.trainer._build import build
from services.trainer._service import (
    BUNDLED_BASE_MODEL,
    TrainerCore,
    TrainerServicer,
    TrainerSettings,
)

__all__ = ["BUNDLED_BASE_MODEL", "TrainerCore", "TrainerServicer", "TrainerSettings", "build"]

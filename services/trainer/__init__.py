"""The trainer service: training sets → gated model versions (``python -m services.trainer``)."""

from services.trainer._build import build
from services.trainer._service import TrainerHandlers, TrainerServicer
from services.trainer._settings import BUNDLED_BASE_MODEL, TrainerSettings

__all__ = ["BUNDLED_BASE_MODEL", "TrainerHandlers", "TrainerServicer", "TrainerSettings", "build"]

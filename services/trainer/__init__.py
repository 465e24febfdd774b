"""The trainer service: training sets → gated model versions (``python -m services.trainer``)."""

from services.trainer._build import build
from services.trainer._service import TrainerCore, TrainerServicer, TrainerSettings

__all__ = ["TrainerCore", "TrainerServicer", "TrainerSettings", "build"]
